//! The exec helper: `sandboxd exec-helper`, a fresh single-threaded process that runs one command inside a
//! running sandbox.
//!
//! The daemon gives it stdin/stdout/stderr (inherited by the command as they are) and a control socket on
//! fd 3, over which it receives two lines, [`ExecPrepare`] then [`ExecRun`], and answers with
//! [`ExecEvent`] lines. With the first line it:
//! 1. opens a pidfd for the sandbox's init (checked against its start time, so a reused pid is refused);
//! 2. creates a leaf cgroup for this exec's process tree, keeps directory fds of it, and joins it itself
//!    (so the command is born in it: no migration on the exec's path);
//! 3. `setns(pidfd, user|mnt|pid|net|uts|ipc|cgroup)` — all namespaces at once, atomically;
//! 4. answers `Prepared`. The daemon may start helpers ahead of time, up to here, so that an exec only
//!    pays for what follows. A prepared helper whose socket closes, or whose sandbox ends, leaves quietly.
//!
//! With the second line it forks: the child is in the sandbox's pid namespace and leaf cgroup and becomes
//! the command (terminal, credentials, capabilities, no_new_privs, seccomp, cwd check, exec). The helper
//! relays the terminal if there is one, applies control messages (resize, signal, cancel), waits with a
//! deadline (at which it SIGKILLs every process of the leaf), reports `Exited`, then moves back to the
//! sandbox's cgroup and removes the leaf if it is empty. End of file on the socket while the command
//! runs kills the command's tree: nobody is left to read its output.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::fcntl::{openat, OFlag};
use nix::sched::CloneFlags;
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::spec::{ExecControl, ExecEvent, ExecPrepare, ExecRun, TtySize};

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

/// Entry point of `sandboxd exec-helper`. Returns the helper's exit code (0 once an `Exited` was sent,
/// or when it was dismissed before a command came).
pub fn main() -> i32 {
    // SAFETY: the daemon starts this helper with its control socket on fd 3 and nothing else owns it.
    let ctl_fd = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
    let mut ctl = UnixStream::from(ctl_fd);
    let mut control = Control::default();
    let prep: ExecPrepare = match control.next_line_blocking(&mut ctl) {
        Some(line) => match serde_json::from_slice(&line) {
            Ok(p) => p,
            Err(e) => {
                send(
                    &mut ctl,
                    &ExecEvent::Failed {
                        message: format!("bad exec spec: {e}"),
                    },
                );
                return 2;
            }
        },
        None => return 2,
    };
    let _ = crate::sys::cloexec_from(4);
    let prepared = match prepare(&prep) {
        Ok(p) => p,
        Err(message) => {
            send(&mut ctl, &ExecEvent::Failed { message });
            return 1;
        }
    };
    // The first command's stdio is the helper's own 0/1/2; later ones come with their command line.
    let mut own_stdio = match Stdio3::own(&prepared.devnull) {
        Ok(s) => Some(s),
        Err(message) => {
            send(&mut ctl, &ExecEvent::Failed { message });
            prepared.leave();
            return 1;
        }
    };
    loop {
        send(&mut ctl, &ExecEvent::Prepared);
        let run_spec = match wait_for_command(&mut ctl, &mut control, &prepared) {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(message) => {
                send(&mut ctl, &ExecEvent::Failed { message });
                break;
            }
        };
        let stdio = if run_spec.stdio_attached {
            control.take_stdio()
        } else {
            own_stdio.take()
        };
        let Some(stdio) = stdio else {
            send(
                &mut ctl,
                &ExecEvent::Failed {
                    message: "no stdin/stdout/stderr for the command".into(),
                },
            );
            break;
        };
        match run(&prepared, &run_spec, stdio, &mut ctl, &mut control) {
            Ok(ev) => {
                send(&mut ctl, &ev);
                // Ready for another command if this one left nothing behind in the leaf (and the
                // daemon is still there): the daemon keeps it as the sandbox's prepared helper.
                if !matches!(ev, ExecEvent::Exited { reusable: true, .. }) {
                    break;
                }
            }
            Err(message) => {
                send(&mut ctl, &ExecEvent::Failed { message });
                break;
            }
        }
    }
    prepared.leave();
    0
}

/// The command's stdin, stdout and stderr.
struct Stdio3 {
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

impl Stdio3 {
    /// The helper's own 0/1/2 (given by the daemon at start), moved out; /dev/null takes their place.
    fn own(devnull: &OwnedFd) -> Result<Self, String> {
        let dup = |fd: BorrowedFd<'_>| {
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))
                // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
                .map(|raw| unsafe { OwnedFd::from_raw_fd(raw) })
                .map_err(|e| format!("dup: {e}"))
        };
        let out = Self {
            stdin: dup(std::io::stdin().as_fd())?,
            stdout: dup(std::io::stdout().as_fd())?,
            stderr: dup(std::io::stderr().as_fd())?,
        };
        let _ = nix::unistd::dup2_stdin(devnull);
        let _ = nix::unistd::dup2_stdout(devnull);
        let _ = nix::unistd::dup2_stderr(devnull);
        Ok(out)
    }
}

struct Leaf {
    /// `cgroup.procs` of the leaf in every hierarchy, opened before leaving the host's mount namespace.
    procs: Vec<OwnedFd>,
    /// The leaf directories.
    dirs: Vec<OwnedFd>,
    /// The parent (sandbox) directories and the leaf's name, to remove the leaf when it empties.
    parents: Vec<OwnedFd>,
    /// `cgroup.procs` of the parents: the helper moves back there before it removes the leaf.
    parent_procs: Vec<OwnedFd>,
    name: String,
}

fn open_leaf(spec: &ExecPrepare) -> Result<Leaf, String> {
    let leaf = spec
        .cgroup
        .create_child(&spec.cgroup_leaf)
        .map_err(|e| format!("creating the exec's cgroup: {e}"))?;
    let mut out = Leaf {
        procs: Vec::new(),
        dirs: Vec::new(),
        parents: Vec::new(),
        parent_procs: Vec::new(),
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
        let pp = nix::fcntl::open(
            parent.join("cgroup.procs").as_path(),
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("opening {}/cgroup.procs: {e}", parent.display()))?;
        out.parent_procs.push(pp);
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

/// SIGKILLs every process in the leaf but the helper itself, repeating until none is left (bounded).
fn kill_leaf(leaf: &Leaf) {
    let me = std::process::id() as i32;
    for _ in 0..200 {
        let mut any = false;
        for d in &leaf.dirs {
            for pid in leaf_pids(d.as_fd()).into_iter().filter(|p| *p != me) {
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

/// True when no process but the helper is in the leaf (in every hierarchy).
fn leaf_holds_only_me(leaf: &Leaf) -> bool {
    let me = std::process::id() as i32;
    leaf.dirs
        .iter()
        .all(|d| leaf_pids(d.as_fd()).into_iter().all(|p| p == me))
}

fn remove_leaf_if_empty(leaf: &Leaf) {
    for (d, p) in leaf.dirs.iter().zip(&leaf.parents) {
        if leaf_pids(d.as_fd()).is_empty() {
            let _ =
                nix::unistd::unlinkat(p, leaf.name.as_str(), nix::unistd::UnlinkatFlags::RemoveDir);
        }
    }
}

/// The pseudo-terminal of a TTY exec: the master stays with the helper, the slave becomes the
/// command's stdin, stdout, stderr and controlling terminal.
struct Pty {
    master: OwnedFd,
    /// Closed in the helper once the command has its copies.
    slave: Option<OwnedFd>,
}

/// Opens a terminal pair on the sandbox's devpts (the caller is already in its mount namespace).
fn open_pty(size: TtySize) -> Result<Pty, String> {
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| format!("opening /dev/ptmx in the sandbox: {e}"))?;
    nix::pty::grantpt(&master).map_err(|e| format!("grantpt: {e}"))?;
    nix::pty::unlockpt(&master).map_err(|e| format!("unlockpt: {e}"))?;
    let name = nix::pty::ptsname_r(&master).map_err(|e| format!("ptsname: {e}"))?;
    let slave = nix::fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("opening {name}: {e}"))?;
    crate::sys::set_winsize(master.as_fd(), size.width, size.height)
        .map_err(|e| format!("setting the terminal size: {e}"))?;
    let master = OwnedFd::from(master);
    set_nonblocking(master.as_fd());
    Ok(Pty {
        master,
        slave: Some(slave),
    })
}

fn set_nonblocking(fd: BorrowedFd<'_>) {
    if let Ok(flags) = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL) {
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags));
    }
}

/// In the forked child: the terminal's slave becomes stdin/stdout/stderr and the controlling terminal.
fn attach_tty(slave: BorrowedFd<'_>) -> Result<(), nix::errno::Errno> {
    nix::unistd::setsid()?;
    nix::unistd::dup2_stdin(slave)?;
    nix::unistd::dup2_stdout(slave)?;
    nix::unistd::dup2_stderr(slave)?;
    crate::sys::set_controlling_tty(std::io::stdin().as_fd()).map_err(|_| nix::errno::Errno::ENOTTY)
}

/// Lines read from fd 3: the two spec lines, then control messages. Buffered here so that nothing the
/// daemon sent early is lost between the phases.
#[derive(Default)]
struct Control {
    buf: Vec<u8>,
    closed: bool,
    /// Descriptors received with the lines (SCM_RIGHTS), oldest first.
    fds: std::collections::VecDeque<OwnedFd>,
}

impl Control {
    /// One `recvmsg`: bytes into the buffer, descriptors into `fds`. Answers the bytes read (0 at the end).
    fn recv(&mut self, ctl: &UnixStream) -> std::io::Result<usize> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        let mut chunk = [0u8; 4096];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 3]);
        let (n, received) = {
            let mut iov = [std::io::IoSliceMut::new(&mut chunk)];
            let msg = recvmsg::<()>(
                ctl.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut received = Vec::new();
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    received.extend(fds);
                }
            }
            (msg.bytes, received)
        };
        for raw in received {
            // SAFETY: SCM_RIGHTS installed these descriptors in this process just now; nothing else owns
            // them.
            self.fds.push_back(unsafe { OwnedFd::from_raw_fd(raw) });
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The three descriptors that came with a command line.
    fn take_stdio(&mut self) -> Option<Stdio3> {
        if self.fds.len() < 3 {
            return None;
        }
        let stdin = self.fds.pop_front()?;
        let stdout = self.fds.pop_front()?;
        let stderr = self.fds.pop_front()?;
        Some(Stdio3 {
            stdin,
            stdout,
            stderr,
        })
    }

    fn take_line(&mut self) -> Option<Vec<u8>> {
        let nl = self.buf.iter().position(|b| *b == b'\n')?;
        Some(self.buf.drain(..=nl).collect())
    }

    /// Blocks until a whole line is there; `None` at end of file.
    fn next_line_blocking(&mut self, ctl: &mut UnixStream) -> Option<Vec<u8>> {
        loop {
            if let Some(l) = self.take_line() {
                return Some(l);
            }
            if self.closed {
                return None;
            }
            match self.recv(ctl) {
                Ok(0) => self.closed = true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.closed = true,
            }
        }
    }

    /// Reads what is available (the socket is non-blocking) without waiting.
    fn fill(&mut self, ctl: &mut UnixStream) {
        loop {
            match self.recv(ctl) {
                Ok(0) => {
                    self.closed = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.closed = true;
                    break;
                }
            }
        }
    }

    /// Reads what is available and returns the complete control messages.
    fn read(&mut self, ctl: &mut UnixStream) -> Vec<ExecControl> {
        self.fill(ctl);
        let mut out = Vec::new();
        while let Some(line) = self.take_line() {
            if let Ok(m) = serde_json::from_slice::<ExecControl>(&line) {
                out.push(m);
            }
        }
        out
    }
}

/// A helper ready for its command: inside the sandbox's namespaces and its own leaf cgroup.
struct Prepared {
    init: OwnedFd,
    leaf: Leaf,
    filter: seccompiler::BpfProgram,
    devnull: OwnedFd,
    hostname: Option<String>,
}

impl Prepared {
    /// Moves the helper back into the sandbox's cgroup and removes the leaf if nothing else is in it.
    fn leave(&self) {
        for p in &self.leaf.parent_procs {
            let _ = nix::unistd::write(p, b"0");
        }
        remove_leaf_if_empty(&self.leaf);
    }
}

/// Everything that does not depend on the command: the leaf cgroup (joined by the helper itself, so
/// that the command is born in it — moving a process between v1 cgroups waits for an RCU grace period,
/// which this keeps off the exec's path when the daemon prepares helpers ahead of time), the seccomp
/// filter and the sandbox's namespaces.
fn prepare(spec: &ExecPrepare) -> Result<Prepared, String> {
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("prctl: {e}"))?;
    let init = crate::sys::pidfd_open_checked(spec.init.pid, spec.init.start_time)
        .map_err(|_| "the sandbox is not running".to_owned())?;
    let leaf = open_leaf(spec)?;
    let filter = match crate::seccomp::default_filter() {
        Ok(f) => f,
        Err(e) => {
            remove_leaf_if_empty(&leaf);
            return Err(format!("seccomp filter: {e}"));
        }
    };
    // The helper's own copies of stdin/stdout/stderr are replaced by /dev/null once the command has
    // them, so that end-of-file and broken pipes reach the daemon when the command ends.
    let devnull = nix::fcntl::open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| format!("opening /dev/null: {e}"))?;
    let prepared = Prepared {
        init,
        leaf,
        filter,
        devnull,
        hostname: None,
    };
    for p in &prepared.leaf.procs {
        if let Err(e) = nix::unistd::write(p, b"0") {
            prepared.leave();
            return Err(format!("joining the exec's cgroup: {e}"));
        }
    }
    if let Err(e) = crate::sys::setns(prepared.init.as_fd(), JOIN_NS.bits()) {
        prepared.leave();
        return Err(format!("entering the sandbox's namespaces: {e}"));
    }
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok());
    Ok(Prepared {
        hostname,
        ..prepared
    })
}

/// Waits for the command line. `None`: dismissed (the daemon closed the socket) or the sandbox ended.
fn wait_for_command(
    ctl: &mut UnixStream,
    control: &mut Control,
    prepared: &Prepared,
) -> Result<Option<ExecRun>, String> {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let _ = ctl.set_nonblocking(true);
    loop {
        control.fill(ctl);
        if let Some(line) = control.take_line() {
            let _ = ctl.set_nonblocking(false);
            return serde_json::from_slice(&line)
                .map(Some)
                .map_err(|e| format!("bad exec command: {e}"));
        }
        if control.closed {
            return Ok(None);
        }
        let mut fds = [
            PollFd::new(ctl.as_fd(), PollFlags::POLLIN),
            PollFd::new(prepared.init.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {
                if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                    return Ok(None);
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
    }
}

/// Relays bytes between one readable and one writable fd without ever blocking on either.
#[derive(Default)]
struct Relay {
    pending: Vec<u8>,
    eof: bool,
}

impl Relay {
    /// Reads from `from` if nothing is pending; then writes what it can to `to`. Returns false when `from`
    /// reached its end (or failed) and nothing is left to write.
    fn step(&mut self, from: BorrowedFd<'_>, to: BorrowedFd<'_>) {
        if self.pending.is_empty() && !self.eof {
            let mut buf = vec![0u8; 64 * 1024];
            match nix::unistd::read(from, &mut buf) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    buf.truncate(n);
                    self.pending = buf;
                }
                Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {}
                // EIO on a master: every holder of the slave has gone.
                Err(_) => self.eof = true,
            }
        }
        while !self.pending.is_empty() {
            match nix::unistd::write(to, &self.pending) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(_) => {
                    // The reader went away: drop what it will never read.
                    self.pending.clear();
                    self.eof = true;
                }
            }
        }
    }
}

fn run(
    prepared: &Prepared,
    spec: &ExecRun,
    stdio: Stdio3,
    ctl: &mut UnixStream,
    control: &mut Control,
) -> Result<ExecEvent, String> {
    if spec.process.args.is_empty() {
        return Err("empty command".to_owned());
    }
    let leaf = &prepared.leaf;
    let mut pty = spec.tty.map(open_pty).transpose()?;
    // The command is born in the leaf cgroup (the helper is in it), in the sandbox's pid namespace.
    let (pid, pidfd) = match crate::sys::clone3_fork(0, None)
        .map_err(|e| format!("fork into the sandbox: {e}"))?
    {
        crate::sys::CloneResult::Child => {
            if let Some(slave) = pty.as_ref().and_then(|p| p.slave.as_ref()) {
                if attach_tty(slave.as_fd()).is_err() {
                    crate::sys::exit_now(126);
                }
            } else if nix::unistd::dup2_stdin(&stdio.stdin).is_err()
                || nix::unistd::dup2_stdout(&stdio.stdout).is_err()
                || nix::unistd::dup2_stderr(&stdio.stderr).is_err()
            {
                crate::sys::exit_now(126);
            }
            crate::process::exec_user_process(
                &spec.process,
                prepared.hostname.as_deref(),
                Some(&prepared.filter),
            )
        }
        crate::sys::CloneResult::Parent { pid, pidfd } => (Pid::from_raw(pid), pidfd),
    };
    send(ctl, &ExecEvent::Started { pid: pid.as_raw() });

    // With a TTY the helper relays between the command's stdio and the terminal's master; without, the
    // command has its own copies and ours go (so that end-of-file reaches the daemon when it ends).
    let Stdio3 {
        stdin: io_in,
        stdout: io_out,
        stderr: io_err,
    } = stdio;
    drop(io_err);
    let (stdin, stdout) = match &mut pty {
        Some(p) => {
            drop(p.slave.take());
            set_nonblocking(io_in.as_fd());
            set_nonblocking(io_out.as_fd());
            (Some(io_in), Some(io_out))
        }
        None => {
            drop(io_in);
            drop(io_out);
            (None, None)
        }
    };
    let _ = ctl.set_nonblocking(true);

    let deadline = spec
        .timeout_seconds
        .filter(|t| t.is_finite() && *t > 0.0)
        .map(|t| Instant::now() + Duration::from_secs_f64(t));
    let mut timed_out = false;
    let mut cancelled = false;
    let mut input = Relay::default();
    let mut output = Relay::default();
    let mut sent_eof = false;
    loop {
        use nix::poll::{PollFd, PollFlags};
        let ms = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                left.as_millis().min(i32::MAX as u128) as i32
            }
            None => -1,
        };
        let mut fds = vec![PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        if !control.closed {
            fds.push(PollFd::new(ctl.as_fd(), PollFlags::POLLIN));
        }
        let mut tty_slots = None;
        if let (Some(p), Some(i), Some(o)) = (&pty, &stdin, &stdout) {
            let base = fds.len();
            // stdin -> master: read stdin when nothing is pending, else wait for the master to drain.
            let want_in = if input.pending.is_empty() {
                (!input.eof).then(|| PollFd::new(i.as_fd(), PollFlags::POLLIN))
            } else {
                Some(PollFd::new(p.master.as_fd(), PollFlags::POLLOUT))
            };
            let want_out = if output.pending.is_empty() {
                (!output.eof).then(|| PollFd::new(p.master.as_fd(), PollFlags::POLLIN))
            } else {
                Some(PollFd::new(o.as_fd(), PollFlags::POLLOUT))
            };
            let n_in = want_in.is_some();
            fds.extend(want_in);
            fds.extend(want_out);
            tty_slots = Some((base, n_in));
        }
        let n = match nix::poll::poll(
            &mut fds,
            nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX),
        ) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("poll: {e}")),
        };
        if n == 0 && deadline.is_some() {
            timed_out = true;
            kill_leaf(leaf);
            break;
        }
        let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        let child_done = ready(&fds[0]);
        let ctl_ready = !control.closed && ready(&fds[1]);
        let (tty_in, tty_out) = match tty_slots {
            Some((base, n_in)) => {
                let a = n_in && fds.get(base).is_some_and(ready);
                let b_idx = if n_in { base + 1 } else { base };
                (a, fds.get(b_idx).is_some_and(ready))
            }
            None => (false, false),
        };
        drop(fds);
        // Control messages first: the daemon writes one before it passes on the stdin that followed it,
        // so a resize (or signal) sent before some input takes effect before that input is relayed.
        if ctl_ready {
            for m in control.read(ctl) {
                match m {
                    ExecControl::Cancel => {
                        cancelled = true;
                        kill_leaf(leaf);
                    }
                    ExecControl::Signal { signal } => {
                        let _ = crate::sys::pidfd_send_signal(pidfd.as_fd(), signal);
                    }
                    ExecControl::Resize { width, height } => {
                        if let Some(p) = &pty {
                            let _ = crate::sys::set_winsize(p.master.as_fd(), width, height);
                        }
                    }
                }
            }
            if control.closed {
                // The daemon (and with it the client) is gone: nothing will read the output.
                cancelled = true;
                kill_leaf(leaf);
            }
        }
        if let (Some(p), Some(i), Some(o)) = (&pty, &stdin, &stdout) {
            if tty_in {
                input.step(i.as_fd(), p.master.as_fd());
                if input.eof && !sent_eof && input.pending.is_empty() {
                    // End of the client's input: the terminal's EOF character, once.
                    let _ = nix::unistd::write(&p.master, &[4u8]);
                    sent_eof = true;
                }
            }
            if tty_out {
                output.step(p.master.as_fd(), o.as_fd());
            }
        }
        if child_done {
            break;
        }
    }
    let ws = loop {
        match waitpid(pid, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    // What the command wrote to the terminal before it ended is still in the master: pass it on.
    if let (Some(p), Some(o)) = (&pty, &stdout) {
        let _ = nix::fcntl::fcntl(o.as_fd(), nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()));
        loop {
            output.step(p.master.as_fd(), o.as_fd());
            if output.pending.is_empty() {
                let mut probe = [nix::poll::PollFd::new(
                    p.master.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let more = matches!(
                    nix::poll::poll(&mut probe, nix::poll::PollTimeout::ZERO),
                    Ok(n) if n > 0
                ) && probe[0]
                    .revents()
                    .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLIN));
                if output.eof || !more {
                    break;
                }
            }
        }
    }
    let (code, signal) = match ws {
        Ok(WaitStatus::Exited(_, c)) => (Some(c), None),
        Ok(WaitStatus::Signaled(_, s, _)) => (None, Some(s as i32)),
        Ok(other) => return Err(format!("unexpected wait status {other:?}")),
        Err(e) => return Err(format!("waitpid: {e}")),
    };
    let _ = ctl.set_nonblocking(false);
    Ok(ExecEvent::Exited {
        code,
        signal,
        timed_out,
        cancelled,
        reusable: !control.closed && leaf_holds_only_me(leaf),
    })
}
