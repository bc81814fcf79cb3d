//! The content-addressed blob store: `blobs/sha256/<hex>`, written through `ingest/` (stream, verify size and
//! digest, fsync, rename). Nothing is visible under `blobs/` before it has been verified.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

use super::ImageError;

/// The only digest algorithm the store accepts.
pub(crate) const SHA256: &str = "sha256:";

/// Returns the hex part of a well-formed `sha256:<64 lowercase hex>` digest.
pub(crate) fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix(SHA256)?;
    (hex.len() == 64 && is_lower_hex(hex)).then_some(hex)
}

pub(crate) fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Like [`digest_hex`], as an error naming `what` when the digest is malformed or not sha256.
pub(crate) fn require_digest<'a>(digest: &'a str, what: &str) -> Result<&'a str, ImageError> {
    digest_hex(digest).ok_or_else(|| ImageError::Invalid {
        what: what.to_owned(),
        reason: format!(
            "unsupported or malformed digest {digest:?} (only sha256:<64 hex> is accepted)"
        ),
    })
}

pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("{SHA256}{}", hex::encode(Sha256::digest(bytes)))
}

/// A file or directory name unique within this process and, through the pid, across processes.
pub(crate) fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}-{nanos:x}-{n}", std::process::id())
}

/// Wraps a reader and computes the sha256 and length of everything read through it.
#[derive(Debug)]
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Reads the rest of the stream (so the digest covers all of it) and returns `(digest, size)`.
    pub(crate) fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((
            format!("{SHA256}{}", hex::encode(self.hasher.finalize())),
            self.count,
        ))
    }

    /// The digest of what was read so far, and the inner reader (not read any further).
    pub(crate) fn finish_into_inner(self) -> io::Result<(String, R)> {
        Ok((
            format!("{SHA256}{}", hex::encode(self.hasher.finalize())),
            self.inner,
        ))
    }
}

/// Copies everything read through it into a file and hashes it: the download side of a layer that is unpacked
/// while it arrives. Refuses to read more than `limit` bytes.
#[derive(Debug)]
pub(crate) struct TeeReader<R> {
    inner: R,
    file: File,
    hasher: Sha256,
    count: u64,
    limit: u64,
}

impl<R: Read> TeeReader<R> {
    pub(crate) fn new(inner: R, file: File, limit: u64) -> Self {
        Self {
            inner,
            file,
            hasher: Sha256::new(),
            count: 0,
            limit,
        }
    }

    /// Reads (and copies) the rest of the stream; returns `(digest, size, file)`.
    pub(crate) fn finish(mut self) -> io::Result<(String, u64, File)> {
        copy_big(&mut self, &mut io::sink())?;
        Ok((
            format!("{SHA256}{}", hex::encode(self.hasher.finalize())),
            self.count,
            self.file,
        ))
    }
}

/// The error a [`TeeReader`] answers once more than its limit has arrived.
#[derive(Debug)]
struct TooLong(u64);

impl std::fmt::Display for TooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "blob is longer than the {} bytes its descriptor announces",
            self.0
        )
    }
}

impl std::error::Error for TooLong {}

/// Whether `e` is a [`TeeReader`] refusing a stream longer than announced (as returned by it, not wrapped).
pub(crate) fn is_too_long(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<TooLong>())
}

impl<R: Read> Read for TeeReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let read = buf.get(..n).unwrap_or_default();
        self.count = self.count.saturating_add(n as u64);
        if self.count > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                TooLong(self.limit),
            ));
        }
        self.hasher.update(read);
        self.file.write_all(read)?;
        Ok(n)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let read = buf.get(..n).unwrap_or_default();
        self.hasher.update(read);
        self.count += n as u64;
        Ok(n)
    }
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let context = context.into();
    move |source| ImageError::Io { context, source }
}

/// fsyncs a directory so that renames into it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    let f = File::open(dir).map_err(io_err(format!("open {}", dir.display())))?;
    nix::unistd::fsync(f.as_fd()).map_err(|e| io_err(format!("fsync {}", dir.display()))(e.into()))
}

/// Removes a file when dropped unless disarmed.
struct RemoveOnDrop<'a>(Option<&'a Path>);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

/// The expectation a blob must meet before it is committed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expect<'a> {
    /// `sha256:<hex>`; `None` = content not known in advance (docker-archive layers): computed and trusted.
    pub digest: Option<&'a str>,
    pub size: Option<u64>,
    /// What the blob is, for error messages ("layer 2 of ...").
    pub what: &'a str,
}

/// What [`Blobs::ingest`] did.
#[derive(Debug, Clone)]
pub(crate) struct Ingested {
    pub digest: String,
    pub size: u64,
    /// False when the blob was already in the store.
    pub new: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Blobs {
    /// `root/blobs/sha256`
    dir: PathBuf,
    /// `root/ingest`
    ingest: PathBuf,
}

impl Blobs {
    pub(crate) fn new(dir: PathBuf, ingest: PathBuf) -> Self {
        Self { dir, ingest }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of a blob given its validated hex digest.
    pub(crate) fn path_hex(&self, hex: &str) -> PathBuf {
        self.dir.join(hex)
    }

    /// The path of a blob given a digest; `None` if the digest is malformed.
    pub(crate) fn path(&self, digest: &str) -> Option<PathBuf> {
        digest_hex(digest).map(|h| self.path_hex(h))
    }

    /// The blob `expect` names, if the store already has it (then it is not read again).
    pub(crate) fn existing(&self, expect: &Expect<'_>) -> Result<Option<Ingested>, ImageError> {
        let Some(digest) = expect.digest else {
            return Ok(None);
        };
        let hex = require_digest(digest, expect.what)?;
        match fs::symlink_metadata(self.path_hex(hex)) {
            Ok(m) if m.is_file() => Ok(Some(Ingested {
                digest: digest.to_owned(),
                size: m.len(),
                new: false,
            })),
            _ => Ok(None),
        }
    }

    fn check(&self, expect: &Expect<'_>, digest: &str, size: u64) -> Result<(), ImageError> {
        if let Some(want) = expect.size {
            if want != size {
                return Err(ImageError::DigestMismatch {
                    what: format!("{} (size)", expect.what),
                    expected: want.to_string(),
                    actual: size.to_string(),
                });
            }
        }
        if let Some(want) = expect.digest {
            if want != digest {
                return Err(ImageError::DigestMismatch {
                    what: expect.what.to_owned(),
                    expected: want.to_owned(),
                    actual: digest.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Streams `reader` into an ingest file, verifies it, fsyncs it and renames it into place.
    /// A blob already present with the expected digest is not read at all.
    pub(crate) fn ingest<R: Read>(
        &self,
        reader: R,
        expect: Expect<'_>,
    ) -> Result<Ingested, ImageError> {
        if let Some(found) = self.existing(&expect)? {
            return Ok(found);
        }
        let tmp = self.ingest.join(unique_name("blob-"));
        let mut guard = RemoveOnDrop(Some(&tmp));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io_err(format!("create ingest file {}", tmp.display())))?;
        let mut hashing = HashingReader::new(reader);
        copy_big(&mut hashing, &mut file).map_err(io_err(format!("read {}", expect.what)))?;
        let (digest, size) = hashing
            .finish()
            .map_err(io_err(format!("read {}", expect.what)))?;
        self.check(&expect, &digest, size)?;
        file.flush()
            .and_then(|()| file.sync_all())
            .map_err(io_err(format!("fsync {}", tmp.display())))?;
        drop(file);
        let new = self.commit(&tmp, &digest)?;
        guard.0 = None;
        Ok(Ingested { digest, size, new })
    }

    /// Verifies an already-written file we own (a file extracted from an import tarball) and moves it into the
    /// store instead of copying it. `file` is that file, open for reading; `path` its name.
    pub(crate) fn adopt(
        &self,
        file: File,
        path: &Path,
        expect: Expect<'_>,
    ) -> Result<Ingested, ImageError> {
        if let Some(found) = self.existing(&expect)? {
            return Ok(found);
        }
        let hashing = HashingReader::new(&file);
        let (digest, size) = hashing
            .finish()
            .map_err(io_err(format!("read {}", expect.what)))?;
        self.check(&expect, &digest, size)?;
        file.sync_all()
            .map_err(io_err(format!("fsync {}", path.display())))?;
        drop(file);
        let new = self.commit(path, &digest)?;
        Ok(Ingested { digest, size, new })
    }

    /// Renames a verified file into place. Returns false (and removes `tmp`) if the blob already existed.
    fn commit(&self, tmp: &Path, digest: &str) -> Result<bool, ImageError> {
        let hex = require_digest(digest, "blob")?;
        let dest = self.path_hex(hex);
        if fs::symlink_metadata(&dest).is_ok_and(|m| m.is_file()) {
            let _ = fs::remove_file(tmp);
            return Ok(false);
        }
        fs::rename(tmp, &dest).map_err(io_err(format!(
            "commit blob {digest} to {}",
            dest.display()
        )))?;
        sync_dir(&self.dir)?;
        tracing::debug!(%digest, "committed blob");
        Ok(true)
    }
}

/// Reads a file of at most `limit` bytes.
pub(crate) fn read_bounded(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>, ImageError> {
    let f = File::open(path).map_err(io_err(format!("open {what} {}", path.display())))?;
    read_all_bounded(f, limit, what)
}

pub(crate) fn read_all_bounded<R: Read>(
    r: R,
    limit: u64,
    what: &str,
) -> Result<Vec<u8>, ImageError> {
    let mut buf = Vec::new();
    r.take(limit.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(io_err(format!("read {what}")))?;
    if buf.len() as u64 > limit {
        return Err(ImageError::Invalid {
            what: what.to_owned(),
            reason: format!("larger than the {limit} byte limit"),
        });
    }
    Ok(buf)
}

/// `io::copy` with a larger buffer (layers are big).
pub(crate) fn copy_big<R: Read + ?Sized, W: Write + ?Sized>(
    r: &mut R,
    w: &mut W,
) -> io::Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    copy_with(r, w, &mut buf)
}

/// `io::copy` through a caller-provided buffer.
pub(crate) fn copy_with<R: Read + ?Sized, W: Write + ?Sized>(
    r: &mut R,
    w: &mut W,
    buf: &mut [u8],
) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let n = match r.read(buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(buf.get(..n).unwrap_or_default())?;
        total += n as u64;
    }
}
