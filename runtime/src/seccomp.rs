//! The default seccomp filter: close to Docker's default profile, expressed as a denylist (default action
//! ALLOW) built with seccompiler for the host architecture.
//!
//! - `EPERM`: kernel modules, kexec, bpf, perf_event_open, the keyring, accounting/swap/reboot/syslog, clock
//!   setting, raw port I/O, quotas, file handles, userfaultfd, fanotify, the new mount API, pivot_root, `unshare`
//!   and `setns`, `clone` with any namespace flag, and `personality` other than the Docker-allowed personas.
//! - `ENOSYS`: `clone3` (its flags live in memory that seccomp cannot inspect; libc then falls back to `clone`,
//!   which is filtered by flags, as Docker does).
//! - `KILL_PROCESS`: any other architecture (i386 `int 0x80`, arm32 compat: seccompiler's arch check) and, on
//!   x86_64, any x32 syscall (`nr & 0x40000000`), which would otherwise bypass the number-based rules.
//!
//! Allowed on purpose (capabilities decide): ptrace, kcmp, process_vm_readv/writev, mount/umount2, chroot,
//! mbind/set_mempolicy/move_pages.
//!
//! seccompiler gives one match action per filter, so the program is a small hand-written prologue (arch check,
//! x32 guard, clone3 → ENOSYS) followed by seccompiler's EPERM program; BPF jumps are relative and the prologue
//! only falls through into the seccompiler part, which repeats its own arch check.

use std::sync::OnceLock;

use seccompiler::{
    sock_filter, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub use seccompiler::BpfProgram;

/// Errors of the seccomp module.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp is not supported on architecture {0}")]
    UnsupportedArch(&'static str),
    #[error("building the seccomp filter: {0}")]
    Build(String),
    #[error("installing the seccomp filter: {0}")]
    Install(#[source] seccompiler::Error),
}

// BPF opcodes (linux/bpf_common.h) for the prologue.
/// BPF_LD | BPF_W | BPF_ABS (BPF_LD and BPF_W are 0).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;
// struct seccomp_data offsets.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
// linux/audit.h
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
const AUDIT_ARCH_AARCH64: u32 = 183 | 0x8000_0000 | 0x4000_0000;
const AUDIT_ARCH_RISCV64: u32 = 243 | 0x8000_0000 | 0x4000_0000;
/// x86_64: syscall numbers with this bit set are x32 ABI calls.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// x86_64 `create_module` (174, removed in 2.6 but still in the table; libc has no constant).
#[cfg(target_arch = "x86_64")]
const SYS_CREATE_MODULE: libc::c_long = 174;

/// Namespace flags that `clone` must not carry.
const CLONE_NS_FLAGS: [libc::c_int; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
];

/// `personality(2)` values Docker allows: PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32, query.
const PERSONALITY_ALLOWED: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// Syscalls answered with EPERM whatever their arguments.
fn denied_syscalls() -> Vec<libc::c_long> {
    let mut v: Vec<libc::c_long> = vec![
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_acct,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        libc::SYS_syslog,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_lookup_dcookie,
        libc::SYS_quotactl,
        libc::SYS_quotactl_fd,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_userfaultfd,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_nfsservctl,
        libc::SYS_fanotify_init,
        libc::SYS_pivot_root,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_mount_setattr,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS_uselib,
        libc::SYS__sysctl,
    ]);
    #[cfg(target_arch = "x86_64")]
    v.push(SYS_CREATE_MODULE);
    v
}

fn host_arch() -> Result<(TargetArch, u32), SeccompError> {
    let arch = std::env::consts::ARCH;
    let target = TargetArch::try_from(arch).map_err(|_| SeccompError::UnsupportedArch(arch))?;
    let audit = match target {
        TargetArch::x86_64 => AUDIT_ARCH_X86_64,
        TargetArch::aarch64 => AUDIT_ARCH_AARCH64,
        TargetArch::riscv64 => AUDIT_ARCH_RISCV64,
    };
    Ok((target, audit))
}

fn build_err(e: impl std::fmt::Display) -> SeccompError {
    SeccompError::Build(e.to_string())
}

fn cond(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, len, op, value).map_err(build_err)
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// Arch check, x32 guard, clone3 → ENOSYS; falls through to the next instruction otherwise.
fn prologue(audit_arch: u32) -> Vec<sock_filter> {
    let errno_enosys = libc::SECCOMP_RET_ERRNO | (libc::ENOSYS as u32 & libc::SECCOMP_RET_DATA);
    let mut p = vec![
        stmt(BPF_LD_W_ABS, DATA_ARCH),
        jump(BPF_JMP_JEQ_K, audit_arch, 1, 0),
        stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, DATA_NR),
    ];
    #[cfg(target_arch = "x86_64")]
    p.extend([
        jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS),
    ]);
    p.extend([
        jump(BPF_JMP_JEQ_K, libc::SYS_clone3 as u32, 0, 1),
        stmt(BPF_RET_K, errno_enosys),
    ]);
    p
}

/// Builds the default filter (uncached). Use [`default_filter`].
pub fn build_default_filter() -> Result<BpfProgram, SeccompError> {
    let (target, audit) = host_arch()?;
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> = denied_syscalls()
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();

    // clone: EPERM if arg0 (flags) has any namespace flag; one rule per flag (rules are OR-ed).
    let mut clone_rules = Vec::new();
    for flag in CLONE_NS_FLAGS {
        let f = u64::from(flag as u32);
        clone_rules.push(
            SeccompRule::new(vec![cond(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(f),
                f,
            )?])
            .map_err(build_err)?,
        );
    }
    rules.insert(libc::SYS_clone, clone_rules);

    // personality: EPERM unless arg0 is one of the allowed personas (conditions of a rule are AND-ed).
    let personality = PERSONALITY_ALLOWED
        .iter()
        .map(|&v| cond(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, v))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(
        libc::SYS_personality,
        vec![SeccompRule::new(personality).map_err(build_err)?],
    );

    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        target,
    )
    .map_err(build_err)?;
    let body: BpfProgram = filter.try_into().map_err(build_err)?;
    let mut prog = prologue(audit);
    prog.extend(body);
    if prog.len() >= 4096 {
        return Err(SeccompError::Build(format!(
            "filter too long: {} instructions",
            prog.len()
        )));
    }
    Ok(prog)
}

/// The default filter, compiled once per process and cloned (a few hundred bytes) on every call.
pub fn default_filter() -> Result<BpfProgram, SeccompError> {
    static CACHE: OnceLock<Result<BpfProgram, String>> = OnceLock::new();
    CACHE
        .get_or_init(|| build_default_filter().map_err(|e| e.to_string()))
        .clone()
        .map_err(SeccompError::Build)
}

/// Installs `prog` on the calling thread (and the children it creates afterwards). seccompiler sets
/// `PR_SET_NO_NEW_PRIVS` first. Allocation-free on success, so usable between fork and exec.
pub fn install(prog: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(prog).map_err(SeccompError::Install)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_quickly() {
        let start = std::time::Instant::now();
        let prog = build_default_filter().expect("build");
        let took = start.elapsed();
        eprintln!(
            "default seccomp filter: {} instructions built in {:?}",
            prog.len(),
            took
        );
        assert!(prog.len() > 40 && prog.len() < 4096);
        assert!(took < std::time::Duration::from_millis(50), "took {took:?}");
        assert_eq!(default_filter().expect("cached"), prog);
        // Median of repeated builds, to report a number not dominated by first-touch costs.
        let mut times: Vec<_> = (0..50)
            .map(|_| {
                let t = std::time::Instant::now();
                let _ = build_default_filter();
                t.elapsed()
            })
            .collect();
        times.sort();
        eprintln!("median build time {:?}", times[25]);
        assert!(times[25] < std::time::Duration::from_millis(1));
    }

    fn errno() -> i32 {
        // SAFETY: __errno_location has no preconditions and returns the calling thread's errno slot.
        let slot = unsafe { libc::__errno_location() };
        // SAFETY: the slot is valid and aligned for the lifetime of the thread.
        unsafe { *slot }
    }

    /// Runs `body` in a forked child after installing the default filter; returns the child's wait status.
    /// The child only makes raw syscalls (async-signal-safe) and leaves with `_exit`.
    fn in_filtered_child(body: fn() -> i32) -> nix::sys::wait::WaitStatus {
        let prog = default_filter().expect("build");
        // SAFETY: the child only calls async-signal-safe functions (prctl, seccomp, raw syscalls, _exit) and
        // never returns into the test harness.
        let fork = unsafe { nix::unistd::fork() }.expect("fork");
        match fork {
            nix::unistd::ForkResult::Child => {
                let code = match install(&prog) {
                    Ok(()) => body(),
                    Err(_) => 100,
                };
                // SAFETY: _exit is async-signal-safe and ends the child without running the parent's atexit state.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).expect("waitpid")
            }
        }
    }

    fn probe_denials() -> i32 {
        // SAFETY: getpid has no arguments and cannot fail.
        if unsafe { libc::getpid() } <= 0 {
            return 1;
        }
        // SAFETY: unshare with a flag value; no memory passed.
        if unsafe { libc::unshare(libc::CLONE_NEWUTS) } != -1 || errno() != libc::EPERM {
            return 2;
        }
        // SAFETY: keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0): integer arguments only.
        if unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                0 as libc::c_long,
                -3 as libc::c_long,
                0 as libc::c_long,
            )
        } != -1
            || errno() != libc::EPERM
        {
            return 3;
        }
        // SAFETY: clone3 with a null args pointer and size 0: the filter answers before the kernel reads memory.
        if unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0 as libc::size_t) }
            != -1
            || errno() != libc::ENOSYS
        {
            return 4;
        }
        // SAFETY: raw clone with CLONE_NEWUSER|SIGCHLD and a null stack (fork-like); if it ever succeeded the
        // grandchild leaves at once with _exit.
        let r = unsafe {
            libc::syscall(
                libc::SYS_clone,
                (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_long,
                0 as libc::c_long,
                0 as libc::c_long,
                0 as libc::c_long,
                0 as libc::c_long,
            )
        };
        if r == 0 {
            // SAFETY: async-signal-safe exit of the unexpected grandchild.
            unsafe { libc::_exit(0) }
        }
        if r != -1 || errno() != libc::EPERM {
            return 5;
        }
        // SAFETY: personality with an integer; 0xffffffff only queries.
        if unsafe { libc::personality(0xffff_ffff) } == -1 {
            return 6;
        }
        // SAFETY: personality(ADDR_NO_RANDOMIZE): an integer argument; must be refused.
        if unsafe { libc::personality(0x0040000) } != -1 || errno() != libc::EPERM {
            return 7;
        }
        // SAFETY: bpf(BPF_MAP_CREATE, NULL, 0): refused by the filter before the kernel reads memory.
        if unsafe {
            libc::syscall(
                libc::SYS_bpf,
                0 as libc::c_long,
                std::ptr::null::<u8>(),
                0 as libc::c_long,
            )
        } != -1
            || errno() != libc::EPERM
        {
            return 8;
        }
        // A plain fork (clone without namespace flags) still works.
        // SAFETY: fork in a single-threaded child; the grandchild exits immediately.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: async-signal-safe exit.
            unsafe { libc::_exit(0) }
        }
        if pid < 0 {
            return 9;
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
            return 10;
        }
        0
    }

    #[test]
    fn filter_denies_in_child() {
        let status = in_filtered_child(probe_denials);
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(status.pid().expect("pid"), 0),
            "{status:?}"
        );
    }

    #[cfg(target_arch = "x86_64")]
    fn probe_x32() -> i32 {
        // SAFETY: x32 getpid (39 | X32 bit); the filter kills the process before the kernel sees it.
        unsafe { libc::syscall(39 | 0x4000_0000) };
        50
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x32_syscall_kills() {
        let status = in_filtered_child(probe_x32);
        assert!(
            matches!(
                status,
                nix::sys::wait::WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSYS, _)
            ),
            "{status:?}"
        );
    }
}
