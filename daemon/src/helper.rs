//! Starting `sandboxd exec-helper` (see `sandbox_runtime::exec`) and talking to it over its control
//! socket: one spec line in, `ExecEvent` lines out, `ExecControl` lines in while the command runs.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;

use sandbox_proto::ApiError;
use sandbox_runtime::spec::{ExecControl, ExecEvent, ExecPrepare, ExecRun, ExecSpec};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::Child;

/// The daemon's end of a command's stdout or stderr.
pub(crate) type OutPipe = Box<dyn AsyncRead + Unpin + Send>;
/// The daemon's end of a command's stdin.
pub(crate) type InPipe = Box<dyn AsyncWrite + Unpin + Send>;

use crate::error::internal;

/// Pipe buffer size asked for the command's stdout and stderr (fewer wakeups on bulk output).
const PIPE_SIZE: i32 = 1 << 20;

/// A running exec helper.
pub(crate) struct Helper {
    pub child: Child,
    pub stdin: Option<InPipe>,
    pub stdout: Option<OutPipe>,
    pub stderr: Option<OutPipe>,
    events: Lines<BufReader<OwnedReadHalf>>,
    control: OwnedWriteHalf,
    /// A command ran already: the helper's own stdio is spent, the next one's comes with its line.
    used: bool,
}

impl Helper {
    /// Starts the helper and sends it the whole spec. With `stdin`, the command's stdin is a pipe
    /// ([`Helper::stdin`]); without, `/dev/null`.
    pub async fn spawn(exe: &Path, spec: &ExecSpec, stdin: bool) -> Result<Self, ApiError> {
        let mut h = Self::prepare(exe, &spec.prepare(), stdin).await?;
        h.start(&spec.run()).await?;
        Ok(h)
    }

    /// Starts a helper and sends it the first line only: it enters the sandbox and waits for
    /// [`Helper::start`]. Its stdin is a pipe when `stdin` (drop [`Helper::stdin`] for end-of-file).
    pub async fn prepare(exe: &Path, prep: &ExecPrepare, stdin: bool) -> Result<Self, ApiError> {
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(|e| internal("socketpair", e))?;
        let theirs_fd = theirs.as_raw_fd();
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg0("sandboxd")
            .arg("exec-helper")
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_clear()
            // Not killed with the request: the helper enforces the deadline and kills the command when
            // its control socket closes.
            .kill_on_drop(false);
        // SAFETY: the closure runs in the forked child before exec and only calls dup2/fcntl (through
        // `place_fd`), which are async-signal-safe; it touches no memory shared with other threads.
        unsafe {
            cmd.pre_exec(move || {
                sandbox_runtime::sys::place_fd(theirs_fd, sandbox_runtime::exec::CONTROL_FD)
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| internal("starting the exec helper", e))?;
        drop(theirs);
        ours.set_nonblocking(true)
            .map_err(|e| internal("socket", e))?;
        let ctl = tokio::net::UnixStream::from_std(ours).map_err(|e| internal("socket", e))?;
        let (ctl_r, mut ctl_w) = ctl.into_split();
        let mut line =
            serde_json::to_vec(prep).map_err(|e| internal("encoding the exec spec", e))?;
        line.push(b'\n');
        ctl_w
            .write_all(&line)
            .await
            .map_err(|e| internal("sending the exec spec", e))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| internal("exec", "no stdout pipe"))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| internal("exec", "no stderr pipe"))?;
        for fd in [stdout.as_fd(), stderr.as_fd()] {
            let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        }
        Ok(Self {
            stdin: child.stdin.take().map(|s| Box::new(s) as InPipe),
            child,
            stdout: Some(Box::new(stdout)),
            stderr: Some(Box::new(stderr)),
            events: BufReader::new(ctl_r).lines(),
            control: ctl_w,
            used: false,
        })
    }

    /// Sends the command (the second line). A helper that ran a command already gets new pipes for
    /// this one, passed with the line (SCM_RIGHTS); [`Helper::stdin`] and the outputs are then theirs.
    pub async fn start(&mut self, run: &ExecRun) -> Result<(), ApiError> {
        if !self.used {
            self.used = true;
            let mut line =
                serde_json::to_vec(run).map_err(|e| internal("encoding the exec spec", e))?;
            line.push(b'\n');
            return self
                .control
                .write_all(&line)
                .await
                .map_err(|e| internal("sending the exec command", e));
        }
        let pipe =
            || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| internal("pipe", e));
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        for fd in [out_r.as_fd(), err_r.as_fd()] {
            let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        }
        let run = ExecRun {
            stdio_attached: true,
            ..run.clone()
        };
        let mut line =
            serde_json::to_vec(&run).map_err(|e| internal("encoding the exec spec", e))?;
        line.push(b'\n');
        let sent = send_with_fds(&self.control, &line, [&in_r, &out_w, &err_w])
            .await
            .map_err(|e| internal("sending the exec command", e))?;
        self.control
            .write_all(&line[sent..])
            .await
            .map_err(|e| internal("sending the exec command", e))?;
        // The helper has its copies now; ours of its ends go.
        drop((in_r, out_w, err_w));
        let wrap = |e: std::io::Error| internal("pipe", e);
        self.stdin = Some(Box::new(
            tokio::net::unix::pipe::Sender::from_owned_fd(in_w).map_err(wrap)?,
        ));
        self.stdout = Some(Box::new(
            tokio::net::unix::pipe::Receiver::from_owned_fd(out_r).map_err(wrap)?,
        ));
        self.stderr = Some(Box::new(
            tokio::net::unix::pipe::Receiver::from_owned_fd(err_r).map_err(wrap)?,
        ));
        Ok(())
    }

    /// Whether the helper process still runs (a prepared one leaves when its sandbox ends).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The next event (`Prepared` is skipped); `None` once the helper closed its side. Cancel-safe.
    pub async fn next_event(&mut self) -> Option<ExecEvent> {
        loop {
            let ev = match self.events.next_line().await {
                Ok(Some(l)) => serde_json::from_str(&l).unwrap_or_else(|e| ExecEvent::Failed {
                    message: format!("bad message from the exec helper: {e}"),
                }),
                _ => return None,
            };
            if ev != ExecEvent::Prepared {
                return Some(ev);
            }
        }
    }

    /// Dismisses the helper: closes its socket (a helper between commands then leaves its leaf cgroup
    /// and exits; one still running a command kills it) and reaps it in the background.
    pub fn reap_later(mut self) {
        self.stdin = None;
        self.stdout = None;
        self.stderr = None;
        tokio::spawn(async move {
            let _ = self.control.shutdown().await;
            let _ = self.child.wait().await;
        });
    }

    /// Sends a control message (ignored once the helper is gone).
    pub async fn control(&mut self, m: ExecControl) {
        if let Ok(mut line) = serde_json::to_vec(&m) {
            line.push(b'\n');
            let _ = self.control.write_all(&line).await;
        }
    }

    /// Closes the control socket: the helper kills the command's tree if it still runs.
    pub async fn hang_up(&mut self) {
        let _ = self.control.shutdown().await;
    }
}

/// `sendmsg` of `data` with three descriptors attached; answers how many bytes went.
async fn send_with_fds(
    control: &OwnedWriteHalf,
    data: &[u8],
    fds: [&OwnedFd; 3],
) -> std::io::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let raw = [fds[0].as_raw_fd(), fds[1].as_raw_fd(), fds[2].as_raw_fd()];
    let stream: &tokio::net::UnixStream = control.as_ref();
    stream
        .async_io(tokio::io::Interest::WRITABLE, || {
            sendmsg::<()>(
                stream.as_raw_fd(),
                &[std::io::IoSlice::new(data)],
                &[ControlMessage::ScmRights(&raw)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        })
        .await
}
