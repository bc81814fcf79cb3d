//! The per-sandbox supervisor ("shim") and the sandbox's init.
//!
//! The daemon starts the supervisor as a fresh process (`sandboxd shim`, state directory in `SANDBOXD_SHIM_STATE_DIR`: a new exec, never a
//! fork of the multi-threaded daemon). The supervisor:
//! 1. enters a private mount namespace of its own (so nothing it mounts is ever visible on the host, and
//!    everything it mounts disappears with it);
//! 2. clones the sandbox's init into new user, pid, uts, ipc and net namespaces (`clone3`, with a pidfd);
//! 3. as the parent, writes the init's uid/gid maps (root inside = `host_uid` outside), puts it into the
//!    sandbox's cgroup, bind-mounts each image layer idmapped through the sandbox's user namespace and
//!    mounts the overlay (layers read-only, the sandbox's own upper) — then lets the init go on;
//! 4. reports `StartReport` on its stdout (one JSON line) and detaches from the daemon;
//! 5. reaps the init, reads the main process's status from it, checks the memory cgroup for an OOM kill,
//!    writes `exit.json` durably and exits (the daemon then records the exit and removes the cgroup). The daemon learns of the exit through a
//!    pidfd on the supervisor — also after the daemon itself was restarted.
//!
//! The init (pid 1 inside) unshares the mount and cgroup namespaces, pivots into the rootfs, mounts
//! proc/dev/sys, sets the hostname, brings loopback up, forks the main process (or none: the sandbox idles),
//! then reaps every child (no zombies when user code forks), forwards signals to the main process, and exits
//! with the main process. Because it is pid 1, its exit kills whatever else runs in the sandbox.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{Gid, Pid, Uid};

use crate::cgroups::SandboxCgroup;
use crate::spec::{
    read_json, write_json_atomic, write_json_replace, ExitRecord, ProcRecord, SandboxSpec,
    StartReport, ID_RANGE,
};

/// Errors of the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// Reading the spec failed.
    #[error("reading the sandbox spec in {dir}: {source}")]
    Spec {
        /// State dir.
        dir: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A setup step on the supervisor's side failed.
    #[error("{step}: {source}")]
    Step {
        /// What was being done.
        step: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The init reported a failure before it was ready.
    #[error("{0}")]
    Init(String),
}

fn step<E: Into<std::io::Error>>(what: impl Into<String>) -> impl FnOnce(E) -> ShimError {
    let step = what.into();
    move |e| ShimError::Step {
        step,
        source: e.into(),
    }
}

/// Environment variable that carries the state directory to `sandboxd shim`.
pub const STATE_DIR_ENV: &str = "SANDBOXD_SHIM_STATE_DIR";

/// Environment variable that carries a pooled supervisor's pre-created cgroup (JSON of [`SandboxCgroup`]):
/// the init joins it while the supervisor waits for a sandbox, so that a creation does not wait for the
/// kernel's cgroup-migration grace period.
pub const POOL_CGROUP_ENV: &str = "SANDBOXD_SHIM_POOL_CGROUP";

/// Namespaces the init is cloned into; the cgroup namespace is unshared by the init itself once the
/// supervisor has put it into its cgroup.
const CLONE_NS: CloneFlags = CloneFlags::from_bits_truncate(
    CloneFlags::CLONE_NEWUSER.bits()
        | CloneFlags::CLONE_NEWNS.bits()
        | CloneFlags::CLONE_NEWPID.bits()
        | CloneFlags::CLONE_NEWUTS.bits()
        | CloneFlags::CLONE_NEWIPC.bits()
        | CloneFlags::CLONE_NEWNET.bits(),
);

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

fn pipe() -> Result<Pipe, ShimError> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(step("pipe"))?;
    Ok(Pipe { read, write })
}

/// Entry point of `sandboxd shim`. With `state_dir` (from [`STATE_DIR_ENV`]) it serves that sandbox at
/// once; without it, it is a *pooled* supervisor: it prepares everything that does not depend on the
/// sandbox (private mount namespace, seccomp filter, the init cloned into fresh namespaces), then waits for
/// one line on stdin naming the state directory to serve. EOF instead (the daemon went away) ends it
/// cleanly, init and all. Returns the process exit code.
pub fn main(state_dir: Option<PathBuf>, pool_cgroup: Option<SandboxCgroup>) -> i32 {
    let _ = nix::unistd::setsid();
    let pooled = state_dir.is_none();
    let pre = match Prepared::new(pool_cgroup) {
        Ok(p) => p,
        Err(e) => return report_and_exit(&e.to_string()),
    };
    let state_dir = match state_dir {
        Some(d) => d,
        None => {
            let mut line = String::new();
            match std::io::stdin().read_line(&mut line) {
                Ok(n) if n > 0 && line.trim_end().starts_with('/') => {
                    PathBuf::from(line.trim_end())
                }
                _ => {
                    pre.abandon();
                    return 0;
                }
            }
        }
    };
    if pooled {
        if let Ok(log) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(state_dir.join("shim.log"))
        {
            let _ = nix::unistd::dup2_stderr(log.as_fd());
        }
    }
    let spec: SandboxSpec = match read_json(&state_dir.join("spec.json")) {
        Ok(Some(s)) => s,
        Ok(None) => {
            pre.abandon();
            return report_and_exit(&format!("no spec.json in {}", state_dir.display()));
        }
        Err(e) => {
            pre.abandon();
            return report_and_exit(
                &ShimError::Spec {
                    dir: state_dir.display().to_string(),
                    source: e,
                }
                .to_string(),
            );
        }
    };
    let me = std::process::id() as i32;
    if let Ok(t) = crate::sys::process_start_time(me) {
        let _ = write_json_replace(
            &state_dir.join("shim.json"),
            &ProcRecord {
                pid: me,
                start_time: t,
            },
        );
    }
    match start(&spec, pre) {
        Ok(init) => {
            send_report(&StartReport::Started { init: init.record });
            supervise(&spec, init)
        }
        Err(e) => report_and_exit(&e.to_string()),
    }
}

/// The sandbox-independent half of creation: done ahead of time by pooled supervisors.
struct Prepared {
    pid: Pid,
    go: OwnedFd,
    ready: OwnedFd,
    status: OwnedFd,
    /// The cgroup the init already joined (pooled supervisors).
    cgroup: Option<SandboxCgroup>,
}

impl Prepared {
    fn new(cgroup: Option<SandboxCgroup>) -> Result<Self, ShimError> {
        nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(step("unshare mount namespace"))?;
        crate::rootfs::make_root_private().map_err(|e| ShimError::Init(e.to_string()))?;
        let filter = crate::seccomp::default_filter()
            .map_err(|e| ShimError::Init(format!("seccomp filter: {e}")))?;
        let go = pipe()?;
        let ready = pipe()?;
        let status = pipe()?;
        match crate::sys::clone3_fork(CLONE_NS.bits() as u64, None).map_err(step("clone3"))? {
            crate::sys::CloneResult::Child => {
                drop(go.write);
                drop(ready.read);
                drop(status.read);
                init_main(go.read, ready.write, status.write, &filter)
            }
            crate::sys::CloneResult::Parent { pid, .. } => {
                let me = Self {
                    pid: Pid::from_raw(pid),
                    go: go.write,
                    ready: ready.read,
                    status: status.read,
                    cgroup,
                };
                if let Some(cg) = &me.cgroup {
                    if let Err(e) = cg.add_process(pid as u32) {
                        let msg = format!("joining the pooled cgroup: {e}");
                        me.abandon();
                        return Err(ShimError::Init(msg));
                    }
                }
                Ok(me)
            }
        }
    }

    /// Ends the waiting init (it exits when its go pipe closes) and reaps it.
    fn abandon(self) {
        let pid = self.pid;
        drop(self.go);
        let _ = kill(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
    }
}

fn report_and_exit(message: &str) -> i32 {
    send_report(&StartReport::Failed {
        message: message.to_owned(),
    });
    1
}

fn send_report(r: &StartReport) {
    let mut line = serde_json::to_vec(r)
        .unwrap_or_else(|_| b"{\"failed\":{\"message\":\"encoding\"}}".to_vec());
    line.push(b'\n');
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&line);
    let _ = out.flush();
}

/// After the report the daemon may go away at any time: stdout must not be a pipe it holds.
fn detach_stdout() {
    if let Ok(null) = OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(null.as_fd());
    }
}

struct Init {
    record: ProcRecord,
    pid: Pid,
    status_read: OwnedFd,
}

fn write_support_files(spec: &SandboxSpec) -> Result<(), ShimError> {
    let hosts = format!(
        "127.0.0.1\tlocalhost {h}\n::1\tlocalhost ip6-localhost ip6-loopback {h}\n",
        h = spec.hostname
    );
    std::fs::write(spec.state_dir.join("hosts"), hosts).map_err(step("writing hosts"))?;
    std::fs::write(
        spec.state_dir.join("hostname"),
        format!("{}\n", spec.hostname),
    )
    .map_err(step("writing hostname"))?;
    Ok(())
}

fn open_log(path: &Path) -> Result<File, ShimError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(step(format!("opening {}", path.display())))
}

fn start(spec: &SandboxSpec, pre: Prepared) -> Result<Init, ShimError> {
    let pid = pre.pid;
    let fail = |e: ShimError| {
        let _ = kill(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
        e
    };
    let prepared = (|| {
        write_support_files(spec)?;
        drop(open_log(&spec.state_dir.join("stdout.log"))?);
        drop(open_log(&spec.state_dir.join("stderr.log"))?);
        let upper = spec.state_dir.join("upper");
        let work = spec.state_dir.join("work");
        let rootfs = spec.state_dir.join("rootfs");
        for d in [&upper, &work, &rootfs] {
            std::fs::create_dir_all(d).map_err(step(format!("mkdir {}", d.display())))?;
        }
        let owner = Some(Uid::from_raw(spec.host_uid));
        let group = Some(Gid::from_raw(spec.host_uid));
        nix::unistd::chown(&upper, owner, group).map_err(step("chown upper"))?;
        nix::unistd::chown(&work, owner, group).map_err(step("chown work"))?;
        let _ = std::fs::set_permissions(&upper, std::fs::Permissions::from_mode(0o755));
        let attached = pre.cgroup.as_ref() == Some(&spec.cgroup);
        prepare_child(spec, pid, attached, &rootfs, &upper, &work)
    })();
    prepared.map_err(fail)?;

    // The go message is the state directory: the init reads its spec and opens its logs from there.
    let mut go_w = File::from(pre.go);
    go_w.write_all(spec.state_dir.as_os_str().as_encoded_bytes())
        .map_err(step("releasing init"))
        .map_err(fail)?;
    drop(go_w);

    let mut msg = String::new();
    let _ = File::from(pre.ready).read_to_string(&mut msg);
    if msg != "OK" {
        let msg = msg.strip_prefix("ERR ").unwrap_or(&msg);
        return Err(fail(ShimError::Init(if msg.is_empty() {
            "the sandbox init died during setup".to_owned()
        } else {
            msg.to_owned()
        })));
    }
    let start_time = crate::sys::process_start_time(pid.as_raw())
        .map_err(step("reading the init's start time"))
        .map_err(fail)?;
    let record = ProcRecord {
        pid: pid.as_raw(),
        start_time,
    };
    write_json_replace(&spec.state_dir.join("init.json"), &record)
        .map_err(step("writing init.json"))
        .map_err(fail)?;
    Ok(Init {
        record,
        pid,
        status_read: pre.status,
    })
}

/// The supervisor's half of setup, while the init waits: id maps, cgroup, idmapped layers, overlay.
fn prepare_child(
    spec: &SandboxSpec,
    pid: Pid,
    attached: bool,
    rootfs: &Path,
    upper: &Path,
    work: &Path,
) -> Result<(), ShimError> {
    let map = format!("0 {} {}\n", spec.host_uid, ID_RANGE);
    std::fs::write(format!("/proc/{pid}/uid_map"), &map).map_err(step("writing uid_map"))?;
    std::fs::write(format!("/proc/{pid}/gid_map"), &map).map_err(step("writing gid_map"))?;
    if !attached {
        spec.cgroup
            .add_process(pid.as_raw() as u32)
            .map_err(|e| ShimError::Init(format!("joining the sandbox cgroup: {e}")))?;
    }

    let userns = File::open(format!("/proc/{pid}/ns/user"))
        .map_err(step("opening the init's user namespace"))?;
    // The overlay is mounted from inside the init's own mount namespace: a mount made there is not
    // "locked" (as one copied from a more privileged namespace would be), so the init can pivot into it.
    let own_mnt = File::open("/proc/self/ns/mnt")
        .map_err(step("opening the supervisor's mount namespace"))?;
    let init_mnt = File::open(format!("/proc/{pid}/ns/mnt"))
        .map_err(step("opening the init's mount namespace"))?;
    crate::sys::setns(init_mnt.as_fd(), libc::CLONE_NEWNS)
        .map_err(step("entering the init's mount namespace"))?;
    let mounted = mount_rootfs(spec, userns.as_fd(), rootfs, upper, work);
    crate::sys::setns(own_mnt.as_fd(), libc::CLONE_NEWNS)
        .map_err(step("returning to the supervisor's mount namespace"))?;
    mounted
}

/// Bind-mounts each layer idmapped through the sandbox's user namespace and mounts the overlay on them.
fn mount_rootfs(
    spec: &SandboxSpec,
    userns: std::os::fd::BorrowedFd<'_>,
    rootfs: &Path,
    upper: &Path,
    work: &Path,
) -> Result<(), ShimError> {
    let lower_root = spec.state_dir.join("lower");
    let mut lowers: Vec<PathBuf> = Vec::with_capacity(spec.layers.len());
    for (i, layer) in spec.layers.iter().enumerate() {
        let target = lower_root.join(i.to_string());
        std::fs::create_dir_all(&target).map_err(step(format!("mkdir {}", target.display())))?;
        crate::sys::idmapped_bind(layer, &target, userns)
            .map_err(step(format!("idmapped mount of layer {}", layer.display())))?;
        lowers.push(target);
    }
    if lowers.is_empty() {
        return Err(ShimError::Init("the image has no layers".to_owned()));
    }
    // overlayfs wants the top layer first.
    let lowerdir = lowers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    // `volatile`: the upper layer is never mounted again after a host crash, so unmounting it need not
    // sync the whole upper filesystem (which would otherwise sit on every sandbox's exit path).
    let opts = format!(
        "lowerdir={lowerdir},upperdir={},workdir={},volatile",
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        rootfs,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(step("mounting the overlay rootfs"))?;
    for l in &lowers {
        // The overlay holds its own references to the layers; the idmapped mounts are no longer needed.
        let _ = umount2(l, MntFlags::MNT_DETACH);
    }
    Ok(())
}

fn write_fd(fd: &OwnedFd, data: &[u8]) {
    let _ = nix::unistd::write(fd, data);
}

/// Points fds 0-2 at `/dev/null`: the init keeps no channel to the outside on its stdio.
fn stdio_to_null() {
    if let Ok(null) = OpenOptions::new().read(true).write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(null.as_fd());
        let _ = nix::unistd::dup2_stdout(null.as_fd());
        let _ = nix::unistd::dup2_stderr(null.as_fd());
    }
}

fn open_for_append(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("opening {}: {e}", path.display()))
}

/// The init, from clone to forever. Never returns.
fn init_main(go: OwnedFd, ready: OwnedFd, status: OwnedFd, filter: &seccompiler::BpfProgram) -> ! {
    // Wait for the supervisor: the message is the state directory (EOF without one: abandoned).
    let mut dir = Vec::new();
    if File::from(go).read_to_end(&mut dir).is_err() || dir.is_empty() {
        crate::sys::exit_now(1);
    }
    let state_dir = PathBuf::from(std::ffi::OsString::from_vec(dir));
    let setup = (|| {
        let spec: SandboxSpec = read_json(&state_dir.join("spec.json"))
            .map_err(|e| format!("reading the spec: {e}"))?
            .ok_or_else(|| "no spec.json".to_owned())?;
        let stdout = open_for_append(&state_dir.join("stdout.log"))?;
        let stderr = open_for_append(&state_dir.join("stderr.log"))?;
        init_setup(&spec, stdout, stderr, filter, &ready)
    })();
    let main_pid = match setup {
        Ok(p) => p,
        Err(msg) => {
            write_fd(&ready, format!("ERR {msg}").as_bytes());
            crate::sys::exit_now(1);
        }
    };
    write_fd(&ready, b"OK");
    drop(ready);
    init_loop(main_pid, status)
}

fn init_setup(
    spec: &SandboxSpec,
    stdout: File,
    stderr: File,
    filter: &seccompiler::BpfProgram,
    ready: &OwnedFd,
) -> Result<Option<Pid>, String> {
    // Host paths are looked up now, while this process still has the host's root uid (which owns the state
    // directory, whatever its parents' modes): afterwards it is the sandbox's unprivileged uid.
    let rootfs = spec.state_dir.join("rootfs");
    nix::unistd::chdir(&rootfs).map_err(|e| format!("chdir {}: {e}", rootfs.display()))?;
    let support = crate::rootfs::SupportFiles::open(&spec.state_dir).map_err(|e| e.to_string())?;
    let root = Uid::from_raw(0);
    let rootg = Gid::from_raw(0);
    nix::unistd::setresgid(rootg, rootg, rootg)
        .map_err(|e| format!("setgid 0 in the user namespace: {e}"))?;
    nix::unistd::setresuid(root, root, root)
        .map_err(|e| format!("setuid 0 in the user namespace: {e}"))?;
    nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP)
        .map_err(|e| format!("unshare cgroup namespace: {e}"))?;
    crate::rootfs::pivot_cwd().map_err(|e| e.to_string())?;
    crate::rootfs::setup_mounts(&support).map_err(|e| e.to_string())?;
    crate::rootfs::drop_old_root().map_err(|e| e.to_string())?;
    nix::unistd::sethostname(&spec.hostname).map_err(|e| format!("sethostname: {e}"))?;
    crate::sys::loopback_up().map_err(|e| format!("bringing loopback up: {e}"))?;
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("prctl dumpable: {e}"))?;
    SigSet::all()
        .thread_block()
        .map_err(|e| format!("blocking signals: {e}"))?;

    let Some(process) = &spec.process else {
        stdio_to_null();
        return Ok(None);
    };
    // SAFETY: the init is single-threaded (a clone of the single-threaded supervisor), so the child owns a
    // consistent copy of the process and may allocate freely.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            // The supervisor's ready pipe must not wait for this process: it reports its own failures
            // (exit 126/127 and a line on stderr).
            crate::sys::close_fd(ready.as_raw_fd());
            let null = OpenOptions::new().read(true).open("/dev/null");
            if let Ok(null) = null {
                let _ = nix::unistd::dup2_stdin(null.as_fd());
            }
            let _ = nix::unistd::dup2_stdout(stdout.as_fd());
            let _ = nix::unistd::dup2_stderr(stderr.as_fd());
            crate::process::exec_user_process(process, Some(&spec.hostname), Some(filter))
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            // The init itself keeps no channel to the outside on its stdio.
            stdio_to_null();
            Ok(Some(child))
        }
        Err(e) => Err(format!("fork of the main process: {e}")),
    }
}

/// Status of the main process as the init passes it to the supervisor: kind (0 exit, 1 signal) + value.
fn encode_status(ws: WaitStatus) -> Option<[u8; 5]> {
    let (kind, v) = match ws {
        WaitStatus::Exited(_, c) => (0u8, c),
        WaitStatus::Signaled(_, s, _) => (1u8, s as i32),
        _ => return None,
    };
    let mut b = [0u8; 5];
    b[0] = kind;
    b[1..].copy_from_slice(&v.to_le_bytes());
    Some(b)
}

fn init_loop(main: Option<Pid>, status: OwnedFd) -> ! {
    let all = SigSet::all();
    loop {
        let sig = match all.wait() {
            Ok(s) => s,
            Err(_) => continue,
        };
        match sig {
            Signal::SIGCHLD => loop {
                match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(ws) => {
                        if main.is_some() && ws.pid() == main {
                            if let Some(b) = encode_status(ws) {
                                write_fd(&status, &b);
                            }
                            let code = match ws {
                                WaitStatus::Exited(_, c) => c,
                                WaitStatus::Signaled(_, s, _) => 128 + s as i32,
                                _ => 255,
                            };
                            crate::sys::exit_now(code);
                        }
                    }
                }
            },
            Signal::SIGTERM | Signal::SIGINT | Signal::SIGHUP | Signal::SIGQUIT
                if main.is_none() =>
            {
                // An idle sandbox ends cleanly on a stop request.
                write_fd(&status, &[0, 0, 0, 0, 0]);
                crate::sys::exit_now(0);
            }
            s => {
                if let Some(m) = main {
                    let _ = kill(m, s);
                }
            }
        }
    }
}

fn supervise(spec: &SandboxSpec, init: Init) -> i32 {
    // The init writes the main process's status just before it exits; reading it (rather than waiting for
    // the init's own exit) keeps the kernel's namespace teardown off the path that reports the exit.
    let mut buf = [0u8; 5];
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(&init.status_read, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    let mut reaped = false;
    let (code, signal) = if got == 5 {
        let v = i32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]);
        if buf[0] == 0 {
            (Some(v), None)
        } else {
            (None, Some(v))
        }
    } else {
        // No status: the init itself was killed (SIGKILL at the end of a stop's grace period).
        reaped = true;
        match waitpid(init.pid, None) {
            Ok(WaitStatus::Exited(_, c)) => (Some(c), None),
            Ok(WaitStatus::Signaled(_, s, _)) => (None, Some(s as i32)),
            _ => (None, Some(libc::SIGKILL)),
        }
    };
    // The OOM counter covers the whole sandbox (execs included): it explains the main process's end only
    // when that end was a SIGKILL.
    let oom_killed = signal == Some(libc::SIGKILL)
        && spec.cgroup.oom_kill_count().map(|n| n > 0).unwrap_or(false);
    let reason = match (code, signal, oom_killed) {
        (_, _, true) => "OOM killed: the sandbox reached its memory limit".to_owned(),
        (Some(c), _, _) => format!("exited with code {c}"),
        (None, Some(s), _) => format!("killed by signal {s} ({})", crate::spec::signal_name(s)),
        (None, None, _) => "ended for an unknown reason".to_owned(),
    };
    let record = ExitRecord {
        code,
        signal,
        oom_killed,
        reason,
        finished_at_ms: crate::spec::now_ms(),
    };
    let mut rc = 0;
    if let Err(e) = write_json_atomic(&spec.state_dir.join("exit.json"), &record) {
        let _ = writeln!(std::io::stderr(), "sandboxd shim: writing exit.json: {e}");
        rc = 1;
    }
    send_report(&StartReport::Exited);
    detach_stdout();
    if !reaped {
        let _ = waitpid(init.pid, None);
    }
    // The cgroup is removed by the daemon once it has recorded the exit (also after a daemon restart).
    rc
}
