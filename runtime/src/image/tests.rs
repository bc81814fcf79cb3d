//! Image store tests. They run as root: real chown, mknod, xattrs (trusted.* included).

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use tar::{EntryType, Header};

use super::unpack::{unpack_layer, Compression};
use super::{ImageError, ImageStore};

pub(super) fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub(super) fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

pub(super) fn zstd_compress(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 1).unwrap()
}

/// A tar layer built entry by entry, with raw (unvalidated) names so hostile entries can be expressed.
pub(super) struct Layer {
    b: tar::Builder<Vec<u8>>,
}

impl Layer {
    pub(super) fn new() -> Self {
        Self {
            b: tar::Builder::new(Vec::new()),
        }
    }

    pub(super) fn raw(
        &mut self,
        kind: EntryType,
        name: &[u8],
        link: Option<&[u8]>,
        data: &[u8],
        mode: u32,
        ids: (u64, u64),
    ) {
        let mut h = Header::new_gnu();
        {
            let gnu = h.as_gnu_mut().unwrap();
            assert!(name.len() < 100);
            gnu.name[..name.len()].copy_from_slice(name);
            if let Some(l) = link {
                assert!(l.len() < 100);
                gnu.linkname[..l.len()].copy_from_slice(l);
            }
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(ids.0);
        h.set_gid(ids.1);
        h.set_mtime(1_000_000_000);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
    }

    pub(super) fn dir(&mut self, name: &str) -> &mut Self {
        self.raw(
            EntryType::Directory,
            name.as_bytes(),
            None,
            b"",
            0o755,
            (0, 0),
        );
        self
    }

    pub(super) fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.raw(
            EntryType::Regular,
            name.as_bytes(),
            None,
            data,
            0o644,
            (0, 0),
        );
        self
    }

    pub(super) fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(
            EntryType::Symlink,
            name.as_bytes(),
            Some(target.as_bytes()),
            b"",
            0o777,
            (0, 0),
        );
        self
    }

    pub(super) fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(
            EntryType::Link,
            name.as_bytes(),
            Some(target.as_bytes()),
            b"",
            0o644,
            (0, 0),
        );
        self
    }

    /// A PAX extended header applying to the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            let body_len = k.len() + v.len() + 3; // ' ', '=', '\n'
            let mut len = body_len + body_len.to_string().len();
            if len.to_string().len() != body_len.to_string().len() {
                len += 1;
            }
            data.extend_from_slice(format!("{len} {k}=").as_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        self.raw(
            EntryType::XHeader,
            b"././@PaxHeader",
            None,
            &data,
            0o644,
            (0, 0),
        );
        self
    }

    pub(super) fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

pub(super) fn base_layer() -> Vec<u8> {
    let mut l = Layer::new();
    l.dir("./")
        .dir("bin")
        .file("bin/tool", b"#!/bin/sh\necho base\n")
        .symlink("bin/sh", "tool")
        .dir("etc")
        .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        .file("etc/hostname", b"base\n")
        .dir("var/lib/data")
        .file("var/lib/data/old", b"old");
    l.finish()
}

pub(super) fn app_layer(tag: &str) -> Vec<u8> {
    let mut l = Layer::new();
    l.dir("app").file("app/id", tag.as_bytes());
    l.finish()
}

/// Writes an OCI layout: layers (uncompressed tar, compression) -> blobs; returns the manifest digest.
fn write_oci(
    dir: &Path,
    layers: &[(Vec<u8>, Compression)],
    ref_name: Option<&str>,
    cmd: &str,
) -> String {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> (String, usize) {
        let d = sha(bytes);
        fs::write(blobs.join(d.trim_start_matches("sha256:")), bytes).unwrap();
        (d, bytes.len())
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, c) in layers {
        diff_ids.push(sha(tar));
        let (blob, mt) = match c {
            Compression::None => (tar.clone(), "application/vnd.oci.image.layer.v1.tar"),
            Compression::Gzip => (
                gzip(tar),
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            ),
            Compression::Zstd => (
                zstd_compress(tar),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
        };
        let (d, size) = put(&blob);
        descs.push(serde_json::json!({"mediaType": mt, "digest": d, "size": size}));
    }
    let config = serde_json::json!({
        "architecture": super::source::host_arch(), "os": "linux", "created": "2024-01-02T03:04:05Z",
        "config": {"Env": ["PATH=/bin", "A=b"], "Cmd": [cmd], "Entrypoint": ["/bin/sh", "-c"], "WorkingDir": "/app", "User": "1000:1000"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (cd, cs) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": descs,
    });
    let (md, ms) = put(&serde_json::to_vec(&manifest).unwrap());
    let mut desc = serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms});
    if let Some(r) = ref_name {
        desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": r});
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [desc]});
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    md
}

/// Packs a directory into a tar file (the OCI-tarball case).
fn tar_dir(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(fs::File::create(out).unwrap());
    b.append_dir_all(".", dir).unwrap();
    b.finish().unwrap();
}

/// Writes a `docker save`-style tarball (legacy layout, first layer plain tar, the others gzip).
fn write_docker(out: &Path, layers: &[Vec<u8>], tags: &[&str], cmd: &str, gz: bool) {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha(l)).collect();
    let config = serde_json::json!({
        "architecture": super::source::host_arch(), "os": "linux", "created": "2024-01-02T03:04:05Z",
        "config": {"Env": ["PATH=/bin", "A=b"], "Cmd": [cmd], "Entrypoint": ["/bin/sh", "-c"], "WorkingDir": "/app", "User": "1000:1000"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_name = format!("{}.json", sha(&config).trim_start_matches("sha256:"));
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    };
    let mut paths = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let name = format!("layer{i}/layer.tar");
        let data = if i > 0 { gzip(l) } else { l.clone() };
        add(&name, &data);
        paths.push(name);
    }
    add(&config_name, &config);
    let manifest = serde_json::json!([{"Config": config_name, "RepoTags": tags, "Layers": paths}]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    let bytes = b.into_inner().unwrap();
    fs::write(out, if gz { gzip(&bytes) } else { bytes }).unwrap();
}

fn norm(s: &str) -> Result<String, String> {
    if s.is_empty() || s.contains(' ') {
        return Err(format!("bad name {s:?}"));
    }
    Ok(if s.contains(':') {
        format!("test.local/{s}")
    } else {
        format!("test.local/{s}:latest")
    })
}

pub(super) fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sandboxd-image-test")
        .tempdir()
        .unwrap()
}

pub(super) fn files_under(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.insert(p);
        }
    }
    out
}

fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: `p` and `n` are NUL-terminated, `buf` is writable for `buf.len()` bytes; none is retained.
    let rc = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc < 0 {
        return None;
    }
    buf.truncate(usize::try_from(rc).ok()?);
    Some(buf)
}

pub(super) fn count(dir: &Path) -> usize {
    fs::read_dir(dir).map(|r| r.count()).unwrap_or(0)
}

#[test]
fn import_oci_layout_dir() {
    let t = tmp();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let src = t.path().join("oci");
    let md = write_oci(
        &src,
        &[
            (base_layer(), Compression::Gzip),
            (app_layer("one"), Compression::Zstd),
        ],
        Some("one:1.0"),
        "run",
    );
    let img = store.import(&src, None, &norm).unwrap();
    assert_eq!(img.digest, md);
    assert_eq!(img.references, vec!["test.local/one:1.0".to_string()]);
    assert_eq!(img.layers, vec![sha(&base_layer()), sha(&app_layer("one"))]);
    assert_eq!(
        img.platform,
        format!("linux/{}", super::source::host_arch())
    );
    assert_eq!(img.created.as_deref(), Some("2024-01-02T03:04:05Z"));
    assert_eq!(img.config.cmd, vec!["run"]);
    assert_eq!(img.config.entrypoint, vec!["/bin/sh", "-c"]);
    assert_eq!(img.config.env, vec!["PATH=/bin", "A=b"]);
    assert_eq!(img.config.working_dir, "/app");
    assert_eq!(img.config.user, "1000:1000");
    assert!(img.size > 0);

    let dirs = store.layer_dirs(&img);
    assert_eq!(dirs.len(), 2);
    assert_eq!(fs::read(dirs[0].join("etc/hostname")).unwrap(), b"base\n");
    assert_eq!(
        fs::read_link(dirs[0].join("bin/sh")).unwrap(),
        Path::new("tool")
    );
    assert_eq!(fs::read(dirs[1].join("app/id")).unwrap(), b"one");

    // Lookups: reference, digest, digest prefix.
    assert_eq!(store.resolve("test.local/one:1.0").unwrap().digest, md);
    assert_eq!(store.resolve(&md).unwrap().digest, md);
    assert_eq!(store.resolve(&md[..7 + 12]).unwrap().digest, md);
    assert!(matches!(
        store.resolve(&md[..7 + 6]),
        Err(ImageError::NotFound(_))
    ));
    assert!(
        matches!(store.resolve("nope:latest"), Err(ImageError::NotFound(ref n)) if n == "nope:latest")
    );
    let list = store.list().unwrap();
    assert_eq!(list.len(), 1);

    // Explicit reference; re-import is idempotent and adds the name.
    let again = store.import(&src, Some("other/name:x"), &norm).unwrap();
    assert_eq!(again.digest, md);
    assert_eq!(
        again.references,
        vec!["other/name:x".to_string(), "test.local/one:1.0".to_string()]
    );
    assert_eq!(store.list().unwrap().len(), 1);

    // Reopening keeps everything.
    drop(store);
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    assert_eq!(store.resolve("other/name:x").unwrap().digest, md);
    assert!(store.layer_dirs(&again).iter().all(|d| d.is_dir()));
}

#[test]
fn import_docker_archive_and_oci_tarball() {
    let t = tmp();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let layers = vec![base_layer(), app_layer("dock")];

    let dock = t.path().join("docker.tar.gz");
    write_docker(&dock, &layers, &["dock:v1", "dock:latest"], "serve", true);
    let d = store.import(&dock, None, &norm).unwrap();
    assert_eq!(
        d.references,
        vec![
            "test.local/dock:latest".to_string(),
            "test.local/dock:v1".to_string()
        ]
    );
    assert_eq!(d.layers, layers.iter().map(|l| sha(l)).collect::<Vec<_>>());
    assert_eq!(d.config.cmd, vec!["serve"]);
    // The synthesised manifest is stored as a blob and names the layer blobs.
    let manifest = fs::read(t.path().join("store/blobs/sha256").join(&d.digest[7..])).unwrap();
    assert_eq!(sha(&manifest), d.digest);
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(
        m["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar"
    );
    assert_eq!(
        m["layers"][1]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let dirs = store.layer_dirs(&d);
    assert_eq!(fs::read(dirs[1].join("app/id")).unwrap(), b"dock");

    // The same docker archive, uncompressed, under an explicit name: same image.
    let plain = t.path().join("docker.tar");
    write_docker(&plain, &layers, &["dock:v1"], "serve", false);
    assert_eq!(
        store.import(&plain, Some("x/y:z"), &norm).unwrap().digest,
        d.digest
    );

    // OCI layout tarball of the same layers: same layer dirs, reused.
    let oci = t.path().join("oci");
    let md = write_oci(
        &oci,
        &[
            (layers[0].clone(), Compression::Gzip),
            (layers[1].clone(), Compression::None),
        ],
        Some("ocitar"),
        "serve",
    );
    let oci_tar = t.path().join("oci.tar");
    tar_dir(&oci, &oci_tar);
    let o = store.import(&oci_tar, None, &norm).unwrap();
    assert_eq!(o.digest, md);
    assert_eq!(o.references, vec!["test.local/ocitar:latest".to_string()]);
    assert_eq!(o.layers, d.layers);
    assert_eq!(store.layer_dirs(&o), dirs);
    assert_eq!(count(&t.path().join("store/layers/sha256")), 2);
    // Extraction leftovers are gone.
    assert_eq!(count(&t.path().join("store/tmp")), 0);
    assert_eq!(count(&t.path().join("store/ingest")), 0);

    // Gzip'd OCI tarball too.
    let oci_tgz = t.path().join("oci.tgz");
    fs::write(&oci_tgz, gzip(&fs::read(&oci_tar).unwrap())).unwrap();
    assert_eq!(
        store.import(&oci_tgz, Some("gz:1"), &norm).unwrap().digest,
        md
    );

    // Names the normaliser refuses are an error naming them.
    write_docker(&plain, &layers, &["bad name"], "serve", false);
    let err = store.import(&plain, None, &norm).unwrap_err();
    assert!(err.to_string().contains("bad name"), "{err}");
    // Not an image at all.
    let junk = t.path().join("junk");
    fs::create_dir(&junk).unwrap();
    assert!(matches!(
        store.import(&junk, Some("j:1"), &norm),
        Err(ImageError::Invalid { .. })
    ));
}

#[test]
fn shared_layer_unpacked_once() {
    let t = tmp();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let a = t.path().join("a");
    let b = t.path().join("b");
    write_oci(
        &a,
        &[
            (base_layer(), Compression::Gzip),
            (app_layer("a"), Compression::Gzip),
        ],
        None,
        "a",
    );
    // Same base layer, differently compressed: same diff_id, so the same unpacked directory.
    write_oci(
        &b,
        &[
            (base_layer(), Compression::None),
            (app_layer("b"), Compression::Gzip),
        ],
        None,
        "b",
    );
    let ia = store.import(&a, Some("a:1"), &norm).unwrap();
    let base = store.layer_dirs(&ia)[0].clone();
    fs::write(base.join("marker"), b"x").unwrap();
    let ino = fs::metadata(&base).unwrap().ino();
    let ib = store.import(&b, Some("b:1"), &norm).unwrap();
    assert_ne!(ia.digest, ib.digest);
    assert_eq!(store.layer_dirs(&ib)[0], base);
    assert_eq!(fs::metadata(&base).unwrap().ino(), ino);
    assert!(
        base.join("marker").exists(),
        "shared layer was unpacked again"
    );
    assert_eq!(count(&t.path().join("store/layers/sha256")), 3);
}

#[test]
fn digest_mismatch_commits_nothing() {
    let t = tmp();
    let store_dir = t.path().join("store");
    let store = ImageStore::open(&store_dir).unwrap();

    // A layer blob whose content does not match its name/descriptor.
    let src = t.path().join("oci");
    write_oci(
        &src,
        &[
            (base_layer(), Compression::Gzip),
            (app_layer("m"), Compression::Gzip),
        ],
        None,
        "m",
    );
    let blob_name = sha(&gzip(&app_layer("m")))[7..].to_string();
    let evil = gzip(&app_layer("evil"));
    fs::write(src.join("blobs/sha256").join(&blob_name), &evil).unwrap();
    let err = store.import(&src, Some("m:1"), &norm).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert_eq!(
        count(&store_dir.join("blobs/sha256")),
        0,
        "blobs of a failed import stay"
    );
    assert_eq!(count(&store_dir.join("layers/sha256")), 0);
    assert_eq!(count(&store_dir.join("images")), 0);
    assert_eq!(count(&store_dir.join("ingest")), 0);
    assert!(store.list().unwrap().is_empty());

    // A config whose diff_id does not match the layer: the half-unpacked layer is removed.
    let src2 = t.path().join("oci2");
    write_oci(&src2, &[(base_layer(), Compression::Gzip)], None, "m");
    let idx: serde_json::Value =
        serde_json::from_slice(&fs::read(src2.join("index.json")).unwrap()).unwrap();
    let mhex = idx["manifests"][0]["digest"].as_str().unwrap()[7..].to_string();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(src2.join("blobs/sha256").join(&mhex)).unwrap()).unwrap();
    let chex = manifest["config"]["digest"].as_str().unwrap()[7..].to_string();
    let mut config: serde_json::Value =
        serde_json::from_slice(&fs::read(src2.join("blobs/sha256").join(&chex)).unwrap()).unwrap();
    config["rootfs"]["diff_ids"][0] = serde_json::json!(sha(b"something else"));
    let cbytes = serde_json::to_vec(&config).unwrap();
    fs::write(src2.join("blobs/sha256").join(&sha(&cbytes)[7..]), &cbytes).unwrap();
    manifest["config"]["digest"] = serde_json::json!(sha(&cbytes));
    manifest["config"]["size"] = serde_json::json!(cbytes.len());
    let mbytes = serde_json::to_vec(&manifest).unwrap();
    fs::write(src2.join("blobs/sha256").join(&sha(&mbytes)[7..]), &mbytes).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(&mbytes), "size": mbytes.len()}]});
    fs::write(src2.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    let err = store.import(&src2, Some("m:2"), &norm).unwrap_err();
    match &err {
        ImageError::DigestMismatch { what, .. } => assert!(what.contains("diff_id"), "{err}"),
        other => panic!("unexpected {other}"),
    }
    assert_eq!(count(&store_dir.join("layers/sha256")), 0);
    assert_eq!(count(&store_dir.join("blobs/sha256")), 0);
    assert_eq!(count(&store_dir.join("images")), 0);

    // Missing blob: Invalid naming the file.
    fs::remove_file(src.join("blobs/sha256").join(&blob_name)).unwrap();
    let err = store.import(&src, Some("m:1"), &norm).unwrap_err();
    assert!(
        matches!(&err, ImageError::Invalid { what, reason } if what.contains(&blob_name) && reason == "missing"),
        "{err}"
    );
}

/// Unpacks `layer` into `<tmp>/layer` and returns the error; `<tmp>/outside` is a sentinel directory that must
/// stay empty, and nothing outside the layer root may appear.
fn unpack_hostile(layer: Vec<u8>) -> (ImageError, tempfile::TempDir) {
    let t = tmp();
    let root = t.path().join("layer");
    let outside = t.path().join("outside");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&outside).unwrap();
    let blob = t.path().join("blob");
    fs::write(&blob, &layer).unwrap();
    let before: BTreeSet<PathBuf> = files_under(t.path())
        .into_iter()
        .filter(|p| !p.starts_with(&root))
        .collect();
    let err =
        unpack_layer(&blob, Compression::None, &root, &sha(&layer), "test layer").unwrap_err();
    let after: BTreeSet<PathBuf> = files_under(t.path())
        .into_iter()
        .filter(|p| !p.starts_with(&root))
        .collect();
    assert_eq!(
        before, after,
        "something was written outside the layer root"
    );
    assert_eq!(count(&outside), 0);
    assert!(!t.path().join("x").exists());
    (err, t)
}

fn assert_hostile(err: &ImageError, entry: &str) {
    match err {
        ImageError::HostileEntry { entry: e, .. } => assert_eq!(e, entry, "{err}"),
        other => panic!("expected HostileEntry for {entry:?}, got {other}"),
    }
    assert!(err.to_string().contains(entry));
}

#[test]
fn hostile_traversal() {
    let mut l = Layer::new();
    l.file("ok", b"fine");
    l.raw(EntryType::Regular, b"../../x", None, b"evil", 0o644, (0, 0));
    let (err, _t) = unpack_hostile(l.finish());
    assert_hostile(&err, "../../x");

    let mut l = Layer::new();
    l.raw(
        EntryType::Regular,
        b"a/../../x",
        None,
        b"evil",
        0o644,
        (0, 0),
    );
    let (err, _t) = unpack_hostile(l.finish());
    assert_hostile(&err, "a/../../x");
}

#[test]
fn hostile_absolute_symlink() {
    // Into a sentinel directory next to the layer root.
    let t = tmp();
    let root = t.path().join("layer");
    let sentinel = t.path().join("outside");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&sentinel).unwrap();
    let mut l = Layer::new();
    l.symlink("evil", sentinel.to_str().unwrap());
    l.file("evil/passwd", b"pwned");
    let layer2 = l.finish();
    let blob = t.path().join("blob");
    fs::write(&blob, &layer2).unwrap();
    let err = unpack_layer(&blob, Compression::None, &root, &sha(&layer2), "t").unwrap_err();
    assert_hostile(&err, "evil/passwd");
    assert!(err.to_string().contains("symlink"), "{err}");
    assert_eq!(count(&sentinel), 0);

    // And the classic /etc one, with a name that cannot exist there.
    let probe_name = format!("sandboxd-test-{}", std::process::id());
    let mut l = Layer::new();
    l.symlink("evil", "/etc");
    l.file(&format!("evil/{probe_name}"), b"pwned");
    let (err, _t) = unpack_hostile(l.finish());
    assert_hostile(&err, &format!("evil/{probe_name}"));
    assert!(!Path::new("/etc").join(&probe_name).exists());

    let mut l = Layer::new();
    l.symlink("evil", "/etc");
    l.file("evil/passwd", b"pwned");
    let passwd = fs::read("/etc/passwd").unwrap();
    let (err, _t) = unpack_hostile(l.finish());
    assert_hostile(&err, "evil/passwd");
    assert_eq!(fs::read("/etc/passwd").unwrap(), passwd);
}

#[test]
fn hostile_relative_symlink_escape() {
    let mut l = Layer::new();
    l.dir("d");
    l.symlink("d/a", "../../..");
    l.file("d/a/x", b"pwned");
    let (err, t) = unpack_hostile(l.finish());
    assert_hostile(&err, "d/a/x");
    // The symlink itself was created (it is only data) and still points where the layer said.
    assert_eq!(
        fs::read_link(t.path().join("layer/d/a")).unwrap(),
        Path::new("../../..")
    );

    let mut l = Layer::new();
    l.symlink("a", "../../..");
    l.file("a/x", b"pwned");
    let (err, _t) = unpack_hostile(l.finish());
    assert_hostile(&err, "a/x");

    // A symlinked directory component is not written through even when it stays inside the root.
    let mut l = Layer::new();
    l.dir("real");
    l.symlink("link", "real");
    l.file("link/f", b"x");
    let (err, _t) = unpack_hostile(l.finish());
    assert_hostile(&err, "link/f");
}

#[test]
fn hostile_hardlinks() {
    let mut l = Layer::new();
    l.hardlink("h", "/etc/passwd");
    let (err, _t) = unpack_hostile(l.finish());
    assert_hostile(&err, "h");

    let mut l = Layer::new();
    l.hardlink("h", "../x");
    let (err, _t) = unpack_hostile(l.finish());
    assert_hostile(&err, "h");

    // Through a symlink to a file outside.
    let mut l = Layer::new();
    l.symlink("s", "/etc");
    l.hardlink("h", "s/passwd");
    let (err, _t) = unpack_hostile(l.finish());
    assert_hostile(&err, "h");

    // To a symlink (not a regular file).
    let mut l = Layer::new();
    l.symlink("s", "/etc/passwd");
    l.hardlink("h", "s");
    let (err, _t) = unpack_hostile(l.finish());
    assert_hostile(&err, "h");
}

#[test]
fn hostile_whiteouts() {
    for name in ["d/.wh.../x", ".wh...", "d/.wh..", ".wh../x", "d/.wh."] {
        let mut l = Layer::new();
        l.dir("d");
        l.raw(
            EntryType::Regular,
            name.as_bytes(),
            None,
            b"",
            0o644,
            (0, 0),
        );
        let (err, _t) = unpack_hostile(l.finish());
        assert_hostile(&err, name);
    }
}

/// Unpacks `layer` into a fresh directory and returns it.
fn unpack_ok(layer: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let t = tmp();
    let root = t.path().join("layer");
    fs::create_dir(&root).unwrap();
    let blob = t.path().join("blob");
    fs::write(&blob, layer).unwrap();
    unpack_layer(&blob, Compression::None, &root, &sha(layer), "t").unwrap();
    (t, root)
}

#[test]
fn metadata_links_and_devices() {
    // A v2 file capability blob granting cap_net_raw (bit 13) permitted+effective.
    let cap: Vec<u8> = vec![
        1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let mut l = Layer::new();
    l.raw(EntryType::Directory, b"./", None, b"", 0o755, (0, 0));
    l.raw(EntryType::Directory, b"ro", None, b"", 0o555, (12, 34));
    l.raw(EntryType::Regular, b"ro/suid", None, b"bin", 0o4755, (0, 0));
    l.raw(
        EntryType::Regular,
        b"ro/sgid",
        None,
        b"bin",
        0o2711,
        (1000, 1000),
    );
    l.pax(&[
        ("SCHILY.xattr.security.capability", &cap),
        ("SCHILY.xattr.user.note", b"hi"),
        ("SCHILY.xattr.trusted.evil", b"1"),
    ]);
    l.raw(EntryType::Regular, b"ro/ping", None, b"ping", 0o755, (0, 0));
    l.raw(
        EntryType::Link,
        b"ro/ping2",
        Some(b"/ro/ping"),
        b"",
        0o755,
        (0, 0),
    );
    l.raw(
        EntryType::Symlink,
        b"abs",
        Some(b"/etc/passwd"),
        b"",
        0o777,
        (5, 6),
    );
    l.raw(EntryType::Fifo, b"fifo", None, b"", 0o640, (7, 8));
    l.raw(EntryType::Char, b"null", None, b"", 0o666, (0, 0));
    l.raw(EntryType::Block, b"sda", None, b"", 0o660, (0, 0));
    // Later entries override earlier ones.
    l.raw(EntryType::Regular, b"over", None, b"first", 0o644, (0, 0));
    l.raw(
        EntryType::Symlink,
        b"over",
        Some(b"target"),
        b"",
        0o777,
        (0, 0),
    );
    l.raw(EntryType::Directory, b"dir2file", None, b"", 0o755, (0, 0));
    l.raw(
        EntryType::Regular,
        b"dir2file/inner",
        None,
        b"x",
        0o644,
        (0, 0),
    );
    l.raw(
        EntryType::Regular,
        b"dir2file",
        None,
        b"now a file",
        0o600,
        (0, 0),
    );
    let (_t, root) = unpack_ok(&l.finish());

    let m = fs::metadata(root.join("ro")).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (12, 34, 0o555));
    assert_eq!(m.mtime(), 1_000_000_000);
    let m = fs::metadata(root.join("ro/suid")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o4755);
    let m = fs::metadata(root.join("ro/sgid")).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1000, 1000, 0o2711));
    assert_eq!(m.mtime(), 1_000_000_000);
    assert_eq!(
        get_xattr(&root.join("ro/ping"), "security.capability").as_deref(),
        Some(cap.as_slice())
    );
    assert_eq!(
        get_xattr(&root.join("ro/ping"), "user.note").as_deref(),
        Some(b"hi".as_slice())
    );
    assert_eq!(get_xattr(&root.join("ro/ping"), "trusted.evil"), None);
    assert_eq!(
        fs::metadata(root.join("ro/ping")).unwrap().ino(),
        fs::metadata(root.join("ro/ping2")).unwrap().ino()
    );
    let m = fs::symlink_metadata(root.join("abs")).unwrap();
    assert!(m.file_type().is_symlink());
    assert_eq!((m.uid(), m.gid(), m.mtime()), (5, 6, 1_000_000_000));
    assert_eq!(
        fs::read_link(root.join("abs")).unwrap(),
        Path::new("/etc/passwd")
    );
    let m = fs::symlink_metadata(root.join("fifo")).unwrap();
    assert!(m.file_type().is_fifo());
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (7, 8, 0o640));
    // Devices are skipped.
    assert!(fs::symlink_metadata(root.join("null")).is_err());
    assert!(fs::symlink_metadata(root.join("sda")).is_err());
    assert_eq!(
        fs::read_link(root.join("over")).unwrap(),
        Path::new("target")
    );
    assert_eq!(fs::read(root.join("dir2file")).unwrap(), b"now a file");
    assert_eq!(
        fs::metadata(root).unwrap().permissions().mode() & 0o7777,
        0o755
    );
}

#[test]
fn whiteouts_converted_to_overlay_format() {
    let mut l = Layer::new();
    l.dir("etc")
        .file("etc/.wh.passwd", b"")
        .dir("var")
        .file("var/.wh..wh..opq", b"")
        .file("var/new", b"n")
        .file("gone/.wh.deep", b"")
        .file(".wh..wh.plnk", b"");
    let (_t, root) = unpack_ok(&l.finish());
    let m = fs::symlink_metadata(root.join("etc/passwd")).unwrap();
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), 0);
    assert!(fs::symlink_metadata(root.join("gone/deep"))
        .unwrap()
        .file_type()
        .is_char_device());
    assert!(!root.join("etc/.wh.passwd").exists());
    assert!(fs::symlink_metadata(root.join(".wh..wh.plnk")).is_err());
    assert_eq!(
        get_xattr(&root.join("var"), "trusted.overlay.opaque").as_deref(),
        Some(b"y".as_slice())
    );
    assert!(fs::symlink_metadata(root.join("var/.wh..wh..opq")).is_err());
    assert_eq!(fs::read(root.join("var/new")).unwrap(), b"n");
}

#[test]
fn large_layer_unpacks() {
    let mut b = tar::Builder::new(Vec::new());
    let mut n = 0;
    for d in 0..500 {
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, format!("d{d:03}"), &b""[..]).unwrap();
        n += 1;
        for f in 0..99 {
            let mut h = Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(1);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            b.append_data(&mut h, format!("d{d:03}/f{f:02}"), &b"x"[..])
                .unwrap();
            n += 1;
        }
    }
    assert_eq!(n, 50_000);
    let layer = b.into_inner().unwrap();
    // On tmpfs when available: ext4 right after mass deletions (other tests) makes inode allocation crawl, which
    // would measure the filesystem rather than the unpacker.
    let base = if Path::new("/dev/shm").is_dir() {
        Path::new("/dev/shm")
    } else {
        Path::new("/tmp")
    };
    let t = tempfile::Builder::new()
        .prefix("sandboxd-image-test")
        .tempdir_in(base)
        .unwrap();
    let root = t.path().join("layer");
    fs::create_dir(&root).unwrap();
    let blob = t.path().join("blob");
    fs::write(&blob, &layer).unwrap();
    let start = std::time::Instant::now();
    let stats = unpack_layer(&blob, Compression::None, &root, &sha(&layer), "t").unwrap();
    let took = start.elapsed();
    assert_eq!(stats.entries, 50_000);
    assert_eq!(count(&root), 500);
    assert_eq!(count(&root.join("d499")), 99);
    assert!(took.as_secs() < 120, "50k entries took {took:?}");
    eprintln!("50,000 entries unpacked in {took:?}");
}

#[test]
fn remove_collects_garbage() {
    let t = tmp();
    let sd = t.path().join("store");
    let store = ImageStore::open(&sd).unwrap();
    let a = t.path().join("a");
    let b = t.path().join("b");
    write_oci(
        &a,
        &[
            (base_layer(), Compression::Gzip),
            (app_layer("a"), Compression::Gzip),
        ],
        None,
        "a",
    );
    write_oci(
        &b,
        &[
            (base_layer(), Compression::Gzip),
            (app_layer("b"), Compression::Gzip),
        ],
        None,
        "b",
    );
    let ia = store.import(&a, Some("a:1"), &norm).unwrap();
    store.import(&a, Some("a:2"), &norm).unwrap();
    let ib = store.import(&b, Some("b:1"), &norm).unwrap();
    // 3 shared-or-not layer blobs + 2 configs + 2 manifests; 3 layer dirs.
    assert_eq!(count(&sd.join("blobs/sha256")), 7);
    assert_eq!(count(&sd.join("layers/sha256")), 3);

    // Removing one of two references keeps the image.
    let r = store.remove("a:1").unwrap();
    assert_eq!(r.references, vec!["a:1".to_string()]);
    assert_eq!(store.resolve("a:2").unwrap().digest, ia.digest);
    assert_eq!(count(&sd.join("blobs/sha256")), 7);

    // Removing by digest drops every reference, the record and content only it used.
    let r = store.remove(&ia.digest).unwrap();
    assert_eq!(r.references, vec!["a:2".to_string()]);
    assert!(matches!(store.resolve("a:2"), Err(ImageError::NotFound(_))));
    assert_eq!(count(&sd.join("blobs/sha256")), 4);
    let dirs_b = store.layer_dirs(&ib);
    assert!(dirs_b.iter().all(|d| d.is_dir()));
    assert_eq!(count(&sd.join("layers/sha256")), 2);

    // A reference moving to another image leaves the old one nameless (a sandbox may run on it) until
    // garbage collection finds it unused; in use, it survives collection.
    store.import(&a, Some("b:1"), &norm).unwrap();
    assert_eq!(store.resolve("b:1").unwrap().digest, ia.digest);
    assert_eq!(store.list().unwrap().len(), 1);
    assert!(store.layer_dirs(&ib)[1].exists());
    let in_use: std::collections::HashSet<String> = [ib.digest.clone()].into_iter().collect();
    store.collect_garbage(&in_use).unwrap();
    assert!(store.layer_dirs(&ib)[1].exists());
    store.collect_garbage(&Default::default()).unwrap();
    assert!(!store.layer_dirs(&ib)[1].exists());

    // An image in use keeps its content when its last name is removed.
    store.import(&b, Some("b:2"), &norm).unwrap();
    let in_use: std::collections::HashSet<String> = [ib.digest.clone()].into_iter().collect();
    store.remove_keeping("b:2", &in_use).unwrap();
    assert!(matches!(store.resolve("b:2"), Err(ImageError::NotFound(_))));
    assert!(store.layer_dirs(&ib).iter().all(|d| d.is_dir()));
    store.collect_garbage(&Default::default()).unwrap();
    assert!(!store.layer_dirs(&ib)[1].exists());

    store.remove("b:1").unwrap();
    assert!(store.list().unwrap().is_empty());
    assert_eq!(count(&sd.join("blobs/sha256")), 0);
    assert_eq!(count(&sd.join("layers/sha256")), 0);
    assert_eq!(count(&sd.join("images")), 0);
    assert!(matches!(store.remove("b:1"), Err(ImageError::NotFound(_))));
}

#[test]
fn open_cleans_leftovers() {
    let t = tmp();
    let sd = t.path().join("store");
    let store = ImageStore::open(&sd).unwrap();
    let a = t.path().join("a");
    write_oci(&a, &[(base_layer(), Compression::Gzip)], None, "a");
    let img = store.import(&a, Some("a:1"), &norm).unwrap();
    drop(store);
    // Simulate crashes at various points.
    fs::write(sd.join("ingest/blob-1"), b"partial").unwrap();
    fs::create_dir_all(sd.join("tmp/import-1/blobs")).unwrap();
    fs::create_dir_all(sd.join("layers/sha256/.tmp-abc-1/etc")).unwrap();
    let orphan_blob = sha(b"orphan");
    fs::write(sd.join("blobs/sha256").join(&orphan_blob[7..]), b"orphan").unwrap();
    fs::create_dir_all(sd.join("layers/sha256").join("0".repeat(64))).unwrap();
    let mut orphan_record: serde_json::Value = serde_json::from_slice(
        &fs::read(sd.join("images").join(format!("{}.json", &img.digest[7..]))).unwrap(),
    )
    .unwrap();
    let fake = sha(b"fake manifest");
    orphan_record["digest"] = serde_json::json!(fake);
    fs::write(
        sd.join("images").join(format!("{}.json", &fake[7..])),
        serde_json::to_vec(&orphan_record).unwrap(),
    )
    .unwrap();

    let store = ImageStore::open(&sd).unwrap();
    store.collect_garbage(&Default::default()).unwrap();
    assert_eq!(count(&sd.join("ingest")), 0);
    assert_eq!(count(&sd.join("tmp")), 0);
    assert_eq!(count(&sd.join("layers/sha256")), 1);
    assert!(!sd.join("blobs/sha256").join(&orphan_blob[7..]).exists());
    assert_eq!(count(&sd.join("images")), 1);
    assert_eq!(store.resolve("a:1").unwrap().digest, img.digest);
    assert!(store.layer_dirs(&img)[0].join("etc/passwd").exists());
}

#[test]
fn hostile_layer_in_import_leaves_nothing() {
    let t = tmp();
    let sd = t.path().join("store");
    let store = ImageStore::open(&sd).unwrap();
    let mut l = Layer::new();
    l.symlink("evil", "/");
    l.file("evil/x", b"pwned");
    let src = t.path().join("oci");
    write_oci(&src, &[(l.finish(), Compression::Gzip)], None, "x");
    let err = store.import(&src, Some("evil:1"), &norm).unwrap_err();
    assert_hostile(&err, "evil/x");
    assert!(!Path::new("/x").exists() || fs::read("/x").map(|c| c != b"pwned").unwrap_or(true));
    assert_eq!(count(&sd.join("layers/sha256")), 0);
    assert_eq!(count(&sd.join("blobs/sha256")), 0);
    assert_eq!(count(&sd.join("images")), 0);

    // Hostile names inside an image tarball are refused as well.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../x.json");
    h.set_size(2);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &b"{}"[..]).unwrap();
    let tarball = t.path().join("evil.tar");
    fs::write(&tarball, b.into_inner().unwrap()).unwrap();
    let err = store.import(&tarball, Some("evil:2"), &norm).unwrap_err();
    assert_hostile(&err, "../x.json");
    assert!(!sd.join("x.json").exists());
    assert_eq!(count(&sd.join("tmp")), 0);
}

#[test]
fn busybox_script_image_imports() {
    if !Path::new("/bin/busybox").exists() {
        eprintln!("skipping: /bin/busybox not installed");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-busybox-image");
    let t = tmp();
    let out = t.path().join("bb-oci");
    let tarball = t.path().join("bb-oci.tar");
    let output = std::process::Command::new(&script)
        .arg(&out)
        .arg("--tar")
        .arg(&tarball)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "build-busybox-image failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let normalise = |s: &str| -> Result<String, String> {
        if s == "latest" {
            Ok("localhost/busybox:latest".into())
        } else {
            Err(format!("unexpected name {s}"))
        }
    };
    let img = store.import(&out, None, &normalise).unwrap();
    assert_eq!(img.references, vec!["localhost/busybox:latest".to_string()]);
    assert_eq!(img.config.cmd, vec!["sh"]);
    assert_eq!(
        img.config.env,
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    );
    let dirs = store.layer_dirs(&img);
    assert_eq!(dirs.len(), 1);
    let layer = &dirs[0];
    assert_eq!(
        fs::read_link(layer.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    let os_release = fs::read_to_string(layer.join("etc/os-release")).unwrap();
    assert!(os_release.contains("ID=busybox"), "{os_release}");
    assert!(os_release.contains("VERSION_ID="), "{os_release}");
    let home = fs::metadata(layer.join("home/app")).unwrap();
    assert_eq!((home.uid(), home.gid()), (1000, 1000));
    assert_eq!(
        fs::metadata(layer.join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
    assert!(fs::read_to_string(layer.join("etc/passwd"))
        .unwrap()
        .contains("app:x:1000:1000:"));

    // The tarball form is the same image.
    let again = store
        .import(&tarball, Some("localhost/bb:tar"), &normalise)
        .unwrap();
    assert_eq!(again.digest, img.digest);
}

#[test]
fn docker_archive_with_symlinked_duplicate_layer() {
    // Legacy `docker save` writes identical layers once and links the others to it.
    let t = tmp();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let base = base_layer();
    let config = serde_json::json!({
        "architecture": super::source::host_arch(), "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha(&base), sha(&base)]},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = Header::new_gnu();
    h.set_size(base.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "aaa/layer.tar", base.as_slice())
        .unwrap();
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, "bbb/layer.tar", "../aaa/layer.tar")
        .unwrap();
    let mut h = Header::new_gnu();
    h.set_size(config.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "config.json", config.as_slice())
        .unwrap();
    let manifest = serde_json::json!([{"Config": "config.json", "RepoTags": null, "Layers": ["aaa/layer.tar", "bbb/layer.tar"]}]);
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let mut h = Header::new_gnu();
    h.set_size(manifest.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "manifest.json", manifest.as_slice())
        .unwrap();
    let tarball = t.path().join("dup.tar");
    fs::write(&tarball, b.into_inner().unwrap()).unwrap();

    // No RepoTags and no reference: refused, naming the problem.
    let err = store.import(&tarball, None, &norm).unwrap_err();
    assert!(err.to_string().contains("names no image"), "{err}");
    let img = store.import(&tarball, Some("dup:1"), &norm).unwrap();
    assert_eq!(img.layers, vec![sha(&base), sha(&base)]);
    assert_eq!(img.config.cmd, Vec::<String>::new());
    let dirs = store.layer_dirs(&img);
    assert_eq!(dirs[0], dirs[1]);
    assert!(dirs[0].join("etc/passwd").is_file());
}
