//! One cgroup per sandbox under a parent owned by sandboxd, on cgroup v1 (also "hybrid": v1 controllers plus
//! a controller-less cgroup2 mount beside them) and on a pure cgroup v2 host.
//!
//! Layout: `<parent>/<sandbox id>` in every hierarchy used, and optionally `<parent>/<id>/<child>` leaves
//! (e.g. `exec-<n>`) for one exec's process tree. The parent is either relative (created under the daemon's
//! *own* cgroup of each hierarchy, read from `/proc/self/cgroup`) or absolute (from each hierarchy's root, for an
//! operator-delegated cgroup). Nothing outside the parent is ever written: no control file of the daemon's own
//! cgroup, of the root, or of any ancestor.
//!
//! Hierarchies used on v1: `memory`, `cpu`, `pids` (required) and `cpuacct`, `blkio` (optional, no limits written,
//! accounting only). `cpuset`, `devices`, `freezer` and `name=systemd` are never touched. On v2 the parent's
//! `cgroup.subtree_control` (ours) gets `+cpu +memory +pids` (and `+io` when available).
//!
//! Everything that depends only on text (mountinfo and `/proc/self/cgroup` parsing, path computation, v2
//! controller checks, `memory.events` / `memory.oom_control` parsing) is a pure function; the filesystem root is
//! injectable through [`CgroupManager::with_proc_info`], which takes the mountinfo and `/proc/self/cgroup` text, so
//! the v2 path is tested against a scratch directory tree.
//!
//! # Where cgroups-rs (0.5.1) is used, and where it fell short
//!
//! Used: on v1, creation goes through [`Cgroup::new_with_relative_paths`] with our own [`Hierarchy`]
//! implementation (`SandboxdV1`) and the limits are written with the crate's controllers
//! ([`MemController::set_limit`] / [`MemController::set_memswap_limit`], [`CpuController::set_cfs_period`] /
//! [`CpuController::set_cfs_quota`], [`PidController::set_pid_max`]); on v2 the same `MemController` and
//! `PidController` setters write `memory.max`, `memory.swap.max` and `pids.max`.
//!
//! Where it fell short, and what is done by hand instead:
//! 1. **v1 hierarchy selection and per-controller base paths.** `hierarchies::V1::new()` takes *every* mounted
//!    v1 controller, so `Cgroup::new*` would also mkdir in `cpuset` (whose fresh children have empty
//!    `cpuset.cpus`/`mems`, and whose `post_create` copies the parent's values), `devices`, `freezer`, `systemd`.
//!    `get_cgroups_relative_paths` returns the `/proc/self/cgroup` paths *without* stripping the mount root
//!    (only `existing_path` does, and that one re-reads the real `/proc/self/mountinfo`), and
//!    `load_with_relative_paths` does not strip it either. Hence: our own mountinfo / `/proc/self/cgroup` parsing
//!    and a custom `Hierarchy` (`SandboxdV1`) listing only the controllers we use, with paths we computed.
//! 2. **v2 creation.** `Cgroup::create()` on v2 (`create_v2_cgroup`) writes `+<controller>` into the
//!    `cgroup.subtree_control` of the hierarchy root *and of every ancestor* of the new cgroup (cgroups we did not
//!    create, which we must never write), takes the controller list from the hard-coded
//!    `/sys/fs/cgroup/cgroup.controllers` (not injectable; and `hierarchies::V2` is hard-coded to `/sys/fs/cgroup`
//!    too), and ignores the write errors. So on v2 the directory is created with a plain `mkdir` and the parent's
//!    `cgroup.subtree_control` is written by us, once, after checking its `cgroup.controllers`.
//! 3. **v2 `cpu.max`.** `CpuController::set_cfs_quota`/`set_cfs_quota_and_period` on v2 read `cpu.max` first and
//!    write it back (read-modify-write, two steps), which needs the file to exist already; we write
//!    `"<quota> <period>"` in one write.
//! 4. **Error handling of `apply(&Resources)`.** `MemController::apply` drops every write error (`let _ =`), so
//!    the individual setters are called and their errors propagated; a missing `memory.memsw.limit_in_bytes`
//!    (v1 without swap accounting) or `memory.swap.max` (v2 without swap) is then detected and skipped.
//! 5. **No OOM-kill counter.** cgroups-rs parses neither `oom_kill` from v1 `memory.oom_control` nor from v2
//!    `memory.events` (it only offers eventfd notification); parsed here.
//! 6. **Process-side operations.** [`SandboxCgroup`] is a serializable set of paths used by other processes
//!    (supervisor, exec helper) without re-parsing mountinfo; `Cgroup` is neither serializable nor cheap to rebuild
//!    (and its `Clone` re-detects the hierarchy with `auto()`). `Cgroup::procs()` also swallows read errors and maps
//!    unparsable lines to pid 0, `Cgroup::kill()` is v2-only, and `Cgroup::delete()` neither kills nor retries
//!    `EBUSY` for long enough (v1: ~150 ms; v2: one attempt, no recursion). So `add_process`, `pids`, `kill_all`,
//!    `destroy` and `create_child` are plain file operations on the stored paths.
//! 7. `CgroupBuilder` is not used: it goes through the same `Cgroup::new` paths as (1) and (2).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use cgroups_rs::fs::blkio::BlkIoController;
use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::cpuacct::CpuAcctController;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{Cgroup, Hierarchy, MaxValue, Subsystem};
use serde::{Deserialize, Serialize};

/// CFS period used for every quota, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;
/// How long [`SandboxCgroup::kill_all`] keeps killing before it gives up.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`SandboxCgroup::destroy`] retries `rmdir` on `EBUSY` (exiting tasks draining).
const RMDIR_TIMEOUT: Duration = Duration::from_secs(2);
/// Controllers that must be available to a v2 parent.
const V2_REQUIRED: [&str; 3] = ["cpu", "memory", "pids"];
/// Controllers enabled on a v2 parent when available, without being required.
const V2_OPTIONAL: [&str; 1] = ["io"];

/// Errors of the cgroup module.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("invalid limit: {0}")]
    InvalidLimit(String),
    #[error("no usable cgroup hierarchy: {0}")]
    NoHierarchy(String),
    #[error("cgroup v1 controller {0:?} is not mounted")]
    ControllerNotMounted(&'static str),
    #[error(
        "own cgroup {own:?} of controller {controller:?} is not below the mount root {mount_root:?} \
         (cgroup namespace or bind mount?); use an absolute parent"
    )]
    OwnCgroupNotVisible {
        controller: String,
        own: String,
        mount_root: String,
    },
    #[error(
        "cgroup v2 parent {} lacks controllers [{}] in its cgroup.controllers: enable them in the \
         cgroup.subtree_control of its parent, or use a delegated parent that has them",
        parent.display(), missing.join(" ")
    )]
    MissingControllers {
        parent: PathBuf,
        missing: Vec<String>,
    },
    #[error("cgroup {} already exists", .0.display())]
    AlreadyExists(PathBuf),
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroups-rs: {op} {}: {source}", path.display())]
    CgroupsRs {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: cgroups_rs::fs::error::Error,
    },
    #[error("unexpected content in {}: {content:?}", path.display())]
    Parse { path: PathBuf, content: String },
    #[error("processes {pids:?} still in the cgroup after {waited:?} of SIGKILL")]
    KillTimeout { pids: Vec<u32>, waited: Duration },
    #[error("cgroup {} still busy after {waited:?}", path.display())]
    RemoveTimeout { path: PathBuf, waited: Duration },
    #[error("the cgroup handle has no directories (it was made for an invalid id)")]
    EmptyHandle,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// cgroup version in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// Resource limits of one sandbox. `None` leaves the kernel default (unlimited).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory limit in bytes (swap is limited so that this is the whole budget).
    pub memory_bytes: Option<u64>,
    /// CPU bandwidth in millicores (1000 = one CPU); at least 10.
    pub cpu_millis: Option<u64>,
    /// Maximum number of tasks.
    pub pids: Option<u64>,
}

/// What a sandbox is guaranteed rather than limited to. `None` leaves the kernel default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requests {
    /// CPU request in millicores: the cgroup's CPU weight (v1 `cpu.shares` = millicores * 1024 / 1000, at
    /// least 2; v2 `cpu.weight` converted from those shares as Kubernetes does).
    pub cpu_millis: Option<u64>,
    /// Memory request in bytes: a soft limit (v1 `memory.soft_limit_in_bytes`), a protection on v2
    /// (`memory.low`).
    pub memory_bytes: Option<u64>,
}

/// v1 `cpu.shares` for a CPU request.
pub fn cpu_shares(millis: u64) -> u64 {
    (millis.saturating_mul(1024) / 1000).clamp(2, 262_144)
}

/// v2 `cpu.weight` (1-10000) for a CPU request, through its v1 shares (the conversion of Kubernetes and
/// runc).
pub fn cpu_weight(millis: u64) -> u64 {
    let shares = cpu_shares(millis);
    1 + ((shares - 2) * 9999) / 262_142
}

/// Memory bytes, CPU quota (us per period) and pids, as the kernel files take them.
type KernelLimits = (Option<i64>, Option<i64>, Option<i64>);

impl Limits {
    /// The limits as the kernel files take them: memory bytes, CPU quota (us per period) and pids, each
    /// checked for range.
    fn checked(&self) -> Result<KernelLimits, CgroupError> {
        let quota = self.cpu_millis.map(cpu_quota_us).transpose()?;
        let memory = self
            .memory_bytes
            .map(|b| to_i64("memory_bytes", b))
            .transpose()?;
        let pids = self.pids.map(|p| to_i64("pids", p)).transpose()?;
        Ok((memory, quota, pids))
    }
}

/// The v1 controllers sandboxd uses, in the order cgroups-rs attaches them (blkio before memory, see its
/// comment on cgroup writeback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctl {
    BlkIo,
    Memory,
    Pids,
    CpuAcct,
    Cpu,
}

impl Ctl {
    const ALL: [Ctl; 5] = [Ctl::BlkIo, Ctl::Memory, Ctl::Pids, Ctl::CpuAcct, Ctl::Cpu];

    fn name(self) -> &'static str {
        match self {
            Ctl::BlkIo => "blkio",
            Ctl::Memory => "memory",
            Ctl::Pids => "pids",
            Ctl::CpuAcct => "cpuacct",
            Ctl::Cpu => "cpu",
        }
    }

    fn required(self) -> bool {
        matches!(self, Ctl::Memory | Ctl::Pids | Ctl::Cpu)
    }
}

/// One mounted hierarchy used by the manager.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hier {
    /// Where it is mounted (e.g. `/sys/fs/cgroup/memory`, or `/sys/fs/cgroup` on v2).
    mount_point: PathBuf,
    /// The mount's root inside the hierarchy (mountinfo field 4), usually `/`.
    mount_root: PathBuf,
    /// Our controllers living in this hierarchy (v1); empty on v2.
    ctls: Vec<Ctl>,
    /// The parent directory, relative to `mount_point`.
    parent_rel: PathBuf,
}

impl Hier {
    fn parent_dir(&self) -> PathBuf {
        self.mount_point.join(&self.parent_rel)
    }
}

/// Creates and finds sandbox cgroups under sandboxd's parent.
#[derive(Debug, Clone)]
pub struct CgroupManager {
    version: CgroupVersion,
    hiers: Vec<Hier>,
    /// Index into `hiers` of the memory hierarchy (0 on v2).
    memory: usize,
}

impl CgroupManager {
    /// `parent`: a relative name ("sandboxd") = a directory created under the daemon's OWN cgroup in each
    /// hierarchy used (from /proc/self/cgroup); an absolute path ("/sandboxd") = that path from each hierarchy's
    /// root. Creates the parent dirs if missing (mkdir only); on v2 enables the needed controllers in the
    /// parent's `cgroup.subtree_control`, failing with [`CgroupError::MissingControllers`] if the parent's
    /// `cgroup.controllers` lacks some.
    pub fn new(parent: &str) -> Result<Self, CgroupError> {
        let mountinfo = read_text(Path::new("/proc/self/mountinfo"))?;
        let proc_cgroup = read_text(Path::new("/proc/self/cgroup"))?;
        Self::with_proc_info(parent, &mountinfo, &proc_cgroup)
    }

    /// [`CgroupManager::new`] with the contents of `/proc/self/mountinfo` and `/proc/self/cgroup` given: the
    /// mount points named in `mountinfo` are used as they are, so a scratch directory tree can stand in for
    /// cgroupfs.
    pub fn with_proc_info(
        parent: &str,
        mountinfo: &str,
        proc_self_cgroup: &str,
    ) -> Result<Self, CgroupError> {
        let mgr = Self::plan(parent, mountinfo, proc_self_cgroup)?;
        for h in &mgr.hiers {
            let dir = h.parent_dir();
            fs::create_dir_all(&dir).map_err(io_err("create parent cgroup", &dir))?;
        }
        if mgr.version == CgroupVersion::V2 {
            mgr.enable_v2_controllers()?;
        }
        Ok(mgr)
    }

    /// Pure part of construction: which hierarchies, which directories.
    fn plan(parent: &str, mountinfo: &str, proc_self_cgroup: &str) -> Result<Self, CgroupError> {
        let (absolute, parent_rel) = parse_parent(parent)?;
        let mounts = parse_mountinfo(mountinfo);
        let own = parse_proc_cgroup(proc_self_cgroup);
        let v1_memory = mounts
            .iter()
            .any(|m| m.fstype == "cgroup" && m.has_opt("memory"));
        let mut hiers: Vec<Hier> = Vec::new();
        let version = if v1_memory {
            for ctl in Ctl::ALL {
                let Some(m) = mounts
                    .iter()
                    .find(|m| m.fstype == "cgroup" && m.has_opt(ctl.name()))
                else {
                    if ctl.required() {
                        return Err(CgroupError::ControllerNotMounted(ctl.name()));
                    }
                    continue;
                };
                if let Some(h) = hiers.iter_mut().find(|h| h.mount_point == m.mount_point) {
                    h.ctls.push(ctl);
                    continue;
                }
                let base = if absolute {
                    PathBuf::new()
                } else {
                    let own_path = own
                        .iter()
                        .find(|l| l.controllers.iter().any(|c| c == ctl.name()))
                        .map(|l| l.path.as_str())
                        .ok_or_else(|| {
                            CgroupError::NoHierarchy(format!(
                                "no {} line in /proc/self/cgroup",
                                ctl.name()
                            ))
                        })?;
                    own_relative(ctl.name(), own_path, &m.mount_root)?
                };
                hiers.push(Hier {
                    mount_point: m.mount_point.clone(),
                    mount_root: m.mount_root.clone(),
                    ctls: vec![ctl],
                    parent_rel: base.join(&parent_rel),
                });
            }
            CgroupVersion::V1
        } else {
            let own_path = own
                .iter()
                .find(|l| l.hierarchy_id == "0" && l.controllers.is_empty())
                .map(|l| l.path.as_str());
            let m = mounts
                .iter()
                .filter(|m| m.fstype == "cgroup2")
                .find(|m| {
                    absolute
                        || own_path
                            .is_some_and(|p| own_relative("unified", p, &m.mount_root).is_ok())
                })
                .ok_or_else(|| {
                    CgroupError::NoHierarchy(
                        "neither v1 memory controller nor a usable cgroup2 mount".into(),
                    )
                })?;
            let base = match (absolute, own_path) {
                (true, _) => PathBuf::new(),
                (false, Some(p)) => own_relative("unified", p, &m.mount_root)?,
                (false, None) => {
                    return Err(CgroupError::NoHierarchy(
                        "no 0:: line in /proc/self/cgroup".into(),
                    ))
                }
            };
            hiers.push(Hier {
                mount_point: m.mount_point.clone(),
                mount_root: m.mount_root.clone(),
                ctls: Vec::new(),
                parent_rel: base.join(&parent_rel),
            });
            CgroupVersion::V2
        };
        let memory = hiers
            .iter()
            .position(|h| version == CgroupVersion::V2 || h.ctls.contains(&Ctl::Memory))
            .unwrap_or(0);
        Ok(Self {
            version,
            hiers,
            memory,
        })
    }

    /// v2: check the parent's `cgroup.controllers` and enable ours in its `cgroup.subtree_control`.
    fn enable_v2_controllers(&self) -> Result<(), CgroupError> {
        let dir = self.hiers[self.memory].parent_dir();
        let controllers_file = dir.join("cgroup.controllers");
        let available = read_text(&controllers_file)?;
        let missing = missing_controllers(&available, &V2_REQUIRED);
        if !missing.is_empty() {
            return Err(CgroupError::MissingControllers {
                parent: dir,
                missing,
            });
        }
        let subtree_file = dir.join("cgroup.subtree_control");
        let enabled = read_text(&subtree_file)?;
        let to_enable = controllers_to_enable(&available, &enabled);
        if !to_enable.is_empty() {
            let line = to_enable
                .iter()
                .map(|c| format!("+{c}"))
                .collect::<Vec<_>>()
                .join(" ");
            tracing::debug!(file = %subtree_file.display(), %line, "enabling cgroup v2 controllers");
            write_existing(&subtree_file, &line)?;
        }
        Ok(())
    }

    /// The cgroup version in use.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The parent directory in every hierarchy used (one on v2).
    pub fn parent_dirs(&self) -> Vec<PathBuf> {
        self.hiers.iter().map(Hier::parent_dir).collect()
    }

    /// Creates `<parent>/<id>` in every hierarchy used and writes the limits. On error nothing is left behind.
    pub fn create(&self, id: &str, limits: &Limits) -> Result<SandboxCgroup, CgroupError> {
        validate_name("sandbox id", id)?;
        let (memory, quota, pids) = limits.checked()?;
        let sandbox = self.sandbox(id);
        if let Some(d) = sandbox.dirs.iter().find(|d| d.exists()) {
            return Err(CgroupError::AlreadyExists(d.clone()));
        }
        let res = match self.version {
            CgroupVersion::V1 => self.create_v1(id, memory, quota, pids),
            CgroupVersion::V2 => create_v2(&self.hiers[0], &sandbox.dirs[0], memory, quota, pids),
        };
        if let Err(e) = res {
            // Lost a creation race: the directory is someone else's, leave it alone.
            if matches!(e, CgroupError::AlreadyExists(_)) {
                return Err(e);
            }
            if let Err(cleanup) = sandbox.destroy() {
                tracing::warn!(id, error = %cleanup, "cleanup after failed cgroup creation");
            }
            return Err(e);
        }
        tracing::debug!(id, dirs = ?sandbox.dirs, ?limits, "created sandbox cgroup");
        Ok(sandbox)
    }

    fn create_v1(
        &self,
        id: &str,
        memory: Option<i64>,
        quota: Option<i64>,
        pids: Option<i64>,
    ) -> Result<(), CgroupError> {
        let hier = SandboxdV1 {
            hiers: self.hiers.clone(),
        };
        let relative: HashMap<String, String> = self
            .hiers
            .iter()
            .flat_map(|h| {
                h.ctls.iter().map(|c| {
                    (
                        c.name().to_string(),
                        h.parent_rel.to_string_lossy().into_owned(),
                    )
                })
            })
            .collect();
        let here = self.hiers[self.memory].parent_dir().join(id);
        let cg =
            Cgroup::new_with_relative_paths(Box::new(hier), id, relative).map_err(|source| {
                CgroupError::CgroupsRs {
                    op: "create",
                    path: here.clone(),
                    source,
                }
            })?;
        if let Some(bytes) = memory {
            let mem: &MemController = cg
                .controller_of()
                .ok_or(CgroupError::ControllerNotMounted("memory"))?;
            set_memory(mem, bytes, "memory.memsw.limit_in_bytes", bytes)?;
        }
        if let Some(q) = quota {
            let cpu: &CpuController = cg
                .controller_of()
                .ok_or(CgroupError::ControllerNotMounted("cpu"))?;
            let path = cgroups_rs::fs::Controller::path(cpu).to_path_buf();
            cpu.set_cfs_period(CPU_PERIOD_US)
                .map_err(|source| CgroupError::CgroupsRs {
                    op: "set cpu.cfs_period_us",
                    path: path.clone(),
                    source,
                })?;
            cpu.set_cfs_quota(q)
                .map_err(|source| CgroupError::CgroupsRs {
                    op: "set cpu.cfs_quota_us",
                    path,
                    source,
                })?;
        }
        if let Some(n) = pids {
            let pid: &PidController = cg
                .controller_of()
                .ok_or(CgroupError::ControllerNotMounted("pids"))?;
            set_pids(pid, n)?;
        }
        Ok(())
    }

    /// Writes `limits` into an existing sandbox cgroup (one created ahead of time, e.g. for a pooled
    /// supervisor whose init already sits in it). `None` fields are left as they are.
    pub fn apply_limits(&self, cg: &SandboxCgroup, limits: &Limits) -> Result<(), CgroupError> {
        let (memory, quota, pids) = limits.checked()?;
        if cg.dirs.len() != self.hiers.len() {
            return Err(CgroupError::EmptyHandle);
        }
        let v2 = self.version == CgroupVersion::V2;
        for (h, dir) in self.hiers.iter().zip(&cg.dirs) {
            let has = |c: Ctl| v2 || h.ctls.contains(&c);
            if let Some(bytes) = memory.filter(|_| has(Ctl::Memory)) {
                let mem = MemController::new(dir.clone(), h.mount_point.clone(), v2);
                if v2 {
                    set_memory(&mem, bytes, "memory.swap.max", 0)?;
                } else {
                    set_memory(&mem, bytes, "memory.memsw.limit_in_bytes", bytes)?;
                }
            }
            if let Some(q) = quota.filter(|_| has(Ctl::Cpu)) {
                if v2 {
                    write_existing_or_new(&dir.join("cpu.max"), &format!("{q} {CPU_PERIOD_US}"))?;
                } else {
                    write_existing(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write_existing(&dir.join("cpu.cfs_quota_us"), &q.to_string())?;
                }
            }
            if let Some(n) = pids.filter(|_| has(Ctl::Pids)) {
                set_pids(
                    &PidController::new(dir.clone(), h.mount_point.clone(), v2),
                    n,
                )?;
            }
        }
        Ok(())
    }

    /// Writes `requests` into an existing sandbox cgroup: CPU weight and soft memory limit (see
    /// [`Requests`]). `None` fields are left as they are.
    pub fn apply_requests(&self, cg: &SandboxCgroup, req: &Requests) -> Result<(), CgroupError> {
        if cg.dirs.len() != self.hiers.len() {
            return Err(CgroupError::EmptyHandle);
        }
        let memory = req
            .memory_bytes
            .map(|b| to_i64("memory request", b))
            .transpose()?;
        let v2 = self.version == CgroupVersion::V2;
        for (h, dir) in self.hiers.iter().zip(&cg.dirs) {
            let has = |c: Ctl| v2 || h.ctls.contains(&c);
            if let Some(m) = req.cpu_millis.filter(|_| has(Ctl::Cpu)) {
                if v2 {
                    write_existing_or_new(&dir.join("cpu.weight"), &cpu_weight(m).to_string())?;
                } else {
                    write_existing(&dir.join("cpu.shares"), &cpu_shares(m).to_string())?;
                }
            }
            if let Some(b) = memory.filter(|_| has(Ctl::Memory)) {
                if v2 {
                    write_existing_or_new(&dir.join("memory.low"), &b.to_string())?;
                } else {
                    write_existing(&dir.join("memory.soft_limit_in_bytes"), &b.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// The handle for an existing (or not) sandbox cgroup, without creating anything. An invalid id gives a
    /// handle without directories (every operation on it is a no-op or [`CgroupError::EmptyHandle`]).
    pub fn sandbox(&self, id: &str) -> SandboxCgroup {
        if let Err(e) = validate_name("sandbox id", id) {
            tracing::warn!(error = %e, "cgroup handle for an invalid id");
            return SandboxCgroup {
                version: self.version,
                dirs: Vec::new(),
                memory_dir: PathBuf::new(),
            };
        }
        SandboxCgroup {
            version: self.version,
            dirs: self.hiers.iter().map(|h| h.parent_dir().join(id)).collect(),
            memory_dir: self.hiers[self.memory].parent_dir().join(id),
        }
    }

    /// Ids of the sandbox cgroups that exist under the parent, in any hierarchy (sorted).
    pub fn list(&self) -> Result<Vec<String>, CgroupError> {
        let mut ids = BTreeSet::new();
        for h in &self.hiers {
            let dir = h.parent_dir();
            for sub in subdirs(&dir)? {
                if let Some(name) = sub.file_name().and_then(|n| n.to_str()) {
                    if validate_name("sandbox id", name).is_ok() {
                        ids.insert(name.to_string());
                    }
                }
            }
        }
        Ok(ids.into_iter().collect())
    }
}

fn create_v2(
    h: &Hier,
    dir: &Path,
    memory: Option<i64>,
    quota: Option<i64>,
    pids: Option<i64>,
) -> Result<(), CgroupError> {
    fs::create_dir(dir).map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => CgroupError::AlreadyExists(dir.to_path_buf()),
        _ => CgroupError::Io {
            op: "mkdir",
            path: dir.to_path_buf(),
            source,
        },
    })?;
    if let Some(bytes) = memory {
        let mem = MemController::new(dir.to_path_buf(), h.mount_point.clone(), true);
        set_memory(&mem, bytes, "memory.swap.max", 0)?;
    }
    if let Some(q) = quota {
        write_existing_or_new(&dir.join("cpu.max"), &format!("{q} {CPU_PERIOD_US}"))?;
    }
    if let Some(n) = pids {
        set_pids(
            &PidController::new(dir.to_path_buf(), h.mount_point.clone(), true),
            n,
        )?;
    }
    Ok(())
}

/// Memory limit, then the swap file (`swap_file` = v1 memsw or v2 swap.max) set to `swap_value`, skipped only
/// when that file does not exist (no swap accounting).
fn set_memory(
    mem: &MemController,
    bytes: i64,
    swap_file: &str,
    swap_value: i64,
) -> Result<(), CgroupError> {
    let dir = cgroups_rs::fs::Controller::path(mem).to_path_buf();
    mem.set_limit(bytes)
        .map_err(|source| CgroupError::CgroupsRs {
            op: "set memory limit",
            path: dir.clone(),
            source,
        })?;
    if let Err(source) = mem.set_memswap_limit(swap_value) {
        if dir.join(swap_file).exists() {
            return Err(CgroupError::CgroupsRs {
                op: "set memory swap limit",
                path: dir,
                source,
            });
        }
        tracing::debug!(dir = %dir.display(), swap_file, "no swap accounting; swap limit not set");
    }
    Ok(())
}

fn set_pids(pid: &PidController, n: i64) -> Result<(), CgroupError> {
    pid.set_pid_max(MaxValue::Value(n))
        .map_err(|source| CgroupError::CgroupsRs {
            op: "set pids.max",
            path: cgroups_rs::fs::Controller::path(pid).to_path_buf(),
            source,
        })
}

/// Our v1 [`Hierarchy`] for cgroups-rs: only the controllers sandboxd uses, at the mount points we found.
#[derive(Debug, Clone)]
struct SandboxdV1 {
    hiers: Vec<Hier>,
}

impl Hierarchy for SandboxdV1 {
    fn subsystems(&self) -> Vec<Subsystem> {
        let mut subs = Vec::new();
        for ctl in Ctl::ALL {
            let Some(h) = self.hiers.iter().find(|h| h.ctls.contains(&ctl)) else {
                continue;
            };
            let (point, root) = (h.mount_point.clone(), h.mount_root.clone());
            subs.push(match ctl {
                Ctl::BlkIo => Subsystem::BlkIo(BlkIoController::new(point, root, false)),
                Ctl::Memory => Subsystem::Mem(MemController::new(point, root, false)),
                Ctl::Pids => Subsystem::Pid(PidController::new(point, root, false)),
                Ctl::CpuAcct => Subsystem::CpuAcct(CpuAcctController::new(point, root)),
                Ctl::Cpu => Subsystem::Cpu(CpuController::new(point, root, false)),
            });
        }
        subs
    }

    fn root(&self) -> PathBuf {
        self.hiers
            .first()
            .and_then(|h| h.mount_point.parent())
            .map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
    }

    fn root_control_group(&self) -> Cgroup {
        Cgroup::load(Box::new(self.clone()), "")
    }

    fn parent_control_group(&self, path: &str) -> Cgroup {
        let parent = Path::new(path).parent().unwrap_or_else(|| Path::new(""));
        Cgroup::load(Box::new(self.clone()), parent)
    }

    fn v2(&self) -> bool {
        false
    }
}

/// A sandbox's cgroup (or one of its children): plain paths, serializable, usable from other processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxCgroup {
    pub version: CgroupVersion,
    /// One per hierarchy (v1) or one (v2).
    pub dirs: Vec<PathBuf>,
    /// The directory in the memory hierarchy (one of `dirs`).
    pub memory_dir: PathBuf,
}

impl SandboxCgroup {
    /// Moves process `pid` (all its threads) into this cgroup in every hierarchy.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        if self.dirs.is_empty() {
            return Err(CgroupError::EmptyHandle);
        }
        for dir in &self.dirs {
            write_existing(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// A leaf child cgroup `<this>/<name>` in every hierarchy, created now. Fails if it exists already.
    pub fn create_child(&self, name: &str) -> Result<SandboxCgroup, CgroupError> {
        validate_name("child cgroup name", name)?;
        if self.dirs.is_empty() {
            return Err(CgroupError::EmptyHandle);
        }
        let child = SandboxCgroup {
            version: self.version,
            dirs: self.dirs.iter().map(|d| d.join(name)).collect(),
            memory_dir: self.memory_dir.join(name),
        };
        for (i, dir) in child.dirs.iter().enumerate() {
            if let Err(source) = fs::create_dir(dir) {
                for made in &child.dirs[..i] {
                    if let Err(e) = fs::remove_dir(made) {
                        tracing::warn!(dir = %made.display(), error = %e, "cleanup of child cgroup");
                    }
                }
                return Err(match source.kind() {
                    io::ErrorKind::AlreadyExists => CgroupError::AlreadyExists(dir.clone()),
                    _ => CgroupError::Io {
                        op: "mkdir",
                        path: dir.clone(),
                        source,
                    },
                });
            }
        }
        Ok(child)
    }

    /// For v2 `clone3(CLONE_INTO_CGROUP)`: an `O_PATH|O_DIRECTORY|O_CLOEXEC` fd of the v2 dir; `None` on v1
    /// (or if the directory cannot be opened; the caller then falls back to [`SandboxCgroup::add_process`]).
    pub fn v2_dir_fd(&self) -> Option<OwnedFd> {
        if self.version != CgroupVersion::V2 {
            return None;
        }
        let dir = self.dirs.first()?;
        match fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)
        {
            Ok(f) => Some(OwnedFd::from(f)),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "open cgroup dir");
                None
            }
        }
    }

    /// Number of OOM kills: v2 `memory.events` `oom_kill` (hierarchical); v1 the sum of `memory.oom_control`
    /// `oom_kill` over this cgroup and its existing descendants (v1 counts only in the victim's own cgroup).
    pub fn oom_kill_count(&self) -> Result<u64, CgroupError> {
        if self.dirs.is_empty() {
            return Err(CgroupError::EmptyHandle);
        }
        match self.version {
            CgroupVersion::V2 => {
                let file = self.memory_dir.join("memory.events");
                let text = read_text(&file)?;
                parse_flat_keyed(&text, "oom_kill").ok_or(CgroupError::Parse {
                    path: file,
                    content: text,
                })
            }
            CgroupVersion::V1 => {
                let mut total = 0u64;
                for (i, dir) in tree(&self.memory_dir)?.iter().enumerate() {
                    let file = dir.join("memory.oom_control");
                    let text = match fs::read_to_string(&file) {
                        Ok(t) => t,
                        // a descendant that went away meanwhile
                        Err(e) if e.kind() == io::ErrorKind::NotFound && i > 0 => continue,
                        Err(source) => {
                            return Err(CgroupError::Io {
                                op: "read",
                                path: file,
                                source,
                            })
                        }
                    };
                    let n = parse_flat_keyed(&text, "oom_kill").ok_or(CgroupError::Parse {
                        path: file,
                        content: text,
                    })?;
                    total = total.saturating_add(n);
                }
                Ok(total)
            }
        }
    }

    /// All processes in this cgroup and its descendants, in every hierarchy (sorted, deduplicated). A cgroup
    /// that does not exist has none.
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let mut all = BTreeSet::new();
        for dir in &self.dirs {
            for d in tree(dir)? {
                let file = d.join("cgroup.procs");
                let text = match fs::read_to_string(&file) {
                    Ok(t) => t,
                    // ENODEV: the cgroup was removed (its directory still resolves while the kernel tears it
                    // down, e.g. when a concurrent teardown got there first). Either way it holds no process.
                    Err(e)
                        if e.kind() == io::ErrorKind::NotFound
                            || e.raw_os_error() == Some(libc::ENODEV) =>
                    {
                        continue
                    }
                    Err(source) => {
                        return Err(CgroupError::Io {
                            op: "read",
                            path: file,
                            source,
                        })
                    }
                };
                all.extend(parse_pid_list(&text).map_err(|content| CgroupError::Parse {
                    path: file,
                    content,
                })?);
            }
        }
        Ok(all.into_iter().collect())
    }

    /// SIGKILLs every process in the cgroup tree, repeating until none is left (bounded: 5 s). On v2 writes `1`
    /// to `cgroup.kill` when present. On v1 each pid is pinned with a pidfd and signalled only if it is still
    /// listed in the cgroup after the pidfd was opened, so a recycled pid outside the sandbox is never killed.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        let start = Instant::now();
        if self.version == CgroupVersion::V2 {
            if let Some(dir) = self.dirs.first() {
                let kill = dir.join("cgroup.kill");
                if kill.exists() {
                    match write_existing(&kill, "1") {
                        Ok(()) => {}
                        Err(CgroupError::Io { source, .. })
                            if source.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        let mut pause = Duration::from_millis(1);
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            if start.elapsed() > KILL_TIMEOUT {
                return Err(CgroupError::KillTimeout {
                    pids,
                    waited: start.elapsed(),
                });
            }
            let pinned: Vec<(u32, Option<OwnedFd>)> =
                pids.iter().map(|&p| (p, pidfd_open(p))).collect();
            let still = self.pids()?;
            for (pid, fd) in pinned {
                if still.binary_search(&pid).is_ok() {
                    kill_pinned(pid, fd.as_ref());
                }
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// [`SandboxCgroup::kill_all`], then `rmdir` of the descendants depth-first and of the directory itself in
    /// every hierarchy. Already missing is success; `EBUSY` (exiting tasks draining) is retried for up to 2 s.
    pub fn destroy(&self) -> Result<(), CgroupError> {
        self.kill_all()?;
        let deadline = Instant::now() + RMDIR_TIMEOUT;
        for dir in &self.dirs {
            let mut dirs = tree(dir)?;
            // `tree` is pre-order; reversed, every child comes before its parent.
            dirs.reverse();
            for d in dirs {
                rmdir_retry(&d, deadline)?;
            }
        }
        Ok(())
    }

    /// Whether the cgroup exists in at least one hierarchy.
    pub fn exists(&self) -> bool {
        self.dirs.iter().any(|d| d.exists())
    }
}

fn rmdir_retry(dir: &Path, deadline: Instant) -> Result<(), CgroupError> {
    let mut pause = Duration::from_millis(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                if Instant::now() >= deadline {
                    return Err(CgroupError::RemoveTimeout {
                        path: dir.to_path_buf(),
                        waited: RMDIR_TIMEOUT,
                    });
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(source) => {
                return Err(CgroupError::Io {
                    op: "rmdir",
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// `dir` and all its subdirectories, pre-order (every parent before its children). A missing `dir` gives an
/// empty list; subdirectories that vanish while walking are skipped.
fn tree(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let mut out = Vec::new();
    if dir.is_dir() {
        walk(dir, &mut out)?;
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), CgroupError> {
    out.push(dir.to_path_buf());
    let mut children = subdirs(dir)?;
    children.sort();
    for child in children {
        walk(&child, out)?;
    }
    Ok(())
}

/// The subdirectories of `dir` (none if `dir` is missing).
fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CgroupError::Io {
                op: "read dir",
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("read dir", dir))?;
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            names.push(entry.path());
        }
    }
    Ok(names)
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new fd or -1; no memory is passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_pidfd_open,
            libc::c_long::from(pid),
            0 as libc::c_long,
        )
    };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: `fd` was just returned by pidfd_open, is open, and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// SIGKILL through the pidfd if there is one (ESRCH = already gone); without one (pidfd_open failed: gone, or
/// a kernel < 5.3) fall back to kill(2).
fn kill_pinned(pid: u32, fd: Option<&OwnedFd>) {
    use std::os::fd::AsRawFd;
    let rc = match fd {
        Some(fd) => {
            // SAFETY: a valid pidfd, a signal number, a null siginfo (allowed: kernel fills it) and flags 0.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0 as libc::c_uint,
                )
            }
        }
        None => match libc::pid_t::try_from(pid) {
            // SAFETY: kill(2) with a positive pid and a signal number; no memory involved.
            Ok(p) if p > 0 => libc::c_long::from(unsafe { libc::kill(p, libc::SIGKILL) }),
            _ => 0,
        },
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(pid, error = %e, "SIGKILL of a cgroup member");
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Pure helpers (no filesystem): tested without root.
// ---------------------------------------------------------------------------------------------------------

/// One line of `/proc/<pid>/mountinfo`, the fields we need.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountEntry {
    mount_root: PathBuf,
    mount_point: PathBuf,
    fstype: String,
    super_opts: Vec<String>,
}

impl MountEntry {
    fn has_opt(&self, opt: &str) -> bool {
        self.super_opts.iter().any(|o| o == opt)
    }
}

/// Undo mountinfo's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            if pre.len() < 5 || post.len() < 3 {
                return None;
            }
            Some(MountEntry {
                mount_root: PathBuf::from(unescape_mountinfo(pre[3])),
                mount_point: PathBuf::from(unescape_mountinfo(pre[4])),
                fstype: post[0].to_string(),
                super_opts: post[2].split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// One line of `/proc/<pid>/cgroup`: `id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProcCgroupLine {
    hierarchy_id: String,
    controllers: Vec<String>,
    path: String,
}

fn parse_proc_cgroup(text: &str) -> Vec<ProcCgroupLine> {
    text.lines()
        .filter_map(|line| {
            let (id, rest) = line.split_once(':')?;
            // the path itself may contain ':'
            let (ctls, path) = rest.split_once(':')?;
            Some(ProcCgroupLine {
                hierarchy_id: id.to_string(),
                controllers: ctls
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect(),
                path: path.to_string(),
            })
        })
        .collect()
}

/// The daemon's own cgroup relative to the mount point: `own` (from /proc/self/cgroup) minus the mount root.
fn own_relative(controller: &str, own: &str, mount_root: &Path) -> Result<PathBuf, CgroupError> {
    let not_visible = || CgroupError::OwnCgroupNotVisible {
        controller: controller.to_string(),
        own: own.to_string(),
        mount_root: mount_root.display().to_string(),
    };
    let own_path = Path::new(own);
    if !own_path.is_absolute()
        || own_path
            .components()
            .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(not_visible());
    }
    let rel = own_path
        .strip_prefix(mount_root)
        .map_err(|_| not_visible())?;
    Ok(rel.to_path_buf())
}

/// `parent` → (absolute?, path relative to the base). Components: `[A-Za-z0-9._-]`, not `.`/`..`, non-empty.
fn parse_parent(parent: &str) -> Result<(bool, PathBuf), CgroupError> {
    let absolute = parent.starts_with('/');
    let body = parent.trim_start_matches('/');
    if body.is_empty() {
        return Err(CgroupError::InvalidName {
            what: "cgroup parent",
            value: parent.to_string(),
            reason: "must name a directory below the root / own cgroup",
        });
    }
    let mut rel = PathBuf::new();
    for comp in body.split('/') {
        validate_name("cgroup parent", comp).map_err(|_| CgroupError::InvalidName {
            what: "cgroup parent",
            value: parent.to_string(),
            reason: "components must be non-empty, not '.'/'..', of [A-Za-z0-9._-]",
        })?;
        rel.push(comp);
    }
    Ok((absolute, rel))
}

/// Sandbox ids and child names: 1..=128 of `[A-Za-z0-9._-]`, not starting with '.'.
fn validate_name(what: &'static str, name: &str) -> Result<(), CgroupError> {
    let bad = |reason| {
        Err(CgroupError::InvalidName {
            what,
            value: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 128 {
        return bad("length must be 1..=128");
    }
    if name.starts_with('.') {
        return bad("must not start with '.'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("only [A-Za-z0-9._-] allowed");
    }
    Ok(())
}

/// CFS quota for `millis` millicores with [`CPU_PERIOD_US`]: `millis * period / 1000`; the kernel minimum is 1 ms.
fn cpu_quota_us(millis: u64) -> Result<i64, CgroupError> {
    let quota = millis
        .checked_mul(CPU_PERIOD_US)
        .map(|v| v / 1000)
        .and_then(|v| i64::try_from(v).ok())
        .ok_or_else(|| CgroupError::InvalidLimit(format!("cpu_millis {millis} too large")))?;
    if quota < 1000 {
        return Err(CgroupError::InvalidLimit(format!(
            "cpu_millis {millis} below the minimum of 10"
        )));
    }
    Ok(quota)
}

fn to_i64(what: &str, v: u64) -> Result<i64, CgroupError> {
    i64::try_from(v).map_err(|_| CgroupError::InvalidLimit(format!("{what} {v} too large")))
}

/// Required controllers absent from a `cgroup.controllers` text.
fn missing_controllers(available: &str, required: &[&str]) -> Vec<String> {
    let have: BTreeSet<&str> = available.split_whitespace().collect();
    required
        .iter()
        .filter(|c| !have.contains(*c))
        .map(|c| c.to_string())
        .collect()
}

/// Controllers to write into `cgroup.subtree_control`: required + available optional ones, minus enabled.
fn controllers_to_enable(available: &str, enabled: &str) -> Vec<String> {
    let have: BTreeSet<&str> = available.split_whitespace().collect();
    let on: BTreeSet<&str> = enabled.split_whitespace().collect();
    V2_REQUIRED
        .iter()
        .chain(V2_OPTIONAL.iter().filter(|c| have.contains(*c)))
        .filter(|c| !on.contains(*c))
        .map(|c| c.to_string())
        .collect()
}

/// The value of `key` in a flat-keyed file (`memory.events`, `memory.oom_control`).
fn parse_flat_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut it = line.split_whitespace();
        (it.next()? == key).then_some(())?;
        it.next()?.parse().ok()
    })
}

fn parse_pid_list(text: &str) -> Result<Vec<u32>, String> {
    text.split_whitespace()
        .map(|w| w.parse::<u32>().map_err(|_| text.to_string()))
        .collect()
}

fn read_text(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(io_err("read", path))
}

/// Write to an existing (kernel) file: no O_CREAT, no O_TRUNC, one write(2).
fn write_existing(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("open", path))?;
    f.write_all(value.as_bytes()).map_err(io_err("write", path))
}

/// Like [`write_existing`] but creates the file when missing (only possible on a scratch tree, cgroupfs refuses
/// O_CREAT of unknown names), mirroring what cgroups-rs does for the other limit files.
fn write_existing_or_new(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err("open", path))?;
    f.write_all(value.as_bytes()).map_err(io_err("write", path))
}

#[cfg(test)]
mod tests;
