//! The sandbox's root filesystem, set up by the sandbox's init inside its own user and mount namespaces.
//!
//! Order matters (after runc's `rootfs_linux.go`, written anew):
//! 1. the overlay is already mounted at `rootfs` by the supervisor (read-only idmapped lowers, private upper),
//!    with a read-only sysfs on its `/sys` (the network namespace belongs to the host's user namespace, so
//!    only the supervisor may mount sysfs for it);
//! 2. `pivot_root(".", ".sandboxd-oldroot")` from inside the rootfs, FIRST, so that every later mount target is resolved
//!    with the sandbox's root as `/` (an image's absolute symlink `/proc -> /etc` then stays inside it);
//! 3. proc, a tmpfs `/dev` with bind-mounted device nodes, devpts, shm, mqueue — the old root is still
//!    attached, which the kernel needs to allow proc in a user namespace;
//! 4. masked and read-only paths; `/etc/hosts`, `/etc/hostname` and (networked sandboxes)
//!    `/etc/resolv.conf`;
//! 5. the old root is detached and its mount point removed.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Where the old root is attached during setup, relative to the new root.
pub const OLD_ROOT: &str = ".sandboxd-oldroot";

/// Errors of rootfs setup; each names the step and path.
#[derive(Debug, thiserror::Error)]
#[error("{step} {path}: {source}")]
pub struct RootfsError {
    step: &'static str,
    path: String,
    #[source]
    source: std::io::Error,
}

fn err(
    step: &'static str,
    path: impl AsRef<Path>,
) -> impl FnOnce(nix::errno::Errno) -> RootfsError {
    let path = path.as_ref().display().to_string();
    move |e| RootfsError {
        step,
        path,
        source: std::io::Error::from(e),
    }
}

fn ioerr(step: &'static str, path: impl AsRef<Path>) -> impl FnOnce(std::io::Error) -> RootfsError {
    let path = path.as_ref().display().to_string();
    move |source| RootfsError { step, path, source }
}

/// Paths masked from the sandbox: files get `/dev/null` bound over them, directories an empty read-only tmpfs.
pub const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths made read-only inside the sandbox.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// The image controls every path in the rootfs, and during setup the host's root is still attached at
/// [`OLD_ROOT`]: a symlink such as `/proc -> /.sandboxd-oldroot/tmp/x` must never steer a mkdir, a file
/// creation or a mount. Runs while no sandbox process exists yet, so nothing can change the tree between
/// this check and its use.
///
/// A symlink as the last component is replaced (inside the overlay) by what setup needs there; a symlink
/// anywhere before it is refused.
fn own_target(p: &Path, dir: bool) -> Result<(), RootfsError> {
    let refuse = |what: &Path| RootfsError {
        step: "refusing an image symlink at",
        path: what.display().to_string(),
        source: std::io::Error::from_raw_os_error(libc::ELOOP),
    };
    let mut cur = PathBuf::from("/");
    let parts: Vec<_> = p.components().skip(1).collect();
    for (i, c) in parts.iter().enumerate() {
        cur.push(c);
        let last = i + 1 == parts.len();
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                if !last {
                    return Err(refuse(&cur));
                }
                std::fs::remove_file(&cur).map_err(ioerr("unlink image symlink", &cur))?;
            }
            Ok(m) if !last && !m.is_dir() => return Err(refuse(&cur)),
            Ok(_) => continue,
            Err(_) => {}
        }
        if std::fs::symlink_metadata(&cur).is_err() {
            if last && !dir {
                std::fs::File::create(&cur).map_err(ioerr("create", &cur))?;
            } else {
                std::fs::create_dir(&cur).map_err(ioerr("mkdir", &cur))?;
            }
        }
    }
    Ok(())
}

fn mkdir_p(p: &Path) -> Result<(), RootfsError> {
    own_target(p, true)
}

fn mnt(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), RootfsError> {
    mount(Some(src), target, Some(fstype), flags, data).map_err(err("mount", target))
}

/// Name of the state directory's `resolv.conf` (written by the supervisor for networked sandboxes only).
pub const RESOLV_CONF: &str = "resolv.conf";

/// Files of the sandbox's state directory bind-mounted into it, opened (`O_PATH`) before the init gives up
/// the host's root uid.
#[derive(Debug)]
pub struct SupportFiles {
    hosts: std::os::fd::OwnedFd,
    hostname: std::os::fd::OwnedFd,
    /// Absent: the image's own `/etc/resolv.conf` stays.
    resolv_conf: Option<std::os::fd::OwnedFd>,
}

impl SupportFiles {
    /// Opens `hosts`, `hostname` and, if present, `resolv.conf` in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self, RootfsError> {
        let o = |name: &str| {
            let p = state_dir.join(name);
            nix::fcntl::open(
                p.as_path(),
                nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|e| (e, p))
        };
        let required = |name: &str| o(name).map_err(|(e, p)| err("open", &p)(e));
        let resolv_conf = match o(RESOLV_CONF) {
            Ok(fd) => Some(fd),
            Err((nix::errno::Errno::ENOENT, _)) => None,
            Err((e, p)) => return Err(err("open", &p)(e)),
        };
        Ok(Self {
            hosts: required("hosts")?,
            hostname: required("hostname")?,
            resolv_conf,
        })
    }
}

fn fd_path(fd: &std::os::fd::OwnedFd) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Makes every mount of the current mount namespace private (no propagation to or from the host).
pub fn make_root_private() -> Result<(), RootfsError> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(err("make private", "/"))
}

/// Step 2: makes the current directory (the rootfs mount) the root; the cwd becomes `/`.
pub fn pivot_cwd() -> Result<(), RootfsError> {
    make_root_private()?;
    // The image may ship something at this name: only a real directory will do.
    if std::fs::symlink_metadata(OLD_ROOT).is_ok_and(|m| !m.is_dir()) {
        std::fs::remove_file(OLD_ROOT).map_err(ioerr("unlink", OLD_ROOT))?;
    }
    match std::fs::create_dir(OLD_ROOT) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(ioerr("mkdir", OLD_ROOT)(e)),
    }
    nix::unistd::pivot_root(".", OLD_ROOT).map_err(err("pivot_root", "rootfs"))?;
    nix::unistd::chdir("/").map_err(err("chdir", "/"))?;
    Ok(())
}

/// Steps 3 and 4.
pub fn setup_mounts(support: &SupportFiles) -> Result<(), RootfsError> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    // /sys is mounted already (by the supervisor).
    for d in ["/proc", "/dev", "/etc", "/tmp"] {
        mkdir_p(Path::new(d))?;
    }
    mnt("proc", "/proc", "proc", nosuid_nodev_noexec, None)?;
    mnt(
        "tmpfs",
        "/dev",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )?;
    let old_dev = Path::new("/").join(OLD_ROOT).join("dev");
    for d in DEVICES {
        let target = PathBuf::from("/dev").join(d);
        std::fs::File::create(&target).map_err(ioerr("create", &target))?;
        mount(
            Some(&old_dev.join(d)),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(err("bind device", &target))?;
    }
    mkdir_p(Path::new("/dev/pts"))?;
    mnt(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    mkdir_p(Path::new("/dev/shm"))?;
    mnt(
        "shm",
        "/dev/shm",
        "tmpfs",
        nosuid_nodev_noexec,
        Some("mode=1777,size=65536k"),
    )?;
    mkdir_p(Path::new("/dev/mqueue"))?;
    mnt("mqueue", "/dev/mqueue", "mqueue", nosuid_nodev_noexec, None)?;
    for (link, target) in [
        ("/dev/ptmx", "pts/ptmx"),
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
        ("/dev/core", "/proc/kcore"),
    ] {
        symlink(target, link).map_err(ioerr("symlink", link))?;
    }

    for p in MASKED_PATHS {
        mask(Path::new(p))?;
    }
    for p in READONLY_PATHS {
        readonly(Path::new(p))?;
    }

    let files = [
        ("hosts", Some(&support.hosts)),
        ("hostname", Some(&support.hostname)),
        (RESOLV_CONF, support.resolv_conf.as_ref()),
    ];
    for (name, fd) in files {
        let Some(fd) = fd else { continue };
        let src = fd_path(fd);
        let target = PathBuf::from("/etc").join(name);
        own_target(&target, false)?;
        mount(
            Some(&src),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(err("bind", &target))?;
    }
    let tmp = Path::new("/tmp");
    if let Ok(m) = std::fs::symlink_metadata(tmp) {
        if m.permissions().mode() & 0o7777 == 0o755 && m.is_dir() {
            // An image without a /tmp of its own got one from mkdir above: make it what programs expect.
            let _ = std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o1777));
        }
    }
    Ok(())
}

fn mask(p: &Path) -> Result<(), RootfsError> {
    let meta = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    if meta.is_dir() {
        mount(
            Some("tmpfs"),
            p,
            Some("tmpfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("size=0,mode=555"),
        )
        .map_err(err("mask", p))
    } else {
        mount(
            Some("/dev/null"),
            p,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(err("mask", p))
    }
}

fn readonly(p: &Path) -> Result<(), RootfsError> {
    if std::fs::symlink_metadata(p).is_err() {
        return Ok(());
    }
    mount(
        Some(p),
        p,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(err("bind", p))?;
    let flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    mount(None::<&str>, p, None::<&str>, flags, None::<&str>).map_err(err("remount read-only", p))
}

/// Step 5: detaches the old root and removes its mount point.
pub fn drop_old_root() -> Result<(), RootfsError> {
    let old = Path::new("/").join(OLD_ROOT);
    umount2(&old, MntFlags::MNT_DETACH).map_err(err("umount", &old))?;
    std::fs::remove_dir(&old).map_err(ioerr("rmdir", &old))
}
