//! A scriptable fake OCI registry on loopback, for the error paths of `pull` that the real
//! `docker-registry` cannot produce: tampered and truncated blobs, forced statuses, manifests for another
//! platform only, malformed manifests, and basic / bearer / always-denied authentication.
//!
//! Plain HTTP/1.1 over [`std::net::TcpListener`], one thread per connection, keep-alive unless the
//! client sends `Connection: close` (or speaks HTTP/1.0). Query strings are ignored when routing (but
//! kept in the [`Request`] log). Routes, under the distribution spec:
//!
//! - `GET /v2/`: `200 {}` (or the auth challenge).
//! - `GET|HEAD /v2/<name>/manifests/<tag or digest>`: `Content-Type` = the stored media type,
//!   `Docker-Content-Digest` = the real sha256 of the bytes.
//! - `GET|HEAD /v2/<name>/blobs/<digest>`: `application/octet-stream`, `Docker-Content-Digest` = the
//!   digest asked for; `Range: bytes=N-` (or `N-M`) answers `206` with `Content-Range`. A blob can be
//!   made to break: truncated on every GET ([`FakeRegistry::truncate_blob`]) or only on the first few
//!   ([`FakeRegistry::truncate_blob_first`], to test resuming), or stalled after the response head
//!   ([`FakeRegistry::stall_blob`]). [`FakeRegistry::bytes_sent`] counts the body bytes written per path.
//! - `GET /token`: the bearer token endpoint named in the challenge (see
//!   [`FakeRegistry::require_bearer`]).
//!
//! Unknown repositories, manifests and blobs answer `404` with a distribution-spec error body
//! (`NAME_UNKNOWN`, `MANIFEST_UNKNOWN`, `BLOB_UNKNOWN`). Other methods answer `405 UNSUPPORTED`.
//!
//! Dropping the [`FakeRegistry`] closes the listener and every open connection, and joins all threads.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use base64::Engine as _;

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzip-compressed layer media type.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The `service` named in bearer challenges.
pub const SERVICE: &str = "fake";

/// Longest request head (request line + headers) accepted.
const MAX_HEAD: usize = 64 * 1024;

pub use crate::oci::sha256_digest;

/// One request the registry received, for assertions (see [`FakeRegistry::requests`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The path, without the query string.
    pub path: String,
    /// The query string (after `?`), if any.
    pub query: Option<String>,
    /// Headers in the order received, names as sent.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Which authentication the `/v2` routes demand.
#[derive(Debug, Clone, Default)]
enum Auth {
    #[default]
    Anonymous,
    /// `Authorization: Basic base64(user:pass)`.
    Basic { expected: String },
    /// `Authorization: Bearer <token>`, the token granted by `/token` to these Basic credentials
    /// (`None`: to anyone).
    Bearer { basic: Option<String> },
    /// Bearer challenge, but `/token` never grants anything.
    DenyAll,
}

#[derive(Debug, Clone)]
struct Manifest {
    media_type: String,
    bytes: Vec<u8>,
}

#[derive(Debug, Default)]
struct State {
    /// `(repo, digest)` → bytes (possibly not matching the digest).
    blobs: HashMap<(String, String), Vec<u8>>,
    /// `(repo, tag or digest)` → manifest.
    manifests: HashMap<(String, String), Manifest>,
    /// `(repo, digest)` → how many bytes of the blob to send before closing.
    truncations: HashMap<(String, String), usize>,
    /// `(repo, digest)` → `(bytes to send before closing, how many of the first GETs to break so)`.
    truncate_first: HashMap<(String, String), (usize, usize)>,
    /// `(repo, digest)` of blobs whose GETs send the response head and then nothing.
    stalled: HashSet<(String, String)>,
    /// Path (query string ignored) → response body bytes written for it.
    sent: HashMap<String, u64>,
    auth: Auth,
    /// `(path prefix, status)`, checked in order.
    forced: Vec<(String, u16)>,
    log: Vec<Request>,
}

impl State {
    fn knows_repo(&self, repo: &str) -> bool {
        self.blobs.keys().any(|(r, _)| r == repo) || self.manifests.keys().any(|(r, _)| r == repo)
    }
}

/// The token `/token` grants (one per registry instance is enough: nothing checks scopes).
const TOKEN: &str = "fake-registry-token";

/// A fake OCI registry listening on `127.0.0.1:<ephemeral port>` until dropped.
#[derive(Debug)]
pub struct FakeRegistry {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panicking connection thread must not take the whole registry (and the test's assertions) down.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeRegistry {
    /// Binds `127.0.0.1:0` and starts serving: anonymous access, nothing stored.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fake registry");
        let addr = listener.local_addr().expect("fake registry address");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let state = Arc::clone(&state);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("fake-registry".into())
                .spawn(move || accept_loop(listener, addr, state, stop))
                .expect("spawning the fake registry thread")
        };
        Self {
            addr,
            state,
            stop,
            acceptor: Some(acceptor),
        }
    }

    /// `127.0.0.1:PORT`: the registry host of image references.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// `127.0.0.1:PORT/<repo>:<tag>`.
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.addr)
    }

    /// Stores a blob under its real sha256 digest and returns that digest; served at
    /// `/v2/<repo>/blobs/<digest>`.
    pub fn put_blob(&self, repo: &str, bytes: Vec<u8>) -> String {
        let digest = sha256_digest(&bytes);
        self.put_blob_as(repo, &digest, bytes);
        digest
    }

    /// Serves `bytes` under `digest` whether they match or not (a tampered blob). Replaces any blob
    /// stored under that digest.
    pub fn put_blob_as(&self, repo: &str, digest: &str, bytes: Vec<u8>) {
        lock(&self.state)
            .blobs
            .insert((repo.to_owned(), digest.to_owned()), bytes);
    }

    /// Stores a manifest (or index) under `reference` (a tag or a digest) and also under its real
    /// digest, which it returns. Served with `Content-Type: <media_type>` and that digest as
    /// `Docker-Content-Digest`.
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: Vec<u8>,
    ) -> String {
        let digest = sha256_digest(&bytes);
        let manifest = Manifest {
            media_type: media_type.to_owned(),
            bytes,
        };
        let mut state = lock(&self.state);
        state
            .manifests
            .insert((repo.to_owned(), digest.clone()), manifest.clone());
        state
            .manifests
            .insert((repo.to_owned(), reference.to_owned()), manifest);
        digest
    }

    /// From now on the blob `digest` of `repo` is answered (also to `Range` requests, which are then
    /// ignored) with `200`, the `Content-Length` of the full blob, only its first `served_len` bytes, and
    /// the connection closed. `HEAD` still answers normally.
    pub fn truncate_blob(&self, repo: &str, digest: &str, served_len: usize) {
        lock(&self.state)
            .truncations
            .insert((repo.to_owned(), digest.to_owned()), served_len);
    }

    /// Like [`FakeRegistry::truncate_blob`], but only for the first `times` GETs of the blob (counted
    /// from now on and before, whatever their `Range`): they answer `200`, the full `Content-Length`, only
    /// the first `served_len` bytes, and close. Later GETs are served correctly, `Range` honoured (`206`).
    pub fn truncate_blob_first(&self, repo: &str, digest: &str, served_len: usize, times: usize) {
        lock(&self.state)
            .truncate_first
            .insert((repo.to_owned(), digest.to_owned()), (served_len, times));
    }

    /// From now on a GET of the blob `digest` of `repo` answers the response head (`200`, the full
    /// `Content-Length`) and then nothing: the connection stays open, silent, until the client closes it
    /// or the registry is dropped. `HEAD` still answers normally.
    pub fn stall_blob(&self, repo: &str, digest: &str) {
        lock(&self.state)
            .stalled
            .insert((repo.to_owned(), digest.to_owned()));
    }

    /// Response body bytes written (to the socket) for requests of exactly `path` (query string
    /// ignored), over all requests so far: a truncated answer counts what was sent, a `206` its range.
    pub fn bytes_sent(&self, path: &str) -> u64 {
        lock(&self.state).sent.get(path).copied().unwrap_or(0)
    }

    /// Every `/v2` request needs `Authorization: Basic base64(user:pass)`, else `401` with
    /// `WWW-Authenticate: Basic realm="fake"`. Replaces any earlier auth setting.
    pub fn require_basic(&self, user: &str, pass: &str) {
        lock(&self.state).auth = Auth::Basic {
            expected: basic_value(user, pass),
        };
    }

    /// Every `/v2` request needs `Authorization: Bearer <token>`, else `401` with
    /// `WWW-Authenticate: Bearer realm="http://<addr>/token",service="fake"` (plus
    /// `scope="repository:<name>:pull"` on repository paths). `GET /token` grants
    /// `{"token": ..., "access_token": ...}` to requests carrying these Basic credentials, or to anyone
    /// when `credentials` is `None`; else `401`. Replaces any earlier auth setting.
    pub fn require_bearer(&self, credentials: Option<(&str, &str)>) {
        lock(&self.state).auth = Auth::Bearer {
            basic: credentials.map(|(u, p)| basic_value(u, p)),
        };
    }

    /// Every `/v2` request answers `401` with a bearer challenge whose `/token` endpoint answers `401`
    /// to everyone. Replaces any earlier auth setting.
    pub fn deny_all(&self) {
        lock(&self.state).auth = Auth::DenyAll;
    }

    /// Back to anonymous access.
    pub fn allow_anonymous(&self) {
        lock(&self.state).auth = Auth::Anonymous;
    }

    /// Requests whose path (query string ignored) starts with `path_prefix` answer `status` with a
    /// distribution-spec error body (`UNKNOWN`), before any auth check or routing. The first matching
    /// prefix, in the order set, wins; setting a prefix again changes its status.
    pub fn status_for(&self, path_prefix: &str, status: u16) {
        let mut state = lock(&self.state);
        match state.forced.iter_mut().find(|(p, _)| p == path_prefix) {
            Some(entry) => entry.1 = status,
            None => state.forced.push((path_prefix.to_owned(), status)),
        }
    }

    /// Every request received so far (also `/token` and rejected ones), oldest first.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.state).log.clone()
    }

    /// How many `method` requests for exactly `path` (query string ignored) were received.
    pub fn count(&self, method: &str, path: &str) -> usize {
        lock(&self.state)
            .log
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .count()
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept(); it sees the flag and stops. If the connect fails the listener is
        // already gone.
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn basic_value(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
) {
    let mut connections: Vec<(TcpStream, JoinHandle<()>)> = Vec::new();
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        connections.retain(|(_, h)| !h.is_finished());
        let Ok(handle_stream) = stream.try_clone() else {
            continue;
        };
        let state = Arc::clone(&state);
        let spawned = std::thread::Builder::new()
            .name("fake-registry-conn".into())
            .spawn(move || serve_connection(handle_stream, addr, &state));
        if let Ok(handle) = spawned {
            connections.push((stream, handle));
        }
    }
    drop(listener);
    for (stream, handle) in connections {
        // Unblocks a connection thread waiting for the next keep-alive request (or writing).
        let _ = stream.shutdown(Shutdown::Both);
        let _ = handle.join();
    }
}

/// A parsed request head.
struct Head {
    request: Request,
    keep_alive: bool,
    content_length: usize,
}

/// Reads one request head; `Ok(None)` on a clean end of the connection.
fn read_head(reader: &mut BufReader<TcpStream>) -> io::Result<Option<Head>> {
    let mut line = String::new();
    // Tolerate stray empty lines between requests (RFC 9112 §2.2).
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    let (method, target, version) = (method.to_owned(), target.to_owned(), version.to_owned());
    let mut headers = Vec::new();
    let mut total = line.len();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(bad("connection closed inside the request head"));
        }
        total += line.len();
        if total > MAX_HEAD {
            return Err(bad("request head too long"));
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        if let Some((name, value)) = l.split_once(':') {
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target, None),
    };
    let request = Request {
        method,
        path,
        query,
        headers,
    };
    let connection = request
        .header("connection")
        .unwrap_or("")
        .to_ascii_lowercase();
    let keep_alive = if version == "HTTP/1.0" {
        connection.contains("keep-alive")
    } else {
        !connection.contains("close")
    };
    let content_length = request
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(Some(Head {
        request,
        keep_alive,
        content_length,
    }))
}

fn serve_connection(stream: TcpStream, addr: SocketAddr, state: &Mutex<State>) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    while let Ok(Some(head)) = read_head(&mut reader) {
        // GET/HEAD carry no body, but skip whatever a client sends so the next request parses.
        if head.content_length > 0 {
            let mut sink = io::sink();
            let copied = io::copy(
                &mut (&mut reader).take(head.content_length as u64),
                &mut sink,
            );
            if copied.ok() != Some(head.content_length as u64) {
                break;
            }
        }
        let response = {
            let mut st = lock(state);
            st.log.push(head.request.clone());
            route(&st, addr, &head.request)
        };
        if response.stall {
            // The head only (it advertises the full length), then silence until the client closes or the
            // registry is dropped (which shuts the socket down and so ends this read).
            if write_response(&mut writer, &response, true, false).is_ok() {
                let _ = io::copy(&mut reader, &mut io::sink());
            }
            break;
        }
        let keep_alive = head.keep_alive && response.truncate_at.is_none();
        let head_only = head.request.method == "HEAD";
        let body_len = if head_only {
            0
        } else {
            response
                .truncate_at
                .map_or(response.body.len(), |n| n.min(response.body.len()))
        };
        // Counted before the write: a client that has read the whole answer must find it counted (after
        // the write, its assertion could run before this thread got back to the counter). A failed write
        // takes it back.
        let count = |add: bool| {
            let mut st = lock(state);
            let n = st.sent.entry(head.request.path.clone()).or_default();
            if add {
                *n += body_len as u64;
            } else {
                *n -= body_len as u64;
            }
        };
        count(true);
        let written = write_response(&mut writer, &response, head_only, keep_alive);
        if written.is_err() {
            count(false);
        }
        if written.is_err() || !keep_alive {
            break;
        }
    }
    // FIN (not RST: shutting down only the write side leaves unread client data alone).
    let _ = writer.flush();
    let _ = writer.shutdown(Shutdown::Write);
}

/// What to answer.
struct Response {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// Advertise `body.len()` but send only this many bytes, then close.
    truncate_at: Option<usize>,
    /// Send the head (advertising `body.len()`), then nothing until the connection ends.
    stall: bool,
}

impl Response {
    fn new(status: u16, content_type: &str, body: Vec<u8>) -> Self {
        Self {
            status,
            headers: vec![("Content-Type", content_type.to_owned())],
            body,
            truncate_at: None,
            stall: false,
        }
    }

    fn json(status: u16, value: &serde_json::Value) -> Self {
        Self::new(status, "application/json", value.to_string().into_bytes())
    }

    fn error(status: u16, code: &str, message: &str) -> Self {
        Self::json(
            status,
            &serde_json::json!({"errors": [{"code": code, "message": message, "detail": null}]}),
        )
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn write_response(
    w: &mut TcpStream,
    response: &Response,
    head_only: bool,
    keep_alive: bool,
) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nDocker-Distribution-API-Version: registry/2.0\r\nContent-Length: {}\r\n",
        response.status,
        reason(response.status),
        response.body.len()
    );
    for (name, value) in &response.headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    head.push_str(if keep_alive {
        "Connection: keep-alive\r\n\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    let mut out = head.into_bytes();
    if !head_only {
        let end = response
            .truncate_at
            .map_or(response.body.len(), |n| n.min(response.body.len()));
        out.extend_from_slice(&response.body[..end]);
    }
    w.write_all(&out)?;
    w.flush()
}

/// `/v2/<name>/<kind>/<reference>` → `(name, kind, reference)`.
fn split_repo_path(path: &str) -> Option<(&str, &str, &str)> {
    let rest = path.strip_prefix("/v2/")?;
    let (before, reference) = rest.rsplit_once('/')?;
    let (name, kind) = before.rsplit_once('/')?;
    (!name.is_empty() && !reference.is_empty()).then_some((name, kind, reference))
}

fn challenge(addr: SocketAddr, path: &str) -> String {
    let mut c = format!("Bearer realm=\"http://{addr}/token\",service=\"{SERVICE}\"");
    if let Some((name, "manifests" | "blobs", _)) = split_repo_path(path) {
        let _ = write!(c, ",scope=\"repository:{name}:pull\"");
    }
    c
}

fn unauthorized(challenge: String) -> Response {
    Response::error(401, "UNAUTHORIZED", "authentication required")
        .header("WWW-Authenticate", challenge)
}

fn route(st: &State, addr: SocketAddr, req: &Request) -> Response {
    let path = req.path.as_str();
    if let Some((_, status)) = st.forced.iter().find(|(p, _)| path.starts_with(p.as_str())) {
        return Response::error(*status, "UNKNOWN", "status forced by the fake registry");
    }
    if req.method != "GET" && req.method != "HEAD" {
        return Response::error(405, "UNSUPPORTED", "the fake registry is read-only")
            .header("Allow", "GET, HEAD");
    }
    let authorization = req.header("authorization");
    if path == "/token" {
        let granted = match &st.auth {
            Auth::Bearer { basic: None } => true,
            Auth::Bearer {
                basic: Some(expected),
            } => authorization == Some(expected.as_str()),
            Auth::DenyAll => false,
            Auth::Anonymous | Auth::Basic { .. } => {
                return Response::error(404, "UNSUPPORTED", "no token endpoint");
            }
        };
        return if granted {
            Response::json(
                200,
                &serde_json::json!({"token": TOKEN, "access_token": TOKEN, "expires_in": 300}),
            )
        } else {
            Response::error(401, "UNAUTHORIZED", "invalid credentials")
                .header("WWW-Authenticate", "Basic realm=\"fake\"")
        };
    }
    if path != "/v2" && !path.starts_with("/v2/") {
        return Response::error(404, "NOT_FOUND", "not a registry path");
    }
    match &st.auth {
        Auth::Anonymous => {}
        Auth::Basic { expected } => {
            if authorization != Some(expected.as_str()) {
                return unauthorized("Basic realm=\"fake\"".to_owned());
            }
        }
        Auth::Bearer { .. } => {
            if authorization != Some(format!("Bearer {TOKEN}").as_str()) {
                return unauthorized(challenge(addr, path));
            }
        }
        Auth::DenyAll => return unauthorized(challenge(addr, path)),
    }
    if path == "/v2" || path == "/v2/" {
        return Response::json(200, &serde_json::json!({}));
    }
    match split_repo_path(path) {
        Some((name, "manifests", reference)) => manifest(st, name, reference),
        Some((name, "blobs", digest)) => blob(st, req, name, digest),
        _ => Response::error(404, "NOT_FOUND", "unknown registry path"),
    }
}

fn manifest(st: &State, name: &str, reference: &str) -> Response {
    match st.manifests.get(&(name.to_owned(), reference.to_owned())) {
        Some(m) => Response::new(200, &m.media_type, m.bytes.clone())
            .header("Docker-Content-Digest", sha256_digest(&m.bytes)),
        None if st.knows_repo(name) => Response::error(
            404,
            "MANIFEST_UNKNOWN",
            &format!("manifest unknown: {name}:{reference}"),
        ),
        None => Response::error(
            404,
            "NAME_UNKNOWN",
            &format!("repository name not known to registry: {name}"),
        ),
    }
}

/// `bytes=N-` or `bytes=N-M` → `(start, inclusive end)` for a blob of `len` bytes; `None` if
/// unsatisfiable or not understood.
fn parse_range(value: &str, len: usize) -> Option<(usize, usize)> {
    let (start, end) = value.trim().strip_prefix("bytes=")?.split_once('-')?;
    let start: usize = start.trim().parse().ok()?;
    let end = match end.trim() {
        "" => len.checked_sub(1)?,
        e => e.parse::<usize>().ok()?.min(len.checked_sub(1)?),
    };
    (start <= end).then_some((start, end))
}

fn blob(st: &State, req: &Request, name: &str, digest: &str) -> Response {
    let key = (name.to_owned(), digest.to_owned());
    let Some(bytes) = st.blobs.get(&key) else {
        return if st.knows_repo(name) {
            Response::error(404, "BLOB_UNKNOWN", &format!("blob unknown: {digest}"))
        } else {
            Response::error(
                404,
                "NAME_UNKNOWN",
                &format!("repository name not known to registry: {name}"),
            )
        };
    };
    let full = |status| {
        Response::new(status, "application/octet-stream", bytes.clone())
            .header("Docker-Content-Digest", digest)
            .header("Accept-Ranges", "bytes")
    };
    if req.method == "GET" {
        if let Some(&served) = st.truncations.get(&key) {
            let mut r = full(200);
            r.truncate_at = Some(served);
            return r;
        }
        if let Some(&(served, times)) = st.truncate_first.get(&key) {
            // The log already holds this request.
            let gets = st
                .log
                .iter()
                .filter(|r| r.method == "GET" && r.path == req.path)
                .count();
            if gets <= times {
                let mut r = full(200);
                r.truncate_at = Some(served);
                return r;
            }
        }
        if st.stalled.contains(&key) {
            let mut r = full(200);
            r.stall = true;
            return r;
        }
    }
    let Some(range) = req.header("range") else {
        return full(200);
    };
    match parse_range(range, bytes.len()) {
        Some((start, end)) => {
            Response::new(206, "application/octet-stream", bytes[start..=end].to_vec())
                .header("Docker-Content-Digest", digest)
                .header("Accept-Ranges", "bytes")
                .header(
                    "Content-Range",
                    format!("bytes {start}-{end}/{}", bytes.len()),
                )
        }
        None => Response::error(416, "BLOB_UNKNOWN", "range not satisfiable")
            .header("Content-Range", format!("bytes */{}", bytes.len())),
    }
}

// ---------------------------------------------------------------------------------------------------
// Image builders
// ---------------------------------------------------------------------------------------------------

/// The Go (`GOARCH`) name of this host's architecture, as in image configs and platforms.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// An architecture that is not this host's (`s390x`, or `riscv64` on an s390x host).
pub fn foreign_arch() -> &'static str {
    if host_arch() == "s390x" {
        "riscv64"
    } else {
        "s390x"
    }
}

/// The path and contents of the one file in [`simple_image`]'s layer.
pub const SIMPLE_FILE: (&str, &[u8]) = ("hello.txt", b"hello from the fake registry\n");

/// What [`simple_image`] (and friends) published.
#[derive(Debug, Clone)]
pub struct ImageParts {
    /// `127.0.0.1:PORT/<repo>:<tag>`.
    pub reference: String,
    /// Digest of the manifest (also servable by this digest).
    pub manifest_digest: String,
    /// The manifest bytes.
    pub manifest: Vec<u8>,
    /// Digest of the config blob.
    pub config_digest: String,
    /// The config bytes.
    pub config: Vec<u8>,
    /// Digest of the (gzip) layer blob.
    pub layer_digest: String,
    /// The gzip layer bytes.
    pub layer: Vec<u8>,
    /// sha256 of the uncompressed layer tar (the config's `rootfs.diff_ids[0]`).
    pub diff_id: String,
}

/// A ustar archive holding regular files (mode 0644, root-owned, mtime 0).
fn tar_archive(files: &[(&str, &[u8])]) -> Vec<u8> {
    fn octal(field: &mut [u8], value: u64) {
        // NUL-terminated, zero-padded octal.
        let digits = field.len() - 1;
        let s = format!("{value:0digits$o}");
        field[..digits].copy_from_slice(s.as_bytes());
        field[digits] = 0;
    }
    let mut out = Vec::new();
    for (name, data) in files {
        assert!(name.len() < 100, "tar name too long: {name}");
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut h[100..108], 0o644);
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], data.len() as u64);
        octal(&mut h[136..148], 0);
        h[148..156].fill(b' ');
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[265..269].copy_from_slice(b"root");
        h[297..301].copy_from_slice(b"root");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A gzip member holding `data` in stored (uncompressed) deflate blocks: valid gzip, no compressor
/// needed.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let mut chunks = data.chunks(0xffff).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        out.push(u8::from(chunks.peek().is_none()));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// `{"mediaType", "digest", "size"}`.
fn descriptor(media_type: &str, bytes: &[u8]) -> serde_json::Value {
    serde_json::json!({
        "mediaType": media_type,
        "digest": sha256_digest(bytes),
        "size": bytes.len(),
    })
}

/// Publishes a one-layer image for `linux/<arch>` under `repo:tag`: layer = gzip tar of `files`.
pub fn image_for(
    reg: &FakeRegistry,
    repo: &str,
    tag: &str,
    arch: &str,
    files: &[(&str, &[u8])],
) -> ImageParts {
    let tar = tar_archive(files);
    let diff_id = sha256_digest(&tar);
    let layer = gzip_stored(&tar);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "sandbox-tests fake_registry"}],
    }))
    .expect("serialising a config");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &config),
        "layers": [descriptor(OCI_LAYER_GZIP, &layer)],
    }))
    .expect("serialising a manifest");
    let config_digest = reg.put_blob(repo, config.clone());
    let layer_digest = reg.put_blob(repo, layer.clone());
    let manifest_digest = reg.put_manifest(repo, tag, OCI_MANIFEST, manifest.clone());
    ImageParts {
        reference: reg.reference(repo, tag),
        manifest_digest,
        manifest,
        config_digest,
        config,
        layer_digest,
        layer,
        diff_id,
    }
}

/// Publishes a minimal valid image for this host (`linux/<host_arch()>`) under `repo:tag`: an OCI
/// manifest, an OCI config, and one gzip layer holding [`SIMPLE_FILE`].
pub fn simple_image(reg: &FakeRegistry, repo: &str, tag: &str) -> ImageParts {
    image_for(reg, repo, tag, host_arch(), &[SIMPLE_FILE])
}

/// What [`foreign_platform_index`] published.
#[derive(Debug, Clone)]
pub struct ForeignIndex {
    /// `127.0.0.1:PORT/<repo>:<tag>`.
    pub reference: String,
    /// Digest of the index.
    pub index_digest: String,
    /// The platform the index offers: `linux/<foreign_arch()>`.
    pub platform: String,
    /// The (complete, pullable) image the index points to, by digest only.
    pub image: ImageParts,
}

/// Publishes under `repo:tag` an OCI index whose only entry is a complete image for
/// `linux/<foreign_arch()>`: nothing for this host. The foreign manifest is reachable by digest.
pub fn foreign_platform_index(reg: &FakeRegistry, repo: &str, tag: &str) -> ForeignIndex {
    let arch = foreign_arch();
    let image_tag = format!("{tag}-{arch}");
    let image = image_for(reg, repo, &image_tag, arch, &[SIMPLE_FILE]);
    let mut entry = descriptor(OCI_MANIFEST, &image.manifest);
    entry["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [entry],
    }))
    .expect("serialising an index");
    let index_digest = reg.put_manifest(repo, tag, OCI_INDEX, index);
    ForeignIndex {
        reference: reg.reference(repo, tag),
        index_digest,
        platform: format!("linux/{arch}"),
        image,
    }
}

/// Publishes under `repo:tag`, as an OCI manifest, bytes that are not JSON. Returns their digest.
pub fn invalid_json_manifest(reg: &FakeRegistry, repo: &str, tag: &str) -> String {
    reg.put_manifest(
        repo,
        tag,
        OCI_MANIFEST,
        br#"{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": ["#
            .to_vec(),
    )
}

/// Publishes under `repo:tag` a JSON OCI manifest (with a valid, stored config) whose one layer
/// descriptor has no `digest`. Returns the manifest digest.
pub fn manifest_missing_layer_digest(reg: &FakeRegistry, repo: &str, tag: &str) -> String {
    let parts = simple_image(reg, repo, &format!("{tag}-valid"));
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&parts.manifest).expect("our own manifest parses");
    manifest["layers"][0]
        .as_object_mut()
        .expect("a layer descriptor")
        .remove("digest");
    reg.put_manifest(
        repo,
        tag,
        OCI_MANIFEST,
        serde_json::to_vec(&manifest).expect("serialising a manifest"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// A parsed response.
    #[derive(Debug)]
    struct Resp {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Resp {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).expect("a JSON body")
        }

        fn error_code(&self) -> String {
            self.json()["errors"][0]["code"]
                .as_str()
                .expect("an error code")
                .to_owned()
        }
    }

    /// A keep-alive HTTP/1.1 client connection.
    struct Client {
        reader: BufReader<TcpStream>,
        writer: TcpStream,
    }

    impl Client {
        fn connect(reg: &FakeRegistry) -> Self {
            let writer = TcpStream::connect(reg.addr()).expect("connecting");
            let reader = BufReader::new(writer.try_clone().expect("cloning"));
            Self { reader, writer }
        }

        fn send(&mut self, method: &str, target: &str, headers: &[(&str, &str)]) {
            let mut req = format!("{method} {target} HTTP/1.1\r\nHost: fake\r\n");
            for (n, v) in headers {
                req.push_str(&format!("{n}: {v}\r\n"));
            }
            req.push_str("\r\n");
            self.writer.write_all(req.as_bytes()).expect("sending");
        }

        /// Status line and headers.
        fn read_head(&mut self) -> (u16, Vec<(String, String)>) {
            let mut line = String::new();
            self.reader.read_line(&mut line).expect("status line");
            let status = line
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad status line {line:?}"));
            let mut headers = Vec::new();
            loop {
                line.clear();
                self.reader.read_line(&mut line).expect("header");
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                let (n, v) = l.split_once(':').expect("header colon");
                headers.push((n.trim().to_owned(), v.trim().to_owned()));
            }
            (status, headers)
        }

        fn request(&mut self, method: &str, target: &str, headers: &[(&str, &str)]) -> Resp {
            self.send(method, target, headers);
            self.read_response(method)
        }

        /// The response to a `method` request.
        fn read_response(&mut self, method: &str) -> Resp {
            let (status, headers) = self.read_head();
            let mut resp = Resp {
                status,
                headers,
                body: Vec::new(),
            };
            if method != "HEAD" {
                let len: usize = resp
                    .header("content-length")
                    .expect("content-length")
                    .parse()
                    .expect("numeric content-length");
                resp.body = vec![0; len];
                self.reader.read_exact(&mut resp.body).expect("body");
            }
            resp
        }

        /// True if the server closed the connection (EOF with nothing more).
        fn at_eof(&mut self) -> bool {
            let mut rest = Vec::new();
            self.reader.read_to_end(&mut rest).expect("reading to EOF");
            rest.is_empty()
        }
    }

    fn get(reg: &FakeRegistry, target: &str, headers: &[(&str, &str)]) -> Resp {
        Client::connect(reg).request("GET", target, headers)
    }

    fn basic(user: &str, pass: &str) -> String {
        basic_value(user, pass)
    }

    #[test]
    fn v2_root_answers_200() {
        let reg = FakeRegistry::start();
        let r = get(&reg, "/v2/", &[]);
        assert_eq!(r.status, 200);
        assert_eq!(r.json(), serde_json::json!({}));
        assert_eq!(
            r.header("docker-distribution-api-version"),
            Some("registry/2.0")
        );
    }

    #[test]
    fn blob_served_with_correct_digest() {
        let reg = FakeRegistry::start();
        let bytes = b"some blob bytes".to_vec();
        let digest = reg.put_blob("library/thing", bytes.clone());
        assert_eq!(digest, sha256_digest(&bytes));
        let r = get(&reg, &format!("/v2/library/thing/blobs/{digest}"), &[]);
        assert_eq!(r.status, 200);
        assert_eq!(r.body, bytes);
        assert_eq!(sha256_digest(&r.body), digest);
        assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
        assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    }

    #[test]
    fn tampered_blob_serves_wrong_bytes() {
        let reg = FakeRegistry::start();
        let digest = reg.put_blob("repo", b"the real thing".to_vec());
        reg.put_blob_as("repo", &digest, b"something else".to_vec());
        let r = get(&reg, &format!("/v2/repo/blobs/{digest}"), &[]);
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"something else");
        assert_ne!(sha256_digest(&r.body), digest);
        assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    }

    #[test]
    fn truncated_blob_closes_early_also_on_range() {
        let reg = FakeRegistry::start();
        let bytes: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let digest = reg.put_blob("repo", bytes.clone());
        reg.truncate_blob("repo", &digest, 1234);
        for range in [None, Some("bytes=100-")] {
            let mut c = Client::connect(&reg);
            let headers: Vec<(&str, &str)> = range.iter().map(|r| ("Range", *r)).collect();
            c.send("GET", &format!("/v2/repo/blobs/{digest}"), &headers);
            let (status, headers) = c.read_head();
            assert_eq!(status, 200);
            let len = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.clone());
            assert_eq!(len.as_deref(), Some("10000"));
            let mut body = Vec::new();
            c.reader
                .read_to_end(&mut body)
                .expect("reading until close");
            assert_eq!(body, &bytes[..1234], "range {range:?}");
        }
        // HEAD still answers normally, and the connection stays usable.
        let mut c = Client::connect(&reg);
        let r = c.request("HEAD", &format!("/v2/repo/blobs/{digest}"), &[]);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-length"), Some("10000"));
        assert_eq!(c.request("GET", "/v2/", &[]).status, 200);
    }

    #[test]
    fn truncated_first_gets_then_served_with_range() {
        let reg = FakeRegistry::start();
        let bytes: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let digest = reg.put_blob("repo", bytes.clone());
        let path = format!("/v2/repo/blobs/{digest}");
        reg.truncate_blob_first("repo", &digest, 1234, 2);
        for range in [None, Some("bytes=1234-")] {
            let mut c = Client::connect(&reg);
            let headers: Vec<(&str, &str)> = range.iter().map(|r| ("Range", *r)).collect();
            c.send("GET", &path, &headers);
            let (status, _) = c.read_head();
            assert_eq!(status, 200);
            let mut body = Vec::new();
            c.reader
                .read_to_end(&mut body)
                .expect("reading until close");
            assert_eq!(body, &bytes[..1234], "range {range:?}");
        }
        assert_eq!(reg.bytes_sent(&path), 2 * 1234);
        // The third GET is served, its Range honoured.
        let mut c = Client::connect(&reg);
        let r = c.request("GET", &path, &[("Range", "bytes=1234-")]);
        assert_eq!(r.status, 206);
        assert_eq!(r.body, &bytes[1234..]);
        assert_eq!(reg.bytes_sent(&path), 2 * 1234 + (10_000 - 1234));
        let r = c.request("GET", &path, &[]);
        assert_eq!((r.status, r.body.len()), (200, 10_000));
        // HEAD sends no body bytes.
        assert_eq!(c.request("HEAD", &path, &[]).status, 200);
        assert_eq!(reg.bytes_sent(&path), 2 * 1234 + (10_000 - 1234) + 10_000);
    }

    #[test]
    fn stalled_blob_sends_the_head_then_nothing() {
        let reg = FakeRegistry::start();
        let digest = reg.put_blob("repo", vec![7; 5000]);
        let path = format!("/v2/repo/blobs/{digest}");
        reg.stall_blob("repo", &digest);
        let mut head = Client::connect(&reg);
        assert_eq!(head.request("HEAD", &path, &[]).status, 200);
        let mut c = Client::connect(&reg);
        c.send("GET", &path, &[]);
        let (status, headers) = c.read_head();
        assert_eq!(status, 200);
        let len = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.clone());
        assert_eq!(len.as_deref(), Some("5000"));
        // Dropping the registry ends the silent connection: EOF without a body byte.
        drop(reg);
        assert!(c.at_eof());
    }

    #[test]
    fn basic_auth_401_then_200() {
        let reg = FakeRegistry::start();
        let digest = reg.put_blob("private/img", b"secret".to_vec());
        reg.require_basic("alice", "s3cret");
        let r = get(&reg, "/v2/", &[]);
        assert_eq!(r.status, 401);
        assert_eq!(r.header("www-authenticate"), Some("Basic realm=\"fake\""));
        assert_eq!(r.error_code(), "UNAUTHORIZED");
        let wrong = basic("alice", "nope");
        let r = get(&reg, "/v2/", &[("Authorization", &wrong)]);
        assert_eq!(r.status, 401);
        let right = basic("alice", "s3cret");
        assert_eq!(get(&reg, "/v2/", &[("Authorization", &right)]).status, 200);
        let blob = format!("/v2/private/img/blobs/{digest}");
        assert_eq!(get(&reg, &blob, &[]).status, 401);
        let r = get(&reg, &blob, &[("Authorization", &right)]);
        assert_eq!((r.status, r.body.as_slice()), (200, &b"secret"[..]));
    }

    /// `Bearer realm="...",service="...",scope="..."` → `(realm, service, scope)`.
    fn parse_challenge(c: &str) -> (String, String, Option<String>) {
        let params = c.strip_prefix("Bearer ").expect("a bearer challenge");
        let mut realm = None;
        let mut service = None;
        let mut scope = None;
        for p in params.split(',') {
            let (k, v) = p.split_once('=').expect("k=v");
            let v = v.trim_matches('"').to_owned();
            match k {
                "realm" => realm = Some(v),
                "service" => service = Some(v),
                "scope" => scope = Some(v),
                other => panic!("unexpected challenge parameter {other}"),
            }
        }
        (realm.expect("realm"), service.expect("service"), scope)
    }

    #[test]
    fn bearer_flow_with_credentials() {
        let reg = FakeRegistry::start();
        let parts = simple_image(&reg, "team/app", "v1");
        reg.require_bearer(Some(("bob", "pw")));
        let manifest = "/v2/team/app/manifests/v1";

        let r = get(&reg, "/v2/", &[]);
        assert_eq!(r.status, 401);
        let (realm, service, scope) = parse_challenge(r.header("www-authenticate").unwrap());
        assert_eq!(realm, format!("http://{}/token", reg.addr()));
        assert_eq!(service, "fake");
        assert_eq!(scope, None);
        let r = get(&reg, manifest, &[]);
        assert_eq!(r.status, 401);
        let (_, _, scope) = parse_challenge(r.header("www-authenticate").unwrap());
        assert_eq!(scope.as_deref(), Some("repository:team/app:pull"));

        let token_path = realm
            .strip_prefix(&format!("http://{}", reg.addr()))
            .unwrap()
            .to_owned()
            + "?scope=repository:team/app:pull&service=fake";
        // No or wrong credentials: no token.
        assert_eq!(get(&reg, &token_path, &[]).status, 401);
        let wrong = basic("bob", "wrong");
        assert_eq!(
            get(&reg, &token_path, &[("Authorization", &wrong)]).status,
            401
        );
        let right = basic("bob", "pw");
        let r = get(&reg, &token_path, &[("Authorization", &right)]);
        assert_eq!(r.status, 200);
        let token = r.json()["token"].as_str().unwrap().to_owned();
        assert_eq!(r.json()["access_token"].as_str(), Some(token.as_str()));

        let bearer = format!("Bearer {token}");
        // Basic credentials are not accepted on /v2 directly.
        assert_eq!(
            get(&reg, manifest, &[("Authorization", &right)]).status,
            401
        );
        let r = get(&reg, manifest, &[("Authorization", &bearer)]);
        assert_eq!(r.status, 200);
        assert_eq!(r.body, parts.manifest);

        let token_reqs: Vec<Request> = reg
            .requests()
            .into_iter()
            .filter(|r| r.path == "/token")
            .collect();
        assert_eq!(token_reqs.len(), 3);
        assert_eq!(
            token_reqs[2].query.as_deref(),
            Some("scope=repository:team/app:pull&service=fake")
        );
    }

    #[test]
    fn bearer_flow_anonymous_and_deny_all() {
        let reg = FakeRegistry::start();
        reg.require_bearer(None);
        assert_eq!(get(&reg, "/v2/", &[]).status, 401);
        let r = get(&reg, "/token?service=fake", &[]);
        assert_eq!(r.status, 200);
        let bearer = format!("Bearer {}", r.json()["token"].as_str().unwrap());
        assert_eq!(get(&reg, "/v2/", &[("Authorization", &bearer)]).status, 200);

        reg.deny_all();
        let r = get(&reg, "/v2/", &[("Authorization", &bearer)]);
        assert_eq!(r.status, 401);
        let (realm, _, _) = parse_challenge(r.header("www-authenticate").unwrap());
        assert_eq!(realm, format!("http://{}/token", reg.addr()));
        assert_eq!(get(&reg, "/token?service=fake", &[]).status, 401);
        let creds = basic("any", "thing");
        assert_eq!(
            get(&reg, "/token?service=fake", &[("Authorization", &creds)]).status,
            401
        );

        reg.allow_anonymous();
        assert_eq!(get(&reg, "/v2/", &[]).status, 200);
    }

    #[test]
    fn head_has_headers_but_no_body() {
        let reg = FakeRegistry::start();
        let parts = simple_image(&reg, "repo", "latest");
        let mut c = Client::connect(&reg);
        for reference in ["latest", parts.manifest_digest.as_str()] {
            let target = format!("/v2/repo/manifests/{reference}");
            let head = c.request("HEAD", &target, &[]);
            let get = c.request("GET", &target, &[]);
            assert_eq!(head.status, 200);
            assert_eq!(head.header("content-type"), Some(OCI_MANIFEST));
            assert_eq!(
                head.header("docker-content-digest"),
                Some(parts.manifest_digest.as_str())
            );
            assert_eq!(
                head.header("content-length"),
                Some(parts.manifest.len().to_string().as_str())
            );
            // The GET right after on the same connection parses: HEAD sent no body.
            assert_eq!(get.body, parts.manifest);
        }
        let target = format!("/v2/repo/blobs/{}", parts.layer_digest);
        let head = c.request("HEAD", &target, &[]);
        assert_eq!(head.status, 200);
        assert_eq!(
            head.header("content-length"),
            Some(parts.layer.len().to_string().as_str())
        );
        assert_eq!(c.request("GET", &target, &[]).body, parts.layer);
        let missing = c.request("HEAD", "/v2/repo/manifests/nope", &[]);
        assert_eq!(missing.status, 404);
        assert_eq!(c.request("GET", "/v2/", &[]).status, 200);
    }

    #[test]
    fn range_answers_206() {
        let reg = FakeRegistry::start();
        let digest = reg.put_blob("repo", b"0123456789".to_vec());
        let target = format!("/v2/repo/blobs/{digest}");
        let mut c = Client::connect(&reg);
        let r = c.request("GET", &target, &[("Range", "bytes=3-")]);
        assert_eq!(r.status, 206);
        assert_eq!(r.body, b"3456789");
        assert_eq!(r.header("content-range"), Some("bytes 3-9/10"));
        let r = c.request("GET", &target, &[("Range", "bytes=2-4")]);
        assert_eq!((r.status, r.body.as_slice()), (206, &b"234"[..]));
        assert_eq!(r.header("content-range"), Some("bytes 2-4/10"));
        let r = c.request("GET", &target, &[("Range", "bytes=10-")]);
        assert_eq!(r.status, 416);
        assert_eq!(r.header("content-range"), Some("bytes */10"));
    }

    #[test]
    fn not_found_errors_and_forced_status() {
        let reg = FakeRegistry::start();
        simple_image(&reg, "known", "latest");
        let r = get(&reg, "/v2/unknown/manifests/latest", &[]);
        assert_eq!((r.status, r.error_code()), (404, "NAME_UNKNOWN".into()));
        let r = get(&reg, "/v2/known/manifests/other", &[]);
        assert_eq!((r.status, r.error_code()), (404, "MANIFEST_UNKNOWN".into()));
        let missing = sha256_digest(b"missing");
        let r = get(&reg, &format!("/v2/known/blobs/{missing}"), &[]);
        assert_eq!((r.status, r.error_code()), (404, "BLOB_UNKNOWN".into()));
        let r = get(&reg, &format!("/v2/unknown/blobs/{missing}"), &[]);
        assert_eq!((r.status, r.error_code()), (404, "NAME_UNKNOWN".into()));

        reg.status_for("/v2/known/blobs/", 500);
        let r = get(&reg, &format!("/v2/known/blobs/{missing}"), &[]);
        assert_eq!(r.status, 500);
        assert_eq!(r.error_code(), "UNKNOWN");
        assert_eq!(get(&reg, "/v2/known/manifests/latest", &[]).status, 200);
        reg.status_for("/v2/known/blobs/", 503);
        assert_eq!(get(&reg, "/v2/known/blobs/x?ns=a", &[]).status, 503);
    }

    #[test]
    fn requests_are_logged_and_queries_ignored_for_routing() {
        let reg = FakeRegistry::start();
        let digest = reg.put_blob("library/busybox", b"abc".to_vec());
        let path = format!("/v2/library/busybox/blobs/{digest}");
        let r = get(&reg, &format!("{path}?ns=docker.io"), &[("X-Test", "1")]);
        assert_eq!((r.status, r.body.as_slice()), (200, &b"abc"[..]));
        get(&reg, "/v2/", &[]);
        let log = reg.requests();
        assert_eq!(log.len(), 2);
        assert_eq!(log[0].method, "GET");
        assert_eq!(log[0].path, path);
        assert_eq!(log[0].query.as_deref(), Some("ns=docker.io"));
        assert_eq!(log[0].header("x-test"), Some("1"));
        assert_eq!(log[0].header("host"), Some("fake"));
        assert_eq!(log[1].path, "/v2/");
        assert_eq!(reg.count("GET", &path), 1);
        assert_eq!(reg.count("HEAD", &path), 0);
    }

    #[test]
    fn connection_close_is_honoured_and_other_methods_rejected() {
        let reg = FakeRegistry::start();
        let mut c = Client::connect(&reg);
        let r = c.request("GET", "/v2/", &[("Connection", "close")]);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), Some("close"));
        assert!(c.at_eof());

        // A request body is skipped, so the next request on the connection still parses.
        let mut c = Client::connect(&reg);
        c.writer
            .write_all(b"PUT /v2/repo/manifests/x HTTP/1.1\r\nContent-Length: 3\r\n\r\n{}\n")
            .unwrap();
        let r = c.read_response("PUT");
        assert_eq!((r.status, r.error_code()), (405, "UNSUPPORTED".into()));
        assert_eq!(c.request("GET", "/v2/", &[]).status, 200);
    }

    #[test]
    fn drop_stops_the_server_and_closes_connections() {
        let reg = FakeRegistry::start();
        let port: u16 = reg
            .addr()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        let mut idle = Client::connect(&reg);
        assert_eq!(idle.request("GET", "/v2/", &[]).status, 200);
        // While it runs, its listener is found (the check below can fail).
        assert_eq!(our_listeners(port).len(), 1);
        drop(reg);
        assert!(idle.at_eof(), "the open keep-alive connection was closed");
        // Nothing of this process listens there any more. (A connect could reach another process that
        // took the port since, so look at our own sockets instead.)
        assert!(
            our_listeners(port).is_empty(),
            "still listening on port {port}"
        );
    }

    /// Inodes of this process's TCP sockets listening on `port`.
    fn our_listeners(port: u16) -> Vec<String> {
        let listening: HashSet<String> = std::fs::read_to_string("/proc/net/tcp")
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
                (local_port == port && *f.get(3)? == "0A")
                    .then(|| f.get(9).map(|s| s.to_string()))?
            })
            .collect();
        std::fs::read_dir("/proc/self/fd")
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .filter_map(|t| {
                        let t = t.to_string_lossy().to_string();
                        let inode = t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned();
                        listening.contains(&inode).then_some(inode)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A real client: curl reuses the connection for several URLs, follows the basic-auth flow, and
    /// reports a truncated body as a partial transfer (exit code 18).
    #[test]
    fn curl_agrees() {
        if Command::new("curl").arg("--version").output().is_err() {
            eprintln!("curl not installed; skipping");
            return;
        }
        let reg = FakeRegistry::start();
        let parts = simple_image(&reg, "c/img", "v1");
        reg.require_basic("u", "p");
        let base = format!("http://{}/v2/c/img", reg.addr());
        let out = Command::new("curl")
            .args(["-sSf", "-u", "u:p", "-o", "/dev/null", "-o", "-"])
            .arg(format!("{base}/manifests/v1"))
            .arg(format!("{base}/blobs/{}?ns=docker.io", parts.config_digest))
            .output()
            .expect("running curl");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(out.stdout, parts.config);
        let log = reg.requests();
        assert_eq!(log.len(), 2);
        assert!(log.iter().all(|r| r.header("authorization").is_some()));

        reg.truncate_blob("c/img", &parts.layer_digest, 10);
        let out = Command::new("curl")
            .args(["-sS", "-u", "u:p", "-o", "/dev/null"])
            .arg(format!("{base}/blobs/{}", parts.layer_digest))
            .output()
            .expect("running curl");
        assert_eq!(out.status.code(), Some(18), "{out:?}");
    }

    fn run_with_stdin(cmd: &mut Command, stdin: &[u8]) -> Vec<u8> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning");
        let mut input = child.stdin.take().unwrap();
        let data = stdin.to_vec();
        let feeder = std::thread::spawn(move || input.write_all(&data));
        let out = child.wait_with_output().expect("waiting");
        feeder.join().unwrap().expect("feeding stdin");
        assert!(out.status.success(), "{cmd:?} failed");
        out.stdout
    }

    #[test]
    fn simple_image_is_valid() {
        let reg = FakeRegistry::start();
        let parts = simple_image(&reg, "img", "latest");
        assert_eq!(parts.reference, format!("{}/img:latest", reg.addr()));
        let r = get(&reg, "/v2/img/manifests/latest", &[]);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(OCI_MANIFEST));
        assert_eq!(
            r.header("docker-content-digest"),
            Some(parts.manifest_digest.as_str())
        );
        let m = r.json();
        assert_eq!(m["schemaVersion"], 2);
        assert_eq!(m["config"]["digest"], parts.config_digest.as_str());
        assert_eq!(m["config"]["size"], parts.config.len());
        assert_eq!(m["layers"][0]["digest"], parts.layer_digest.as_str());
        assert_eq!(m["layers"][0]["mediaType"], OCI_LAYER_GZIP);

        let config = get(&reg, &format!("/v2/img/blobs/{}", parts.config_digest), &[]);
        assert_eq!(sha256_digest(&config.body), parts.config_digest);
        let c = config.json();
        assert_eq!(c["os"], "linux");
        assert_eq!(c["architecture"], host_arch());
        assert_eq!(c["rootfs"]["diff_ids"][0], parts.diff_id.as_str());

        let layer = get(&reg, &format!("/v2/img/blobs/{}", parts.layer_digest), &[]);
        assert_eq!(sha256_digest(&layer.body), parts.layer_digest);
        // Real gzip and tar agree with our hand-made encodings.
        let tar = run_with_stdin(Command::new("gzip").arg("-dc"), &layer.body);
        assert_eq!(sha256_digest(&tar), parts.diff_id);
        let listing = run_with_stdin(Command::new("tar").arg("-tvf").arg("-"), &tar);
        let listing = String::from_utf8(listing).unwrap();
        assert!(listing.contains(SIMPLE_FILE.0), "{listing}");
        let content = run_with_stdin(
            Command::new("tar").args(["-xOzf", "-", SIMPLE_FILE.0]),
            &layer.body,
        );
        assert_eq!(content, SIMPLE_FILE.1);
    }

    #[test]
    fn gzip_stored_handles_empty_and_multi_block_input() {
        for len in [0usize, 1, 0xffff, 0x1_0000, 200_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let out = run_with_stdin(Command::new("gzip").arg("-dc"), &gzip_stored(&data));
            assert_eq!(out, data, "len {len}");
        }
    }

    #[test]
    fn foreign_platform_index_offers_only_another_platform() {
        let reg = FakeRegistry::start();
        let idx = foreign_platform_index(&reg, "multi", "latest");
        assert_ne!(foreign_arch(), host_arch());
        let r = get(&reg, "/v2/multi/manifests/latest", &[]);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(OCI_INDEX));
        assert_eq!(
            r.header("docker-content-digest"),
            Some(idx.index_digest.as_str())
        );
        let index = r.json();
        let manifests = index["manifests"].as_array().unwrap();
        assert_eq!(manifests.len(), 1);
        assert_eq!(manifests[0]["platform"]["architecture"], foreign_arch());
        assert_eq!(manifests[0]["platform"]["os"], "linux");
        assert_eq!(idx.platform, format!("linux/{}", foreign_arch()));
        let digest = manifests[0]["digest"].as_str().unwrap();
        assert_eq!(digest, idx.image.manifest_digest);
        let m = get(&reg, &format!("/v2/multi/manifests/{digest}"), &[]);
        assert_eq!(m.status, 200);
        assert_eq!(m.body, idx.image.manifest);
    }

    #[test]
    fn malformed_manifests() {
        let reg = FakeRegistry::start();
        let digest = invalid_json_manifest(&reg, "bad", "json");
        let r = get(&reg, "/v2/bad/manifests/json", &[]);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
        assert!(serde_json::from_slice::<serde_json::Value>(&r.body).is_err());

        let digest = manifest_missing_layer_digest(&reg, "bad", "nodigest");
        let r = get(&reg, "/v2/bad/manifests/nodigest", &[]);
        assert_eq!(r.status, 200);
        assert_eq!(sha256_digest(&r.body), digest);
        let m = r.json();
        assert!(m["layers"][0].get("digest").is_none());
        assert!(m["layers"][0].get("size").is_some());
        let config = m["config"]["digest"].as_str().unwrap();
        assert_eq!(
            get(&reg, &format!("/v2/bad/blobs/{config}"), &[]).status,
            200
        );
    }
}
