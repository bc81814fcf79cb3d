//! Typed client of the daemon's HTTP/1.1 + JSON API on its Unix socket.
//!
//! [`Client`] is async (tokio); [`BlockingClient`] wraps it in a private current-thread runtime for
//! synchronous callers such as the CLI. Each call opens a fresh connection: the socket is local, a
//! connect costs microseconds, and there is no pool to keep healthy.

use std::future::Future;
use std::path::{Path, PathBuf};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::types::{
    CreateSandboxRequest, DiskUsage, ExecRequest, ExecResult, ImageInfo, ImageList,
    ImportImageRequest, LogEntry, LogsResult, PruneImagesRequest, PruneReport, PullEvent,
    PullImageRequest, PullResult, SandboxInfo, SandboxList, SandboxStatus, StopRequest,
    VersionInfo, WaitRequest,
};
use crate::{API_PREFIX, DEFAULT_SOCKET, SOCKET_ENV};

mod files;
pub use files::{CHUNK as FILE_CHUNK, FILE_MODE_HEADER};

/// Everything a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon's socket could not be connected to.
    #[error("cannot connect to sandboxd at {}: {}", socket.display(), connect_hint(source))]
    Connect {
        /// The socket path that was tried.
        socket: PathBuf,
        /// The underlying error (`ENOENT`, `ECONNREFUSED`, `EACCES`...).
        #[source]
        source: std::io::Error,
    },
    /// The daemon answered with an error body.
    #[error("{} ({})", error.message, error.code)]
    Api {
        /// HTTP status of the answer.
        status: u16,
        /// The decoded error.
        #[source]
        error: ApiError,
    },
    /// The answer could not be understood (bad JSON, unexpected status, broken HTTP exchange).
    #[error("protocol error talking to sandboxd: {0}")]
    Protocol(String),
    /// A local I/O failure (e.g. building the runtime).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl ClientError {
    /// The daemon's error code, when the daemon answered with an error body.
    pub fn api_code(&self) -> Option<ErrorCode> {
        self.api_error().map(|e| e.code)
    }

    /// The daemon's error, when the daemon answered with an error body.
    pub fn api_error(&self) -> Option<&ApiError> {
        match self {
            Self::Api { error, .. } => Some(error),
            _ => None,
        }
    }

    /// The HTTP status of an error answer.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

fn connect_hint(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => {
            format!(
                "{e} (is the daemon running? set --socket or {SOCKET_ENV} if it listens elsewhere)"
            )
        }
        ErrorKind::PermissionDenied => {
            format!("{e} (permission denied: run as root or as a member of the socket's group)")
        }
        _ => e.to_string(),
    }
}

/// Percent-encodes one path segment or query value: everything but RFC 3986 unreserved characters.
pub fn percent_encode(s: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    out
}

/// The `(METHOD, path template)` pairs an OpenAPI document lists under `paths:`, in document order.
///
/// Deliberately simple line parsing (no YAML parser): a path is a key indented by two spaces that starts
/// with `/` (optionally quoted) directly under the top-level `paths:` key; its operations are the HTTP
/// method keys indented by four spaces below it.
pub fn openapi_routes(doc: &str) -> Vec<(String, String)> {
    const METHODS: [&str; 8] = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];
    let mut routes = Vec::new();
    let mut in_paths = false;
    let mut current: Option<String> = None;
    for line in doc.lines() {
        let trimmed = line.trim_end();
        let content = trimmed.trim_start();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let indent = trimmed.len() - content.len();
        if indent == 0 {
            in_paths = content == "paths:";
            current = None;
            continue;
        }
        if !in_paths {
            continue;
        }
        let Some(key) = content.strip_suffix(':') else {
            continue;
        };
        let key = key.trim_matches(|c| c == '"' || c == '\'');
        match indent {
            2 if key.starts_with('/') => current = Some(key.to_owned()),
            2 => current = None,
            4 => {
                if let Some(path) = &current {
                    if METHODS.contains(&key) {
                        routes.push((key.to_ascii_uppercase(), path.clone()));
                    }
                }
            }
            _ => {}
        }
    }
    routes
}

/// Async client of one daemon socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon listening on `socket_path`.
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket_path.into(),
        }
    }

    /// A client of `$SANDBOXD_SOCKET`, else of [`DEFAULT_SOCKET`].
    pub fn from_env() -> Self {
        match std::env::var_os(SOCKET_ENV) {
            Some(p) if !p.is_empty() => Self::new(p),
            _ => Self::new(DEFAULT_SOCKET),
        }
    }

    /// The socket this client talks to.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// `GET /v1/version`.
    pub async fn version(&self) -> Result<VersionInfo, ClientError> {
        self.call(Method::GET, "/version".into(), None::<&()>).await
    }

    /// `POST /v1/sandboxes`: creates and starts a sandbox; answers once it is RUNNING.
    pub async fn create(&self, req: &CreateSandboxRequest) -> Result<SandboxInfo, ClientError> {
        self.call(Method::POST, "/sandboxes".into(), Some(req))
            .await
    }

    /// `GET /v1/sandboxes`, optionally filtered by statuses (any of) and a tag.
    pub async fn list(
        &self,
        status: &[SandboxStatus],
        tag: Option<&str>,
    ) -> Result<SandboxList, ClientError> {
        self.list_filtered(status, tag.as_slice()).await
    }

    /// `GET /v1/sandboxes?status=...&tag=...&tag=...`: the sandboxes in one of `status` (all when empty)
    /// that carry every one of `tags`.
    pub async fn list_filtered(
        &self,
        status: &[SandboxStatus],
        tags: &[&str],
    ) -> Result<SandboxList, ClientError> {
        let mut query = Vec::new();
        if !status.is_empty() {
            let s: Vec<&str> = status.iter().map(|s| s.as_str()).collect();
            query.push(format!("status={}", s.join(",")));
        }
        for t in tags {
            query.push(format!("tag={}", percent_encode(t)));
        }
        let mut path = String::from("/sandboxes");
        if !query.is_empty() {
            path.push('?');
            path.push_str(&query.join("&"));
        }
        self.call(Method::GET, path, None::<&()>).await
    }

    /// `GET /v1/sandboxes/{id}` (`id` is an id or a name).
    pub async fn get(&self, id: &str) -> Result<SandboxInfo, ClientError> {
        self.call(Method::GET, sandbox_path(id, ""), None::<&()>)
            .await
    }

    /// `POST /v1/sandboxes/{id}/stop`: SIGTERM, then SIGKILL after the grace period (daemon default 10 s).
    /// Answers once the main process has exited.
    pub async fn stop(
        &self,
        id: &str,
        grace_seconds: Option<f64>,
    ) -> Result<SandboxInfo, ClientError> {
        let req = StopRequest { grace_seconds };
        self.call(Method::POST, sandbox_path(id, "/stop"), Some(&req))
            .await
    }

    /// `POST /v1/sandboxes/{id}/wait`. A timeout is `ClientError::Api` with code `WAIT_TIMEOUT`.
    pub async fn wait(&self, id: &str, req: WaitRequest) -> Result<SandboxInfo, ClientError> {
        self.call(Method::POST, sandbox_path(id, "/wait"), Some(&req))
            .await
    }

    /// `DELETE /v1/sandboxes/{id}[?force=true]`.
    pub async fn delete(&self, id: &str, force: bool) -> Result<(), ClientError> {
        let mut path = sandbox_path(id, "");
        if force {
            path.push_str("?force=true");
        }
        self.call_no_content(Method::DELETE, path).await
    }

    /// `POST /v1/sandboxes/{id}/exec` (unary). A non-zero exit is `Ok`; a timeout is `ClientError::Api`
    /// with code `EXEC_TIMEOUT` and the partial output in its details.
    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResult, ClientError> {
        self.call(Method::POST, sandbox_path(id, "/exec"), Some(req))
            .await
    }

    /// `GET /v1/sandboxes/{id}/logs`: the main process's output so far.
    pub async fn logs(&self, id: &str) -> Result<LogsResult, ClientError> {
        self.call(Method::GET, sandbox_path(id, "/logs"), None::<&()>)
            .await
    }

    /// `GET /v1/sandboxes/{id}/logs/stream`: the main process's log as entries (one per line, or piece of a
    /// line), read with [`LogStream::next`]. With `follow`, the stream goes on until the sandbox has ended
    /// and everything is sent.
    pub async fn logs_stream(
        &self,
        id: &str,
        opts: LogStreamOptions,
    ) -> Result<LogStream, ClientError> {
        let full = format!(
            "{API_PREFIX}{}?{}",
            sandbox_path(id, "/logs/stream"),
            opts.query()
        );
        let (status, incoming) = self.send(Method::GET, &full, None).await?;
        if !(200..300).contains(&status) {
            let bytes = incoming
                .collect()
                .await
                .map_err(|e| http_error("reading the answer", e))?
                .to_bytes();
            return Err(decode_error(status, &bytes));
        }
        Ok(LogStream {
            body: incoming,
            pending: Vec::new(),
            start: 0,
            done: false,
        })
    }

    /// `POST /v1/images/import`.
    pub async fn import_image(&self, req: &ImportImageRequest) -> Result<ImageInfo, ClientError> {
        self.call(Method::POST, "/images/import".into(), Some(req))
            .await
    }

    /// `GET /v1/images`.
    pub async fn images(&self) -> Result<ImageList, ClientError> {
        self.call(Method::GET, "/images".into(), None::<&()>).await
    }

    /// `GET /v1/images/{ref}` (a reference or a `sha256:` digest).
    pub async fn image(&self, reference: &str) -> Result<ImageInfo, ClientError> {
        let path = format!("/images/{}", percent_encode(reference));
        self.call(Method::GET, path, None::<&()>).await
    }

    /// `DELETE /v1/images/{ref}[?force=true]`: answers the removed image.
    pub async fn remove_image(
        &self,
        reference: &str,
        force: bool,
    ) -> Result<ImageInfo, ClientError> {
        let mut path = format!("/images/{}", percent_encode(reference));
        if force {
            path.push_str("?force=true");
        }
        self.call(Method::DELETE, path, None::<&()>).await
    }

    /// `POST /v1/images/pull`: pulls (or refreshes) an image from its registry and answers once it is stored.
    pub async fn pull_image(&self, req: &PullImageRequest) -> Result<PullResult, ClientError> {
        self.call(Method::POST, "/images/pull".into(), Some(req))
            .await
    }

    /// `POST /v1/images/pull?progress=true`: like [`Client::pull_image`], calling `on_event` for every progress
    /// line as it arrives (the final `done` or `error` line included).
    pub async fn pull_image_progress(
        &self,
        req: &PullImageRequest,
        mut on_event: impl FnMut(&PullEvent),
    ) -> Result<PullResult, ClientError> {
        let body = serde_json::to_vec(req)
            .map_err(|e| ClientError::Protocol(format!("cannot encode request: {e}")))?;
        let full = format!("{API_PREFIX}/images/pull?progress=true");
        let (status, mut incoming) = self.send(Method::POST, &full, Some(body)).await?;
        if !(200..300).contains(&status) {
            let bytes = incoming
                .collect()
                .await
                .map_err(|e| http_error("reading the answer", e))?
                .to_bytes();
            return Err(decode_error(status, &bytes));
        }
        let mut pending: Vec<u8> = Vec::new();
        let mut outcome: Option<Result<PullResult, ClientError>> = None;
        loop {
            let frame = match incoming.frame().await {
                Some(f) => f.map_err(|e| http_error("reading the progress stream", e))?,
                None => break,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                let line = line.strip_suffix(b"\n").unwrap_or(&line);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let event: PullEvent = serde_json::from_slice(line).map_err(|e| {
                    ClientError::Protocol(format!(
                        "invalid progress line from {full}: {e}: {}",
                        snippet(line)
                    ))
                })?;
                on_event(&event);
                match event {
                    PullEvent::Done(r) => outcome = Some(Ok(r)),
                    PullEvent::Error { error } => {
                        let status = error.code.http_status();
                        outcome = Some(Err(ClientError::Api { status, error }));
                    }
                    _ => {}
                }
            }
        }
        outcome.unwrap_or_else(|| {
            Err(ClientError::Protocol(format!(
                "the progress stream of {full} ended without a result"
            )))
        })
    }

    /// `POST /v1/images/prune`: removes unreferenced content (and, with `all`, every image no sandbox uses).
    pub async fn prune_images(&self, all: bool) -> Result<PruneReport, ClientError> {
        let req = PruneImagesRequest { all };
        self.call(Method::POST, "/images/prune".into(), Some(&req))
            .await
    }

    /// `GET /v1/system/df`: disk used by the image store.
    pub async fn image_usage(&self) -> Result<DiskUsage, ClientError> {
        self.call(Method::GET, "/system/df".into(), None::<&()>)
            .await
    }

    /// One raw exchange: `path_and_query` is the full path (with `/v1`). Answers the status and body
    /// whatever the status. For tests and tools; the typed methods are the API.
    pub async fn request_raw(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|e| ClientError::Protocol(format!("invalid method {method:?}: {e}")))?;
        let (status, bytes) = self.exchange(method, path_and_query, body).await?;
        Ok((status, bytes.to_vec()))
    }

    async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: String,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let body = match body {
            Some(b) => Some(
                serde_json::to_vec(b)
                    .map_err(|e| ClientError::Protocol(format!("cannot encode request: {e}")))?,
            ),
            None => None,
        };
        let full = format!("{API_PREFIX}{path}");
        let (status, bytes) = self.exchange(method, &full, body).await?;
        if !(200..300).contains(&status) {
            return Err(decode_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            ClientError::Protocol(format!(
                "invalid answer to {full} (HTTP {status}): {e}: {}",
                snippet(&bytes)
            ))
        })
    }

    async fn call_no_content(&self, method: Method, path: String) -> Result<(), ClientError> {
        let full = format!("{API_PREFIX}{path}");
        let (status, bytes) = self.exchange(method, &full, None).await?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(decode_error(status, &bytes))
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), ClientError> {
        let (status, incoming) = self.send(method, path_and_query, body).await?;
        let bytes = incoming
            .collect()
            .await
            .map_err(|e| http_error("reading the answer", e))?
            .to_bytes();
        Ok((status, bytes))
    }

    /// Sends one request and answers the status and the body, still to be read.
    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, hyper::body::Incoming), ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http_error("handshake", e))?;
        // Drives the connection; it ends once `sender` is dropped and the exchange is complete.
        let driver = tokio::spawn(conn);

        let mut builder = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        let body = match body {
            Some(b) => {
                builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(b))
            }
            None => Full::new(Bytes::new()),
        };
        let req = builder.body(body).map_err(|e| {
            ClientError::Protocol(format!("invalid request {path_and_query:?}: {e}"))
        })?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| http_error("request", e))?;
        let status = resp.status().as_u16();
        drop(sender);
        // The connection task finishes on its own once the body has been read (or dropped). Not awaiting it
        // saves a wakeup.
        drop(driver);
        Ok((status, resp.into_body()))
    }
}

/// What [`Client::logs_stream`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogStreamOptions {
    /// Keep streaming new output until the sandbox has ended.
    pub follow: bool,
    /// Start with the last N lines (over both streams) instead of the beginning.
    pub tail_lines: Option<u64>,
    /// Include each entry's timestamp.
    pub timestamps: bool,
    /// Include stdout.
    pub stdout: bool,
    /// Include stderr.
    pub stderr: bool,
}

impl Default for LogStreamOptions {
    fn default() -> Self {
        Self {
            follow: false,
            tail_lines: None,
            timestamps: false,
            stdout: true,
            stderr: true,
        }
    }
}

impl LogStreamOptions {
    fn query(&self) -> String {
        let mut q = format!(
            "follow={}&timestamps={}&stdout={}&stderr={}",
            self.follow, self.timestamps, self.stdout, self.stderr
        );
        if let Some(n) = self.tail_lines {
            q.push_str(&format!("&tail_lines={n}"));
        }
        q
    }
}

/// The entries of a logs stream, as they arrive (see [`Client::logs_stream`]).
pub struct LogStream {
    body: hyper::body::Incoming,
    pending: Vec<u8>,
    /// Start of the unread part of `pending`.
    start: usize,
    done: bool,
}

impl std::fmt::Debug for LogStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStream")
            .field("buffered", &(self.pending.len() - self.start))
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl LogStream {
    /// The next entry; `None` once the stream has ended.
    pub async fn next(&mut self) -> Option<Result<LogEntry, ClientError>> {
        loop {
            if let Some(i) = self.pending[self.start..].iter().position(|b| *b == b'\n') {
                let line = &self.pending[self.start..self.start + i];
                self.start += i + 1;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some(serde_json::from_slice(line).map_err(|e| {
                    ClientError::Protocol(format!("invalid log entry: {e}: {}", snippet(line)))
                }));
            }
            if self.start > 0 {
                self.pending.drain(..self.start);
                self.start = 0;
            }
            if self.done {
                if self.pending.iter().all(u8::is_ascii_whitespace) {
                    return None;
                }
                let rest = std::mem::take(&mut self.pending);
                return Some(Err(ClientError::Protocol(format!(
                    "the logs stream ended inside an entry: {}",
                    snippet(&rest)
                ))));
            }
            match self.body.frame().await {
                None => self.done = true,
                Some(Err(e)) => {
                    self.done = true;
                    self.pending.clear();
                    return Some(Err(http_error("reading the logs stream", e)));
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// A [`LogStream`] read through a [`BlockingClient`]: an iterator of entries.
#[derive(Debug)]
pub struct BlockingLogStream<'a> {
    client: &'a BlockingClient,
    inner: LogStream,
}

impl Iterator for BlockingLogStream<'_> {
    type Item = Result<LogEntry, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.client.block_on(self.inner.next())
    }
}

fn sandbox_path(id: &str, suffix: &str) -> String {
    format!("/sandboxes/{}{suffix}", percent_encode(id))
}

fn http_error(what: &str, e: hyper::Error) -> ClientError {
    ClientError::Protocol(format!("HTTP {what} failed: {e}"))
}

fn snippet(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let mut out: String = s.chars().take(200).collect();
    if s.chars().count() > 200 {
        out.push_str("...");
    }
    if out.is_empty() {
        out.push_str("<empty body>");
    }
    out
}

fn decode_error(status: u16, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(b) => ClientError::Api {
            status,
            error: b.error,
        },
        Err(_) => ClientError::Protocol(format!(
            "HTTP {status} without an error body: {}",
            snippet(bytes)
        )),
    }
}

/// Synchronous client: a [`Client`] driven by its own current-thread tokio runtime.
#[derive(Debug)]
pub struct BlockingClient {
    inner: Client,
    rt: tokio::runtime::Runtime,
}

impl BlockingClient {
    /// A blocking client of the daemon listening on `socket_path`.
    pub fn new(socket_path: impl Into<PathBuf>) -> Result<Self, ClientError> {
        Self::with_client(Client::new(socket_path))
    }

    /// A blocking client of `$SANDBOXD_SOCKET`, else of [`DEFAULT_SOCKET`].
    pub fn from_env() -> Result<Self, ClientError> {
        Self::with_client(Client::from_env())
    }

    /// Wraps an async client.
    pub fn with_client(inner: Client) -> Result<Self, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self { inner, rt })
    }

    /// The async client inside (to combine calls with other futures in [`BlockingClient::block_on`]).
    pub fn client(&self) -> &Client {
        &self.inner
    }

    /// The socket this client talks to.
    pub fn socket_path(&self) -> &Path {
        self.inner.socket_path()
    }

    /// Runs a future on this client's runtime (e.g. a `wait` raced against Ctrl-C).
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.rt.block_on(fut)
    }

    /// See [`Client::version`].
    pub fn version(&self) -> Result<VersionInfo, ClientError> {
        self.block_on(self.inner.version())
    }

    /// See [`Client::create`].
    pub fn create(&self, req: &CreateSandboxRequest) -> Result<SandboxInfo, ClientError> {
        self.block_on(self.inner.create(req))
    }

    /// See [`Client::list`].
    pub fn list(
        &self,
        status: &[SandboxStatus],
        tag: Option<&str>,
    ) -> Result<SandboxList, ClientError> {
        self.block_on(self.inner.list(status, tag))
    }

    /// See [`Client::list_filtered`].
    pub fn list_filtered(
        &self,
        status: &[SandboxStatus],
        tags: &[&str],
    ) -> Result<SandboxList, ClientError> {
        self.block_on(self.inner.list_filtered(status, tags))
    }

    /// See [`Client::logs_stream`]: an iterator of entries (it blocks while following).
    pub fn logs_stream(
        &self,
        id: &str,
        opts: LogStreamOptions,
    ) -> Result<BlockingLogStream<'_>, ClientError> {
        let inner = self.block_on(self.inner.logs_stream(id, opts))?;
        Ok(BlockingLogStream {
            client: self,
            inner,
        })
    }

    /// See [`Client::get`].
    pub fn get(&self, id: &str) -> Result<SandboxInfo, ClientError> {
        self.block_on(self.inner.get(id))
    }

    /// See [`Client::stop`].
    pub fn stop(&self, id: &str, grace_seconds: Option<f64>) -> Result<SandboxInfo, ClientError> {
        self.block_on(self.inner.stop(id, grace_seconds))
    }

    /// See [`Client::wait`].
    pub fn wait(&self, id: &str, req: WaitRequest) -> Result<SandboxInfo, ClientError> {
        self.block_on(self.inner.wait(id, req))
    }

    /// See [`Client::delete`].
    pub fn delete(&self, id: &str, force: bool) -> Result<(), ClientError> {
        self.block_on(self.inner.delete(id, force))
    }

    /// See [`Client::exec`].
    pub fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResult, ClientError> {
        self.block_on(self.inner.exec(id, req))
    }

    /// See [`Client::logs`].
    pub fn logs(&self, id: &str) -> Result<LogsResult, ClientError> {
        self.block_on(self.inner.logs(id))
    }

    /// See [`Client::import_image`].
    pub fn import_image(&self, req: &ImportImageRequest) -> Result<ImageInfo, ClientError> {
        self.block_on(self.inner.import_image(req))
    }

    /// See [`Client::images`].
    pub fn images(&self) -> Result<ImageList, ClientError> {
        self.block_on(self.inner.images())
    }

    /// See [`Client::image`].
    pub fn image(&self, reference: &str) -> Result<ImageInfo, ClientError> {
        self.block_on(self.inner.image(reference))
    }

    /// See [`Client::remove_image`].
    pub fn remove_image(&self, reference: &str, force: bool) -> Result<ImageInfo, ClientError> {
        self.block_on(self.inner.remove_image(reference, force))
    }

    /// See [`Client::pull_image`].
    pub fn pull_image(&self, req: &PullImageRequest) -> Result<PullResult, ClientError> {
        self.block_on(self.inner.pull_image(req))
    }

    /// See [`Client::pull_image_progress`].
    pub fn pull_image_progress(
        &self,
        req: &PullImageRequest,
        on_event: impl FnMut(&PullEvent),
    ) -> Result<PullResult, ClientError> {
        self.block_on(self.inner.pull_image_progress(req, on_event))
    }

    /// See [`Client::prune_images`].
    pub fn prune_images(&self, all: bool) -> Result<PruneReport, ClientError> {
        self.block_on(self.inner.prune_images(all))
    }

    /// See [`Client::image_usage`].
    pub fn image_usage(&self) -> Result<DiskUsage, ClientError> {
        self.block_on(self.inner.image_usage())
    }

    /// See [`Client::request_raw`].
    pub fn request_raw(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        self.block_on(self.inner.request_raw(method, path_and_query, body))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::UnixListener;

    use super::*;

    /// A request as the fake daemon saw it.
    #[derive(Debug)]
    struct Seen {
        head: String,
        body: Vec<u8>,
    }

    fn temp_socket() -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!(
            "sandbox-proto-client-{}-{n}.sock",
            std::process::id()
        ))
    }

    /// Serves exactly one HTTP/1.1 exchange with a canned answer; returns what it was sent.
    fn serve_once(socket: &Path, status: u16, body: &'static str) -> tokio::task::JoinHandle<Seen> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).expect("bind test socket");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let head_end = loop {
                let n = s.read(&mut chunk).await.expect("read");
                assert!(n > 0, "client closed before sending a full request");
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
            };
            let head = String::from_utf8(buf[..head_end].to_vec()).expect("ascii head");
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            while buf.len() < head_end + len {
                let n = s.read(&mut chunk).await.expect("read body");
                assert!(n > 0, "client closed mid-body");
                buf.extend_from_slice(&chunk[..n]);
            }
            let reply = if status == 204 {
                "HTTP/1.1 204 No Content\r\n\r\n".to_owned()
            } else {
                format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
            };
            s.write_all(reply.as_bytes()).await.expect("write");
            s.shutdown().await.ok();
            Seen {
                head,
                body: buf[head_end..head_end + len].to_vec(),
            }
        })
    }

    const SANDBOX: &str = r#"{"id":"0123456789abcdef","name":"web","image":"docker.io/library/busybox:latest",
        "image_digest":"sha256:00","status":"COMPLETED","command":["/bin/true"],
        "created_at":"2025-01-01T00:00:00Z","status_updated_at":"2025-01-01T00:00:01Z",
        "exit":{"code":0,"reason":"exited with code 0"},"limits":{"memory_bytes":268435456},"host_uid":100000}"#;

    #[tokio::test]
    async fn success_decodes_and_request_is_well_formed() {
        let sock = temp_socket();
        let server = serve_once(&sock, 200, SANDBOX);
        let c = Client::new(&sock);
        let info = c
            .wait("my box", WaitRequest::default())
            .await
            .expect("wait succeeds");
        assert_eq!(info.id, "0123456789abcdef");
        assert_eq!(info.status, SandboxStatus::Completed);
        assert_eq!(info.exit.as_ref().map(|e| e.shell_status()), Some(0));
        let seen = server.await.expect("server");
        assert!(
            seen.head
                .starts_with("POST /v1/sandboxes/my%20box/wait HTTP/1.1\r\n"),
            "{}",
            seen.head
        );
        let body: serde_json::Value = serde_json::from_slice(&seen.body).expect("json body");
        assert_eq!(body, serde_json::json!({"condition": "exited"}));
        let _ = std::fs::remove_file(&sock);
    }

    #[tokio::test]
    async fn list_query_and_no_content() {
        let sock = temp_socket();
        let server = serve_once(&sock, 200, r#"{"sandboxes":[]}"#);
        let c = Client::new(&sock);
        let l = c
            .list(
                &[SandboxStatus::Running, SandboxStatus::Failed],
                Some("a b"),
            )
            .await
            .expect("list");
        assert!(l.sandboxes.is_empty());
        let seen = server.await.expect("server");
        assert!(
            seen.head
                .starts_with("GET /v1/sandboxes?status=RUNNING,FAILED&tag=a%20b HTTP/1.1\r\n"),
            "{}",
            seen.head
        );

        let server = serve_once(&sock, 204, "");
        c.delete("web", true).await.expect("delete");
        let seen = server.await.expect("server");
        assert!(seen
            .head
            .starts_with("DELETE /v1/sandboxes/web?force=true HTTP/1.1\r\n"));
        let _ = std::fs::remove_file(&sock);
    }

    #[tokio::test]
    async fn logs_stream_reads_entries_and_list_takes_tags() {
        let sock = temp_socket();
        let server = serve_once(
            &sock,
            200,
            "{\"stream\":\"stdout\",\"data\":\"a\\n\"}\n\n{\"stream\":\"stderr\",\"data\":\"AAE=\",\"encoding\":\"base64\",\"timestamp\":\"t\"}\n",
        );
        let c = Client::new(&sock);
        let opts = LogStreamOptions {
            follow: true,
            tail_lines: Some(3),
            stderr: false,
            ..LogStreamOptions::default()
        };
        let mut st = c.logs_stream("web", opts).await.expect("stream");
        let a = st.next().await.expect("one").expect("entry");
        assert_eq!((a.stream.as_str(), a.bytes()), ("stdout", b"a\n".to_vec()));
        let b = st.next().await.expect("two").expect("entry");
        assert!(b.is_stderr());
        assert_eq!(b.bytes(), [0, 1]);
        assert_eq!(b.timestamp.as_deref(), Some("t"));
        assert!(st.next().await.is_none());
        let seen = server.await.expect("server");
        assert!(
            seen.head.starts_with(
                "GET /v1/sandboxes/web/logs/stream?follow=true&timestamps=false&stdout=true&stderr=false&tail_lines=3 HTTP/1.1\r\n"
            ),
            "{}",
            seen.head
        );

        let server = serve_once(&sock, 200, r#"{"sandboxes":[]}"#);
        c.list_filtered(&[], &["a", "b c"]).await.expect("list");
        let seen = server.await.expect("server");
        assert!(
            seen.head
                .starts_with("GET /v1/sandboxes?tag=a&tag=b%20c HTTP/1.1\r\n"),
            "{}",
            seen.head
        );
        let _ = std::fs::remove_file(&sock);
    }

    #[tokio::test]
    async fn error_body_decodes_into_api_error() {
        let sock = temp_socket();
        let server = serve_once(
            &sock,
            404,
            r#"{"error":{"code":"IMAGE_NOT_FOUND","message":"no image busybox:latest","details":{"reference":"busybox:latest"}}}"#,
        );
        let err = Client::new(&sock)
            .image("busybox:latest")
            .await
            .expect_err("must fail");
        assert_eq!(err.api_code(), Some(ErrorCode::ImageNotFound));
        assert_eq!(err.http_status(), Some(404));
        assert_eq!(err.to_string(), "no image busybox:latest (IMAGE_NOT_FOUND)");
        let seen = server.await.expect("server");
        assert!(seen
            .head
            .starts_with("GET /v1/images/busybox%3Alatest HTTP/1.1\r\n"));
        let _ = std::fs::remove_file(&sock);
    }

    #[tokio::test]
    async fn non_json_error_is_protocol_error() {
        let sock = temp_socket();
        let server = serve_once(&sock, 502, "bad gateway");
        let err = Client::new(&sock).version().await.expect_err("must fail");
        assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
        assert_eq!(err.api_code(), None);
        server.await.expect("server");
        let _ = std::fs::remove_file(&sock);
    }

    #[test]
    fn missing_socket_is_connect_error() {
        let sock = temp_socket();
        let _ = std::fs::remove_file(&sock);
        let c = BlockingClient::new(&sock).expect("runtime");
        let err = c.version().expect_err("no daemon");
        match &err {
            ClientError::Connect { socket, source } => {
                assert_eq!(socket, &sock);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("expected Connect, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("is the daemon running"), "{msg}");
        assert!(msg.contains(&sock.display().to_string()), "{msg}");
    }

    #[test]
    fn blocking_client_round_trip() {
        let sock = temp_socket();
        let c = BlockingClient::new(&sock).expect("runtime");
        let server = {
            let _guard = c.rt.enter();
            serve_once(
                &sock,
                408,
                r#"{"error":{"code":"EXEC_TIMEOUT","message":"timed out","details":{"stdout":"hi","stderr":"","encoding":"utf8"}}}"#,
            )
        };
        let req = ExecRequest {
            command: vec!["sleep".into(), "9".into()],
            timeout_seconds: Some(0.5),
            ..ExecRequest::default()
        };
        let err = c.exec("web", &req).expect_err("timeout");
        assert_eq!(err.api_code(), Some(ErrorCode::ExecTimeout));
        let details = err
            .api_error()
            .and_then(|e| e.details.clone())
            .expect("details");
        assert_eq!(details["stdout"], "hi");
        let seen = c.block_on(server).expect("server");
        let body: serde_json::Value = serde_json::from_slice(&seen.body).expect("json");
        assert_eq!(body["timeout_seconds"], 0.5);
        let _ = std::fs::remove_file(&sock);
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(percent_encode("busybox:latest"), "busybox%3Alatest");
        assert_eq!(
            percent_encode("docker.io/library/busybox:latest"),
            "docker.io%2Flibrary%2Fbusybox%3Alatest"
        );
        assert_eq!(percent_encode("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }

    #[test]
    fn routes_parse() {
        let doc = "openapi: 3.0.3\npaths:\n  /v1/a:\n    get:\n      x: 1\n    parameters:\n      - y\n  '/v1/b/{id}':\n    post:\n      z: 2\n    delete:\n      z: 3\ncomponents:\n  schemas:\n    get:\n";
        let r = openapi_routes(doc);
        assert_eq!(
            r,
            vec![
                ("GET".to_owned(), "/v1/a".to_owned()),
                ("POST".to_owned(), "/v1/b/{id}".to_owned()),
                ("DELETE".to_owned(), "/v1/b/{id}".to_owned()),
            ]
        );
    }
}
