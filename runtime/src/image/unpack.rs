//! Layer unpacking with our own in-root path resolution.
//!
//! Every entry path is normalised lexically (leading `/` and `./` stripped, `..` may not climb above the root),
//! then each parent component is opened with `openat(O_NOFOLLOW | O_DIRECTORY)` starting from a descriptor of the
//! layer root, so no symlink (in the layer or planted by an earlier entry) is ever followed. The final component is
//! created relative to its parent's descriptor (`mkdirat`, `openat(O_CREAT|O_EXCL|O_NOFOLLOW)`, `symlinkat`,
//! `linkat`, `mkfifoat`). Whiteouts become overlayfs's native ones (0/0 character device, `trusted.overlay.opaque`).
//! `tar::Entry::unpack*` is deliberately not used.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{
    fchmod, fchmodat, fstatat, futimens, makedev, mkdirat, mknodat, utimensat, FchmodatFlags, Mode,
    SFlag, UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{
    fchown, fchownat, linkat, mkfifoat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags,
};
use tar::EntryType;

use super::content::{copy_big, copy_with, io_err, HashingReader};
use super::ImageError;

/// One normalised path component (never empty, `.` or `..`; never contains `/`).
type Comp = Vec<u8>;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";
const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression a layer media type names (OCI and Docker names); `None` if the type is not a known layer type.
    pub(crate) fn from_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Self::Zstd),
            _ => None,
        }
    }

    /// Detects the compression from the first bytes of a blob (at least 512 of them for plain tar).
    pub(crate) fn sniff(head: &[u8]) -> Option<Self> {
        if head.starts_with(&[0x1f, 0x8b]) {
            Some(Self::Gzip)
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Self::Zstd)
        } else if head.get(257..262) == Some(b"ustar".as_slice())
            // An empty tar archive is all zeros (Docker's well-known empty layer).
            || (head.len() >= 512 && head.iter().all(|b| *b == 0))
        {
            Some(Self::None)
        } else {
            None
        }
    }

    /// Reads the first bytes of a file and sniffs them.
    pub(crate) fn sniff_file(path: &Path) -> Result<Option<Self>, ImageError> {
        let f = File::open(path).map_err(io_err(format!("open {}", path.display())))?;
        let mut head = Vec::with_capacity(512);
        f.take(512)
            .read_to_end(&mut head)
            .map_err(io_err(format!("read {}", path.display())))?;
        Ok(Self::sniff(&head))
    }

    /// The OCI media type for a layer with this compression.
    pub(crate) fn media_type(self) -> &'static str {
        match self {
            Self::None => "application/vnd.oci.image.layer.v1.tar",
            Self::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Self::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    pub(crate) fn reader<'a, R: Read + 'a>(self, r: R) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Self::None => Box::new(r),
            Self::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
            Self::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
        })
    }
}

/// Normalises a tar entry path: strips leading `/` and `./`, drops empty and `.` components, and resolves `..`
/// lexically; a `..` that would leave the root is an error.
pub(crate) fn normalise(raw: &[u8]) -> Result<Vec<Comp>, &'static str> {
    let mut out: Vec<Comp> = Vec::new();
    for comp in raw.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() {
                    return Err("path escapes the layer root through '..'");
                }
            }
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

fn hostile(entry: &str, reason: impl Into<String>) -> ImageError {
    ImageError::HostileEntry {
        entry: entry.to_owned(),
        reason: reason.into(),
    }
}

fn errno_io(context: String) -> impl FnOnce(Errno) -> ImageError {
    move |e| ImageError::Io {
        context,
        source: e.into(),
    }
}

fn display(comps: &[Comp]) -> String {
    let joined: Vec<u8> = comps.join(&b'/');
    String::from_utf8_lossy(&joined).into_owned()
}

/// Why walking a directory path inside the tree failed.
enum WalkError {
    Missing(String),
    Symlink(String),
    NotDir(String),
    Io(Errno, String),
}

/// A directory tree we create entries in, addressed only through descriptors.
#[derive(Debug)]
pub(crate) struct Tree {
    root: OwnedFd,
}

impl Tree {
    pub(crate) fn open(dir: &Path) -> Result<Self, ImageError> {
        let root = openat(nix::fcntl::AT_FDCWD, dir, DIR_FLAGS, Mode::empty())
            .map_err(errno_io(format!("open {}", dir.display())))?;
        Ok(Self { root })
    }

    /// Opens the directory `comps` below the root without following any symlink, creating missing components
    /// (0755) when `create`.
    fn walk(&self, comps: &[Comp], create: bool) -> Result<OwnedFd, WalkError> {
        let mut cur: Option<OwnedFd> = None;
        for (i, c) in comps.iter().enumerate() {
            let base = cur.as_ref().map_or(self.root.as_fd(), |f| f.as_fd());
            let prefix = || display(comps.get(..=i).unwrap_or(comps));
            let next = match openat(base, c.as_slice(), DIR_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if create => {
                    match mkdirat(base, c.as_slice(), Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(WalkError::Io(e, prefix())),
                    }
                    openat(base, c.as_slice(), DIR_FLAGS, Mode::empty())
                        .map_err(|e| WalkError::Io(e, prefix()))?
                }
                Err(Errno::ENOENT) => return Err(WalkError::Missing(prefix())),
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    let is_link = fstatat(base, c.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW)
                        .is_ok_and(|st| {
                            SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK
                        });
                    return Err(if is_link {
                        WalkError::Symlink(prefix())
                    } else {
                        WalkError::NotDir(prefix())
                    });
                }
                Err(e) => return Err(WalkError::Io(e, prefix())),
            };
            cur = Some(next);
        }
        match cur {
            Some(fd) => Ok(fd),
            None => self.root.try_clone().map_err(|e| {
                WalkError::Io(
                    Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                    String::new(),
                )
            }),
        }
    }

    /// Opens (creating as needed) the parent directory of an entry being written.
    fn open_parent(&self, parents: &[Comp], entry: &str) -> Result<OwnedFd, ImageError> {
        self.walk(parents, true).map_err(|e| match e {
            WalkError::Symlink(p) => hostile(entry, format!("write through symlink {p:?}")),
            WalkError::NotDir(p) => hostile(entry, format!("parent {p:?} is not a directory")),
            WalkError::Missing(p) => hostile(entry, format!("parent {p:?} is missing")),
            WalkError::Io(e, p) => errno_io(format!("open parent {p:?} of {entry}"))(e),
        })
    }

    /// Makes room for a new entry `name` in `dir`: a later tar entry overrides an earlier one. An existing directory
    /// is kept when `want_dir` (returns true), otherwise removed with its contents; anything else is unlinked.
    fn clear(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        want_dir: bool,
        entry: &str,
    ) -> Result<bool, ImageError> {
        match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(errno_io(format!("stat {entry}"))(e)),
            Ok(st) => {
                let is_dir =
                    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
                if is_dir && want_dir {
                    return Ok(true);
                }
                if is_dir {
                    remove_tree_at(dir, name)
                        .map_err(errno_io(format!("remove existing directory {entry}")))?;
                } else {
                    unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)
                        .map_err(errno_io(format!("remove existing {entry}")))?;
                }
                Ok(false)
            }
        }
    }
}

/// Removes `name` (a directory) in `parent` and everything below it, never following symlinks.
fn remove_tree_at(parent: BorrowedFd<'_>, name: &[u8]) -> Result<(), Errno> {
    let fd = openat(parent, name, DIR_FLAGS, Mode::empty())?;
    let mut dir = nix::dir::Dir::from_fd(fd.try_clone().map_err(|_| Errno::EMFILE)?)?;
    let names: Vec<Vec<u8>> = dir
        .iter()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_bytes().to_vec())
        .filter(|n| n.as_slice() != b"." && n.as_slice() != b"..")
        .collect();
    drop(dir);
    for n in names {
        let st = fstatat(&fd, n.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
            remove_tree_at(fd.as_fd(), &n)?;
        } else {
            unlinkat(&fd, n.as_slice(), UnlinkatFlags::NoRemoveDir)?;
        }
    }
    unlinkat(parent, name, UnlinkatFlags::RemoveDir)
}

fn fsetxattr(fd: BorrowedFd<'_>, name: &CString, value: &[u8]) -> io::Result<()> {
    // SAFETY: `fd` is a valid open descriptor for the duration of the call; `name` is NUL-terminated and `value`
    // points to `value.len()` readable bytes; both outlive the call, which does not retain them.
    let rc = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn lsetxattr(path: &CString, name: &CString, value: &[u8]) -> io::Result<()> {
    // SAFETY: `path` and `name` are NUL-terminated and `value` points to `value.len()` readable bytes; all outlive
    // the call, which does not retain them.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Ownership, mode, mtime and xattrs of an entry.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: TimeSpec,
    xattrs: Vec<(CString, Vec<u8>)>,
}

/// A directory whose mode and mtime are applied once the whole layer is written.
struct DirMeta {
    comps: Vec<Comp>,
    mode: u32,
    mtime: TimeSpec,
}

/// Counters for logging.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UnpackStats {
    pub entries: u64,
    pub skipped: u64,
}

struct Unpacker {
    tree: Tree,
    /// Copy buffer, reused for every file.
    buf: Vec<u8>,
    dirs: Vec<DirMeta>,
    stats: UnpackStats,
}

fn parse_pax_number(value: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(value).ok()?;
    let int = s.split('.').next()?;
    int.parse().ok()
}

impl Unpacker {
    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>, name: &str) -> Result<Meta, ImageError> {
        let bad = |what: &str, e: io::Error| ImageError::HostileEntry {
            entry: name.to_owned(),
            reason: format!("malformed {what} in tar header: {e}"),
        };
        let header = entry.header();
        let mut uid = i64::try_from(header.uid().map_err(|e| bad("uid", e))?).unwrap_or(-1);
        let mut gid = i64::try_from(header.gid().map_err(|e| bad("gid", e))?).unwrap_or(-1);
        let mode = header.mode().map_err(|e| bad("mode", e))? & 0o7777;
        let mut mtime =
            i64::try_from(header.mtime().map_err(|e| bad("mtime", e))?).unwrap_or(i64::MAX);
        let mut xattrs = Vec::new();
        if let Some(exts) = entry
            .pax_extensions()
            .map_err(|e| bad("pax extensions", e))?
        {
            for ext in exts {
                let ext = ext.map_err(|e| bad("pax extension", e))?;
                let key = ext.key_bytes();
                match key {
                    b"uid" => uid = parse_pax_number(ext.value_bytes()).unwrap_or(-1),
                    b"gid" => gid = parse_pax_number(ext.value_bytes()).unwrap_or(-1),
                    b"mtime" => mtime = parse_pax_number(ext.value_bytes()).unwrap_or(mtime),
                    _ => {
                        let Some(xname) = key.strip_prefix(b"SCHILY.xattr.") else {
                            continue;
                        };
                        if xname.starts_with(b"trusted.") {
                            tracing::debug!(entry = name, xattr = %String::from_utf8_lossy(xname), "skipping trusted.* xattr from layer");
                            continue;
                        }
                        match CString::new(xname) {
                            Ok(c) => xattrs.push((c, ext.value_bytes().to_vec())),
                            Err(_) => return Err(hostile(name, "xattr name contains NUL")),
                        }
                    }
                }
            }
        }
        let uid = u32::try_from(uid).map_err(|_| hostile(name, "uid out of range"))?;
        let gid = u32::try_from(gid).map_err(|_| hostile(name, "gid out of range"))?;
        Ok(Meta {
            uid,
            gid,
            mode,
            mtime: TimeSpec::new(mtime, 0),
            xattrs,
        })
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ImageError> {
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        self.stats.entries += 1;
        let comps = normalise(&raw).map_err(|r| hostile(&name, r))?;
        let Some((last, parents)) = comps.split_last() else {
            if kind == EntryType::Directory {
                let meta = self.meta(entry, &name)?;
                return self.root_dir(meta, &name);
            }
            return Err(hostile(
                &name,
                "entry names the layer root but is not a directory",
            ));
        };
        if let Some(p) = parents.iter().find(|c| c.starts_with(WHITEOUT_PREFIX)) {
            return Err(hostile(
                &name,
                format!(
                    "whiteout name {:?} used as a directory",
                    String::from_utf8_lossy(p)
                ),
            ));
        }
        if last.starts_with(WHITEOUT_PREFIX) {
            return self.whiteout(parents, last, &name);
        }
        match kind {
            EntryType::Directory => {
                let meta = self.meta(entry, &name)?;
                self.dir(&comps, parents, last, meta, &name)
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let meta = self.meta(entry, &name)?;
                self.file(parents, last, meta, entry, &name)
            }
            EntryType::Symlink => {
                let meta = self.meta(entry, &name)?;
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .ok_or_else(|| hostile(&name, "symlink without a target"))?;
                self.symlink(parents, last, &target, meta, &name)
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .ok_or_else(|| hostile(&name, "hardlink without a target"))?;
                self.hardlink(&comps, parents, last, &target, &name)
            }
            EntryType::Fifo => {
                let meta = self.meta(entry, &name)?;
                self.fifo(parents, last, meta, &name)
            }
            EntryType::Char | EntryType::Block => {
                tracing::warn!(entry = %name, "skipping device node in layer (devices are not created)");
                self.stats.skipped += 1;
                Ok(())
            }
            other => {
                tracing::warn!(entry = %name, kind = ?other, "skipping unsupported tar entry type");
                self.stats.skipped += 1;
                Ok(())
            }
        }
    }

    fn whiteout(&mut self, parents: &[Comp], last: &[u8], name: &str) -> Result<(), ImageError> {
        if last == WHITEOUT_OPAQUE {
            let dir = self.tree.open_parent(parents, name)?;
            let xname =
                CString::new(OVERLAY_OPAQUE_XATTR).map_err(|_| hostile(name, "xattr name"))?;
            return fsetxattr(dir.as_fd(), &xname, b"y")
                .map_err(io_err(format!("set {OVERLAY_OPAQUE_XATTR} for {name}")));
        }
        let target = last.get(WHITEOUT_PREFIX.len()..).unwrap_or_default();
        if target.starts_with(WHITEOUT_PREFIX) {
            // `.wh..wh.*` other than the opaque marker: aufs bookkeeping (`.wh..wh.plnk`, ...), meaningless here.
            tracing::debug!(entry = name, "skipping aufs metadata entry");
            self.stats.skipped += 1;
            return Ok(());
        }
        if target.is_empty() || target == b"." || target == b".." {
            return Err(hostile(name, "whiteout of an invalid name"));
        }
        let dir = self.tree.open_parent(parents, name)?;
        self.tree.clear(dir.as_fd(), target, false, name)?;
        mknodat(&dir, target, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))
            .map_err(errno_io(format!("create whiteout for {name}")))
    }

    fn root_dir(&mut self, meta: Meta, name: &str) -> Result<(), ImageError> {
        fchown(
            &self.tree.root,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )
        .map_err(errno_io(format!("chown {name}")))?;
        set_xattrs_fd(self.tree.root.as_fd(), &meta.xattrs, name);
        self.dirs.push(DirMeta {
            comps: Vec::new(),
            mode: meta.mode,
            mtime: meta.mtime,
        });
        Ok(())
    }

    fn dir(
        &mut self,
        comps: &[Comp],
        parents: &[Comp],
        last: &[u8],
        meta: Meta,
        name: &str,
    ) -> Result<(), ImageError> {
        let dir = self.tree.open_parent(parents, name)?;
        if !self.tree.clear(dir.as_fd(), last, true, name)? {
            mkdirat(&dir, last, Mode::from_bits_truncate(0o755))
                .map_err(errno_io(format!("mkdir {name}")))?;
        }
        fchownat(
            &dir,
            last,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(errno_io(format!("chown {name}")))?;
        if !meta.xattrs.is_empty() {
            let fd = openat(&dir, last, DIR_FLAGS, Mode::empty())
                .map_err(errno_io(format!("open {name}")))?;
            set_xattrs_fd(fd.as_fd(), &meta.xattrs, name);
        }
        self.dirs.push(DirMeta {
            comps: comps.to_vec(),
            mode: meta.mode,
            mtime: meta.mtime,
        });
        Ok(())
    }

    fn file<R: Read>(
        &mut self,
        parents: &[Comp],
        last: &[u8],
        meta: Meta,
        data: &mut tar::Entry<'_, R>,
        name: &str,
    ) -> Result<(), ImageError> {
        let dir = self.tree.open_parent(parents, name)?;
        self.tree.clear(dir.as_fd(), last, false, name)?;
        let fd = openat(
            &dir,
            last,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(errno_io(format!("create {name}")))?;
        let mut file = File::from(fd);
        copy_with(data, &mut file, &mut self.buf).map_err(io_err(format!("write {name}")))?;
        // chown before chmod: chown clears setuid/setgid bits and file capabilities.
        fchown(
            &file,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )
        .map_err(errno_io(format!("chown {name}")))?;
        fchmod(&file, Mode::from_bits_truncate(meta.mode))
            .map_err(errno_io(format!("chmod {name}")))?;
        set_xattrs_fd(file.as_fd(), &meta.xattrs, name);
        futimens(&file, &meta.mtime, &meta.mtime).map_err(errno_io(format!("set times of {name}")))
    }

    fn symlink(
        &mut self,
        parents: &[Comp],
        last: &[u8],
        target: &[u8],
        meta: Meta,
        name: &str,
    ) -> Result<(), ImageError> {
        if target.is_empty() {
            return Err(hostile(name, "symlink with an empty target"));
        }
        let dir = self.tree.open_parent(parents, name)?;
        self.tree.clear(dir.as_fd(), last, false, name)?;
        // The target is only data: it is stored, never followed here.
        symlinkat(target, &dir, last).map_err(errno_io(format!("create symlink {name}")))?;
        self.finish_special(dir.as_fd(), last, &meta, name)
    }

    fn fifo(
        &mut self,
        parents: &[Comp],
        last: &[u8],
        meta: Meta,
        name: &str,
    ) -> Result<(), ImageError> {
        let dir = self.tree.open_parent(parents, name)?;
        self.tree.clear(dir.as_fd(), last, false, name)?;
        mkfifoat(&dir, last, Mode::from_bits_truncate(0o600))
            .map_err(errno_io(format!("mkfifo {name}")))?;
        fchownat(
            &dir,
            last,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(errno_io(format!("chown {name}")))?;
        // The name is the FIFO just created in a tree only this unpacker writes to, so following is moot.
        fchmodat(
            &dir,
            last,
            Mode::from_bits_truncate(meta.mode),
            FchmodatFlags::FollowSymlink,
        )
        .map_err(errno_io(format!("chmod {name}")))?;
        set_xattrs_at(dir.as_fd(), last, &meta.xattrs, name);
        utimensat(
            &dir,
            last,
            &meta.mtime,
            &meta.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(errno_io(format!("set times of {name}")))
    }

    /// Ownership, xattrs and times of a symlink (its mode is meaningless on Linux).
    fn finish_special(
        &self,
        dir: BorrowedFd<'_>,
        last: &[u8],
        meta: &Meta,
        name: &str,
    ) -> Result<(), ImageError> {
        fchownat(
            dir,
            last,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(errno_io(format!("chown {name}")))?;
        set_xattrs_at(dir, last, &meta.xattrs, name);
        utimensat(
            dir,
            last,
            &meta.mtime,
            &meta.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(errno_io(format!("set times of {name}")))
    }

    fn hardlink(
        &mut self,
        comps: &[Comp],
        parents: &[Comp],
        last: &[u8],
        target: &[u8],
        name: &str,
    ) -> Result<(), ImageError> {
        let tcomps = normalise(target)
            .map_err(|_| hostile(name, "hardlink target escapes the layer root"))?;
        let Some((tlast, tparents)) = tcomps.split_last() else {
            return Err(hostile(name, "hardlink to the layer root"));
        };
        if tcomps.as_slice() == comps {
            return Ok(());
        }
        let missing = || {
            hostile(
                name,
                format!(
                    "hardlink target {:?} is not in this layer",
                    display(&tcomps)
                ),
            )
        };
        let tdir = self.tree.walk(tparents, false).map_err(|e| match e {
            WalkError::Missing(_) | WalkError::NotDir(_) => missing(),
            WalkError::Symlink(p) => hostile(
                name,
                format!("hardlink target resolves through symlink {p:?}"),
            ),
            WalkError::Io(e, p) => errno_io(format!("open {p:?} for hardlink {name}"))(e),
        })?;
        match fstatat(&tdir, tlast.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG => {}
            Ok(_) => return Err(hostile(name, "hardlink target is not a regular file")),
            Err(Errno::ENOENT) => return Err(missing()),
            Err(e) => return Err(errno_io(format!("stat hardlink target of {name}"))(e)),
        }
        let dir = self.tree.open_parent(parents, name)?;
        self.tree.clear(dir.as_fd(), last, false, name)?;
        linkat(&tdir, tlast.as_slice(), &dir, last, AtFlags::empty())
            .map_err(errno_io(format!("create hardlink {name}")))
    }

    /// Applies directory modes and mtimes, after all contents are written. Directories replaced or removed by later
    /// entries (or now reachable only through a symlink) are skipped.
    fn finish_dirs(&mut self) -> Result<(), ImageError> {
        for d in &self.dirs {
            let Ok(fd) = self.tree.walk(&d.comps, false) else {
                continue;
            };
            let name = display(&d.comps);
            fchmod(&fd, Mode::from_bits_truncate(d.mode))
                .map_err(errno_io(format!("chmod {name}/")))?;
            futimens(&fd, &d.mtime, &d.mtime).map_err(errno_io(format!("set times of {name}/")))?;
        }
        Ok(())
    }
}

fn set_xattrs_fd(fd: BorrowedFd<'_>, xattrs: &[(CString, Vec<u8>)], name: &str) {
    for (k, v) in xattrs {
        if let Err(e) = fsetxattr(fd, k, v) {
            tracing::warn!(entry = name, xattr = ?k, error = %e, "cannot set xattr from layer; skipped");
        }
    }
}

/// Sets xattrs on a symlink or FIFO `last` in `dir` (no descriptor of its own can carry them): through
/// `/proc/self/fd/<dir>/<last>` with `lsetxattr`, which resolves the directory through its descriptor and does not
/// follow `last`.
fn set_xattrs_at(dir: BorrowedFd<'_>, last: &[u8], xattrs: &[(CString, Vec<u8>)], name: &str) {
    if xattrs.is_empty() {
        return;
    }
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(last);
    let Ok(path) = CString::new(path) else {
        return;
    };
    for (k, v) in xattrs {
        if let Err(e) = lsetxattr(&path, k, v) {
            tracing::warn!(entry = name, xattr = ?k, error = %e, "cannot set xattr from layer; skipped");
        }
    }
}

/// A decompressing reader that gives its input back, so the caller can read what follows the compressed stream.
pub(crate) enum Decoder<R: Read> {
    Plain(R),
    /// Boxed: its state is several times larger than the other variants'.
    Gzip(Box<flate2::read::MultiGzDecoder<R>>),
    Zstd(zstd::stream::read::Decoder<'static, BufReader<R>>),
}

impl<R: Read> Decoder<R> {
    pub(crate) fn new(compression: Compression, r: R) -> io::Result<Self> {
        Ok(match compression {
            Compression::None => Self::Plain(r),
            Compression::Gzip => Self::Gzip(Box::new(flate2::read::MultiGzDecoder::new(r))),
            Compression::Zstd => Self::Zstd(zstd::stream::read::Decoder::new(r)?),
        })
    }

    /// The input reader. Bytes the decoder buffered but did not use are lost; callers that need every byte wrap
    /// the input in a reader that counts (and hashes) what passes through it.
    pub(crate) fn into_inner(self) -> R {
        match self {
            Self::Plain(r) => r,
            Self::Gzip(d) => (*d).into_inner(),
            Self::Zstd(d) => d.finish().into_inner(),
        }
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(r) => r.read(buf),
            Self::Gzip(d) => d.read(buf),
            Self::Zstd(d) => d.read(buf),
        }
    }
}

/// Unpacks a layer blob into `dest` (an existing empty directory), verifying that the sha256 of the uncompressed
/// stream equals `diff_id`. On error `dest` holds a partial tree the caller must remove.
pub(crate) fn unpack_layer(
    blob: &Path,
    compression: Compression,
    dest: &Path,
    diff_id: &str,
    what: &str,
) -> Result<UnpackStats, ImageError> {
    let file = File::open(blob).map_err(io_err(format!("open {what} blob {}", blob.display())))?;
    let (stats, _) = unpack_stream(
        BufReader::with_capacity(256 * 1024, file),
        compression,
        dest,
        diff_id,
        what,
    )?;
    Ok(stats)
}

/// Unpacks the compressed layer stream `input` into `dest` (an existing empty directory) as it is read, verifying
/// that the sha256 of the uncompressed tar stream equals `diff_id`, and gives `input` back (read up to the end of
/// the compressed data) so the caller can finish reading and verifying it. Nothing is synced to disk. On error
/// `dest` holds a partial tree the caller must remove.
pub(crate) fn unpack_stream<R: Read>(
    input: R,
    compression: Compression,
    dest: &Path,
    diff_id: &str,
    what: &str,
) -> Result<(UnpackStats, R), ImageError> {
    let decoded = Decoder::new(compression, input).map_err(io_err(format!("decompress {what}")))?;
    let mut archive = tar::Archive::new(HashingReader::new(decoded));
    let mut unpacker = Unpacker {
        tree: Tree::open(dest)?,
        buf: vec![0u8; 128 * 1024],
        dirs: Vec::new(),
        stats: UnpackStats::default(),
    };
    let malformed = |e: io::Error| ImageError::Invalid {
        what: what.to_owned(),
        reason: format!("malformed or corrupt layer tar: {e}"),
    };
    for entry in archive.entries().map_err(malformed)? {
        let mut entry = entry.map_err(malformed)?;
        unpacker.entry(&mut entry)?;
    }
    unpacker.finish_dirs()?;
    let mut hashing = archive.into_inner();
    // The rest of the tar stream (end-of-archive blocks, padding) counts towards the diff_id.
    copy_big(&mut hashing, &mut io::sink()).map_err(malformed)?;
    let (actual, decoded) = hashing.finish_into_inner().map_err(malformed)?;
    if actual != diff_id {
        return Err(ImageError::DigestMismatch {
            what: format!("{what} (uncompressed diff_id)"),
            expected: diff_id.to_owned(),
            actual,
        });
    }
    Ok((unpacker.stats, decoded.into_inner()))
}

/// Flushes a freshly unpacked layer directory to disk.
pub(crate) fn sync_tree(dest: &Path) -> Result<(), ImageError> {
    let tree = Tree::open(dest)?;
    nix::unistd::syncfs(&tree.root).map_err(errno_io(format!("syncfs {}", dest.display())))
}

/// Whether a path in an image archive (OCI layout or `docker save` tarball) is one the importer may need.
fn wanted_archive_path(comps: &[Comp]) -> bool {
    match comps {
        [f] => {
            f.ends_with(b".json")
                || f.as_slice() == b"oci-layout"
                || f.as_slice() == b"repositories"
        }
        [_, f] => matches!(f.as_slice(), b"layer.tar" | b"json" | b"VERSION"),
        [b, _, _] => b.as_slice() == b"blobs",
        _ => false,
    }
}

/// Extracts the regular files (and symlinks, as inert data) an image importer needs from an image tarball into
/// `dest`, with the same in-root rules as layer unpacking. Nothing else (devices, ownership, modes) is kept.
pub(crate) fn extract_image_archive<R: Read>(
    reader: R,
    dest: &Path,
    what: &str,
) -> Result<(), ImageError> {
    let tree = Tree::open(dest)?;
    let mut archive = tar::Archive::new(reader);
    let malformed = |e: io::Error| ImageError::Invalid {
        what: what.to_owned(),
        reason: format!("not a readable tar archive: {e}"),
    };
    for entry in archive.entries().map_err(malformed)? {
        let mut entry = entry.map_err(malformed)?;
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        if !matches!(
            kind,
            EntryType::Regular | EntryType::Continuous | EntryType::Symlink
        ) {
            continue;
        }
        let comps = normalise(&raw).map_err(|r| hostile(&name, r))?;
        if !wanted_archive_path(&comps) {
            tracing::debug!(entry = %name, "skipping archive entry the importer does not need");
            continue;
        }
        let Some((last, parents)) = comps.split_last() else {
            continue;
        };
        let dir = tree.open_parent(parents, &name)?;
        tree.clear(dir.as_fd(), last, false, &name)?;
        if kind == EntryType::Symlink {
            let target = entry
                .link_name_bytes()
                .map(|t| t.into_owned())
                .filter(|t| !t.is_empty())
                .ok_or_else(|| hostile(&name, "symlink without a target"))?;
            symlinkat(target.as_slice(), &dir, last.as_slice())
                .map_err(errno_io(format!("create symlink {name}")))?;
            continue;
        }
        let fd = openat(
            &dir,
            last.as_slice(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(errno_io(format!("create {name}")))?;
        let mut file = File::from(fd);
        copy_big(&mut entry, &mut file).map_err(io_err(format!("extract {name} from {what}")))?;
    }
    Ok(())
}
