//! The store's side of a registry pull: manifest and index parsing, platform choice, leases, and layers that are
//! verified and unpacked while they stream in. No HTTP here: the daemon fetches bytes and hands readers over.
//!
//! A layer blob is read once: every byte goes through a [`TeeReader`] (sha256 of the compressed blob, copy into an
//! ingest file), then through the decompressor into the in-root unpacker (sha256 of the tar stream = diff_id). Only
//! when both digests match is anything committed: the blob by rename into `blobs/`, then the layer directory by
//! rename into `layers/`. A failure at any point leaves an ingest file and a `.tmp-` directory, both removed.

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};

use super::content::{
    digest_hex, io_err, is_too_long, read_bounded, require_digest, sha256_digest, unique_name,
    Expect, TeeReader,
};
use super::source::{
    host_arch, ImportPlan, PlannedLayer, JSON_LIMIT, MT_OCI_CONFIG, MT_OCI_INDEX, MT_OCI_MANIFEST,
};
use super::unpack::{sync_tree, unpack_stream, Compression};
use super::{lock, ImageError, ImageStore, LeaseTable, StoredImage, TmpDir};

const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MT_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const MT_DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// The manifest media types a pull accepts, for the registry's `Accept` header.
pub const ACCEPTED_MANIFEST_TYPES: [&str; 4] = [
    MT_OCI_INDEX,
    MT_DOCKER_LIST,
    MT_OCI_MANIFEST,
    MT_DOCKER_MANIFEST,
];

/// An `os/architecture[/variant]` platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The host's platform, with the variant an image for it is usually published under (arm64: v8).
    pub fn host() -> Self {
        let architecture = host_arch().to_owned();
        let variant = match architecture.as_str() {
            "arm64" => Some("v8".to_owned()),
            _ => None,
        };
        Self {
            os: "linux".into(),
            architecture,
            variant,
        }
    }

    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let valid = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        };
        match parts.as_slice() {
            [os, arch] if valid(os) && valid(arch) => Ok(Self {
                os: os.to_ascii_lowercase(),
                architecture: arch.to_ascii_lowercase(),
                variant: None,
            }),
            [os, arch, v] if valid(os) && valid(arch) && valid(v) => Ok(Self {
                os: os.to_ascii_lowercase(),
                architecture: arch.to_ascii_lowercase(),
                variant: Some(v.to_ascii_lowercase()),
            }),
            _ => Err(format!(
                "invalid platform {s:?}: expected os/architecture[/variant], e.g. linux/amd64"
            )),
        }
    }

    /// Whether `variant` is what an image for this architecture without a variant is built for.
    fn is_default_variant(&self, variant: &str) -> bool {
        matches!(
            (self.architecture.as_str(), variant),
            ("arm64", "v8") | ("amd64", "v1")
        )
    }

    /// How well an index entry's platform fits: `None` = not usable; higher is better.
    fn score(&self, entry: &IndexEntry) -> Option<u8> {
        let p = entry.platform.as_ref()?;
        if p.os != self.os || p.architecture != self.architecture {
            return None;
        }
        match (&self.variant, &p.variant) {
            (Some(want), Some(have)) if want == have => Some(3),
            (None, None) => Some(3),
            // arm64 images are published with or without "v8"; amd64 ones without a variant or as "v1".
            (Some(v), None) | (None, Some(v)) if self.is_default_variant(v) => Some(2),
            (None, Some(_)) => Some(1),
            (Some(_), _) => None,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// One entry of an image index.
#[derive(Debug, Clone)]
pub struct IndexEntry {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    /// `None` when the entry names no platform (then it is not chosen).
    pub platform: Option<Platform>,
}

/// A layer as a manifest lists it.
#[derive(Debug, Clone)]
pub struct LayerRef {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    compression: Compression,
}

/// A parsed image manifest.
#[derive(Debug, Clone)]
pub struct ParsedManifest {
    pub config_digest: String,
    pub config_size: u64,
    pub layers: Vec<LayerRef>,
}

/// A parsed manifest document: an index (to choose a platform from) or an image manifest.
#[derive(Debug, Clone)]
pub enum Manifest {
    Index(Vec<IndexEntry>),
    Image(ParsedManifest),
}

impl Manifest {
    /// Chooses the best entry for `platform` from an index.
    pub fn choose<'a>(
        entries: &'a [IndexEntry],
        platform: &Platform,
        what: &str,
    ) -> Result<&'a IndexEntry, ImageError> {
        entries
            .iter()
            .filter(|e| {
                ACCEPTED_MANIFEST_TYPES.contains(&e.media_type.as_str()) || e.media_type.is_empty()
            })
            .filter_map(|e| platform.score(e).map(|s| (s, e)))
            // Highest score; the first listed among equals.
            .fold(None, |best: Option<(u8, &IndexEntry)>, (s, e)| match best {
                Some((bs, _)) if bs >= s => best,
                _ => Some((s, e)),
            })
            .map(|(_, e)| e)
            .ok_or_else(|| {
                let mut available: Vec<String> = Vec::new();
                for p in entries.iter().filter_map(|e| e.platform.as_ref()) {
                    let p = p.to_string();
                    if !available.contains(&p) {
                        available.push(p);
                    }
                }
                ImageError::PlatformNotFound {
                    what: what.to_owned(),
                    wanted: platform.to_string(),
                    available,
                }
            })
    }
}

fn invalid(what: &str, reason: impl Into<String>) -> ImageError {
    ImageError::Invalid {
        what: what.to_owned(),
        reason: reason.into(),
    }
}

/// Parses a manifest document. `content_type` is what the registry said it is (it wins over the document's own
/// `mediaType`, which older manifests omit); the document must agree when it names one.
pub fn parse_manifest(
    bytes: &[u8],
    content_type: Option<&str>,
    what: &str,
) -> Result<Manifest, ImageError> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType", default)]
        media_type: Option<String>,
        #[serde(rename = "schemaVersion", default)]
        schema_version: Option<u32>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(bytes)
        .map_err(|e| invalid(what, format!("malformed manifest JSON: {e}")))?;
    let header = content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim().to_owned())
        .filter(|c| !c.is_empty() && c != "application/json" && c != "text/plain");
    let mt = match (&header, &probe.media_type) {
        (Some(h), Some(d)) if h != d => {
            return Err(invalid(
                what,
                format!("served as {h:?} but the document says it is {d:?}"),
            ))
        }
        (Some(h), _) => h.clone(),
        (None, Some(d)) => d.clone(),
        // OCI documents may omit mediaType: an index has `manifests`.
        (None, None) if probe.manifests.is_some() => MT_OCI_INDEX.to_owned(),
        (None, None) => MT_OCI_MANIFEST.to_owned(),
    };
    if mt == MT_DOCKER_SCHEMA1 || probe.schema_version == Some(1) {
        return Err(invalid(
            what,
            "Docker schema 1 manifests are not supported (deprecated since 2017); push the image with a newer client",
        ));
    }
    if probe.schema_version != Some(2) {
        return Err(invalid(
            what,
            format!("unsupported schemaVersion {:?}", probe.schema_version),
        ));
    }
    if mt == MT_OCI_INDEX || mt == MT_DOCKER_LIST {
        let index: ImageIndex = serde_json::from_slice(bytes)
            .map_err(|e| invalid(what, format!("malformed image index: {e}")))?;
        let mut entries = Vec::new();
        for d in index.manifests() {
            let digest = d.digest().to_string();
            require_digest(&digest, what)?;
            entries.push(IndexEntry {
                digest,
                size: d.size(),
                media_type: d.media_type().to_string(),
                platform: d.platform().as_ref().map(|p| Platform {
                    os: p.os().to_string(),
                    architecture: p.architecture().to_string(),
                    variant: p.variant().clone(),
                }),
            });
        }
        return Ok(Manifest::Index(entries));
    }
    if mt != MT_OCI_MANIFEST && mt != MT_DOCKER_MANIFEST {
        return Err(invalid(
            what,
            format!("unsupported manifest media type {mt:?}"),
        ));
    }
    let manifest: ImageManifest = serde_json::from_slice(bytes)
        .map_err(|e| invalid(what, format!("malformed image manifest: {e}")))?;
    parsed_manifest(&manifest, what).map(Manifest::Image)
}

fn parsed_manifest(manifest: &ImageManifest, what: &str) -> Result<ParsedManifest, ImageError> {
    let config = manifest.config();
    let config_mt = config.media_type().to_string();
    if config_mt != MT_OCI_CONFIG && config_mt != MT_DOCKER_CONFIG {
        return Err(invalid(
            what,
            format!("config media type {config_mt:?} is not a container image config"),
        ));
    }
    let config_digest = config.digest().to_string();
    require_digest(&config_digest, what)?;
    if config.size() > JSON_LIMIT {
        return Err(invalid(what, "image config is too large"));
    }
    let mut layers = Vec::with_capacity(manifest.layers().len());
    for (i, l) in manifest.layers().iter().enumerate() {
        layers.push(layer_ref(l, &format!("{what} layer {}", i + 1))?);
    }
    Ok(ParsedManifest {
        config_digest,
        config_size: config.size(),
        layers,
    })
}

fn layer_ref(d: &Descriptor, what: &str) -> Result<LayerRef, ImageError> {
    let digest = d.digest().to_string();
    require_digest(&digest, what)?;
    let media_type = d.media_type().to_string();
    let compression = Compression::from_media_type(&media_type)
        .ok_or_else(|| invalid(what, format!("unsupported layer media type {media_type:?}")))?;
    Ok(LayerRef {
        digest,
        size: d.size(),
        media_type,
        compression,
    })
}

/// Keeps digests (blobs and diff_ids) from garbage collection while it lives.
#[derive(Debug)]
pub struct Lease {
    table: LeaseTable,
    digests: Vec<String>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut t = lock(&self.table);
        for d in &self.digests {
            if let Some(n) = t.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    t.remove(d);
                }
            }
        }
    }
}

/// What a pull hands to [`ImageStore::commit_pulled`] once every blob and layer is in.
#[derive(Debug, Clone)]
pub struct PulledImage {
    pub manifest_digest: String,
    pub config_digest: String,
    pub layers: Vec<LayerRef>,
    /// The normalised reference to point at the image.
    pub reference: String,
    /// `name@digest`, the digest the registry serves the reference under.
    pub repo_digest: String,
}

impl ImageStore {
    /// Protects `digests` from garbage collection until the lease is dropped. Take it before checking whether
    /// content is present: present-and-leased content stays present.
    pub fn lease(&self, digests: impl IntoIterator<Item = String>) -> Lease {
        let _meta = lock(&self.meta);
        let digests: Vec<String> = digests.into_iter().collect();
        let mut t = lock(&self.leases);
        for d in &digests {
            *t.entry(d.clone()).or_insert(0) += 1;
        }
        Lease {
            table: self.leases.clone(),
            digests,
        }
    }

    /// Whether a blob is stored.
    pub fn has_blob(&self, digest: &str) -> bool {
        self.blobs
            .path(digest)
            .is_some_and(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
    }

    /// Whether a layer (by diff_id) is unpacked.
    pub fn has_layer(&self, diff_id: &str) -> bool {
        digest_hex(diff_id).is_some_and(|h| {
            fs::symlink_metadata(self.layers_dir().join(h)).is_ok_and(|m| m.is_dir())
        })
    }

    /// A stored blob (JSON documents only: at most the JSON size limit).
    pub fn read_blob(&self, digest: &str, what: &str) -> Result<Vec<u8>, ImageError> {
        let path = self
            .blobs
            .path(digest)
            .ok_or_else(|| invalid(what, format!("malformed digest {digest:?}")))?;
        read_bounded(&path, JSON_LIMIT, what)
    }

    /// Stores a small blob (manifest, index, config) after checking its digest; a mismatch commits nothing.
    pub fn put_blob(&self, bytes: &[u8], digest: &str, what: &str) -> Result<(), ImageError> {
        self.blobs
            .ingest(
                bytes,
                Expect {
                    digest: Some(digest),
                    size: Some(bytes.len() as u64),
                    what,
                },
            )
            .map(|_| ())
    }

    /// Reads a layer blob from `input` (the download), storing and unpacking it as it arrives. Both the blob digest
    /// and the diff_id are verified before anything is committed; when verification fails nothing of it is visible
    /// (should the commit itself fail, a committed blob may remain: unreferenced, for garbage collection).
    /// If the layer is already unpacked (another image shares it), only the blob is stored.
    pub fn pull_layer<R: Read>(
        &self,
        input: R,
        layer: &LayerRef,
        diff_id: &str,
        what: &str,
    ) -> Result<(), ImageError> {
        let blob_hex = require_digest(&layer.digest, what)?;
        let layer_hex = require_digest(diff_id, what)?;
        let ingest = self.root.join("ingest").join(unique_name("pull-"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&ingest)
            .map_err(io_err(format!("create ingest file {}", ingest.display())))?;
        let ingest_guard = RemoveFile(Some(ingest.clone()));
        let mut tee = TeeReader::new(input, file, layer.size);
        let layers = self.layers_dir();
        let dest = layers.join(layer_hex);

        let mut unpacked = None;
        if !self.has_layer(diff_id) {
            let tmp = layers.join(unique_name(&format!(".tmp-{layer_hex}-")));
            DirBuilder::new()
                .mode(0o755)
                .create(&tmp)
                .map_err(io_err(format!("create {}", tmp.display())))?;
            let guard = TmpDir(tmp);
            match unpack_stream(
                BufReader::with_capacity(256 * 1024, &mut tee),
                layer.compression,
                &guard.0,
                diff_id,
                what,
            ) {
                Ok((stats, _)) => unpacked = Some((guard, stats)),
                Err(e) => {
                    // The blob must be authentic before its content is judged: a tampered, truncated, overlong or
                    // broken download is reported as such, not as whatever its bytes happened to look like.
                    verify_download(tee.finish(), layer, what)?;
                    return Err(e);
                }
            }
        }
        let file = verify_download(tee.finish(), layer, what)?;
        file.sync_all()
            .map_err(io_err(format!("fsync {}", ingest.display())))?;
        drop(file);
        // The blob first: a blob without its layer directory is unpacked from the store by the next pull, whereas
        // a layer directory without its blob looks present to pulls, and `commit_pulled` refuses the image.
        let blob = self.blobs.path_hex(blob_hex);
        if !fs::symlink_metadata(&blob).is_ok_and(|m| m.is_file()) {
            fs::rename(&ingest, &blob).map_err(io_err(format!("commit blob {}", layer.digest)))?;
            super::content::sync_dir(self.blobs.dir())?;
        }
        if let Some((guard, stats)) = unpacked {
            sync_tree(&guard.0)?;
            match fs::rename(&guard.0, &dest) {
                Ok(()) => {
                    std::mem::forget(guard);
                    super::content::sync_dir(&layers)?;
                    tracing::info!(%diff_id, entries = stats.entries, skipped = stats.skipped, "unpacked layer while downloading");
                }
                // Someone else committed the same diff_id meanwhile: identical content; ours goes with the guard.
                Err(_) if dest.is_dir() => {}
                Err(e) => return Err(io_err(format!("commit layer {}", dest.display()))(e)),
            }
        }
        drop(ingest_guard);
        Ok(())
    }

    /// Unpacks a layer whose blob is stored but whose directory is not (e.g. removed by a prune of an image that
    /// shared the blob under another diff_id, or a crash between the two commits).
    pub fn unpack_stored_layer(
        &self,
        layer: &LayerRef,
        diff_id: &str,
        what: &str,
    ) -> Result<(), ImageError> {
        let planned = PlannedLayer {
            digest: layer.digest.clone(),
            size: layer.size,
            compression: layer.compression,
        };
        let mut tracker = super::source::Tracker::default();
        self.ensure_layer(&planned, diff_id, what, &mut tracker)
    }

    /// The diff_ids an image config lists, checked against the manifest's layer count.
    pub fn config_diff_ids(
        &self,
        config_bytes: &[u8],
        layers: usize,
        what: &str,
    ) -> Result<Vec<String>, ImageError> {
        let config: ImageConfiguration = serde_json::from_slice(config_bytes)
            .map_err(|e| invalid(what, format!("malformed image config: {e}")))?;
        let diff_ids = config.rootfs().diff_ids().clone();
        if diff_ids.len() != layers {
            return Err(invalid(
                what,
                format!(
                    "config lists {} diff_ids but the manifest has {layers} layers",
                    diff_ids.len()
                ),
            ));
        }
        for d in &diff_ids {
            require_digest(d, what)?;
        }
        Ok(diff_ids)
    }

    /// Records a pulled image (all its blobs and layers are in) and points `reference` at it.
    pub fn commit_pulled(&self, pulled: &PulledImage) -> Result<StoredImage, ImageError> {
        let _meta = lock(&self.meta);
        let what = format!("{} config {}", pulled.reference, pulled.config_digest);
        let config_bytes = self.read_blob(&pulled.config_digest, &what)?;
        let config: ImageConfiguration = serde_json::from_slice(&config_bytes)
            .map_err(|e| invalid(&what, format!("malformed image config: {e}")))?;
        let plan = ImportPlan {
            manifest_digest: pulled.manifest_digest.clone(),
            config_digest: pulled.config_digest.clone(),
            config,
            layers: pulled
                .layers
                .iter()
                .map(|l| PlannedLayer {
                    digest: l.digest.clone(),
                    size: l.size,
                    compression: l.compression,
                })
                .collect(),
            names: Vec::new(),
        };
        let mut record = self.build_record(&plan, &pulled.reference)?;
        if !self.has_blob(&pulled.manifest_digest) {
            return Err(invalid(
                &pulled.reference,
                format!(
                    "manifest {} is not stored; the pull is incomplete",
                    pulled.manifest_digest
                ),
            ));
        }
        // The unpacked layer is what a sandbox needs. Its blob may be absent: when another image already brought
        // the same layer (same diff_id) in a different compression, the pull downloads nothing for it.
        for (l, d) in pulled.layers.iter().zip(&record.image.layers) {
            if !self.has_layer(d) {
                return Err(invalid(
                    &pulled.reference,
                    format!(
                        "layer {} ({d}) is not unpacked; the pull is incomplete",
                        l.digest
                    ),
                ));
            }
        }
        // Keep the repo digests of earlier pulls of the same image from other repositories.
        let mut repo_digests: Vec<String> = self
            .load_record(&pulled.manifest_digest)
            .map(|r| r.image.repo_digests)
            .unwrap_or_default();
        let repo = pulled
            .repo_digest
            .split_once('@')
            .map_or(pulled.repo_digest.as_str(), |(n, _)| n);
        repo_digests.retain(|r| r.split_once('@').map_or(r.as_str(), |(n, _)| n) != repo);
        repo_digests.push(pulled.repo_digest.clone());
        repo_digests.sort();
        record.image.repo_digests = repo_digests;
        self.commit(record, std::slice::from_ref(&pulled.reference))
    }

    /// The manifest digest a stored reference points at, without reading the record.
    pub fn reference_digest(&self, reference: &str) -> Option<String> {
        let _meta = lock(&self.meta);
        self.load_refs().ok()?.get(reference).cloned()
    }
}

/// Checks a finished download against its descriptor: `Ok` (with the ingest file) only for the authentic blob.
fn verify_download(
    finished: io::Result<(String, u64, File)>,
    layer: &LayerRef,
    what: &str,
) -> Result<File, ImageError> {
    let (digest, size, file) = match finished {
        Ok(f) => f,
        Err(e) if is_too_long(&e) => {
            return Err(ImageError::DigestMismatch {
                what: format!("{what} (size)"),
                expected: layer.size.to_string(),
                actual: format!("more than {}", layer.size),
            })
        }
        Err(e) => return Err(io_err(format!("download {what}"))(e)),
    };
    if size != layer.size {
        return Err(ImageError::DigestMismatch {
            what: format!("{what} (size)"),
            expected: layer.size.to_string(),
            actual: size.to_string(),
        });
    }
    if digest != layer.digest {
        return Err(ImageError::DigestMismatch {
            what: what.to_owned(),
            expected: layer.digest.clone(),
            actual: digest,
        });
    }
    Ok(file)
}

/// Computes the digest of a document, for checking a manifest fetched by tag against the registry's header.
pub fn digest_of(bytes: &[u8]) -> String {
    sha256_digest(bytes)
}

/// Removes a file when dropped unless disarmed.
struct RemoveFile(Option<PathBuf>);

impl Drop for RemoveFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove ingest file")
                }
            }
        }
    }
}
