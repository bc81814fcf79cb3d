//! OCI images for the tests: layer tarballs, image configs, manifests and indexes, and a push client
//! for a registry that speaks the distribution spec over plain HTTP.
//!
//! Layers come from a directory tree ([`LayerBuilder::append_dir_tree`]), from the difference of two
//! trees ([`LayerBuilder::append_tree_diff`], with `.wh.` whiteouts for deletions), or from raw
//! in-memory [`Entry`]s. Entries are written as they are: a path may be `../x`, absolute, longer than
//! the 100 bytes of a tar header (a GNU long-name record precedes it) or not UTF-8, so a test can
//! craft hostile layers. Only a NUL byte inside a path cannot be written. [`LayerBuilder::append_raw`]
//! takes a whole header for anything else.
//!
//! ```no_run
//! use sandbox_tests::oci::{Compression, Entry, Image, ImageConfig, LayerBuilder, Platform};
//!
//! let mut b = LayerBuilder::new();
//! b.append(&Entry::dir("etc"))?
//!     .append(&Entry::file("etc/hostname", "box\n"))?
//!     .append(&Entry::symlink("escape", "/"))?
//!     .append(&Entry::file("../outside", "x"))?;
//! let layer = b.finish(Compression::Gzip)?;
//! let config = ImageConfig::new(Platform::host()).cmd(["sh"]);
//! let image = Image::new(config, vec![layer]);
//! let digest = sandbox_tests::oci::push_image("127.0.0.1:5000", "library/hostile", "latest", &image)?;
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};
use tar::{EntryType, Header};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI layer, uncompressed.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI layer, gzip.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI layer, zstd.
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker layer, gzip.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker layer, uncompressed.
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// The `created` time written when none is given: the epoch, so that images are reproducible.
pub const EPOCH: &str = "1970-01-01T00:00:00Z";

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

// ------------------------------------------------------------------------------------------------
// Compression, formats, platforms
// ------------------------------------------------------------------------------------------------

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (no file name, mtime 0, level 6).
    Gzip,
    /// zstd (level 3).
    Zstd,
}

impl Compression {
    /// Compresses a tar.
    pub fn compress(self, tar: &[u8]) -> io::Result<Vec<u8>> {
        match self {
            Compression::None => Ok(tar.to_vec()),
            Compression::Gzip => {
                let mut e = flate2::GzBuilder::new()
                    .mtime(0)
                    .write(Vec::new(), flate2::Compression::new(6));
                e.write_all(tar)?;
                e.finish()
            }
            Compression::Zstd => zstd::stream::encode_all(tar, 3),
        }
    }

    /// Decompresses a blob of this compression.
    pub fn decompress(self, blob: &[u8]) -> io::Result<Vec<u8>> {
        match self {
            Compression::None => Ok(blob.to_vec()),
            Compression::Gzip => {
                let mut out = Vec::new();
                flate2::read::MultiGzDecoder::new(blob).read_to_end(&mut out)?;
                Ok(out)
            }
            Compression::Zstd => zstd::stream::decode_all(blob),
        }
    }

    /// Recognises a blob's compression by its magic bytes (anything else is taken as a plain tar).
    pub fn detect(blob: &[u8]) -> Compression {
        if blob.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if blob.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The OCI layer media type of this compression.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            Compression::None => OCI_LAYER_TAR,
            Compression::Gzip => OCI_LAYER_GZIP,
            Compression::Zstd => OCI_LAYER_ZSTD,
        }
    }
}

impl FromStr for Compression {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "none" => Ok(Compression::None),
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            _ => bail!("unknown compression {s:?} (none, gzip or zstd)"),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        })
    }
}

/// Which family of media types manifests, indexes and configs use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// OCI image spec: image manifest, image index.
    Oci,
    /// Docker image manifest v2 schema 2, manifest list.
    Docker,
}

impl Format {
    /// Media type of an image manifest.
    pub fn manifest_media_type(self) -> &'static str {
        match self {
            Format::Oci => OCI_MANIFEST,
            Format::Docker => DOCKER_MANIFEST,
        }
    }

    /// Media type of an index (manifest list).
    pub fn index_media_type(self) -> &'static str {
        match self {
            Format::Oci => OCI_INDEX,
            Format::Docker => DOCKER_MANIFEST_LIST,
        }
    }

    /// Media type of an image config.
    pub fn config_media_type(self) -> &'static str {
        match self {
            Format::Oci => OCI_CONFIG,
            Format::Docker => DOCKER_CONFIG,
        }
    }

    /// A layer's media type in this format: the Docker equivalents of the standard OCI types
    /// (zstd has none and stays OCI); any other type as it is.
    pub fn layer_media_type(self, oci_type: &str) -> String {
        match (self, oci_type) {
            (Format::Docker, OCI_LAYER_GZIP) => DOCKER_LAYER_GZIP.to_owned(),
            (Format::Docker, OCI_LAYER_TAR) => DOCKER_LAYER_TAR.to_owned(),
            _ => oci_type.to_owned(),
        }
    }
}

impl FromStr for Format {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "oci" => Ok(Format::Oci),
            "docker" => Ok(Format::Docker),
            _ => bail!("unknown format {s:?} (oci or docker)"),
        }
    }
}

/// An image's platform: `os/architecture[/variant]` in Go's names (`linux/amd64`, `linux/arm64/v8`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`, ...
    pub architecture: String,
    /// `v8`, `v7`, ... if any.
    pub variant: Option<String>,
}

impl Platform {
    /// A platform from its parts.
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        Platform {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        }
    }

    /// This machine's platform (as official images name it: `linux/amd64`, `linux/arm64/v8`, ...).
    pub fn host() -> Self {
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "x86" => ("386", None),
            "powerpc64" => ("ppc64le", None),
            "riscv64" => ("riscv64", None),
            "s390x" => ("s390x", None),
            other => (other, None),
        };
        Platform::new("linux", arch, variant)
    }

    /// A second platform that is not this machine's: `linux/arm64/v8` on amd64, else `linux/amd64`.
    pub fn other_than_host() -> Self {
        if Platform::host().architecture == "amd64" {
            Platform::new("linux", "arm64", Some("v8"))
        } else {
            Platform::new("linux", "amd64", None)
        }
    }

    /// The `platform` object of an index entry.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("architecture".into(), self.architecture.clone().into());
        m.insert("os".into(), self.os.clone().into());
        if let Some(v) = &self.variant {
            m.insert("variant".into(), v.clone().into());
        }
        Value::Object(m)
    }
}

impl FromStr for Platform {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform::new(os, arch, None)),
            [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => {
                Ok(Platform::new(os, arch, Some(v)))
            }
            _ => bail!("bad platform {s:?} (os/arch[/variant], e.g. linux/amd64)"),
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

// ------------------------------------------------------------------------------------------------
// Entries and layers
// ------------------------------------------------------------------------------------------------

/// What a tar entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file with its content.
    File(Vec<u8>),
    /// A directory.
    Dir,
    /// A symbolic link to the target (raw bytes, written as they are).
    Symlink(Vec<u8>),
    /// A hard link to another path of the archive (raw bytes, written as they are).
    Hardlink(Vec<u8>),
    /// A character device.
    CharDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    BlockDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
}

/// One tar entry, written exactly as given (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The path, raw bytes: `../x`, `/etc/passwd` and non-UTF-8 bytes are kept.
    pub path: Vec<u8>,
    /// Its type (and content or link target).
    pub kind: EntryKind,
    /// Permission bits, including setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    /// Numeric owner.
    pub uid: u64,
    /// Numeric group.
    pub gid: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
    /// Extended attributes (`security.capability`, `user.x`, ...), written as PAX `SCHILY.xattr.*`.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Entry {
    /// An entry of `kind` at `path`, root-owned, mtime 0.
    pub fn new(path: impl AsRef<[u8]>, kind: EntryKind, mode: u32) -> Self {
        Entry {
            path: path.as_ref().to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: Vec::new(),
        }
    }

    /// A regular file, mode 0644.
    pub fn file(path: impl AsRef<[u8]>, content: impl AsRef<[u8]>) -> Self {
        Entry::new(path, EntryKind::File(content.as_ref().to_vec()), 0o644)
    }

    /// A directory, mode 0755.
    pub fn dir(path: impl AsRef<[u8]>) -> Self {
        Entry::new(path, EntryKind::Dir, 0o755)
    }

    /// A symlink, mode 0777.
    pub fn symlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        Entry::new(path, EntryKind::Symlink(target.as_ref().to_vec()), 0o777)
    }

    /// A hard link to `target`, mode 0644.
    pub fn hardlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        Entry::new(path, EntryKind::Hardlink(target.as_ref().to_vec()), 0o644)
    }

    /// A character device, mode 0666.
    pub fn char_device(path: impl AsRef<[u8]>, major: u32, minor: u32) -> Self {
        Entry::new(path, EntryKind::CharDevice { major, minor }, 0o666)
    }

    /// A block device, mode 0660.
    pub fn block_device(path: impl AsRef<[u8]>, major: u32, minor: u32) -> Self {
        Entry::new(path, EntryKind::BlockDevice { major, minor }, 0o660)
    }

    /// A named pipe, mode 0644.
    pub fn fifo(path: impl AsRef<[u8]>) -> Self {
        Entry::new(path, EntryKind::Fifo, 0o644)
    }

    /// The whiteout deleting `path` of the layers below: an empty file `<dir>/.wh.<name>`.
    pub fn whiteout(path: impl AsRef<[u8]>) -> Self {
        let p = path.as_ref();
        let p = p.strip_suffix(b"/").unwrap_or(p);
        let (dir, name) = match p.iter().rposition(|&b| b == b'/') {
            Some(i) => (&p[..=i], &p[i + 1..]),
            None => (&b""[..], p),
        };
        let mut w = dir.to_vec();
        w.extend_from_slice(b".wh.");
        w.extend_from_slice(name);
        Entry::file(w, b"")
    }

    /// The opaque whiteout of directory `dir`: hides everything below it in the layers below.
    pub fn opaque_whiteout(dir: impl AsRef<[u8]>) -> Self {
        let d = dir.as_ref();
        let mut w = d.strip_suffix(b"/").unwrap_or(d).to_vec();
        if !w.is_empty() {
            w.push(b'/');
        }
        w.extend_from_slice(b".wh..wh..opq");
        Entry::file(w, b"")
    }

    /// Sets the permission bits.
    pub fn with_mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }

    /// Sets the numeric owner.
    pub fn with_owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// Sets the modification time.
    pub fn with_mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }

    /// Adds an extended attribute.
    pub fn with_xattr(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.xattrs.push((name.to_owned(), value.as_ref().to_vec()));
        self
    }
}

/// Modification times written for a directory tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mtimes {
    /// The files' own (seconds).
    #[default]
    Keep,
    /// 0 everywhere, for layers that must not depend on when the tree was made.
    Zero,
}

/// How a directory tree becomes tar entries.
#[derive(Clone, Copy, Debug, Default)]
pub struct DirOptions {
    /// Modification times.
    pub mtimes: Mtimes,
    /// Whether extended attributes are read and written (PAX `SCHILY.xattr.*`).
    pub xattrs: bool,
}

/// Builds an uncompressed layer tar, entry by entry. Nothing is checked or normalised.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
    entries: usize,
}

impl fmt::Debug for LayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerBuilder")
            .field("entries", &self.entries)
            .field("bytes", &self.tar.get_ref().len())
            .finish()
    }
}

impl Default for LayerBuilder {
    fn default() -> Self {
        LayerBuilder::new()
    }
}

/// Metadata of one entry to write (internal).
struct Meta {
    ty: EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    size: u64,
    device: Option<(u32, u32)>,
}

/// Copies raw bytes into a NUL-padded header field; longer values are cut (a long-name record
/// carries the whole value).
fn put_field(field: &mut [u8], bytes: &[u8]) {
    field.fill(0);
    let n = bytes.len().min(field.len());
    field[..n].copy_from_slice(&bytes[..n]);
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> Self {
        LayerBuilder {
            tar: tar::Builder::new(Vec::new()),
            entries: 0,
        }
    }

    /// How many entries were written (long-name and PAX records not counted).
    pub fn len(&self) -> usize {
        self.entries
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Appends a header and data exactly as given (the checksum too: call `set_cksum` yourself).
    pub fn append_raw(&mut self, header: &Header, data: &[u8]) -> io::Result<&mut Self> {
        self.tar.append(header, data)?;
        self.entries += 1;
        Ok(self)
    }

    /// Appends an entry; see the module docs for what is kept.
    pub fn append(&mut self, e: &Entry) -> io::Result<&mut Self> {
        let (ty, link, data, device): (_, Option<&[u8]>, &[u8], _) = match &e.kind {
            EntryKind::File(c) => (EntryType::Regular, None, c, None),
            EntryKind::Dir => (EntryType::Directory, None, &[], None),
            EntryKind::Symlink(t) => (EntryType::Symlink, Some(t), &[], None),
            EntryKind::Hardlink(t) => (EntryType::Link, Some(t), &[], None),
            EntryKind::CharDevice { major, minor } => {
                (EntryType::Char, None, &[], Some((*major, *minor)))
            }
            EntryKind::BlockDevice { major, minor } => {
                (EntryType::Block, None, &[], Some((*major, *minor)))
            }
            EntryKind::Fifo => (EntryType::Fifo, None, &[], None),
        };
        let meta = Meta {
            ty,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            size: data.len() as u64,
            device,
        };
        self.emit(&e.path, link, &meta, &e.xattrs, data)?;
        Ok(self)
    }

    fn long_record(&mut self, ty: EntryType, value: &[u8]) -> io::Result<()> {
        let mut h = Header::new_gnu();
        put_field(&mut h.as_old_mut().name, b"././@LongLink");
        h.set_entry_type(ty);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        let mut data = value.to_vec();
        data.push(0);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.tar.append(&h, data.as_slice())
    }

    fn emit(
        &mut self,
        path: &[u8],
        link: Option<&[u8]>,
        meta: &Meta,
        xattrs: &[(String, Vec<u8>)],
        data: impl Read,
    ) -> io::Result<()> {
        let nul = |what: &str, v: &[u8]| {
            if v.contains(&0) {
                Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{what} {:?} contains a NUL byte",
                        String::from_utf8_lossy(v)
                    ),
                ))
            } else {
                Ok(())
            }
        };
        nul("path", path)?;
        if let Some(l) = link {
            nul("link target", l)?;
        }
        if !xattrs.is_empty() {
            let keys: Vec<String> = xattrs
                .iter()
                .map(|(k, _)| format!("SCHILY.xattr.{k}"))
                .collect();
            self.tar.append_pax_extensions(
                keys.iter()
                    .map(String::as_str)
                    .zip(xattrs.iter().map(|(_, v)| v.as_slice())),
            )?;
        }
        let mut h = Header::new_gnu();
        if path.len() > 100 {
            self.long_record(EntryType::GNULongName, path)?;
        }
        put_field(&mut h.as_old_mut().name, path);
        if let Some(l) = link {
            if l.len() > 100 {
                self.long_record(EntryType::GNULongLink, l)?;
            }
            put_field(&mut h.as_old_mut().linkname, l);
        }
        h.set_entry_type(meta.ty);
        h.set_mode(meta.mode);
        h.set_uid(meta.uid);
        h.set_gid(meta.gid);
        h.set_mtime(meta.mtime);
        h.set_size(meta.size);
        if let Some((major, minor)) = meta.device {
            h.set_device_major(major)?;
            h.set_device_minor(minor)?;
        }
        h.set_cksum();
        self.tar.append(&h, data)?;
        self.entries += 1;
        Ok(())
    }

    /// Appends the tree under `root` (not `root` itself), sorted by name: directories as `name/`,
    /// numeric owners, permission bits, hard links between files of the tree as links, devices and
    /// fifos; sockets are skipped. A mount point inside the tree is an error (nothing of another file
    /// system belongs in a layer).
    pub fn append_dir_tree(&mut self, root: &Path, opts: &DirOptions) -> anyhow::Result<()> {
        let m = fs::symlink_metadata(root).with_context(|| format!("{}", root.display()))?;
        if !m.is_dir() {
            bail!("{} is not a directory", root.display());
        }
        let mut w = TreeWriter {
            b: self,
            opts: *opts,
            dev: m.dev(),
            links: HashMap::new(),
        };
        w.tree(root, b"")
    }

    /// Appends what turns `lower` into `upper`: every entry of `upper` that `lower` lacks or has
    /// different (type, permission bits, owner, size, mtime, content, link target, device number,
    /// xattrs when asked), and a `.wh.` whiteout for every path of `lower` that `upper` lacks.
    /// Returns (entries written, whiteouts among them).
    pub fn append_tree_diff(
        &mut self,
        lower: &Path,
        upper: &Path,
        opts: &DirOptions,
    ) -> anyhow::Result<(usize, usize)> {
        for d in [lower, upper] {
            if !fs::symlink_metadata(d)
                .with_context(|| format!("{}", d.display()))?
                .is_dir()
            {
                bail!("{} is not a directory", d.display());
            }
        }
        let before = self.entries;
        let mut w = TreeWriter {
            b: self,
            opts: *opts,
            dev: fs::symlink_metadata(upper)?.dev(),
            links: HashMap::new(),
        };
        let lower_dev = fs::symlink_metadata(lower)?.dev();
        let mut whiteouts = 0;
        w.diff(lower, lower_dev, upper, b"", &mut whiteouts)?;
        Ok((self.entries - before, whiteouts))
    }

    /// The uncompressed tar (with its end-of-archive blocks).
    pub fn into_tar(self) -> io::Result<Vec<u8>> {
        self.tar.into_inner()
    }

    /// The finished layer, compressed.
    pub fn finish(self, compression: Compression) -> io::Result<Layer> {
        Layer::from_tar(&self.into_tar()?, compression)
    }
}

/// Walks directory trees into a [`LayerBuilder`].
struct TreeWriter<'a> {
    b: &'a mut LayerBuilder,
    opts: DirOptions,
    /// The device of the tree's root: anything else is a mount point.
    dev: u64,
    /// (dev, ino) of files with several links -> the path written first.
    links: HashMap<(u64, u64), Vec<u8>>,
}

fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = rel.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Names in a directory, sorted bytewise.
fn sorted_names(dir: &Path) -> anyhow::Result<Vec<std::ffi::OsString>> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        names.push(e?.file_name());
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// Extended attributes of a path (not following symlinks), sorted.
fn read_xattrs(path: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for name in xattr::list(path).with_context(|| format!("xattrs of {}", path.display()))? {
        let Some(n) = name.to_str() else {
            bail!("xattr name {name:?} of {} is not UTF-8", path.display());
        };
        if let Some(v) = xattr::get(path, &name)? {
            out.push((n.to_owned(), v));
        }
    }
    out.sort();
    Ok(out)
}

fn dev_major(rdev: u64) -> u32 {
    (((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0x0000_0fff)) as u32
}

fn dev_minor(rdev: u64) -> u32 {
    (((rdev >> 12) & 0xffff_ff00) | (rdev & 0x0000_00ff)) as u32
}

impl TreeWriter<'_> {
    fn tree(&mut self, dir: &Path, rel: &[u8]) -> anyhow::Result<()> {
        for name in sorted_names(dir)? {
            let path = dir.join(&name);
            let relp = join(rel, name.as_bytes());
            let m = fs::symlink_metadata(&path)?;
            let is_dir = self.one(&path, &relp, &m)?;
            if is_dir {
                self.tree(&path, &relp)?;
            }
        }
        Ok(())
    }

    /// Writes one path; returns whether it is a directory to descend into.
    fn one(&mut self, path: &Path, rel: &[u8], m: &fs::Metadata) -> anyhow::Result<bool> {
        if m.dev() != self.dev {
            bail!(
                "{} is a mount point (or on another file system); refusing to put it in a layer",
                path.display()
            );
        }
        let ft = m.file_type();
        let mtime = match self.opts.mtimes {
            Mtimes::Keep => u64::try_from(m.mtime()).unwrap_or(0),
            Mtimes::Zero => 0,
        };
        let xattrs = if self.opts.xattrs {
            read_xattrs(path)?
        } else {
            Vec::new()
        };
        let mut meta = Meta {
            ty: EntryType::Regular,
            mode: m.mode() & 0o7777,
            uid: u64::from(m.uid()),
            gid: u64::from(m.gid()),
            mtime,
            size: 0,
            device: None,
        };
        let empty: &[u8] = &[];
        if ft.is_dir() {
            meta.ty = EntryType::Directory;
            let mut p = rel.to_vec();
            p.push(b'/');
            self.b.emit(&p, None, &meta, &xattrs, empty)?;
            return Ok(true);
        }
        if ft.is_symlink() {
            meta.ty = EntryType::Symlink;
            let target = fs::read_link(path)?;
            self.b.emit(
                rel,
                Some(target.as_os_str().as_bytes()),
                &meta,
                &xattrs,
                empty,
            )?;
        } else if ft.is_file() {
            if m.nlink() > 1 {
                if let Some(first) = self.links.get(&(m.dev(), m.ino())) {
                    meta.ty = EntryType::Link;
                    let first = first.clone();
                    self.b.emit(rel, Some(&first), &meta, &xattrs, empty)?;
                    return Ok(false);
                }
                self.links.insert((m.dev(), m.ino()), rel.to_vec());
            }
            meta.size = m.len();
            let f = fs::File::open(path).with_context(|| format!("{}", path.display()))?;
            // A file that changes while it is read would corrupt the archive: read exactly its size.
            let mut data = Vec::with_capacity(m.len() as usize);
            f.take(m.len()).read_to_end(&mut data)?;
            if data.len() as u64 != m.len() {
                bail!("{} shrank while being read", path.display());
            }
            self.b.emit(rel, None, &meta, &xattrs, data.as_slice())?;
        } else if ft.is_char_device() || ft.is_block_device() {
            meta.ty = if ft.is_char_device() {
                EntryType::Char
            } else {
                EntryType::Block
            };
            meta.device = Some((dev_major(m.rdev()), dev_minor(m.rdev())));
            self.b.emit(rel, None, &meta, &xattrs, empty)?;
        } else if ft.is_fifo() {
            meta.ty = EntryType::Fifo;
            self.b.emit(rel, None, &meta, &xattrs, empty)?;
        }
        // Sockets: skipped, as docker and GNU tar do.
        Ok(false)
    }

    /// Whether `l` (lower) and `u` (upper) differ.
    fn differs(
        &self,
        lp: &Path,
        l: &fs::Metadata,
        up: &Path,
        u: &fs::Metadata,
    ) -> anyhow::Result<bool> {
        if l.mode() != u.mode()
            || l.uid() != u.uid()
            || l.gid() != u.gid()
            || (l.mtime(), l.mtime_nsec()) != (u.mtime(), u.mtime_nsec())
        {
            return Ok(true);
        }
        let ft = u.file_type();
        if ft.is_file() {
            if l.len() != u.len() || fs::read(lp)? != fs::read(up)? {
                return Ok(true);
            }
        } else if ft.is_symlink() {
            if fs::read_link(lp)? != fs::read_link(up)? {
                return Ok(true);
            }
        } else if (ft.is_char_device() || ft.is_block_device()) && l.rdev() != u.rdev() {
            return Ok(true);
        }
        if self.opts.xattrs && read_xattrs(lp)? != read_xattrs(up)? {
            return Ok(true);
        }
        Ok(false)
    }

    fn diff(
        &mut self,
        lower: &Path,
        lower_dev: u64,
        upper: &Path,
        rel: &[u8],
        whiteouts: &mut usize,
    ) -> anyhow::Result<()> {
        let unames = sorted_names(upper)?;
        let lnames = sorted_names(lower)?;
        let mut all: Vec<&std::ffi::OsString> = unames.iter().chain(lnames.iter()).collect();
        all.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        all.dedup();
        for name in all {
            let lp = lower.join(name);
            let up = upper.join(name);
            let relp = join(rel, name.as_bytes());
            let l = match fs::symlink_metadata(&lp) {
                Ok(m) => Some(m),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(e).with_context(|| format!("{}", lp.display())),
            };
            if let Some(l) = &l {
                if l.dev() != lower_dev {
                    bail!("{} is a mount point; refusing to diff it", lp.display());
                }
            }
            let u = match fs::symlink_metadata(&up) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let meta = Meta {
                        ty: EntryType::Regular,
                        mode: 0o644,
                        uid: 0,
                        gid: 0,
                        mtime: 0,
                        size: 0,
                        device: None,
                    };
                    let w = Entry::whiteout(&relp).path;
                    self.b.emit(&w, None, &meta, &[], &b""[..])?;
                    *whiteouts += 1;
                    continue;
                }
                Err(e) => return Err(e).with_context(|| format!("{}", up.display())),
            };
            let same_type = l.as_ref().is_some_and(|l| l.file_type() == u.file_type());
            if u.is_dir() {
                if !same_type || self.differs(&lp, l.as_ref().expect("same type"), &up, &u)? {
                    self.one(&up, &relp, &u)?;
                }
                if same_type {
                    self.diff(&lp, lower_dev, &up, &relp, whiteouts)?;
                } else {
                    self.tree(&up, &relp)?;
                }
            } else if !same_type || self.differs(&lp, l.as_ref().expect("same type"), &up, &u)? {
                self.one(&up, &relp, &u)?;
            }
        }
        Ok(())
    }
}

/// A layer blob and what describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// The blob (compressed as `compression` says).
    pub bytes: Vec<u8>,
    /// Its compression.
    pub compression: Compression,
    /// Its OCI media type (translated for Docker manifests, see [`Format::layer_media_type`]).
    pub media_type: String,
    /// `sha256:` of `bytes`.
    pub digest: String,
    /// `sha256:` of the uncompressed tar.
    pub diff_id: String,
    /// `bytes.len()`.
    pub size: u64,
}

impl Layer {
    /// Compresses a tar into a layer.
    pub fn from_tar(tar: &[u8], compression: Compression) -> io::Result<Layer> {
        let bytes = compression.compress(tar)?;
        Ok(Layer {
            compression,
            media_type: compression.oci_media_type().to_owned(),
            digest: sha256_digest(&bytes),
            diff_id: sha256_digest(tar),
            size: bytes.len() as u64,
            bytes,
        })
    }

    /// A layer from a blob as stored (compression recognised by its magic bytes).
    pub fn from_blob(bytes: Vec<u8>) -> io::Result<Layer> {
        let compression = Compression::detect(&bytes);
        let tar = compression.decompress(&bytes)?;
        Ok(Layer {
            compression,
            media_type: compression.oci_media_type().to_owned(),
            digest: sha256_digest(&bytes),
            diff_id: sha256_digest(&tar),
            size: bytes.len() as u64,
            bytes,
        })
    }

    /// Overrides the media type (say, to lie about the compression).
    pub fn with_media_type(mut self, media_type: &str) -> Self {
        self.media_type = media_type.to_owned();
        self
    }

    /// The layer's descriptor in a manifest of `format`.
    pub fn descriptor(&self, format: Format) -> Descriptor {
        Descriptor::new(
            &format.layer_media_type(&self.media_type),
            &self.digest,
            self.size,
        )
    }
}

/// A content descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// `mediaType`.
    pub media_type: String,
    /// `digest`.
    pub digest: String,
    /// `size`.
    pub size: u64,
    /// `platform` (index entries).
    pub platform: Option<Platform>,
    /// `annotations`.
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// A descriptor without platform or annotations.
    pub fn new(media_type: &str, digest: &str, size: u64) -> Self {
        Descriptor {
            media_type: media_type.to_owned(),
            digest: digest.to_owned(),
            size,
            platform: None,
            annotations: BTreeMap::new(),
        }
    }

    /// The descriptor of `bytes` of `media_type`.
    pub fn of(media_type: &str, bytes: &[u8]) -> Self {
        Descriptor::new(media_type, &sha256_digest(bytes), bytes.len() as u64)
    }

    /// Its JSON.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("mediaType".into(), self.media_type.clone().into());
        m.insert("digest".into(), self.digest.clone().into());
        m.insert("size".into(), self.size.into());
        if let Some(p) = &self.platform {
            m.insert("platform".into(), p.to_json());
        }
        if !self.annotations.is_empty() {
            m.insert("annotations".into(), json!(self.annotations));
        }
        Value::Object(m)
    }
}

// ------------------------------------------------------------------------------------------------
// Configs, manifests, indexes
// ------------------------------------------------------------------------------------------------

/// An image config. [`ImageConfig::to_json`] adds `rootfs.diff_ids` and `history` from the layers.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageConfig {
    /// `os`, `architecture`, `variant`.
    pub platform: Platform,
    /// `config.Env`.
    pub env: Vec<String>,
    /// `config.Cmd`.
    pub cmd: Option<Vec<String>>,
    /// `config.Entrypoint`.
    pub entrypoint: Option<Vec<String>>,
    /// `config.WorkingDir`.
    pub working_dir: Option<String>,
    /// `config.User`.
    pub user: Option<String>,
    /// Any other keys of `config` (`Labels`, `StopSignal`, ...); the fields above win.
    pub extra: Map<String, Value>,
    /// `created` (RFC 3339).
    pub created: String,
    /// `history[].created_by`, one per layer (missing ones are made up).
    pub history: Vec<String>,
}

/// The default `PATH` of Debian-based official images.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl ImageConfig {
    /// A config for `platform` with the default `PATH` and nothing else.
    pub fn new(platform: Platform) -> Self {
        ImageConfig {
            platform,
            env: vec![DEFAULT_PATH.to_owned()],
            cmd: None,
            entrypoint: None,
            working_dir: None,
            user: None,
            extra: Map::new(),
            created: EPOCH.to_owned(),
            history: Vec::new(),
        }
    }

    /// Sets `Cmd`.
    pub fn cmd<S: Into<String>>(mut self, cmd: impl IntoIterator<Item = S>) -> Self {
        self.cmd = Some(cmd.into_iter().map(Into::into).collect());
        self
    }

    /// Sets `Entrypoint`.
    pub fn entrypoint<S: Into<String>>(mut self, ep: impl IntoIterator<Item = S>) -> Self {
        self.entrypoint = Some(ep.into_iter().map(Into::into).collect());
        self
    }

    /// Sets `Env` (replacing the default `PATH`).
    pub fn env<S: Into<String>>(mut self, env: impl IntoIterator<Item = S>) -> Self {
        self.env = env.into_iter().map(Into::into).collect();
        self
    }

    /// Sets `WorkingDir`.
    pub fn working_dir(mut self, dir: &str) -> Self {
        self.working_dir = Some(dir.to_owned());
        self
    }

    /// Sets `User`.
    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.to_owned());
        self
    }

    /// Takes the keys of a `config` object as Docker writes it (`Env`, `Cmd`, `Entrypoint`,
    /// `WorkingDir`, `User`, anything else kept as it is).
    pub fn merge_config_json(&mut self, config: &Map<String, Value>) -> anyhow::Result<()> {
        let strings = |k: &str, v: &Value| -> anyhow::Result<Vec<String>> {
            v.as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|s| s.as_str().map(str::to_owned))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| anyhow!("config.{k} must be an array of strings"))
        };
        let string = |k: &str, v: &Value| -> anyhow::Result<String> {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("config.{k} must be a string"))
        };
        for (k, v) in config {
            match k.as_str() {
                "Env" => self.env = strings(k, v)?,
                "Cmd" => self.cmd = (!v.is_null()).then(|| strings(k, v)).transpose()?,
                "Entrypoint" => {
                    self.entrypoint = (!v.is_null()).then(|| strings(k, v)).transpose()?
                }
                "WorkingDir" => self.working_dir = Some(string(k, v)?),
                "User" => self.user = Some(string(k, v)?),
                _ => {
                    self.extra.insert(k.clone(), v.clone());
                }
            }
        }
        Ok(())
    }

    /// The config document for layers with these diff ids.
    pub fn to_json(&self, diff_ids: &[String]) -> Value {
        let mut c = self.extra.clone();
        c.insert("Env".into(), json!(self.env));
        if let Some(v) = &self.cmd {
            c.insert("Cmd".into(), json!(v));
        }
        if let Some(v) = &self.entrypoint {
            c.insert("Entrypoint".into(), json!(v));
        }
        if let Some(v) = &self.working_dir {
            c.insert("WorkingDir".into(), json!(v));
        }
        if let Some(v) = &self.user {
            c.insert("User".into(), json!(v));
        }
        let history: Vec<Value> = (0..diff_ids.len())
            .map(|i| {
                let by = self
                    .history
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("layer {} (sandbox-tests oci)", i + 1));
                json!({ "created": self.created, "created_by": by })
            })
            .collect();
        let mut doc = json!({
            "architecture": self.platform.architecture,
            "os": self.platform.os,
            "created": self.created,
            "config": c,
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": history,
        });
        if let Some(v) = &self.platform.variant {
            doc["variant"] = json!(v);
        }
        doc
    }
}

/// The bytes of an image manifest.
pub fn manifest_json(format: Format, config: &Descriptor, layers: &[Descriptor]) -> Vec<u8> {
    let doc = json!({
        "schemaVersion": 2,
        "mediaType": format.manifest_media_type(),
        "config": config.to_json(),
        "layers": layers.iter().map(Descriptor::to_json).collect::<Vec<_>>(),
    });
    serde_json::to_vec(&doc).expect("JSON")
}

/// The bytes of an index (manifest list); each entry should carry its platform.
pub fn index_json(format: Format, manifests: &[Descriptor]) -> Vec<u8> {
    let doc = json!({
        "schemaVersion": 2,
        "mediaType": format.index_media_type(),
        "manifests": manifests.iter().map(Descriptor::to_json).collect::<Vec<_>>(),
    });
    serde_json::to_vec(&doc).expect("JSON")
}

/// An image: its config and layers, in either format.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    /// The config (the diff ids come from `layers`).
    pub config: ImageConfig,
    /// The layers, bottom first.
    pub layers: Vec<Layer>,
    /// Manifest and config media types.
    pub format: Format,
}

/// The documents of an [`Image`], ready to push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageDocs {
    /// The config blob.
    pub config: Vec<u8>,
    /// The manifest.
    pub manifest: Vec<u8>,
    /// The manifest's descriptor (with the platform, for an index).
    pub descriptor: Descriptor,
}

impl Image {
    /// An OCI image.
    pub fn new(config: ImageConfig, layers: Vec<Layer>) -> Self {
        Image {
            config,
            layers,
            format: Format::Oci,
        }
    }

    /// A stand-in image for a platform a test never runs: one layer holding `/PLACEHOLDER.txt`.
    pub fn placeholder(platform: Platform, compression: Compression) -> io::Result<Self> {
        let text = format!(
            "This is a placeholder image for {platform}, pushed by sandboxd's tests so that the \
             index has a second platform. It holds no programs.\n"
        );
        let mut b = LayerBuilder::new();
        b.append(&Entry::file("PLACEHOLDER.txt", text))?;
        let layer = b.finish(compression)?;
        let mut config = ImageConfig::new(platform).cmd(["cat", "/PLACEHOLDER.txt"]);
        config.history = vec!["placeholder (sandbox-tests oci)".to_owned()];
        Ok(Image::new(config, vec![layer]))
    }

    /// The config, manifest and the manifest's descriptor.
    pub fn docs(&self) -> ImageDocs {
        let diff_ids: Vec<String> = self.layers.iter().map(|l| l.diff_id.clone()).collect();
        let config = serde_json::to_vec(&self.config.to_json(&diff_ids)).expect("JSON");
        let cdesc = Descriptor::of(self.format.config_media_type(), &config);
        let layers: Vec<Descriptor> = self
            .layers
            .iter()
            .map(|l| l.descriptor(self.format))
            .collect();
        let manifest = manifest_json(self.format, &cdesc, &layers);
        let mut descriptor = Descriptor::of(self.format.manifest_media_type(), &manifest);
        descriptor.platform = Some(self.config.platform.clone());
        ImageDocs {
            config,
            manifest,
            descriptor,
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Registry client
// ------------------------------------------------------------------------------------------------

/// A registry reached over plain HTTP (distribution spec, no auth).
#[derive(Clone, Debug)]
pub struct Registry {
    base: String,
    agent: ureq::Agent,
}

fn status_error(what: &str, resp: &mut ureq::http::Response<ureq::Body>) -> anyhow::Error {
    let body = resp
        .body_mut()
        .with_config()
        .limit(64 * 1024)
        .read_to_string()
        .unwrap_or_default();
    anyhow!("{what}: HTTP {}: {}", resp.status(), body.trim())
}

impl Registry {
    /// A registry at `host:port` (or a full `http://host:port` URL).
    pub fn new(registry: &str) -> Self {
        let base = if registry.starts_with("http://") || registry.starts_with("https://") {
            registry.trim_end_matches('/').to_owned()
        } else {
            format!("http://{}", registry.trim_end_matches('/'))
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(600)))
            .timeout_connect(Some(Duration::from_secs(10)))
            .build()
            .new_agent();
        Registry { base, agent }
    }

    /// `http://host:port`.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Whether `repo` has the blob (`HEAD /v2/<repo>/blobs/<digest>`).
    pub fn blob_exists(&self, repo: &str, digest: &str) -> anyhow::Result<bool> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        let mut resp = self.agent.head(&url).call()?;
        match resp.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(status_error(&format!("HEAD {url}"), &mut resp)),
        }
    }

    /// Uploads `bytes` as blob `digest` in one piece (POST an upload, then PUT it with the digest),
    /// whether or not the registry has it. The digest is sent as given: a wrong one is the registry's
    /// to refuse.
    pub fn upload_blob(&self, repo: &str, digest: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let url = format!("{}/v2/{repo}/blobs/uploads/", self.base);
        let mut resp = self.agent.post(&url).send_empty()?;
        if resp.status().as_u16() != 202 {
            return Err(status_error(&format!("POST {url}"), &mut resp));
        }
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| anyhow!("POST {url}: no Location"))?;
        let mut put = if location.starts_with("http://") || location.starts_with("https://") {
            location.to_owned()
        } else if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            bail!("POST {url}: unusable Location {location:?}");
        };
        put.push(if put.contains('?') { '&' } else { '?' });
        put.push_str("digest=");
        put.push_str(&digest.replace(':', "%3A"));
        let mut resp = self
            .agent
            .put(&put)
            .header("Content-Type", "application/octet-stream")
            .send(bytes)?;
        if resp.status().as_u16() != 201 {
            return Err(status_error(
                &format!("PUT blob {digest} to {repo}"),
                &mut resp,
            ));
        }
        Ok(())
    }

    /// Pushes a blob unless `repo` already has it; returns its digest.
    pub fn push_blob(&self, repo: &str, bytes: &[u8]) -> anyhow::Result<String> {
        let digest = sha256_digest(bytes);
        if !self.blob_exists(repo, &digest)? {
            self.upload_blob(repo, &digest, bytes)?;
        }
        Ok(digest)
    }

    /// `PUT /v2/<repo>/manifests/<reference>` with the raw bytes; returns the digest the registry
    /// reports (else the bytes' own).
    pub fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> anyhow::Result<String> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        let mut resp = self
            .agent
            .put(&url)
            .header("Content-Type", media_type)
            .send(bytes)?;
        if resp.status().as_u16() != 201 {
            return Err(status_error(&format!("PUT {url}"), &mut resp));
        }
        Ok(resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| sha256_digest(bytes)))
    }

    /// Fetches a manifest or index: (media type, bytes).
    pub fn get_manifest(&self, repo: &str, reference: &str) -> anyhow::Result<(String, Vec<u8>)> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        let accept = [
            OCI_INDEX,
            OCI_MANIFEST,
            DOCKER_MANIFEST_LIST,
            DOCKER_MANIFEST,
        ]
        .join(", ");
        let mut resp = self.agent.get(&url).header("Accept", accept).call()?;
        if resp.status().as_u16() != 200 {
            return Err(status_error(&format!("GET {url}"), &mut resp));
        }
        let mt = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(16 << 20)
            .read_to_vec()?;
        Ok((mt, bytes))
    }

    /// Fetches a blob.
    pub fn get_blob(&self, repo: &str, digest: &str) -> anyhow::Result<Vec<u8>> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        let mut resp = self.agent.get(&url).call()?;
        if resp.status().as_u16() != 200 {
            return Err(status_error(&format!("GET {url}"), &mut resp));
        }
        Ok(resp.body_mut().with_config().limit(4 << 30).read_to_vec()?)
    }

    /// Pushes an image's layers, config and manifest (under its digest); returns its descriptor.
    pub fn push_image_by_digest(&self, repo: &str, image: &Image) -> anyhow::Result<Descriptor> {
        let docs = image.docs();
        for l in &image.layers {
            if !self.blob_exists(repo, &l.digest)? {
                self.upload_blob(repo, &l.digest, &l.bytes)?;
            }
        }
        self.push_blob(repo, &docs.config)?;
        self.push_manifest(
            repo,
            &docs.descriptor.digest,
            &docs.descriptor.media_type,
            &docs.manifest,
        )?;
        Ok(docs.descriptor)
    }

    /// Pushes an image and tags it; returns the manifest digest.
    pub fn push_image(&self, repo: &str, tag: &str, image: &Image) -> anyhow::Result<String> {
        let d = self.push_image_by_digest(repo, image)?;
        let docs = image.docs();
        self.push_manifest(repo, tag, &d.media_type, &docs.manifest)
    }

    /// Pushes several images (one per platform) and tags an index of them; returns the index
    /// digest.
    pub fn push_index(
        &self,
        repo: &str,
        tag: &str,
        format: Format,
        images: &[Image],
    ) -> anyhow::Result<String> {
        let mut descs = Vec::new();
        for img in images {
            descs.push(self.push_image_by_digest(repo, img)?);
        }
        self.push_manifest(
            repo,
            tag,
            format.index_media_type(),
            &index_json(format, &descs),
        )
    }
}

/// Pushes a blob to `registry` (`host:port`); returns its digest.
pub fn push_blob(registry: &str, repo: &str, bytes: &[u8]) -> anyhow::Result<String> {
    Registry::new(registry).push_blob(repo, bytes)
}

/// Pushes raw manifest bytes under `reference` (a tag or a digest); returns the digest.
pub fn push_manifest(
    registry: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
) -> anyhow::Result<String> {
    Registry::new(registry).push_manifest(repo, reference, media_type, bytes)
}

/// Pushes an image (layers, config, manifest) and tags it; returns the manifest digest.
pub fn push_image(registry: &str, repo: &str, tag: &str, image: &Image) -> anyhow::Result<String> {
    Registry::new(registry).push_image(repo, tag, image)
}

// ------------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// (path, type, link, content, mode, uid, gid, mtime, device, xattrs) of each entry of a tar.
    #[derive(Debug, PartialEq, Eq)]
    struct Got {
        path: Vec<u8>,
        ty: EntryType,
        link: Option<Vec<u8>>,
        content: Vec<u8>,
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: u64,
        device: Option<(u32, u32)>,
        xattrs: Vec<(String, Vec<u8>)>,
    }

    fn read_tar(tar: &[u8]) -> Vec<Got> {
        let mut a = tar::Archive::new(tar);
        let mut out = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let mut xattrs = Vec::new();
            if let Some(exts) = e.pax_extensions().unwrap() {
                for x in exts {
                    let x = x.unwrap();
                    let k = x.key().unwrap();
                    if let Some(n) = k.strip_prefix("SCHILY.xattr.") {
                        xattrs.push((n.to_owned(), x.value_bytes().to_vec()));
                    }
                }
            }
            let h = e.header().clone();
            let ty = h.entry_type();
            let device = match ty {
                EntryType::Char | EntryType::Block => Some((
                    h.device_major().unwrap().unwrap(),
                    h.device_minor().unwrap().unwrap(),
                )),
                _ => None,
            };
            let path = e.path_bytes().to_vec();
            let link = e.link_name_bytes().map(|l| l.to_vec());
            let mut content = Vec::new();
            e.read_to_end(&mut content).unwrap();
            out.push(Got {
                path,
                ty,
                link,
                content,
                mode: h.mode().unwrap(),
                uid: h.uid().unwrap(),
                gid: h.gid().unwrap(),
                mtime: h.mtime().unwrap(),
                device,
                xattrs,
            });
        }
        out
    }

    fn hostile_entries() -> Vec<Entry> {
        let long = [b"a/".repeat(80), b"../../../../etc/shadow".to_vec()].concat();
        let long_target = [b"../".repeat(60), b"etc".to_vec()].concat();
        vec![
            Entry::file("../x", "escape"),
            Entry::file("/etc/passwd", "root::0:0::/:/bin/sh\n").with_mode(0o4755),
            Entry::file("./a/../../b", ""),
            Entry::file(b"bad\xff\xfename", "not utf-8"),
            Entry::file(&long, "long"),
            Entry::symlink("link", "/"),
            Entry::symlink("longlink", &long_target),
            Entry::hardlink("hl", "../../etc/shadow"),
            Entry::char_device("dev/mem", 1, 1),
            Entry::block_device("dev/sda", 8, 0),
            Entry::fifo("pipe")
                .with_owner(1000, 1001)
                .with_mtime(1_700_000_000),
            Entry::whiteout("etc/shadow"),
            Entry::opaque_whiteout("var/"),
            Entry::dir("setgid")
                .with_mode(0o2775)
                .with_owner(4_000_000_000, 7),
            Entry::file("cap", "x").with_xattr("security.capability", b"\x01\x00\x00\x02"),
            Entry::file("", "empty path"),
        ]
    }

    #[test]
    fn hostile_entries_round_trip_with_their_raw_paths() {
        let entries = hostile_entries();
        let mut b = LayerBuilder::new();
        for e in &entries {
            b.append(e).unwrap();
        }
        assert_eq!(b.len(), entries.len());
        let tar = b.into_tar().unwrap();
        let got = read_tar(&tar);
        assert_eq!(got.len(), entries.len());
        for (e, r) in entries.iter().zip(&got) {
            assert_eq!(r.path, e.path, "path of {e:?}");
            let (ty, link, content, device) = match &e.kind {
                EntryKind::File(c) => (EntryType::Regular, None, c.clone(), None),
                EntryKind::Dir => (EntryType::Directory, None, vec![], None),
                EntryKind::Symlink(t) => (EntryType::Symlink, Some(t.clone()), vec![], None),
                EntryKind::Hardlink(t) => (EntryType::Link, Some(t.clone()), vec![], None),
                EntryKind::CharDevice { major, minor } => {
                    (EntryType::Char, None, vec![], Some((*major, *minor)))
                }
                EntryKind::BlockDevice { major, minor } => {
                    (EntryType::Block, None, vec![], Some((*major, *minor)))
                }
                EntryKind::Fifo => (EntryType::Fifo, None, vec![], None),
            };
            assert_eq!(r.ty, ty, "{e:?}");
            assert_eq!(r.link, link, "{e:?}");
            assert_eq!(r.content, content, "{e:?}");
            assert_eq!(r.device, device, "{e:?}");
            assert_eq!(
                (r.mode, r.uid, r.gid, r.mtime),
                (e.mode, e.uid, e.gid, e.mtime),
                "{e:?}"
            );
            assert_eq!(r.xattrs, e.xattrs, "{e:?}");
        }
        assert_eq!(got[11].path, b"etc/.wh.shadow");
        assert_eq!(got[12].path, b"var/.wh..wh..opq");
        assert!(got[4].path.len() > 100 && got[6].link.as_ref().unwrap().len() > 100);
    }

    #[test]
    fn nul_in_a_path_is_refused() {
        let mut b = LayerBuilder::new();
        assert!(b.append(&Entry::file(b"a\0b", "")).is_err());
        assert!(b.append(&Entry::symlink("a", b"x\0")).is_err());
    }

    #[test]
    fn raw_headers_are_written_as_given() {
        let mut h = Header::new_old();
        h.as_old_mut().name[..5].copy_from_slice(b"../..");
        h.set_entry_type(EntryType::Regular);
        h.set_size(3);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        let mut b = LayerBuilder::new();
        b.append_raw(&h, b"abc").unwrap();
        let got = read_tar(&b.into_tar().unwrap());
        assert_eq!(got[0].path, b"../..");
        assert_eq!(got[0].content, b"abc");
    }

    #[test]
    fn layer_digests_and_compressions() {
        let mut b = LayerBuilder::new();
        b.append(&Entry::file("hello", "world\n")).unwrap();
        let tar = b.into_tar().unwrap();
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let l = Layer::from_tar(&tar, c).unwrap();
            assert_eq!(l.diff_id, sha256_digest(&tar));
            assert_eq!(
                l.digest,
                format!("sha256:{}", hex::encode(Sha256::digest(&l.bytes)))
            );
            assert_eq!(l.size, l.bytes.len() as u64);
            assert_eq!(l.media_type, c.oci_media_type());
            assert_eq!(Compression::detect(&l.bytes), c);
            assert_eq!(c.decompress(&l.bytes).unwrap(), tar);
            assert_eq!(Layer::from_blob(l.bytes.clone()).unwrap(), l);
            // Reproducible: the same tar compresses to the same blob.
            assert_eq!(Layer::from_tar(&tar, c).unwrap().digest, l.digest);
        }
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn dir_tree_is_sorted_with_links_and_owners() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        fs::create_dir_all(r.join("b/sub")).unwrap();
        fs::write(r.join("b/z"), "z").unwrap();
        fs::write(r.join("a"), "a").unwrap();
        fs::hard_link(r.join("a"), r.join("c")).unwrap();
        symlink("../a", r.join("b/sub/l")).unwrap();
        std::os::unix::fs::chown(r.join("b/z"), Some(123), Some(456)).unwrap();
        fs::set_permissions(
            r.join("b/z"),
            std::os::unix::fs::PermissionsExt::from_mode(0o4711),
        )
        .unwrap();
        let mut b = LayerBuilder::new();
        b.append_dir_tree(
            r,
            &DirOptions {
                mtimes: Mtimes::Zero,
                xattrs: true,
            },
        )
        .unwrap();
        let got = read_tar(&b.into_tar().unwrap());
        let paths: Vec<&[u8]> = got.iter().map(|e| e.path.as_slice()).collect();
        assert_eq!(
            paths,
            [&b"a"[..], b"b/", b"b/sub/", b"b/sub/l", b"b/z", b"c"]
        );
        assert_eq!(got[0].content, b"a");
        assert_eq!(got[3].link.as_deref(), Some(&b"../a"[..]));
        assert_eq!(got[4].ty, EntryType::Regular);
        assert_eq!((got[4].uid, got[4].gid, got[4].mode), (123, 456, 0o4711));
        assert_eq!(got[5].ty, EntryType::Link);
        assert_eq!(got[5].link.as_deref(), Some(&b"a"[..]));
        assert!(got.iter().all(|e| e.mtime == 0));
    }

    #[test]
    fn tree_diff_has_changes_and_whiteouts() {
        let t = tempfile::tempdir().unwrap();
        let (lo, up) = (t.path().join("lower"), t.path().join("upper"));
        for d in [&lo, &up] {
            fs::create_dir_all(d.join("etc")).unwrap();
            fs::create_dir_all(d.join("usr/lib/old")).unwrap();
            fs::write(d.join("etc/same"), "same").unwrap();
            fs::write(d.join("etc/changed"), "v1").unwrap();
            fs::write(d.join("etc/gone"), "x").unwrap();
            fs::write(d.join("usr/lib/old/f"), "x").unwrap();
            symlink("same", d.join("etc/link")).unwrap();
        }
        // Same mtimes everywhere first, so only what is changed below differs.
        let stamp = |p: &Path| {
            let f = fs::File::open(p).unwrap();
            f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1000))
                .unwrap();
        };
        fs::write(up.join("etc/changed"), "v2").unwrap();
        fs::remove_file(up.join("etc/gone")).unwrap();
        fs::remove_dir_all(up.join("usr/lib/old")).unwrap();
        fs::create_dir(up.join("new")).unwrap();
        fs::write(up.join("new/f"), "new").unwrap();
        fs::remove_file(up.join("etc/link")).unwrap();
        symlink("changed", up.join("etc/link")).unwrap();
        for d in [&lo, &up] {
            for p in [
                "etc",
                "etc/same",
                "etc/changed",
                "usr",
                "usr/lib",
                "new",
                "new/f",
                "usr/lib/old",
                "usr/lib/old/f",
                "etc/gone",
            ] {
                if d.join(p).exists() {
                    stamp(&d.join(p));
                }
            }
        }
        let mut b = LayerBuilder::new();
        let (n, w) = b
            .append_tree_diff(&lo, &up, &DirOptions::default())
            .unwrap();
        let got = read_tar(&b.into_tar().unwrap());
        let paths: Vec<String> = got
            .iter()
            .map(|e| String::from_utf8(e.path.clone()).unwrap())
            .collect();
        assert_eq!(
            paths,
            [
                "etc/changed",
                "etc/.wh.gone",
                "etc/link",
                "new/",
                "new/f",
                "usr/lib/.wh.old"
            ]
        );
        assert_eq!((n, w), (6, 2));
        assert_eq!(got[0].content, b"v2");
        assert_eq!(got[2].link.as_deref(), Some(&b"changed"[..]));
    }

    #[test]
    fn configs_manifests_and_indexes() {
        let l =
            Layer::from_tar(&LayerBuilder::new().into_tar().unwrap(), Compression::Gzip).unwrap();
        let cfg = ImageConfig::new(Platform::new("linux", "arm64", Some("v8")))
            .cmd(["python3"])
            .env(["PATH=/bin", "LANG=C.UTF-8"])
            .working_dir("/w")
            .user("1000:1000");
        let img = Image::new(cfg, vec![l.clone()]);
        let docs = img.docs();
        let c: Value = serde_json::from_slice(&docs.config).unwrap();
        assert_eq!(c["architecture"], "arm64");
        assert_eq!(c["variant"], "v8");
        assert_eq!(c["os"], "linux");
        assert_eq!(c["config"]["Cmd"], json!(["python3"]));
        assert_eq!(c["config"]["Env"], json!(["PATH=/bin", "LANG=C.UTF-8"]));
        assert_eq!(c["config"]["WorkingDir"], "/w");
        assert_eq!(c["config"]["User"], "1000:1000");
        assert_eq!(c["rootfs"]["diff_ids"], json!([l.diff_id]));
        let m: Value = serde_json::from_slice(&docs.manifest).unwrap();
        assert_eq!(m["mediaType"], OCI_MANIFEST);
        assert_eq!(m["config"]["digest"], sha256_digest(&docs.config));
        assert_eq!(m["layers"][0]["mediaType"], OCI_LAYER_GZIP);
        assert_eq!(m["layers"][0]["digest"], l.digest);
        assert_eq!(docs.descriptor.digest, sha256_digest(&docs.manifest));

        let mut dimg = img.clone();
        dimg.format = Format::Docker;
        let dm: Value = serde_json::from_slice(&dimg.docs().manifest).unwrap();
        assert_eq!(dm["mediaType"], DOCKER_MANIFEST);
        assert_eq!(dm["config"]["mediaType"], DOCKER_CONFIG);
        assert_eq!(dm["layers"][0]["mediaType"], DOCKER_LAYER_GZIP);

        let ph = Image::placeholder(Platform::other_than_host(), Compression::Zstd).unwrap();
        let idx: Value = serde_json::from_slice(&index_json(
            Format::Oci,
            &[docs.descriptor.clone(), ph.docs().descriptor],
        ))
        .unwrap();
        assert_eq!(idx["mediaType"], OCI_INDEX);
        assert_eq!(idx["manifests"][0]["platform"]["architecture"], "arm64");
        assert_eq!(idx["manifests"][0]["platform"]["variant"], "v8");
        assert_eq!(idx["manifests"][1]["mediaType"], OCI_MANIFEST);
    }

    #[test]
    fn config_json_merge_and_platform_parsing() {
        let mut c = ImageConfig::new(Platform::host());
        let j =
            json!({"Cmd": ["bash"], "Env": ["A=1"], "Labels": {"x": "y"}, "StopSignal": "SIGINT"});
        c.merge_config_json(j.as_object().unwrap()).unwrap();
        assert_eq!(c.cmd, Some(vec!["bash".to_owned()]));
        assert_eq!(c.env, vec!["A=1".to_owned()]);
        let doc = c.to_json(&[]);
        assert_eq!(doc["config"]["Labels"]["x"], "y");
        assert_eq!(doc["config"]["StopSignal"], "SIGINT");
        assert!(c
            .merge_config_json(json!({"Cmd": "bash"}).as_object().unwrap())
            .is_err());

        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p, Platform::new("linux", "arm64", Some("v8")));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!("linux/amd64".parse::<Platform>().unwrap().variant, None);
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux//v8".parse::<Platform>().is_err());
        assert_ne!(Platform::host(), Platform::other_than_host());
    }

    #[test]
    fn whiteout_names() {
        assert_eq!(Entry::whiteout("a/b/c").path, b"a/b/.wh.c");
        assert_eq!(Entry::whiteout("c").path, b".wh.c");
        assert_eq!(Entry::whiteout("a/dir/").path, b"a/.wh.dir");
        assert_eq!(Entry::opaque_whiteout("").path, b".wh..wh..opq");
    }

    /// Against the real test registry when `scripts/test` started one (skipped otherwise).
    #[test]
    fn push_and_fetch_back_from_the_test_registry() {
        let Ok(reg) = std::env::var("SANDBOXD_TEST_REGISTRY") else {
            eprintln!("SANDBOXD_TEST_REGISTRY unset: skipped");
            return;
        };
        let r = Registry::new(&reg);
        let mut b = LayerBuilder::new();
        b.append(&Entry::file("../hostile", "x")).unwrap();
        let layer = b.finish(Compression::Zstd).unwrap();
        let img = Image::new(
            ImageConfig::new(Platform::host()).cmd(["x"]),
            vec![layer.clone()],
        );
        let repo = "sandbox-tests/oci-unit";
        let digest = r.push_image(repo, "latest", &img).unwrap();
        assert_eq!(digest, img.docs().descriptor.digest);
        let (mt, bytes) = r.get_manifest(repo, "latest").unwrap();
        assert_eq!(mt, OCI_MANIFEST);
        assert_eq!(bytes, img.docs().manifest);
        assert_eq!(r.get_blob(repo, &layer.digest).unwrap(), layer.bytes);
        // Twice is fine, and a lying digest is refused.
        assert_eq!(r.push_image(repo, "latest", &img).unwrap(), digest);
        assert!(r
            .upload_blob(repo, &sha256_digest(b"other"), b"bytes")
            .is_err());
        let mut ph = Image::placeholder(Platform::other_than_host(), Compression::Gzip).unwrap();
        let mut img = img;
        img.format = Format::Docker;
        ph.format = Format::Docker;
        let idx = r
            .push_index(repo, "multi", Format::Docker, &[img, ph])
            .unwrap();
        let (mt, bytes) = r.get_manifest(repo, "multi").unwrap();
        assert_eq!(mt, DOCKER_MANIFEST_LIST);
        assert_eq!(sha256_digest(&bytes), idx);
    }
}
