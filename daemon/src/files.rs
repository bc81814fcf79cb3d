//! Files of a running sandbox over HTTP (`GET`/`PUT /v1/sandboxes/{id}/files?path=`), and the
//! create-time `mounted_files` and `volumes` (validation and staging in the state directory).
//!
//! Memory stays bounded whatever the file size: a blocking thread does the file I/O
//! (`sandbox_runtime::files`, paths resolved inside the sandbox's root) and exchanges chunks of at most
//! [`CHUNK`] bytes with the connection through a channel of [`CHANNEL_DEPTH`] slots.

use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use futures_util::StreamExt as _;
use sandbox_proto::{quantity, ApiError, ErrorCode, FileInfo, MountedFile, VolumeSpec};
use sandbox_runtime::files::{FileError, SandboxFs, WriteOptions, CHUNK};
use sandbox_runtime::spec::{FileMount, VolumeMount};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use crate::error::{internal, HttpError};
use crate::manager::Manager;

/// Response header with the file's permission bits (octal, e.g. `0644`).
pub const MODE_HEADER: &str = "x-sandboxd-file-mode";

/// Chunks in flight between the connection and the file thread, each at most [`CHUNK`] bytes.
const CHANNEL_DEPTH: usize = 4;

/// How much of an upload's body is still read (and dropped) after the write failed, so that the client
/// sees the error answer; past this the connection is closed.
const DRAIN_LIMIT: usize = 64 << 20;

/// Total decoded size of all mounted files of one sandbox.
pub const MAX_MOUNTED_BYTES: usize = 16 << 20;
/// Mounted files per sandbox.
pub const MAX_MOUNTED_FILES: usize = 256;
/// Volumes per sandbox.
pub const MAX_VOLUMES: usize = 64;
/// Smallest volume.
pub const MIN_VOLUME_BYTES: u64 = 4096;
/// Body limit of `POST /v1/sandboxes` (mounted files travel base64-encoded in it).
pub const CREATE_BODY_LIMIT: usize = 32 << 20;

/// Paths no mount may cover: the kernel's file systems the sandbox's setup mounts itself.
const RESERVED: &[&str] = &["proc", "sys", "dev"];

// ------------------------------------------------------------------------------ errors

/// The API error for a file operation's failure.
pub fn file_error(e: FileError) -> ApiError {
    let errno = e.errno_name();
    let msg = e.to_string();
    match e {
        FileError::InvalidPath { .. } => ApiError::invalid_argument("path", msg),
        FileError::NotRunning => ApiError::new(ErrorCode::SandboxNotRunning, msg),
        FileError::NotFound { .. } => ApiError::new(ErrorCode::FileNotFound, msg),
        FileError::ReadOnly { .. } => ApiError::new(ErrorCode::FileReadOnly, msg)
            .with_details(serde_json::json!({ "errno": errno })),
        FileError::NoSpace { .. } => ApiError::new(ErrorCode::ResourceExhausted, msg)
            .with_details(serde_json::json!({ "resource": "disk", "errno": errno })),
        FileError::Aborted { .. } => ApiError::new(ErrorCode::InvalidRequest, msg),
        _ => ApiError::new(ErrorCode::FileError, msg)
            .with_details(serde_json::json!({ "errno": errno })),
    }
}

// ------------------------------------------------------------------------------ handlers

/// Query of both file routes.
#[derive(Debug, Default, Deserialize)]
pub struct FileQuery {
    path: Option<String>,
    mode: Option<String>,
    parents: Option<String>,
}

impl FileQuery {
    fn path(&self) -> Result<String, ApiError> {
        let p = self.path.clone().ok_or_else(|| {
            ApiError::invalid_argument("path", "the query parameter path is required")
        })?;
        // Checked here too, so that a bad path is refused before the sandbox is looked at.
        sandbox_runtime::files::normalize(&p).map_err(file_error)?;
        Ok(p)
    }
}

/// Parses `0644`, `644` or `0o644`.
fn parse_mode(field: &str, s: &str) -> Result<u32, ApiError> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o7777 && !digits.is_empty() => Ok(m),
        _ => Err(ApiError::invalid_argument(
            field,
            format!("invalid mode {s:?}: expected octal permission bits up to 7777, e.g. 0644"),
        )),
    }
}

fn parse_bool(field: &str, s: &str) -> Result<bool, ApiError> {
    match s {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(ApiError::invalid_argument(
            field,
            format!("invalid {field} {s:?}: expected true or false"),
        )),
    }
}

type FileQueryResult = Result<Query<FileQuery>, axum::extract::rejection::QueryRejection>;

fn query(q: FileQueryResult) -> Result<FileQuery, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e.body_text()))
}

/// A response body fed by the file thread, of a known length.
struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    len: u64,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|c| c.map(|r| r.map(hyper::body::Frame::data)))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.len)
    }
}

/// `GET /v1/sandboxes/{id}/files?path=`: the file's bytes, streamed.
pub async fn read(
    State(m): State<Arc<Manager>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    q: FileQueryResult,
) -> Result<Response, HttpError> {
    let q = query(q)?;
    let path = q.path()?;
    let (init, host_uid) = m.running_init(&id).await?;
    let (meta_tx, meta_rx) = oneshot::channel::<Result<(u64, u32), FileError>>();
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(CHANNEL_DEPTH);
    tokio::task::spawn_blocking(move || {
        let opened = SandboxFs::open(init, host_uid).and_then(|fs| fs.open_file(&path));
        let mut f = match opened {
            Ok(f) => f,
            Err(e) => {
                let _ = meta_tx.send(Err(e));
                return;
            }
        };
        if meta_tx.send(Ok((f.size, f.mode))).is_err() {
            return;
        }
        // Exactly the size announced: a file that grows meanwhile is cut there, one that shrinks ends
        // the response with an error (the client sees a truncated body, never a short "complete" one).
        let mut left = f.size;
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
            let mut buf = vec![0u8; want];
            let item = match f.file.read(&mut buf) {
                Ok(0) => Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file shrank while it was read",
                )),
                Ok(n) => {
                    buf.truncate(n);
                    left -= n as u64;
                    Ok(Bytes::from(buf))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                // The client went away (or the read failed): stop.
                return;
            }
        }
    });
    let (size, mode) = meta_rx
        .await
        .map_err(|e| internal("reading a file", e))?
        .map_err(file_error)?;
    let mut resp = Body::new(ChannelBody { rx, len: size }).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    if let Ok(v) = HeaderValue::from_str(&format!("{mode:04o}")) {
        h.insert(MODE_HEADER, v);
    }
    Ok(resp)
}

/// What the connection hands the file thread.
enum Chunk {
    Data(Bytes),
    /// The whole body arrived: the file may be published.
    End,
}

/// The upload as the file thread reads it. A channel that closes without [`Chunk::End`] (the client or
/// the request went away) is an error, so the write is abandoned rather than published short.
struct ChannelReader {
    rx: mpsc::Receiver<Chunk>,
    cur: Bytes,
    done: bool,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            if self.done {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Chunk::Data(b)) => self.cur = b,
                Some(Chunk::End) => self.done = true,
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the upload ended before its last byte",
                    ))
                }
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// `PUT /v1/sandboxes/{id}/files?path=&mode=&parents=`: the body becomes the file, atomically.
pub async fn write(
    State(m): State<Arc<Manager>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    q: FileQueryResult,
    body: Body,
) -> Result<impl IntoResponse, HttpError> {
    let q = query(q)?;
    let path = q.path()?;
    let mode = q
        .mode
        .as_deref()
        .map(|s| parse_mode("mode", s))
        .transpose()?;
    let parents = q
        .parents
        .as_deref()
        .map(|s| parse_bool("parents", s))
        .transpose()?
        .unwrap_or(true);
    let (init, host_uid) = m.running_init(&id).await?;
    let (tx, rx) = mpsc::channel::<Chunk>(CHANNEL_DEPTH);
    let shown = path.clone();
    let job = tokio::task::spawn_blocking(move || {
        let fs = SandboxFs::open(init, host_uid)?;
        let mut src = ChannelReader {
            rx,
            cur: Bytes::new(),
            done: false,
        };
        fs.write_file(&path, WriteOptions { mode, parents }, &mut src)
    });
    // Feeding the file thread. If it stops reading (it failed: a full disk, a read-only path), its error
    // is the answer, given once the rest of the body has been read and dropped (a client still sending
    // would not see an answer sent earlier), up to DRAIN_LIMIT. When this future is dropped (the client
    // went away), the channel closes without `End` and the write is abandoned.
    let mut stream = body.into_data_stream();
    let mut interrupted = None;
    let mut writer_gone = false;
    let mut drained = 0usize;
    while let Some(item) = stream.next().await {
        match item {
            Ok(b) if writer_gone => {
                drained += b.len();
                if drained > DRAIN_LIMIT {
                    break;
                }
            }
            Ok(b) if b.is_empty() => continue,
            Ok(b) => {
                if tx.send(Chunk::Data(b)).await.is_err() {
                    writer_gone = true;
                }
            }
            Err(e) => {
                interrupted = Some(e);
                break;
            }
        }
    }
    if interrupted.is_none() && !writer_gone {
        let _ = tx.send(Chunk::End).await;
    }
    drop(tx);
    let written = job.await.map_err(|e| internal("writing a file", e))?;
    let w = match (written, interrupted) {
        (Ok(w), _) => w,
        (Err(FileError::Aborted { .. }), Some(e)) => {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("the upload of {shown} was interrupted: {e}"),
            )
            .into())
        }
        (Err(e), _) => return Err(file_error(e).into()),
    };
    Ok((
        StatusCode::OK,
        Json(FileInfo {
            path: shown,
            size: w.size,
            mode: w.mode,
        }),
    ))
}

// ------------------------------------------------------------------------------ create-time mounts

/// Validated `mounted_files` and `volumes` of a create request.
#[derive(Debug, Default)]
pub struct MountPlan {
    files: Vec<PlannedFile>,
    volumes: Vec<VolumeMount>,
}

#[derive(Debug)]
struct PlannedFile {
    target: String,
    content: Vec<u8>,
    mode: u32,
}

impl MountPlan {
    /// True when the request has neither.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.volumes.is_empty()
    }
}

/// The normalized form of a mount path (`/a/b`), or `INVALID_ARGUMENT` naming `field`.
fn mount_target(field: &str, p: &str) -> Result<Vec<String>, ApiError> {
    let bad = |why: &str| ApiError::invalid_argument(field, format!("{field} {p:?}: {why}"));
    if !p.starts_with('/') {
        return Err(bad("must be an absolute path"));
    }
    if p.split('/').any(|c| c == "..") {
        return Err(bad("must not contain '..'"));
    }
    let comps = sandbox_runtime::files::normalize(p).map_err(|e| bad(&e.to_string()))?;
    match comps.first() {
        None => Err(bad("must not be /")),
        Some(first) if RESERVED.contains(&first.as_str()) => {
            Err(bad("must not be /proc, /sys, /dev or below them"))
        }
        Some(_) => Ok(comps),
    }
}

fn valid_volume_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Validates (and decodes) a create request's `mounted_files` and `volumes`. Every error is an
/// `INVALID_ARGUMENT` naming the field, e.g. `mounted_files[0].mount_path`.
pub fn validate_mounts(
    files: &[MountedFile],
    volumes: &[VolumeSpec],
) -> Result<MountPlan, ApiError> {
    if files.len() > MAX_MOUNTED_FILES {
        return Err(ApiError::invalid_argument(
            "mounted_files",
            format!("at most {MAX_MOUNTED_FILES} mounted files per sandbox"),
        ));
    }
    if volumes.len() > MAX_VOLUMES {
        return Err(ApiError::invalid_argument(
            "volumes",
            format!("at most {MAX_VOLUMES} volumes per sandbox"),
        ));
    }
    let mut plan = MountPlan::default();
    // (normalized components, field, is a file)
    let mut targets: Vec<(Vec<String>, String, bool)> = Vec::new();
    let mut total = 0usize;
    for (i, f) in files.iter().enumerate() {
        let field = format!("mounted_files[{i}].mount_path");
        let comps = mount_target(&field, &f.mount_path)?;
        let content = base64::engine::general_purpose::STANDARD
            .decode(f.file_content.as_bytes())
            .map_err(|e| {
                ApiError::invalid_argument(
                    format!("mounted_files[{i}].file_content"),
                    format!("mounted_files[{i}].file_content is not valid base64: {e}"),
                )
            })?;
        total += content.len();
        if total > MAX_MOUNTED_BYTES {
            return Err(ApiError::invalid_argument(
                "mounted_files",
                "the mounted files' contents exceed 16 MiB in all",
            ));
        }
        let mode = f.mode.unwrap_or(0o444);
        if mode > 0o7777 {
            return Err(ApiError::invalid_argument(
                format!("mounted_files[{i}].mode"),
                format!(
                    "mounted_files[{i}].mode must be permission bits (at most 0o7777), got {mode}"
                ),
            ));
        }
        plan.files.push(PlannedFile {
            target: format!("/{}", comps.join("/")),
            content,
            mode,
        });
        targets.push((comps, field, true));
    }
    let mut names: Vec<&str> = Vec::new();
    for (i, v) in volumes.iter().enumerate() {
        if !valid_volume_name(&v.name) {
            return Err(ApiError::invalid_argument(
                format!("volumes[{i}].name"),
                format!(
                    "invalid volume name {:?}: 1-63 characters of [A-Za-z0-9_.-]",
                    v.name
                ),
            ));
        }
        if names.contains(&v.name.as_str()) {
            return Err(ApiError::invalid_argument(
                format!("volumes[{i}].name"),
                format!("the volume name {:?} is used twice", v.name),
            ));
        }
        names.push(&v.name);
        let field = format!("volumes[{i}].mount_path");
        let comps = mount_target(&field, &v.mount_path)?;
        let size_field = format!("volumes[{i}].size");
        let size = quantity::parse_memory(&size_field, &v.size)?;
        if size < MIN_VOLUME_BYTES {
            return Err(ApiError::invalid_argument(
                &size_field,
                format!("{size_field} must be at least 4Ki, got {:?}", v.size),
            ));
        }
        plan.volumes.push(VolumeMount {
            target: format!("/{}", comps.join("/")),
            size_bytes: size,
        });
        targets.push((comps, field, false));
    }
    // No two mounts at one path; nothing below a mounted file.
    for (a, (ca, fa, _)) in targets.iter().enumerate() {
        for (cb, _, _) in targets.iter().take(a) {
            if ca == cb {
                return Err(ApiError::invalid_argument(
                    fa,
                    format!("{fa}: /{} is mounted twice", ca.join("/")),
                ));
            }
        }
        for (cb, fb, b_is_file) in &targets {
            if *b_is_file && ca.len() > cb.len() && ca.starts_with(cb) {
                return Err(ApiError::invalid_argument(
                    fa,
                    format!("{fa}: /{} is below the mounted file of {fb}", ca.join("/")),
                ));
            }
        }
    }
    Ok(plan)
}

/// Writes the mounted files' contents into `dir/mounted-files/` (mode as asked, owned by the sandbox's
/// root) and answers what the sandbox's spec lists.
pub async fn stage_mounts(
    dir: &Path,
    plan: &MountPlan,
    host_uid: u32,
) -> Result<(Vec<FileMount>, Vec<VolumeMount>), ApiError> {
    let volumes = plan.volumes.clone();
    if plan.files.is_empty() {
        return Ok((Vec::new(), volumes));
    }
    let base = dir.join("mounted-files");
    let jobs: Vec<(PathBuf, String, Vec<u8>, u32)> = plan
        .files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            (
                base.join(i.to_string()),
                f.target.clone(),
                f.content.clone(),
                f.mode,
            )
        })
        .collect();
    let files = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<FileMount>> {
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
        std::fs::DirBuilder::new().mode(0o700).create(&base)?;
        let mut out = Vec::with_capacity(jobs.len());
        for (source, target, content, mode) in jobs {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&source)?;
            f.write_all(&content)?;
            std::os::unix::fs::fchown(&f, Some(host_uid), Some(host_uid))?;
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            out.push(FileMount { source, target });
        }
        Ok(out)
    })
    .await
    .map_err(|e| internal("staging mounted files", e))?
    .map_err(|e| {
        if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
            ApiError::new(
                ErrorCode::ResourceExhausted,
                format!("disk full while staging mounted files: {e}"),
            )
            .with_details(serde_json::json!({ "resource": "disk" }))
        } else {
            internal("staging mounted files", e)
        }
    })?;
    Ok((files, volumes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: &str, content: &str) -> MountedFile {
        MountedFile {
            mount_path: p.into(),
            file_content: content.into(),
            mode: None,
        }
    }

    fn vol(n: &str, p: &str, s: &str) -> VolumeSpec {
        VolumeSpec {
            name: n.into(),
            mount_path: p.into(),
            size: s.into(),
        }
    }

    fn field(e: ApiError) -> String {
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{e:?}");
        e.details.expect("details")["field"]
            .as_str()
            .expect("field")
            .to_owned()
    }

    #[test]
    fn valid_mounts() {
        let p = validate_mounts(
            &[file("/etc/app.conf", "aGVsbG8="), file("/data/x/./y", "")],
            &[
                vol("scratch", "/data", "64Mi"),
                vol("b", "/var/cache/b/", "4Ki"),
            ],
        )
        .unwrap();
        assert_eq!(p.files[0].content, b"hello");
        assert_eq!(p.files[0].mode, 0o444);
        assert_eq!(p.files[1].target, "/data/x/y");
        assert_eq!(p.volumes[0].size_bytes, 64 << 20);
        assert_eq!(p.volumes[1].target, "/var/cache/b");
    }

    #[test]
    fn invalid_mounts_name_the_field() {
        let f = |files: &[MountedFile], vols: &[VolumeSpec]| {
            field(validate_mounts(files, vols).unwrap_err())
        };
        assert_eq!(f(&[file("etc/x", "")], &[]), "mounted_files[0].mount_path");
        assert_eq!(f(&[file("/", "")], &[]), "mounted_files[0].mount_path");
        assert_eq!(
            f(&[file("/a/../b", "")], &[]),
            "mounted_files[0].mount_path"
        );
        for p in ["/proc", "/sys/x", "/dev/null", "//proc/x"] {
            assert_eq!(
                f(&[file("/ok", ""), file(p, "")], &[]),
                "mounted_files[1].mount_path",
                "{p}"
            );
        }
        assert_eq!(
            f(&[file("/a", "not base64!")], &[]),
            "mounted_files[0].file_content"
        );
        let mut m = file("/a", "");
        m.mode = Some(0o10000);
        assert_eq!(f(&[m], &[]), "mounted_files[0].mode");
        assert_eq!(
            f(&[file("/a", ""), file("/a/", "")], &[]),
            "mounted_files[1].mount_path"
        );
        assert_eq!(
            f(&[file("/a", "")], &[vol("v", "/a/b", "1Mi")]),
            "volumes[0].mount_path"
        );
        assert_eq!(
            f(&[], &[vol("v", "/a", "1Mi"), vol("v", "/b", "1Mi")]),
            "volumes[1].name"
        );
        assert_eq!(f(&[], &[vol("bad/name", "/a", "1Mi")]), "volumes[0].name");
        assert_eq!(f(&[], &[vol("", "/a", "1Mi")]), "volumes[0].name");
        assert_eq!(f(&[], &[vol("v", "/a", "12Qi")]), "volumes[0].size");
        assert_eq!(f(&[], &[vol("v", "/a", "100")]), "volumes[0].size");
        assert_eq!(
            f(&[], &[vol("v", "/a", "1Mi"), vol("w", "/a", "1Mi")]),
            "volumes[1].mount_path"
        );
        let big = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 9 << 20]);
        assert_eq!(
            f(&[file("/a", &big), file("/b", &big)], &[]),
            "mounted_files"
        );
    }

    #[test]
    fn modes_and_errors() {
        assert_eq!(parse_mode("mode", "0644").unwrap(), 0o644);
        assert_eq!(parse_mode("mode", "755").unwrap(), 0o755);
        assert_eq!(parse_mode("mode", "0o4755").unwrap(), 0o4755);
        for bad in ["", "0o", "8", "77777", "rw"] {
            assert!(parse_mode("mode", bad).is_err(), "{bad}");
        }
        let e = file_error(FileError::IsDirectory { path: "/x".into() });
        assert_eq!(e.code, ErrorCode::FileError);
        assert_eq!(e.details.unwrap()["errno"], "EISDIR");
        let e = file_error(FileError::NoSpace {
            path: "/x".into(),
            errno: nix::errno::Errno::ENOSPC,
        });
        assert_eq!(e.code, ErrorCode::ResourceExhausted);
        assert_eq!(e.details.unwrap()["resource"], "disk");
    }
}
