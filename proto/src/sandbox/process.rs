//! [`Process`]: a command running in a sandbox over a streaming exec, with live output.
//!
//! A background task reads the exec stream's frames and appends stdout and stderr to per-stream
//! buffers, from which both the line readers ([`Process::next_stdout_line`], [`Process::stdout_lines`])
//! and [`Process::result`] read.
//!
//! Memory: each stream keeps its first `max_output_bytes` (default [`DEFAULT_MAX_OUTPUT_BYTES`]) for
//! the result; beyond that the result is flagged truncated. Output past that cap is kept only while a
//! line reader is attached, and then at most [`ITER_WINDOW`] bytes ahead of it: a reader that falls
//! behind slows the command down (the daemon stops reading its pipes) instead of growing a buffer.
//! [`Process::result`] and [`Process::wait`] detach the readers, so waiting never stalls the command.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use crate::client::{ClientError, LogStream};
use crate::exec_stream::{ExecStreamReader, ExecStreamWriter, StreamEvent};
use crate::stream::{ExecExit, ExecStreamInit};
use crate::types::LogEntry;

use super::error::{SandboxError, EXECUTION_ERROR, EXEC_TIMEOUT};

/// Bytes of each of stdout and stderr that [`Process::result`] keeps by default (the rest is flagged
/// truncated).
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 16 << 20;
/// Bytes a line reader may fall behind (past the kept output) before the command is held back.
pub const ITER_WINDOW: usize = 8 << 20;
/// A line longer than this is handed out in pieces of this size.
pub const MAX_LINE: usize = 1 << 20;
/// Bytes moved from a stream's buffer into a line at a time.
const TAKE: usize = 64 << 10;

/// The outcome of a command, as the Python client's `ProcessResult`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessResult {
    /// Standard output, decoded as UTF-8 (invalid bytes replaced).
    pub stdout: String,
    /// Standard error, likewise.
    pub stderr: String,
    /// Exit status: the exit code, or 128 + the signal that killed it (137 after a timeout or
    /// [`Process::cancel`]).
    pub returncode: i32,
    /// Standard output as bytes.
    pub stdout_bytes: Vec<u8>,
    /// Standard error as bytes.
    pub stderr_bytes: Vec<u8>,
    /// The argv that ran.
    pub command: Vec<String>,
    /// Stdout was longer than `max_output_bytes`: only its start is kept.
    pub stdout_truncated: bool,
    /// Likewise for stderr.
    pub stderr_truncated: bool,
    /// Killed at `timeout_seconds`.
    pub timed_out: bool,
    /// Killed by [`Process::cancel`].
    pub cancelled: bool,
    /// The signal that killed it, if any.
    pub signal: Option<i32>,
    /// Wall time from start to exit, measured by the daemon.
    pub duration_ms: f64,
}

impl ProcessResult {
    /// True when `returncode` is 0.
    pub fn success(&self) -> bool {
        self.returncode == 0
    }

    /// [`SandboxError::Execution`] if `returncode` is not 0.
    pub fn check_returncode(&self) -> Result<(), SandboxError> {
        if self.success() {
            Ok(())
        } else {
            Err(SandboxError::Execution {
                code: EXECUTION_ERROR.to_owned(),
                message: format!(
                    "command {:?} exited with status {}",
                    self.command, self.returncode
                ),
                result: Box::new(self.clone()),
            })
        }
    }
}

/// Options of [`Sandbox::exec`](super::Sandbox::exec).
///
/// ```
/// use sandbox_proto::sandbox::ExecOptions;
///
/// let opts = ExecOptions::new()
///     .with_cwd("/tmp")
///     .with_env("LANG", "C.UTF-8")
///     .with_check(true)
///     .with_timeout_seconds(30.0)
///     .with_stdin(true);
/// assert!(opts.check && opts.stdin);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecOptions {
    /// Working directory (default: the main process's).
    pub cwd: Option<String>,
    /// Extra environment, merged over the sandbox's.
    pub env: BTreeMap<String, String>,
    /// `user[:group]` to run as (default: the main process's).
    pub user: Option<String>,
    /// Make [`Process::result`] fail with [`SandboxError::Execution`] on a non-zero exit.
    pub check: bool,
    /// The daemon kills the command's process tree after this many seconds; [`Process::result`] then
    /// fails with [`SandboxError::CommandTimeout`].
    pub timeout_seconds: Option<f64>,
    /// Give the command a stdin to write to ([`Process::stdin`]); otherwise it reads `/dev/null`.
    pub stdin: bool,
    /// Run on a pseudo-terminal (output all comes as stdout; stdin is the terminal).
    pub tty: bool,
    /// Terminal columns (default 80).
    pub width: Option<u16>,
    /// Terminal rows (default 24).
    pub height: Option<u16>,
    /// Bytes of each of stdout and stderr the result keeps (default [`DEFAULT_MAX_OUTPUT_BYTES`]).
    pub max_output_bytes: Option<usize>,
}

impl ExecOptions {
    /// No options: the main process's cwd, user and environment; no stdin; no timeout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the working directory.
    pub fn with_cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    /// Adds an environment variable.
    pub fn with_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(name.into(), value.into());
        self
    }

    /// Sets the user (`user[:group]`, names or numbers).
    pub fn with_user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Sets `check`.
    pub fn with_check(mut self, check: bool) -> Self {
        self.check = check;
        self
    }

    /// Sets the command's timeout.
    pub fn with_timeout_seconds(mut self, seconds: f64) -> Self {
        self.timeout_seconds = Some(seconds);
        self
    }

    /// Gives the command a stdin.
    pub fn with_stdin(mut self, stdin: bool) -> Self {
        self.stdin = stdin;
        self
    }

    /// Runs the command on a terminal of `width` x `height` (with a stdin).
    pub fn with_tty(mut self, width: u16, height: u16) -> Self {
        self.tty = true;
        self.stdin = true;
        self.width = Some(width);
        self.height = Some(height);
        self
    }

    /// Sets how much output the result keeps.
    pub fn with_max_output_bytes(mut self, n: usize) -> Self {
        self.max_output_bytes = Some(n);
        self
    }

    pub(crate) fn init(&self, command: Vec<String>) -> ExecStreamInit {
        ExecStreamInit {
            command,
            cwd: self.cwd.clone(),
            env: self.env.clone(),
            user: self.user.clone(),
            timeout_seconds: self.timeout_seconds,
            stdin: self.stdin || self.tty,
            tty: self.tty,
            width: self.width,
            height: self.height,
        }
    }
}

// ------------------------------------------------------------------------------------------ buffers

/// The output of one stream: the kept start (for the result) and, while a line reader is attached,
/// what comes after it up to [`ITER_WINDOW`] ahead of the reader.
#[derive(Debug, Default)]
struct OutBuf {
    /// The first `cap` bytes.
    kept: Vec<u8>,
    cap: usize,
    /// Bytes received.
    total: u64,
    /// Chunks past `cap`, from absolute offset `queue_base` (the front one from `front_off`).
    queue: VecDeque<Vec<u8>>,
    queue_base: u64,
    front_off: usize,
    queue_len: usize,
    /// Line readers attached; `detached` once the result was asked for.
    readers: usize,
    detached: bool,
    /// Absolute offset of the line reader.
    pos: u64,
    /// The line being assembled, and how much of it has been searched for a newline.
    line: Vec<u8>,
    scanned: usize,
}

impl OutBuf {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            ..Self::default()
        }
    }

    fn queueing(&self) -> bool {
        self.readers > 0 && !self.detached
    }

    /// True when the attached reader is too far behind to accept more.
    fn must_wait(&self) -> bool {
        self.queueing() && self.queue_len >= ITER_WINDOW
    }

    fn append(&mut self, data: Vec<u8>) {
        let room = self.cap.saturating_sub(self.kept.len());
        let split = room.min(data.len());
        self.kept.extend_from_slice(&data[..split]);
        let start = self.total + split as u64;
        self.total += data.len() as u64;
        if split == data.len() || !self.queueing() {
            return;
        }
        let rest = if split == 0 {
            data
        } else {
            data[split..].to_vec()
        };
        if self.queue.is_empty() {
            self.queue_base = start;
            self.front_off = 0;
        }
        self.queue_len += rest.len();
        self.queue.push_back(rest);
    }

    fn detach(&mut self) {
        self.detached = true;
        self.queue.clear();
        self.queue_len = 0;
        self.front_off = 0;
    }

    fn truncated(&self) -> bool {
        self.total > self.kept.len() as u64
    }

    /// Moves the next available bytes (at most [`TAKE`]) into `line`; false when nothing is available.
    fn pull(&mut self) -> bool {
        let kept = self.kept.len() as u64;
        if self.pos < kept {
            // `pos < kept.len()`, so both bounds fit in usize.
            let from = usize::try_from(self.pos).unwrap_or(usize::MAX);
            let to = from.saturating_add(TAKE).min(self.kept.len());
            self.line.extend_from_slice(&self.kept[from..to]);
            self.pos += (to - from) as u64;
            return true;
        }
        let Some(front) = self.queue.front() else {
            return false;
        };
        // Output dropped while no reader was attached is skipped.
        let front_start = self.queue_base;
        if self.pos < front_start {
            self.pos = front_start;
        }
        let avail = &front[self.front_off..];
        let n = avail.len().min(TAKE);
        self.line.extend_from_slice(&avail[..n]);
        self.pos += n as u64;
        self.front_off += n;
        self.queue_len -= n;
        self.queue_base += n as u64;
        if self.front_off == front.len() {
            self.queue.pop_front();
            self.front_off = 0;
        }
        true
    }

    /// A complete line (without its `\n`), or a piece of [`MAX_LINE`] bytes.
    fn take_line(&mut self) -> Option<Vec<u8>> {
        if let Some(i) = self.line[self.scanned..].iter().position(|b| *b == b'\n') {
            let end = self.scanned + i;
            let mut line: Vec<u8> = self.line.drain(..=end).collect();
            line.pop();
            self.scanned = 0;
            return Some(line);
        }
        if self.line.len() >= MAX_LINE {
            let piece: Vec<u8> = self.line.drain(..MAX_LINE).collect();
            self.scanned = 0;
            return Some(piece);
        }
        self.scanned = self.line.len();
        None
    }
}

/// Why a stream ended without an exit, kept in a form that can be handed out more than once.
#[derive(Debug, Clone)]
enum Failure {
    Api(u16, crate::ApiError),
    Other(String),
}

impl Failure {
    fn from_client(e: ClientError) -> Self {
        match e {
            ClientError::Api { status, error } => Self::Api(status, error),
            other => Self::Other(other.to_string()),
        }
    }

    fn to_error(&self) -> SandboxError {
        match self {
            Self::Api(status, error) => ClientError::Api {
                status: *status,
                error: error.clone(),
            }
            .into(),
            Self::Other(m) => ClientError::Protocol(m.clone()).into(),
        }
    }
}

#[derive(Debug)]
struct State {
    out: OutBuf,
    err: OutBuf,
    exit: Option<ExecExit>,
    failure: Option<Failure>,
    done: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Stdout,
    Stderr,
}

impl State {
    fn buf(&mut self, w: Which) -> &mut OutBuf {
        match w {
            Which::Stdout => &mut self.out,
            Which::Stderr => &mut self.err,
        }
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Bumped when output arrives or the stream ends.
    data: watch::Sender<u64>,
    /// Bumped when a reader consumed output or readers were detached.
    space: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the buffers inconsistent in a way that matters
        // more than losing the output: keep going with the data as it is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump_data(&self) {
        self.data.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn bump_space(&self) {
        self.space.send_modify(|v| *v = v.wrapping_add(1));
    }

    async fn push(&self, which: Which, data: Vec<u8>) {
        let mut rx = self.space.subscribe();
        loop {
            rx.borrow_and_update();
            {
                let mut st = self.lock();
                let b = st.buf(which);
                if !b.must_wait() {
                    b.append(data);
                    drop(st);
                    self.bump_data();
                    return;
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn finish(&self, exit: Option<ExecExit>, failure: Option<Failure>) {
        {
            let mut st = self.lock();
            st.exit = exit;
            st.failure = failure;
            st.done = true;
        }
        self.bump_data();
    }

    async fn wait_done(&self) {
        let mut rx = self.data.subscribe();
        loop {
            rx.borrow_and_update();
            if self.lock().done {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn detach_readers(&self) {
        {
            let mut st = self.lock();
            st.out.detach();
            st.err.detach();
        }
        self.bump_space();
    }

    async fn next_line(&self, which: Which) -> Option<Vec<u8>> {
        let mut rx = self.data.subscribe();
        loop {
            rx.borrow_and_update();
            let mut pulled = false;
            let got = {
                let mut st = self.lock();
                let done = st.done;
                let b = st.buf(which);
                loop {
                    if let Some(line) = b.take_line() {
                        break Some(Some(line));
                    }
                    if b.pull() {
                        pulled = true;
                        continue;
                    }
                    if done {
                        break Some(if b.line.is_empty() {
                            None
                        } else {
                            b.scanned = 0;
                            Some(std::mem::take(&mut b.line))
                        });
                    }
                    break None;
                }
            };
            if pulled {
                self.bump_space();
            }
            if let Some(line) = got {
                return line;
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    }

    fn attach(&self, which: Which, n: isize) {
        {
            let mut st = self.lock();
            let b = st.buf(which);
            b.readers = b.readers.saturating_add_signed(n);
            if b.readers == 0 {
                b.queue.clear();
                b.queue_len = 0;
                b.front_off = 0;
            }
        }
        if n < 0 {
            self.bump_space();
        }
    }
}

async fn demux(mut rd: ExecStreamReader, shared: Arc<Shared>) {
    loop {
        match rd.next().await {
            Ok(Some(StreamEvent::Stdout(d))) => shared.push(Which::Stdout, d).await,
            Ok(Some(StreamEvent::Stderr(d))) => shared.push(Which::Stderr, d).await,
            Ok(Some(StreamEvent::Ready(_))) => {}
            Ok(Some(StreamEvent::Exit(x))) => return shared.finish(Some(x), None),
            Ok(None) => {
                return shared.finish(
                    None,
                    Some(Failure::Other(
                        "the exec stream ended without an exit status".into(),
                    )),
                )
            }
            Err(e) => return shared.finish(None, Some(Failure::from_client(e))),
        }
    }
}

// ------------------------------------------------------------------------------------------ process

/// A command running in a sandbox, as returned by [`Sandbox::exec`](super::Sandbox::exec).
///
/// Its output streams in as it is written: read lines with [`Process::next_stdout_line`] (or a
/// [`LineStream`] from [`Process::stdout_lines`]); [`Process::result`] waits for the exit and answers
/// the [`ProcessResult`]. Dropping a `Process` does not stop the command; [`Process::cancel`] does.
///
/// ```no_run
/// # async fn demo(sandbox: &sandbox_proto::sandbox::Sandbox) -> Result<(), sandbox_proto::sandbox::SandboxError> {
/// use sandbox_proto::sandbox::ExecOptions;
///
/// let mut p = sandbox
///     .exec(["sh", "-c", "echo one; read x; echo got $x"], ExecOptions::new().with_stdin(true))
///     .await?;
/// assert_eq!(p.next_stdout_line().await.as_deref(), Some("one"));
/// let stdin = p.stdin().expect("started with stdin");
/// stdin.writeline("two").await?;
/// stdin.close().await?;
/// let r = p.result(None).await?;
/// assert_eq!(r.stdout, "one\ngot two\n");
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Process {
    shared: Arc<Shared>,
    writer: Arc<tokio::sync::Mutex<ExecStreamWriter>>,
    command: Vec<String>,
    check: bool,
    pid: i32,
    stdin: Option<Stdin>,
    reading: [bool; 2],
}

impl Process {
    /// Wraps a started exec stream; spawns the task that reads it (on the current tokio runtime).
    pub(crate) fn start(
        reader: ExecStreamReader,
        writer: ExecStreamWriter,
        pid: i32,
        command: Vec<String>,
        opts: &ExecOptions,
    ) -> Self {
        let cap = opts.max_output_bytes.unwrap_or(DEFAULT_MAX_OUTPUT_BYTES);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                out: OutBuf::new(cap),
                err: OutBuf::new(cap),
                exit: None,
                failure: None,
                done: false,
            }),
            data: watch::channel(0).0,
            space: watch::channel(0).0,
        });
        tokio::spawn(demux(reader, shared.clone()));
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        let stdin = (opts.stdin || opts.tty).then(|| Stdin {
            writer: writer.clone(),
        });
        Self {
            shared,
            writer,
            command,
            check: opts.check,
            pid,
            stdin,
            reading: [false, false],
        }
    }

    /// The argv.
    pub fn command(&self) -> &[String] {
        &self.command
    }

    /// Host pid of the command.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The command's stdin, when it was started with [`ExecOptions::stdin`] (or a TTY).
    pub fn stdin(&self) -> Option<&Stdin> {
        self.stdin.as_ref()
    }

    /// True once the command has exited (or its stream failed).
    pub fn is_done(&self) -> bool {
        self.shared.lock().done
    }

    /// The exit status if the command has exited, without waiting; the stream's error if it failed.
    pub fn poll(&self) -> Result<Option<i32>, SandboxError> {
        let st = self.shared.lock();
        if !st.done {
            return Ok(None);
        }
        match (&st.exit, &st.failure) {
            (Some(x), _) => Ok(Some(x.exit_code)),
            (None, Some(f)) => Err(f.to_error()),
            (None, None) => Ok(None),
        }
    }

    /// The exit status once the command has exited, else `None`.
    pub fn returncode(&self) -> Option<i32> {
        self.shared.lock().exit.as_ref().map(|x| x.exit_code)
    }

    /// Waits for the exit and answers the exit status (137 after a timeout or [`Process::cancel`]).
    ///
    /// Fails with [`SandboxError::Timeout`] (code [`CLIENT_TIMEOUT`](super::CLIENT_TIMEOUT)) if it has
    /// not exited within `timeout` (the command keeps running), or with the daemon's error (e.g.
    /// [`SandboxError::NotRunning`]).
    pub async fn wait(&self, timeout: Option<Duration>) -> Result<i32, SandboxError> {
        self.shared.detach_readers();
        let done = self.shared.wait_done();
        match timeout {
            Some(t) => tokio::time::timeout(t, done).await.map_err(|_| {
                SandboxError::client_timeout(format!(
                    "command {:?} still running after {t:?}",
                    self.command
                ))
            })?,
            None => done.await,
        }
        match self.poll()? {
            Some(code) => Ok(code),
            None => {
                Err(ClientError::Protocol("the exec stream ended without an exit".into()).into())
            }
        }
    }

    /// Waits for the exit and answers the [`ProcessResult`].
    ///
    /// Fails with [`SandboxError::CommandTimeout`] when the command ran past its `timeout_seconds`
    /// (with the output so far), [`SandboxError::Execution`] for a non-zero exit with `check`,
    /// [`SandboxError::Timeout`] if it has not exited within `timeout`, and the daemon's error if the
    /// exec failed.
    pub async fn result(&self, timeout: Option<Duration>) -> Result<ProcessResult, SandboxError> {
        self.wait(timeout).await?;
        let r = self.build_result();
        if r.timed_out {
            return Err(SandboxError::CommandTimeout {
                code: EXEC_TIMEOUT.to_owned(),
                message: format!("command {:?} timed out and was killed", self.command),
                result: Some(Box::new(r)),
            });
        }
        if self.check {
            r.check_returncode()?;
        }
        Ok(r)
    }

    fn build_result(&self) -> ProcessResult {
        let st = self.shared.lock();
        let x = st.exit.clone().unwrap_or_default();
        let (out, err) = (st.out.kept.clone(), st.err.kept.clone());
        ProcessResult {
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: String::from_utf8_lossy(&err).into_owned(),
            returncode: x.exit_code,
            stdout_bytes: out,
            stderr_bytes: err,
            command: self.command.clone(),
            stdout_truncated: st.out.truncated(),
            stderr_truncated: st.err.truncated(),
            timed_out: x.timed_out,
            cancelled: x.cancelled,
            signal: x.signal,
            duration_ms: x.duration_ms,
        }
    }

    /// Kills the command and every process it started (SIGKILL); its exit status is then 137. Nothing
    /// to do once it has exited.
    pub async fn cancel(&self) -> Result<(), SandboxError> {
        if self.is_done() {
            return Ok(());
        }
        let r = self.writer.lock().await.cancel().await;
        match r {
            // The command exited meanwhile and the daemon closed the stream.
            Err(_) if self.is_done() => Ok(()),
            other => other.map_err(Into::into),
        }
    }

    /// Sends `signal` (a number, e.g. 15) to the command.
    pub async fn send_signal(&self, signal: i32) -> Result<(), SandboxError> {
        Ok(self.writer.lock().await.signal(signal).await?)
    }

    /// Resizes the command's terminal (TTY mode).
    pub async fn resize(&self, width: u16, height: u16) -> Result<(), SandboxError> {
        Ok(self.writer.lock().await.resize(width, height).await?)
    }

    /// The next line of stdout (without its `\n`) as it arrives; `None` at the end of the output. A
    /// line longer than [`MAX_LINE`] comes in pieces; invalid UTF-8 is replaced.
    pub async fn next_stdout_line(&mut self) -> Option<String> {
        self.next_line(Which::Stdout).await
    }

    /// The next line of stderr; see [`Process::next_stdout_line`].
    pub async fn next_stderr_line(&mut self) -> Option<String> {
        self.next_line(Which::Stderr).await
    }

    async fn next_line(&mut self, which: Which) -> Option<String> {
        let i = which as usize;
        if !self.reading[i] {
            self.reading[i] = true;
            self.shared.attach(which, 1);
        }
        self.shared
            .next_line(which)
            .await
            .map(|l| String::from_utf8_lossy(&l).into_owned())
    }

    /// A reader of stdout lines. All readers of a stream (and [`Process::next_stdout_line`]) share one
    /// position: each line goes to one of them.
    pub fn stdout_lines(&self) -> LineStream {
        LineStream::new(self.shared.clone(), Which::Stdout)
    }

    /// A reader of stderr lines; see [`Process::stdout_lines`].
    pub fn stderr_lines(&self) -> LineStream {
        LineStream::new(self.shared.clone(), Which::Stderr)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        for (i, w) in [Which::Stdout, Which::Stderr].into_iter().enumerate() {
            if self.reading[i] {
                self.shared.attach(w, -1);
            }
        }
    }
}

/// Lines of a command's stdout or stderr as they arrive (see [`Process::stdout_lines`]).
#[derive(Debug)]
pub struct LineStream {
    shared: Arc<Shared>,
    which: Which,
}

impl LineStream {
    fn new(shared: Arc<Shared>, which: Which) -> Self {
        shared.attach(which, 1);
        Self { shared, which }
    }

    /// The next line (without its `\n`); `None` at the end of the output.
    pub async fn next(&mut self) -> Option<String> {
        self.next_bytes()
            .await
            .map(|l| String::from_utf8_lossy(&l).into_owned())
    }

    /// The next line as bytes (without its `\n`).
    pub async fn next_bytes(&mut self) -> Option<Vec<u8>> {
        self.shared.next_line(self.which).await
    }
}

impl Drop for LineStream {
    fn drop(&mut self) {
        self.shared.attach(self.which, -1);
    }
}

/// The stdin of a [`Process`] (started with [`ExecOptions::stdin`]). Clones write to the same stdin.
#[derive(Debug, Clone)]
pub struct Stdin {
    writer: Arc<tokio::sync::Mutex<ExecStreamWriter>>,
}

impl Stdin {
    /// Writes bytes.
    pub async fn write(&self, data: impl AsRef<[u8]>) -> Result<(), SandboxError> {
        Ok(self.writer.lock().await.write_stdin(data.as_ref()).await?)
    }

    /// Writes `text` and a newline.
    pub async fn writeline(&self, text: &str) -> Result<(), SandboxError> {
        let mut line = Vec::with_capacity(text.len() + 1);
        line.extend_from_slice(text.as_bytes());
        line.push(b'\n');
        self.write(line).await
    }

    /// Ends the input: the command reads end-of-file.
    pub async fn close(&self) -> Result<(), SandboxError> {
        Ok(self.writer.lock().await.close_stdin().await?)
    }
}

// ------------------------------------------------------------------------------------------- logs

/// The main process's output, from [`Sandbox::stream_logs`](super::Sandbox::stream_logs).
#[derive(Debug)]
pub struct Logs {
    inner: LogStream,
    timestamps: bool,
}

impl Logs {
    pub(crate) fn new(inner: LogStream, timestamps: bool) -> Self {
        Self { inner, timestamps }
    }

    /// The next record (`stream`, `data`, `timestamp`); `None` at the end (with `follow`: once the
    /// sandbox has ended and everything was sent).
    pub async fn next_entry(&mut self) -> Option<Result<LogEntry, SandboxError>> {
        self.inner.next().await.map(|r| r.map_err(Into::into))
    }

    /// The next record as text (with its newline, if it had one; invalid UTF-8 replaced), prefixed
    /// with its timestamp and a space when the logs were asked for with timestamps.
    pub async fn next_line(&mut self) -> Option<Result<String, SandboxError>> {
        let e = match self.next_entry().await? {
            Ok(e) => e,
            Err(e) => return Some(Err(e)),
        };
        let data = String::from_utf8_lossy(&e.bytes()).into_owned();
        Some(Ok(match (&e.timestamp, self.timestamps) {
            (Some(t), true) => format!("{t} {data}"),
            _ => data,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(b: &mut OutBuf, done: bool) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            if let Some(l) = b.take_line() {
                out.push(l);
                continue;
            }
            if b.pull() {
                continue;
            }
            if done && !b.line.is_empty() {
                out.push(std::mem::take(&mut b.line));
                b.scanned = 0;
            }
            return out;
        }
    }

    #[test]
    fn kept_output_is_capped_and_lines_split() {
        let mut b = OutBuf::new(8);
        b.append(b"ab\ncd".to_vec());
        assert_eq!(lines(&mut b, false), vec![b"ab".to_vec()]);
        b.append(b"ef\ngh\nij".to_vec());
        // No reader attached: past the cap, output is only counted.
        assert!(b.truncated());
        assert_eq!(b.kept, b"ab\ncdef\n");
        assert_eq!(lines(&mut b, true), vec![b"cdef".to_vec()]);
    }

    #[test]
    fn an_attached_reader_sees_everything_and_holds_back_the_writer() {
        let mut b = OutBuf::new(4);
        b.readers = 1;
        b.append(b"12\n3".to_vec());
        b.append(b"45\n6".to_vec());
        b.append(vec![b'x'; ITER_WINDOW]);
        assert!(b.must_wait());
        let got = lines(&mut b, true);
        assert_eq!(got[0], b"12");
        assert_eq!(got[1], b"345");
        assert_eq!(
            got.iter().skip(2).map(Vec::len).sum::<usize>(),
            ITER_WINDOW + 1
        );
        assert!(got.iter().skip(2).all(|l| l.len() <= MAX_LINE));
        assert!(!b.must_wait());
        assert_eq!(b.kept, b"12\n3");
        b.detach();
        b.append(b"more".to_vec());
        assert_eq!(b.queue_len, 0);
    }
}
