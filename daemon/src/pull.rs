//! Pulling images from OCI distribution registries.
//!
//! The HTTP side (anonymous bearer tokens, credentials, manifests, blob streams) is the `oci-client` crate; the
//! store side (verification, unpacking, commits) is `sandbox_runtime::image`. This module decides where to fetch
//! from (mirrors in order, then the registry itself), which manifest to take from an index, runs the layer
//! downloads in parallel (bounded over all pulls), streams every layer straight into the unpacker on a blocking
//! thread, and makes concurrent pulls of one reference, or of one layer, share a single download.
//!
//! Failure rules: every error carries a stable code naming the image and the cause; a failed pull waits until all
//! of its layer tasks have stopped and cleaned up before it answers, so nothing partial is left behind when the
//! caller hears of the failure. Layers completed by a failed pull stay in the store (unreferenced) until the next
//! garbage collection, so retrying soon downloads only what is missing.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;
use sandbox_proto::{
    ApiError, ErrorCode, ImageRef, LayerProgress, LayerStatus, PullEvent, PullResult,
};
use sandbox_runtime::image::{
    digest_of, parse_manifest, ImageError, ImageStore, IndexEntry, LayerRef, Lease, Manifest,
    Platform, PulledImage,
};
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RegistryConfig};
use crate::error::{image_error, internal};

/// Upper bound for manifests and configs held in memory.
const DOCUMENT_LIMIT: usize = 32 << 20;
/// Emit a progress event at least every this many bytes of a layer.
const PROGRESS_STEP: u64 = 512 << 10;

/// Where a registry is reached: the registry itself or one of its mirrors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host[:port]`.
    pub host: String,
    /// Plain HTTP.
    pub http: bool,
    /// A mirror (requests carry `?ns=<registry>`), not the registry itself.
    pub mirror: bool,
}

impl Endpoint {
    /// Parses a mirror: `http://host[:port]`, `https://host[:port]` or a bare `host[:port]` (HTTPS unless on
    /// loopback).
    pub fn mirror(s: &str) -> Result<Self, String> {
        let (scheme, rest) = match s.split_once("://") {
            Some((scheme, rest)) => (Some(scheme), rest),
            None => (None, s),
        };
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!(
                "mirror {s:?} must be scheme://host[:port] (a path is not supported)"
            ));
        }
        let http = match scheme {
            Some("http") => true,
            Some("https") => false,
            None => is_loopback(host),
            Some(other) => return Err(format!("mirror {s:?}: unsupported scheme {other:?}")),
        };
        Ok(Self {
            host: host.to_owned(),
            http,
            mirror: true,
        })
    }

    fn url(&self) -> String {
        // oci-client (like Docker) reaches Docker Hub's registry under this name.
        let host = if self.host == "docker.io" && !self.mirror {
            "index.docker.io"
        } else {
            &self.host
        };
        format!("{}://{host}", if self.http { "http" } else { "https" })
    }
}

/// Whether `host[:port]` names a loopback address (`localhost`, `127.0.0.0/8`, `::1`).
fn is_loopback(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else if host.matches(':').count() == 1 {
        host.split(':').next().unwrap_or(host)
    } else {
        host
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// Credentials read from a Docker `config.json`.
#[derive(Debug, Default, Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(Debug, Default, Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

fn docker_config_path(configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = configured {
        return Some(p.to_owned());
    }
    if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// The credentials for `host` from the Docker config (read at every pull, so `docker login` takes effect without
/// a restart). Anonymous when there are none.
fn credentials(path: Option<&Path>, host: &str, registry: &str) -> Result<RegistryAuth, ApiError> {
    let Some(path) = path else {
        return Ok(RegistryAuth::Anonymous);
    };
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(e) => {
            return Err(ApiError::new(
                ErrorCode::RegistryUnauthorized,
                format!(
                    "cannot read registry credentials from {}: {e}",
                    path.display()
                ),
            ))
        }
    };
    let cfg: DockerConfig = serde_json::from_slice(&text).map_err(|e| {
        ApiError::new(
            ErrorCode::RegistryUnauthorized,
            format!(
                "malformed registry credentials file {}: {e}",
                path.display()
            ),
        )
    })?;
    let mut keys = vec![
        host.to_owned(),
        format!("https://{host}"),
        format!("http://{host}"),
        format!("https://{host}/v1/"),
        format!("https://{host}/v2/"),
    ];
    if registry == "docker.io" && host == "docker.io" {
        keys.extend(
            [
                "https://index.docker.io/v1/",
                "index.docker.io",
                "registry-1.docker.io",
                "https://registry-1.docker.io",
            ]
            .map(str::to_owned),
        );
    }
    let Some(entry) = keys.iter().find_map(|k| cfg.auths.get(k)) else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(token) = entry.registrytoken.as_ref().filter(|t| !t.is_empty()) {
        return Ok(RegistryAuth::Bearer(token.clone()));
    }
    if let Some(b64) = entry.auth.as_ref().filter(|a| !a.is_empty()) {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::RegistryUnauthorized,
                    format!("malformed auth for {host} in {}: {e}", path.display()),
                )
            })?;
        let raw = String::from_utf8_lossy(&raw).into_owned();
        let (user, pass) = raw.split_once(':').ok_or_else(|| {
            ApiError::new(
                ErrorCode::RegistryUnauthorized,
                format!(
                    "auth for {host} in {} is not base64(user:password)",
                    path.display()
                ),
            )
        })?;
        return Ok(RegistryAuth::Basic(user.to_owned(), pass.to_owned()));
    }
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(RegistryAuth::Basic(u.clone(), p.clone()));
    }
    if entry.identitytoken.is_some() {
        tracing::warn!(%host, "identity tokens (OAuth refresh tokens) in the Docker config are not supported; pulling anonymously");
    }
    Ok(RegistryAuth::Anonymous)
}

/// A pull in progress that later requests for the same reference join.
struct Flight {
    events: broadcast::Sender<PullEvent>,
    state: StdMutex<FlightState>,
    result: watch::Receiver<Option<Result<PullResult, ApiError>>>,
}

#[derive(Default)]
struct FlightState {
    resolved: Option<PullEvent>,
    layers: Vec<LayerProgress>,
}

impl Flight {
    fn emit_layer(&self, i: usize, status: LayerStatus, downloaded: u64) {
        let ev = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let Some(l) = st.layers.get_mut(i) else {
                return;
            };
            l.status = status;
            l.downloaded = downloaded;
            PullEvent::Layer(l.clone())
        };
        // No receiver is fine: nobody is watching progress.
        let _ = self.events.send(ev);
    }

    fn emit_resolved(&self, ev: PullEvent) {
        if let PullEvent::Resolved { layers, .. } = &ev {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.layers = layers.clone();
            st.resolved = Some(ev.clone());
        }
        let _ = self.events.send(ev);
    }
}

/// What a pull request gets: progress events and the outcome.
pub struct Subscription {
    /// Events so far (resolved, latest status of each layer), to replay first.
    pub snapshot: Vec<PullEvent>,
    /// Events from now on (ends with `done` or `error`).
    pub events: broadcast::Receiver<PullEvent>,
    /// The outcome, once known.
    pub result: watch::Receiver<Option<Result<PullResult, ApiError>>>,
    /// Whether this request joined a pull already in progress.
    pub joined: bool,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("joined", &self.joined)
            .finish_non_exhaustive()
    }
}

/// Pulls images; shared by the API handlers and sandbox creation.
pub struct Puller {
    store: Arc<ImageStore>,
    registries: BTreeMap<String, RegistryConfig>,
    docker_config: Option<PathBuf>,
    timeout: Duration,
    attempts: u32,
    downloads: Arc<Semaphore>,
    flights: StdMutex<HashMap<String, Arc<Flight>>>,
    /// Layer blobs being downloaded, by digest: a second pull needing one waits for it.
    blob_flights: StdMutex<HashMap<String, watch::Receiver<bool>>>,
}

impl std::fmt::Debug for Puller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Puller")
            .field("registries", &self.registries)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Why fetching a blob stopped.
enum FetchError {
    /// The consumer (unpacker) stopped reading: its error is the one to report.
    ConsumerGone,
    /// The pull was cancelled (timeout or a sibling's failure).
    Cancelled,
    Api(ApiError),
}

/// A blocking reader over the chunks a download task sends.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        let chunk = self.current.split_to(n);
        buf.get_mut(..n).unwrap_or_default().copy_from_slice(&chunk);
        Ok(n)
    }
}

/// Everything one pull needs once the manifest is known.
struct Resolved {
    /// The client that resolved the manifest (holding its credentials and token), for the layers.
    client: oci_client::Client,
    reference: Reference,
    auth: RegistryAuth,
    resolved_digest: String,
    manifest_digest: String,
    platform: String,
    layers: Vec<LayerRef>,
    diff_ids: Vec<String>,
    config_digest: String,
    /// Everything above stays in the store while the pull runs.
    _leases: Vec<Lease>,
}

fn api(code: ErrorCode, message: String) -> ApiError {
    ApiError::new(code, message)
}

/// Maps an `oci-client` error for `what` (e.g. "manifest of docker.io/library/x:1 from https://...") to an API error.
fn registry_error(what: &str, e: &OciDistributionError) -> ApiError {
    use OciDistributionError as E;
    match e {
        E::RequestError(re) => {
            let code = if re.is_connect() || re.is_timeout() {
                ErrorCode::RegistryUnreachable
            } else {
                ErrorCode::RegistryError
            };
            let mut msg = format!("{what}: {re}");
            let mut src = std::error::Error::source(re);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            api(code, msg)
        }
        E::UnauthorizedError { url } => api(
            ErrorCode::RegistryUnauthorized,
            format!("{what}: the registry refused access to {url} (repository may not exist, or may need credentials in the Docker config.json)"),
        ),
        E::AuthenticationFailure(m) => api(
            ErrorCode::RegistryUnauthorized,
            format!("{what}: authentication failed: {}", m.trim()),
        ),
        E::RegistryError { envelope, url } => {
            let codes: Vec<&str> = envelope.errors.iter().map(|e| e.code.as_str_code()).collect();
            let text: Vec<String> = envelope
                .errors
                .iter()
                .map(|e| format!("{}: {}", e.code.as_str_code(), e.message))
                .collect();
            let code = if codes.iter().any(|c| {
                matches!(*c, "MANIFEST_UNKNOWN" | "NAME_UNKNOWN" | "BLOB_UNKNOWN" | "NOT_FOUND" | "TAG_INVALID")
            }) {
                ErrorCode::ImageNotFound
            } else if codes.iter().any(|c| matches!(*c, "UNAUTHORIZED" | "DENIED")) {
                ErrorCode::RegistryUnauthorized
            } else {
                ErrorCode::RegistryError
            };
            api(code, format!("{what}: {url} answered {}", text.join("; ")))
        }
        E::ImageManifestNotFoundError(m) => api(ErrorCode::ImageNotFound, format!("{what}: {m}")),
        E::ServerError { code, url, message } => {
            let c = match code {
                404 => ErrorCode::ImageNotFound,
                401 | 403 => ErrorCode::RegistryUnauthorized,
                _ => ErrorCode::RegistryError,
            };
            let message: String = message.chars().take(300).collect();
            api(c, format!("{what}: {url} answered HTTP {code}: {}", message.trim()))
        }
        E::DigestError(d) => api(ErrorCode::DigestMismatch, format!("{what}: {d}")),
        E::ManifestParsingError(_)
        | E::VersionedParsingError(_)
        | E::UnsupportedSchemaVersionError(_)
        | E::UnsupportedMediaTypeError(_)
        | E::JsonError(_)
        | E::ManifestEncodingError(_) => api(ErrorCode::InvalidImage, format!("{what}: {e}")),
        other => api(ErrorCode::RegistryError, format!("{what}: {other}")),
    }
}

trait ErrorCodeName {
    fn as_str_code(&self) -> &'static str;
}

impl ErrorCodeName for oci_client::errors::OciErrorCode {
    fn as_str_code(&self) -> &'static str {
        use oci_client::errors::OciErrorCode as C;
        match self {
            C::BlobUnknown => "BLOB_UNKNOWN",
            C::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            C::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            C::DigestInvalid => "DIGEST_INVALID",
            C::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            C::ManifestInvalid => "MANIFEST_INVALID",
            C::ManifestUnknown => "MANIFEST_UNKNOWN",
            C::ManifestUnverified => "MANIFEST_UNVERIFIED",
            C::NameInvalid => "NAME_INVALID",
            C::NameUnknown => "NAME_UNKNOWN",
            C::SizeInvalid => "SIZE_INVALID",
            C::TagInvalid => "TAG_INVALID",
            C::Unauthorized => "UNAUTHORIZED",
            C::Denied => "DENIED",
            C::Unsupported => "UNSUPPORTED",
            C::Toomanyrequests => "TOOMANYREQUESTS",
            _ => "UNKNOWN",
        }
    }
}

/// How specific an error is, to choose which endpoint's failure to report when all failed: an answer about the
/// image beats a failure to get any answer.
fn specificity(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::DigestMismatch | ErrorCode::InvalidImage | ErrorCode::PlatformNotFound => 5,
        ErrorCode::ImageNotFound => 4,
        ErrorCode::RegistryUnauthorized => 3,
        ErrorCode::RegistryError => 2,
        ErrorCode::RegistryUnreachable => 1,
        _ => 0,
    }
}

impl Puller {
    /// A puller over `store`, configured from the daemon's configuration.
    pub fn new(store: Arc<ImageStore>, cfg: &Config) -> Result<Self, String> {
        Ok(Self {
            store,
            registries: cfg.registries.clone(),
            docker_config: docker_config_path(cfg.pull.docker_config.as_deref()),
            timeout: Duration::from_secs_f64(cfg.pull.timeout_seconds),
            attempts: cfg.pull.download_attempts,
            downloads: Arc::new(Semaphore::new(cfg.pull.max_concurrent_downloads)),
            flights: StdMutex::new(HashMap::new()),
            blob_flights: StdMutex::new(HashMap::new()),
        })
    }

    /// Endpoints for a registry, in the order they are tried: mirrors, then the registry itself.
    pub fn endpoints(&self, registry: &str) -> Vec<Endpoint> {
        let cfg = self.registries.get(registry);
        let mut out: Vec<Endpoint> = cfg
            .map(|c| {
                c.mirrors
                    .iter()
                    .filter_map(|m| Endpoint::mirror(m).ok())
                    .collect()
            })
            .unwrap_or_default();
        out.push(Endpoint {
            host: registry.to_owned(),
            http: cfg.is_some_and(|c| c.insecure) || is_loopback(registry),
            mirror: false,
        });
        out
    }

    /// A client for one pull from `ep`. Not shared between pulls: oci-client keeps the first credentials it is
    /// given for a registry for good, and the Docker config is read at every pull.
    fn client(ep: &Endpoint) -> oci_client::Client {
        oci_client::Client::new(ClientConfig {
            protocol: if ep.http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(30)),
            // A stalled connection (no bytes for this long) fails and is retried.
            read_timeout: Some(Duration::from_secs(60)),
            user_agent: concat!("sandboxd/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        })
    }

    /// Pulls `reference` (joining a pull of it already in progress) and waits for the outcome.
    pub async fn pull(
        self: &Arc<Self>,
        reference: &str,
        platform: Option<&str>,
    ) -> Result<PullResult, ApiError> {
        let sub = self.subscribe(reference, platform)?;
        let joined = sub.joined;
        let mut rx = sub.result;
        let res = loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                break r;
            }
            if rx.changed().await.is_err() {
                break Err(internal("pull", "the pull task ended without an outcome"));
            }
        };
        res.map(|mut r| {
            r.joined = joined;
            r
        })
    }

    /// Starts (or joins) a pull of `reference` and answers its progress and outcome.
    pub fn subscribe(
        self: &Arc<Self>,
        reference: &str,
        platform: Option<&str>,
    ) -> Result<Subscription, ApiError> {
        let r = ImageRef::parse(reference).map_err(|mut e| {
            e.details = Some(serde_json::json!({ "field": "reference" }));
            e
        })?;
        let platform = match platform {
            Some(p) => Platform::parse(p).map_err(|m| ApiError::invalid_argument("platform", m))?,
            None => Platform::host(),
        };
        let key = format!("{} {platform}", r.canonical());
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = flights.get(&key) {
            let st = f.state.lock().unwrap_or_else(|e| e.into_inner());
            let mut snapshot: Vec<PullEvent> = st.resolved.iter().cloned().collect();
            snapshot.extend(st.layers.iter().cloned().map(PullEvent::Layer));
            // Subscribed under the state lock: no event is lost between the snapshot and the stream.
            let events = f.events.subscribe();
            drop(st);
            return Ok(Subscription {
                snapshot,
                events,
                result: f.result.clone(),
                joined: true,
            });
        }
        let (events, rx_events) = broadcast::channel(1024);
        let (tx_result, rx_result) = watch::channel(None);
        let flight = Arc::new(Flight {
            events,
            state: StdMutex::new(FlightState::default()),
            result: rx_result.clone(),
        });
        flights.insert(key.clone(), flight.clone());
        drop(flights);
        let this = self.clone();
        tokio::spawn(async move {
            let res = this.run(&r, &platform, &flight).await;
            match &res {
                Ok(p) => {
                    tracing::info!(reference = %r, digest = %p.image.digest, downloaded = p.downloaded_bytes, "pulled image")
                }
                Err(e) => {
                    tracing::warn!(reference = %r, code = %e.code, error = %e.message, "pull failed")
                }
            }
            let final_event = match &res {
                Ok(p) => PullEvent::Done(p.clone()),
                Err(e) => PullEvent::Error { error: e.clone() },
            };
            let mut flights = this.flights.lock().unwrap_or_else(|e| e.into_inner());
            flights.remove(&key);
            let _ = tx_result.send(Some(res));
            let _ = flight.events.send(final_event);
        });
        Ok(Subscription {
            snapshot: Vec::new(),
            events: rx_events,
            result: rx_result,
            joined: false,
        })
    }

    /// One pull, bounded by the configured timeout. On timeout the pull is cancelled and waited for, so its
    /// cleanup is done when the error is reported.
    async fn run(
        self: &Arc<Self>,
        r: &ImageRef,
        platform: &Platform,
        flight: &Arc<Flight>,
    ) -> Result<PullResult, ApiError> {
        let cancel = CancellationToken::new();
        let work = self.pull_inner(r, platform, flight, &cancel);
        tokio::pin!(work);
        tokio::select! {
            res = &mut work => res,
            () = tokio::time::sleep(self.timeout) => {
                cancel.cancel();
                let _ = work.await;
                Err(api(
                    ErrorCode::PullTimeout,
                    format!("pull of {r} did not finish within {} s (pull.timeout_seconds)", self.timeout.as_secs_f64()),
                ))
            }
        }
    }

    async fn pull_inner(
        self: &Arc<Self>,
        r: &ImageRef,
        platform: &Platform,
        flight: &Arc<Flight>,
        cancel: &CancellationToken,
    ) -> Result<PullResult, ApiError> {
        let resolved = tokio::select! {
            res = self.resolve(r, platform) => res?,
            () = cancel.cancelled() => return Err(api(ErrorCode::PullTimeout, format!("pull of {r} cancelled"))),
        };
        let canonical = r.canonical();
        flight.emit_resolved(PullEvent::Resolved {
            reference: canonical.clone(),
            resolved_digest: resolved.resolved_digest.clone(),
            digest: resolved.manifest_digest.clone(),
            platform: resolved.platform.clone(),
            layers: resolved
                .layers
                .iter()
                .map(|l| LayerProgress {
                    digest: l.digest.clone(),
                    size: l.size,
                    status: LayerStatus::Waiting,
                    downloaded: 0,
                })
                .collect(),
        });

        let resolved = Arc::new(resolved);
        let siblings = cancel.child_token();
        let tasks = (0..resolved.layers.len()).map(|i| {
            let this = self.clone();
            let (resolved, flight, siblings) = (resolved.clone(), flight.clone(), siblings.clone());
            let canonical = canonical.clone();
            async move {
                let res = this
                    .layer(&canonical, &resolved, i, &flight, &siblings)
                    .await;
                if res.is_err() {
                    // The first failure stops the others; every task still finishes (and cleans up) before the
                    // pull answers.
                    siblings.cancel();
                }
                res
            }
        });
        let results = futures_util::future::join_all(tasks).await;
        let mut downloaded = 0u64;
        let (mut fetched, mut present) = (0u32, 0u32);
        let mut first_err: Option<ApiError> = None;
        for res in results {
            match res {
                Ok(Some(bytes)) => {
                    fetched += 1;
                    downloaded += bytes;
                }
                Ok(None) => present += 1,
                Err(FetchError::Api(e)) => {
                    if first_err.is_none() {
                        first_err = Some(e);
                    }
                }
                Err(FetchError::Cancelled) | Err(FetchError::ConsumerGone) => {}
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if cancel.is_cancelled() || siblings.is_cancelled() {
            return Err(api(
                ErrorCode::PullTimeout,
                format!("pull of {r} cancelled"),
            ));
        }
        let pulled = PulledImage {
            manifest_digest: resolved.manifest_digest.clone(),
            config_digest: resolved.config_digest.clone(),
            layers: resolved.layers.clone(),
            reference: canonical.clone(),
            repo_digest: format!(
                "{}/{}@{}",
                r.registry, r.repository, resolved.resolved_digest
            ),
        };
        let store = self.store.clone();
        let image = tokio::task::spawn_blocking(move || store.commit_pulled(&pulled))
            .await
            .map_err(|e| internal("commit", e))?
            .map_err(|e| with_image(image_error(e), &canonical))?;
        Ok(PullResult {
            image: crate::manager::image_info(&image),
            resolved_digest: resolved.resolved_digest.clone(),
            downloaded_bytes: downloaded,
            layers_downloaded: fetched,
            layers_present: present,
            joined: false,
        })
    }

    /// Finds the manifest: each endpoint in turn until one answers with a usable one.
    async fn resolve(&self, r: &ImageRef, platform: &Platform) -> Result<Resolved, ApiError> {
        let mut failures: Vec<(Endpoint, ApiError)> = Vec::new();
        for ep in self.endpoints(&r.registry) {
            match self.resolve_at(&ep, r, platform).await {
                Ok(res) => {
                    if !failures.is_empty() {
                        tracing::info!(reference = %r, endpoint = %ep.url(), "resolved after earlier endpoints failed");
                    }
                    return Ok(res);
                }
                Err(e) => {
                    tracing::info!(reference = %r, endpoint = %ep.url(), code = %e.code, error = %e.message, "endpoint failed");
                    // An answer about the image's content itself (bad digest, bad manifest) is final: another
                    // mirror serving different bytes for a digest must not paper over it.
                    let fatal =
                        matches!(e.code, ErrorCode::DigestMismatch | ErrorCode::InvalidImage);
                    failures.push((ep, e));
                    if fatal {
                        break;
                    }
                }
            }
        }
        let best = failures
            .iter()
            .enumerate()
            .max_by_key(|(i, (_, e))| (specificity(e.code), std::cmp::Reverse(*i)))
            .map(|(i, _)| i)
            .unwrap_or(0);
        let (code, details) = failures
            .get(best)
            .map(|(_, e)| (e.code, e.details.clone()))
            .unwrap_or((ErrorCode::Internal, None));
        let message = if failures.len() == 1 {
            failures
                .first()
                .map(|(_, e)| e.message.clone())
                .unwrap_or_default()
        } else {
            failures
                .iter()
                .map(|(ep, e)| format!("{} ({}): {}", ep.url(), e.code, e.message))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let lead = match code {
            ErrorCode::ImageNotFound => format!("image {r} not found"),
            ErrorCode::RegistryUnreachable => format!("registry of {r} unreachable"),
            ErrorCode::RegistryUnauthorized => format!("access to {r} refused"),
            ErrorCode::PlatformNotFound => format!("image {r} has no manifest for {platform}"),
            _ => format!("cannot pull {r}"),
        };
        let mut err = ApiError::new(code, format!("{lead}: {message}"));
        let mut d = details.unwrap_or_else(|| serde_json::json!({}));
        if let Some(obj) = d.as_object_mut() {
            obj.insert("reference".into(), r.canonical().into());
        }
        err.details = Some(d);
        Err(err)
    }

    async fn resolve_at(
        &self,
        ep: &Endpoint,
        r: &ImageRef,
        platform: &Platform,
    ) -> Result<Resolved, ApiError> {
        let client = Self::client(ep);
        let auth = credentials(self.docker_config.as_deref(), &ep.host, &r.registry)?;
        let mut reference = match (&r.tag, &r.digest) {
            (_, Some(d)) => {
                Reference::with_digest(r.registry.clone(), r.repository.clone(), d.clone())
            }
            (Some(t), None) => {
                Reference::with_tag(r.registry.clone(), r.repository.clone(), t.clone())
            }
            (None, None) => Reference::with_tag(
                r.registry.clone(),
                r.repository.clone(),
                "latest".to_owned(),
            ),
        };
        if ep.mirror {
            reference.set_mirror_registry(ep.host.clone());
        }
        let from = ep.url();
        let accepted = sandbox_runtime::image::ACCEPTED_MANIFEST_TYPES;
        let what = format!("manifest of {r} from {from}");
        let (bytes, digest) = client
            .pull_manifest_raw(&reference, &auth, &accepted)
            .await
            .map_err(|e| registry_error(&what, &e))?;
        check_document(&bytes, &what)?;
        let actual = digest_of(&bytes);
        if let Some(want) = &r.digest {
            if &actual != want {
                return Err(api(
                    ErrorCode::DigestMismatch,
                    format!("{what}: asked for {want}, got content with digest {actual}"),
                ));
            }
        }
        if digest != actual {
            return Err(api(
                ErrorCode::DigestMismatch,
                format!("{what}: the registry says {digest} but the content's digest is {actual}"),
            ));
        }
        let resolved_digest = actual;
        let store = self.store.clone();
        let (m, w) = (bytes.clone(), what.clone());
        let top = blocking(move || parse_manifest(&m, None, &w)).await?;
        let (manifest, manifest_bytes, manifest_digest, chosen_platform) = match top {
            Manifest::Image(m) => (m, bytes, resolved_digest.clone(), None),
            Manifest::Index(entries) => {
                let entry: IndexEntry =
                    Manifest::choose(&entries, platform, &format!("index of {r}"))
                        .map_err(image_error)?
                        .clone();
                let mut by_digest = reference.clone();
                by_digest = Reference::with_digest(
                    by_digest.registry().to_owned(),
                    by_digest.repository().to_owned(),
                    entry.digest.clone(),
                );
                if ep.mirror {
                    by_digest.set_mirror_registry(ep.host.clone());
                }
                let what = format!("manifest {} of {r} from {from}", entry.digest);
                let (mbytes, _) = client
                    .pull_manifest_raw(&by_digest, &auth, &accepted)
                    .await
                    .map_err(|e| registry_error(&what, &e))?;
                check_document(&mbytes, &what)?;
                let actual = digest_of(&mbytes);
                if actual != entry.digest {
                    return Err(api(
                        ErrorCode::DigestMismatch,
                        format!(
                            "{what}: the index names {} but the content's digest is {actual}",
                            entry.digest
                        ),
                    ));
                }
                let (m, w) = (mbytes.clone(), what.clone());
                match blocking(move || parse_manifest(&m, None, &w)).await? {
                    Manifest::Image(m) => (m, mbytes, entry.digest.clone(), entry.platform.clone()),
                    Manifest::Index(_) => {
                        return Err(api(
                            ErrorCode::InvalidImage,
                            format!("{what}: an index inside an index is not supported"),
                        ))
                    }
                }
            }
        };
        // From the first commit on, what this pull stores is leased: a collection running meanwhile (a sandbox
        // removed, a prune) cannot take it away before the image record refers to it.
        let mut leases = vec![
            lease(
                &store,
                vec![manifest_digest.clone(), manifest.config_digest.clone()],
            )
            .await?,
        ];
        let (st, b, d, w) = (
            store.clone(),
            manifest_bytes.clone(),
            manifest_digest.clone(),
            what.clone(),
        );
        blocking(move || st.put_blob(&b, &d, &w)).await?;

        // The config: small, fetched whole, verified by the store before it is committed.
        let what = format!("config {} of {r} from {from}", manifest.config_digest);
        let config_bytes = if store.has_blob(&manifest.config_digest) {
            let (st, d, w) = (store.clone(), manifest.config_digest.clone(), what.clone());
            blocking(move || st.read_blob(&d, &w)).await?
        } else {
            let mut out: Vec<u8> = Vec::new();
            let mut sized = client
                .pull_blob_stream(&reference, manifest.config_digest.as_str())
                .await
                .map_err(|e| registry_error(&what, &e))?;
            while let Some(chunk) = sized.stream.next().await {
                let chunk = chunk.map_err(|e| {
                    let code = if is_digest_error(&e) {
                        ErrorCode::DigestMismatch
                    } else {
                        ErrorCode::RegistryError
                    };
                    api(code, format!("{what}: {e}"))
                })?;
                out.extend_from_slice(&chunk);
                if out.len() > DOCUMENT_LIMIT || out.len() as u64 > manifest.config_size {
                    return Err(api(
                        ErrorCode::DigestMismatch,
                        format!(
                            "{what}: longer than the {} bytes the manifest announces",
                            manifest.config_size
                        ),
                    ));
                }
            }
            let (st, b, d, w) = (
                store.clone(),
                out.clone(),
                manifest.config_digest.clone(),
                what.clone(),
            );
            blocking(move || st.put_blob(&b, &d, &w)).await?;
            out
        };
        let (st, n, w) = (store.clone(), manifest.layers.len(), what.clone());
        let diff_ids = blocking(move || st.config_diff_ids(&config_bytes, n, &w)).await?;
        let mut content: Vec<String> = manifest.layers.iter().map(|l| l.digest.clone()).collect();
        content.extend(diff_ids.iter().cloned());
        leases.push(lease(&store, content).await?);
        let platform_str = chosen_platform
            .map(|p| p.to_string())
            .unwrap_or_else(|| platform.to_string());
        Ok(Resolved {
            client,
            reference,
            auth,
            resolved_digest,
            manifest_digest,
            platform: platform_str,
            config_digest: manifest.config_digest.clone(),
            layers: manifest.layers,
            diff_ids,
            _leases: leases,
        })
    }

    /// Brings layer `i` into the store. `Ok(Some(bytes))` = downloaded, `Ok(None)` = already there.
    async fn layer(
        &self,
        image: &str,
        res: &Resolved,
        i: usize,
        flight: &Flight,
        cancel: &CancellationToken,
    ) -> Result<Option<u64>, FetchError> {
        let (Some(layer), Some(diff_id)) = (res.layers.get(i), res.diff_ids.get(i)) else {
            return Err(FetchError::Api(internal(
                "pull",
                "layer index out of range",
            )));
        };
        let what = format!("layer {} ({}) of {image}", i + 1, layer.digest);
        loop {
            if self.store.has_layer(diff_id) {
                flight.emit_layer(i, LayerStatus::Exists, 0);
                return Ok(None);
            }
            // One download per blob, whichever pulls need it.
            let (waiting, leader) = {
                let mut map = self.blob_flights.lock().unwrap_or_else(|e| e.into_inner());
                match map.get(&layer.digest) {
                    Some(rx) => (Some(rx.clone()), None),
                    None => {
                        let (tx, rx) = watch::channel(false);
                        map.insert(layer.digest.clone(), rx);
                        (None, Some(tx))
                    }
                }
            };
            if let Some(tx) = leader {
                let res = self
                    .fetch_layer(res, layer, diff_id, &what, i, flight, cancel)
                    .await;
                self.blob_flights
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&layer.digest);
                let _ = tx.send(true);
                return res;
            }
            if let Some(mut rx) = waiting {
                flight.emit_layer(i, LayerStatus::Waiting, 0);
                tokio::select! {
                    _ = rx.wait_for(|done| *done) => {}
                    () = cancel.cancelled() => return Err(FetchError::Cancelled),
                }
                // The other download finished (or failed): look again; on failure this pull tries itself.
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_layer(
        &self,
        res: &Resolved,
        layer: &LayerRef,
        diff_id: &str,
        what: &str,
        i: usize,
        flight: &Flight,
        cancel: &CancellationToken,
    ) -> Result<Option<u64>, FetchError> {
        if self.store.has_layer(diff_id) {
            flight.emit_layer(i, LayerStatus::Exists, 0);
            return Ok(None);
        }
        if self.store.has_blob(&layer.digest) {
            // Downloaded before, never unpacked (or its directory was removed): unpack from the store.
            let (st, l, d, w) = (
                self.store.clone(),
                layer.clone(),
                diff_id.to_owned(),
                what.to_owned(),
            );
            blocking(move || st.unpack_stored_layer(&l, &d, &w))
                .await
                .map_err(FetchError::Api)?;
            flight.emit_layer(i, LayerStatus::Exists, 0);
            return Ok(None);
        }
        let _permit = tokio::select! {
            p = self.downloads.clone().acquire_owned() => p.map_err(|e| FetchError::Api(internal("download slot", e)))?,
            () = cancel.cancelled() => return Err(FetchError::Cancelled),
        };
        flight.emit_layer(i, LayerStatus::Downloading, 0);
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(32);
        let (st, l, d, w) = (
            self.store.clone(),
            layer.clone(),
            diff_id.to_owned(),
            what.to_owned(),
        );
        let unpack = tokio::task::spawn_blocking(move || {
            st.pull_layer(
                ChannelReader {
                    rx,
                    current: Bytes::new(),
                },
                &l,
                &d,
                &w,
            )
        });
        let fetched = self
            .fetch_blob(res, layer, what, &tx, i, flight, cancel)
            .await;
        if let Err(FetchError::Cancelled) = &fetched {
            let _ = tx.send(Err(io::Error::other("pull cancelled"))).await;
        }
        drop(tx);
        let unpacked = unpack
            .await
            .map_err(|e| FetchError::Api(internal("layer unpack", e)))?;
        match (fetched, unpacked) {
            (Ok(n), Ok(())) => {
                flight.emit_layer(i, LayerStatus::Done, n);
                Ok(Some(n))
            }
            (Err(FetchError::ConsumerGone) | Ok(_), Err(e)) => {
                Err(FetchError::Api(with_image(image_error(e), what)))
            }
            (Err(FetchError::ConsumerGone), Ok(())) => Err(FetchError::Api(internal(
                what,
                "the unpacker stopped reading without an error",
            ))),
            (Err(e), _) => Err(e),
        }
    }

    /// Streams a blob into `tx`, resuming (`Range`) after a broken connection, up to the configured attempts.
    /// Answers the number of bytes sent.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_blob(
        &self,
        res: &Resolved,
        layer: &LayerRef,
        what: &str,
        tx: &mpsc::Sender<io::Result<Bytes>>,
        i: usize,
        flight: &Flight,
        cancel: &CancellationToken,
    ) -> Result<u64, FetchError> {
        let client = &res.client;
        // Makes sure the client holds a token for this repository (a cached one may be for another).
        let _ = &res.auth;
        let mut offset = 0u64;
        let mut attempt = 0u32;
        let mut last_progress = 0u64;
        let mut last_error = String::new();
        loop {
            attempt += 1;
            if attempt > self.attempts {
                return Err(FetchError::Api(api(
                    ErrorCode::RegistryError,
                    format!(
                        "{what}: download failed after {} attempts at byte {offset} of {}: {last_error}",
                        self.attempts, layer.size
                    ),
                )));
            }
            if attempt > 1 {
                let backoff = Duration::from_millis(200 << (attempt - 2).min(5));
                tracing::info!(%what, attempt, offset, error = %last_error, "resuming layer download");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = cancel.cancelled() => return Err(FetchError::Cancelled),
                }
            }
            let request = async {
                if offset == 0 {
                    client
                        .pull_blob_stream(&res.reference, layer.digest.as_str())
                        .await
                        .map(|s| (s, 0u64))
                } else {
                    client
                        .pull_blob_stream_partial(
                            &res.reference,
                            layer.digest.as_str(),
                            offset,
                            None,
                        )
                        .await
                        .map(|r| match r {
                            oci_client::client::BlobResponse::Full(s) => (s, offset),
                            oci_client::client::BlobResponse::Partial(s) => (s, 0),
                        })
                }
            };
            let (mut sized, mut skip) = tokio::select! {
                r = request => match r {
                    Ok(s) => s,
                    Err(e) => {
                        let err = registry_error(what, &e);
                        match err.code {
                            ErrorCode::RegistryUnreachable | ErrorCode::RegistryError => {
                                last_error = err
                                    .message
                                    .strip_prefix(&format!("{what}: "))
                                    .unwrap_or(&err.message)
                                    .to_owned();
                                continue;
                            }
                            _ => return Err(FetchError::Api(err)),
                        }
                    }
                },
                () = cancel.cancelled() => return Err(FetchError::Cancelled),
            };
            loop {
                let next = tokio::select! {
                    n = sized.stream.next() => n,
                    () = cancel.cancelled() => return Err(FetchError::Cancelled),
                };
                match next {
                    Some(Ok(mut chunk)) => {
                        if skip > 0 {
                            // The registry ignored the Range header and sent the blob from the start.
                            let drop_n =
                                usize::try_from(skip).unwrap_or(usize::MAX).min(chunk.len());
                            let _ = chunk.split_to(drop_n);
                            skip -= drop_n as u64;
                            if chunk.is_empty() {
                                continue;
                            }
                        }
                        offset += chunk.len() as u64;
                        if tx.send(Ok(chunk)).await.is_err() {
                            return Err(FetchError::ConsumerGone);
                        }
                        if offset - last_progress >= PROGRESS_STEP {
                            last_progress = offset;
                            flight.emit_layer(i, LayerStatus::Downloading, offset);
                        }
                    }
                    Some(Err(e)) => {
                        if is_digest_error(&e) {
                            // oci-client checks the digest at the end of a whole-blob stream; the store checks it
                            // too and reports the mismatch with the image's name.
                            return Ok(offset);
                        }
                        last_error = format!("{e}");
                        break;
                    }
                    None => {
                        if offset >= layer.size {
                            return Ok(offset);
                        }
                        last_error = format!(
                            "the connection ended after {offset} of {} bytes",
                            layer.size
                        );
                        break;
                    }
                }
            }
        }
    }
}

fn is_digest_error(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<oci_client::errors::DigestError>())
        .is_some()
}

/// A manifest document must be JSON of a sane size.
fn check_document(bytes: &[u8], what: &str) -> Result<(), ApiError> {
    if bytes.len() > DOCUMENT_LIMIT {
        return Err(api(
            ErrorCode::InvalidImage,
            format!(
                "{what}: {} bytes is larger than the {DOCUMENT_LIMIT} byte limit",
                bytes.len()
            ),
        ));
    }
    Ok(())
}

/// Prefixes an error message with the image it concerns, unless it already names it.
fn with_image(mut e: ApiError, image: &str) -> ApiError {
    if !e.message.contains(image) {
        e.message = format!("{image}: {}", e.message);
    }
    e
}

/// Leases `digests` (on a blocking thread: it may wait for the store's metadata lock).
async fn lease(store: &Arc<ImageStore>, digests: Vec<String>) -> Result<Lease, ApiError> {
    let st = store.clone();
    blocking(move || Ok(st.lease(digests))).await
}

/// Runs store work on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| internal("image store", e))?
        .map_err(image_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1",
            "127.0.0.1:5000",
            "127.1.2.3:80",
            "[::1]:5000",
            "::1",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in [
            "docker.io",
            "10.0.0.1:5000",
            "registry.example:5000",
            "[2001:db8::1]:5000",
        ] {
            assert!(!is_loopback(h), "{h}");
        }
    }

    #[test]
    fn mirrors_parse() {
        let m = Endpoint::mirror("http://127.0.0.1:5000").unwrap();
        assert!(m.http && m.mirror && m.host == "127.0.0.1:5000");
        assert!(!Endpoint::mirror("https://mirror.example/").unwrap().http);
        assert!(Endpoint::mirror("127.0.0.1:5000").unwrap().http);
        assert!(!Endpoint::mirror("mirror.example").unwrap().http);
        assert!(Endpoint::mirror("ftp://x").is_err());
        assert!(Endpoint::mirror("http://x/path").is_err());
        assert!(Endpoint::mirror("").is_err());
    }

    #[test]
    fn docker_config_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths": {
                "https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNz"},
                "registry.example:5000": {"username": "u", "password": "p"},
                "tok.example": {"registrytoken": "T"}
            }}"#,
        )
        .unwrap();
        let basic = |u: &str, p: &str| RegistryAuth::Basic(u.into(), p.into());
        let got =
            |host: &str, reg: &str| format!("{:?}", credentials(Some(&path), host, reg).unwrap());
        assert_eq!(
            got("docker.io", "docker.io"),
            format!("{:?}", basic("user", "pass"))
        );
        assert_eq!(
            got("registry.example:5000", "registry.example:5000"),
            format!("{:?}", basic("u", "p"))
        );
        assert_eq!(
            got("tok.example", "tok.example"),
            format!("{:?}", RegistryAuth::Bearer("T".into()))
        );
        // A mirror of docker.io does not get Docker Hub's credentials.
        assert_eq!(got("127.0.0.1:5000", "docker.io"), "Anonymous");
        assert_eq!(
            format!(
                "{:?}",
                credentials(Some(&dir.path().join("missing.json")), "x", "x").unwrap()
            ),
            "Anonymous"
        );
        std::fs::write(&path, "not json").unwrap();
        assert_eq!(
            credentials(Some(&path), "x", "x").unwrap_err().code,
            ErrorCode::RegistryUnauthorized
        );
    }

    #[test]
    fn endpoint_order() {
        let mut cfg = Config::default();
        cfg.registries.insert(
            "docker.io".into(),
            RegistryConfig {
                mirrors: vec![
                    "http://127.0.0.1:5000".into(),
                    "https://mirror.example".into(),
                ],
                insecure: false,
            },
        );
        cfg.registries.insert(
            "registry.example:5000".into(),
            RegistryConfig {
                mirrors: vec![],
                insecure: true,
            },
        );
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ImageStore::open(dir.path()).unwrap());
        let p = Puller::new(store, &cfg).unwrap();
        let eps = p.endpoints("docker.io");
        assert_eq!(eps.len(), 3);
        assert!(eps[0].http && eps[0].mirror);
        assert!(!eps[1].http && eps[1].mirror);
        assert!(!eps[2].http && !eps[2].mirror && eps[2].host == "docker.io");
        assert!(p.endpoints("registry.example:5000")[0].http);
        assert!(p.endpoints("localhost:5000")[0].http);
        assert!(!p.endpoints("ghcr.io")[0].http);
    }
}
