//! File access inside a running sandbox, from the host: read and (atomically) write one file.
//!
//! Every path is resolved *inside* the sandbox's root, never on the host: the root is opened through
//! `/proc/<init>/root` (the init pinned by a pidfd and its start time, and checked to be still alive
//! after the open), and every lookup below it is an `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`:
//! the kernel treats that directory as `/` for absolute symlinks and `..`, and refuses `/proc` magic
//! links. A symlink inside the sandbox can therefore never make this code read or write a host file.
//!
//! Writes act as the sandbox's root: the thread's filesystem uid and gid are switched to the sandbox's
//! host uid for the duration (so new files and directories are owned by the sandbox's root, also on
//! tmpfs volumes mounted inside the sandbox's user namespace, which refuse unmapped owners), with the
//! file-related capabilities kept. Data goes to an unnamed temporary file (`O_TMPFILE`, or a hidden
//! named one where the file system has none) in the target's directory, which is linked and renamed
//! over the target only once every byte has arrived: an interrupted upload leaves the old file intact
//! and no temporary file behind. Synchronous; no async runtime here.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, RenameFlags, ResolveFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{fchown, Gid, Uid, UnlinkatFlags};

use crate::spec::ProcRecord;

/// Size of the chunks files are read and written in.
pub const CHUNK: usize = 256 * 1024;

/// Symlinks followed at most when a write's last component is one (as the kernel's `MAXSYMLINKS`).
const MAX_LINKS: usize = 40;

/// Mode of files created by a write that names none.
pub const DEFAULT_FILE_MODE: u32 = 0o644;

/// Mode of parent directories a write creates.
pub const PARENT_DIR_MODE: u32 = 0o755;

/// Errors of file access inside a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The path is not absolute, has a NUL byte, climbs above `/` or is too long.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath {
        /// The path as given.
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// The sandbox's init is gone (or was never the recorded process).
    #[error("the sandbox is not running")]
    NotRunning,
    /// No such file or directory (also: a parent directory, with `parents` off).
    #[error("{path}: no such file or directory")]
    NotFound {
        /// The path.
        path: String,
    },
    /// The path is on a read-only mount inside the sandbox (`EROFS`), or is itself a mount point that
    /// cannot be replaced (`EBUSY`: a mounted file).
    #[error("{path}: read-only ({errno})")]
    ReadOnly {
        /// The path.
        path: String,
        /// `EROFS` or `EBUSY`.
        errno: Errno,
    },
    /// A directory where a file was expected.
    #[error("{path}: is a directory")]
    IsDirectory {
        /// The path.
        path: String,
    },
    /// A component of the path that must be a directory is not one.
    #[error("{path}: not a directory")]
    NotDirectory {
        /// The path.
        path: String,
    },
    /// Reads only serve regular files (not devices, FIFOs or sockets).
    #[error("{path}: not a regular file")]
    NotRegular {
        /// The path.
        path: String,
    },
    /// The file system (or the sandbox's quota) is full.
    #[error("{path}: no space left ({errno})")]
    NoSpace {
        /// The path.
        path: String,
        /// `ENOSPC` or `EDQUOT`.
        errno: Errno,
    },
    /// The data source of a write failed (the uploading client went away): nothing was replaced.
    #[error("the upload of {path} was interrupted: {source}")]
    Aborted {
        /// The path.
        path: String,
        /// What the source said.
        #[source]
        source: std::io::Error,
    },
    /// Any other failure, with its errno.
    #[error("{op} {path}: {errno} ({})", errno.desc())]
    Os {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: String,
        /// The error.
        errno: Errno,
    },
}

impl FileError {
    /// The errno behind the error, when there is one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::NotFound { .. } => Some(Errno::ENOENT),
            Self::ReadOnly { errno, .. } | Self::NoSpace { errno, .. } | Self::Os { errno, .. } => {
                Some(*errno)
            }
            Self::IsDirectory { .. } => Some(Errno::EISDIR),
            Self::NotDirectory { .. } => Some(Errno::ENOTDIR),
            Self::NotRegular { .. } => Some(Errno::EINVAL),
            Self::NotRunning => Some(Errno::ESRCH),
            Self::InvalidPath { .. } | Self::Aborted { .. } => None,
        }
    }

    /// The errno's symbolic name (`EISDIR`), for API details.
    pub fn errno_name(&self) -> Option<String> {
        self.errno().map(|e| format!("{e:?}"))
    }

    fn from_errno(op: &'static str, path: &str, errno: Errno) -> Self {
        let path = path.to_owned();
        match errno {
            Errno::ENOENT => Self::NotFound { path },
            Errno::EROFS => Self::ReadOnly { path, errno },
            Errno::EISDIR => Self::IsDirectory { path },
            Errno::ENOTDIR => Self::NotDirectory { path },
            Errno::ENOSPC | Errno::EDQUOT => Self::NoSpace { path, errno },
            _ => Self::Os { op, path, errno },
        }
    }
}

fn os<'a>(op: &'static str, path: &'a str) -> impl FnOnce(Errno) -> FileError + 'a {
    move |e| FileError::from_errno(op, path, e)
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Splits an absolute sandbox path into its components, resolving `.` and `..` lexically. A `..` above
/// `/` is an error (not clamped): the caller asked for something outside the sandbox.
pub fn normalize(path: &str) -> Result<Vec<String>, FileError> {
    let bad = |reason| FileError::InvalidPath {
        path: path.to_owned(),
        reason,
    };
    if !path.starts_with('/') {
        return Err(bad("the path must be absolute"));
    }
    if path.contains('\0') {
        return Err(bad("the path contains a NUL byte"));
    }
    if path.len() >= libc::PATH_MAX as usize {
        return Err(bad("the path is too long"));
    }
    let mut out: Vec<String> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(bad("the path climbs above /"));
                }
            }
            c => out.push(c.to_owned()),
        }
    }
    Ok(out)
}

/// Resolves a symlink's target relative to the directory `dir` it sits in, as the kernel does under
/// `RESOLVE_IN_ROOT`: an absolute target starts at the sandbox's root, and `..` stops at the root.
fn link_target(dir: &[String], target: &str) -> Vec<String> {
    let mut out: Vec<String> = if target.starts_with('/') {
        Vec::new()
    } else {
        dir.to_vec()
    };
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c.to_owned()),
        }
    }
    out
}

fn display(comps: &[String]) -> String {
    format!("/{}", comps.join("/"))
}

fn rel(comps: &[String]) -> String {
    if comps.is_empty() {
        ".".to_owned()
    } else {
        comps.join("/")
    }
}

fn in_root() -> ResolveFlag {
    ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

fn beneath_no_links() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS
}

/// An open file of the sandbox, ready to be read.
#[derive(Debug)]
pub struct OpenedFile {
    /// The file, open for reading.
    pub file: File,
    /// Its size when opened.
    pub size: u64,
    /// Its permission bits (`0o7777` mask).
    pub mode: u32,
}

/// Options of [`SandboxFs::write_file`].
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// Permission bits; default: the replaced file's, else [`DEFAULT_FILE_MODE`].
    pub mode: Option<u32>,
    /// Create missing parent directories ([`PARENT_DIR_MODE`], owned by the sandbox's root).
    pub parents: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            mode: None,
            parents: true,
        }
    }
}

/// What a write produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Bytes written.
    pub size: u64,
    /// Permission bits of the file.
    pub mode: u32,
}

/// A sandbox's root file system, seen from the host.
#[derive(Debug)]
pub struct SandboxFs {
    root: OwnedFd,
    uid: u32,
    gid: u32,
}

impl SandboxFs {
    /// The root of the running sandbox whose init is `init`; files it creates belong to `host_uid` (and the
    /// group of the same number): the sandbox's root.
    pub fn open(init: ProcRecord, host_uid: u32) -> Result<Self, FileError> {
        let gone = |e: std::io::Error| match e.raw_os_error() {
            Some(libc::ESRCH) | Some(libc::ENOENT) => FileError::NotRunning,
            _ => FileError::Os {
                op: "pidfd_open",
                path: format!("/proc/{}", init.pid),
                errno: io_errno(&e),
            },
        };
        let pidfd = crate::sys::pidfd_open_checked(init.pid, init.start_time).map_err(gone)?;
        let proc_root = format!("/proc/{}/root", init.pid);
        let root = nix::fcntl::open(
            proc_root.as_str(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ENOENT | Errno::ESRCH | Errno::EACCES => FileError::NotRunning,
            e => FileError::Os {
                op: "open",
                path: proc_root.clone(),
                errno: e,
            },
        })?;
        // The pid was the init's when the pidfd was opened; if the init is still alive now, it was alive
        // during the open, so `/proc/<pid>` could not have named another process.
        if !alive(&pidfd) {
            return Err(FileError::NotRunning);
        }
        Ok(Self {
            root,
            uid: host_uid,
            gid: host_uid,
        })
    }

    /// A directory of this host taken as a root (tests and tools); new files belong to `uid:gid`.
    pub fn at_dir(dir: &Path, uid: u32, gid: u32) -> Result<Self, FileError> {
        let shown = dir.display().to_string();
        let root = nix::fcntl::open(
            dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(os("open", &shown))?;
        Ok(Self { root, uid, gid })
    }

    /// Opens the regular file at `path` (symlinks followed, inside the sandbox) for reading.
    pub fn open_file(&self, path: &str) -> Result<OpenedFile, FileError> {
        let comps = normalize(path)?;
        let shown = display(&comps);
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(in_root());
        let fd = openat2(&self.root, rel(&comps).as_str(), how).map_err(os("open", &shown))?;
        let st = fstat(&fd).map_err(os("stat", &shown))?;
        let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        if kind == SFlag::S_IFDIR {
            return Err(FileError::IsDirectory { path: shown });
        }
        if kind != SFlag::S_IFREG {
            return Err(FileError::NotRegular { path: shown });
        }
        // Re-opened through our own descriptor table: the very inode checked above, never a device or
        // FIFO swapped in meanwhile.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|e| FileError::from_errno("open", &shown, io_errno(&e)))?;
        let st = fstat(&file).map_err(os("stat", &shown))?;
        Ok(OpenedFile {
            file,
            size: st.st_size as u64,
            mode: st.st_mode & 0o7777,
        })
    }

    /// Writes `src` to `path` atomically (see the module documentation). A read error of `src` aborts
    /// the write ([`FileError::Aborted`]) and leaves the old file as it was.
    pub fn write_file(
        &self,
        path: &str,
        opts: WriteOptions,
        src: &mut dyn Read,
    ) -> Result<Written, FileError> {
        if opts.mode.is_some_and(|m| m > 0o7777) {
            return Err(FileError::InvalidPath {
                path: path.to_owned(),
                reason: "the mode must be at most 07777",
            });
        }
        let mut comps = normalize(path)?;
        let _creds = FsCreds::become_owner(self.uid, self.gid)?;
        let mut links = 0;
        let (dir, name, existing) = loop {
            let shown = display(&comps);
            let Some((name, parent)) = comps.split_last() else {
                return Err(FileError::IsDirectory { path: shown });
            };
            let dir = self.open_dir(parent, opts.parents)?;
            match fstatat(&dir, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) if is_kind(&st, SFlag::S_IFLNK) => {
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(FileError::Os {
                            op: "resolve",
                            path: shown,
                            errno: Errno::ELOOP,
                        });
                    }
                    let target = nix::fcntl::readlinkat(&dir, name.as_str())
                        .map_err(os("readlink", &shown))?;
                    comps = link_target(parent, &target.to_string_lossy());
                    continue;
                }
                Ok(st) if is_kind(&st, SFlag::S_IFDIR) => {
                    return Err(FileError::IsDirectory { path: shown })
                }
                Ok(st) => break (dir, name.clone(), Some(st)),
                Err(Errno::ENOENT) => break (dir, name.clone(), None),
                Err(e) => return Err(FileError::from_errno("stat", &shown, e)),
            }
        };
        let shown = display(&comps);
        // A mount point inside the sandbox (a mounted file, `/etc/hosts`) is not replaced. The check
        // matters: this process is in another mount namespace, where the kernel would let the rename
        // replace the file under the sandbox's mount (and detach that mount).
        if existing.is_some() && is_mount_root(&dir, &name, &shown)? {
            return Err(FileError::ReadOnly {
                path: shown,
                errno: Errno::EBUSY,
            });
        }
        let mode = opts
            .mode
            .or(existing.map(|st| st.st_mode & 0o7777))
            .unwrap_or(DEFAULT_FILE_MODE);
        let mut tmp = TempFile::create(&dir, &shown)?;
        let mut out = File::from(tmp.fd.try_clone().map_err(|e| FileError::Os {
            op: "dup",
            path: shown.clone(),
            errno: io_errno(&e),
        })?);
        let mut size = 0u64;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(FileError::Aborted {
                        path: shown,
                        source,
                    })
                }
            };
            out.write_all(&buf[..n])
                .map_err(|e| FileError::from_errno("write", &shown, io_errno(&e)))?;
            size += n as u64;
        }
        drop(out);
        if let Some(st) = existing {
            // A replaced file keeps its owner.
            if st.st_uid != self.uid || st.st_gid != self.gid {
                fchown(
                    &tmp.fd,
                    Some(Uid::from_raw(st.st_uid)),
                    Some(Gid::from_raw(st.st_gid)),
                )
                .map_err(os("chown", &shown))?;
            }
        }
        // After the chown, which clears set-id bits.
        fchmod(&tmp.fd, Mode::from_bits_truncate(mode)).map_err(os("chmod", &shown))?;
        // Again, just before the rename (the upload may have taken long).
        if is_mount_root(&dir, &name, &shown)? {
            return Err(FileError::ReadOnly {
                path: shown,
                errno: Errno::EBUSY,
            });
        }
        tmp.publish(&dir, &name, &shown)?;
        Ok(Written { size, mode })
    }

    /// Opens (creating when asked) the directory `comps`, each step resolved from the root.
    pub(crate) fn open_dir(&self, comps: &[String], create: bool) -> Result<OwnedFd, FileError> {
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(in_root());
        if !create {
            let shown = display(comps);
            return openat2(&self.root, rel(comps).as_str(), how).map_err(os("open", &shown));
        }
        let mut cur = openat2(&self.root, ".", how).map_err(os("open", "/"))?;
        for i in 0..comps.len() {
            let shown = display(&comps[..=i]);
            match openat2(&self.root, rel(&comps[..=i]).as_str(), how) {
                Ok(fd) => {
                    cur = fd;
                    continue;
                }
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(FileError::from_errno("open", &shown, e)),
            }
            let name = comps[i].as_str();
            let created = match mkdirat(&cur, name, Mode::from_bits_truncate(PARENT_DIR_MODE)) {
                Ok(()) => true,
                // Made meanwhile, or a dangling symlink (which the open below refuses).
                Err(Errno::EEXIST) => false,
                Err(e) => return Err(FileError::from_errno("mkdir", &shown, e)),
            };
            let single = OpenHow::new()
                .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
                .resolve(beneath_no_links());
            let fd = openat2(&cur, name, single).map_err(|e| match e {
                Errno::ELOOP => FileError::NotFound {
                    path: shown.clone(),
                },
                e => FileError::from_errno("open", &shown, e),
            })?;
            if created {
                // Exactly PARENT_DIR_MODE, whatever the daemon's umask.
                fchmod(&fd, Mode::from_bits_truncate(PARENT_DIR_MODE))
                    .map_err(os("chmod", &shown))?;
            }
            cur = fd;
        }
        Ok(cur)
    }
}

/// Whether `name` in `dir` (not followed if a symlink) is the root of a mount; false when it is missing.
fn is_mount_root(dir: &OwnedFd, name: &str, shown: &str) -> Result<bool, FileError> {
    let cname = std::ffi::CString::new(name).map_err(|_| FileError::InvalidPath {
        path: shown.to_owned(),
        reason: "the path contains a NUL byte",
    })?;
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx reads a NUL-terminated name that outlives the call and writes into `stx`, which is
    // valid for writes of its size.
    let ret = unsafe {
        libc::statx(
            dir.as_raw_fd(),
            cname.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_BASIC_STATS,
            std::ptr::addr_of_mut!(stx),
        )
    };
    if ret < 0 {
        return match Errno::last() {
            Errno::ENOENT => Ok(false),
            e => Err(FileError::from_errno("stat", shown, e)),
        };
    }
    let attr = libc::STATX_ATTR_MOUNT_ROOT as u64;
    if stx.stx_attributes_mask & attr == 0 {
        // A kernel without the attribute (before 5.8): compare devices with the directory's instead.
        let d = fstat(dir).map_err(os("stat", shown))?;
        let dev = libc::makedev(stx.stx_dev_major, stx.stx_dev_minor);
        return Ok(dev != d.st_dev);
    }
    Ok(stx.stx_attributes & attr != 0)
}

fn is_kind(st: &FileStat, kind: SFlag) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == kind.bits()
}

/// True while the process behind `pidfd` has not exited.
fn alive(pidfd: &OwnedFd) -> bool {
    let mut fds = [nix::poll::PollFd::new(
        pidfd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    matches!(
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO),
        Ok(0)
    )
}

fn random_suffix() -> String {
    let mut b = [0u8; 8];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let t = crate::spec::now_ms() ^ (u64::from(std::process::id()) << 32);
        b = t.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The temporary file of a write: unnamed (`O_TMPFILE`) until published, else a hidden name that is
/// removed unless the file was published.
struct TempFile<'a> {
    fd: OwnedFd,
    dir: &'a OwnedFd,
    /// Name in `dir` while it has one.
    name: Option<String>,
}

impl<'a> TempFile<'a> {
    fn create(dir: &'a OwnedFd, shown: &str) -> Result<Self, FileError> {
        let mode = Mode::from_bits_truncate(0o600);
        match openat(
            dir,
            ".",
            OFlag::O_TMPFILE | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            mode,
        ) {
            Ok(fd) => {
                return Ok(Self {
                    fd,
                    dir,
                    name: None,
                })
            }
            Err(Errno::EOPNOTSUPP | Errno::EISDIR | Errno::EINVAL) => {}
            Err(e) => {
                return Err(FileError::from_errno(
                    "create a temporary file in",
                    shown,
                    e,
                ))
            }
        }
        let name = format!(".sandboxd-upload-{}", random_suffix());
        let fd = openat(
            dir,
            name.as_str(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            mode,
        )
        .map_err(os("create a temporary file in", shown))?;
        Ok(Self {
            fd,
            dir,
            name: Some(name),
        })
    }

    /// Gives the file the name `name` in `dir`, replacing what was there.
    fn publish(&mut self, dir: &OwnedFd, name: &str, shown: &str) -> Result<(), FileError> {
        if self.name.is_none() {
            let tmp = format!(".sandboxd-upload-{}", random_suffix());
            let fd_path = format!("/proc/self/fd/{}", self.fd.as_raw_fd());
            nix::unistd::linkat(
                nix::fcntl::AT_FDCWD,
                fd_path.as_str(),
                dir,
                tmp.as_str(),
                AtFlags::AT_SYMLINK_FOLLOW,
            )
            .map_err(os("link", shown))?;
            self.name = Some(tmp);
        }
        let tmp = self.name.as_deref().unwrap_or_default();
        nix::fcntl::renameat2(dir, tmp, dir, name, RenameFlags::empty()).map_err(|e| match e {
            // The target is a mount point: a file mounted read-only into the sandbox.
            Errno::EBUSY => FileError::ReadOnly {
                path: shown.to_owned(),
                errno: e,
            },
            e => FileError::from_errno("rename", shown, e),
        })?;
        self.name = None;
        Ok(())
    }
}

impl Drop for TempFile<'_> {
    fn drop(&mut self) {
        if let Some(name) = self.name.take() {
            let _ = nix::unistd::unlinkat(self.dir, name.as_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// Capabilities a write needs while the thread's filesystem ids are the sandbox root's (the kernel drops
/// them from the effective set when the filesystem uid leaves 0).
const FS_CAPS: &[caps::Capability] = &[
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_DAC_READ_SEARCH,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_FSETID,
];

/// Switches the calling thread's filesystem uid/gid; restores them (and, through the kernel, the
/// capabilities) when dropped. `setfsuid` affects only the calling thread.
struct FsCreds {
    uid: u32,
    gid: u32,
}

impl FsCreds {
    fn become_owner(uid: u32, gid: u32) -> Result<Self, FileError> {
        let old_gid = nix::unistd::setfsgid(Gid::from_raw(gid)).as_raw();
        let old_uid = nix::unistd::setfsuid(Uid::from_raw(uid)).as_raw();
        let me = Self {
            uid: old_uid,
            gid: old_gid,
        };
        if old_uid == 0 && uid != 0 {
            for c in FS_CAPS {
                caps::raise(None, caps::CapSet::Effective, *c).map_err(|e| FileError::Os {
                    op: "raise capability",
                    path: format!("{c}: {e}"),
                    errno: Errno::EPERM,
                })?;
            }
        }
        Ok(me)
    }
}

impl Drop for FsCreds {
    fn drop(&mut self) {
        nix::unistd::setfsuid(Uid::from_raw(self.uid));
        nix::unistd::setfsgid(Gid::from_raw(self.gid));
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    use super::*;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn read_all(fs: &SandboxFs, p: &str) -> Result<Vec<u8>, FileError> {
        let mut f = fs.open_file(p)?;
        let mut v = Vec::new();
        f.file.read_to_end(&mut v).expect("read");
        Ok(v)
    }

    #[test]
    fn normalize_paths() {
        assert_eq!(normalize("/").unwrap(), Vec::<String>::new());
        assert_eq!(normalize("/a//b/./c/").unwrap(), ["a", "b", "c"]);
        assert_eq!(normalize("/a/b/../c").unwrap(), ["a", "c"]);
        for bad in ["a/b", "", "/..", "/a/../../b", "/a\0b"] {
            assert!(
                matches!(normalize(bad), Err(FileError::InvalidPath { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(link_target(&["a".into(), "b".into()], "../../../x"), ["x"]);
        assert_eq!(link_target(&["a".into()], "/etc/shadow"), ["etc", "shadow"]);
        assert_eq!(link_target(&["a".into()], "c/./d"), ["a", "c", "d"]);
    }

    #[test]
    fn round_trip_parents_and_mode() {
        let t = tempfile::tempdir().unwrap();
        let fs = SandboxFs::at_dir(t.path(), 0, 0).unwrap();
        let w = fs
            .write_file(
                "/x/y/z.txt",
                WriteOptions {
                    mode: Some(0o600),
                    parents: true,
                },
                &mut &b"hello"[..],
            )
            .unwrap();
        assert_eq!(
            w,
            Written {
                size: 5,
                mode: 0o600
            }
        );
        assert_eq!(read_all(&fs, "/x/y/z.txt").unwrap(), b"hello");
        let meta = std::fs::metadata(t.path().join("x/y/z.txt")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        let dmeta = std::fs::metadata(t.path().join("x/y")).unwrap();
        assert_eq!(dmeta.permissions().mode() & 0o7777, 0o755);
        // Without a mode the replaced file's is kept.
        fs.write_file("/x/y/z.txt", WriteOptions::default(), &mut &b"again"[..])
            .unwrap();
        let o = fs.open_file("/x/y/z.txt").unwrap();
        assert_eq!((o.size, o.mode), (5, 0o600));
        // parents=false with a missing parent.
        let e = fs
            .write_file(
                "/missing/f",
                WriteOptions {
                    mode: None,
                    parents: false,
                },
                &mut &b""[..],
            )
            .unwrap_err();
        assert!(matches!(e, FileError::NotFound { .. }), "{e:?}");
        // Errors of reads.
        assert!(matches!(
            fs.open_file("/nope"),
            Err(FileError::NotFound { .. })
        ));
        assert!(matches!(
            fs.open_file("/x"),
            Err(FileError::IsDirectory { .. })
        ));
        assert!(matches!(
            fs.open_file("/x/y/z.txt/w"),
            Err(FileError::NotDirectory { .. })
        ));
        assert!(matches!(
            fs.write_file("/x", WriteOptions::default(), &mut &b""[..]),
            Err(FileError::IsDirectory { .. })
        ));
        // Only the file itself is in the directory: no temporary file left.
        let names: Vec<_> = std::fs::read_dir(t.path().join("x/y"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["z.txt"]);
    }

    #[test]
    fn new_files_belong_to_the_owner() {
        if !is_root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let fs = SandboxFs::at_dir(t.path(), 100_000, 100_000).unwrap();
        fs.write_file("/d/f", WriteOptions::default(), &mut &b"x"[..])
            .unwrap();
        for p in ["d", "d/f"] {
            let m = std::fs::metadata(t.path().join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (100_000, 100_000), "{p}");
        }
        // A replaced file keeps its owner.
        std::fs::write(t.path().join("kept"), b"old").unwrap();
        std::os::unix::fs::chown(t.path().join("kept"), Some(100_005), Some(100_006)).unwrap();
        fs.write_file("/kept", WriteOptions::default(), &mut &b"new"[..])
            .unwrap();
        let m = std::fs::metadata(t.path().join("kept")).unwrap();
        assert_eq!((m.uid(), m.gid()), (100_005, 100_006));
        // The thread's filesystem ids are back.
        assert_eq!(nix::unistd::setfsuid(Uid::from_raw(0)).as_raw(), 0);
    }

    #[test]
    fn symlinks_stay_inside_the_root() {
        let host = tempfile::tempdir().unwrap();
        let marker = host.path().join("marker");
        std::fs::write(&marker, b"host secret").unwrap();
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/target"), b"inside").unwrap();
        // Absolute links to the host marker's real path, relative ones climbing out, a link to a
        // directory out of the root.
        symlink(&marker, root.join("abs")).unwrap();
        symlink(
            "../../../../../../../../".to_owned() + &marker.display().to_string(),
            root.join("rel"),
        )
        .unwrap();
        symlink(host.path(), root.join("dirlink")).unwrap();
        symlink("/etc/target", root.join("good")).unwrap();
        let fs = SandboxFs::at_dir(root, 0, 0).unwrap();
        assert_eq!(read_all(&fs, "/good").unwrap(), b"inside");
        for p in ["/abs", "/rel", "/dirlink/marker"] {
            match read_all(&fs, p) {
                Err(FileError::NotFound { .. }) => {}
                other => panic!("{p}: {other:?}"),
            }
        }
        // Writes through those links land inside the root (at the link target's path there).
        for p in ["/abs", "/rel", "/dirlink/marker"] {
            fs.write_file(p, WriteOptions::default(), &mut &b"written"[..])
                .unwrap();
        }
        assert_eq!(std::fs::read(&marker).unwrap(), b"host secret");
        let inside = root.join(marker.strip_prefix("/").unwrap());
        assert_eq!(std::fs::read(inside).unwrap(), b"written");
        // A symlink loop.
        symlink("/loop", root.join("loop")).unwrap();
        assert!(fs
            .write_file("/loop", WriteOptions::default(), &mut &b""[..])
            .is_err());
    }

    #[test]
    fn aborted_write_keeps_the_old_file() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0 == 0 {
                    return Err(std::io::Error::other("client went away"));
                }
                self.0 -= 1;
                buf[..3].copy_from_slice(b"new");
                Ok(3)
            }
        }
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("f"), b"old").unwrap();
        let fs = SandboxFs::at_dir(t.path(), 0, 0).unwrap();
        let e = fs
            .write_file("/f", WriteOptions::default(), &mut Failing(2))
            .unwrap_err();
        assert!(matches!(e, FileError::Aborted { .. }), "{e:?}");
        assert_eq!(std::fs::read(t.path().join("f")).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f"]);
    }

    #[test]
    fn fifo_is_not_read() {
        let t = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(&t.path().join("p"), Mode::from_bits_truncate(0o644)).unwrap();
        let fs = SandboxFs::at_dir(t.path(), 0, 0).unwrap();
        assert!(matches!(
            fs.open_file("/p"),
            Err(FileError::NotRegular { .. })
        ));
    }

    #[test]
    fn open_a_live_process_root() {
        if !is_root() {
            return;
        }
        let me = std::process::id() as i32;
        let rec = ProcRecord {
            pid: me,
            start_time: crate::sys::process_start_time(me).unwrap(),
        };
        let fs = SandboxFs::open(rec, 0).unwrap();
        assert!(fs.open_file("/proc/self/status").is_ok());
        let stale = ProcRecord {
            start_time: rec.start_time + 1,
            ..rec
        };
        assert!(matches!(
            SandboxFs::open(stale, 0),
            Err(FileError::NotRunning)
        ));
    }
}
