//! What the daemon hands a sandbox's supervisor and the exec helper, and what they write back.
//!
//! A sandbox's state directory holds:
//! - `spec.json` ([`SandboxSpec`]), written by the daemon before anything is created;
//! - `shim.json` ([`ProcRecord`]), written by the supervisor as its first act;
//! - `init.json` ([`ProcRecord`]), written once the sandbox's init runs;
//! - `exit.json` ([`ExitRecord`]), written (fsync + rename) once the init has been reaped;
//! - `main.log`, `main.log.1`: the main process's stdout and stderr, bounded and timestamped (format in
//!   [`crate::logs`]; sandboxes of older versions have `stdout.log` and `stderr.log` instead);
//! - `upper/`, `work/`: the overlay's writable layer; `rootfs/`, `lower/N`: mount points that are only
//!   ever mounted inside the supervisor's private mount namespace (nothing leaks on the host's).

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cgroups::SandboxCgroup;

/// Size of the uid/gid range given to each sandbox.
pub const ID_RANGE: u32 = 65536;

/// Everything needed to create one sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Sandbox id.
    pub id: String,
    /// Hostname inside (the sandbox's name).
    pub hostname: String,
    /// The sandbox's state directory.
    pub state_dir: PathBuf,
    /// Unpacked image layers, bottom first.
    pub layers: Vec<PathBuf>,
    /// Host uid (and gid) that root inside maps to; the range is [`ID_RANGE`] long.
    pub host_uid: u32,
    /// The sandbox's cgroup (already created by the daemon, limits applied).
    pub cgroup: SandboxCgroup,
    /// The main process; `None` means the sandbox idles until stopped.
    pub process: Option<ProcessSpec>,
    /// Files of the state directory bind-mounted read-only into the sandbox.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounted_files: Vec<FileMount>,
    /// Scratch volumes (tmpfs) mounted into the sandbox.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    /// Bound on the main process's on-disk log (`main.log` + `main.log.1`); default
    /// [`crate::logs::DEFAULT_MAX_BYTES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_max_bytes: Option<u64>,
    /// The sandbox's address on the host bridge (its supervisor got the matching
    /// [`crate::net::NetAttach`]); `None`: loopback only. Used for `/etc/hosts` and `/etc/resolv.conf`.
    #[serde(default)]
    pub network: Option<SandboxNetSpec>,
}

/// A networked sandbox's addressing, as its `/etc/hosts` and `/etc/resolv.conf` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxNetSpec {
    /// The sandbox's address (on `eth0`).
    pub address: Ipv4Addr,
    /// Prefix length of the sandbox subnet.
    pub prefix_len: u8,
    /// The default gateway (the host bridge).
    pub gateway: Ipv4Addr,
    /// Nameserver addresses for `/etc/resolv.conf`.
    pub dns: Vec<String>,
    /// Search domains for `/etc/resolv.conf`.
    #[serde(default)]
    pub dns_search: Vec<String>,
}

/// A file of the state directory (content, mode and owner prepared by the daemon) mounted read-only at
/// `target` inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMount {
    /// The file on the host.
    pub source: PathBuf,
    /// Absolute, normalized path inside the sandbox.
    pub target: String,
}

/// A tmpfs of at most `size_bytes` mounted at `target` inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// Absolute, normalized path inside the sandbox.
    pub target: String,
    /// Size limit.
    pub size_bytes: u64,
}

/// A process to run inside a sandbox.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessSpec {
    /// argv; `args[0]` is looked up in the `PATH` of `env` when it has no `/`.
    pub args: Vec<String>,
    /// Environment as `KEY=VALUE`.
    pub env: Vec<String>,
    /// Working directory inside the sandbox.
    pub cwd: String,
    /// `user[:group]`, names or numbers, resolved in the sandbox's `/etc/passwd` and `/etc/group`.
    pub user: String,
}

/// One process named for good: pid plus start time (so a reused pid is never mistaken for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRecord {
    /// Host pid.
    pub pid: i32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
}

/// How a sandbox's main process ended, as recorded by its supervisor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
    /// The memory cgroup recorded an OOM kill.
    pub oom_killed: bool,
    /// A human sentence.
    pub reason: String,
    /// Milliseconds since the Unix epoch.
    pub finished_at_ms: u64,
}

/// The supervisor's messages to the daemon on its stdout (JSON lines): `Started` or `Failed`, then
/// `Exited` (a daemon restarted in between learns of the exit from the supervisor's own exit instead).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartReport {
    /// The init is running.
    Started {
        /// The init process.
        init: ProcRecord,
    },
    /// Creation failed; nothing of the sandbox is left running.
    Failed {
        /// What failed, for humans.
        message: String,
    },
    /// Later, on the same pipe: the main process has ended and `exit.json` is written (the kernel may still
    /// be tearing the sandbox's namespaces down; the supervisor exits once that is done).
    Exited,
}

/// What the daemon sends the exec helper (one JSON line on fd 3).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecSpec {
    /// The sandbox's init.
    pub init: ProcRecord,
    /// The sandbox's cgroup; the exec gets a leaf child cgroup of it.
    pub cgroup: SandboxCgroup,
    /// Name of the leaf cgroup for this exec.
    pub cgroup_leaf: String,
    /// The process.
    pub process: ProcessSpec,
    /// Kill the process tree after this many seconds.
    pub timeout_seconds: Option<f64>,
    /// Run on a pseudo-terminal of the sandbox's devpts, relayed by the helper between its stdin/stdout
    /// and the terminal's master side.
    #[serde(default)]
    pub tty: Option<TtySize>,
}

impl ExecSpec {
    /// The helper's first line: what it can prepare before the command is known.
    pub fn prepare(&self) -> ExecPrepare {
        ExecPrepare {
            init: self.init,
            cgroup: self.cgroup.clone(),
            cgroup_leaf: self.cgroup_leaf.clone(),
        }
    }

    /// The helper's second line: the command.
    pub fn run(&self) -> ExecRun {
        ExecRun {
            process: self.process.clone(),
            timeout_seconds: self.timeout_seconds,
            tty: self.tty,
            stdio_attached: false,
        }
    }
}

/// First line to the exec helper: the sandbox to enter and the leaf cgroup to create. The helper
/// prepares everything that does not depend on the command (leaf cgroup, which it joins itself so that
/// the command is born in it; namespaces; seccomp filter), answers [`ExecEvent::Prepared`], and waits
/// for an [`ExecRun`] line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecPrepare {
    /// The sandbox's init.
    pub init: ProcRecord,
    /// The sandbox's cgroup; the exec gets a leaf child cgroup of it.
    pub cgroup: SandboxCgroup,
    /// Name of the leaf cgroup for this exec.
    pub cgroup_leaf: String,
}

/// Second line to the exec helper: the command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecRun {
    /// The process.
    pub process: ProcessSpec,
    /// Kill the process tree after this many seconds.
    pub timeout_seconds: Option<f64>,
    /// Run on a pseudo-terminal.
    #[serde(default)]
    pub tty: Option<TtySize>,
    /// The command's stdin, stdout and stderr come with this line (SCM_RIGHTS, in that order) instead of
    /// being the helper's own: a helper reused after an earlier command.
    #[serde(default)]
    pub stdio_attached: bool,
}

/// Columns and rows of a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    /// Columns.
    pub width: u16,
    /// Rows.
    pub height: u16,
}

/// What the daemon may send the exec helper after the spec (JSON lines on fd 3). End of file on fd 3
/// means the daemon (or the client) went away: the helper kills the process tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ExecControl {
    /// New terminal size (TTY only).
    Resize {
        /// Columns.
        width: u16,
        /// Rows.
        height: u16,
    },
    /// Send a signal to the process.
    Signal {
        /// Signal number.
        signal: i32,
    },
    /// SIGKILL the whole process tree.
    Cancel,
}

/// The exec helper's messages to the daemon (JSON lines on fd 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecEvent {
    /// The helper is in the sandbox's namespaces and leaf cgroup, waiting for its command.
    Prepared,
    /// The process runs (host pid).
    Started {
        /// Host pid.
        pid: i32,
    },
    /// The process ended.
    Exited {
        /// Exit code.
        code: Option<i32>,
        /// Killing signal.
        signal: Option<i32>,
        /// Killed at the deadline.
        timed_out: bool,
        /// Killed by a cancel (or because the daemon went away).
        #[serde(default)]
        cancelled: bool,
        /// Nothing of the command is left in the helper's leaf cgroup: the helper waits for another
        /// command (with its stdio attached), else it leaves and exits.
        #[serde(default)]
        reusable: bool,
    },
    /// The exec could not be started.
    Failed {
        /// What failed.
        message: String,
    },
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes `value` as JSON to `path` atomically, its content durable: temp file, fsync, rename. (The
/// directory is not synced: after a power loss the record may be missing, never torn.)
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    write_json(path, value, true)
}

/// Writes `value` as JSON to `path` atomically (temp file + rename) without forcing it to disk: enough for
/// records that only matter while the machine is up (a process crash never leaves a torn file).
pub fn write_json_replace<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    write_json(path, value, false)
}

fn write_json<T: Serialize>(path: &Path, value: &T, durable: bool) -> std::io::Result<()> {
    let data = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    let dir = path.parent().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no parent")
    })?;
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name")
    })?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&data)?;
        if durable {
            f.sync_data()?;
        }
    }
    std::fs::rename(&tmp, path)
}

/// Reads a JSON file; `Ok(None)` when it does not exist.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(data) => serde_json::from_slice(&data).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Signal name for messages (`SIGKILL`), or the number.
pub fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| format!("signal {sig}"))
}
