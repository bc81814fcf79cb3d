//! The main process's log over HTTP: `GET /v1/sandboxes/{id}/logs` (everything, collected per stream) and
//! `GET /v1/sandboxes/{id}/logs/stream` (NDJSON of [`LogEntry`], optionally following the log until the
//! sandbox has ended). Both read the store the supervisor writes ([`sandbox_runtime::logs`]).
//!
//! Following: the stream reads what is there, then waits for the log directory to change (inotify; a
//! slow poll when inotify is not available) or for the sandbox's status to change. Once the sandbox is in
//! a terminal state, one last read sends the rest and the stream ends: the supervisor writes the whole
//! log before it records the exit, so nothing is written after that.

use std::convert::Infallible;
use std::os::fd::{AsFd as _, AsRawFd, RawFd};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use sandbox_proto::{ApiError, ErrorCode, LogEntry, LogsResult, OutputEncoding, SandboxStatus};
use sandbox_runtime::logs::{LogError, LogReader, Record, StreamFilter};
use serde::Deserialize;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use crate::error::{internal, HttpError};
use crate::manager::Manager;

/// Cap on each stream returned by the collected logs answer.
const LOG_CAP: usize = 16 << 20;
/// NDJSON bytes sent per chunk (at most; a chunk ends with a whole line).
const CHUNK_BYTES: usize = 256 << 10;
/// With inotify: a safety net in case an event is missed.
const WATCH_RECHECK: Duration = Duration::from_secs(2);
/// Without inotify (e.g. its per-user instance limit reached): how often a follower looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// What a logs request needs of a sandbox.
#[derive(Debug)]
pub(crate) struct LogSource {
    /// The sandbox's state directory.
    pub dir: PathBuf,
    /// Its status.
    pub status: watch::Receiver<SandboxStatus>,
    /// Becomes true once it has been removed.
    pub removed: watch::Receiver<bool>,
}

fn log_error(e: LogError) -> ApiError {
    internal("reading logs", e)
}

/// The last 16 MiB of each stream, as `GET /v1/sandboxes/{id}/logs` answers.
pub(crate) async fn logs_result(dir: PathBuf) -> Result<LogsResult, ApiError> {
    tokio::task::spawn_blocking(move || {
        let (out, err) = sandbox_runtime::logs::read_streams(&dir, LOG_CAP).map_err(log_error)?;
        Ok(LogsResult::from_bytes(&out, &err))
    })
    .await
    .map_err(|e| internal("logs", e))?
}

fn yes() -> bool {
    true
}

/// Query of `GET /v1/sandboxes/{id}/logs/stream`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StreamQuery {
    /// Keep sending new records until the sandbox has ended.
    #[serde(default)]
    follow: bool,
    /// Start with the last N lines (over both streams) instead of the beginning.
    tail_lines: Option<u64>,
    /// Add each record's timestamp.
    #[serde(default)]
    timestamps: bool,
    /// Include stdout.
    #[serde(default = "yes")]
    stdout: bool,
    /// Include stderr.
    #[serde(default = "yes")]
    stderr: bool,
}

/// `GET /v1/sandboxes/{id}/logs/stream`.
pub(crate) async fn stream(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    q: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, HttpError> {
    let Query(q) = q.map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e.body_text()))?;
    let src = m.log_source(&id).await?;
    // Watching starts before the first read, so that no growth between reading and waiting is missed.
    let watcher = if q.follow {
        match Watcher::new(&src.dir) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::debug!(%id, "no inotify for following logs ({e}); polling instead");
                None
            }
        }
    } else {
        None
    };
    let filter = StreamFilter {
        stdout: q.stdout,
        stderr: q.stderr,
    };
    let reader = match q.tail_lines {
        None => LogReader::new(&src.dir),
        Some(n) => {
            let dir = src.dir.clone();
            let pos = tokio::task::spawn_blocking(move || {
                sandbox_runtime::logs::tail_start(&dir, n, filter)
            })
            .await
            .map_err(|e| internal("logs", e))?
            .map_err(log_error)?;
            LogReader::at(&src.dir, pos)
        }
    };
    let follow = Follow {
        id,
        reader: Some(reader),
        filter,
        timestamps: q.timestamps,
        follow: q.follow,
        status: src.status,
        removed: src.removed,
        gone: false,
        watcher,
        done: false,
    };
    let body = futures_util::stream::unfold(follow, next_chunk);
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(body),
    )
        .into_response())
}

/// The state of one logs stream.
struct Follow {
    id: String,
    /// `None` only while a read runs.
    reader: Option<LogReader>,
    filter: StreamFilter,
    timestamps: bool,
    follow: bool,
    status: watch::Receiver<SandboxStatus>,
    removed: watch::Receiver<bool>,
    /// The sandbox's record is gone (its channels closed).
    gone: bool,
    watcher: Option<Watcher>,
    done: bool,
}

impl Follow {
    /// Whether the sandbox can write no more: what is on disk now is all there will be.
    fn finished(&self) -> bool {
        self.gone || self.status.borrow().is_terminal() || *self.removed.borrow()
    }

    /// Until the log may have grown or the sandbox's state changed.
    async fn wait(&mut self) {
        let recheck = if self.watcher.is_some() {
            WATCH_RECHECK
        } else {
            POLL_INTERVAL
        };
        let watcher = &self.watcher;
        let grew = async {
            match watcher {
                Some(w) => w.wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = self.status.changed() => self.gone |= r.is_err(),
            r = self.removed.changed() => self.gone |= r.is_err(),
            () = grew => {}
            () = tokio::time::sleep(recheck) => {}
        }
    }
}

async fn next_chunk(mut f: Follow) -> Option<(Result<Bytes, Infallible>, Follow)> {
    loop {
        if f.done {
            return None;
        }
        // Checked before reading: if the sandbox had ended by now, this read gets the rest.
        let last = !f.follow || f.finished();
        let reader = f.reader.take()?;
        let (filter, timestamps) = (f.filter, f.timestamps);
        let read =
            tokio::task::spawn_blocking(move || read_chunk(reader, filter, timestamps)).await;
        let (reader, out, caught_up) = match read {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(id = %f.id, "reading logs: {e}");
                return None;
            }
            Err(e) => {
                tracing::warn!(id = %f.id, "reading logs: {e}");
                return None;
            }
        };
        f.reader = Some(reader);
        if caught_up && last {
            f.done = true;
        }
        if !out.is_empty() {
            return Some((Ok(Bytes::from(out)), f));
        }
        if f.done {
            return None;
        }
        if caught_up {
            f.wait().await;
        }
    }
}

/// Reads records into NDJSON up to [`CHUNK_BYTES`]; true when the reader has caught up with the log.
#[allow(clippy::type_complexity)]
fn read_chunk(
    mut reader: LogReader,
    filter: StreamFilter,
    timestamps: bool,
) -> Result<(LogReader, Vec<u8>, bool), LogError> {
    let mut out = Vec::new();
    loop {
        if out.len() >= CHUNK_BYTES {
            return Ok((reader, out, false));
        }
        match reader.next_record()? {
            None => return Ok((reader, out, true)),
            Some(r) if filter.allows(r.stream) => encode_entry(&mut out, &r, timestamps),
            Some(_) => {}
        }
    }
}

/// One record as a [`LogEntry`] line: text when it is UTF-8, else base64.
fn encode_entry(out: &mut Vec<u8>, r: &Record, timestamps: bool) {
    use base64::Engine as _;
    let (data, encoding) = match std::str::from_utf8(&r.data) {
        Ok(s) => (s.to_owned(), OutputEncoding::Utf8),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(&r.data),
            OutputEncoding::Base64,
        ),
    };
    let entry = LogEntry {
        stream: r.stream.as_str().to_owned(),
        data,
        encoding,
        timestamp: timestamps.then(|| crate::time::rfc3339_nanos(r.timestamp_ns)),
    };
    if serde_json::to_writer(&mut *out, &entry).is_ok() {
        out.push(b'\n');
    }
}

/// An inotify instance watching one directory, registered with tokio.
struct Watcher {
    fd: AsyncFd<InotifyFd>,
}

struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl Watcher {
    fn new(dir: &FsPath) -> std::io::Result<Self> {
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        ino.add_watch(
            dir,
            AddWatchFlags::IN_MODIFY
                | AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_DELETE_SELF
                | AddWatchFlags::IN_MOVE_SELF,
        )?;
        // SAFETY: the AsyncFd owns the Inotify, which owns its descriptor: the descriptor stays open and
        // refers to the same inotify instance for the AsyncFd's whole life, and `as_raw_fd` always
        // returns it.
        let fd = unsafe { AsyncFd::register(InotifyFd(ino)) }?;
        Ok(Self { fd })
    }

    /// Until something happened in the directory (events are drained; which file does not matter).
    async fn wait(&self) {
        match self.fd.readable().await {
            Ok(mut guard) => {
                while guard
                    .get_inner()
                    .0
                    .read_events()
                    .is_ok_and(|v| !v.is_empty())
                {}
                guard.clear_ready();
            }
            Err(_) => std::future::pending().await,
        }
    }
}
