//! The last steps before user code runs, shared by a sandbox's main process and by exec'd processes:
//! user lookup in the sandbox's own `/etc/passwd`, credentials, capabilities cut to Docker's default set,
//! `no_new_privs`, rlimits, seccomp, the cwd check and the `PATH` lookup.
//!
//! Everything here runs in a freshly forked, single-threaded child that is already inside the sandbox's
//! namespaces with the sandbox's root as `/`.

use std::collections::HashSet;
use std::ffi::CString;
use std::io::Write;
use std::path::{Path, PathBuf};

use caps::{CapSet, Capability};
use nix::unistd::{Gid, Uid};

use crate::spec::ProcessSpec;

/// Docker's default capability set (14 capabilities).
pub const DEFAULT_CAPS: [Capability; 14] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FSETID,
    Capability::CAP_FOWNER,
    Capability::CAP_MKNOD,
    Capability::CAP_NET_RAW,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_KILL,
    Capability::CAP_AUDIT_WRITE,
];

/// Default `PATH` when the environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Soft and hard `RLIMIT_NOFILE` given to user code (the hard limit never exceeds the inherited one).
pub const NOFILE_LIMITS: (u64, u64) = (1024, 524_288);

/// Resolved credentials of a user inside a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// uid inside the sandbox.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
    /// Supplementary gids.
    pub groups: Vec<u32>,
    /// Home directory from passwd, when known.
    pub home: Option<String>,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 || l.starts_with('#') {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_owned(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_owned(),
            })
        })
        .collect()
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 || l.starts_with('#') {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_owned(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect(),
            })
        })
        .collect()
}

/// Resolves `user[:group]` (names or numbers) against passwd and group file contents, like Docker:
/// a numeric uid need not exist in passwd; a name must.
pub fn resolve_user_in(user: &str, passwd: &str, group: &str) -> Result<Credentials, String> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let u = if u.is_empty() { "0" } else { u };
    let users = parse_passwd(passwd);
    let groups = parse_group(group);
    let entry = match u.parse::<u32>() {
        Ok(uid) => users.iter().find(|e| e.uid == uid),
        Err(_) => Some(users.iter().find(|e| e.name == u).ok_or_else(|| {
            format!("unable to find user {u}: no matching entries in passwd file")
        })?),
    };
    let uid = match (u.parse::<u32>(), entry) {
        (Ok(uid), _) => uid,
        (Err(_), Some(e)) => e.uid,
        (Err(_), None) => return Err(format!("unable to find user {u}")),
    };
    let gid = match g {
        Some(g) if !g.is_empty() => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| {
                    format!("unable to find group {g}: no matching entries in group file")
                })?,
        },
        _ => entry.map_or(0, |e| e.gid),
    };
    let mut extra: Vec<u32> = match (g, entry) {
        (None, Some(e)) => groups
            .iter()
            .filter(|gr| gr.members.contains(&e.name))
            .map(|gr| gr.gid)
            .collect(),
        _ => Vec::new(),
    };
    if !extra.contains(&gid) {
        extra.insert(0, gid);
    }
    if uid >= crate::spec::ID_RANGE || gid >= crate::spec::ID_RANGE {
        return Err(format!(
            "user {user} resolves to uid {uid} gid {gid}, outside the sandbox's id range 0-{}",
            crate::spec::ID_RANGE - 1
        ));
    }
    extra.retain(|g| *g < crate::spec::ID_RANGE);
    Ok(Credentials {
        uid,
        gid,
        groups: extra,
        home: entry.map(|e| e.home.clone()),
    })
}

/// Resolves `user[:group]` against the current root's `/etc/passwd` and `/etc/group`.
pub fn resolve_user(user: &str) -> Result<Credentials, String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    resolve_user_in(user, &passwd, &group)
}

/// Looks `prog` up in `path` (a `PATH` value) the way a shell does.
/// Errors carry the shell's exit status (127 not found, 126 not executable) and a message.
pub fn lookup_path(prog: &str, path: &str) -> Result<PathBuf, (i32, String)> {
    if prog.is_empty() {
        return Err((127, "exec: empty command".to_owned()));
    }
    if prog.contains('/') {
        return Ok(PathBuf::from(prog));
    }
    let mut found_not_exec = None;
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let cand = Path::new(dir).join(prog);
        match std::fs::metadata(&cand) {
            Ok(m) if m.is_file() => {
                if nix::unistd::access(&cand, nix::unistd::AccessFlags::X_OK).is_ok() {
                    return Ok(cand);
                }
                found_not_exec.get_or_insert(cand);
            }
            _ => continue,
        }
    }
    match found_not_exec {
        Some(p) => Err((
            126,
            format!("exec: {:?}: permission denied", p.display().to_string()),
        )),
        None => Err((
            127,
            format!("exec: {prog:?}: executable file not found in $PATH"),
        )),
    }
}

/// Builds the final environment: `env`, plus `PATH`, `HOME` and `HOSTNAME` when absent.
pub fn final_env(env: &[String], home: Option<&str>, hostname: Option<&str>) -> Vec<String> {
    let mut out: Vec<String> = env.to_vec();
    let has = |out: &Vec<String>, k: &str| {
        out.iter()
            .any(|e| e.split_once('=').is_some_and(|(kk, _)| kk == k))
    };
    if !has(&out, "PATH") {
        out.push(format!("PATH={DEFAULT_PATH}"));
    }
    if !has(&out, "HOME") {
        out.push(format!(
            "HOME={}",
            home.filter(|h| !h.is_empty()).unwrap_or("/")
        ));
    }
    if let Some(h) = hostname {
        if !has(&out, "HOSTNAME") {
            out.push(format!("HOSTNAME={h}"));
        }
    }
    out
}

fn fail(code: i32, msg: &str) -> ! {
    let _ = writeln!(std::io::stderr(), "sandboxd: {msg}");
    crate::sys::exit_now(code)
}

fn set_caps(uid: u32) -> Result<(), String> {
    let keep: HashSet<Capability> = DEFAULT_CAPS.into_iter().collect();
    for cap in caps::all() {
        if !keep.contains(&cap) {
            // Capabilities the running kernel does not know fail with EINVAL: nothing to drop then.
            let _ = caps::drop(None, CapSet::Bounding, cap);
        }
    }
    caps::clear(None, CapSet::Ambient)
        .map_err(|e| format!("clearing ambient capabilities: {e}"))?;
    caps::clear(None, CapSet::Inheritable)
        .map_err(|e| format!("clearing inheritable capabilities: {e}"))?;
    let target = if uid == 0 { keep } else { HashSet::new() };
    caps::set(None, CapSet::Effective, &target)
        .map_err(|e| format!("setting effective capabilities: {e}"))?;
    caps::set(None, CapSet::Permitted, &target)
        .map_err(|e| format!("setting permitted capabilities: {e}"))?;
    Ok(())
}

fn to_cstrings(v: &[String]) -> Result<Vec<CString>, String> {
    v.iter()
        .map(|s| {
            CString::new(s.as_bytes())
                .map_err(|_| format!("argument or variable {s:?} contains a NUL byte"))
        })
        .collect()
}

/// Turns the calling (forked, single-threaded, in-sandbox) process into `spec`'s program, never returning.
///
/// stdio must already be in place on fds 0-2. Failures before `execve` are written to stderr as one line
/// starting with `sandboxd:` and end the process with a shell-like status (127: command not found,
/// 126: could not be run).
pub fn exec_user_process(
    spec: &ProcessSpec,
    hostname: Option<&str>,
    filter: Option<&seccompiler::BpfProgram>,
) -> ! {
    crate::sys::reset_signals();
    let _ = nix::unistd::setsid();
    let creds = resolve_user(&spec.user).unwrap_or_else(|e| fail(126, &e));
    let env = final_env(&spec.env, creds.home.as_deref(), hostname);
    let argv = to_cstrings(&spec.args).unwrap_or_else(|e| fail(126, &e));
    let envp = to_cstrings(&env).unwrap_or_else(|e| fail(126, &e));
    let path_var = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
        .to_owned();

    let (soft, hard) = NOFILE_LIMITS;
    if let Ok((_, cur_hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let hard = hard.min(cur_hard);
        let _ = nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_NOFILE,
            soft.min(hard),
            hard,
        );
    }

    let gids: Vec<Gid> = creds.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    if let Err(e) = nix::unistd::setgroups(&gids) {
        fail(126, &format!("setgroups: {e}"));
    }
    let gid = Gid::from_raw(creds.gid);
    if let Err(e) = nix::unistd::setresgid(gid, gid, gid) {
        fail(126, &format!("setgid {}: {e}", creds.gid));
    }
    // Bounding set and ambient/inheritable are cut while we still hold CAP_SETPCAP.
    if let Err(e) = set_caps(0) {
        fail(126, &e);
    }
    let uid = Uid::from_raw(creds.uid);
    if let Err(e) = nix::unistd::setresuid(uid, uid, uid) {
        fail(126, &format!("setuid {}: {e}", creds.uid));
    }
    if creds.uid != 0 {
        if let Err(e) = set_caps(creds.uid) {
            fail(126, &e);
        }
    }

    let cwd = if spec.cwd.is_empty() {
        "/"
    } else {
        spec.cwd.as_str()
    };
    if let Err(e) = nix::unistd::chdir(cwd) {
        fail(126, &format!("chdir to {cwd:?}: {e}"));
    }
    // CVE-2024-21626: the cwd must be reachable from the sandbox's root.
    match std::env::current_dir() {
        Ok(p) if p.is_absolute() && !p.to_string_lossy().starts_with("(unreachable)") => {}
        _ => fail(
            126,
            &format!("working directory {cwd:?} is outside the sandbox"),
        ),
    }

    if let Err(e) = nix::sys::prctl::set_no_new_privs() {
        fail(126, &format!("no_new_privs: {e}"));
    }
    if let Err(e) = crate::sys::cloexec_from(3) {
        fail(126, &format!("close_range: {e}"));
    }
    let prog = match lookup_path(&spec.args[0], &path_var) {
        Ok(p) => p,
        Err((code, msg)) => fail(code, &msg),
    };
    let cprog = CString::new(prog.as_os_str().as_encoded_bytes())
        .unwrap_or_else(|_| fail(126, "NUL in path"));
    if let Some(f) = filter {
        if let Err(e) = crate::seccomp::install(f) {
            fail(126, &format!("seccomp: {e}"));
        }
    }
    let err = nix::unistd::execve(&cprog, &argv, &envp).unwrap_err();
    match err {
        nix::errno::Errno::ENOENT => fail(
            127,
            &format!("exec: {:?}: no such file or directory", spec.args[0]),
        ),
        nix::errno::Errno::EACCES => {
            fail(126, &format!("exec: {:?}: permission denied", spec.args[0]))
        }
        e => fail(126, &format!("exec: {:?}: {e}", spec.args[0])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nwheel:x:10:app\nnogroup:x:65534:\n";

    #[test]
    fn users() {
        let c = resolve_user_in("", PASSWD, GROUP).unwrap();
        assert_eq!((c.uid, c.gid), (0, 0));
        let c = resolve_user_in("app", PASSWD, GROUP).unwrap();
        assert_eq!(
            (c.uid, c.gid, c.home.as_deref()),
            (1000, 1000, Some("/home/app"))
        );
        assert!(c.groups.contains(&10));
        let c = resolve_user_in("1234:55", PASSWD, GROUP).unwrap();
        assert_eq!((c.uid, c.gid), (1234, 55));
        let c = resolve_user_in("app:wheel", PASSWD, GROUP).unwrap();
        assert_eq!((c.uid, c.gid), (1000, 10));
        assert!(resolve_user_in("ghost", PASSWD, GROUP)
            .unwrap_err()
            .contains("unable to find user ghost"));
        assert!(resolve_user_in("app:ghosts", PASSWD, GROUP).is_err());
        assert!(resolve_user_in("70000", PASSWD, GROUP).is_err());
    }

    #[test]
    fn path_lookup() {
        assert_eq!(
            lookup_path("sh", "/nonexistent:/bin").unwrap(),
            PathBuf::from("/bin/sh")
        );
        assert_eq!(lookup_path("/x/y", "").unwrap(), PathBuf::from("/x/y"));
        assert_eq!(lookup_path("no-such-cmd-xyz", "/bin").unwrap_err().0, 127);
    }

    #[test]
    fn env_defaults() {
        let e = final_env(&["A=1".into()], Some("/home/app"), Some("h"));
        assert!(e.contains(&format!("PATH={DEFAULT_PATH}")));
        assert!(e.contains(&"HOME=/home/app".to_owned()));
        assert!(e.contains(&"HOSTNAME=h".to_owned()));
        let e = final_env(&["PATH=/x".into(), "HOME=/h".into()], None, None);
        assert_eq!(e, vec!["PATH=/x".to_owned(), "HOME=/h".to_owned()]);
    }
}
