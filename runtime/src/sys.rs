//! The few raw syscalls that `nix` and `std` do not wrap, each behind a small safe function.
//!
//! Every `unsafe` block in the runtime's process code lives here, with the reason it is sound.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// The result of [`clone3_fork`].
#[derive(Debug)]
pub enum CloneResult {
    /// In the parent: the child's pid (in the parent's pid namespace) and a pidfd for it.
    Parent {
        /// Host pid of the child.
        pid: i32,
        /// pidfd of the child.
        pidfd: OwnedFd,
    },
    /// In the child.
    Child,
}

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `clone3()` with fork semantics (no shared memory, child continues on a copy of the parent's stack),
/// `CLONE_PIDFD` always set, the given namespace flags, and optionally `CLONE_INTO_CGROUP`.
///
/// The caller must be single-threaded (the sandbox supervisor and exec helper are): the child then owns a
/// consistent copy of the whole process, just as after `fork()`.
pub fn clone3_fork(ns_flags: u64, cgroup_fd: Option<BorrowedFd<'_>>) -> io::Result<CloneResult> {
    let mut pidfd: RawFd = -1;
    let mut args = CloneArgs {
        flags: ns_flags | libc::CLONE_PIDFD as u64,
        pidfd: std::ptr::addr_of_mut!(pidfd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    if let Some(fd) = cgroup_fd {
        args.flags |= 0x2_0000_0000; // CLONE_INTO_CGROUP
        args.cgroup = fd.as_raw_fd() as u64;
    }
    // SAFETY: clone3 with a NULL stack behaves like fork(): the child gets a copy-on-write copy of the
    // address space and returns 0 here. `args` and `pidfd` outlive the call; the size passed is the
    // struct's. The caller guarantees single-threadedness, so no lock is held by a vanished thread.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::addr_of_mut!(args),
            std::mem::size_of::<CloneArgs>(),
        )
    };
    let pid = cvt(ret)?;
    if pid == 0 {
        return Ok(CloneResult::Child);
    }
    // SAFETY: on success the kernel stored a fresh pidfd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(CloneResult::Parent {
        pid: pid as i32,
        pidfd,
    })
}

/// `pidfd_open(pid, 0)`.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes plain integers and returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = cvt(ret)?;
    // SAFETY: on success the return value is a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_send_signal(pidfd, sig, NULL, 0)`.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: i32) -> io::Result<()> {
    // SAFETY: a valid borrowed fd, a signal number and a NULL siginfo are what the syscall expects.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    cvt(ret).map(drop)
}

/// `setns(fd, flags)`: with a pidfd, joins several namespaces of that process at once.
pub fn setns(fd: BorrowedFd<'_>, flags: i32) -> io::Result<()> {
    // SAFETY: setns takes a valid fd and flags; it changes only this thread's namespaces.
    let ret = unsafe { libc::setns(fd.as_raw_fd(), flags) };
    cvt(ret.into()).map(drop)
}

/// `close_range(first, ~0, CLOSE_RANGE_CLOEXEC)`: marks every fd from `first` up close-on-exec.
pub fn cloexec_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on open fds; it closes nothing.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    cvt(ret).map(drop)
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;

/// Bind-mounts `src` at `dst` as an idmapped, read-only mount whose ids are shifted through the user
/// namespace `userns` (`open_tree(OPEN_TREE_CLONE)` + `mount_setattr(MOUNT_ATTR_IDMAP)` + `move_mount`).
pub fn idmapped_bind(src: &Path, dst: &Path, userns: BorrowedFd<'_>) -> io::Result<()> {
    let csrc = cpath(src)?;
    let cdst = cpath(dst)?;
    // SAFETY: open_tree reads a NUL-terminated path and returns a new detached-mount fd or -1.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            csrc.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
        )
    };
    let raw = cvt(ret)? as RawFd;
    // SAFETY: the fd was just returned by open_tree and is owned by nobody else.
    let tree = unsafe { OwnedFd::from_raw_fd(raw) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let empty = c"";
    // SAFETY: mount_setattr reads `attr` (size given) and an empty path relative to a valid fd.
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
    cvt(ret)?;
    // SAFETY: move_mount reads two NUL-terminated paths and valid fds; it attaches the detached tree.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            cdst.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    cvt(ret).map(drop)
}

/// Brings the loopback interface of the current network namespace up.
pub fn loopback_up() -> io::Result<()> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into `req`, which outlives the call.
    let ret = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCGIFFLAGS,
            std::ptr::addr_of_mut!(req),
        )
    };
    cvt(ret.into())?;
    // SAFETY: after SIOCGIFFLAGS the flags member of the union is the initialised one.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads `req`, which is fully initialised.
    let ret = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCSIFFLAGS,
            std::ptr::addr_of!(req),
        )
    };
    cvt(ret.into()).map(drop)
}

/// Makes descriptor `fd` available as `target` across exec (dup2, or clearing close-on-exec when it already
/// is `target`). For a forked child between fork and exec: only async-signal-safe calls.
pub fn place_fd(fd: RawFd, target: RawFd) -> io::Result<()> {
    if fd == target {
        // SAFETY: F_GETFD on a descriptor number has no memory effects.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: F_SETFD only changes the descriptor's flags.
        let ret = unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) };
        return cvt(ret.into()).map(drop);
    }
    // SAFETY: dup2 onto a descriptor number the caller reserved for this purpose.
    let ret = unsafe { libc::dup2(fd, target) };
    cvt(ret.into()).map(drop)
}

/// Closes a descriptor number in a forked child that will exec or exit without returning, where the
/// `OwnedFd` holding it is never dropped.
pub fn close_fd(fd: RawFd) {
    // SAFETY: the caller is a forked child that never returns to the code owning `fd`, so no double close
    // or use after close can follow.
    let _ = unsafe { libc::close(fd) };
}

/// `_exit(code)`: ends a forked child without running atexit handlers or flushing stdio buffers it shares
/// with the parent.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and is async-signal-safe.
    unsafe { libc::_exit(code) }
}

/// Resets every signal's disposition to the default and unblocks all signals (before exec of user code).
pub fn reset_signals() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in Signal::iterator() {
        if sig == Signal::SIGKILL || sig == Signal::SIGSTOP {
            continue;
        }
        // SAFETY: installing SIG_DFL cannot violate any handler invariant; no Rust handler is replaced by
        // code that would run with broken assumptions.
        let _ = unsafe { sigaction(sig, &dfl) };
    }
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// Installs a no-op handler for `sig`, so that a pid-namespace init is not deaf to it (the kernel drops
/// signals with the default disposition sent to such an init).
pub fn install_noop_handler(sig: nix::sys::signal::Signal) -> io::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    extern "C" fn noop(_: libc::c_int) {}
    let act = SigAction::new(
        SigHandler::Handler(noop),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler does nothing, so it is async-signal-safe.
    unsafe { sigaction(sig, &act) }
        .map(drop)
        .map_err(io::Error::from)
}

/// The start time (field 22 of `/proc/<pid>/stat`, in clock ticks since boot) of a process: together with
/// the pid it names one process for good, even after the pid is reused.
pub fn process_start_time(pid: i32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces and ')': fields after it follow the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed stat"))?;
    rest.split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed stat"))
}

/// Opens a pidfd for `pid` only if that pid still names the process that started at `start_time`.
pub fn pidfd_open_checked(pid: i32, start_time: u64) -> io::Result<OwnedFd> {
    let fd = pidfd_open(pid)?;
    // Checked after opening: if the start time matches now, the pidfd refers to that very process.
    match process_start_time(pid) {
        Ok(t) if t == start_time => Ok(fd),
        Ok(_) => Err(io::Error::from_raw_os_error(libc::ESRCH)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(io::Error::from_raw_os_error(libc::ESRCH))
        }
        Err(e) => Err(e),
    }
}

/// Sets the window size of a terminal (`TIOCSWINSZ`).
pub fn set_winsize(tty: BorrowedFd<'_>, cols: u16, rows: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which points to a live local.
    let ret = unsafe {
        libc::ioctl(
            tty.as_raw_fd(),
            libc::TIOCSWINSZ,
            &ws as *const libc::winsize,
        )
    };
    cvt(ret as libc::c_long).map(drop)
}

/// Makes `tty` the controlling terminal of the calling session leader (`TIOCSCTTY`).
pub fn set_controlling_tty(tty: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal) and no pointer.
    let ret = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSCTTY, 0 as libc::c_int) };
    cvt(ret as libc::c_long).map(drop)
}

/// The window size of a terminal (`TIOCGWINSZ`): columns and rows.
pub fn get_winsize(tty: BorrowedFd<'_>) -> io::Result<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which points to a live local.
    let ret = unsafe {
        libc::ioctl(
            tty.as_raw_fd(),
            libc::TIOCGWINSZ,
            &mut ws as *mut libc::winsize,
        )
    };
    cvt(ret as libc::c_long)?;
    Ok((ws.ws_col, ws.ws_row))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self() {
        let me = std::process::id() as i32;
        let t = process_start_time(me).unwrap();
        assert!(t > 0);
        assert!(pidfd_open_checked(me, t).is_ok());
        assert!(pidfd_open_checked(me, t + 1).is_err());
    }
}
