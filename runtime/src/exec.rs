//! The exec helper: `sandboxd exec-helper`, a fresh single-threaded process that runs one command inside a
//! running sandbox.
//!
//! The daemon gives it stdin/stdout/stderr (inherited by the command as they are) and a control socket on
//! fd 3, over which it receives one [`ExecSpec`] line and answers with [`ExecEvent`] lines. It:
//! 1. opens a pidfd for the sandbox's init (checked against its start time, so a reused pid is refused);
//! 2. creates a leaf cgroup for this exec's process tree and keeps directory fds of it;
//! 3. `setns(pidfd, user|mnt|pid|net|uts|ipc|cgroup)` — all namespaces at once, atomically;
//! 4. forks: the child is in the sandbox's pid namespace; the helper moves it into the leaf cgroup, then lets
//!    it become the command (credentials, capabilities, no_new_privs, seccomp, cwd check, exec);
//! 5. waits for it with a deadline; at the deadline it SIGKILLs every process of the leaf cgroup.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::fcntl::{openat, OFlag};
use nix::sched::CloneFlags;
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::spec::{ExecEvent, ExecSpec};

/// The namespaces an exec joins.
pub const JOIN_NS: CloneFlags = CloneFlags::from_bits_truncate(
    CloneFlags::CLONE_NEWUSER.bits()
        | CloneFlags::CLONE_NEWNS.bits()
        | CloneFlags::CLONE_NEWPID.bits()
        | CloneFlags::CLONE_NEWNET.bits()
        | CloneFlags::CLONE_NEWUTS.bits()
        | CloneFlags::CLONE_NEWIPC.bits()
        | CloneFlags::CLONE_NEWCGROUP.bits(),
);

/// The fd number of the control socket.
pub const CONTROL_FD: i32 = 3;

fn send(ctl: &mut UnixStream, ev: &ExecEvent) {
    if let Ok(mut line) = serde_json::to_vec(ev) {
        line.push(b'\n');
        let _ = ctl.write_all(&line);
    }
}

/// Entry point of `sandboxd exec-helper`. Returns the helper's exit code (0 once an `Exited` was sent).
pub fn main() -> i32 {
    // SAFETY: the daemon starts this helper with its control socket on fd 3 and nothing else owns it.
    let ctl_fd = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
    let mut ctl = UnixStream::from(ctl_fd);
    let mut line = String::new();
    let read = ctl
        .try_clone()
        .map(BufReader::new)
        .and_then(|mut r| r.read_line(&mut line));
    if read.is_err() || line.is_empty() {
        return 2;
    }
    let spec: ExecSpec = match serde_json::from_str(&line) {
        Ok(s) => s,
        Err(e) => {
            send(
                &mut ctl,
                &ExecEvent::Failed {
                    message: format!("bad exec spec: {e}"),
                },
            );
            return 2;
        }
    };
    let _ = crate::sys::cloexec_from(4);
    match run(&spec, &mut ctl) {
        Ok(ev) => {
            send(&mut ctl, &ev);
            0
        }
        Err(message) => {
            send(&mut ctl, &ExecEvent::Failed { message });
            1
        }
    }
}

struct Leaf {
    /// `cgroup.procs` of the leaf in every hierarchy, opened before leaving the host's mount namespace.
    procs: Vec<OwnedFd>,
    /// The leaf directories.
    dirs: Vec<OwnedFd>,
    /// The parent (sandbox) directories and the leaf's name, to remove the leaf when it empties.
    parents: Vec<OwnedFd>,
    name: String,
}

fn open_leaf(spec: &ExecSpec) -> Result<Leaf, String> {
    let leaf = spec
        .cgroup
        .create_child(&spec.cgroup_leaf)
        .map_err(|e| format!("creating the exec's cgroup: {e}"))?;
    let mut out = Leaf {
        procs: Vec::new(),
        dirs: Vec::new(),
        parents: Vec::new(),
        name: spec.cgroup_leaf.clone(),
    };
    for (dir, parent) in leaf.dirs.iter().zip(spec.cgroup.dirs.iter()) {
        let d = nix::fcntl::open(
            dir,
            OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
            Mode::empty(),
        )
        .map_err(|e| format!("opening {}: {e}", dir.display()))?;
        let p = nix::fcntl::open(
            dir.join("cgroup.procs").as_path(),
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("opening {}/cgroup.procs: {e}", dir.display()))?;
        let par = nix::fcntl::open(
            parent,
            OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
            Mode::empty(),
        )
        .map_err(|e| format!("opening {}: {e}", parent.display()))?;
        out.dirs.push(d);
        out.procs.push(p);
        out.parents.push(par);
    }
    Ok(out)
}

fn leaf_pids(dir: BorrowedFd<'_>) -> Vec<i32> {
    let Ok(fd) = openat(
        dir,
        "cgroup.procs",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) else {
        return Vec::new();
    };
    let mut s = String::new();
    let _ = std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut s);
    s.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// SIGKILLs every process in the leaf, repeating until it is empty (bounded).
fn kill_leaf(leaf: &Leaf) {
    for _ in 0..200 {
        let mut any = false;
        for d in &leaf.dirs {
            for pid in leaf_pids(d.as_fd()) {
                any = true;
                // Pin the process first, then check it still belongs to the leaf: a pid recycled by the
                // host in between is never signalled.
                if let Ok(fd) = crate::sys::pidfd_open(pid) {
                    if leaf_pids(d.as_fd()).contains(&pid) {
                        let _ = crate::sys::pidfd_send_signal(fd.as_fd(), libc::SIGKILL);
                    }
                }
            }
        }
        if !any {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn remove_leaf_if_empty(leaf: &Leaf) {
    for (d, p) in leaf.dirs.iter().zip(&leaf.parents) {
        if leaf_pids(d.as_fd()).is_empty() {
            let _ =
                nix::unistd::unlinkat(p, leaf.name.as_str(), nix::unistd::UnlinkatFlags::RemoveDir);
        }
    }
}

fn run(spec: &ExecSpec, ctl: &mut UnixStream) -> Result<ExecEvent, String> {
    if spec.process.args.is_empty() {
        return Err("empty command".to_owned());
    }
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("prctl: {e}"))?;
    let init = crate::sys::pidfd_open_checked(spec.init.pid, spec.init.start_time)
        .map_err(|_| "the sandbox is not running".to_owned())?;
    let leaf = open_leaf(spec)?;
    let filter = crate::seccomp::default_filter().map_err(|e| format!("seccomp filter: {e}"))?;
    crate::sys::setns(init.as_fd(), JOIN_NS.bits())
        .map_err(|e| format!("entering the sandbox's namespaces: {e}"))?;
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok());
    let (go_r, go_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;

    let (pid, pidfd) = match crate::sys::clone3_fork(0, None)
        .map_err(|e| format!("fork into the sandbox: {e}"))?
    {
        crate::sys::CloneResult::Child => {
            drop(go_w);
            let mut b = [0u8; 1];
            if !matches!(nix::unistd::read(&go_r, &mut b), Ok(1)) {
                crate::sys::exit_now(1);
            }
            crate::process::exec_user_process(&spec.process, hostname.as_deref(), Some(&filter))
        }
        crate::sys::CloneResult::Parent { pid, pidfd } => (Pid::from_raw(pid), pidfd),
    };
    drop(go_r);
    for p in &leaf.procs {
        if let Err(e) = nix::unistd::write(p, pid.as_raw().to_string().as_bytes()) {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = waitpid(pid, None);
            return Err(format!("moving the exec into its cgroup: {e}"));
        }
    }
    nix::unistd::write(&go_w, b"G").map_err(|e| format!("releasing the exec: {e}"))?;
    drop(go_w);
    send(ctl, &ExecEvent::Started { pid: pid.as_raw() });

    let deadline = spec
        .timeout_seconds
        .filter(|t| t.is_finite() && *t > 0.0)
        .map(|t| Instant::now() + Duration::from_secs_f64(t));
    let mut timed_out = false;
    if let Some(deadline) = deadline {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            let mut fds = [nix::poll::PollFd::new(
                pidfd.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(
                &mut fds,
                nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX),
            ) {
                Ok(0) => {
                    timed_out = true;
                    kill_leaf(&leaf);
                    break;
                }
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(format!("poll: {e}")),
            }
        }
    }
    let ws = loop {
        match waitpid(pid, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    let (code, signal) = match ws {
        Ok(WaitStatus::Exited(_, c)) => (Some(c), None),
        Ok(WaitStatus::Signaled(_, s, _)) => (None, Some(s as i32)),
        Ok(other) => return Err(format!("unexpected wait status {other:?}")),
        Err(e) => return Err(format!("waitpid: {e}")),
    };
    remove_leaf_if_empty(&leaf);
    let _ = pidfd.as_raw_fd();
    Ok(ExecEvent::Exited {
        code,
        signal,
        timed_out,
    })
}
