//! The sandbox registry: create, supervise, stop, delete, exec, and re-adoption after a daemon restart.
//!
//! Persistence rule: a sandbox's record (`sandbox.json`) is written before any resource of it is created
//! and after every state change, so that a daemon killed at any point can, when it starts again, tell
//! running sandboxes (re-adopted through a pidfd on their supervisor) from half-created ones (torn down:
//! processes, cgroup, state directory).

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use sandbox_proto::{
    ApiError, CreateSandboxRequest, DiskUsage, ErrorCode, ExecRequest, ExecResult, ExitInfo,
    ImageInfo, ImageRef, ImageUsage, ImportImageRequest, LogsResult, PruneImagesRequest,
    PruneReport, PullImageRequest, PullPolicy, PullResult, ResourceLimits, SandboxInfo,
    SandboxStatus, WaitCondition,
};
use sandbox_runtime::cgroups::{CgroupManager, Limits, SandboxCgroup};
use sandbox_runtime::image::{ImageStore, StoredImage};
use sandbox_runtime::spec::{
    read_json, ExecEvent, ExecSpec, ExitRecord, ProcRecord, ProcessSpec, SandboxSpec, StartReport,
    ID_RANGE,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::config::Config;
use crate::error::{image_error, internal};
use crate::pull::{Puller, Subscription};

/// How long a supervisor may take to report that its sandbox started.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a sandbox's teardown waits for the exit reports of the execs in flight when it ended.
const EXEC_DRAIN: Duration = Duration::from_secs(2);
/// After an exec's process exited, how long its output pipes may stay open (held by background
/// processes it left) before the collected output is returned.
const OUTPUT_DRAIN: Duration = Duration::from_millis(100);
/// ...and at most this long in all, if they keep writing.
const OUTPUT_DRAIN_MAX: Duration = Duration::from_secs(2);

/// The persisted record of one sandbox (`sandboxes/<id>/sandbox.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    id: String,
    name: String,
    image: String,
    image_digest: String,
    command: Vec<String>,
    /// Defaults for execs (env, cwd, user) and, when `command` is not empty, the main process.
    process: ProcessSpec,
    created_at_ms: u64,
    started_at_ms: Option<u64>,
    status_updated_at_ms: u64,
    finished_at_ms: Option<u64>,
    status: SandboxStatus,
    status_reason: Option<String>,
    exit: Option<ExitRecord>,
    init: Option<ProcRecord>,
    shim: Option<ProcRecord>,
    limits: ResourceLimits,
    host_uid: u32,
    tags: Vec<String>,
    auto_remove: bool,
    stop_requested: bool,
    cgroup: Option<SandboxCgroup>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    max_lifetime_seconds: Option<f64>,
    /// When the lifetime runs out (ms since the epoch); enforced by the daemon, also after a restart.
    #[serde(default)]
    deadline_ms: Option<u64>,
    /// The stop was the daemon's, at the end of the lifetime.
    #[serde(default)]
    lifetime_expired: bool,
    #[serde(default)]
    requests: ResourceLimits,
    /// Paths of the read-only mounted files.
    #[serde(default)]
    mounted_files: Vec<String>,
    #[serde(default)]
    volumes: Vec<sandbox_proto::VolumeSpec>,
    /// Its address, veth and policy (bridge mode); None: loopback only.
    #[serde(default)]
    net: Option<crate::network::NetRecord>,
}

impl Record {
    fn info(&self) -> SandboxInfo {
        use crate::time::rfc3339;
        SandboxInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            image: self.image.clone(),
            image_digest: self.image_digest.clone(),
            status: self.status,
            status_reason: self.status_reason.clone(),
            command: self.command.clone(),
            created_at: rfc3339(self.created_at_ms),
            started_at: self.started_at_ms.map(rfc3339),
            status_updated_at: rfc3339(self.status_updated_at_ms),
            finished_at: self.finished_at_ms.map(rfc3339),
            exit: self.exit.as_ref().map(|e| ExitInfo {
                code: e.code,
                signal: e.signal,
                oom_killed: e.oom_killed,
                reason: e.reason.clone(),
            }),
            pid: match self.status {
                SandboxStatus::Running | SandboxStatus::Terminating => {
                    self.init.map(|i| i.pid as u32)
                }
                _ => None,
            },
            limits: self.limits.clone(),
            host_uid: self.host_uid,
            tags: self.tags.clone(),
            auto_remove: self.auto_remove,
            annotations: self.annotations.clone(),
            max_lifetime_seconds: self.max_lifetime_seconds,
            expires_at: self.deadline_ms.map(rfc3339),
            requests: self.requests.clone(),
            mounted_files: self.mounted_files.clone(),
            volumes: self.volumes.clone(),
            network: Some(match &self.net {
                Some(n) => n.info(),
                None => sandbox_proto::NetworkInfo {
                    mode: "none".to_owned(),
                    ..sandbox_proto::NetworkInfo::default()
                },
            }),
            exposed_ports: self
                .net
                .as_ref()
                .map(|n| n.exposed.clone())
                .unwrap_or_default(),
        }
    }

    fn set_status(&mut self, s: SandboxStatus, reason: Option<String>) {
        self.status = s;
        self.status_reason = reason;
        self.status_updated_at_ms = sandbox_runtime::spec::now_ms();
    }
}

pub(crate) struct Entry {
    dir: PathBuf,
    rec: StdMutex<Record>,
    status: watch::Sender<SandboxStatus>,
    /// Becomes true once the sandbox has been removed.
    removed: watch::Sender<bool>,
    /// How many execs are between their start and their answer (see [`Entry::exec_started`]).
    execs: watch::Sender<usize>,
    /// Held by [`Manager::finalize`] from before it records the end until the sandbox's firewall elements,
    /// ports and address are released: a removal waits for it, so nothing of a removed sandbox is left.
    releasing: tokio::sync::Mutex<()>,
}

/// Held while an exec runs; the sandbox's teardown waits (bounded) for these to be dropped.
pub(crate) struct ExecGuard<'a>(&'a watch::Sender<usize>);

impl Drop for ExecGuard<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Entry {
    /// Marks an exec in flight until the guard is dropped. When the sandbox ends, every command dies with
    /// its pid namespace and its helper reports at once; the teardown waits for those reports before it
    /// kills the cgroup (the helpers are in it), so a command that finished just before its sandbox did
    /// still gets its exit status answered.
    pub(crate) fn exec_started(&self) -> ExecGuard<'_> {
        self.execs.send_modify(|n| *n += 1);
        ExecGuard(&self.execs)
    }

    fn snapshot(&self) -> Record {
        lock(&self.rec).clone()
    }

    /// Applies `f` to the record, persists it and publishes the status.
    fn update(&self, f: impl FnOnce(&mut Record)) -> Record {
        let rec = {
            let mut r = lock(&self.rec);
            f(&mut r);
            r.clone()
        };
        if let Err(e) = persist(&self.dir, &rec) {
            tracing::error!(id = %rec.id, "persisting the sandbox record: {e}");
        }
        self.status.send_replace(rec.status);
        rec
    }
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes the record atomically (temp file + rename): it survives a daemon crash at any point.
fn persist(dir: &Path, rec: &Record) -> std::io::Result<()> {
    sandbox_runtime::spec::write_json_replace(&dir.join("sandbox.json"), rec)
}

/// The daemon's state.
pub struct Manager {
    cfg: Config,
    exe: PathBuf,
    root: PathBuf,
    images: Arc<ImageStore>,
    puller: Arc<Puller>,
    cgroups: Arc<CgroupManager>,
    /// Bridge-mode networking; None in mode `none`.
    net: Option<Arc<crate::network::Network>>,
    sandboxes: tokio::sync::Mutex<BTreeMap<String, Arc<Entry>>>,
    counter: AtomicU64,
    /// Deletions of removed sandboxes' directories still running.
    background: Arc<StdMutex<Vec<std::thread::JoinHandle<()>>>>,
    /// Pooled supervisors waiting for a sandbox (see `sandbox_runtime::shim::main`).
    pool: StdMutex<Vec<PoolEntry>>,
    /// A refill of the pool is under way.
    refilling: std::sync::atomic::AtomicBool,
    /// The daemon is shutting down: no more pooled supervisors.
    shutting_down: std::sync::atomic::AtomicBool,
    /// Ids (and cgroup names) reserved by pooled supervisors, persisted in `state_dir/pool.json`: an id is
    /// written there before its cgroup is created and dropped only after the cgroup is gone (or the id has
    /// become a sandbox's, recorded in its own `sandbox.json`).
    pool_ids: StdMutex<std::collections::BTreeSet<String>>,
    /// Held around taking addresses and around replacing a pooled supervisor's network (release, then
    /// activate with the same address): nobody can lease that address in between.
    leasing: StdMutex<()>,
    /// One exec helper per running sandbox, prepared ahead of time (in the sandbox's namespaces and a
    /// leaf cgroup of its own), taken by the next exec; see `sandbox_runtime::exec`.
    exec_slots: StdMutex<std::collections::HashMap<String, crate::helper::Helper>>,
}

/// A supervisor prepared ahead of time, with the id and cgroup its sandbox will have.
struct PoolEntry {
    id: String,
    cgroup: SandboxCgroup,
    child: tokio::process::Child,
    /// The address and veth its supervisor made (bridge mode).
    lease: Option<crate::network::Lease>,
    /// Its network, activated with the default policy under the pool entry's id (which becomes the
    /// sandbox's): a sandbox with that policy finds its firewall elements in place.
    net: Option<crate::network::NetRecord>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::SandboxNotFound,
        format!("no sandbox with id or name {id:?}"),
    )
}

pub(crate) fn random_id() -> String {
    let mut b = [0u8; 8];
    use std::io::Read as _;
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let t = sandbox_runtime::spec::now_ms() ^ u64::from(std::process::id()) << 40;
        b = t.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.as_bytes()[0].is_ascii_alphanumeric()
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn valid_id(n: &str) -> bool {
    n.len() == 16 && n.bytes().all(|b| b.is_ascii_hexdigit())
}

fn validate_env(field: &str, env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(ApiError::invalid_argument(
                field,
                format!("invalid environment variable {k:?}: names must be non-empty without '=' or NUL"),
            ));
        }
    }
    Ok(())
}

fn merge_env(base: &[String], extra: &BTreeMap<String, String>) -> Vec<String> {
    let mut out: Vec<String> = base
        .iter()
        .filter(|e| {
            e.split_once('=')
                .is_none_or(|(k, _)| !extra.contains_key(k))
        })
        .cloned()
        .collect();
    out.extend(extra.iter().map(|(k, v)| format!("{k}={v}")));
    out
}

fn validate_timeout(field: &str, t: Option<f64>) -> Result<(), ApiError> {
    match t {
        Some(t) if !(t.is_finite() && t > 0.0 && t <= 1e7) => Err(ApiError::invalid_argument(
            field,
            format!("{field} must be a positive number of seconds, got {t}"),
        )),
        _ => Ok(()),
    }
}

impl Manager {
    /// Opens the state directory, the image store and the cgroup parent, and re-adopts sandboxes.
    pub async fn start(cfg: Config) -> Result<Arc<Self>, anyhow_like::Error> {
        let exe = std::env::current_exe()
            .map_err(|e| anyhow_like::Error(format!("finding own executable: {e}")))?;
        let root = cfg.state_dir.join("sandboxes");
        std::fs::create_dir_all(&root)
            .map_err(|e| anyhow_like::Error(format!("creating {}: {e}", root.display())))?;
        // Sandboxes' writable layers hold whatever their root made (setuid files of the sandbox's host uid
        // included): only root goes below.
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| anyhow_like::Error(format!("chmod {}: {e}", root.display())))?;
        }
        let images = ImageStore::open(&cfg.state_dir.join("images"))
            .map_err(|e| anyhow_like::Error(format!("opening the image store: {e}")))?;
        let images = Arc::new(images);
        let puller = Arc::new(
            Puller::new(images.clone(), &cfg)
                .map_err(|e| anyhow_like::Error(format!("setting up image pulls: {e}")))?,
        );
        let cgroups = CgroupManager::new(&cfg.cgroup_parent).map_err(|e| {
            anyhow_like::Error(format!(
                "setting up the cgroup parent {:?}: {e}",
                cfg.cgroup_parent
            ))
        })?;
        let net = crate::network::Network::start(&cfg.network, &cfg.state_dir)
            .await
            .map_err(|e| anyhow_like::Error(format!("setting up sandbox networking: {e}")))?
            .map(Arc::new);
        let m = Arc::new(Self {
            cfg,
            exe,
            root,
            images,
            puller,
            cgroups: Arc::new(cgroups),
            net,
            sandboxes: tokio::sync::Mutex::new(BTreeMap::new()),
            counter: AtomicU64::new(0),
            background: Arc::new(StdMutex::new(Vec::new())),
            pool: StdMutex::new(Vec::new()),
            refilling: std::sync::atomic::AtomicBool::new(false),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            pool_ids: StdMutex::new(std::collections::BTreeSet::new()),
            leasing: StdMutex::new(()),
            exec_slots: StdMutex::new(std::collections::HashMap::new()),
        });
        m.recover().await;
        if let Some(net) = &m.net {
            net.install().await.map_err(|e| {
                anyhow_like::Error(format!("setting up sandbox networking: {}", e.message))
            })?;
        }
        m.collect_images().await;
        m.schedule_refill();
        Ok(m)
    }

    /// Starts a supervisor: for `state_dir`, or pooled (waiting for one on stdin, its init already in
    /// `pool_cgroup`) when `None`.
    fn spawn_shim(
        &self,
        state_dir: Option<&Path>,
        pool_cgroup: Option<&SandboxCgroup>,
        lease: Option<&crate::network::Lease>,
    ) -> std::io::Result<tokio::process::Child> {
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg0("sandboxd")
            .arg("shim")
            .stdout(Stdio::piped())
            .env_clear()
            .env("RUST_BACKTRACE", "1")
            .kill_on_drop(false);
        if let (Some(net), Some(lease)) = (&self.net, lease) {
            cmd.env(
                sandbox_runtime::net::NET_ENV,
                serde_json::to_string(&net.attach(lease)).map_err(std::io::Error::other)?,
            );
        }
        if let Some(cg) = pool_cgroup {
            cmd.env(
                sandbox_runtime::shim::POOL_CGROUP_ENV,
                serde_json::to_string(cg).map_err(std::io::Error::other)?,
            );
        }
        match state_dir {
            Some(dir) => {
                let log = std::fs::File::create(dir.join("shim.log"))?;
                // A networked supervisor waits for its go-ahead there.
                let stdin = if lease.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                };
                cmd.stdin(stdin)
                    .stderr(Stdio::from(log))
                    .env(sandbox_runtime::shim::STATE_DIR_ENV, dir);
            }
            None => {
                cmd.stdin(Stdio::piped()).stderr(Stdio::null());
            }
        }
        cmd.spawn()
    }

    fn pool_ids_changed(&self, f: impl FnOnce(&mut std::collections::BTreeSet<String>)) {
        let mut ids = lock(&self.pool_ids);
        f(&mut ids);
        let path = self.cfg.state_dir.join("pool.json");
        if let Err(e) = sandbox_runtime::spec::write_json_replace(&path, &*ids) {
            tracing::warn!("writing {}: {e}", path.display());
        }
    }

    /// Tops the pool up in the background (one refill at a time).
    fn schedule_refill(self: &Arc<Self>) {
        if self.cfg.warm_pool == 0 || self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            me.refill_pool();
            me.refilling.store(false, Ordering::Release);
        });
    }

    /// Tops the pool of ready supervisors up to the configured size (blocking: creates cgroups).
    fn refill_pool(&self) {
        let mut dead = Vec::new();
        {
            let mut pool = lock(&self.pool);
            let mut i = 0;
            while i < pool.len() {
                if matches!(pool[i].child.try_wait(), Ok(None)) {
                    i += 1;
                } else {
                    dead.push(pool.swap_remove(i));
                }
            }
        }
        for e in dead {
            if let Some(net) = &self.net {
                self.release_pooled(net, &e);
            }
            if e.cgroup.destroy().is_ok() {
                self.pool_ids_changed(|ids| {
                    ids.remove(&e.id);
                });
            }
        }
        while lock(&self.pool).len() < self.cfg.warm_pool
            && !self.shutting_down.load(Ordering::Acquire)
        {
            // The id keys the pooled network state too: it must not be a sandbox's (this runs on a blocking
            // thread, where the registry can be locked).
            let id = loop {
                let id = random_id();
                let sandbox = self.sandboxes.blocking_lock().contains_key(&id);
                if !sandbox && !lock(&self.pool_ids).contains(&id) {
                    break id;
                }
            };
            self.pool_ids_changed(|ids| {
                ids.insert(id.clone());
            });
            let forget = |id: &str| {
                self.pool_ids_changed(|ids| {
                    ids.remove(id);
                })
            };
            let cgroup = match self.cgroups.create(&id, &Limits::default()) {
                Ok(c) => c,
                Err(e) => {
                    forget(&id);
                    tracing::warn!("creating a pooled sandbox cgroup: {e}");
                    return;
                }
            };
            let (lease, netrec) = match &self.net {
                Some(net) => match self.lease_pooled(net, &id) {
                    Ok((l, n)) => (Some(l), Some(n)),
                    Err(e) => {
                        if cgroup.destroy().is_ok() {
                            forget(&id);
                        }
                        tracing::warn!("no network for a pooled sandbox: {}", e.message);
                        return;
                    }
                },
                None => (None, None),
            };
            match self.spawn_shim(None, Some(&cgroup), lease.as_ref()) {
                Ok(child) => lock(&self.pool).push(PoolEntry {
                    id,
                    cgroup,
                    child,
                    lease,
                    net: netrec,
                }),
                Err(e) => {
                    if let Some(net) = &self.net {
                        net.release(&id);
                    }
                    if cgroup.destroy().is_ok() {
                        forget(&id);
                    }
                    tracing::warn!("starting a pooled supervisor: {e}");
                    return;
                }
            }
        }
    }

    /// An address for a pooled supervisor, activated with the default policy under the entry's `id` (before
    /// any sandbox can use it, its elements only let that address be reached and reach out as every default
    /// sandbox may; nothing runs behind it until a sandbox is assigned).
    fn lease_pooled(
        &self,
        net: &crate::network::Network,
        id: &str,
    ) -> Result<(crate::network::Lease, crate::network::NetRecord), ApiError> {
        let policy = crate::network::validate(None, &[], self.cfg.network.publish_host_ip)?;
        let lease = self.lease(net)?;
        match net.activate(id, &lease, &policy) {
            Ok(n) => Ok((lease, n)),
            Err(e) => {
                net.unlease(&lease);
                Err(e)
            }
        }
    }

    /// The next free address (see `leasing`).
    fn lease(&self, net: &crate::network::Network) -> Result<crate::network::Lease, ApiError> {
        let _leasing = lock(&self.leasing);
        net.lease()
    }

    /// Gives back a pooled supervisor's address and firewall elements.
    fn release_pooled(&self, net: &crate::network::Network, e: &PoolEntry) {
        if e.net.is_some() {
            net.release(&e.id);
        } else if let Some(l) = &e.lease {
            net.unlease(l);
        }
    }

    /// Takes a pooled supervisor whose id is still free (the caller holds the registry lock).
    fn take_pooled(&self, taken: &BTreeMap<String, Arc<Entry>>) -> Option<PoolEntry> {
        let mut pool = lock(&self.pool);
        let i = pool.iter().position(|e| !taken.contains_key(&e.id))?;
        Some(pool.swap_remove(i))
    }

    /// Hands the sandbox in `dir` to its supervisor: the pooled one, or a fresh one. A networked supervisor
    /// keeps its stdin open for its go-ahead (see `sandbox_runtime::shim::GO_LINE`); `lease` gets a fresh
    /// veth name when a fresh supervisor replaces a pooled one.
    async fn launch_shim(
        &self,
        entry: &Entry,
        pooled: Option<PoolEntry>,
        lease: Option<&mut crate::network::Lease>,
    ) -> Result<tokio::process::Child, ApiError> {
        let dir = entry.dir.as_path();
        let replaced = pooled.is_some();
        if let Some(mut e) = pooled {
            if let Some(mut stdin) = e.child.stdin.take() {
                let mut line = dir.as_os_str().as_encoded_bytes().to_vec();
                line.push(b'\n');
                if stdin.write_all(&line).await.is_ok() {
                    e.child.stdin = Some(stdin);
                    return Ok(e.child);
                }
            }
            // That supervisor is gone: reap it and start a fresh one (the cgroup stays, it is the sandbox's).
            let _ = e.child.start_kill();
            let _ = e.child.wait().await;
        }
        // A fresh supervisor makes a fresh link (the old one may linger in its dying namespace for a moment):
        // same address, new name.
        let lease = match (&self.net, lease) {
            (Some(net), Some(l)) => {
                if replaced {
                    *l = net.renamed(&l.address);
                }
                Some(&*l)
            }
            _ => None,
        };
        self.spawn_shim(Some(dir), None, lease)
            .map_err(|e| internal("starting the sandbox supervisor", e))
    }

    /// Ends a pooled supervisor taken for a creation that failed before it was used (its cgroup is the
    /// failed sandbox's, removed with it).
    async fn dismiss_pooled(&self, mut p: PoolEntry) {
        drop(p.child.stdin.take());
        let _ = p.child.wait().await;
    }

    /// At a clean stop: removes the bridge and the firewall table when no sandbox has network state left.
    pub async fn shutdown_network(&self) {
        if let Some(net) = &self.net {
            net.teardown().await;
        }
    }

    /// Stops the pooled supervisors and removes their cgroups (at shutdown; after a crash they end by
    /// themselves and the next start removes their cgroups).
    pub async fn drain_pool(&self) {
        self.shutting_down.store(true, Ordering::Release);
        // A refill under way finishes the entry it is making (it checks the flag between entries); wait
        // for it so that its entry is drained too. There is no event for this; it takes milliseconds.
        for _ in 0..1000 {
            if !self.refilling.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let entries: Vec<_> = std::mem::take(&mut *lock(&self.pool));
        for mut e in entries {
            drop(e.child.stdin.take());
            let _ = e.child.wait().await;
            if let Some(net) = &self.net {
                self.release_pooled(net, &e);
            }
            let cg = e.cgroup;
            if let Ok(Ok(())) = tokio::task::spawn_blocking(move || cg.destroy()).await {
                self.pool_ids_changed(|ids| {
                    ids.remove(&e.id);
                });
            }
        }
    }

    /// Manifest digests of the images that sandboxes not yet ended run on.
    async fn images_in_use(&self) -> std::collections::HashSet<String> {
        self.sandboxes
            .lock()
            .await
            .values()
            .map(|e| e.snapshot())
            .filter(|r| !r.status.is_terminal())
            .map(|r| r.image_digest)
            .collect()
    }

    /// Garbage-collects images that lost their last name and that no live sandbox uses any more.
    async fn collect_images(&self) {
        let in_use = self.images_in_use().await;
        let images = self.images.clone();
        let res = tokio::task::spawn_blocking(move || images.collect_garbage(&in_use)).await;
        if let Ok(Err(e)) = res {
            tracing::warn!("image garbage collection: {e}");
        }
    }

    /// Waits for background deletions to finish (at shutdown).
    pub fn finish_background_work(&self) {
        let handles: Vec<_> = std::mem::take(&mut *lock(&self.background));
        for h in handles {
            let _ = h.join();
        }
    }

    /// `v1` or `v2`.
    pub fn cgroup_version(&self) -> &'static str {
        match self.cgroups.version() {
            sandbox_runtime::cgroups::CgroupVersion::V1 => "v1",
            sandbox_runtime::cgroups::CgroupVersion::V2 => "v2",
        }
    }

    async fn entry(&self, id_or_name: &str) -> Result<Arc<Entry>, ApiError> {
        let map = self.sandboxes.lock().await;
        if let Some(e) = map.get(id_or_name) {
            return Ok(e.clone());
        }
        map.values()
            .find(|e| lock(&e.rec).name == id_or_name)
            .cloned()
            .ok_or_else(|| not_found(id_or_name))
    }

    // ---------------------------------------------------------------- create

    /// Creates and starts a sandbox; answers once it is RUNNING (or failed, leaving nothing behind).
    pub async fn create(
        self: &Arc<Self>,
        req: CreateSandboxRequest,
    ) -> Result<SandboxInfo, ApiError> {
        let info = self.create_sandbox(req).await?;
        if info.status == SandboxStatus::Running && info.command.is_empty() {
            // An idle sandbox is there for execs: the first one finds its helper ready. (A sandbox with a
            // main command gets one after its first exec.)
            self.prepare_exec_slot(&info.id);
        }
        Ok(info)
    }

    async fn create_sandbox(
        self: &Arc<Self>,
        req: CreateSandboxRequest,
    ) -> Result<SandboxInfo, ApiError> {
        let image_ref = ImageRef::parse(&req.image)?;
        let limits = crate::resources::parse(&req.resources)?.limits;
        crate::resources::validate_annotations(&req.annotations)?;
        crate::resources::validate_lifetime(req.max_lifetime_seconds)?;
        if let Some(n) = &req.name {
            if !valid_name(n) {
                return Err(ApiError::invalid_argument(
                    "name",
                    format!("invalid name {n:?}: 1-63 characters of [A-Za-z0-9_.-], starting with a letter or digit"),
                ));
            }
        }
        if let Some(c) = &req.command {
            if c.is_empty() || c[0].is_empty() {
                return Err(ApiError::invalid_argument(
                    "command",
                    "command must not be empty",
                ));
            }
        }
        if let Some(cwd) = &req.cwd {
            if !cwd.starts_with('/') {
                return Err(ApiError::invalid_argument(
                    "cwd",
                    "cwd must be an absolute path",
                ));
            }
        }
        validate_env("env", &req.env)?;
        let mounts = crate::files::validate_mounts(&req.mounted_files, &req.volumes)?;
        let mut policy = crate::network::validate(
            req.network.as_ref(),
            &req.services,
            self.cfg.network.publish_host_ip,
        )?;
        policy.join_session(
            req.annotations
                .get(sandbox_proto::sandbox::SESSION_ANNOTATION)
                .map(String::as_str),
        )?;
        if self.net.is_none() {
            if policy.services() > 0 {
                return Err(ApiError::invalid_argument(
                    "services",
                    "this daemon runs sandboxes without networking ([network] mode = \"none\"): no ports can be published",
                ));
            }
            if req.network.as_ref().is_some_and(|n| !n.egress.is_empty()) {
                return Err(ApiError::invalid_argument(
                    "network.egress",
                    "this daemon runs sandboxes without networking ([network] mode = \"none\"): every sandbox is loopback-only",
                ));
            }
            if req.network.as_ref().is_some_and(|n| n.session_peers) {
                return Err(ApiError::invalid_argument(
                    "network.session_peers",
                    "this daemon runs sandboxes without networking ([network] mode = \"none\"): sandboxes cannot reach each other",
                ));
            }
        }
        if req.tags.iter().any(|t| t.is_empty() || t.len() > 128) {
            return Err(ApiError::invalid_argument(
                "tags",
                "tags must be 1-128 characters",
            ));
        }

        let canonical = image_ref.canonical();
        let image = self.ensure_image(&canonical, req.pull).await?;
        let cfg = &image.config;
        let argv: Vec<String> = match (&req.command, req.use_image_command) {
            (Some(cmd), _) => cfg.entrypoint.iter().chain(cmd.iter()).cloned().collect(),
            (None, true) => {
                let v: Vec<String> = cfg
                    .entrypoint
                    .iter()
                    .chain(cfg.cmd.iter())
                    .cloned()
                    .collect();
                if v.is_empty() {
                    return Err(ApiError::invalid_argument(
                        "use_image_command",
                        format!("image {canonical} has no Entrypoint or Cmd"),
                    ));
                }
                v
            }
            (None, false) => Vec::new(),
        };
        let process = ProcessSpec {
            args: argv.clone(),
            env: merge_env(&cfg.env, &req.env),
            cwd: req.cwd.clone().unwrap_or_else(|| {
                if cfg.working_dir.is_empty() {
                    "/".into()
                } else {
                    cfg.working_dir.clone()
                }
            }),
            user: req.user.clone().unwrap_or_else(|| {
                if cfg.user.is_empty() {
                    "0".into()
                } else {
                    cfg.user.clone()
                }
            }),
        };

        // Reserve id, name and uid range, and persist the record before creating anything. A pooled
        // supervisor brings the id (and a cgroup its init already joined).
        let (entry, rec, pooled) = {
            let mut map = self.sandboxes.lock().await;
            let mut pooled = self.take_pooled(&map);
            let id = match &pooled {
                Some(p) => p.id.clone(),
                None => loop {
                    let id = random_id();
                    if !map.contains_key(&id) && !lock(&self.pool_ids).contains(&id) {
                        break id;
                    }
                },
            };
            let reserved = self.reserve(
                &mut map,
                id,
                &req,
                canonical.clone(),
                &image,
                argv,
                process,
                &limits,
            );
            match reserved {
                Ok((entry, rec)) => {
                    if pooled.is_some() {
                        // The id is now recorded as this sandbox's.
                        self.pool_ids_changed(|ids| {
                            ids.remove(&rec.id);
                        });
                    }
                    (entry, rec, pooled)
                }
                Err(e) => {
                    if let Some(p) = pooled.take() {
                        lock(&self.pool).push(p);
                    }
                    return Err(e);
                }
            }
        };

        match self
            .start_sandbox(&entry, &rec, &image, &limits, pooled, &mounts, &policy)
            .await
        {
            Ok(info) => Ok(info),
            Err(e) => {
                // Releases anyone waiting for the creation to settle (a stop or delete that raced it).
                entry.status.send_replace(SandboxStatus::Failed);
                self.discard(&entry).await;
                Err(e)
            }
        }
    }

    /// Reserves the name and a uid range and persists the record (status CREATING).
    #[allow(clippy::too_many_arguments)]
    fn reserve(
        &self,
        map: &mut BTreeMap<String, Arc<Entry>>,
        id: String,
        req: &CreateSandboxRequest,
        canonical: String,
        image: &StoredImage,
        argv: Vec<String>,
        process: ProcessSpec,
        limits: &ResourceLimits,
    ) -> Result<(Arc<Entry>, Record), ApiError> {
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| format!("sb-{}", &id[..8]));
        if map.values().any(|e| lock(&e.rec).name == name) {
            return Err(ApiError::new(
                ErrorCode::NameConflict,
                format!("the name {name:?} is already in use"),
            ));
        }
        let used: std::collections::HashSet<u32> =
            map.values().map(|e| lock(&e.rec).host_uid).collect();
        let host_uid = (0..self.cfg.max_sandboxes)
            .map(|i| self.cfg.uid_base + i * ID_RANGE)
            .find(|u| !used.contains(u))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::ResourceExhausted,
                    format!(
                        "all {} sandbox uid ranges are in use; remove sandboxes first",
                        self.cfg.max_sandboxes
                    ),
                )
            })?;
        let now = sandbox_runtime::spec::now_ms();
        let rec = Record {
            id: id.clone(),
            name,
            image: canonical,
            image_digest: image.digest.clone(),
            command: argv,
            process,
            created_at_ms: now,
            started_at_ms: None,
            status_updated_at_ms: now,
            finished_at_ms: None,
            status: SandboxStatus::Creating,
            status_reason: None,
            exit: None,
            init: None,
            shim: None,
            limits: limits.clone(),
            host_uid,
            tags: req.tags.clone(),
            auto_remove: req.auto_remove,
            stop_requested: false,
            cgroup: None,
            annotations: req.annotations.clone(),
            max_lifetime_seconds: req.max_lifetime_seconds,
            deadline_ms: req
                .max_lifetime_seconds
                .map(|s| now.saturating_add((s * 1000.0) as u64)),
            lifetime_expired: false,
            // Parsed (and checked) by `create` already.
            requests: crate::resources::parse(&req.resources)
                .map(|p| p.requests)
                .unwrap_or_default(),
            mounted_files: req
                .mounted_files
                .iter()
                .map(|f| f.mount_path.clone())
                .collect(),
            volumes: req.volumes.clone(),
            net: None,
        };
        let dir = self.root.join(&id);
        std::fs::create_dir(&dir)
            .map_err(|e| internal("creating the sandbox's state directory", e))?;
        if let Err(e) = persist(&dir, &rec) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(internal("persisting the sandbox record", e));
        }
        let (tx, _) = watch::channel(rec.status);
        let entry = Arc::new(Entry {
            dir,
            rec: StdMutex::new(rec.clone()),
            status: tx,
            removed: watch::channel(false).0,
            execs: watch::channel(0).0,
            releasing: tokio::sync::Mutex::new(()),
        });
        map.insert(id, entry.clone());
        Ok((entry, rec))
    }

    /// The stored image for `canonical`, pulled first as `policy` says.
    async fn ensure_image(
        &self,
        canonical: &str,
        policy: PullPolicy,
    ) -> Result<StoredImage, ApiError> {
        match policy {
            PullPolicy::Never => self.resolve_image(canonical).await,
            PullPolicy::Missing => match self.resolve_image(canonical).await {
                Err(e) if e.code == ErrorCode::ImageNotFound => {
                    tracing::info!(image = %canonical, "image not stored; pulling it");
                    self.puller.pull(canonical, None).await?;
                    self.resolve_image(canonical).await
                }
                other => other,
            },
            PullPolicy::Always => {
                self.puller.pull(canonical, None).await?;
                self.resolve_image(canonical).await
            }
        }
    }

    async fn resolve_image(&self, canonical: &str) -> Result<StoredImage, ApiError> {
        let images = self.images.clone();
        let r = canonical.to_owned();
        let found = tokio::task::spawn_blocking(move || images.resolve(&r))
            .await
            .map_err(|e| internal("image lookup", e))?;
        found.map_err(|e| match e {
            sandbox_runtime::image::ImageError::NotFound(_) => ApiError::new(
                ErrorCode::ImageNotFound,
                format!("image {canonical} is not stored here (pull policy \"never\"); import or pull it first"),
            ),
            other => image_error(other),
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn start_sandbox(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        rec: &Record,
        image: &StoredImage,
        limits: &ResourceLimits,
        mut pooled: Option<PoolEntry>,
        mounts: &crate::files::MountPlan,
        policy: &crate::network::Policy,
    ) -> Result<SandboxInfo, ApiError> {
        // The address: a pooled supervisor's link has it already (and its firewall elements, for the default
        // policy).
        let pre = pooled.as_mut().and_then(|p| p.net.take());
        let mut lease = match &self.net {
            Some(net) => match pooled.as_mut().and_then(|p| p.lease.take()) {
                Some(l) => Some(l),
                None => match self.lease(net) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        if let Some(p) = pooled.take() {
                            self.dismiss_pooled(p).await;
                        }
                        return Err(e);
                    }
                },
            },
            None => None,
        };
        let net_spec = match (&self.net, &lease) {
            (Some(net), Some(l)) => Some(sandbox_runtime::spec::SandboxNetSpec {
                address: l.address,
                prefix_len: net.prefix_len(),
                gateway: net.gateway(),
                dns: net
                    .nameservers(policy)
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                dns_search: self.cfg.network.dns_search.clone(),
            }),
            _ => None,
        };
        let pooled_cg = pooled.as_ref().map(|p| p.cgroup.clone());
        let launched = match self
            .write_spec(entry, rec, image, limits, mounts, pooled_cg, net_spec)
            .await
        {
            Ok(()) => self.launch_shim(entry, pooled, lease.as_mut()).await,
            Err(e) => {
                if let Some(p) = pooled {
                    // Its link has this address: the supervisor goes with the failed create.
                    self.dismiss_pooled(p).await;
                }
                Err(e)
            }
        };
        let mut child = match launched {
            Ok(c) => c,
            Err(e) => {
                // A pooled supervisor's network is released by `discard`, under the sandbox's id.
                if let (Some(net), Some(l), None) = (&self.net, &lease, &pre) {
                    net.unlease(l);
                }
                return Err(e);
            }
        };
        let stdin = child.stdin.take();
        // Recorded with the start: a creation interrupted before has nothing of its network left after a
        // restart (the table is rebuilt from the running sandboxes).
        let mut netrec = None;
        if let (Some(net), Some(lease)) = (&self.net, &lease) {
            // Published ports and firewall elements, added while the supervisor prepares the sandbox (it lets
            // the init go only on the line below, once they are in place); `discard` undoes them if the
            // creation fails later.
            let activated = match pre {
                // The pooled supervisor's, activated with this very policy and link.
                Some(n)
                    if n.host_if == lease.host_if
                        && n.policy == policy.options
                        && policy.services() == 0 =>
                {
                    Ok(n)
                }
                Some(_) => {
                    // The pooled elements give way to the sandbox's own; the address stays taken.
                    let _leasing = lock(&self.leasing);
                    net.release(&rec.id);
                    self.activate(&rec.id, net, lease, policy)
                }
                None => self.activate(&rec.id, net, lease, policy),
            };
            match activated {
                Ok(n) => netrec = Some(n),
                Err(e) => {
                    drop(stdin);
                    // Without its go-ahead the supervisor ends the init and exits.
                    let _ = child.wait().await;
                    return Err(e);
                }
            }
            let mut line = sandbox_runtime::shim::GO_LINE.as_bytes().to_vec();
            line.push(b'\n');
            if let Some(mut stdin) = stdin {
                // A supervisor that is gone reports nothing: the report below says so.
                let _ = stdin.write_all(&line).await;
            }
        }
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| internal("supervisor", "no stdout pipe"))?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let report = match tokio::time::timeout(START_TIMEOUT, lines.next_line()).await {
            Ok(Ok(Some(line))) => serde_json::from_str::<StartReport>(&line).map_err(|e| {
                internal("decoding the supervisor's report", format!("{e}: {line:?}"))
            }),
            Ok(Ok(None)) => Err(ApiError::new(
                ErrorCode::StartFailed,
                format!(
                    "the sandbox supervisor exited without a report; see {}/shim.log",
                    entry.dir.display()
                ),
            )),
            Ok(Err(e)) => Err(internal("reading the supervisor's report", e)),
            Err(_) => Err(ApiError::new(
                ErrorCode::StartFailed,
                "the sandbox did not start within 60 s",
            )),
        };
        let init = match report {
            Ok(StartReport::Started { init }) => init,
            Ok(StartReport::Exited) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(internal("supervisor", "reported an exit before a start"));
            }
            Ok(StartReport::Failed { message }) => {
                let _ = child.wait().await;
                return Err(ApiError::new(
                    ErrorCode::StartFailed,
                    format!("the sandbox could not start: {message}"),
                ));
            }
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(e);
            }
        };
        let shim = read_json::<ProcRecord>(&entry.dir.join("shim.json"))
            .ok()
            .flatten();
        let rec = entry.update(|r| {
            r.init = Some(init);
            r.shim = shim;
            r.net = netrec;
            r.started_at_ms = Some(sandbox_runtime::spec::now_ms());
            r.set_status(SandboxStatus::Running, None);
        });
        let me = self.clone();
        let id = rec.id.clone();
        tokio::spawn(async move {
            // The supervisor says `exited` as soon as the exit is recorded; its own exit (after the kernel has
            // torn the namespaces down) is the fallback when the line never comes.
            let exited_line = async {
                loop {
                    match lines.next_line().await {
                        Ok(Some(l))
                            if matches!(serde_json::from_str(&l), Ok(StartReport::Exited)) =>
                        {
                            return
                        }
                        Ok(Some(_)) => continue,
                        _ => std::future::pending::<()>().await,
                    }
                }
            };
            tokio::select! {
                () = exited_line => {
                    me.finalize(&id).await;
                    let _ = child.wait().await;
                }
                _ = child.wait() => me.finalize(&id).await,
            }
        });
        if let Some(deadline) = rec.deadline_ms {
            self.arm_lifetime(rec.id.clone(), deadline);
        }
        self.schedule_refill();
        Ok(rec.info())
    }

    /// Sets the sandbox's cgroup up (the pooled supervisor's, or a new one), stages its mounts and writes
    /// `spec.json` for its supervisor.
    #[allow(clippy::too_many_arguments)]
    async fn write_spec(
        &self,
        entry: &Arc<Entry>,
        rec: &Record,
        image: &StoredImage,
        limits: &ResourceLimits,
        mounts: &crate::files::MountPlan,
        pooled_cg: Option<SandboxCgroup>,
        network: Option<sandbox_runtime::spec::SandboxNetSpec>,
    ) -> Result<(), ApiError> {
        let cg_limits = Limits {
            memory_bytes: limits.memory_bytes,
            cpu_millis: limits.cpu_millis,
            pids: limits.pids,
        };
        let requests = sandbox_runtime::cgroups::Requests {
            cpu_millis: rec.requests.cpu_millis,
            memory_bytes: rec.requests.memory_bytes,
        };
        let cgroups = self.cgroups.clone();
        let id = rec.id.clone();
        let cgroup = tokio::task::spawn_blocking(move || {
            let cg = match pooled_cg {
                Some(cg) => cgroups.apply_limits(&cg, &cg_limits).map(|()| cg),
                None => cgroups.create(&id, &cg_limits),
            }?;
            cgroups.apply_requests(&cg, &requests).map(|()| cg)
        })
        .await
        .map_err(|e| internal("cgroup creation", e))?
        .map_err(|e| {
            ApiError::new(
                ErrorCode::StartFailed,
                format!("setting up the sandbox's cgroup: {e}"),
            )
        })?;
        entry.update(|r| r.cgroup = Some(cgroup.clone()));

        let (images, img) = (self.images.clone(), image.clone());
        let layers = tokio::task::spawn_blocking(move || images.layer_dirs(&img))
            .await
            .map_err(|e| internal("image layers", e))?;
        let (mounted_files, volumes) =
            crate::files::stage_mounts(&entry.dir, mounts, rec.host_uid).await?;
        let spec = SandboxSpec {
            id: rec.id.clone(),
            hostname: rec.name.clone(),
            state_dir: entry.dir.clone(),
            layers,
            host_uid: rec.host_uid,
            log_max_bytes: Some(self.cfg.logs.max_bytes),
            cgroup,
            process: if rec.command.is_empty() {
                None
            } else {
                Some(rec.process.clone())
            },
            mounted_files,
            volumes,
            network,
        };
        let spec_data =
            serde_json::to_vec_pretty(&spec).map_err(|e| internal("encoding the spec", e))?;
        std::fs::write(entry.dir.join("spec.json"), spec_data)
            .map_err(|e| internal("writing spec.json", e))?;
        Ok(())
    }

    /// Binds the sandbox's published ports and adds its firewall elements. On error nothing of it stays (the
    /// address is returned too).
    fn activate(
        &self,
        id: &str,
        net: &crate::network::Network,
        lease: &crate::network::Lease,
        policy: &crate::network::Policy,
    ) -> Result<crate::network::NetRecord, ApiError> {
        // spec.json was written before, with the same `Network::nameservers`.
        net.activate(id, lease, policy)
            .inspect_err(|_| net.unlease(lease))
    }

    /// Removes every trace of a sandbox that failed to start.
    async fn discard(&self, entry: &Arc<Entry>) {
        let rec = entry.snapshot();
        self.sandboxes.lock().await.remove(&rec.id);
        if let Some(net) = &self.net {
            net.release(&rec.id);
        }
        let cg = self.cgroups.sandbox(&rec.id);
        let dir = entry.dir.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = cg.destroy() {
                tracing::warn!("removing the cgroup of a failed sandbox: {e}");
            }
            let _ = std::fs::remove_dir_all(&dir);
        })
        .await;
    }

    /// Called when a sandbox's supervisor has exited: records the outcome.
    async fn finalize(self: &Arc<Self>, id: &str) {
        self.drop_exec_slot(id);
        let Ok(entry) = self.entry(id).await else {
            return;
        };
        let releasing = entry.releasing.lock().await;
        let rec = entry.snapshot();
        if rec.status.is_terminal() {
            return;
        }
        let exit = read_json::<ExitRecord>(&entry.dir.join("exit.json"))
            .ok()
            .flatten();
        let cg = self.cgroups.sandbox(id);
        if exit.is_none() {
            // The supervisor died without recording anything: make sure nothing of the sandbox survives.
            if let Some(init) = rec.init {
                if let Ok(fd) = sandbox_runtime::sys::pidfd_open_checked(init.pid, init.start_time)
                {
                    let _ = sandbox_runtime::sys::pidfd_send_signal(
                        std::os::fd::AsFd::as_fd(&fd),
                        libc::SIGKILL,
                    );
                }
            }
        }
        let rec = entry.update(|r| {
            let (status, reason) = match &exit {
                None => (
                    SandboxStatus::Failed,
                    "the sandbox's supervisor exited without recording an exit status".to_owned(),
                ),
                Some(x) if r.stop_requested && r.lifetime_expired => (
                    SandboxStatus::Terminated,
                    format!(
                        "max lifetime reached: stopped after max_lifetime_seconds={}: {}",
                        r.max_lifetime_seconds.unwrap_or(0.0),
                        x.reason
                    ),
                ),
                Some(x) if r.stop_requested => {
                    (SandboxStatus::Terminated, format!("stopped: {}", x.reason))
                }
                Some(x) if x.code == Some(0) && !x.oom_killed => {
                    (SandboxStatus::Completed, x.reason.clone())
                }
                Some(x) => (SandboxStatus::Failed, x.reason.clone()),
            };
            r.finished_at_ms = Some(
                exit.as_ref()
                    .map_or_else(sandbox_runtime::spec::now_ms, |x| x.finished_at_ms),
            );
            r.exit = exit.clone().or_else(|| {
                Some(ExitRecord {
                    code: None,
                    signal: None,
                    oom_killed: false,
                    reason: reason.clone(),
                    finished_at_ms: sandbox_runtime::spec::now_ms(),
                })
            });
            r.set_status(status, Some(reason));
        });
        tracing::info!(id = %rec.id, status = %rec.status, reason = ?rec.status_reason, "sandbox ended");
        if let Some(net) = &self.net {
            // Rules, published ports and the address go; the link goes with the sandbox's netns. After a yield
            // and on a blocking thread: whoever waits for the end (woken just above, possibly queued on this
            // very worker) hears of it first, without waiting for the firewall transaction.
            tokio::task::yield_now().await;
            let (net, id) = (net.clone(), rec.id.clone());
            if let Err(e) = tokio::task::spawn_blocking(move || net.release(&id)).await {
                tracing::warn!(id = %rec.id, "releasing the sandbox's network: {e}");
            }
        }
        drop(releasing);
        // Execs in flight: their commands died with the pid namespace (or had just finished); their helpers
        // report now. Bounded: a client that stopped reading a stream's output does not hold this up.
        let mut execs = entry.execs.subscribe();
        let _ = tokio::time::timeout(EXEC_DRAIN, execs.wait_for(|n| *n == 0)).await;
        // Every process of the sandbox died with its init (pid namespace); the cgroup only needs removing.
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || cg.destroy()).await {
            tracing::warn!(id = %rec.id, "removing the cgroup: {e}");
        }
        if rec.auto_remove {
            let _ = self.remove(&rec.id).await;
        }
    }

    // ---------------------------------------------------------------- queries

    /// One sandbox.
    pub async fn get(&self, id: &str) -> Result<SandboxInfo, ApiError> {
        Ok(self.entry(id).await?.snapshot().info())
    }

    /// All sandboxes in one of `statuses` (any when empty) that carry every tag of `tags`, oldest first.
    pub async fn list(&self, statuses: &[SandboxStatus], tags: &[String]) -> Vec<SandboxInfo> {
        let map = self.sandboxes.lock().await;
        let mut v: Vec<SandboxInfo> = map
            .values()
            .map(|e| e.snapshot())
            .filter(|r| statuses.is_empty() || statuses.contains(&r.status))
            .filter(|r| tags.iter().all(|t| r.tags.contains(t)))
            .map(|r| r.info())
            .collect();
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        v
    }

    /// Waits for a condition.
    pub async fn wait(
        &self,
        id: &str,
        cond: WaitCondition,
        timeout: Option<f64>,
    ) -> Result<SandboxInfo, ApiError> {
        validate_timeout("timeout_seconds", timeout)?;
        let entry = self.entry(id).await?;
        let mut rx = entry.status.subscribe();
        let mut removed = entry.removed.subscribe();
        let reached = |s: SandboxStatus| match cond {
            WaitCondition::Exited => s.is_terminal(),
            WaitCondition::Running => s == SandboxStatus::Running || s.is_terminal(),
            WaitCondition::Removed => false,
        };
        let fut = async {
            if cond == WaitCondition::Removed {
                removed.wait_for(|r| *r).await.map(drop)
            } else {
                rx.wait_for(|s| reached(*s)).await.map(drop)
            }
        };
        let res = match timeout {
            Some(t) => tokio::time::timeout(Duration::from_secs_f64(t), fut)
                .await
                .ok(),
            None => Some(fut.await),
        };
        match res {
            Some(Ok(())) => Ok(entry.snapshot().info()),
            Some(Err(_)) => Err(not_found(id)),
            None => Err(ApiError::new(
                ErrorCode::WaitTimeout,
                format!(
                    "sandbox {id} did not reach the condition within {} s",
                    timeout.unwrap_or(0.0)
                ),
            )),
        }
    }

    // ---------------------------------------------------------------- stop / delete

    /// SIGTERM, then SIGKILL after `grace` seconds; answers once the main process has exited.
    pub async fn stop(&self, id: &str, grace: Option<f64>) -> Result<SandboxInfo, ApiError> {
        self.stop_as(id, grace, false).await
    }

    /// Stops a sandbox whose lifetime ran out at `deadline_ms`, in `deadline - now` (now when it passed
    /// already, e.g. while the daemon was down). The sandbox ends TERMINATED with the lifetime as reason.
    fn arm_lifetime(self: &Arc<Self>, id: String, deadline_ms: u64) {
        let me = self.clone();
        tokio::spawn(async move {
            // The wall clock is read again after each sleep: it may have been set meanwhile, and a long
            // lifetime is slept in pieces.
            loop {
                let now = sandbox_runtime::spec::now_ms();
                if now >= deadline_ms {
                    break;
                }
                let left = Duration::from_millis((deadline_ms - now).min(3_600_000));
                tokio::time::sleep(left).await;
            }
            let Ok(entry) = me.entry(&id).await else {
                return;
            };
            if entry.snapshot().status.is_terminal() {
                return;
            }
            tracing::info!(%id, "the sandbox's lifetime is over; stopping it");
            if let Err(e) = me.stop_as(&id, None, true).await {
                tracing::warn!(%id, "stopping a sandbox at the end of its lifetime: {}", e.message);
            }
        });
    }

    /// [`Manager::stop`]; `expired`: the daemon stops it because its lifetime is over.
    async fn stop_as(
        &self,
        id: &str,
        grace: Option<f64>,
        expired: bool,
    ) -> Result<SandboxInfo, ApiError> {
        let grace = grace.unwrap_or(self.cfg.stop_grace_seconds);
        if !(grace.is_finite() && (0.0..=3600.0).contains(&grace)) {
            return Err(ApiError::invalid_argument(
                "grace_seconds",
                "grace_seconds must be between 0 and 3600",
            ));
        }
        let entry = self.entry(id).await?;
        // A sandbox still being created: let the creation settle first, so that the stop reaches its init.
        let mut creating = entry.status.subscribe();
        if *creating.borrow() == SandboxStatus::Creating {
            let settle = creating.wait_for(|s| *s != SandboxStatus::Creating);
            let _ = tokio::time::timeout(START_TIMEOUT + Duration::from_secs(5), settle).await;
        }
        let rec = entry.snapshot();
        if rec.status.is_terminal() {
            return Ok(rec.info());
        }
        let rec = entry.update(|r| {
            if expired && !r.stop_requested {
                r.lifetime_expired = true;
            }
            r.stop_requested = true;
            let why = if r.lifetime_expired {
                "max lifetime reached: stopping"
            } else {
                "stop requested"
            };
            r.set_status(SandboxStatus::Terminating, Some(why.into()));
        });
        let Some(init) = rec.init else {
            return Ok(rec.info());
        };
        let signal = |sig: i32| {
            if let Ok(fd) = sandbox_runtime::sys::pidfd_open_checked(init.pid, init.start_time) {
                let _ = sandbox_runtime::sys::pidfd_send_signal(std::os::fd::AsFd::as_fd(&fd), sig);
            }
        };
        let mut rx = entry.status.subscribe();
        if grace > 0.0 {
            signal(libc::SIGTERM);
            if tokio::time::timeout(
                Duration::from_secs_f64(grace),
                rx.wait_for(|s| s.is_terminal()),
            )
            .await
            .is_ok()
            {
                return Ok(entry.snapshot().info());
            }
        }
        signal(libc::SIGKILL);
        if let Some(net) = &self.net {
            // The sandbox is being killed: its ports, address and firewall elements (which only ever let its
            // traffic through) go alongside its end rather than after it. `finalize` releases whatever is left
            // (after this, if this is under way), and a removal waits for that.
            let (net, id) = (net.clone(), rec.id.clone());
            drop(tokio::task::spawn_blocking(move || net.release(&id)));
        }
        if tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| s.is_terminal()))
            .await
            .is_err()
        {
            // Last resort: the init is gone but its supervisor did not report; kill the whole cgroup.
            let cg = self.cgroups.sandbox(&rec.id);
            let _ = tokio::task::spawn_blocking(move || cg.kill_all()).await;
            return Err(ApiError::new(
                ErrorCode::Internal,
                format!("sandbox {id} did not exit within 30 s of SIGKILL"),
            ));
        }
        Ok(entry.snapshot().info())
    }

    /// Removes a sandbox; a running one only with `force` (killed first).
    pub async fn delete(&self, id: &str, force: bool) -> Result<(), ApiError> {
        let entry = self.entry(id).await?;
        let rec = entry.snapshot();
        if !rec.status.is_terminal() {
            if !force {
                return Err(ApiError::new(
                    ErrorCode::SandboxRunning,
                    format!(
                        "sandbox {id} is {}; stop it first or delete with force",
                        rec.status
                    ),
                ));
            }
            self.stop(&rec.id, Some(0.0)).await?;
        }
        self.remove(&rec.id).await
    }

    async fn remove(&self, id: &str) -> Result<(), ApiError> {
        self.drop_exec_slot(id);
        // The entry leaves the registry only once its cgroup and directory are gone, so that whoever sees
        // SANDBOX_NOT_FOUND sees nothing of it left.
        let Some(entry) = self.sandboxes.lock().await.get(id).cloned() else {
            return Ok(());
        };
        // A sandbox that has just ended may still be releasing its network state (see `finalize`).
        drop(entry.releasing.lock().await);
        // The supervisor reports the exit just before it exits: a removal answers once it is gone (bounded;
        // a supervisor that hangs is not waited for forever).
        if let Some(s) = entry.snapshot().shim {
            if let Ok(fd) = sandbox_runtime::sys::pidfd_open_checked(s.pid, s.start_time) {
                let _ = tokio::time::timeout(Duration::from_secs(5), wait_pidfd(fd)).await;
            }
        }
        let cg = self.cgroups.sandbox(id);
        let dir = entry.dir.clone();
        let trash = self.root.join(format!(".removed-{id}"));
        let background = self.background.clone();
        tokio::task::spawn_blocking(move || {
            cg.destroy()
                .map_err(|e| internal("removing the sandbox's cgroup", e))?;
            // The directory is renamed away at once (atomic) and deleted in the background; a daemon that
            // dies before the deletion finishes removes `.removed-*` leftovers when it starts.
            match std::fs::rename(&dir, &trash) {
                Ok(()) => {
                    let h = std::thread::spawn(move || {
                        if let Err(e) = std::fs::remove_dir_all(&trash) {
                            tracing::warn!("removing {}: {e}", trash.display());
                        }
                    });
                    let mut pending = lock(&background);
                    pending.retain(|h| !h.is_finished());
                    pending.push(h);
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(internal("removing the sandbox's state directory", e)),
            }
        })
        .await
        .map_err(|e| internal("remove", e))??;
        self.sandboxes.lock().await.remove(id);
        entry.removed.send_replace(true);
        // Only an image that lost its last name while this sandbox ran can have become garbage.
        let digest = entry.snapshot().image_digest;
        let images = self.images.clone();
        let named = tokio::task::spawn_blocking(move || images.resolve(&digest).is_ok())
            .await
            .unwrap_or(true);
        if !named {
            self.collect_images().await;
        }
        Ok(())
    }

    /// The init and host uid of a RUNNING sandbox (for file access); else `SANDBOX_NOT_RUNNING`.
    pub(crate) async fn running_init(&self, id: &str) -> Result<(ProcRecord, u32), ApiError> {
        let rec = self.entry(id).await?.snapshot();
        match (rec.init, rec.status) {
            (Some(init), SandboxStatus::Running) => Ok((init, rec.host_uid)),
            _ => Err(ApiError::new(
                ErrorCode::SandboxNotRunning,
                format!("sandbox {id} is {}, not RUNNING", rec.status),
            )),
        }
    }

    // ---------------------------------------------------------------- exec and logs

    /// Validates an exec and builds the helper's spec for a RUNNING sandbox.
    pub(crate) async fn exec_spec(
        &self,
        id: &str,
        req: &ExecRequest,
        tty: Option<sandbox_runtime::spec::TtySize>,
    ) -> Result<(Arc<Entry>, ExecSpec), ApiError> {
        if req.command.is_empty() || req.command[0].is_empty() {
            return Err(ApiError::invalid_argument(
                "command",
                "command must not be empty",
            ));
        }
        if req.cwd.as_deref().is_some_and(|c| !c.starts_with('/')) {
            return Err(ApiError::invalid_argument(
                "cwd",
                "cwd must be an absolute path",
            ));
        }
        validate_env("env", &req.env)?;
        validate_timeout("timeout_seconds", req.timeout_seconds)?;
        let entry = self.entry(id).await?;
        let rec = entry.snapshot();
        let (Some(init), Some(cgroup), SandboxStatus::Running) =
            (rec.init, rec.cgroup.clone(), rec.status)
        else {
            return Err(ApiError::new(
                ErrorCode::SandboxNotRunning,
                format!("sandbox {id} is {}, not RUNNING", rec.status),
            ));
        };
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let spec = ExecSpec {
            init,
            cgroup,
            cgroup_leaf: format!("exec-{}-{n}", std::process::id()),
            process: ProcessSpec {
                args: req.command.clone(),
                env: merge_env(&rec.process.env, &req.env),
                cwd: req.cwd.clone().unwrap_or_else(|| rec.process.cwd.clone()),
                user: req.user.clone().unwrap_or_else(|| rec.process.user.clone()),
            },
            timeout_seconds: req.timeout_seconds,
            tty,
        };
        Ok((entry, spec))
    }

    /// The error for an exec helper that could not start the command.
    pub(crate) fn exec_failure(entry: &Entry, id: &str, message: &str) -> ApiError {
        let still = entry.snapshot().status == SandboxStatus::Running;
        if !still || message.contains("not running") {
            ApiError::new(
                ErrorCode::SandboxNotRunning,
                format!("sandbox {id} is not running"),
            )
        } else {
            ApiError::new(ErrorCode::Internal, format!("exec failed: {message}"))
        }
    }

    /// An exec helper running `spec`: the sandbox's prepared one when there is one, else a fresh one.
    /// Either way a new one is prepared for the next exec.
    pub(crate) async fn exec_helper(
        self: &Arc<Self>,
        entry: &Entry,
        spec: &ExecSpec,
        stdin: bool,
    ) -> Result<crate::helper::Helper, ApiError> {
        // Slots are kept by id; `exec` may have been called with the name.
        let id = lock(&entry.rec).id.clone();
        let id = id.as_str();
        let warm =
            lock(&self.exec_slots)
                .remove(id)
                .and_then(|mut h| if h.alive() { Some(h) } else { None });
        let warm = match warm {
            Some(mut h) => match h.start(&spec.run()).await {
                Ok(()) => Some(h),
                // It went away between the check and the command: start a fresh one.
                Err(_) => {
                    h.reap_later();
                    None
                }
            },
            None => None,
        };
        let mut helper = match warm {
            Some(h) => h,
            None => crate::helper::Helper::spawn(&self.exe, spec, stdin).await?,
        };
        if !stdin {
            drop(helper.stdin.take());
        }
        Ok(helper)
    }

    /// After an exec's exit report: the helper becomes the sandbox's prepared one again at once when it
    /// can run another command (it says so: nothing of the last one is left in its leaf) and the slot is
    /// free; else it is dismissed.
    pub(crate) fn recycle_helper(
        &self,
        mut helper: crate::helper::Helper,
        entry: &Entry,
        event: Option<&ExecEvent>,
    ) {
        let reusable = matches!(event, Some(ExecEvent::Exited { reusable: true, .. }));
        let (id, running) = {
            let rec = lock(&entry.rec);
            (rec.id.clone(), rec.status == SandboxStatus::Running)
        };
        if !self.cfg.exec_prepare || !reusable || !running {
            helper.reap_later();
            return;
        }
        helper.stdin = None;
        helper.stdout = None;
        helper.stderr = None;
        let spare = match lock(&self.exec_slots).entry(id) {
            std::collections::hash_map::Entry::Occupied(_) => Some(helper),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(helper);
                None
            }
        };
        if let Some(h) = spare {
            h.reap_later();
        }
    }

    /// Prepares the sandbox's next exec helper in the background (if it runs and has none).
    pub(crate) fn prepare_exec_slot(self: &Arc<Self>, id: &str) {
        if !self.cfg.exec_prepare {
            return;
        }
        let m = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let Ok(entry) = m.entry(&id).await else {
                return;
            };
            let rec = entry.snapshot();
            let (Some(init), Some(cgroup), SandboxStatus::Running) =
                (rec.init, rec.cgroup.clone(), rec.status)
            else {
                return;
            };
            if lock(&m.exec_slots).contains_key(&id) {
                return;
            }
            let n = m.counter.fetch_add(1, Ordering::Relaxed);
            let prep = sandbox_runtime::spec::ExecPrepare {
                init,
                cgroup,
                cgroup_leaf: format!("exec-{}-{n}", std::process::id()),
            };
            match crate::helper::Helper::prepare(&m.exe, &prep, true).await {
                Ok(h) => {
                    // A slot filled meanwhile wins; the extra helper is dismissed (socket closed).
                    let mut slots = lock(&m.exec_slots);
                    slots.entry(id).or_insert(h);
                }
                Err(e) => tracing::debug!(%id, "preparing an exec helper: {e}"),
            }
        });
    }

    /// Dismisses the sandbox's prepared exec helper (it leaves its cgroup and exits).
    pub(crate) fn drop_exec_slot(&self, id: &str) {
        let slot = lock(&self.exec_slots).remove(id);
        if let Some(h) = slot {
            h.reap_later();
        }
    }

    /// Runs a command in a running sandbox and collects its output.
    pub async fn exec(
        self: &Arc<Self>,
        id: &str,
        req: ExecRequest,
    ) -> Result<ExecResult, ApiError> {
        let (entry, spec) = self.exec_spec(id, &req, None).await?;
        let cap = req
            .max_output_bytes
            .unwrap_or(self.cfg.exec_max_output_bytes);
        let started = std::time::Instant::now();
        let _in_flight = entry.exec_started();
        let helper = self.exec_helper(&entry, &spec, req.stdin.is_some()).await?;
        let out = run_exec_helper(
            self,
            &entry,
            helper,
            req.stdin.as_deref().map(str::as_bytes),
            cap,
        )
        .await?;
        let mut result = ExecResult::from_bytes(&out.stdout, &out.stderr);
        result.stdout_truncated = out.stdout_truncated;
        result.stderr_truncated = out.stderr_truncated;
        result.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        match out.event {
            ExecEvent::Exited {
                code,
                signal,
                timed_out,
                ..
            } => {
                result.exit_code = code.unwrap_or_else(|| 128 + signal.unwrap_or(0));
                result.signal = signal;
                if timed_out {
                    return Err(ApiError::new(
                        ErrorCode::ExecTimeout,
                        format!(
                            "command {:?} timed out after {} s; its process tree was killed",
                            req.command,
                            req.timeout_seconds.unwrap_or(0.0)
                        ),
                    )
                    .with_details(serde_json::json!({
                        "stdout": result.stdout,
                        "stderr": result.stderr,
                        "encoding": result.encoding,
                    })));
                }
                Ok(result)
            }
            ExecEvent::Failed { message } => Err(Self::exec_failure(&entry, id, &message)),
            ExecEvent::Started { .. } | ExecEvent::Prepared => {
                Err(internal("exec", "helper ended without an exit status"))
            }
        }
    }

    /// The main process's output so far (the last 16 MiB of each stream).
    pub async fn logs(&self, id: &str) -> Result<LogsResult, ApiError> {
        let entry = self.entry(id).await?;
        crate::logs::logs_result(entry.dir.clone()).await
    }

    /// What a logs stream reads and watches of a sandbox.
    pub(crate) async fn log_source(&self, id: &str) -> Result<crate::logs::LogSource, ApiError> {
        let entry = self.entry(id).await?;
        Ok(crate::logs::LogSource {
            dir: entry.dir.clone(),
            status: entry.status.subscribe(),
            removed: entry.removed.subscribe(),
        })
    }

    // ---------------------------------------------------------------- images

    /// Imports an image from a path on this host.
    pub async fn import_image(&self, req: ImportImageRequest) -> Result<ImageInfo, ApiError> {
        let path = PathBuf::from(&req.path);
        if !path.is_absolute() {
            return Err(ApiError::invalid_argument("path", "path must be absolute"));
        }
        if let Err(e) = std::fs::symlink_metadata(&path) {
            return Err(ApiError::invalid_argument(
                "path",
                format!("cannot read {}: {e}", path.display()),
            ));
        }
        let reference = req
            .reference
            .as_deref()
            .map(|r| ImageRef::parse(r).map(|r| r.canonical()))
            .transpose()?;
        let images = self.images.clone();
        let img = tokio::task::spawn_blocking(move || {
            let norm = |s: &str| {
                ImageRef::parse(s)
                    .map(|r| r.canonical())
                    .map_err(|e| e.message)
            };
            images.import(&path, reference.as_deref(), &norm)
        })
        .await
        .map_err(|e| internal("import", e))?
        .map_err(image_error)?;
        // A name that moved to the new image may have left an old one nameless.
        self.collect_images().await;
        Ok(image_info(&img))
    }

    /// Pulls an image (joining a pull of the same reference in progress) and answers once it is stored.
    pub async fn pull_image(&self, req: PullImageRequest) -> Result<PullResult, ApiError> {
        let res = self
            .puller
            .pull(&req.reference, req.platform.as_deref())
            .await;
        if res.is_ok() {
            // The reference may have moved off an older image.
            self.collect_images().await;
        }
        res
    }

    /// Starts (or joins) a pull and answers its progress stream.
    pub fn pull_image_events(
        self: &Arc<Self>,
        req: &PullImageRequest,
    ) -> Result<Subscription, ApiError> {
        let sub = self
            .puller
            .subscribe(&req.reference, req.platform.as_deref())?;
        let mut outcome = sub.result.clone();
        let this = self.clone();
        tokio::spawn(async move {
            let ok = match outcome.wait_for(Option::is_some).await {
                Ok(r) => matches!(*r, Some(Ok(_))),
                Err(_) => false,
            };
            if ok {
                this.collect_images().await;
            }
        });
        Ok(sub)
    }

    /// Removes unreferenced content (with `all`, also every image no sandbox uses).
    pub async fn prune_images(&self, req: PruneImagesRequest) -> Result<PruneReport, ApiError> {
        let in_use = self.images_in_use().await;
        let images = self.images.clone();
        let r = tokio::task::spawn_blocking(move || images.prune(req.all, &in_use))
            .await
            .map_err(|e| internal("prune", e))?
            .map_err(image_error)?;
        Ok(PruneReport {
            images_removed: r.images_removed,
            blobs_removed: r.blobs_removed,
            layers_removed: r.layers_removed,
            reclaimed_bytes: r.reclaimed_bytes,
        })
    }

    /// Disk used by the image store.
    pub async fn disk_usage(&self) -> Result<DiskUsage, ApiError> {
        let in_use = self.images_in_use().await;
        let mut users: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        for e in self.sandboxes.lock().await.values() {
            let r = e.snapshot();
            *users.entry(r.image_digest.clone()).or_insert(0) += 1;
        }
        let images = self.images.clone();
        let u = tokio::task::spawn_blocking(move || images.usage(&in_use))
            .await
            .map_err(|e| internal("disk usage", e))?
            .map_err(image_error)?;
        Ok(DiskUsage {
            images: u
                .images
                .into_iter()
                .map(|i| ImageUsage {
                    sandboxes: users.get(&i.digest).copied().unwrap_or(0),
                    references: i.references,
                    digest: i.digest,
                    total_bytes: i.total_bytes,
                    unique_bytes: i.unique_bytes,
                })
                .collect(),
            blobs: u.blobs,
            blob_bytes: u.blob_bytes,
            layers: u.layers,
            layer_bytes: u.layer_bytes,
            reclaimable_bytes: u.reclaimable_bytes,
        })
    }

    /// All stored images.
    pub async fn images(&self) -> Result<Vec<ImageInfo>, ApiError> {
        let images = self.images.clone();
        let list = tokio::task::spawn_blocking(move || images.list())
            .await
            .map_err(|e| internal("images", e))?
            .map_err(image_error)?;
        Ok(list.iter().map(image_info).collect())
    }

    fn image_key(reference: &str) -> String {
        if reference.starts_with("sha256:") {
            reference.to_owned()
        } else {
            ImageRef::parse(reference)
                .map(|r| r.canonical())
                .unwrap_or_else(|_| reference.to_owned())
        }
    }

    /// One stored image.
    pub async fn image(&self, reference: &str) -> Result<ImageInfo, ApiError> {
        let key = Self::image_key(reference);
        let images = self.images.clone();
        let img = tokio::task::spawn_blocking(move || images.resolve(&key))
            .await
            .map_err(|e| internal("image", e))?
            .map_err(image_error)?;
        Ok(image_info(&img))
    }

    /// Removes an image reference; refused while a sandbox uses the image, unless forced.
    pub async fn remove_image(&self, reference: &str, force: bool) -> Result<ImageInfo, ApiError> {
        let key = Self::image_key(reference);
        let images = self.images.clone();
        let k = key.clone();
        let img = tokio::task::spawn_blocking(move || images.resolve(&k))
            .await
            .map_err(|e| internal("image", e))?
            .map_err(image_error)?;
        if !force {
            let users: Vec<String> = self
                .sandboxes
                .lock()
                .await
                .values()
                .map(|e| e.snapshot())
                .filter(|r| r.image_digest == img.digest)
                .map(|r| r.name)
                .collect();
            if !users.is_empty() {
                return Err(ApiError::new(
                    ErrorCode::ImageInUse,
                    format!(
                        "image {reference} is used by sandbox(es) {}; remove them or force",
                        users.join(", ")
                    ),
                ));
            }
        }
        // Even forced, the content of an image that live sandboxes run on stays until they are gone.
        let in_use = self.images_in_use().await;
        let images = self.images.clone();
        let removed = tokio::task::spawn_blocking(move || images.remove_keeping(&key, &in_use))
            .await
            .map_err(|e| internal("image remove", e))?
            .map_err(image_error)?;
        Ok(image_info(&removed))
    }

    // ---------------------------------------------------------------- recovery

    /// Re-adopts sandboxes after a (re)start: running ones are watched again, half-created ones and
    /// orphaned cgroups are torn down.
    async fn recover(self: &Arc<Self>) {
        let Ok(dirs) = std::fs::read_dir(&self.root) else {
            return;
        };
        let mut known = std::collections::HashSet::new();
        for d in dirs.flatten() {
            let dir = d.path();
            let name = d.file_name().to_string_lossy().into_owned();
            let rec = match read_json::<Record>(&dir.join("sandbox.json")) {
                Ok(Some(r)) if r.id == name => r,
                other => {
                    tracing::warn!(dir = %dir.display(), ?other, "removing a sandbox directory without a valid record");
                    self.teardown_orphan(&dir, &name).await;
                    continue;
                }
            };
            match rec.status {
                SandboxStatus::Pending | SandboxStatus::Creating => {
                    tracing::warn!(id = %rec.id, "cleaning up a sandbox whose creation was interrupted");
                    self.teardown_orphan(&dir, &name).await;
                    continue;
                }
                _ => {}
            }
            known.insert(rec.id.clone());
            let (tx, _) = watch::channel(rec.status);
            let entry = Arc::new(Entry {
                dir: dir.clone(),
                rec: StdMutex::new(rec.clone()),
                status: tx,
                removed: watch::channel(false).0,
                execs: watch::channel(0).0,
                releasing: tokio::sync::Mutex::new(()),
            });
            self.sandboxes.lock().await.insert(rec.id.clone(), entry);
            if rec.status.is_terminal() {
                continue;
            }
            let shim_fd = rec
                .shim
                .and_then(|s| sandbox_runtime::sys::pidfd_open_checked(s.pid, s.start_time).ok());
            if let (Some(net), Some(n)) = (&self.net, &rec.net) {
                net.adopt(&rec.id, n);
            }
            match shim_fd {
                Some(fd) => {
                    tracing::info!(id = %rec.id, "re-adopted a running sandbox");
                    let me = self.clone();
                    let id = rec.id.clone();
                    tokio::spawn(async move {
                        wait_pidfd(fd).await;
                        me.finalize(&id).await;
                    });
                    // Lifetimes hold across restarts; one that ran out meanwhile ends the sandbox now.
                    if let Some(deadline) = rec.deadline_ms {
                        self.arm_lifetime(rec.id.clone(), deadline);
                    }
                }
                None => self.finalize(&rec.id).await,
            }
        }
        // Pool ids of a previous run are orphans now: their supervisors ended with the old daemon, and the
        // sweep below removes their cgroups.
        if let Ok(Some(old)) =
            read_json::<std::collections::BTreeSet<String>>(&self.cfg.state_dir.join("pool.json"))
        {
            if !old.is_empty() {
                tracing::info!(
                    count = old.len(),
                    "dropping the previous run's pooled supervisors"
                );
            }
        }
        if let Ok(ids) = self.cgroups.list() {
            for id in ids.into_iter().filter(|i| !known.contains(i)) {
                tracing::warn!(%id, "removing an orphaned sandbox cgroup");
                let cg = self.cgroups.sandbox(&id);
                let _ = tokio::task::spawn_blocking(move || cg.destroy()).await;
            }
        }
        self.pool_ids_changed(|ids| ids.clear());
    }

    /// Kills whatever a half-created sandbox left running and removes its cgroup and directory.
    async fn teardown_orphan(&self, dir: &Path, name: &str) {
        for f in ["init.json", "shim.json"] {
            if let Ok(Some(p)) = read_json::<ProcRecord>(&dir.join(f)) {
                if let Ok(fd) = sandbox_runtime::sys::pidfd_open_checked(p.pid, p.start_time) {
                    let _ = sandbox_runtime::sys::pidfd_send_signal(
                        std::os::fd::AsFd::as_fd(&fd),
                        libc::SIGKILL,
                    );
                    wait_pidfd(fd).await;
                }
            }
        }
        if valid_id(name) {
            let cg = self.cgroups.sandbox(name);
            let _ = tokio::task::spawn_blocking(move || cg.destroy()).await;
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Waits until the process behind a pidfd has exited.
async fn wait_pidfd(fd: OwnedFd) {
    // SAFETY: the AsyncFd takes ownership of the OwnedFd, so the descriptor stays open and refers to the
    // same pidfd for the AsyncFd's whole life, and OwnedFd::as_raw_fd always returns that descriptor.
    let registered = unsafe { tokio::io::unix::AsyncFd::register(fd) };
    match registered.map_err(|e| e.to_string()) {
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(e) => tracing::error!("watching a pidfd: {e}"),
    }
}

/// The wire form of a stored image.
pub(crate) fn image_info(img: &StoredImage) -> ImageInfo {
    ImageInfo {
        references: img.references.clone(),
        digest: img.digest.clone(),
        config_digest: img.config_digest.clone(),
        size: img.size,
        created: img.created.clone(),
        platform: img.platform.clone(),
        layers: img.layers.clone(),
        repo_digests: img.repo_digests.clone(),
    }
}

struct ExecOutput {
    event: ExecEvent,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    stdout_truncated: bool,
    stderr_truncated: bool,
}

#[derive(Default)]
struct Capped {
    data: Vec<u8>,
    truncated: bool,
    /// Bytes read, kept or not.
    seen: u64,
}

async fn collect(mut r: impl AsyncRead + Unpin, cap: u64, into: Arc<StdMutex<Capped>>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut c = lock(&into);
                c.seen += n as u64;
                let room = (cap as usize).saturating_sub(c.data.len());
                if n > room {
                    c.truncated = true;
                }
                let take = n.min(room);
                c.data.extend_from_slice(&buf[..take]);
            }
        }
    }
}

/// Starts `sandboxd exec-helper` with its control socket on fd 3 and collects the result.
async fn run_exec_helper(
    m: &Manager,
    entry: &Entry,
    mut helper: crate::helper::Helper,
    stdin: Option<&[u8]>,
    cap: u64,
) -> Result<ExecOutput, ApiError> {
    let out = Arc::new(StdMutex::new(Capped::default()));
    let err = Arc::new(StdMutex::new(Capped::default()));
    let (Some(so), Some(se)) = (helper.stdout.take(), helper.stderr.take()) else {
        return Err(internal("exec", "no output pipes"));
    };
    let t_out = tokio::spawn(collect(so, cap, out.clone()));
    let t_err = tokio::spawn(collect(se, cap, err.clone()));
    if let (Some(data), Some(mut w)) = (stdin, helper.stdin.take()) {
        let data = data.to_vec();
        tokio::spawn(async move {
            let _ = w.write_all(&data).await;
        });
    }
    let mut last = None;
    while let Some(ev) = helper.next_event().await {
        if !matches!(ev, ExecEvent::Started { .. }) {
            last = Some(ev);
            break;
        }
    }
    // The helper can take the next exec while this one's output is still drained (its pipes are ours).
    m.recycle_helper(helper, entry, last.as_ref());
    let event = last.unwrap_or(ExecEvent::Failed {
        message: "the exec helper ended without a result".into(),
    });
    // Output written before the exit is already in the pipes; background processes the command left
    // behind may hold them open, so do not wait for end-of-file longer than a moment.
    // Output still arriving (already in the pipes, or from those background processes) is read on as long
    // as it keeps coming, within a bound.
    let (mut t_out, mut t_err) = (t_out, t_err);
    let hard = tokio::time::Instant::now() + OUTPUT_DRAIN_MAX;
    let seen = || lock(&out).seen + lock(&err).seen;
    let mut last = seen();
    loop {
        let deadline = (tokio::time::Instant::now() + OUTPUT_DRAIN).min(hard);
        let _ = tokio::time::timeout_at(deadline, &mut t_out).await;
        let _ = tokio::time::timeout_at(deadline, &mut t_err).await;
        let now = seen();
        if (t_out.is_finished() && t_err.is_finished())
            || now == last
            || tokio::time::Instant::now() >= hard
        {
            break;
        }
        last = now;
    }
    t_out.abort();
    t_err.abort();
    let (stdout, stdout_truncated) = {
        let mut c = lock(&out);
        (std::mem::take(&mut c.data), c.truncated)
    };
    let (stderr, stderr_truncated) = {
        let mut c = lock(&err);
        (std::mem::take(&mut c.data), c.truncated)
    };
    Ok(ExecOutput {
        event,
        stdout,
        stderr,
        stdout_truncated,
        stderr_truncated,
    })
}

/// A tiny error type for start-up (the binary turns it into `anyhow`).
pub mod anyhow_like {
    /// A start-up error message.
    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    pub struct Error(pub String);
}
