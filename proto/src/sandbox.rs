//! The high-level async client, shaped like the Python client (`sandboxd`) and the hosted product's API:
//! [`Sandbox`], [`Process`], [`ProcessResult`], [`Session`], [`SandboxDefaults`] and [`SandboxError`].
//! [`crate::blocking`] has the same API for synchronous callers.
//!
//! Everything runs on the caller's tokio runtime; a [`Process`] spawns one task that reads its
//! output. The daemon is reached through a low-level [`Client`].
//!
//! ```no_run
//! use sandbox_proto::client::Client;
//! use sandbox_proto::sandbox::{ExecOptions, Sandbox, SandboxDefaults, SandboxError, Session};
//!
//! # async fn demo() -> Result<(), SandboxError> {
//! let client = Client::from_env();
//!
//! // One sandbox, idle until stopped; commands run in it with exec.
//! let sandbox = Sandbox::run(&client, Vec::<String>::new(), &SandboxDefaults::default()).await?;
//! let r = sandbox.exec(["python", "--version"], ExecOptions::new()).await?.result(None).await?;
//! println!("{}", r.stdout);
//! sandbox.write_file("/data/hello.txt", b"hello").await?;
//! assert_eq!(sandbox.read_file("/data/hello.txt").await?, b"hello");
//! match sandbox.exec(["python", "might_fail.py"], ExecOptions::new().with_check(true)).await?.result(None).await {
//!     Err(SandboxError::Execution { result, .. }) => eprintln!("failed with {}", result.returncode),
//!     other => { other?; }
//! }
//! sandbox.stop(10.0, false).await?;
//!
//! // A batch job: the main process runs to its end.
//! let job = Sandbox::run(&client, ["python", "-c", "print(42)"], &SandboxDefaults::default()).await?;
//! job.wait_until_complete(Some(std::time::Duration::from_secs(3600)), true).await?;
//! println!("exit code {:?}", job.returncode());
//!
//! // Sandboxes that start on first use and are stopped and deleted with the session.
//! let defaults = SandboxDefaults::default().with_max_lifetime_seconds(300.0).with_tag("batch-job");
//! let session = Session::new(&client, defaults);
//! let (a, b) = (session.sandbox()?, session.sandbox()?);
//! a.exec(["echo", "a"], ExecOptions::new()).await?.result(None).await?;
//! b.exec(["echo", "b"], ExecOptions::new()).await?.result(None).await?;
//! session.close().await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OnceCell;

use crate::client::{Client, ClientError, LogStreamOptions};
use crate::types::{
    CreateSandboxRequest, FileInfo, SandboxInfo, SandboxStatus, WaitCondition, WaitRequest,
};

mod defaults;
mod error;
mod process;
mod session;

pub use defaults::{SandboxDefaults, DEFAULT_CONTAINER_IMAGE};
pub use error::{
    SandboxError, CLIENT_TIMEOUT, EXECUTION_ERROR, EXEC_TIMEOUT, SANDBOX_FAILED,
    SANDBOX_TERMINATED, SESSION_CLOSED,
};
pub use process::{
    ExecOptions, LineStream, Logs, Process, ProcessResult, Stdin, DEFAULT_MAX_OUTPUT_BYTES,
    ITER_WINDOW, MAX_LINE,
};
pub use session::{Session, SESSION_ANNOTATION};

/// Seconds between SIGTERM and SIGKILL of [`Sandbox::stop`] in the hosted product's default.
pub const DEFAULT_GRACE_SECONDS: f64 = 10.0;

/// Runs `fut`, failing with a [`CLIENT_TIMEOUT`] after `timeout` (when given).
async fn within<T>(
    timeout: Option<Duration>,
    what: &str,
    fut: impl Future<Output = Result<T, SandboxError>>,
) -> Result<T, SandboxError> {
    match timeout {
        None => fut.await,
        Some(t) => tokio::time::timeout(t, fut).await.map_err(|_| {
            SandboxError::client_timeout(format!("{what} did not finish within {t:?}"))
        })?,
    }
}

fn argv<I, S>(command: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    command.into_iter().map(Into::into).collect()
}

#[derive(Debug)]
struct Inner {
    client: Client,
    request: CreateSandboxRequest,
    /// The id, once the daemon created the sandbox.
    id: OnceCell<String>,
    /// A creation was asked for (it may still be under way).
    started: AtomicBool,
    /// The last state the daemon answered.
    info: Mutex<Option<SandboxInfo>>,
}

impl Inner {
    fn set_info(&self, info: SandboxInfo) {
        *self.info.lock().unwrap_or_else(|e| e.into_inner()) = Some(info);
    }

    fn cached(&self) -> Option<SandboxInfo> {
        self.info.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A sandbox managed by sandboxd.
///
/// Made by [`Sandbox::run`] (started at once), [`Sandbox::new`] or [`Session::sandbox`] (started on
/// first use: [`Sandbox::exec`], [`Sandbox::read_file`], [`Sandbox::write_file`], [`Sandbox::wait`],
/// [`Sandbox::wait_until_complete`], [`Sandbox::stream_logs`]), or found with [`Sandbox::from_id`] and
/// [`Sandbox::list`]. Clones are handles to the same sandbox. Dropping a `Sandbox` leaves it running:
/// [`Sandbox::stop`] and [`Sandbox::remove`] end it (or use [`Sandbox::scoped`], or a [`Session`]).
#[derive(Debug, Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

impl Sandbox {
    /// An unstarted sandbox running `command` (empty: the defaults' command, else it idles) with
    /// `defaults`; the first operation starts it.
    pub fn new<I, S>(client: &Client, command: I, defaults: &SandboxDefaults) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::from_request(client, defaults.to_request(argv(command)))
    }

    /// An unstarted sandbox for a create request of your own.
    pub fn from_request(client: &Client, request: CreateSandboxRequest) -> Self {
        Self {
            inner: Arc::new(Inner {
                client: client.clone(),
                request,
                id: OnceCell::new(),
                started: AtomicBool::new(false),
                info: Mutex::new(None),
            }),
        }
    }

    fn from_info(client: &Client, info: SandboxInfo) -> Self {
        let request = CreateSandboxRequest {
            image: info.image.clone(),
            ..CreateSandboxRequest::default()
        };
        Self {
            inner: Arc::new(Inner {
                client: client.clone(),
                request,
                id: OnceCell::new_with(Some(info.id.clone())),
                started: AtomicBool::new(true),
                info: Mutex::new(Some(info)),
            }),
        }
    }

    /// Creates and starts a sandbox running `command` (empty: the defaults' command; none: it idles
    /// until stopped). Answers once the daemon has created it (RUNNING, or already ended).
    pub async fn run<I, S>(
        client: &Client,
        command: I,
        defaults: &SandboxDefaults,
    ) -> Result<Self, SandboxError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let sb = Self::new(client, command, defaults);
        sb.start().await?;
        Ok(sb)
    }

    /// Runs a sandbox, hands it to `f`, then stops and deletes it, whatever `f` answered (the async
    /// `with Sandbox.run(...) as sandbox:`). An error of the clean-up is answered only when `f`
    /// succeeded.
    pub async fn scoped<I, S, F, Fut, R, E>(
        client: &Client,
        command: I,
        defaults: &SandboxDefaults,
        f: F,
    ) -> Result<R, E>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
        F: FnOnce(Sandbox) -> Fut,
        Fut: Future<Output = Result<R, E>>,
        E: From<SandboxError>,
    {
        let sb = Self::run(client, command, defaults).await?;
        let r = f(sb.clone()).await;
        let cleanup = sb.close(DEFAULT_GRACE_SECONDS).await;
        let v = r?;
        cleanup?;
        Ok(v)
    }

    /// Starts the sandbox (once; concurrent and later calls share the one creation) and answers its
    /// id. A failed creation is not remembered: the next operation tries again.
    pub async fn start(&self) -> Result<&str, SandboxError> {
        if let Some(id) = self.inner.id.get() {
            return Ok(id);
        }
        self.inner.started.store(true, Ordering::SeqCst);
        // The creation runs in a task of its own: a caller that gives up (a timeout) does not abort
        // it, so a sandbox the daemon created is always known here (and stopped by its session).
        let inner = self.inner.clone();
        let task = tokio::spawn(async move {
            inner
                .id
                .get_or_try_init(|| async {
                    let info = inner.client.create(&inner.request).await?;
                    let id = info.id.clone();
                    inner.set_info(info);
                    Ok::<_, SandboxError>(id)
                })
                .await
                .map(|_| ())
        });
        task.await
            .map_err(|e| ClientError::Protocol(format!("the creation task failed: {e}")))??;
        self.inner
            .id
            .get()
            .map(String::as_str)
            .ok_or_else(|| ClientError::Protocol("the sandbox has no id".into()).into())
    }

    /// The id, once the sandbox has been created.
    pub fn sandbox_id(&self) -> Option<&str> {
        self.inner.id.get().map(String::as_str)
    }

    /// True once a creation was asked for (by [`Sandbox::run`] or a first operation).
    pub fn is_started(&self) -> bool {
        self.inner.started.load(Ordering::SeqCst)
    }

    /// The create request this sandbox was (or will be) created with.
    pub fn request(&self) -> &CreateSandboxRequest {
        &self.inner.request
    }

    /// The state the daemon last answered (no call is made); `None` before creation.
    pub fn last_info(&self) -> Option<SandboxInfo> {
        self.inner.cached()
    }

    /// The main process's exit status once the sandbox has ended (the code, or 128 + signal), from the
    /// last known state (e.g. after [`Sandbox::wait_until_complete`]); `None` while it runs.
    pub fn returncode(&self) -> Option<i32> {
        let info = self.inner.cached()?;
        if !info.status.is_terminal() {
            return None;
        }
        info.exit.map(|e| e.shell_status())
    }

    /// The sandbox's current state, fetched (or the last one, once terminal); `None` if it was never
    /// started.
    pub async fn info(&self) -> Result<Option<SandboxInfo>, SandboxError> {
        if !self.is_started() {
            return Ok(None);
        }
        let id = self.start().await?;
        if let Some(i) = self.inner.cached() {
            if i.status.is_terminal() {
                return Ok(Some(i));
            }
        }
        let info = self
            .inner
            .client
            .get(id)
            .await
            .map_err(|e| SandboxError::from(e).with_sandbox_id(id))?;
        self.inner.set_info(info.clone());
        Ok(Some(info))
    }

    /// The current state; `None` if never started.
    pub async fn status(&self) -> Result<Option<SandboxStatus>, SandboxError> {
        Ok(self.info().await?.map(|i| i.status))
    }

    async fn wait_for(
        &self,
        condition: WaitCondition,
        deadline: Option<Instant>,
    ) -> Result<SandboxInfo, SandboxError> {
        let id = self.start().await?;
        let timeout_seconds = deadline.map(|d| {
            d.saturating_duration_since(Instant::now())
                .as_secs_f64()
                .max(0.001)
        });
        let info = self
            .inner
            .client
            .wait(
                id,
                WaitRequest {
                    condition,
                    timeout_seconds,
                },
            )
            .await
            .map_err(|e| SandboxError::from(e).with_sandbox_id(id))?;
        self.inner.set_info(info.clone());
        Ok(info)
    }

    /// Starts the sandbox if needed and waits until it is RUNNING (or has already ended).
    ///
    /// Fails with [`SandboxError::Timeout`] after `timeout`, [`SandboxError::Failed`] if it FAILED, or
    /// the creation error.
    pub async fn wait(&self, timeout: Option<Duration>) -> Result<SandboxInfo, SandboxError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        within(timeout, "starting the sandbox", self.start()).await?;
        let info = self.wait_for(WaitCondition::Running, deadline).await?;
        if info.status == SandboxStatus::Failed {
            return Err(failed(info));
        }
        Ok(info)
    }

    /// Starts the sandbox if needed and waits until it has ended (COMPLETED, FAILED or TERMINATED);
    /// answers its final state ([`Sandbox::returncode`] is then set).
    ///
    /// Fails with [`SandboxError::Timeout`] after `timeout`, [`SandboxError::Failed`] if it FAILED (the
    /// error carries the final state) and, with `raise_on_termination`, [`SandboxError::Terminated`] if
    /// it was stopped.
    pub async fn wait_until_complete(
        &self,
        timeout: Option<Duration>,
        raise_on_termination: bool,
    ) -> Result<SandboxInfo, SandboxError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        within(timeout, "starting the sandbox", self.start()).await?;
        let info = self.wait_for(WaitCondition::Exited, deadline).await?;
        match info.status {
            SandboxStatus::Failed => Err(failed(info)),
            SandboxStatus::Terminated if raise_on_termination => {
                let reason = info
                    .status_reason
                    .clone()
                    .unwrap_or_else(|| "stopped".into());
                Err(SandboxError::Terminated {
                    code: SANDBOX_TERMINATED.to_owned(),
                    message: format!("sandbox {} was terminated: {reason}", info.id),
                    info: Some(Box::new(info)),
                })
            }
            _ => Ok(info),
        }
    }

    /// Runs a command in the sandbox (starting the sandbox if needed); answers once it runs. Its output
    /// streams in as it is written; [`Process::result`] waits for the end.
    ///
    /// Fails at once with [`SandboxError::NotRunning`] when the sandbox has ended,
    /// [`SandboxError::Validation`] for a bad command, cwd or user.
    pub async fn exec<I, S>(&self, command: I, opts: ExecOptions) -> Result<Process, SandboxError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let command = argv(command);
        if command.is_empty() {
            return Err(SandboxError::Validation {
                code: crate::ErrorCode::InvalidArgument.as_str().to_owned(),
                message: "the command is empty".into(),
                field: Some("command".into()),
            });
        }
        let id = self.start().await?;
        let init = opts.init(command.clone());
        let (stream, ready) = self
            .inner
            .client
            .exec_stream(id, &init)
            .await
            .map_err(|e| SandboxError::from(e).with_sandbox_id(id))?;
        let (rd, wr) = stream.into_split();
        Ok(Process::start(rd, wr, ready.pid, command, &opts))
    }

    /// Reads a whole file (starting the sandbox if needed). A missing file is
    /// [`SandboxError::File`] (`FILE_NOT_FOUND`). See [`Sandbox::read_file_to`] for large files.
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, SandboxError> {
        let id = self.start().await?;
        self.inner
            .client
            .read_file(id, path)
            .await
            .map_err(|e| SandboxError::from(e).with_sandbox_id(id).with_path(path))
    }

    /// Streams a file into `out` as it is read; answers its path, size and mode.
    pub async fn read_file_to<W: AsyncWrite + Unpin>(
        &self,
        path: &str,
        out: W,
    ) -> Result<FileInfo, SandboxError> {
        let id = self.start().await?;
        self.inner
            .client
            .read_file_to(id, path, out)
            .await
            .map_err(|e| SandboxError::from(e).with_sandbox_id(id).with_path(path))
    }

    /// Writes a whole file, replacing it atomically (missing parent directories are created; mode
    /// `0644` for a new file, else the file's own).
    pub async fn write_file(
        &self,
        path: &str,
        contents: impl AsRef<[u8]>,
    ) -> Result<FileInfo, SandboxError> {
        self.write_file_with_mode(path, contents, None).await
    }

    /// [`Sandbox::write_file`] with the file's permission bits.
    pub async fn write_file_with_mode(
        &self,
        path: &str,
        contents: impl AsRef<[u8]>,
        mode: Option<u32>,
    ) -> Result<FileInfo, SandboxError> {
        let id = self.start().await?;
        self.inner
            .client
            .write_file(id, path, contents.as_ref(), mode)
            .await
            .map_err(|e| SandboxError::from(e).with_sandbox_id(id).with_path(path))
    }

    /// Writes a file from `reader`, sent as it is read (memory stays bounded); the file is replaced
    /// only once everything arrived.
    pub async fn write_file_from<R: AsyncRead + Send + 'static>(
        &self,
        path: &str,
        reader: R,
        mode: Option<u32>,
    ) -> Result<FileInfo, SandboxError> {
        let id = self.start().await?;
        self.inner
            .client
            .write_file_from(id, path, reader, mode)
            .await
            .map_err(|e| SandboxError::from(e).with_sandbox_id(id).with_path(path))
    }

    /// The main process's stdout and stderr (starting the sandbox if needed).
    ///
    /// `follow`: go on until the sandbox has ended; `tail_lines`: start with the last lines only;
    /// `timestamps`: each record carries the time the daemon read it.
    pub async fn stream_logs(
        &self,
        follow: bool,
        tail_lines: Option<u64>,
        timestamps: bool,
    ) -> Result<Logs, SandboxError> {
        let id = self.start().await?;
        let opts = LogStreamOptions {
            follow,
            tail_lines,
            timestamps,
            ..LogStreamOptions::default()
        };
        let s = self
            .inner
            .client
            .logs_stream(id, opts)
            .await
            .map_err(|e| SandboxError::from(e).with_sandbox_id(id))?;
        Ok(Logs::new(s, timestamps))
    }

    /// Stops the sandbox: SIGTERM to its main process, SIGKILL after `graceful_shutdown_seconds`
    /// ([`DEFAULT_GRACE_SECONDS`] in the hosted product); answers once it has ended (TERMINATED, or its
    /// own end state). A sandbox never started, or whose creation failed, has nothing to stop (`None`).
    /// `missing_ok`: no error if the daemon no longer knows it.
    pub async fn stop(
        &self,
        graceful_shutdown_seconds: f64,
        missing_ok: bool,
    ) -> Result<Option<SandboxInfo>, SandboxError> {
        let Some(id) = self.created().await else {
            return Ok(None);
        };
        match self
            .inner
            .client
            .stop(id, Some(graceful_shutdown_seconds))
            .await
            .map_err(|e| SandboxError::from(e).with_sandbox_id(id))
        {
            Ok(info) => {
                self.inner.set_info(info.clone());
                Ok(Some(info))
            }
            Err(SandboxError::NotFound { .. }) if missing_ok => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes this sandbox (killing it first if it runs): its record, writable layer and logs. The
    /// instance form of [`Sandbox::delete`]; nothing to do if it was never created.
    pub async fn remove(&self, missing_ok: bool) -> Result<(), SandboxError> {
        match self.created().await {
            Some(id) => Self::delete(&self.inner.client, id, missing_ok).await,
            None => Ok(()),
        }
    }

    /// Stops (with `graceful_shutdown_seconds`) and deletes the sandbox, as leaving a Python `with`
    /// block does; a sandbox already gone is fine.
    pub async fn close(&self, graceful_shutdown_seconds: f64) -> Result<(), SandboxError> {
        let stopped = self.stop(graceful_shutdown_seconds, true).await;
        let removed = self.remove(true).await;
        stopped?;
        removed
    }

    /// The id if the sandbox was created (waiting for a creation under way); `None` otherwise.
    async fn created(&self) -> Option<&str> {
        if !self.is_started() {
            return None;
        }
        self.start().await.ok()
    }

    /// Deletes the sandbox with this id or name, killing it first if it runs. `missing_ok`: no error
    /// if there is no such sandbox.
    pub async fn delete(client: &Client, id: &str, missing_ok: bool) -> Result<(), SandboxError> {
        match client.delete(id, true).await {
            Ok(()) => Ok(()),
            Err(e) => match SandboxError::from(e).with_sandbox_id(id) {
                SandboxError::NotFound { .. } if missing_ok => Ok(()),
                e => Err(e),
            },
        }
    }

    /// The existing sandbox with this id or name ([`SandboxError::NotFound`] if none).
    pub async fn from_id(client: &Client, id: &str) -> Result<Self, SandboxError> {
        let info = client
            .get(id)
            .await
            .map_err(|e| SandboxError::from(e).with_sandbox_id(id))?;
        Ok(Self::from_info(client, info))
    }

    /// The sandboxes carrying every one of `tags`, in one of `status` (any when empty), oldest first.
    pub async fn list(
        client: &Client,
        tags: &[&str],
        status: &[SandboxStatus],
    ) -> Result<Vec<Self>, SandboxError> {
        let l = client.list_filtered(status, tags).await?;
        Ok(l.sandboxes
            .into_iter()
            .map(|i| Self::from_info(client, i))
            .collect())
    }
}

fn failed(info: SandboxInfo) -> SandboxError {
    let reason = info
        .status_reason
        .clone()
        .or_else(|| info.exit.as_ref().map(|e| e.reason.clone()))
        .unwrap_or_else(|| "failed".into());
    SandboxError::Failed {
        code: SANDBOX_FAILED.to_owned(),
        message: format!("sandbox {} failed: {reason}", info.id),
        info: Some(Box::new(info)),
    }
}
