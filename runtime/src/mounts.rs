//! Mounted files and scratch volumes, set up by the sandbox's init.
//!
//! Two steps, because of where the init stands:
//! 1. [`UserMounts::prepare`], while the init still has the host's root uid and the host's root is still
//!    its root: each mounted file (prepared by the daemon in the state directory, with its mode and owned
//!    by the sandbox's root) is cloned into a detached bind mount (`open_tree(OPEN_TREE_CLONE)`) and made
//!    read-only, nosuid, nodev and noexec (`mount_setattr`) before it is attached anywhere.
//! 2. [`UserMounts::attach`], after `pivot_root` and after the old root is detached, so that nothing of the
//!    host is reachable from `/` any more: every target is resolved with `openat2(RESOLVE_IN_ROOT |
//!    RESOLVE_NO_MAGICLINKS)` from the new root (an image's symlink cannot steer a mount out of the
//!    sandbox; one at the mount point itself is replaced), missing parents are created (0755, owned by
//!    the sandbox's root), and the mounts are attached
//!    through descriptors (`move_mount` for files, `/proc/self/fd/N` as the tmpfs mount point for volumes),
//!    parents first.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::mount::MsFlags;
use nix::sys::stat::{fstatat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;

use crate::files::{normalize, FileError, SandboxFs};
use crate::spec::SandboxSpec;

/// Errors of setting up mounted files and volumes; each names the path inside the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A target path is not a valid absolute path.
    #[error("mount path {0}")]
    Path(#[from] FileError),
    /// A setup step failed.
    #[error("{step} {path}: {errno} ({})", errno.desc())]
    Step {
        /// What was being done.
        step: &'static str,
        /// The path (inside the sandbox, or the source on the host).
        path: String,
        /// The error.
        errno: Errno,
    },
}

fn step<'a>(step: &'static str, path: &'a str) -> impl FnOnce(Errno) -> MountError + 'a {
    move |errno| MountError::Step {
        step,
        path: path.to_owned(),
        errno,
    }
}

fn io_step<'a>(
    what: &'static str,
    path: &'a str,
) -> impl FnOnce(std::io::Error) -> MountError + 'a {
    move |e| MountError::Step {
        step: what,
        path: path.to_owned(),
        errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

/// Mounted files and volumes of one sandbox, between [`UserMounts::prepare`] and [`UserMounts::attach`].
#[derive(Debug, Default)]
pub struct UserMounts {
    /// Target components and the detached read-only mount of the source.
    files: Vec<(Vec<String>, OwnedFd)>,
    /// Target components and size in bytes.
    volumes: Vec<(Vec<String>, u64)>,
}

impl UserMounts {
    /// Step 1 (see the module documentation).
    pub fn prepare(spec: &SandboxSpec) -> Result<Self, MountError> {
        let mut me = Self::default();
        for f in &spec.mounted_files {
            let comps = normalize(&f.target)?;
            let tree = clone_readonly(&f.source)?;
            me.files.push((comps, tree));
        }
        for v in &spec.volumes {
            me.volumes.push((normalize(&v.target)?, v.size_bytes));
        }
        Ok(me)
    }

    /// True when there is nothing to mount.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.volumes.is_empty()
    }

    /// Step 2 (see the module documentation): volumes first (a file may be placed on one), each list
    /// parents first.
    pub fn attach(mut self) -> Result<(), MountError> {
        if self.is_empty() {
            return Ok(());
        }
        let root = SandboxFs::at_dir(Path::new("/"), 0, 0)?;
        self.volumes.sort_by_key(|(c, _)| c.len());
        self.files.sort_by_key(|(c, _)| c.len());
        for (comps, size) in &self.volumes {
            let shown = format!("/{}", comps.join("/"));
            let Some((name, parent)) = comps.split_last() else {
                return Err(step("mount a volume at", "/")(Errno::EBUSY));
            };
            let parent = root.open_dir(parent, true)?;
            refuse_special_fs(&parent, &shown)?;
            let dir = dir_target(&parent, name, &shown)?;
            // One inode per 4 KiB of data (what small files need), at least 1024.
            let inodes = (size / 4096).clamp(1024, 1 << 20);
            let data = format!("size={size},nr_inodes={inodes},mode=1777");
            let target = format!("/proc/self/fd/{}", dir.as_raw_fd());
            nix::mount::mount(
                Some("tmpfs"),
                target.as_str(),
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some(data.as_str()),
            )
            .map_err(step("mount volume at", &shown))?;
        }
        for (comps, tree) in &self.files {
            let shown = format!("/{}", comps.join("/"));
            let Some((name, parent)) = comps.split_last() else {
                return Err(step("mount a file at", "/")(Errno::EISDIR));
            };
            let dir = root.open_dir(parent, true)?;
            refuse_special_fs(&dir, &shown)?;
            let target = file_target(&dir, name, &shown)?;
            move_mount(tree, &target).map_err(io_step("mount file at", &shown))?;
        }
        Ok(())
    }
}

/// A regular (or other non-directory) file named `name` in `dir`, created empty when missing; an image's
/// symlink there is replaced (as for the other files the sandbox's setup places). Opened `O_PATH`.
fn file_target(dir: &OwnedFd, name: &str, shown: &str) -> Result<OwnedFd, MountError> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits() => {
            return Err(step("mount a file over a directory at", shown)(
                Errno::EISDIR,
            ));
        }
        Ok(st) if st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFLNK.bits() => {
            nix::unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)
                .map_err(step("unlink image symlink", shown))?;
            create_empty(dir, name, shown)?;
        }
        Ok(_) => {}
        Err(Errno::ENOENT) => create_empty(dir, name, shown)?,
        Err(e) => return Err(step("stat", shown)(e)),
    }
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    openat2(dir, name, how).map_err(step("open", shown))
}

/// The directory named `name` in `dir`, created when missing; an image's symlink there is replaced.
fn dir_target(dir: &OwnedFd, name: &str, shown: &str) -> Result<OwnedFd, MountError> {
    let mkdir = || {
        nix::sys::stat::mkdirat(dir, name, Mode::from_bits_truncate(0o755))
            .map_err(step("mkdir", shown))
    };
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits() => {}
        Ok(st) if st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFLNK.bits() => {
            nix::unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)
                .map_err(step("unlink image symlink", shown))?;
            mkdir()?;
        }
        Ok(_) => return Err(step("mount a volume over a file at", shown)(Errno::ENOTDIR)),
        Err(Errno::ENOENT) => mkdir()?,
        Err(e) => return Err(step("stat", shown)(e)),
    }
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    openat2(dir, name, how).map_err(step("open", shown))
}

fn create_empty(dir: &OwnedFd, name: &str, shown: &str) -> Result<(), MountError> {
    openat(
        dir,
        name,
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o444),
    )
    .map(drop)
    .map_err(step("create", shown))
}

/// Mounting onto proc or sysfs (reached through an image's symlink) is refused.
fn refuse_special_fs(dir: &OwnedFd, shown: &str) -> Result<(), MountError> {
    let st = nix::sys::statfs::fstatfs(dir).map_err(step("statfs", shown))?;
    let t = st.filesystem_type();
    if t == nix::sys::statfs::PROC_SUPER_MAGIC || t == nix::sys::statfs::SYSFS_MAGIC {
        return Err(step("refusing to mount on proc or sysfs at", shown)(
            Errno::EPERM,
        ));
    }
    Ok(())
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
const MOUNT_ATTR_NOSUID: u64 = 0x0000_0002;
const MOUNT_ATTR_NODEV: u64 = 0x0000_0004;
const MOUNT_ATTR_NOEXEC: u64 = 0x0000_0008;

fn cvt(ret: libc::c_long) -> std::io::Result<libc::c_long> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A detached bind mount of the host file `source`, read-only, nosuid, nodev, noexec.
fn clone_readonly(source: &Path) -> Result<OwnedFd, MountError> {
    let shown = source.display().to_string();
    let csrc = std::ffi::CString::new(source.as_os_str().as_encoded_bytes())
        .map_err(|_| step("open", &shown)(Errno::EINVAL))?;
    // SAFETY: open_tree reads a NUL-terminated path that outlives the call and returns a new fd or -1.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            csrc.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
        )
    };
    let raw = cvt(ret).map_err(io_step("clone a mount of", &shown))? as RawFd;
    // SAFETY: the fd was just returned by open_tree and is owned by nobody else.
    let tree = unsafe { OwnedFd::from_raw_fd(raw) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let empty = c"";
    // SAFETY: mount_setattr reads `attr` (its size given) and an empty path relative to a valid fd.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            std::ptr::addr_of!(attr),
            std::mem::size_of::<MountAttr>(),
        )
    };
    cvt(ret).map_err(io_step("make read-only the mount of", &shown))?;
    Ok(tree)
}

/// Attaches the detached mount `tree` on the file `target` refers to.
fn move_mount(tree: &OwnedFd, target: &OwnedFd) -> std::io::Result<()> {
    let empty = c"";
    // SAFETY: move_mount reads two empty NUL-terminated paths relative to two valid fds.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            target.as_raw_fd(),
            empty.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    cvt(ret).map(drop)
}
