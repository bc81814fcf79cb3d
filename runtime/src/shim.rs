//! The per-sandbox supervisor ("shim") and the sandbox's init.
//!
//! The daemon starts the supervisor as a fresh process (`sandboxd shim`, state directory in `SANDBOXD_SHIM_STATE_DIR`: a new exec, never a
//! fork of the multi-threaded daemon). The supervisor:
//! 1. enters a private mount namespace of its own (so nothing it mounts is ever visible on the host, and
//!    everything it mounts disappears with it);
//! 2. moves itself into a new network namespace ([`crate::net::link::enter_new_netns`]): loopback up, and,
//!    with a [`NetAttach`] in [`NET_ENV`], the veth pair on the host bridge with `eth0` configured inside.
//!    The namespace belongs to the host's user namespace, so the sandbox's root cannot reconfigure it;
//! 3. clones the sandbox's init into new user, pid, uts and ipc namespaces (`clone3`, with a pidfd); the
//!    init shares the supervisor's network namespace;
//! 4. as the parent, writes the init's uid/gid maps (root inside = `host_uid` outside), puts it into the
//!    sandbox's cgroup, bind-mounts each image layer idmapped through the sandbox's user namespace, mounts
//!    the overlay (layers read-only, the sandbox's own upper) and a read-only sysfs on its `/sys` (the
//!    init could not: the network namespace is not its own) — then lets the init go on (a networked
//!    sandbox's once the daemon has sent [`GO_LINE`]: its firewall elements are in place);
//! 5. reports `StartReport` on its stdout (one JSON line) and detaches from the daemon;
//! 6. reads the main process's stdout and stderr from two pipes into the sandbox's bounded log
//!    ([`crate::logs`]), polling them together with the init's status pipe and pidfd (no timer unless a
//!    partial line waits for its newline); once the main process has ended and its output is drained, it
//!    reaps the init, checks the memory cgroup for an OOM kill, writes `exit.json` durably and exits (the daemon then records the exit and removes the cgroup). The daemon learns of the exit through a
//!    pidfd on the supervisor — also after the daemon itself was restarted.
//!
//! The init (pid 1 inside) unshares the mount and cgroup namespaces, pivots into the rootfs, mounts
//! proc and dev, sets the hostname, forks the main process (or none: the sandbox idles),
//! then reaps every child (no zombies when user code forks), forwards signals to the main process, and exits
//! with the main process. Because it is pid 1, its exit kills whatever else runs in the sandbox.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{Gid, Pid, Uid};

use crate::cgroups::SandboxCgroup;
use crate::logs::{LogWriter, Stream};
use crate::net::{NetAttach, NET_ENV};
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

/// The line a networked sandbox's supervisor waits for on its stdin before it lets the init go: the daemon
/// sends it once the sandbox's firewall elements are in place (it adds them while the supervisor prepares
/// the rootfs). End-of-file instead: the creation failed, the init is ended.
pub const GO_LINE: &str = "go";

/// Namespaces the init is cloned into; the cgroup namespace is unshared by the init itself once the
/// supervisor has put it into its cgroup. Not the network namespace: the init shares the supervisor's,
/// which the supervisor created (so that it belongs to the host's user namespace, not the sandbox's).
const CLONE_NS: CloneFlags = CloneFlags::from_bits_truncate(
    CloneFlags::CLONE_NEWUSER.bits()
        | CloneFlags::CLONE_NEWNS.bits()
        | CloneFlags::CLONE_NEWPID.bits()
        | CloneFlags::CLONE_NEWUTS.bits()
        | CloneFlags::CLONE_NEWIPC.bits(),
);

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

/// Pipe buffer of the main process's stdout and stderr: large writes do not wait for the supervisor.
const OUTPUT_PIPE_SIZE: i32 = 1 << 20;
/// How long a line may wait for its newline before it is logged as a partial line.
const PARTIAL_FLUSH: Duration = Duration::from_millis(100);
/// Once the main process has ended, how long its output pipes may stay open (held by processes still
/// being killed with the sandbox) before the supervisor stops reading them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A pipe for the main process's stdout or stderr: large buffer, the supervisor's end non-blocking.
fn output_pipe() -> Result<Pipe, ShimError> {
    let p = pipe()?;
    let _ = nix::fcntl::fcntl(
        &p.read,
        nix::fcntl::FcntlArg::F_SETPIPE_SZ(OUTPUT_PIPE_SIZE),
    );
    let flags = nix::fcntl::fcntl(&p.read, nix::fcntl::FcntlArg::F_GETFL).map_err(step("fcntl"))?;
    let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&p.read, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(step("fcntl"))?;
    Ok(p)
}

fn pipe() -> Result<Pipe, ShimError> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(step("pipe"))?;
    Ok(Pipe { read, write })
}

/// Entry point of `sandboxd shim`. With `state_dir` (from [`STATE_DIR_ENV`]) it serves that sandbox at
/// once; without it, it is a *pooled* supervisor: it prepares everything that does not depend on the
/// sandbox (private mount namespace, network namespace with its link, seccomp filter, the init cloned
/// into fresh namespaces), then waits for one line on stdin naming the state directory to serve. EOF
/// instead (the daemon went away) ends it cleanly, init and all. The network attachment, if any, comes
/// in [`NET_ENV`]. Returns the process exit code.
pub fn main(state_dir: Option<PathBuf>, pool_cgroup: Option<SandboxCgroup>) -> i32 {
    let _ = nix::unistd::setsid();
    let pooled = state_dir.is_none();
    let attach: Option<NetAttach> = match std::env::var(NET_ENV) {
        Ok(json) => match serde_json::from_str(&json) {
            Ok(a) => Some(a),
            Err(e) => return report_and_exit(&format!("bad {NET_ENV}: {e}")),
        },
        Err(_) => None,
    };
    let pre = match Prepared::new(pool_cgroup, attach.as_ref()) {
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
    /// The init's pidfd.
    pidfd: OwnedFd,
    go: OwnedFd,
    ready: OwnedFd,
    status: OwnedFd,
    /// Read ends of the main process's stdout and stderr.
    out: OwnedFd,
    err: OwnedFd,
    /// The cgroup the init already joined (pooled supervisors).
    cgroup: Option<SandboxCgroup>,
}

impl Prepared {
    fn new(cgroup: Option<SandboxCgroup>, attach: Option<&NetAttach>) -> Result<Self, ShimError> {
        nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(step("unshare mount namespace"))?;
        crate::rootfs::make_root_private().map_err(|e| ShimError::Init(e.to_string()))?;
        // Before the clone: the init inherits this network namespace (and no thread may be running).
        crate::net::link::enter_new_netns(attach)
            .map_err(|e| ShimError::Init(format!("setting up the network namespace: {e}")))?;
        let filter = crate::seccomp::default_filter()
            .map_err(|e| ShimError::Init(format!("seccomp filter: {e}")))?;
        let go = pipe()?;
        let ready = pipe()?;
        let status = pipe()?;
        let out = output_pipe()?;
        let err = output_pipe()?;
        match crate::sys::clone3_fork(CLONE_NS.bits() as u64, None).map_err(step("clone3"))? {
            crate::sys::CloneResult::Child => {
                drop(go.write);
                drop(ready.read);
                drop(status.read);
                drop(out.read);
                drop(err.read);
                let output = [out.write, err.write];
                init_main(go.read, ready.write, status.write, output, &filter)
            }
            crate::sys::CloneResult::Parent { pid, pidfd } => {
                let me = Self {
                    pid: Pid::from_raw(pid),
                    pidfd,
                    go: go.write,
                    ready: ready.read,
                    status: status.read,
                    out: out.read,
                    err: err.read,
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
    pidfd: OwnedFd,
    status_read: OwnedFd,
    /// Read ends of the main process's stdout and stderr.
    out: OwnedFd,
    err: OwnedFd,
}

fn write_support_files(spec: &SandboxSpec) -> Result<(), ShimError> {
    let mut hosts = format!(
        "127.0.0.1\tlocalhost {h}\n::1\tlocalhost ip6-localhost ip6-loopback {h}\n",
        h = spec.hostname
    );
    let resolv_path = spec.state_dir.join(crate::rootfs::RESOLV_CONF);
    match &spec.network {
        Some(net) => {
            hosts.push_str(&format!("{}\t{}\n", net.address, spec.hostname));
            std::fs::write(&resolv_path, resolv_conf(net)?).map_err(step("writing resolv.conf"))?;
        }
        None => match std::fs::remove_file(&resolv_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(step("removing a stale resolv.conf")(e)),
        },
    }
    std::fs::write(spec.state_dir.join("hosts"), hosts).map_err(step("writing hosts"))?;
    std::fs::write(
        spec.state_dir.join("hostname"),
        format!("{}\n", spec.hostname),
    )
    .map_err(step("writing hostname"))?;
    Ok(())
}

/// `/etc/resolv.conf` of a networked sandbox: its nameservers (addresses only) and search domains.
fn resolv_conf(net: &crate::spec::SandboxNetSpec) -> Result<String, ShimError> {
    let mut out = String::new();
    for ns in &net.dns {
        let ip: std::net::IpAddr = ns
            .parse()
            .map_err(|_| ShimError::Init(format!("nameserver {ns:?} is not an IP address")))?;
        out.push_str(&format!("nameserver {ip}\n"));
    }
    if !net.dns_search.is_empty() {
        for d in &net.dns_search {
            let ok = !d.is_empty()
                && d.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
            if !ok {
                return Err(ShimError::Init(format!(
                    "search domain {d:?} is not a domain name"
                )));
            }
        }
        out.push_str(&format!("search {}\n", net.dns_search.join(" ")));
    }
    Ok(out)
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
    if spec.network.is_some() {
        wait_for_go().map_err(fail)?;
    }

    // The go message is the state directory: the init reads its spec from there.
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
        pidfd: pre.pidfd,
        status_read: pre.status,
        out: pre.out,
        err: pre.err,
    })
}

/// Waits for the daemon's [`GO_LINE`] on stdin.
fn wait_for_go() -> Result<(), ShimError> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(step("reading the daemon's go-ahead"))?;
    if line.trim_end() != GO_LINE {
        return Err(ShimError::Init(
            "the daemon did not confirm the sandbox's firewall rules".to_owned(),
        ));
    }
    Ok(())
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
    mount_sysfs(rootfs, spec.host_uid)
}

/// Mounts a read-only sysfs at the rootfs's `/sys`. sysfs shows the network devices of the mounter's
/// network namespace and may only be mounted by someone privileged over it: the supervisor, not the init.
/// The image controls `/sys` (nothing of the sandbox runs yet): a symlink there is replaced by a
/// directory, and the mount goes through a descriptor opened without following symlinks.
fn mount_sysfs(rootfs: &Path, host_uid: u32) -> Result<(), ShimError> {
    use nix::fcntl::OFlag;
    let target = rootfs.join("sys");
    let mkdir = |target: &Path| -> Result<(), ShimError> {
        std::fs::create_dir(target).map_err(step("mkdir /sys in the rootfs"))?;
        let id = Some(Uid::from_raw(host_uid));
        nix::unistd::chown(target, id, Some(Gid::from_raw(host_uid)))
            .map_err(step("chown /sys in the rootfs"))?;
        std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o555))
            .map_err(step("chmod /sys in the rootfs"))
    };
    match std::fs::symlink_metadata(&target) {
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::remove_file(&target).map_err(step("unlinking the image's /sys symlink"))?;
            mkdir(&target)?;
        }
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(ShimError::Init(
                "the image's /sys is not a directory".to_owned(),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => mkdir(&target)?,
        Err(e) => return Err(step("stat /sys in the rootfs")(e)),
    }
    let dir = nix::fcntl::open(
        &target,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(step("opening /sys in the rootfs"))?;
    let via = format!("/proc/self/fd/{}", dir.as_raw_fd());
    mount(
        Some("sysfs"),
        via.as_str(),
        Some("sysfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(step("mounting sysfs"))
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

/// The init, from clone to forever. Never returns.
fn init_main(
    go: OwnedFd,
    ready: OwnedFd,
    status: OwnedFd,
    output: [OwnedFd; 2],
    filter: &seccompiler::BpfProgram,
) -> ! {
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
        init_setup(&spec, output, filter, &ready)
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

/// `output`: the write ends of the stdout and stderr pipes, for the main process only (the init's own copies
/// are closed once it has forked it, so the supervisor sees end-of-file when the main process and what it
/// started are gone).
fn init_setup(
    spec: &SandboxSpec,
    output: [OwnedFd; 2],
    filter: &seccompiler::BpfProgram,
    ready: &OwnedFd,
) -> Result<Option<Pid>, String> {
    // Host paths are looked up now, while this process still has the host's root uid (which owns the state
    // directory, whatever its parents' modes): afterwards it is the sandbox's unprivileged uid.
    let rootfs = spec.state_dir.join("rootfs");
    nix::unistd::chdir(&rootfs).map_err(|e| format!("chdir {}: {e}", rootfs.display()))?;
    let support = crate::rootfs::SupportFiles::open(&spec.state_dir).map_err(|e| e.to_string())?;
    // Mounted files are cloned (read-only) now, while their host paths are reachable.
    let user_mounts = crate::mounts::UserMounts::prepare(spec).map_err(|e| e.to_string())?;
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
    // Attached once nothing of the host is reachable from `/`.
    user_mounts.attach().map_err(|e| e.to_string())?;
    nix::unistd::sethostname(&spec.hostname).map_err(|e| format!("sethostname: {e}"))?;
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("prctl dumpable: {e}"))?;
    SigSet::all()
        .thread_block()
        .map_err(|e| format!("blocking signals: {e}"))?;

    let [stdout, stderr] = output;
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

/// Ceiling of a duration in poll's milliseconds.
fn poll_timeout(d: Option<Duration>) -> nix::poll::PollTimeout {
    match d {
        None => nix::poll::PollTimeout::NONE,
        Some(d) => {
            let ms = d.as_micros().div_ceil(1000);
            nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX)
        }
    }
}

/// The main process's output on its way to the log.
struct OutputLog {
    log: Option<LogWriter>,
    /// A write failed (reported once; later writes are still tried).
    failed: bool,
    /// Since when a line waits for its newline.
    partial_since: Option<Instant>,
}

impl OutputLog {
    fn open(spec: &SandboxSpec) -> Self {
        let max = spec.log_max_bytes.unwrap_or(crate::logs::DEFAULT_MAX_BYTES);
        let log = match LogWriter::open(&spec.state_dir, max) {
            Ok(w) => Some(w),
            Err(e) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "sandboxd shim: opening the log: {e}; the main process's output is dropped"
                );
                None
            }
        };
        Self {
            log,
            failed: false,
            partial_since: None,
        }
    }

    fn report(&mut self, r: Result<(), crate::logs::LogError>) {
        if let Err(e) = r {
            if !self.failed {
                let _ = writeln!(std::io::stderr(), "sandboxd shim: writing the log: {e}");
            }
            self.failed = true;
        }
    }

    fn write(&mut self, stream: Stream, data: &[u8]) {
        let Some(log) = self.log.as_mut() else {
            return;
        };
        let r = log.write(stream, data);
        let partial = log.has_partial();
        self.report(r);
        self.partial_since = match (partial, self.partial_since) {
            (false, _) => None,
            (true, None) => Some(Instant::now()),
            (true, since) => since,
        };
    }

    fn flush_partial(&mut self) {
        if let Some(log) = self.log.as_mut() {
            let r = log.flush_partial();
            self.report(r);
        }
        self.partial_since = None;
    }
}

/// Until the main process has ended and its output is drained: copies stdout and stderr into the log
/// and reads the main process's status (5 bytes, see [`encode_status`]) from the init. Returns how many
/// status bytes arrived. Waits in `poll` only (the status pipe, the init's pidfd, the two output pipes);
/// a timeout is set only while a partial line waits or the drain after the end runs.
fn relay_output(
    spec: &SandboxSpec,
    status_fd: &OwnedFd,
    pidfd: &OwnedFd,
    output: [OwnedFd; 2],
    status: &mut [u8; 5],
) -> usize {
    use nix::poll::{PollFd, PollFlags};
    let mut log = OutputLog::open(spec);
    let mut pipes = output.map(Some);
    let mut status_open = true;
    let mut init_alive = true;
    let mut got = 0;
    let mut ended_at: Option<Instant> = None;
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let ended = !status_open || !init_alive;
        if ended && ended_at.is_none() {
            ended_at = Some(Instant::now());
        }
        if ended && pipes.iter().all(Option::is_none) {
            break;
        }
        let drain_left = ended_at.map(|t| DRAIN_TIMEOUT.saturating_sub(t.elapsed()));
        if drain_left == Some(Duration::ZERO) {
            break;
        }
        let flush_left = log
            .partial_since
            .map(|t| PARTIAL_FLUSH.saturating_sub(t.elapsed()));
        if flush_left == Some(Duration::ZERO) {
            log.flush_partial();
            continue;
        }
        let timeout = match (drain_left, flush_left) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Slots: 0 status, 1 pidfd, 2 stdout, 3 stderr.
        let mut ready = [false; 4];
        {
            let mut fds = Vec::with_capacity(4);
            let mut slots = Vec::with_capacity(4);
            let watch = PollFlags::POLLIN;
            if status_open {
                fds.push(PollFd::new(status_fd.as_fd(), watch));
                slots.push(0);
            }
            if init_alive {
                fds.push(PollFd::new(pidfd.as_fd(), watch));
                slots.push(1);
            }
            for (i, p) in pipes.iter().enumerate() {
                if let Some(p) = p {
                    fds.push(PollFd::new(p.as_fd(), watch));
                    slots.push(2 + i);
                }
            }
            match nix::poll::poll(&mut fds, poll_timeout(timeout)) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "sandboxd shim: poll: {e}");
                    break;
                }
            }
            for (fd, slot) in fds.iter().zip(&slots) {
                ready[*slot] = fd.revents().is_some_and(|r| !r.is_empty());
            }
        }
        // Output first: what the main process wrote before it ended is logged before its end is.
        for (i, stream) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
            if !ready[2 + i] {
                continue;
            }
            let Some(p) = &pipes[i] else { continue };
            match nix::unistd::read(p, &mut chunk) {
                Ok(0) => pipes[i] = None,
                Ok(n) => log.write(stream, &chunk[..n]),
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                Err(_) => pipes[i] = None,
            }
        }
        if ready[0] {
            // The init writes the main process's status just before it exits; reading it (rather than
            // waiting for the init's own exit) keeps the kernel's namespace teardown off the path that
            // reports the exit.
            match nix::unistd::read(status_fd, &mut status[got..]) {
                Ok(0) => status_open = false,
                Ok(n) => {
                    got += n;
                    if got == status.len() {
                        status_open = false;
                    }
                }
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
                Err(_) => status_open = false,
            }
        }
        if ready[1] {
            // The init is gone. Its status, if it wrote one, was readable in this round already.
            init_alive = false;
        }
    }
    log.flush_partial();
    got
}

fn supervise(spec: &SandboxSpec, init: Init) -> i32 {
    let Init {
        pid: init_pid,
        pidfd,
        status_read,
        out,
        err,
        ..
    } = init;
    let mut buf = [0u8; 5];
    let mut got = relay_output(spec, &status_read, &pidfd, [out, err], &mut buf);
    // The relay stops early only on a poll failure: then the status is waited for here.
    while got < buf.len() {
        match nix::unistd::read(&status_read, &mut buf[got..]) {
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
        match waitpid(init_pid, None) {
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
        let _ = waitpid(init_pid, None);
    }
    // The cgroup is removed by the daemon once it has recorded the exit (also after a daemon restart).
    rc
}
