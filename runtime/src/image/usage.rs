//! Disk usage of the store and pruning.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{lock, ImageError, ImageStore};

/// What a prune (or a garbage collection) removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Manifest digests of the image records removed.
    pub images_removed: Vec<String>,
    pub blobs_removed: u64,
    pub layers_removed: u64,
    pub reclaimed_bytes: u64,
}

/// Disk used by one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageUsage {
    pub references: Vec<String>,
    pub digest: String,
    /// Bytes of every blob and layer it uses.
    pub total_bytes: u64,
    /// Bytes of the blobs and layers no other image uses.
    pub unique_bytes: u64,
}

/// Disk used by the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskUsage {
    pub images: Vec<ImageUsage>,
    pub blobs: u64,
    pub blob_bytes: u64,
    pub layers: u64,
    pub layer_bytes: u64,
    /// Bytes of content that no named image and no image in use needs.
    pub reclaimable_bytes: u64,
}

/// Allocated bytes under `path` (not following symlinks; hard-linked files counted once). Walks with an explicit
/// stack: a layer's directory depth is chosen by whoever built the image.
pub(crate) fn path_bytes(path: &Path) -> u64 {
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![path.to_owned()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.nlink() <= 1 || meta.is_dir() || seen.insert((meta.dev(), meta.ino())) {
            total = total.saturating_add(meta.blocks().saturating_mul(512));
        }
        if meta.is_dir() {
            if let Ok(entries) = fs::read_dir(&p) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    total
}

/// Content as usage accounts for it: a blob and a layer may have the same digest (an uncompressed layer's blob
/// digest is its diff_id), so the kind is part of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Item<'a> {
    Blob(&'a str),
    Layer(&'a str),
}

/// Every distinct blob and layer a record uses.
fn items(r: &super::ImageRecord) -> HashSet<Item<'_>> {
    r.blobs()
        .map(|b| Item::Blob(b.as_str()))
        .chain(r.image.layers.iter().map(|l| Item::Layer(l.as_str())))
        .collect()
}

impl ImageStore {
    /// Disk usage: per image (shared and unique bytes) and per kind of content. `in_use` are the manifest digests
    /// live sandboxes run on (their content is not reclaimable).
    pub fn usage(&self, in_use: &HashSet<String>) -> Result<DiskUsage, ImageError> {
        let _meta = lock(&self.meta);
        let index = self.load_refs()?;
        let (records, _) = self.load_records()?;
        let mut sizes: HashMap<(bool, String), u64> = HashMap::new();
        let mut out = DiskUsage::default();
        for (dir, is_layer) in [
            (self.blobs.dir().to_owned(), false),
            (self.layers_dir(), true),
        ] {
            for entry in
                fs::read_dir(&dir).map_err(super::io_err(format!("read {}", dir.display())))?
            {
                let Ok(entry) = entry else { continue };
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let digest = format!("sha256:{name}");
                if super::digest_hex(&digest).is_none() {
                    continue;
                }
                let bytes = path_bytes(&entry.path());
                sizes.insert((is_layer, digest), bytes);
                if is_layer {
                    out.layers += 1;
                    out.layer_bytes += bytes;
                } else {
                    out.blobs += 1;
                    out.blob_bytes += bytes;
                }
            }
        }
        let size_of = |item: &Item<'_>| match item {
            Item::Blob(d) => sizes.get(&(false, (*d).to_owned())),
            Item::Layer(d) => sizes.get(&(true, (*d).to_owned())),
        };
        let referenced: HashSet<&String> = index.values().collect();
        // The images listed (named or in use) and what each uses; unique bytes are those no other listed image
        // uses. Records about to be collected are not listed and do not make content shared.
        let kept: Vec<(&super::ImageRecord, HashSet<Item<'_>>)> = records
            .iter()
            .filter(|r| referenced.contains(&r.image.digest) || in_use.contains(&r.image.digest))
            .map(|r| (r, items(r)))
            .collect();
        let mut users: HashMap<Item<'_>, usize> = HashMap::new();
        for (_, its) in &kept {
            for c in its {
                *users.entry(*c).or_insert(0) += 1;
            }
        }
        for (r, its) in &kept {
            let mut u = ImageUsage {
                references: super::refs_of(&index, &r.image.digest),
                digest: r.image.digest.clone(),
                total_bytes: 0,
                unique_bytes: 0,
            };
            for c in its {
                let b = size_of(c).copied().unwrap_or(0);
                u.total_bytes += b;
                if users.get(c).copied().unwrap_or(0) <= 1 {
                    u.unique_bytes += b;
                }
            }
            out.images.push(u);
        }
        out.images.sort_by(|a, b| a.references.cmp(&b.references));
        out.reclaimable_bytes = sizes
            .iter()
            .filter(|((is_layer, d), _)| {
                let item = if *is_layer {
                    Item::Layer(d.as_str())
                } else {
                    Item::Blob(d.as_str())
                };
                !users.contains_key(&item)
            })
            .map(|(_, b)| *b)
            .sum();
        Ok(out)
    }

    /// Removes images no reference names and no sandbox uses, then every blob and layer no remaining image needs
    /// (leased content of pulls in progress excepted). With `all`, first drops the references of every image that
    /// `in_use` does not list (Docker's `image prune --all`).
    pub fn prune(&self, all: bool, in_use: &HashSet<String>) -> Result<PruneReport, ImageError> {
        let _meta = lock(&self.meta);
        if all {
            let mut index = self.load_refs()?;
            let before = index.len();
            index.retain(|name, digest| {
                let keep = in_use.contains(digest);
                if !keep {
                    tracing::info!(reference = %name, %digest, "prune: removing reference of an unused image");
                }
                keep
            });
            if index.len() != before {
                self.save_refs(&index)?;
            }
        }
        self.sweep(in_use)
    }
}
