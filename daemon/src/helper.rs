//! Starting `sandboxd exec-helper` (see `sandbox_runtime::exec`) and talking to it over its control
//! socket: one spec line in, `ExecEvent` lines out, `ExecControl` lines in while the command runs.

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::process::Stdio;

use sandbox_proto::ApiError;
use sandbox_runtime::spec::{ExecControl, ExecEvent, ExecPrepare, ExecRun, ExecSpec};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};

use crate::error::internal;

/// Pipe buffer size asked for the command's stdout and stderr (fewer wakeups on bulk output).
const PIPE_SIZE: i32 = 1 << 20;

/// A running exec helper.
pub(crate) struct Helper {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
    events: Lines<BufReader<OwnedReadHalf>>,
    control: OwnedWriteHalf,
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
            stdin: child.stdin.take(),
            child,
            stdout: Some(stdout),
            stderr: Some(stderr),
            events: BufReader::new(ctl_r).lines(),
            control: ctl_w,
        })
    }

    /// Sends the command (the second line).
    pub async fn start(&mut self, run: &ExecRun) -> Result<(), ApiError> {
        let mut line =
            serde_json::to_vec(run).map_err(|e| internal("encoding the exec spec", e))?;
        line.push(b'\n');
        self.control
            .write_all(&line)
            .await
            .map_err(|e| internal("sending the exec command", e))
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

    /// Reaps the helper in the background: after its exit report it still moves back to the sandbox's
    /// cgroup and removes its leaf, which nobody needs to wait for.
    pub fn reap_later(mut self) {
        drop(self.stdin.take());
        tokio::spawn(async move {
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
