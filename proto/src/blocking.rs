//! The high-level client for synchronous callers: [`Sandbox`], [`Process`], [`Session`], the same API
//! as [`crate::sandbox`] without `async`.
//!
//! Each call drives the async API on a runtime shared by all blocking objects of the process (a small
//! multi-threaded tokio runtime, made on first use), so a command's output is read in the background
//! while the caller does something else. As with [`BlockingClient`], calling these from inside an async
//! runtime panics: use [`crate::sandbox`] there.
//!
//! ```no_run
//! use sandbox_proto::blocking::{Sandbox, Session};
//! use sandbox_proto::client::BlockingClient;
//! use sandbox_proto::sandbox::{ExecOptions, SandboxDefaults, SandboxError};
//!
//! # fn demo() -> Result<(), SandboxError> {
//! let client = BlockingClient::from_env()?;
//!
//! // `with Sandbox.run() as sandbox:` — stopped and deleted at the end of the closure.
//! Sandbox::scoped(&client, Vec::<String>::new(), &SandboxDefaults::default(), |sandbox| {
//!     let p = sandbox.exec(["python", "--version"], ExecOptions::new())?;
//!     println!("{}", p.result(None)?.stdout);
//!     sandbox.write_file("/data/hello.txt", b"hello")?;
//!     assert_eq!(sandbox.read_file("/data/hello.txt")?, b"hello");
//!     Ok::<_, SandboxError>(())
//! })?;
//!
//! // Lines as they are printed.
//! let sandbox = Sandbox::run(&client, Vec::<String>::new(), &SandboxDefaults::default())?;
//! let p = sandbox.exec(["python", "-u", "train.py"], ExecOptions::new())?;
//! for line in p.stdout_lines() {
//!     println!("train: {line}");
//! }
//! println!("exit {}", p.wait(None)?);
//! sandbox.close(10.0)?;
//!
//! // A session: its sandboxes start on first use and are stopped and deleted when it is dropped.
//! let session = Session::new(&client, SandboxDefaults::default().with_tag("batch-job"))?;
//! let (a, b) = (session.sandbox()?, session.sandbox()?);
//! a.exec(["echo", "a"], ExecOptions::new())?.result(None)?;
//! b.exec(["echo", "b"], ExecOptions::new())?.result(None)?;
//! drop(session);
//! # Ok(()) }
//! ```

use std::future::Future;
use std::io::{Read, Write};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::runtime::Runtime;

use crate::client::{BlockingClient, ClientError};
use crate::sandbox::{self as asyncsb, ExecOptions, ProcessResult, SandboxDefaults, SandboxError};
use crate::types::{CreateSandboxRequest, FileInfo, LogEntry, SandboxInfo, SandboxStatus};

/// Size of the chunks a blocking reader is read in by [`Sandbox::write_file_from`].
const CHUNK: usize = 256 * 1024;

/// The runtime every blocking object uses.
fn runtime() -> Result<&'static Runtime, SandboxError> {
    static RT: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sandboxd-client")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| {
        ClientError::Io(std::io::Error::other(format!(
            "cannot start the client's runtime: {e}"
        )))
        .into()
    })
}

/// Runs `fut` to completion from `Drop`: blocking when outside a runtime, else in the background.
fn finish_in_background<F>(rt: &'static Runtime, fut: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    if tokio::runtime::Handle::try_current().is_ok() {
        rt.spawn(fut);
    } else {
        rt.block_on(fut);
    }
}

// ------------------------------------------------------------------------------------------ sandbox

/// A sandbox (blocking); see [`crate::sandbox::Sandbox`] for the full story.
///
/// Dropping a `Sandbox` does not stop it: call [`Sandbox::stop`] or [`Sandbox::close`], use
/// [`Sandbox::scoped`], or create it through a [`Session`]. Clones are handles to the same sandbox.
#[derive(Debug, Clone)]
pub struct Sandbox {
    inner: asyncsb::Sandbox,
    rt: &'static Runtime,
}

impl Sandbox {
    /// Wraps an async sandbox handle.
    pub fn from_async(inner: asyncsb::Sandbox) -> Result<Self, SandboxError> {
        Ok(Self {
            inner,
            rt: runtime()?,
        })
    }

    /// The async handle of this sandbox.
    pub fn as_async(&self) -> &asyncsb::Sandbox {
        &self.inner
    }

    /// An unstarted sandbox; see [`crate::sandbox::Sandbox::new`].
    pub fn new<I, S>(
        client: &BlockingClient,
        command: I,
        defaults: &SandboxDefaults,
    ) -> Result<Self, SandboxError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::from_async(asyncsb::Sandbox::new(client.client(), command, defaults))
    }

    /// An unstarted sandbox for a create request of your own.
    pub fn from_request(
        client: &BlockingClient,
        request: CreateSandboxRequest,
    ) -> Result<Self, SandboxError> {
        Self::from_async(asyncsb::Sandbox::from_request(client.client(), request))
    }

    /// Creates and starts a sandbox; see [`crate::sandbox::Sandbox::run`].
    pub fn run<I, S>(
        client: &BlockingClient,
        command: I,
        defaults: &SandboxDefaults,
    ) -> Result<Self, SandboxError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let sb = Self::new(client, command, defaults)?;
        sb.start()?;
        Ok(sb)
    }

    /// Runs a sandbox, hands it to `f`, then stops and deletes it, also when `f` fails or panics (the
    /// `with Sandbox.run(...) as sandbox:` of Python). An error of the clean-up is answered only when
    /// `f` succeeded.
    pub fn scoped<I, S, F, R, E>(
        client: &BlockingClient,
        command: I,
        defaults: &SandboxDefaults,
        f: F,
    ) -> Result<R, E>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
        F: FnOnce(&Sandbox) -> Result<R, E>,
        E: From<SandboxError>,
    {
        /// Ends the sandbox if `f` panics.
        struct Guard(Option<(&'static Runtime, asyncsb::Sandbox)>);
        impl Drop for Guard {
            fn drop(&mut self) {
                if let Some((rt, sb)) = self.0.take() {
                    finish_in_background(rt, async move {
                        let _ = sb.close(asyncsb::DEFAULT_GRACE_SECONDS).await;
                    });
                }
            }
        }
        let sb = Self::run(client, command, defaults)?;
        let mut guard = Guard(Some((sb.rt, sb.inner.clone())));
        let r = f(&sb);
        guard.0 = None;
        let cleanup = sb.close(asyncsb::DEFAULT_GRACE_SECONDS);
        let v = r?;
        cleanup?;
        Ok(v)
    }

    /// Starts the sandbox (once) and answers its id; see [`crate::sandbox::Sandbox::start`].
    pub fn start(&self) -> Result<String, SandboxError> {
        self.rt
            .block_on(async { self.inner.start().await.map(str::to_owned) })
    }

    /// The id, once the sandbox has been created.
    pub fn sandbox_id(&self) -> Option<&str> {
        self.inner.sandbox_id()
    }

    /// True once a creation was asked for.
    pub fn is_started(&self) -> bool {
        self.inner.is_started()
    }

    /// The create request.
    pub fn request(&self) -> &CreateSandboxRequest {
        self.inner.request()
    }

    /// The state the daemon last answered (no call is made).
    pub fn last_info(&self) -> Option<SandboxInfo> {
        self.inner.last_info()
    }

    /// The main process's exit status once the sandbox has ended (from the last known state).
    pub fn returncode(&self) -> Option<i32> {
        self.inner.returncode()
    }

    /// The current state, fetched; `None` if never started.
    pub fn info(&self) -> Result<Option<SandboxInfo>, SandboxError> {
        self.rt.block_on(self.inner.info())
    }

    /// The current state; `None` if never started.
    pub fn status(&self) -> Result<Option<SandboxStatus>, SandboxError> {
        self.rt.block_on(self.inner.status())
    }

    /// Starts the sandbox if needed and waits until it is RUNNING; see
    /// [`crate::sandbox::Sandbox::wait`].
    pub fn wait(&self, timeout: Option<Duration>) -> Result<SandboxInfo, SandboxError> {
        self.rt.block_on(self.inner.wait(timeout))
    }

    /// Waits until the sandbox has ended; see [`crate::sandbox::Sandbox::wait_until_complete`].
    pub fn wait_until_complete(
        &self,
        timeout: Option<Duration>,
        raise_on_termination: bool,
    ) -> Result<SandboxInfo, SandboxError> {
        self.rt.block_on(
            self.inner
                .wait_until_complete(timeout, raise_on_termination),
        )
    }

    /// Runs a command; see [`crate::sandbox::Sandbox::exec`].
    pub fn exec<I, S>(&self, command: I, opts: ExecOptions) -> Result<Process, SandboxError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let inner = self.rt.block_on(self.inner.exec(command, opts))?;
        Ok(Process { inner, rt: self.rt })
    }

    /// Reads a whole file.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>, SandboxError> {
        self.rt.block_on(self.inner.read_file(path))
    }

    /// Streams a file into `out` (a file, stdout) as it is read.
    pub fn read_file_to<W: Write>(&self, path: &str, mut out: W) -> Result<FileInfo, SandboxError> {
        let info = self
            .rt
            .block_on(self.inner.read_file_to(path, SyncWriter(&mut out)))?;
        out.flush().map_err(ClientError::Io)?;
        Ok(info)
    }

    /// Writes a whole file, replacing it atomically.
    pub fn write_file(
        &self,
        path: &str,
        contents: impl AsRef<[u8]>,
    ) -> Result<FileInfo, SandboxError> {
        self.rt.block_on(self.inner.write_file(path, contents))
    }

    /// [`Sandbox::write_file`] with the file's permission bits.
    pub fn write_file_with_mode(
        &self,
        path: &str,
        contents: impl AsRef<[u8]>,
        mode: Option<u32>,
    ) -> Result<FileInfo, SandboxError> {
        self.rt
            .block_on(self.inner.write_file_with_mode(path, contents, mode))
    }

    /// Writes a file from a blocking `reader` (read on a thread of its own, sent as it is read). A
    /// read error aborts the upload: the file in the sandbox stays as it was.
    pub fn write_file_from<R: Read + Send + 'static>(
        &self,
        path: &str,
        mut reader: R,
        mode: Option<u32>,
    ) -> Result<FileInfo, SandboxError> {
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
        // Not joined: a reader blocked on input must not hold up the answer.
        std::thread::spawn(move || loop {
            let mut buf = vec![0u8; CHUNK];
            match reader.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.blocking_send(Ok(buf)).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        });
        let reader = ChannelReader {
            rx,
            cur: Vec::new(),
            off: 0,
        };
        self.rt
            .block_on(self.inner.write_file_from(path, reader, mode))
    }

    /// The main process's output as an iterator of lines; see
    /// [`crate::sandbox::Sandbox::stream_logs`].
    pub fn stream_logs(
        &self,
        follow: bool,
        tail_lines: Option<u64>,
        timestamps: bool,
    ) -> Result<Logs, SandboxError> {
        let inner = self
            .rt
            .block_on(self.inner.stream_logs(follow, tail_lines, timestamps))?;
        Ok(Logs { inner, rt: self.rt })
    }

    /// Stops the sandbox; see [`crate::sandbox::Sandbox::stop`].
    pub fn stop(
        &self,
        graceful_shutdown_seconds: f64,
        missing_ok: bool,
    ) -> Result<Option<SandboxInfo>, SandboxError> {
        self.rt
            .block_on(self.inner.stop(graceful_shutdown_seconds, missing_ok))
    }

    /// Deletes this sandbox (the instance form of [`Sandbox::delete`]).
    pub fn remove(&self, missing_ok: bool) -> Result<(), SandboxError> {
        self.rt.block_on(self.inner.remove(missing_ok))
    }

    /// Stops and deletes the sandbox (a sandbox already gone is fine).
    pub fn close(&self, graceful_shutdown_seconds: f64) -> Result<(), SandboxError> {
        self.rt
            .block_on(self.inner.close(graceful_shutdown_seconds))
    }

    /// Deletes the sandbox with this id or name; see [`crate::sandbox::Sandbox::delete`].
    pub fn delete(client: &BlockingClient, id: &str, missing_ok: bool) -> Result<(), SandboxError> {
        runtime()?.block_on(asyncsb::Sandbox::delete(client.client(), id, missing_ok))
    }

    /// The existing sandbox with this id or name.
    pub fn from_id(client: &BlockingClient, id: &str) -> Result<Self, SandboxError> {
        let rt = runtime()?;
        let inner = rt.block_on(asyncsb::Sandbox::from_id(client.client(), id))?;
        Ok(Self { inner, rt })
    }

    /// The sandboxes carrying every one of `tags`, in one of `status` (any when empty).
    pub fn list(
        client: &BlockingClient,
        tags: &[&str],
        status: &[SandboxStatus],
    ) -> Result<Vec<Self>, SandboxError> {
        let rt = runtime()?;
        let l = rt.block_on(asyncsb::Sandbox::list(client.client(), tags, status))?;
        Ok(l.into_iter().map(|inner| Self { inner, rt }).collect())
    }
}

/// A blocking writer seen as an async one (written to on the thread that drives the future).
struct SyncWriter<'a, W: Write>(&'a mut W);

impl<W: Write> AsyncWrite for SyncWriter<'_, W> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(self.get_mut().0.write(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(self.get_mut().0.flush())
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(self.get_mut().0.flush())
    }
}

/// Chunks from a reading thread seen as an async reader.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    off: usize,
}

impl AsyncRead for ChannelReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        loop {
            if me.off < me.cur.len() {
                let n = buf.remaining().min(me.cur.len() - me.off);
                buf.put_slice(&me.cur[me.off..me.off + n]);
                me.off += n;
                return Poll::Ready(Ok(()));
            }
            match me.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(Some(Ok(chunk))) => {
                    me.cur = chunk;
                    me.off = 0;
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------ process

/// A command running in a sandbox (blocking); see [`crate::sandbox::Process`]. Its output is read in
/// the background; dropping it does not stop the command ([`Process::cancel`] does).
#[derive(Debug)]
pub struct Process {
    inner: asyncsb::Process,
    rt: &'static Runtime,
}

impl Process {
    /// The argv.
    pub fn command(&self) -> &[String] {
        self.inner.command()
    }

    /// Host pid of the command.
    pub fn pid(&self) -> i32 {
        self.inner.pid()
    }

    /// The command's stdin, when it was started with [`ExecOptions::stdin`] (or a TTY).
    pub fn stdin(&self) -> Option<Stdin> {
        self.inner.stdin().map(|s| Stdin {
            inner: s.clone(),
            rt: self.rt,
        })
    }

    /// True once the command has exited (or its stream failed).
    pub fn is_done(&self) -> bool {
        self.inner.is_done()
    }

    /// The exit status if the command has exited, without waiting.
    pub fn poll(&self) -> Result<Option<i32>, SandboxError> {
        self.inner.poll()
    }

    /// The exit status once the command has exited.
    pub fn returncode(&self) -> Option<i32> {
        self.inner.returncode()
    }

    /// Waits for the exit and answers the exit status; see [`crate::sandbox::Process::wait`].
    pub fn wait(&self, timeout: Option<Duration>) -> Result<i32, SandboxError> {
        self.rt.block_on(self.inner.wait(timeout))
    }

    /// Waits for the exit and answers the result; see [`crate::sandbox::Process::result`].
    pub fn result(&self, timeout: Option<Duration>) -> Result<ProcessResult, SandboxError> {
        self.rt.block_on(self.inner.result(timeout))
    }

    /// Kills the command's process tree.
    pub fn cancel(&self) -> Result<(), SandboxError> {
        self.rt.block_on(self.inner.cancel())
    }

    /// Sends `signal` to the command.
    pub fn send_signal(&self, signal: i32) -> Result<(), SandboxError> {
        self.rt.block_on(self.inner.send_signal(signal))
    }

    /// Resizes the command's terminal.
    pub fn resize(&self, width: u16, height: u16) -> Result<(), SandboxError> {
        self.rt.block_on(self.inner.resize(width, height))
    }

    /// The next stdout line (without its `\n`) as it arrives; `None` at the end.
    pub fn next_stdout_line(&mut self) -> Option<String> {
        self.rt.block_on(self.inner.next_stdout_line())
    }

    /// The next stderr line; `None` at the end.
    pub fn next_stderr_line(&mut self) -> Option<String> {
        self.rt.block_on(self.inner.next_stderr_line())
    }

    /// An iterator of stdout lines as they arrive (`for line in p.stdout_lines()`).
    pub fn stdout_lines(&self) -> Lines {
        Lines {
            inner: self.inner.stdout_lines(),
            rt: self.rt,
        }
    }

    /// An iterator of stderr lines as they arrive.
    pub fn stderr_lines(&self) -> Lines {
        Lines {
            inner: self.inner.stderr_lines(),
            rt: self.rt,
        }
    }
}

/// Lines of a command's output as they arrive (see [`Process::stdout_lines`]).
#[derive(Debug)]
pub struct Lines {
    inner: asyncsb::LineStream,
    rt: &'static Runtime,
}

impl Iterator for Lines {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        self.rt.block_on(self.inner.next())
    }
}

/// The stdin of a [`Process`].
#[derive(Debug, Clone)]
pub struct Stdin {
    inner: asyncsb::Stdin,
    rt: &'static Runtime,
}

impl Stdin {
    /// Writes bytes.
    pub fn write(&self, data: impl AsRef<[u8]>) -> Result<(), SandboxError> {
        self.rt.block_on(self.inner.write(data))
    }

    /// Writes `text` and a newline.
    pub fn writeline(&self, text: &str) -> Result<(), SandboxError> {
        self.rt.block_on(self.inner.writeline(text))
    }

    /// Ends the input.
    pub fn close(&self) -> Result<(), SandboxError> {
        self.rt.block_on(self.inner.close())
    }
}

/// The main process's output (see [`Sandbox::stream_logs`]): an iterator of text lines (prefixed with
/// their timestamps when asked for).
#[derive(Debug)]
pub struct Logs {
    inner: asyncsb::Logs,
    rt: &'static Runtime,
}

impl Logs {
    /// The next raw record instead of a line.
    pub fn next_entry(&mut self) -> Option<Result<LogEntry, SandboxError>> {
        self.rt.block_on(self.inner.next_entry())
    }
}

impl Iterator for Logs {
    type Item = Result<String, SandboxError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rt.block_on(self.inner.next_line())
    }
}

// ------------------------------------------------------------------------------------------ session

/// A session (blocking); see [`crate::sandbox::Session`]. Dropping it closes it (stops and deletes
/// every sandbox it started, errors ignored); [`Session::close`] does so reporting errors.
#[derive(Debug)]
pub struct Session {
    inner: Arc<asyncsb::Session>,
    rt: &'static Runtime,
    closed: bool,
}

impl Session {
    /// A session creating its sandboxes with `defaults`.
    pub fn new(client: &BlockingClient, defaults: SandboxDefaults) -> Result<Self, SandboxError> {
        Ok(Self {
            inner: Arc::new(asyncsb::Session::new(client.client(), defaults)),
            rt: runtime()?,
            closed: false,
        })
    }

    /// The session's id.
    pub fn session_id(&self) -> &str {
        self.inner.session_id()
    }

    /// The defaults of the session's sandboxes.
    pub fn defaults(&self) -> &SandboxDefaults {
        self.inner.defaults()
    }

    /// The sandboxes the session made or adopted.
    pub fn sandboxes(&self) -> Vec<Sandbox> {
        self.wrap(self.inner.sandboxes())
    }

    fn wrap(&self, v: Vec<asyncsb::Sandbox>) -> Vec<Sandbox> {
        v.into_iter()
            .map(|inner| Sandbox { inner, rt: self.rt })
            .collect()
    }

    /// An unstarted sandbox with the session's defaults; it starts on its first operation.
    pub fn sandbox(&self) -> Result<Sandbox, SandboxError> {
        self.sandbox_with(|d| d)
    }

    /// An unstarted sandbox with the session's defaults as changed by `overrides`.
    pub fn sandbox_with(
        &self,
        overrides: impl FnOnce(SandboxDefaults) -> SandboxDefaults,
    ) -> Result<Sandbox, SandboxError> {
        Ok(Sandbox {
            inner: self.inner.sandbox_with(overrides)?,
            rt: self.rt,
        })
    }

    /// The started sandboxes of this session that still exist.
    pub fn list(&self) -> Result<Vec<Sandbox>, SandboxError> {
        Ok(self.wrap(self.rt.block_on(self.inner.list())?))
    }

    /// [`Session::list`], filtered by tags and states.
    pub fn list_filtered(
        &self,
        tags: &[&str],
        status: &[SandboxStatus],
    ) -> Result<Vec<Sandbox>, SandboxError> {
        Ok(self.wrap(self.rt.block_on(self.inner.list_filtered(tags, status))?))
    }

    /// An existing sandbox, adopted by the session.
    pub fn from_id(&self, id: &str) -> Result<Sandbox, SandboxError> {
        Ok(Sandbox {
            inner: self.rt.block_on(self.inner.from_id(id))?,
            rt: self.rt,
        })
    }

    /// Stops and deletes every sandbox the session started; see [`crate::sandbox::Session::close`].
    pub fn close(&mut self) -> Result<(), SandboxError> {
        self.closed = true;
        self.rt.block_on(self.inner.close())
    }

    /// [`Session::close`] with another grace period.
    pub fn close_with_grace(&mut self, graceful_shutdown_seconds: f64) -> Result<(), SandboxError> {
        self.closed = true;
        self.rt
            .block_on(self.inner.close_with_grace(graceful_shutdown_seconds))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let inner = self.inner.clone();
        finish_in_background(self.rt, async move {
            let _ = inner.close().await;
        });
    }
}
