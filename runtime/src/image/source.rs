//! Reading import sources: an OCI image layout directory or a `docker save` directory (tarballs are extracted to
//! such a directory first). Blobs are fed into the store as they are found; the result is an [`ImportPlan`].

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, Mode, SFlag};
use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use serde::Deserialize;

use super::content::{
    digest_hex, io_err, read_all_bounded, require_digest, sha256_digest, Blobs, Expect, Ingested,
};
use super::unpack::Compression;
use super::ImageError;

/// Limit for JSON documents (index, manifest, config) read into memory.
pub(crate) const JSON_LIMIT: u64 = 32 * 1024 * 1024;

pub(crate) const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MT_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// A layer as stored: its blob and how to decompress it.
#[derive(Debug, Clone)]
pub(crate) struct PlannedLayer {
    pub digest: String,
    pub size: u64,
    pub compression: Compression,
}

/// Everything the store needs to finish an import once all blobs are in.
#[derive(Debug)]
pub(crate) struct ImportPlan {
    pub manifest_digest: String,
    pub config_digest: String,
    pub config: ImageConfiguration,
    pub layers: Vec<PlannedLayer>,
    /// Names found in the archive, not yet normalised.
    pub names: Vec<String>,
}

/// Blobs newly committed by an import, so a failed import can take them back.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    pub blobs: Vec<String>,
    pub layers: Vec<String>,
}

impl Tracker {
    fn note(&mut self, ingested: &Ingested) {
        if ingested.new {
            self.blobs.push(ingested.digest.clone());
        }
    }
}

/// A directory we read image files from, through a descriptor, never resolving a path outside it.
#[derive(Debug)]
pub(crate) struct Source {
    dir: OwnedFd,
    path: PathBuf,
    /// Files belong to us (extracted from a tarball) and may be moved into the store instead of copied.
    owned: bool,
    label: String,
}

impl Source {
    pub(crate) fn open(path: &Path, owned: bool, label: String) -> Result<Self, ImageError> {
        let dir = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err(format!("open {}", path.display()))(e.into()))?;
        Ok(Self {
            dir,
            path: path.to_owned(),
            owned,
            label,
        })
    }

    fn what(&self, rel: &str) -> String {
        format!("{}: {rel}", self.label)
    }

    /// Opens `rel` as a regular file; symlinks inside the directory are followed, but nothing resolves outside it.
    /// Returns the file and whether the path was free of symlinks.
    fn open_file(&self, rel: &str) -> Result<(File, bool), ImageError> {
        let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
        let strict = OpenHow::new()
            .flags(flags)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        let beneath = OpenHow::new()
            .flags(flags)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let (fd, plain) = match openat2(self.dir.as_fd(), rel, strict) {
            Ok(fd) => (fd, true),
            Err(nix::errno::Errno::ELOOP) => (
                openat2(self.dir.as_fd(), rel, beneath).map_err(|e| self.open_error(rel, e))?,
                false,
            ),
            Err(e) => return Err(self.open_error(rel, e)),
        };
        let st = fstat(&fd).map_err(|e| io_err(format!("stat {}", self.what(rel)))(e.into()))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(ImageError::Invalid {
                what: self.what(rel),
                reason: "not a regular file".into(),
            });
        }
        Ok((File::from(fd), plain))
    }

    fn open_error(&self, rel: &str, e: nix::errno::Errno) -> ImageError {
        match e {
            nix::errno::Errno::ENOENT => ImageError::Invalid {
                what: self.what(rel),
                reason: "missing".into(),
            },
            nix::errno::Errno::EXDEV | nix::errno::Errno::ELOOP => ImageError::Invalid {
                what: self.what(rel),
                reason: "path leaves the image directory".into(),
            },
            e => io_err(format!("open {}", self.what(rel)))(e.into()),
        }
    }

    pub(crate) fn exists(&self, rel: &str) -> bool {
        self.open_file(rel).is_ok()
    }

    fn read_json_file(&self, rel: &str) -> Result<Vec<u8>, ImageError> {
        let (f, _) = self.open_file(rel)?;
        read_all_bounded(f, JSON_LIMIT, &self.what(rel))
    }

    /// Feeds file `rel` into the store, verifying it against `expect`.
    fn ingest(
        &self,
        blobs: &Blobs,
        rel: &str,
        expect: Expect<'_>,
        tracker: &mut Tracker,
    ) -> Result<Ingested, ImageError> {
        if let Some(found) = blobs.existing(&expect)? {
            return Ok(found);
        }
        let (file, plain) = self.open_file(rel)?;
        // Files extracted from a tarball are moved into the store rather than copied, when their digest is known
        // in advance (then a second reference to the same path finds the blob in the store) and the path is not a
        // symlink (moving would take the link, not the content).
        let ingested = if self.owned && plain && expect.digest.is_some() {
            blobs.adopt(file, &self.path.join(rel), expect)?
        } else {
            blobs.ingest(file, expect)?
        };
        tracker.note(&ingested);
        Ok(ingested)
    }

    /// Reads a small blob of an OCI layout (`blobs/sha256/<hex>`), verifies it and stores it.
    fn read_blob(
        &self,
        blobs: &Blobs,
        desc: &Descriptor,
        what: &str,
        tracker: &mut Tracker,
    ) -> Result<(String, Vec<u8>), ImageError> {
        let digest = desc.digest().to_string();
        let hex = require_digest(&digest, what)?;
        if desc.size() > JSON_LIMIT {
            return Err(ImageError::Invalid {
                what: what.to_owned(),
                reason: format!(
                    "{} bytes is larger than the {JSON_LIMIT} byte limit",
                    desc.size()
                ),
            });
        }
        let rel = format!("blobs/sha256/{hex}");
        let bytes = self.read_json_file(&rel)?;
        let expect = Expect {
            digest: Some(&digest),
            size: Some(desc.size()),
            what,
        };
        let ingested = blobs.ingest(bytes.as_slice(), expect)?;
        tracker.note(&ingested);
        Ok((digest, bytes))
    }
}

/// The OCI architecture name of the host.
pub(crate) fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

fn is_index_type(mt: &str) -> bool {
    mt == MT_OCI_INDEX || mt == MT_DOCKER_LIST
}

fn is_manifest_type(mt: &str) -> bool {
    mt == MT_OCI_MANIFEST || mt == MT_DOCKER_MANIFEST
}

fn matches_host(desc: &Descriptor) -> Option<bool> {
    let p = desc.platform().as_ref()?;
    Some(p.os().to_string() == "linux" && p.architecture().to_string() == host_arch())
}

/// Picks the descriptor to import from an index: image manifests or nested indexes, preferring the host platform;
/// descriptors without platform information are accepted after those matching it.
fn choose<'a>(manifests: &'a [Descriptor], what: &str) -> Result<&'a Descriptor, ImageError> {
    let usable: Vec<&Descriptor> = manifests
        .iter()
        .filter(|d| {
            let mt = d.media_type().to_string();
            is_index_type(&mt) || is_manifest_type(&mt)
        })
        .collect();
    if usable.is_empty() {
        return Err(ImageError::Invalid {
            what: what.to_owned(),
            reason: "lists no image manifest".into(),
        });
    }
    let exact: Vec<&Descriptor> = usable
        .iter()
        .copied()
        .filter(|d| matches_host(d) == Some(true))
        .collect();
    let unknown: Vec<&Descriptor> = usable
        .iter()
        .copied()
        .filter(|d| matches_host(d).is_none())
        .collect();
    let pick = exact
        .first()
        .or(unknown.first())
        .copied()
        .ok_or_else(|| ImageError::Invalid {
            what: what.to_owned(),
            reason: format!("has no manifest for platform linux/{}", host_arch()),
        })?;
    let others = exact.len() + unknown.len();
    if others > 1 {
        let distinct = exact
            .iter()
            .chain(unknown.iter())
            .filter(|d| d.digest() != pick.digest())
            .count();
        if distinct > 0 {
            tracing::warn!(%what, candidates = others, chosen = %pick.digest(), "index lists several images; importing the first");
        }
    }
    Ok(pick)
}

fn parse_json<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| ImageError::Invalid {
        what: what.to_owned(),
        reason: format!("malformed JSON: {e}"),
    })
}

fn layer_compression(
    blobs: &Blobs,
    media_type: &str,
    digest: &str,
    what: &str,
) -> Result<Compression, ImageError> {
    if let Some(c) = Compression::from_media_type(media_type) {
        return Ok(c);
    }
    let path = blobs.path(digest).ok_or_else(|| ImageError::Invalid {
        what: what.to_owned(),
        reason: format!("malformed digest {digest}"),
    })?;
    Compression::sniff_file(&path)?.ok_or_else(|| ImageError::Invalid {
        what: what.to_owned(),
        reason: format!(
            "unsupported layer media type {media_type:?} (content is not tar, gzip or zstd)"
        ),
    })
}

/// Imports from an OCI image layout (`oci-layout`, `index.json`, `blobs/`).
pub(crate) fn plan_oci(
    src: &Source,
    blobs: &Blobs,
    tracker: &mut Tracker,
) -> Result<ImportPlan, ImageError> {
    #[derive(Deserialize)]
    struct Layout {
        #[serde(rename = "imageLayoutVersion")]
        version: String,
    }
    if src.exists("oci-layout") {
        let layout: Layout =
            parse_json(&src.read_json_file("oci-layout")?, &src.what("oci-layout"))?;
        if !layout.version.starts_with("1.") {
            return Err(ImageError::Invalid {
                what: src.what("oci-layout"),
                reason: format!("unsupported image layout version {:?}", layout.version),
            });
        }
    } else {
        tracing::warn!(source = %src.label, "OCI layout without an oci-layout file");
    }
    let index_what = src.what("index.json");
    let index: ImageIndex = parse_json(&src.read_json_file("index.json")?, &index_what)?;
    let top = choose(index.manifests(), &index_what)?;

    // Names: every top-level descriptor pointing at the chosen content contributes its annotations.
    let mut names = Vec::new();
    for d in index
        .manifests()
        .iter()
        .filter(|d| d.digest() == top.digest())
    {
        if let Some(a) = d.annotations() {
            if let Some(n) = a
                .get(ANNOTATION_CONTAINERD_NAME)
                .or_else(|| a.get(ANNOTATION_REF_NAME))
            {
                if !names.contains(n) {
                    names.push(n.clone());
                }
            }
        }
    }

    let mut desc = top.clone();
    let mut depth = 0;
    let (manifest_digest, manifest): (String, ImageManifest) = loop {
        let mt = desc.media_type().to_string();
        let what = format!("{} {}", src.label, desc.digest());
        if is_index_type(&mt) {
            depth += 1;
            if depth > 4 {
                return Err(ImageError::Invalid {
                    what,
                    reason: "image indexes nested too deeply".into(),
                });
            }
            let (_, bytes) = src.read_blob(blobs, &desc, &what, tracker)?;
            let nested: ImageIndex = parse_json(&bytes, &what)?;
            desc = choose(nested.manifests(), &what)?.clone();
            continue;
        }
        if !is_manifest_type(&mt) {
            return Err(ImageError::Invalid {
                what,
                reason: format!("unsupported manifest media type {mt:?}"),
            });
        }
        let (digest, bytes) = src.read_blob(blobs, &desc, &what, tracker)?;
        break (digest, parse_json(&bytes, &what)?);
    };

    let config_desc = manifest.config();
    let config_mt = config_desc.media_type().to_string();
    let config_what = format!("{} config {}", src.label, config_desc.digest());
    if config_mt != MT_OCI_CONFIG && config_mt != MT_DOCKER_CONFIG {
        return Err(ImageError::Invalid {
            what: config_what,
            reason: format!("unsupported config media type {config_mt:?} (not a container image)"),
        });
    }
    let (config_digest, config_bytes) = src.read_blob(blobs, config_desc, &config_what, tracker)?;
    let config: ImageConfiguration = parse_json(&config_bytes, &config_what)?;

    let mut layers = Vec::with_capacity(manifest.layers().len());
    for (i, l) in manifest.layers().iter().enumerate() {
        let digest = l.digest().to_string();
        let what = format!("{} layer {} ({digest})", src.label, i + 1);
        let hex = require_digest(&digest, &what)?;
        let ingested = src.ingest(
            blobs,
            &format!("blobs/sha256/{hex}"),
            Expect {
                digest: Some(&digest),
                size: Some(l.size()),
                what: &what,
            },
            tracker,
        )?;
        let compression = layer_compression(blobs, l.media_type().as_ref(), &digest, &what)?;
        layers.push(PlannedLayer {
            digest,
            size: ingested.size,
            compression,
        });
    }
    Ok(ImportPlan {
        manifest_digest,
        config_digest,
        config,
        layers,
        names,
    })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// The digest a docker-archive path reveals (`blobs/sha256/<hex>`, `<hex>.json`), if any.
fn digest_from_path(rel: &str) -> Option<String> {
    let rel = rel.trim_start_matches("./");
    let hex = rel
        .strip_prefix("blobs/sha256/")
        .or_else(|| rel.strip_suffix(".json"))?;
    let d = format!("sha256:{hex}");
    digest_hex(&d).is_some().then_some(d)
}

/// Imports from a `docker save` archive (`manifest.json` with Config, RepoTags, Layers), synthesising an OCI
/// manifest for the stored record.
pub(crate) fn plan_docker(
    src: &Source,
    blobs: &Blobs,
    tracker: &mut Tracker,
) -> Result<ImportPlan, ImageError> {
    let what = src.what("manifest.json");
    let entries: Vec<DockerManifestEntry> =
        parse_json(&src.read_json_file("manifest.json")?, &what)?;
    let Some(entry) = entries.first() else {
        return Err(ImageError::Invalid {
            what,
            reason: "lists no image".into(),
        });
    };
    if entries.len() > 1 {
        tracing::warn!(source = %src.label, images = entries.len(), "docker archive holds several images; importing the first");
    }

    let config_what = src.what(&entry.config);
    let config_bytes = src.read_json_file(&entry.config)?;
    let expected = digest_from_path(&entry.config);
    let config_ingested = blobs.ingest(
        config_bytes.as_slice(),
        Expect {
            digest: expected.as_deref(),
            size: None,
            what: &config_what,
        },
    )?;
    tracker.note(&config_ingested);
    let config: ImageConfiguration = parse_json(&config_bytes, &config_what)?;

    let mut layers = Vec::with_capacity(entry.layers.len());
    for (i, rel) in entry.layers.iter().enumerate() {
        let what = format!("{} layer {} ({rel})", src.label, i + 1);
        let expected = digest_from_path(rel);
        let ingested = src.ingest(
            blobs,
            rel,
            Expect {
                digest: expected.as_deref(),
                size: None,
                what: &what,
            },
            tracker,
        )?;
        let compression = layer_compression(blobs, "", &ingested.digest, &what)?;
        layers.push(PlannedLayer {
            digest: ingested.digest,
            size: ingested.size,
            compression,
        });
    }

    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": {
            "mediaType": MT_OCI_CONFIG,
            "digest": config_ingested.digest,
            "size": config_ingested.size,
        },
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": l.compression.media_type(),
            "digest": l.digest,
            "size": l.size,
        })).collect::<Vec<_>>(),
    });
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| ImageError::Invalid {
        what: what.clone(),
        reason: format!("cannot encode manifest: {e}"),
    })?;
    let manifest_digest = sha256_digest(&manifest_bytes);
    let ingested = blobs.ingest(
        manifest_bytes.as_slice(),
        Expect {
            digest: Some(&manifest_digest),
            size: None,
            what: "synthesised manifest",
        },
    )?;
    tracker.note(&ingested);

    let names = entry.repo_tags.clone().unwrap_or_default();
    Ok(ImportPlan {
        manifest_digest,
        config_digest: config_ingested.digest,
        config,
        layers,
        names,
    })
}

/// Names from a `manifest.json` next to an OCI layout (Docker 25+ `docker save` writes both).
pub(crate) fn docker_repo_tags(src: &Source) -> Vec<String> {
    let Ok(bytes) = src.read_json_file("manifest.json") else {
        return Vec::new();
    };
    let Ok(entries) = serde_json::from_slice::<Vec<DockerManifestEntry>>(&bytes) else {
        return Vec::new();
    };
    entries
        .into_iter()
        .next()
        .and_then(|e| e.repo_tags)
        .unwrap_or_default()
}
