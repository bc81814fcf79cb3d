//! The local image store (containerd-like): content-addressed blobs, layers unpacked once and shared, image records
//! and a reference index. Synchronous; the daemon serialises calls on one store.
//!
//! On-disk layout under `root`:
//! - `blobs/sha256/<hex>`: blobs (manifests, configs, compressed layers), committed only after verification.
//! - `ingest/`: blobs being written (removed by [`ImageStore::open`]).
//! - `layers/sha256/<diff_id hex>/`: unpacked layers, overlayfs-ready (whiteouts as 0/0 char devices, opaque dirs as
//!   `trusted.overlay.opaque=y`). Built in `layers/sha256/.tmp-*` and renamed into place; removed via `.del-*`.
//! - `images/<manifest hex>.json`: one record per image ([`StoredImage`] plus the layer blob digests).
//! - `references.json`: the reference index, `{ "<normalised name>": "sha256:<manifest hex>" }`. It is the single
//!   source of truth for references: moving a reference is one atomic write. A record no reference points at is
//!   garbage (collected by [`ImageStore::remove`], or by `open` after a crash).
//! - `tmp/`: extracted import tarballs and temporary files of atomic writes (emptied by `open`).
//!
//! Crash safety: everything becomes visible by a rename of a complete, fsync'd file or directory; the order is blobs,
//! layers, record, reference index, so a crash leaves at worst unreferenced content, which `open` collects.

mod content;
mod pull;
mod source;
mod unpack;
mod usage;

#[cfg(test)]
mod pull_tests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, DirBuilder, File};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use content::{
    digest_hex, io_err, is_lower_hex, read_bounded, require_digest, sync_dir, unique_name, Blobs,
};
use source::{host_arch, ImportPlan, PlannedLayer, Source, Tracker, JSON_LIMIT};
use unpack::{unpack_layer, Compression};

pub use pull::{
    digest_of, parse_manifest, IndexEntry, LayerRef, Lease, Manifest, ParsedManifest, Platform,
    PulledImage, ACCEPTED_MANIFEST_TYPES,
};
pub use usage::{DiskUsage, ImageUsage, PruneReport};

/// Errors of the image store.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No image with this reference or digest.
    #[error("image not found: {0}")]
    NotFound(String),
    /// A digest prefix matches several images.
    #[error("ambiguous image digest prefix {0}: it matches more than one image")]
    Ambiguous(String),
    /// Not an image, malformed JSON, missing blob, unsupported media type, ...
    #[error("invalid image {what}: {reason}")]
    Invalid { what: String, reason: String },
    /// Content does not match the digest (or size) it was announced with; nothing was committed.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    /// A layer or archive entry that tries to leave its root (or is otherwise unsafe); the layer was not committed.
    #[error("hostile entry {entry:?} in layer: {reason}")]
    HostileEntry { entry: String, reason: String },
    /// An index has no manifest for the wanted platform.
    #[error("{what} has no manifest for platform {wanted} (available: {})", if available.is_empty() { "none".to_owned() } else { available.join(", ") })]
    PlatformNotFound {
        what: String,
        wanted: String,
        available: Vec<String>,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// An image in the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredImage {
    /// Normalised names pointing at it.
    pub references: Vec<String>,
    /// Manifest digest, `sha256:<hex>`.
    pub digest: String,
    pub config_digest: String,
    /// Sum of the compressed layer sizes.
    pub size: u64,
    /// From the image config.
    pub created: Option<String>,
    /// `name@digest` for each repository the image was pulled from (the digest the registry serves it under).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repo_digests: Vec<String>,
    /// `os/architecture[/variant]`, e.g. `linux/amd64`.
    pub platform: String,
    /// diff_ids (digests of the uncompressed layer tars), bottom layer first.
    pub layers: Vec<String>,
    pub config: ImageConfig,
}

/// The parts of the image config a sandbox needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `K=V`
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

impl ImageError {
    /// Whether the error is the disk (or quota) running full.
    pub fn is_no_space(&self) -> bool {
        match self {
            Self::Io { source, .. } => {
                matches!(
                    source.raw_os_error(),
                    Some(libc::ENOSPC) | Some(libc::EDQUOT)
                ) || source.kind() == std::io::ErrorKind::StorageFull
            }
            _ => false,
        }
    }
}

/// What `images/<hex>.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ImageRecord {
    #[serde(flatten)]
    image: StoredImage,
    /// Compressed layer blob digests, bottom first (for garbage collection).
    #[serde(default)]
    layer_blobs: Vec<String>,
}

impl ImageRecord {
    fn blobs(&self) -> impl Iterator<Item = &String> {
        [&self.image.digest, &self.image.config_digest]
            .into_iter()
            .chain(self.layer_blobs.iter())
    }
}

type RefIndex = BTreeMap<String, String>;

/// A directory removed with its contents when dropped.
struct TmpDir(PathBuf);

impl Drop for TmpDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            tracing::warn!(path = %self.0.display(), error = %e, "cannot remove temporary directory");
        }
    }
}

/// Content still in use by some image record.
struct Live {
    blobs: HashSet<String>,
    layers: HashSet<String>,
    /// False if some record could not be read: then nothing may be collected.
    complete: bool,
}

/// Digests (blobs and diff_ids) that garbage collection must keep: content a pull in progress relies on.
type LeaseTable = Arc<Mutex<HashMap<String, usize>>>;

/// The local image store. Safe to share between threads: metadata changes (references, records, garbage
/// collection) are serialised on an internal lock; blob and layer writes need none (they appear by rename), and
/// content a pull relies on is protected from collection by a [`Lease`].
#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
    blobs: Blobs,
    meta: Mutex<()>,
    leases: LeaseTable,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn refs_of(index: &RefIndex, digest: &str) -> Vec<String> {
    index
        .iter()
        .filter(|(_, d)| d.as_str() == digest)
        .map(|(r, _)| r.clone())
        .collect()
}

impl ImageStore {
    /// Opens (creating if needed) a store at `root`; removes leftovers of interrupted imports (tmp/ingest dirs) and
    /// content no image references any more.
    pub fn open(root: &Path) -> Result<Self, ImageError> {
        let mut builder = DirBuilder::new();
        builder.recursive(true).mode(0o711);
        builder
            .create(root)
            .map_err(io_err(format!("create image store {}", root.display())))?;
        let store = Self {
            root: root.to_owned(),
            blobs: Blobs::new(root.join("blobs/sha256"), root.join("ingest")),
            meta: Mutex::new(()),
            leases: LeaseTable::default(),
        };
        // Unpacked layers keep the image's owners and modes, setuid bits included: no unprivileged host user may
        // reach them (or they could run an image's setuid-root program on the host). Only root (the daemon and
        // the supervisors, which mount the layers) goes below `blobs/` and `layers/`.
        for (dir, mode) in [
            (root.join("blobs"), 0o700),
            (store.blobs.dir().to_owned(), 0o700),
            (root.join("layers"), 0o700),
            (store.layers_dir(), 0o700),
            (store.images_dir(), 0o700),
            (root.join("ingest"), 0o700),
            (store.tmp_dir(), 0o700),
        ] {
            builder.mode(mode);
            builder
                .create(&dir)
                .map_err(io_err(format!("create {}", dir.display())))?;
            // Stores made by older versions had looser modes.
            fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .map_err(io_err(format!("chmod {}", dir.display())))?;
        }
        for dir in [root.join("ingest"), store.tmp_dir()] {
            store.empty_dir(&dir)?;
        }
        let layers = store.layers_dir();
        for entry in fs::read_dir(&layers).map_err(io_err(format!("read {}", layers.display())))? {
            let entry = entry.map_err(io_err(format!("read {}", layers.display())))?;
            if entry.file_name().as_encoded_bytes().starts_with(b".") {
                tracing::info!(path = %entry.path().display(), "removing leftover of an interrupted layer unpack");
                remove_any(&entry.path())?;
            }
        }
        Ok(store)
    }

    /// Full garbage collection: drops references to missing records, then records that have no reference
    /// and are not `in_use` (manifest digests of images that live sandboxes run on), then blobs and layers no
    /// remaining record uses. The daemon calls it once it knows its sandboxes (at start) and when one goes.
    pub fn collect_garbage(&self, in_use: &HashSet<String>) -> Result<(), ImageError> {
        let _meta = lock(&self.meta);
        self.sweep(in_use).map(|_| ())
    }

    /// Digests currently leased (the meta lock must be held, so no new lease appears meanwhile).
    fn leased(&self) -> HashSet<String> {
        lock(&self.leases).keys().cloned().collect()
    }

    fn layers_dir(&self) -> PathBuf {
        self.root.join("layers/sha256")
    }

    fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn refs_path(&self) -> PathBuf {
        self.root.join("references.json")
    }

    fn record_path(&self, hex: &str) -> PathBuf {
        self.images_dir().join(format!("{hex}.json"))
    }

    fn empty_dir(&self, dir: &Path) -> Result<(), ImageError> {
        for entry in fs::read_dir(dir).map_err(io_err(format!("read {}", dir.display())))? {
            let entry = entry.map_err(io_err(format!("read {}", dir.display())))?;
            tracing::info!(path = %entry.path().display(), "removing leftover of an interrupted import");
            remove_any(&entry.path())?;
        }
        Ok(())
    }

    /// Writes `bytes` to `dest` atomically (temporary file in `tmp/`, fsync, rename, fsync of the directory).
    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<(), ImageError> {
        let tmp = self.tmp_dir().join(unique_name("write-"));
        let result = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err(format!("create {}", tmp.display())))?;
            f.write_all(bytes)
                .and_then(|()| f.sync_all())
                .map_err(io_err(format!("write {}", tmp.display())))?;
            fs::rename(&tmp, dest).map_err(io_err(format!("rename into {}", dest.display())))?;
            if let Some(parent) = dest.parent() {
                sync_dir(parent)?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn load_refs(&self) -> Result<RefIndex, ImageError> {
        let path = self.refs_path();
        if !path.exists() {
            return Ok(RefIndex::new());
        }
        let bytes = read_bounded(&path, JSON_LIMIT, "reference index")?;
        serde_json::from_slice(&bytes).map_err(|e| ImageError::Invalid {
            what: path.display().to_string(),
            reason: format!("corrupt reference index: {e}"),
        })
    }

    fn save_refs(&self, index: &RefIndex) -> Result<(), ImageError> {
        let bytes = serde_json::to_vec_pretty(index).map_err(|e| ImageError::Invalid {
            what: "reference index".into(),
            reason: e.to_string(),
        })?;
        self.write_atomic(&self.refs_path(), &bytes)
    }

    fn load_record(&self, digest: &str) -> Result<ImageRecord, ImageError> {
        let hex = digest_hex(digest).ok_or_else(|| ImageError::NotFound(digest.to_owned()))?;
        let path = self.record_path(hex);
        if !path.exists() {
            return Err(ImageError::NotFound(digest.to_owned()));
        }
        let bytes = read_bounded(&path, JSON_LIMIT, "image record")?;
        serde_json::from_slice(&bytes).map_err(|e| ImageError::Invalid {
            what: path.display().to_string(),
            reason: format!("corrupt image record: {e}"),
        })
    }

    fn save_record(&self, record: &ImageRecord) -> Result<(), ImageError> {
        let hex = require_digest(&record.image.digest, "image record")?;
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| ImageError::Invalid {
            what: record.image.digest.clone(),
            reason: e.to_string(),
        })?;
        self.write_atomic(&self.record_path(hex), &bytes)
    }

    /// All readable records, and whether every record file could be read.
    fn load_records(&self) -> Result<(Vec<ImageRecord>, bool), ImageError> {
        let dir = self.images_dir();
        let mut out = Vec::new();
        let mut complete = true;
        for entry in fs::read_dir(&dir).map_err(io_err(format!("read {}", dir.display())))? {
            let entry = entry.map_err(io_err(format!("read {}", dir.display())))?;
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if hex.len() != 64 || !is_lower_hex(hex) {
                continue;
            }
            match self.load_record(&format!("sha256:{hex}")) {
                Ok(r) if r.image.digest == format!("sha256:{hex}") => out.push(r),
                Ok(_) => {
                    tracing::warn!(file = %entry.path().display(), "image record names another digest; ignored");
                    complete = false;
                }
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), error = %e, "unreadable image record");
                    complete = false;
                }
            }
        }
        Ok((out, complete))
    }

    fn live(&self) -> Result<Live, ImageError> {
        let (records, complete) = self.load_records()?;
        let mut live = Live {
            blobs: HashSet::new(),
            layers: HashSet::new(),
            complete,
        };
        for r in &records {
            live.blobs.extend(r.blobs().cloned());
            live.layers.extend(r.image.layers.iter().cloned());
        }
        Ok(live)
    }

    fn remove_blob(&self, digest: &str) {
        if let Some(path) = self.blobs.path(digest) {
            match fs::remove_file(&path) {
                Ok(()) => tracing::debug!(%digest, "removed blob"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(%digest, error = %e, "cannot remove blob"),
            }
        }
    }

    /// Removes an unpacked layer: renamed away first (so it disappears atomically), then deleted.
    fn remove_layer(&self, diff_id: &str) {
        let Some(hex) = digest_hex(diff_id) else {
            return;
        };
        let dir = self.layers_dir().join(hex);
        if !dir.exists() {
            return;
        }
        let doomed = self.layers_dir().join(unique_name(&format!(".del-{hex}-")));
        if let Err(e) = fs::rename(&dir, &doomed) {
            tracing::warn!(%diff_id, error = %e, "cannot remove layer");
            return;
        }
        if let Err(e) = fs::remove_dir_all(&doomed) {
            tracing::warn!(%diff_id, error = %e, "cannot remove layer directory (removed by the next open)");
        } else {
            tracing::debug!(%diff_id, "removed layer");
        }
    }

    /// Removes the given blobs and layers unless an image record still uses them.
    fn collect<'a>(
        &self,
        blobs: impl IntoIterator<Item = &'a String>,
        layers: impl IntoIterator<Item = &'a String>,
    ) {
        let live = match self.live() {
            Ok(l) if l.complete => l,
            Ok(_) => {
                tracing::warn!("some image record is unreadable; not collecting garbage");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list image records; not collecting garbage");
                return;
            }
        };
        let leased = self.leased();
        for b in blobs {
            if !live.blobs.contains(b) && !leased.contains(b) {
                self.remove_blob(b);
            }
        }
        for l in layers {
            if !live.layers.contains(l) && !leased.contains(l) {
                self.remove_layer(l);
            }
        }
    }

    /// Full garbage collection: drops references to missing records, records nothing references (unless in use),
    /// and blobs and layers no remaining record uses and no lease holds. Answers what it removed.
    fn sweep(&self, in_use: &HashSet<String>) -> Result<PruneReport, ImageError> {
        let mut report = PruneReport::default();
        let mut index = self.load_refs()?;
        let (records, complete) = self.load_records()?;
        let known: HashSet<&str> = records.iter().map(|r| r.image.digest.as_str()).collect();
        let before = index.len();
        if complete {
            index.retain(|name, digest| {
                let keep = known.contains(digest.as_str());
                if !keep {
                    tracing::warn!(reference = %name, %digest, "dropping reference to a missing image record");
                }
                keep
            });
            if index.len() != before {
                self.save_refs(&index)?;
            }
        }
        let referenced: HashSet<&str> = index.values().map(String::as_str).collect();
        let mut live = Live {
            blobs: HashSet::new(),
            layers: HashSet::new(),
            complete,
        };
        for r in &records {
            if referenced.contains(r.image.digest.as_str()) || in_use.contains(&r.image.digest) {
                live.blobs.extend(r.blobs().cloned());
                live.layers.extend(r.image.layers.iter().cloned());
            } else if let Some(hex) = digest_hex(&r.image.digest) {
                tracing::info!(digest = %r.image.digest, "removing unreferenced image record");
                let path = self.record_path(hex);
                fs::remove_file(&path).map_err(io_err(format!("remove {}", path.display())))?;
                report.images_removed.push(r.image.digest.clone());
            }
        }
        if !live.complete {
            tracing::warn!("some image record is unreadable; not collecting blobs or layers");
            return Ok(report);
        }
        let leased = self.leased();
        for (dir, set, is_layer) in [
            (self.blobs.dir().to_owned(), &live.blobs, false),
            (self.layers_dir(), &live.layers, true),
        ] {
            for entry in fs::read_dir(&dir).map_err(io_err(format!("read {}", dir.display())))? {
                let entry = entry.map_err(io_err(format!("read {}", dir.display())))?;
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let digest = format!("sha256:{name}");
                if digest_hex(&digest).is_none()
                    || set.contains(&digest)
                    || leased.contains(&digest)
                {
                    continue;
                }
                tracing::info!(path = %entry.path().display(), "removing unreferenced content");
                let bytes = usage::path_bytes(&entry.path());
                if is_layer {
                    self.remove_layer(&digest);
                    report.layers_removed += 1;
                } else {
                    remove_any(&entry.path())?;
                    report.blobs_removed += 1;
                }
                report.reclaimed_bytes += bytes;
            }
        }
        Ok(report)
    }

    /// Imports an OCI image layout directory, an OCI layout tarball, or a `docker save` tarball (plain or gzip).
    ///
    /// `reference`: the name to store under, already normalised by the caller; `None` = take the names from the
    /// archive (OCI `io.containerd.image.name` or `org.opencontainers.image.ref.name` annotations, docker
    /// `RepoTags`), each passed through `normalise`.
    pub fn import(
        &self,
        path: &Path,
        reference: Option<&str>,
        normalise: &dyn Fn(&str) -> Result<String, String>,
    ) -> Result<StoredImage, ImageError> {
        // Imports are rare: they hold the metadata lock throughout, so no collection runs under them.
        let _meta = lock(&self.meta);
        let mut tracker = Tracker::default();
        let result = self.import_inner(path, reference, normalise, &mut tracker);
        match &result {
            Ok(image) => {
                tracing::info!(digest = %image.digest, references = ?image.references, "imported image")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "image import failed");
                self.collect(tracker.blobs.iter(), tracker.layers.iter());
            }
        }
        result
    }

    fn import_inner(
        &self,
        path: &Path,
        reference: Option<&str>,
        normalise: &dyn Fn(&str) -> Result<String, String>,
        tracker: &mut Tracker,
    ) -> Result<StoredImage, ImageError> {
        let label = path.display().to_string();
        let meta = fs::metadata(path).map_err(io_err(format!("import {label}")))?;
        let mut _extracted: Option<TmpDir> = None;
        let src = if meta.is_dir() {
            Source::open(path, false, label.clone())?
        } else {
            let dir = self.tmp_dir().join(unique_name("import-"));
            DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(io_err(format!("create {}", dir.display())))?;
            let guard = TmpDir(dir);
            extract_tarball(path, &guard.0, &label)?;
            let src = Source::open(&guard.0, true, label.clone())?;
            _extracted = Some(guard);
            src
        };

        let is_oci = src.exists("index.json");
        let plan = if is_oci {
            source::plan_oci(&src, &self.blobs, tracker)?
        } else if src.exists("manifest.json") {
            source::plan_docker(&src, &self.blobs, tracker)?
        } else {
            return Err(ImageError::Invalid {
                what: label,
                reason:
                    "not an OCI image layout or docker archive (no index.json or manifest.json)"
                        .into(),
            });
        };

        let references = match reference {
            Some("") => {
                return Err(ImageError::Invalid {
                    what: label,
                    reason: "empty reference".into(),
                })
            }
            Some(r) => vec![r.to_owned()],
            None => {
                let mut raw = plan.names.clone();
                if raw.is_empty() && is_oci {
                    raw = source::docker_repo_tags(&src);
                }
                if raw.is_empty() {
                    return Err(ImageError::Invalid {
                        what: label,
                        reason: "the archive names no image (no ref.name annotation or RepoTags); give a reference"
                            .into(),
                    });
                }
                let mut out = Vec::new();
                for name in raw {
                    let n = normalise(&name).map_err(|reason| ImageError::Invalid {
                        what: format!("{label}: image name {name:?}"),
                        reason,
                    })?;
                    if !out.contains(&n) {
                        out.push(n);
                    }
                }
                out
            }
        };

        let record = self.build_record(&plan, &label)?;
        for (i, (layer, diff_id)) in plan.layers.iter().zip(&record.image.layers).enumerate() {
            let what = format!("{label} layer {} ({})", i + 1, layer.digest);
            self.ensure_layer(layer, diff_id, &what, tracker)?;
        }
        drop(_extracted);
        self.commit(record, &references)
    }

    fn build_record(&self, plan: &ImportPlan, label: &str) -> Result<ImageRecord, ImageError> {
        let cfg = &plan.config;
        let os = cfg.os().to_string();
        let arch = cfg.architecture().to_string();
        if os != "linux" {
            return Err(ImageError::Invalid {
                what: format!("{label} config {}", plan.config_digest),
                reason: format!("image is for os {os:?}, not linux"),
            });
        }
        if arch != host_arch() {
            tracing::warn!(image = label, architecture = %arch, host = host_arch(), "image architecture differs from the host");
        }
        let diff_ids = cfg.rootfs().diff_ids();
        if diff_ids.len() != plan.layers.len() {
            return Err(ImageError::Invalid {
                what: format!("{label} config {}", plan.config_digest),
                reason: format!(
                    "config lists {} diff_ids but the manifest has {} layers",
                    diff_ids.len(),
                    plan.layers.len()
                ),
            });
        }
        for d in diff_ids {
            require_digest(d, &format!("{label} config diff_id"))?;
        }
        let mut platform = format!("{os}/{arch}");
        if let Some(v) = cfg.variant() {
            platform.push('/');
            platform.push_str(v);
        }
        let config = match cfg.config() {
            Some(c) => ImageConfig {
                entrypoint: c.entrypoint().clone().unwrap_or_default(),
                cmd: c.cmd().clone().unwrap_or_default(),
                env: c.env().clone().unwrap_or_default(),
                working_dir: c.working_dir().clone().unwrap_or_default(),
                user: c.user().clone().unwrap_or_default(),
            },
            None => ImageConfig::default(),
        };
        Ok(ImageRecord {
            image: StoredImage {
                references: Vec::new(),
                digest: plan.manifest_digest.clone(),
                config_digest: plan.config_digest.clone(),
                size: plan.layers.iter().map(|l| l.size).sum(),
                created: cfg.created().clone(),
                repo_digests: Vec::new(),
                platform,
                layers: diff_ids.clone(),
                config,
            },
            layer_blobs: plan.layers.iter().map(|l| l.digest.clone()).collect(),
        })
    }

    /// Unpacks a layer unless it already is; the directory appears complete or not at all.
    fn ensure_layer(
        &self,
        layer: &PlannedLayer,
        diff_id: &str,
        what: &str,
        tracker: &mut Tracker,
    ) -> Result<(), ImageError> {
        let hex = require_digest(diff_id, what)?;
        let layers = self.layers_dir();
        let dest = layers.join(hex);
        if fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()) {
            tracing::debug!(%diff_id, "layer already unpacked");
            return Ok(());
        }
        let blob = self
            .blobs
            .path(&layer.digest)
            .ok_or_else(|| ImageError::Invalid {
                what: what.to_owned(),
                reason: "malformed layer digest".into(),
            })?;
        let tmp = layers.join(unique_name(&format!(".tmp-{hex}-")));
        DirBuilder::new()
            .mode(0o755)
            .create(&tmp)
            .map_err(io_err(format!("create {}", tmp.display())))?;
        let guard = TmpDir(tmp);
        let stats = unpack_layer(&blob, layer.compression, &guard.0, diff_id, what)?;
        unpack::sync_tree(&guard.0)?;
        match fs::rename(&guard.0, &dest) {
            Ok(()) => {
                std::mem::forget(guard);
                sync_dir(&layers)?;
                tracker.layers.push(diff_id.to_owned());
                tracing::info!(%diff_id, entries = stats.entries, skipped = stats.skipped, "unpacked layer");
                Ok(())
            }
            // Someone else committed it meanwhile: identical content (same diff_id); ours is dropped by the guard.
            Err(_) if dest.is_dir() => Ok(()),
            Err(e) => Err(io_err(format!("commit layer {}", dest.display()))(e)),
        }
    }

    /// Writes the record, then points the references at it (one atomic index write). Images that lose their last
    /// reference are removed.
    fn commit(
        &self,
        mut record: ImageRecord,
        references: &[String],
    ) -> Result<StoredImage, ImageError> {
        let digest = record.image.digest.clone();
        let mut index = self.load_refs()?;
        let mut displaced = BTreeSet::new();
        for r in references {
            if let Some(old) = index.insert(r.clone(), digest.clone()) {
                if old != digest {
                    displaced.insert(old);
                }
            }
        }
        record.image.references = refs_of(&index, &digest);
        self.save_record(&record)?;
        self.save_refs(&index)?;
        for old in displaced {
            // A sandbox may run on the displaced image: keep it (nameless) for `collect_garbage` to judge.
            let keep: HashSet<String> = [old.clone()].into_iter().collect();
            self.after_untag(&index, &old, &keep);
        }
        Ok(record.image)
    }

    /// Keeps the record of an image that lost references in step (best effort: the index is authoritative), or
    /// removes the image when it has none left.
    fn after_untag(&self, index: &RefIndex, digest: &str, in_use: &HashSet<String>) {
        let Ok(mut record) = self.load_record(digest) else {
            return;
        };
        let remaining = refs_of(index, digest);
        if remaining.is_empty() && !in_use.contains(digest) {
            self.delete_record(&record);
        } else {
            // Still named, or nameless but in use by a live sandbox (kept until `collect_garbage` finds it
            // unused): its content stays.
            record.image.references = remaining;
            if let Err(e) = self.save_record(&record) {
                tracing::warn!(%digest, error = %e, "cannot update image record");
            }
        }
    }

    fn delete_record(&self, record: &ImageRecord) {
        let Some(hex) = digest_hex(&record.image.digest) else {
            return;
        };
        let path = self.record_path(hex);
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove image record (removed by the next open)");
            return;
        }
        let _ = sync_dir(&self.images_dir());
        tracing::info!(digest = %record.image.digest, "removed image");
        self.collect(record.blobs(), record.image.layers.iter());
    }

    /// All images with at least one reference, sorted by their first reference.
    pub fn list(&self) -> Result<Vec<StoredImage>, ImageError> {
        let _meta = lock(&self.meta);
        let index = self.load_refs()?;
        let digests: BTreeSet<&String> = index.values().collect();
        let mut out = Vec::new();
        for d in digests {
            match self.load_record(d) {
                Ok(mut r) => {
                    r.image.references = refs_of(&index, d);
                    out.push(r.image);
                }
                Err(e) => {
                    tracing::warn!(digest = %d, error = %e, "reference to an unreadable image record")
                }
            }
        }
        out.sort_by(|a, b| a.references.cmp(&b.references));
        Ok(out)
    }

    /// The manifest digest `reference` names: a reference in the index, or `sha256:<hex>` (or a unique prefix of at
    /// least 12 hex digits) of a referenced image.
    fn lookup(&self, index: &RefIndex, reference: &str) -> Result<String, ImageError> {
        if let Some(d) = index.get(reference) {
            return Ok(d.clone());
        }
        let Some(prefix) = reference.strip_prefix("sha256:") else {
            return Err(ImageError::NotFound(reference.to_owned()));
        };
        let prefix = prefix.to_ascii_lowercase();
        if prefix.len() < 12 || prefix.len() > 64 || !is_lower_hex(&prefix) {
            return Err(ImageError::NotFound(reference.to_owned()));
        }
        let matches: BTreeSet<&String> = index
            .values()
            .filter(|d| {
                d.strip_prefix("sha256:")
                    .is_some_and(|h| h.starts_with(&prefix))
            })
            .collect();
        let mut it = matches.into_iter();
        match (it.next(), it.next()) {
            (Some(d), None) => Ok(d.clone()),
            (Some(_), Some(_)) => Err(ImageError::Ambiguous(reference.to_owned())),
            (None, _) => Err(ImageError::NotFound(reference.to_owned())),
        }
    }

    /// By normalised reference, or by manifest digest `sha256:<hex>` (or a unique prefix of >= 12 hex digits).
    pub fn resolve(&self, reference: &str) -> Result<StoredImage, ImageError> {
        let _meta = lock(&self.meta);
        let index = self.load_refs()?;
        let digest = self.lookup(&index, reference)?;
        let mut record = self.load_record(&digest)?;
        record.image.references = refs_of(&index, &digest);
        Ok(record.image)
    }

    /// Removes one reference (or, given a digest, all references of that image); when the image has no reference
    /// left, removes its record and garbage-collects blobs and unpacked layers no other image uses.
    ///
    /// Returns the image as it was, with `references` set to the references this call removed.
    pub fn remove(&self, reference: &str) -> Result<StoredImage, ImageError> {
        self.remove_keeping(reference, &HashSet::new())
    }

    /// Like [`ImageStore::remove`], but an image whose manifest digest is in `in_use` keeps its record,
    /// blobs and layers (nameless, unlisted) even when its last reference goes: sandboxes run on them.
    pub fn remove_keeping(
        &self,
        reference: &str,
        in_use: &HashSet<String>,
    ) -> Result<StoredImage, ImageError> {
        let _meta = lock(&self.meta);
        let mut index = self.load_refs()?;
        let digest = self.lookup(&index, reference)?;
        let mut record = self.load_record(&digest)?;
        let removed = if index.contains_key(reference) {
            vec![reference.to_owned()]
        } else {
            refs_of(&index, &digest)
        };
        for r in &removed {
            index.remove(r);
        }
        self.save_refs(&index)?;
        self.after_untag(&index, &digest, in_use);
        record.image.references = removed;
        Ok(record.image)
    }

    /// Unpacked layer directories, bottom layer first (to be used as overlayfs lowerdirs; note that overlayfs
    /// wants the top layer first in `lowerdir=`).
    pub fn layer_dirs(&self, image: &StoredImage) -> Vec<PathBuf> {
        image
            .layers
            .iter()
            .filter_map(|d| {
                let hex = digest_hex(d);
                if hex.is_none() {
                    tracing::warn!(diff_id = %d, "malformed diff_id in image record");
                }
                hex.map(|h| self.layers_dir().join(h))
            })
            .collect()
    }
}

fn remove_any(path: &Path) -> Result<(), ImageError> {
    let meta = fs::symlink_metadata(path).map_err(io_err(format!("stat {}", path.display())))?;
    if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
    .map_err(io_err(format!("remove {}", path.display())))
}

/// Extracts an image tarball (plain, gzip or zstd) into `dest`.
fn extract_tarball(path: &Path, dest: &Path, label: &str) -> Result<(), ImageError> {
    let mut file = File::open(path).map_err(io_err(format!("open {label}")))?;
    let mut head = Vec::with_capacity(512);
    (&mut file)
        .take(512)
        .read_to_end(&mut head)
        .map_err(io_err(format!("read {label}")))?;
    file.seek(SeekFrom::Start(0))
        .map_err(io_err(format!("read {label}")))?;
    let compression = Compression::sniff(&head).unwrap_or(Compression::None);
    let reader = compression
        .reader(BufReader::with_capacity(256 * 1024, file))
        .map_err(io_err(format!("decompress {label}")))?;
    unpack::extract_image_archive(reader, dest, label)
}
