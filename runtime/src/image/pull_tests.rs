//! Tests of the store's pull side: manifest and index parsing, platform choice, layers verified and unpacked while
//! they stream in (from in-memory readers; no network), leases, pulled image records, disk usage and prune.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::json;
use tar::EntryType;

use super::tests::{app_layer, base_layer, count, gzip, sha, tmp, zstd_compress, Layer};
use super::unpack::Compression;
use super::{
    lock, parse_manifest, ImageError, ImageStore, IndexEntry, LayerRef, Manifest, ParsedManifest,
    Platform, PruneReport, PulledImage, StoredImage,
};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_GZIP_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

// ---------------------------------------------------------------------------------------------------------------
// Helpers

fn compress(tar: &[u8], c: Compression) -> Vec<u8> {
    match c {
        Compression::None => tar.to_vec(),
        Compression::Gzip => gzip(tar),
        Compression::Zstd => zstd_compress(tar),
    }
}

fn to_vec(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

/// An OCI image manifest document with the given layer descriptors.
fn manifest_doc(layers: &[serde_json::Value]) -> serde_json::Value {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha(config), "size": config.len()},
        "layers": layers,
    })
}

/// The [`LayerRef`] a manifest naming `digest`, `size` and `media_type` yields.
fn layer_ref_raw(digest: &str, size: usize, media_type: &str) -> LayerRef {
    let doc = manifest_doc(&[json!({"mediaType": media_type, "digest": digest, "size": size})]);
    let m = image(parse_manifest(&to_vec(&doc), None, "test manifest").unwrap());
    m.layers.into_iter().next().unwrap()
}

/// The [`LayerRef`] of an authentic blob.
fn layer_ref(blob: &[u8], c: Compression) -> LayerRef {
    layer_ref_raw(&sha(blob), blob.len(), c.media_type())
}

fn image(m: Manifest) -> ParsedManifest {
    match m {
        Manifest::Image(m) => m,
        Manifest::Index(_) => panic!("expected an image manifest, got an index"),
    }
}

fn index(m: Manifest) -> Vec<IndexEntry> {
    match m {
        Manifest::Index(e) => e,
        Manifest::Image(_) => panic!("expected an index, got an image manifest"),
    }
}

/// The reason of an `Invalid` error.
fn invalid_reason(r: Result<Manifest, ImageError>) -> String {
    match r {
        Err(ImageError::Invalid { reason, .. }) => reason,
        Err(other) => panic!("expected Invalid, got {other}"),
        Ok(m) => panic!("expected Invalid, got {m:?}"),
    }
}

/// A reader handing out `data` in chunks, optionally failing at byte `fail_at`.
struct Chunked<'a> {
    data: &'a [u8],
    pos: usize,
    chunk: usize,
    fail_at: Option<usize>,
    /// After the failure: fail again (true) or report the end of the stream (false).
    fail_forever: bool,
    failed: bool,
}

impl<'a> Chunked<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            chunk: 1000,
            fail_at: None,
            fail_forever: false,
            failed: false,
        }
    }

    fn failing_at(data: &'a [u8], at: usize, forever: bool) -> Self {
        Self {
            fail_at: Some(at),
            fail_forever: forever,
            ..Self::new(data)
        }
    }
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(at) = self.fail_at {
            if self.pos >= at {
                if self.failed && !self.fail_forever {
                    return Ok(0);
                }
                self.failed = true;
                return Err(io::Error::other("connection reset by peer"));
            }
        }
        let end = self
            .fail_at
            .unwrap_or(self.data.len())
            .min(self.data.len())
            .min(self.pos + self.chunk)
            .min(self.pos + buf.len());
        let src = &self.data[self.pos..end];
        buf[..src.len()].copy_from_slice(src);
        self.pos = end;
        Ok(src.len())
    }
}

struct Fixture {
    t: tempfile::TempDir,
    root: PathBuf,
    store: ImageStore,
}

fn fixture() -> Fixture {
    let t = tmp();
    let root = t.path().join("store");
    let store = ImageStore::open(&root).unwrap();
    Fixture { t, root, store }
}

impl Fixture {
    fn blob_path(&self, digest: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(&digest[7..])
    }

    fn layer_path(&self, diff_id: &str) -> PathBuf {
        self.root.join("layers/sha256").join(&diff_id[7..])
    }

    fn pull(&self, blob: &[u8], layer: &LayerRef, diff_id: &str) -> Result<(), ImageError> {
        self.store
            .pull_layer(Chunked::new(blob), layer, diff_id, "test layer")
            .map(|()| self.assert_no_leftovers())
    }

    /// No ingest file and no temporary layer directory is left behind.
    fn assert_no_leftovers(&self) {
        assert_eq!(count(&self.root.join("ingest")), 0, "ingest/ not empty");
        let tmp: Vec<String> = fs::read_dir(self.root.join("layers/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(tmp.is_empty(), "leftover layer directories: {tmp:?}");
    }

    /// Nothing at all is in the store (a failed pull into an empty store).
    fn assert_nothing_committed(&self) {
        self.assert_no_leftovers();
        assert_eq!(
            count(&self.root.join("blobs/sha256")),
            0,
            "a blob was committed"
        );
        assert_eq!(
            count(&self.root.join("layers/sha256")),
            0,
            "a layer was committed"
        );
        assert_eq!(count(&self.root.join("images")), 0);
    }
}

fn assert_mismatch(err: &ImageError) -> (&str, &str, &str) {
    match err {
        ImageError::DigestMismatch {
            what,
            expected,
            actual,
        } => (what, expected, actual),
        other => panic!("expected DigestMismatch, got {other}"),
    }
}

fn assert_hostile(err: &ImageError, entry: &str) {
    match err {
        ImageError::HostileEntry { entry: e, .. } => assert_eq!(e, entry, "{err}"),
        other => panic!("expected HostileEntry for {entry:?}, got {other}"),
    }
    assert!(err.to_string().contains(entry), "{err}");
}

/// An image as a registry would serve it.
struct Published {
    manifest: Vec<u8>,
    manifest_digest: String,
    config: Vec<u8>,
    config_digest: String,
    blobs: Vec<Vec<u8>>,
    layers: Vec<LayerRef>,
    diff_ids: Vec<String>,
}

fn publish(layers: &[(Vec<u8>, Compression)], cmd: &str) -> Published {
    let diff_ids: Vec<String> = layers.iter().map(|(t, _)| sha(t)).collect();
    let blobs: Vec<Vec<u8>> = layers.iter().map(|(t, c)| compress(t, *c)).collect();
    let config = to_vec(&json!({
        "architecture": super::source::host_arch(), "os": "linux", "created": "2024-01-02T03:04:05Z",
        "config": {"Env": ["PATH=/bin"], "Cmd": [cmd]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }));
    let descs: Vec<serde_json::Value> = blobs
        .iter()
        .zip(layers)
        .map(|(b, (_, c))| json!({"mediaType": c.media_type(), "digest": sha(b), "size": b.len()}))
        .collect();
    let manifest = to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha(&config), "size": config.len()},
        "layers": descs,
    }));
    let parsed = image(parse_manifest(&manifest, Some(OCI_MANIFEST), "published").unwrap());
    Published {
        manifest_digest: sha(&manifest),
        config_digest: sha(&config),
        manifest,
        config,
        blobs,
        layers: parsed.layers,
        diff_ids,
    }
}

impl Published {
    /// Stores the config, the manifest and every layer, as a pull does before `commit_pulled`.
    fn fetch(&self, store: &ImageStore) {
        let diff_ids = store
            .config_diff_ids(&self.config, self.layers.len(), "config")
            .unwrap();
        assert_eq!(diff_ids, self.diff_ids);
        store
            .put_blob(&self.config, &self.config_digest, "config")
            .unwrap();
        store
            .put_blob(&self.manifest, &self.manifest_digest, "manifest")
            .unwrap();
        for ((blob, l), d) in self.blobs.iter().zip(&self.layers).zip(&self.diff_ids) {
            store.pull_layer(Chunked::new(blob), l, d, "layer").unwrap();
        }
    }

    fn pulled(&self, reference: &str, repo_digest: &str) -> PulledImage {
        PulledImage {
            manifest_digest: self.manifest_digest.clone(),
            config_digest: self.config_digest.clone(),
            layers: self.layers.clone(),
            reference: reference.to_owned(),
            repo_digest: repo_digest.to_owned(),
        }
    }

    /// Fetches and commits the image under `reference` (`repo:tag`).
    fn pull(&self, store: &ImageStore, reference: &str) -> StoredImage {
        self.fetch(store);
        let repo = reference.rsplit_once(':').unwrap().0;
        store
            .commit_pulled(&self.pulled(reference, &format!("{repo}@{}", self.manifest_digest)))
            .unwrap()
    }
}

/// Allocated bytes under `path`, counted independently of the store's code (the test layers have no hard links).
fn disk_bytes(path: &Path) -> u64 {
    let meta = fs::symlink_metadata(path).unwrap();
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for e in fs::read_dir(path).unwrap() {
            total += disk_bytes(&e.unwrap().path());
        }
    }
    total
}

fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| disk_bytes(&e.unwrap().path()))
        .sum()
}

fn set(items: &[&str]) -> HashSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// parse_manifest

#[test]
fn parse_oci_manifest() {
    let config = br#"{"os":"linux"}"#;
    let doc = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha(config), "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(b"l1"), "size": 11},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": sha(b"l2"), "size": 22},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(b"l3"), "size": 33},
        ],
        "annotations": {"org.opencontainers.image.title": "x"},
    });
    for ct in [
        None,
        Some(OCI_MANIFEST),
        Some("application/vnd.oci.image.manifest.v1+json; charset=utf-8"),
    ] {
        let m = image(parse_manifest(&to_vec(&doc), ct, "m").unwrap());
        assert_eq!(m.config_digest, sha(config));
        assert_eq!(m.config_size, config.len() as u64);
        let got: Vec<(String, u64, String)> = m
            .layers
            .iter()
            .map(|l| (l.digest.clone(), l.size, l.media_type.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    sha(b"l1"),
                    11,
                    "application/vnd.oci.image.layer.v1.tar+gzip".to_owned()
                ),
                (
                    sha(b"l2"),
                    22,
                    "application/vnd.oci.image.layer.v1.tar+zstd".to_owned()
                ),
                (
                    sha(b"l3"),
                    33,
                    "application/vnd.oci.image.layer.v1.tar".to_owned()
                ),
            ]
        );
    }
}

#[test]
fn parse_docker_v2_manifest() {
    let doc = json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": sha(b"cfg"), "size": 1469},
        "layers": [
            {"mediaType": DOCKER_GZIP_LAYER, "digest": sha(b"a"), "size": 2_811_478},
            {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "digest": sha(b"b"), "size": 5},
        ],
    });
    for ct in [None, Some(DOCKER_MANIFEST)] {
        let m = image(parse_manifest(&to_vec(&doc), ct, "m").unwrap());
        assert_eq!(m.config_digest, sha(b"cfg"));
        assert_eq!(m.config_size, 1469);
        assert_eq!(m.layers.len(), 2);
        assert_eq!(m.layers[0].digest, sha(b"a"));
        assert_eq!(m.layers[0].size, 2_811_478);
        assert_eq!(m.layers[0].media_type, DOCKER_GZIP_LAYER);
    }
}

fn index_doc(media_type: Option<&str>, entry_type: &str) -> serde_json::Value {
    let mut doc = json!({
        "schemaVersion": 2,
        "manifests": [
            {"mediaType": entry_type, "digest": sha(b"amd64"), "size": 100,
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": entry_type, "digest": sha(b"arm64"), "size": 200,
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"mediaType": entry_type, "digest": sha(b"none"), "size": 300},
        ],
    });
    if let Some(mt) = media_type {
        doc["mediaType"] = json!(mt);
    }
    doc
}

fn check_index(entries: &[IndexEntry], entry_type: &str) {
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[0].digest, sha(b"amd64"));
    assert_eq!(entries[0].size, 100);
    assert_eq!(entries[0].media_type, entry_type);
    assert_eq!(
        entries[0].platform,
        Some(Platform::parse("linux/amd64").unwrap())
    );
    assert_eq!(
        entries[1].platform,
        Some(Platform::parse("linux/arm64/v8").unwrap())
    );
    assert_eq!(entries[1].size, 200);
    assert_eq!(entries[2].platform, None);
}

#[test]
fn parse_oci_index_and_docker_list() {
    let oci = to_vec(&index_doc(Some(OCI_INDEX), OCI_MANIFEST));
    check_index(
        &index(parse_manifest(&oci, None, "i").unwrap()),
        OCI_MANIFEST,
    );
    check_index(
        &index(parse_manifest(&oci, Some(OCI_INDEX), "i").unwrap()),
        OCI_MANIFEST,
    );

    let docker = to_vec(&index_doc(Some(DOCKER_LIST), DOCKER_MANIFEST));
    check_index(
        &index(parse_manifest(&docker, None, "i").unwrap()),
        DOCKER_MANIFEST,
    );
    check_index(
        &index(parse_manifest(&docker, Some(DOCKER_LIST), "i").unwrap()),
        DOCKER_MANIFEST,
    );
}

#[test]
fn parse_without_media_type() {
    // An OCI index may omit mediaType: `manifests` tells it apart.
    let idx = to_vec(&index_doc(None, OCI_MANIFEST));
    for ct in [
        None,
        Some("application/json"),
        Some("text/plain; charset=utf-8"),
        Some(""),
    ] {
        check_index(&index(parse_manifest(&idx, ct, "i").unwrap()), OCI_MANIFEST);
    }
    // The header decides when the document says nothing.
    check_index(
        &index(parse_manifest(&idx, Some(DOCKER_LIST), "i").unwrap()),
        OCI_MANIFEST,
    );

    let mut m =
        manifest_doc(&[json!({"mediaType": DOCKER_GZIP_LAYER, "digest": sha(b"x"), "size": 1})]);
    m.as_object_mut().unwrap().remove("mediaType");
    let parsed = image(parse_manifest(&to_vec(&m), None, "m").unwrap());
    assert_eq!(parsed.layers[0].digest, sha(b"x"));
    assert!(parse_manifest(&to_vec(&m), Some(DOCKER_MANIFEST), "m").is_ok());
}

#[test]
fn parse_content_type_mismatch() {
    let m = to_vec(&manifest_doc(&[]));
    let reason = invalid_reason(parse_manifest(&m, Some(DOCKER_MANIFEST), "m"));
    assert!(reason.contains("served as"), "{reason}");
    assert!(
        reason.contains(DOCKER_MANIFEST) && reason.contains(OCI_MANIFEST),
        "{reason}"
    );

    let i = to_vec(&index_doc(Some(OCI_INDEX), OCI_MANIFEST));
    let reason = invalid_reason(parse_manifest(&i, Some(OCI_MANIFEST), "i"));
    assert!(reason.contains("served as"), "{reason}");

    // Served as an index, but it is a manifest that does not say what it is: not an index.
    let mut m = manifest_doc(&[]);
    m.as_object_mut().unwrap().remove("mediaType");
    let reason = invalid_reason(parse_manifest(&to_vec(&m), Some(OCI_INDEX), "m"));
    assert!(reason.contains("malformed image index"), "{reason}");
}

#[test]
fn parse_refuses_schema1() {
    let doc = to_vec(&json!({
        "schemaVersion": 1, "name": "library/x", "tag": "1", "architecture": "amd64",
        "fsLayers": [{"blobSum": sha(b"l")}], "history": [{"v1Compatibility": "{}"}],
        "signatures": [],
    }));
    for ct in [
        None,
        Some(SCHEMA1),
        Some("application/vnd.docker.distribution.manifest.v1+json"),
    ] {
        let reason = invalid_reason(parse_manifest(&doc, ct, "m"));
        assert!(reason.contains("schema 1"), "{reason}");
    }
    // Served as schema 1 whatever the body claims.
    let reason = invalid_reason(parse_manifest(
        &to_vec(&manifest_doc(&[])),
        Some(SCHEMA1),
        "m",
    ));
    assert!(
        reason.contains("served as") || reason.contains("schema 1"),
        "{reason}"
    );
    let mut no_mt = manifest_doc(&[]);
    no_mt.as_object_mut().unwrap().remove("mediaType");
    let reason = invalid_reason(parse_manifest(&to_vec(&no_mt), Some(SCHEMA1), "m"));
    assert!(reason.contains("schema 1"), "{reason}");
}

#[test]
fn parse_refuses_bad_documents() {
    // Unknown layer media type, naming the layer.
    let doc = manifest_doc(&[
        json!({"mediaType": DOCKER_GZIP_LAYER, "digest": sha(b"a"), "size": 1}),
        json!({"mediaType": "application/vnd.example.layer.v1+squashfs", "digest": sha(b"b"), "size": 1}),
    ]);
    match parse_manifest(&to_vec(&doc), None, "img") {
        Err(ImageError::Invalid { what, reason }) => {
            assert!(reason.contains("unsupported layer media type"), "{reason}");
            assert!(reason.contains("squashfs"), "{reason}");
            assert_eq!(what, "img layer 2");
        }
        other => panic!("unexpected {other:?}"),
    }

    // A config that is not a container image config (a Helm chart, an artifact).
    for config_mt in [
        "application/vnd.cncf.helm.config.v1+json",
        "application/vnd.oci.empty.v1+json",
    ] {
        let mut doc = manifest_doc(&[]);
        doc["config"]["mediaType"] = json!(config_mt);
        let reason = invalid_reason(parse_manifest(&to_vec(&doc), None, "m"));
        assert!(reason.contains("not a container image config"), "{reason}");
    }

    // Malformed JSON, or JSON that is no manifest at all.
    for bytes in [
        &b"{not json"[..],
        b"",
        b"\"manifest\"",
        b"{\"schemaVersion\": \"2\"}",
    ] {
        let reason = invalid_reason(parse_manifest(bytes, Some(OCI_MANIFEST), "m"));
        assert!(reason.contains("malformed manifest JSON"), "{reason}");
    }
    // (serde reads a struct from an array too: an empty one is a document without a schemaVersion.)
    for bytes in [&b"[]"[..], b"[2]", b"{}"] {
        invalid_reason(parse_manifest(bytes, Some(OCI_MANIFEST), "m"));
    }

    // A layer without a digest; with a digest of another algorithm; with a malformed one.
    let doc = manifest_doc(&[json!({"mediaType": DOCKER_GZIP_LAYER, "size": 1})]);
    let reason = invalid_reason(parse_manifest(&to_vec(&doc), None, "m"));
    assert!(reason.contains("malformed image manifest"), "{reason}");
    let sha512 = format!("sha512:{}", "ab".repeat(64));
    let doc = manifest_doc(&[json!({"mediaType": DOCKER_GZIP_LAYER, "digest": sha512, "size": 1})]);
    let reason = invalid_reason(parse_manifest(&to_vec(&doc), None, "m"));
    assert!(reason.contains("only sha256"), "{reason}");
    let doc =
        manifest_doc(&[json!({"mediaType": DOCKER_GZIP_LAYER, "digest": "sha256:abc", "size": 1})]);
    assert!(parse_manifest(&to_vec(&doc), None, "m").is_err());

    // No or an unknown schemaVersion; an unknown manifest type.
    let mut doc = manifest_doc(&[]);
    doc.as_object_mut().unwrap().remove("schemaVersion");
    let reason = invalid_reason(parse_manifest(&to_vec(&doc), None, "m"));
    assert!(reason.contains("schemaVersion"), "{reason}");
    let mut doc = manifest_doc(&[]);
    doc["schemaVersion"] = json!(3);
    let reason = invalid_reason(parse_manifest(&to_vec(&doc), None, "m"));
    assert!(reason.contains("schemaVersion"), "{reason}");
    let mut doc = manifest_doc(&[]);
    doc["mediaType"] = json!("application/vnd.oci.artifact.manifest.v1+json");
    let reason = invalid_reason(parse_manifest(&to_vec(&doc), None, "m"));
    assert!(
        reason.contains("unsupported manifest media type"),
        "{reason}"
    );

    // A config too large to be read into memory.
    let mut doc = manifest_doc(&[]);
    doc["config"]["size"] = json!(super::source::JSON_LIMIT + 1);
    let reason = invalid_reason(parse_manifest(&to_vec(&doc), None, "m"));
    assert!(reason.contains("too large"), "{reason}");

    // An index entry with a malformed digest.
    let mut doc = index_doc(Some(OCI_INDEX), OCI_MANIFEST);
    doc["manifests"][0]["digest"] = json!(format!("sha512:{}", "cd".repeat(64)));
    assert!(parse_manifest(&to_vec(&doc), None, "i").is_err());
}

// ---------------------------------------------------------------------------------------------------------------
// Platforms

#[test]
fn platform_parse() {
    let p = Platform::parse("linux/amd64").unwrap();
    assert_eq!(
        p,
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None
        }
    );
    assert_eq!(p.to_string(), "linux/amd64");
    let p = Platform::parse("Linux/ARM64/V8").unwrap();
    assert_eq!(
        (p.os.as_str(), p.architecture.as_str(), p.variant.as_deref()),
        ("linux", "arm64", Some("v8"))
    );
    assert_eq!(p.to_string(), "linux/arm64/v8");
    assert_eq!(
        Platform::parse("linux/arm/v7").unwrap().to_string(),
        "linux/arm/v7"
    );
    assert_eq!(
        Platform::parse("linux/ppc64le").unwrap().architecture,
        "ppc64le"
    );
    for bad in [
        "",
        "linux",
        "linux/",
        "/amd64",
        "linux//v8",
        "linux/amd64/",
        "a/b/c/d",
        "linux/amd 64",
        "linux/amd64/v8/x",
        "linux/x:y",
    ] {
        let err = Platform::parse(bad).unwrap_err();
        assert!(err.contains("os/architecture"), "{bad:?}: {err}");
    }
    let host = Platform::host();
    assert_eq!(host.os, "linux");
    assert_eq!(host.architecture, super::source::host_arch());
    if host.architecture == "arm64" {
        assert_eq!(host.variant.as_deref(), Some("v8"));
    }
}

fn entry(platform: Option<&str>, media_type: &str) -> IndexEntry {
    IndexEntry {
        digest: sha(format!("{platform:?}{media_type}").as_bytes()),
        size: 1,
        media_type: media_type.to_owned(),
        platform: platform.map(|p| Platform::parse(p).unwrap()),
    }
}

fn choose<'a>(entries: &'a [IndexEntry], want: &str) -> Result<&'a IndexEntry, ImageError> {
    Manifest::choose(entries, &Platform::parse(want).unwrap(), "index of x")
}

fn chosen(entries: &[IndexEntry], want: &str) -> String {
    choose(entries, want)
        .unwrap()
        .platform
        .as_ref()
        .unwrap()
        .to_string()
}

#[test]
fn choose_exact_match() {
    let entries = vec![
        entry(Some("linux/amd64"), OCI_MANIFEST),
        entry(Some("linux/arm/v6"), OCI_MANIFEST),
        entry(Some("linux/arm/v7"), OCI_MANIFEST),
        entry(Some("linux/arm64/v8"), OCI_MANIFEST),
        entry(Some("linux/s390x"), OCI_MANIFEST),
    ];
    assert_eq!(chosen(&entries, "linux/amd64"), "linux/amd64");
    assert_eq!(chosen(&entries, "linux/arm/v7"), "linux/arm/v7");
    assert_eq!(chosen(&entries, "linux/arm/v6"), "linux/arm/v6");
    assert_eq!(chosen(&entries, "linux/s390x"), "linux/s390x");
    assert_eq!(
        choose(&entries, "linux/arm/v7").unwrap().digest,
        entries[2].digest
    );
    // A wanted variant that is not there is not replaced by another.
    assert!(choose(&entries, "linux/arm/v5").is_err());
    // Without a variant, a variant entry is acceptable (the first among equals).
    assert_eq!(chosen(&entries, "linux/arm"), "linux/arm/v6");
}

#[test]
fn choose_arm64_with_and_without_v8() {
    let plain = vec![entry(Some("linux/arm64"), OCI_MANIFEST)];
    let v8 = vec![entry(Some("linux/arm64/v8"), DOCKER_MANIFEST)];
    let both = vec![
        entry(Some("linux/arm64"), OCI_MANIFEST),
        entry(Some("linux/arm64/v8"), OCI_MANIFEST),
    ];
    let both_rev: Vec<IndexEntry> = both.iter().rev().cloned().collect();
    for want in ["linux/arm64/v8", "linux/arm64"] {
        assert_eq!(chosen(&plain, want), "linux/arm64", "{want}");
        assert_eq!(chosen(&v8, want), "linux/arm64/v8", "{want}");
    }
    // The exact spelling wins over the equivalent one, in any order.
    assert_eq!(chosen(&both, "linux/arm64/v8"), "linux/arm64/v8");
    assert_eq!(chosen(&both_rev, "linux/arm64/v8"), "linux/arm64/v8");
    assert_eq!(chosen(&both, "linux/arm64"), "linux/arm64");
    assert_eq!(chosen(&both_rev, "linux/arm64"), "linux/arm64");
    // v8 is no stand-in for another variant, nor for another architecture.
    assert!(choose(&plain, "linux/arm64/v9").is_err());
    assert!(choose(&plain, "linux/arm/v8").is_err());
}

#[test]
fn choose_amd64_with_v1_variant() {
    let v1 = vec![entry(Some("linux/amd64/v1"), OCI_MANIFEST)];
    assert_eq!(chosen(&v1, "linux/amd64"), "linux/amd64/v1");
    assert_eq!(chosen(&v1, "linux/amd64/v1"), "linux/amd64/v1");
    let plain = vec![entry(Some("linux/amd64"), OCI_MANIFEST)];
    assert_eq!(chosen(&plain, "linux/amd64/v1"), "linux/amd64");
    // v1 (the baseline) is preferred over a higher level when none is asked for; plain over both.
    let levels = vec![
        entry(Some("linux/amd64/v3"), OCI_MANIFEST),
        entry(Some("linux/amd64/v1"), OCI_MANIFEST),
    ];
    assert_eq!(chosen(&levels, "linux/amd64"), "linux/amd64/v1");
    assert_eq!(chosen(&levels, "linux/amd64/v3"), "linux/amd64/v3");
    let mut with_plain = levels.clone();
    with_plain.push(entry(Some("linux/amd64"), OCI_MANIFEST));
    assert_eq!(chosen(&with_plain, "linux/amd64"), "linux/amd64");
    assert!(choose(&levels, "linux/amd64/v2").is_err());
}

#[test]
fn choose_without_platform_entries() {
    let entries = vec![entry(None, OCI_MANIFEST), entry(None, DOCKER_MANIFEST)];
    let err = choose(&entries, "linux/amd64").unwrap_err();
    match &err {
        ImageError::PlatformNotFound {
            what,
            wanted,
            available,
        } => {
            assert_eq!(what, "index of x");
            assert_eq!(wanted, "linux/amd64");
            assert!(available.is_empty());
        }
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("available: none"), "{err}");
    assert!(matches!(
        choose(&[], "linux/amd64"),
        Err(ImageError::PlatformNotFound { .. })
    ));
}

#[test]
fn choose_unknown_platform_lists_available() {
    let entries = vec![
        entry(Some("linux/amd64"), OCI_MANIFEST),
        entry(Some("linux/arm64/v8"), OCI_MANIFEST),
        // Attestations (buildx) and the same platform again: listed once.
        entry(Some("unknown/unknown"), OCI_MANIFEST),
        entry(Some("linux/amd64"), DOCKER_MANIFEST),
        entry(None, OCI_MANIFEST),
    ];
    let err = choose(&entries, "linux/riscv64").unwrap_err();
    match &err {
        ImageError::PlatformNotFound {
            wanted, available, ..
        } => {
            assert_eq!(wanted, "linux/riscv64");
            assert_eq!(
                available,
                &vec![
                    "linux/amd64".to_owned(),
                    "linux/arm64/v8".to_owned(),
                    "unknown/unknown".to_owned()
                ]
            );
        }
        other => panic!("unexpected {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("linux/riscv64") && msg.contains("linux/amd64, linux/arm64/v8"),
        "{msg}"
    );
    assert!(matches!(
        choose(&entries, "windows/amd64"),
        Err(ImageError::PlatformNotFound { .. })
    ));
}

#[test]
fn choose_skips_entries_that_are_no_manifests() {
    let entries = vec![
        entry(Some("linux/amd64"), "application/vnd.in-toto+json"),
        entry(Some("linux/amd64"), ""),
        entry(Some("linux/amd64"), OCI_MANIFEST),
    ];
    // The first usable entry: an empty media type is accepted (older indexes), an attestation is not.
    assert_eq!(
        choose(&entries, "linux/amd64").unwrap().digest,
        entries[1].digest
    );
    let only_attestation = vec![entry(Some("linux/amd64"), "application/vnd.in-toto+json")];
    assert!(choose(&only_attestation, "linux/amd64").is_err());
}

// ---------------------------------------------------------------------------------------------------------------
// pull_layer

#[test]
fn pull_layer_commits_blob_and_layer() {
    for c in [Compression::Gzip, Compression::Zstd, Compression::None] {
        let f = fixture();
        let tar = base_layer();
        let blob = compress(&tar, c);
        let lr = layer_ref(&blob, c);
        let diff_id = sha(&tar);
        f.pull(&blob, &lr, &diff_id).unwrap();
        assert!(f.store.has_blob(&lr.digest), "{c:?}");
        assert!(f.store.has_layer(&diff_id), "{c:?}");
        assert_eq!(fs::read(f.blob_path(&lr.digest)).unwrap(), blob, "{c:?}");
        let dir = f.layer_path(&diff_id);
        assert_eq!(fs::read(dir.join("etc/hostname")).unwrap(), b"base\n");
        assert_eq!(
            fs::read_link(dir.join("bin/sh")).unwrap(),
            Path::new("tool")
        );
        assert_eq!(fs::read(dir.join("var/lib/data/old")).unwrap(), b"old");
        assert_eq!(count(&f.root.join("blobs/sha256")), 1);
        assert_eq!(count(&f.root.join("layers/sha256")), 1);
        // The blob is readable through the store only within the JSON limit, which a layer this small meets.
        assert_eq!(f.store.read_blob(&lr.digest, "blob").unwrap(), blob);

        // Pulling it again changes nothing.
        let ino = fs::metadata(&dir).unwrap().ino();
        f.pull(&blob, &lr, &diff_id).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().ino(), ino);
        assert_eq!(count(&f.root.join("blobs/sha256")), 1);
        assert_eq!(count(&f.root.join("layers/sha256")), 1);
    }
}

#[test]
fn pull_layer_byte_by_byte() {
    let f = fixture();
    let tar = app_layer("slow");
    let blob = gzip(&tar);
    let lr = layer_ref(&blob, Compression::Gzip);
    let mut reader = Chunked::new(&blob);
    reader.chunk = 1;
    f.store
        .pull_layer(reader, &lr, &sha(&tar), "slow layer")
        .unwrap();
    assert_eq!(
        fs::read(f.layer_path(&sha(&tar)).join("app/id")).unwrap(),
        b"slow"
    );
}

#[test]
fn pull_layer_tampered_commits_nothing() {
    for c in [Compression::Gzip, Compression::Zstd, Compression::None] {
        let f = fixture();
        let tar = base_layer();
        let blob = compress(&tar, c);
        let lr = layer_ref(&blob, c);
        let mut bad = blob.clone();
        if c == Compression::None {
            // Inside a file's content: the tar still parses, only the digests tell.
            let at = bad.windows(5).position(|w| w == b"base\n").unwrap();
            bad[at] = b'B';
        } else {
            let mid = bad.len() / 2;
            bad[mid] ^= 0xff;
        }
        let err = f.pull(&bad, &lr, &sha(&tar)).unwrap_err();
        let (what, expected, actual) = assert_mismatch(&err);
        // The blob's digest is reported, not the diff_id (the blob is judged first).
        assert_eq!(expected, lr.digest, "{c:?}: {err}");
        assert_eq!(actual, sha(&bad), "{c:?}: {err}");
        assert!(!what.contains("diff_id"), "{c:?}: {err}");
        f.assert_nothing_committed();
    }
}

#[test]
fn pull_layer_truncated_commits_nothing() {
    for c in [Compression::Gzip, Compression::Zstd, Compression::None] {
        let f = fixture();
        let tar = base_layer();
        let blob = compress(&tar, c);
        let lr = layer_ref(&blob, c);
        for cut in [blob.len() - 1, blob.len() / 2, 0] {
            let err = f.pull(&blob[..cut], &lr, &sha(&tar)).unwrap_err();
            let (what, expected, actual) = assert_mismatch(&err);
            assert!(what.ends_with("(size)"), "{c:?} cut at {cut}: {err}");
            assert_eq!(expected, blob.len().to_string());
            assert_eq!(actual, cut.to_string());
            f.assert_nothing_committed();
        }
    }
}

#[test]
fn pull_layer_longer_than_announced_commits_nothing() {
    for c in [Compression::Gzip, Compression::Zstd, Compression::None] {
        let f = fixture();
        let tar = base_layer();
        let blob = compress(&tar, c);
        let lr = layer_ref(&blob, c);
        // Authentic content followed by more: refused, not silently cut.
        for extra in [&b"x"[..], &[0u8; 4096][..], &gzip(b"more")[..]] {
            let mut long = blob.clone();
            long.extend_from_slice(extra);
            let err = f.pull(&long, &lr, &sha(&tar)).unwrap_err();
            let (what, expected, actual) = assert_mismatch(&err);
            assert!(what.ends_with("(size)"), "{c:?}: {err}");
            assert_eq!(expected, blob.len().to_string());
            assert_eq!(actual, format!("more than {}", blob.len()));
            f.assert_nothing_committed();
        }
    }
}

#[test]
fn pull_layer_wrong_diff_id_commits_nothing() {
    for c in [Compression::Gzip, Compression::None] {
        let f = fixture();
        let tar = base_layer();
        let blob = compress(&tar, c);
        let lr = layer_ref(&blob, c);
        let wrong = sha(b"another layer");
        let err = f.pull(&blob, &lr, &wrong).unwrap_err();
        let (what, expected, actual) = assert_mismatch(&err);
        assert!(what.contains("diff_id"), "{err}");
        assert_eq!(expected, wrong);
        assert_eq!(actual, sha(&tar));
        f.assert_nothing_committed();
    }
    // A malformed diff_id or blob digest is refused before anything is read.
    let f = fixture();
    let blob = gzip(&app_layer("x"));
    let lr = layer_ref(&blob, Compression::Gzip);
    assert!(matches!(
        f.pull(&blob, &lr, "sha256:nothex"),
        Err(ImageError::Invalid { .. })
    ));
    f.assert_nothing_committed();
}

fn hostile_layers(outside: &Path) -> Vec<(Vec<u8>, &'static str)> {
    let mut traversal = Layer::new();
    traversal.file("ok", b"fine");
    traversal.raw(EntryType::Regular, b"../x", None, b"evil", 0o644, (0, 0));
    let mut escape = Layer::new();
    escape
        .dir("d")
        .symlink("d/evil", outside.to_str().unwrap())
        .file("d/evil/pwned", b"evil");
    let mut relative = Layer::new();
    relative
        .dir("a")
        .symlink("a/up", "../../../..")
        .file("a/up/pwned", b"evil");
    vec![
        (traversal.finish(), "../x"),
        (escape.finish(), "d/evil/pwned"),
        (relative.finish(), "a/up/pwned"),
    ]
}

#[test]
fn pull_layer_hostile_entry_in_authentic_blob() {
    let t = tmp();
    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    for (tar, name) in hostile_layers(&outside) {
        for c in [Compression::Gzip, Compression::None] {
            let f = fixture();
            let blob = compress(&tar, c);
            let lr = layer_ref(&blob, c);
            let err = f.pull(&blob, &lr, &sha(&tar)).unwrap_err();
            assert_hostile(&err, name);
            f.assert_nothing_committed();
            assert!(!f.root.join("layers/x").exists());
            assert_eq!(count(&outside), 0, "written outside the layer");
        }
    }
}

#[test]
fn pull_layer_hostile_garbage_with_wrong_digest_is_a_mismatch() {
    let t = tmp();
    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    for (tar, _) in hostile_layers(&outside) {
        for c in [Compression::Gzip, Compression::None] {
            let f = fixture();
            let blob = compress(&tar, c);
            // The descriptor names other content of the same size: whatever the bytes look like, they are not
            // the layer; that is the error to report.
            let claimed = sha(b"the real layer");
            let lr = layer_ref_raw(&claimed, blob.len(), c.media_type());
            let err = f.pull(&blob, &lr, &sha(&tar)).unwrap_err();
            let (_, expected, actual) = assert_mismatch(&err);
            assert_eq!(expected, claimed);
            assert_eq!(actual, sha(&blob));
            f.assert_nothing_committed();
            assert_eq!(count(&outside), 0);

            // The same hostile content announced with its own digest and size, but followed by more bytes
            // (the unpacker fails before the end): still not authentic, still a mismatch.
            let lr = layer_ref(&blob, c);
            let mut long = blob.clone();
            long.extend_from_slice(&[0u8; 64]);
            let err = f.pull(&long, &lr, &sha(&tar)).unwrap_err();
            let (what, _, actual) = assert_mismatch(&err);
            assert!(what.ends_with("(size)"), "{err}");
            assert_eq!(actual, format!("more than {}", blob.len()));
            f.assert_nothing_committed();
            assert_eq!(count(&outside), 0);
        }
    }
}

#[test]
fn pull_layer_already_unpacked_stores_only_the_blob() {
    let f = fixture();
    let tar = app_layer("shared");
    let diff_id = sha(&tar);
    // The layer is there (another image's pull unpacked it); a marker shows it is not rewritten.
    let dir = f.layer_path(&diff_id);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("marker"), b"kept").unwrap();

    let gz = gzip(&tar);
    let lr = layer_ref(&gz, Compression::Gzip);
    f.pull(&gz, &lr, &diff_id).unwrap();
    assert!(f.store.has_blob(&lr.digest));
    assert_eq!(fs::read(f.blob_path(&lr.digest)).unwrap(), gz);
    assert_eq!(fs::read(dir.join("marker")).unwrap(), b"kept");
    assert!(!dir.join("app").exists());
    assert_eq!(count(&f.root.join("layers/sha256")), 1);

    // The same layer compressed differently: another blob, the same layer.
    let zst = zstd_compress(&tar);
    let lz = layer_ref(&zst, Compression::Zstd);
    f.pull(&zst, &lz, &diff_id).unwrap();
    assert!(f.store.has_blob(&lz.digest));
    assert_eq!(count(&f.root.join("blobs/sha256")), 2);
    assert_eq!(count(&f.root.join("layers/sha256")), 1);

    // The blob is still verified: tampered, truncated or overlong, it is not stored.
    let plain = tar.clone();
    let lp = layer_ref(&plain, Compression::None);
    let mut bad = plain.clone();
    bad[600] ^= 1;
    assert_mismatch(&f.pull(&bad, &lp, &diff_id).unwrap_err());
    assert_mismatch(&f.pull(&plain[..100], &lp, &diff_id).unwrap_err());
    let mut long = plain.clone();
    long.push(0);
    assert_mismatch(&f.pull(&long, &lp, &diff_id).unwrap_err());
    assert!(!f.store.has_blob(&lp.digest));
    assert_eq!(count(&f.root.join("blobs/sha256")), 2);
    f.assert_no_leftovers();
}

#[test]
fn pull_layer_read_error_commits_nothing() {
    for c in [Compression::Gzip, Compression::Zstd, Compression::None] {
        let tar = base_layer();
        let blob = compress(&tar, c);
        let lr = layer_ref(&blob, c);
        for at in [0, blob.len() / 2, blob.len() - 1] {
            // The connection breaks for good: the download error is reported (the content was never verified).
            let f = fixture();
            let err = f
                .store
                .pull_layer(
                    Chunked::failing_at(&blob, at, true),
                    &lr,
                    &sha(&tar),
                    "layer",
                )
                .unwrap_err();
            match &err {
                ImageError::Io { context, source } => {
                    assert!(context.contains("download"), "{err}");
                    assert!(source.to_string().contains("connection reset"), "{err}");
                }
                other => panic!("{c:?} at {at}: expected Io, got {other}"),
            }
            f.assert_nothing_committed();

            // The stream ends after the error: a short blob.
            let f = fixture();
            let err = f
                .store
                .pull_layer(
                    Chunked::failing_at(&blob, at, false),
                    &lr,
                    &sha(&tar),
                    "layer",
                )
                .unwrap_err();
            let (what, _, actual) = assert_mismatch(&err);
            assert!(what.ends_with("(size)"), "{err}");
            assert_eq!(actual, at.to_string());
            f.assert_nothing_committed();
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Leases

#[test]
fn leases_keep_unreferenced_content() {
    let f = fixture();
    let tar = app_layer("leased");
    let blob = gzip(&tar);
    let lr = layer_ref(&blob, Compression::Gzip);
    let diff_id = sha(&tar);
    let both = f.store.lease([lr.digest.clone(), diff_id.clone()]);
    let layer_only = f.store.lease([diff_id.clone()]);
    f.pull(&blob, &lr, &diff_id).unwrap();

    // No record references them, but they are leased.
    f.store.collect_garbage(&HashSet::new()).unwrap();
    assert!(f.store.has_blob(&lr.digest) && f.store.has_layer(&diff_id));
    assert_eq!(
        f.store.prune(false, &HashSet::new()).unwrap(),
        PruneReport::default()
    );
    assert_eq!(
        f.store.prune(true, &HashSet::new()).unwrap(),
        PruneReport::default()
    );
    assert!(f.store.has_blob(&lr.digest) && f.store.has_layer(&diff_id));

    // Released: collected, unless another lease still holds it.
    drop(both);
    let blob_bytes = disk_bytes(&f.blob_path(&lr.digest));
    let r = f.store.prune(false, &HashSet::new()).unwrap();
    assert_eq!((r.blobs_removed, r.layers_removed), (1, 0));
    assert_eq!(r.reclaimed_bytes, blob_bytes);
    assert!(!f.store.has_blob(&lr.digest));
    assert!(f.store.has_layer(&diff_id));

    drop(layer_only);
    f.store.collect_garbage(&HashSet::new()).unwrap();
    assert!(!f.store.has_layer(&diff_id));
    assert_eq!(count(&f.root.join("layers/sha256")), 0);
    assert!(lock(&f.store.leases).is_empty());
}

#[test]
fn leases_count_duplicates() {
    let f = fixture();
    let tar = app_layer("dup");
    let blob = gzip(&tar);
    let lr = layer_ref(&blob, Compression::Gzip);
    let a = f.store.lease([lr.digest.clone(), lr.digest.clone()]);
    let b = f.store.lease([lr.digest.clone()]);
    f.pull(&blob, &lr, &sha(&tar)).unwrap();
    drop(a);
    f.store.collect_garbage(&HashSet::new()).unwrap();
    assert!(f.store.has_blob(&lr.digest));
    drop(b);
    assert!(lock(&f.store.leases).is_empty());
    f.store.collect_garbage(&HashSet::new()).unwrap();
    assert!(!f.store.has_blob(&lr.digest));
}

#[test]
fn leases_survive_image_removal() {
    let f = fixture();
    let p = publish(
        &[
            (base_layer(), Compression::Gzip),
            (app_layer("a"), Compression::Gzip),
        ],
        "a",
    );
    let img = p.pull(&f.store, "reg.test/a:1");
    // Another pull in progress relies on the app layer (blob and directory).
    let lease = f
        .store
        .lease([p.layers[1].digest.clone(), p.diff_ids[1].clone()]);
    f.store.remove("reg.test/a:1").unwrap();
    assert!(!f.store.has_blob(&img.digest));
    assert!(!f.store.has_blob(&img.config_digest));
    assert!(!f.store.has_blob(&p.layers[0].digest));
    assert!(!f.store.has_layer(&p.diff_ids[0]));
    assert!(f.store.has_blob(&p.layers[1].digest));
    assert!(f.store.has_layer(&p.diff_ids[1]));
    drop(lease);
    f.store.collect_garbage(&HashSet::new()).unwrap();
    assert_eq!(count(&f.root.join("blobs/sha256")), 0);
    assert_eq!(count(&f.root.join("layers/sha256")), 0);
}

#[test]
fn leases_race_with_garbage_collection() {
    // Pulls that lease first never lose content to a concurrent collection or prune.
    let f = fixture();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let gc = s.spawn(|| {
            let mut rounds = 0u32;
            let mut all = false;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.store.collect_garbage(&HashSet::new()).unwrap();
                f.store.prune(all, &HashSet::new()).unwrap();
                all = !all;
                rounds += 1;
            }
            rounds
        });
        for i in 0..8 {
            let p = publish(
                &[
                    (base_layer(), Compression::Gzip),
                    (app_layer(&format!("race {i}")), Compression::Zstd),
                ],
                "x",
            );
            let mut digests = vec![p.manifest_digest.clone(), p.config_digest.clone()];
            digests.extend(p.layers.iter().map(|l| l.digest.clone()));
            digests.extend(p.diff_ids.iter().cloned());
            let lease = f.store.lease(digests);
            p.fetch(&f.store);
            let img = f
                .store
                .commit_pulled(&p.pulled(
                    "reg.test/race:1",
                    &format!("reg.test/race@{}", p.manifest_digest),
                ))
                .unwrap();
            drop(lease);
            assert_eq!(img.digest, p.manifest_digest);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(gc.join().unwrap() > 0);
    });
    f.store.prune(true, &HashSet::new()).unwrap();
    assert_eq!(count(&f.root.join("blobs/sha256")), 0);
    assert_eq!(count(&f.root.join("layers/sha256")), 0);
    f.assert_no_leftovers();
}

// ---------------------------------------------------------------------------------------------------------------
// commit_pulled

#[test]
fn commit_pulled_records_and_references() {
    let f = fixture();
    let p = publish(
        &[
            (base_layer(), Compression::Gzip),
            (app_layer("app"), Compression::Zstd),
        ],
        "serve",
    );
    let index_digest = sha(b"an index");
    p.fetch(&f.store);
    let img = f
        .store
        .commit_pulled(&p.pulled("reg.test/app:1", &format!("reg.test/app@{index_digest}")))
        .unwrap();
    assert_eq!(img.digest, p.manifest_digest);
    assert_eq!(img.config_digest, p.config_digest);
    assert_eq!(img.references, vec!["reg.test/app:1".to_owned()]);
    assert_eq!(
        img.repo_digests,
        vec![format!("reg.test/app@{index_digest}")]
    );
    assert_eq!(img.layers, p.diff_ids);
    assert_eq!(
        img.size,
        p.blobs.iter().map(|b| b.len() as u64).sum::<u64>()
    );
    assert_eq!(img.config.cmd, vec!["serve"]);
    assert_eq!(
        img.platform,
        format!("linux/{}", super::source::host_arch())
    );
    assert!(f
        .root
        .join("images")
        .join(format!("{}.json", &img.digest[7..]))
        .is_file());
    assert_eq!(
        f.store.reference_digest("reg.test/app:1").as_deref(),
        Some(p.manifest_digest.as_str())
    );
    assert_eq!(f.store.reference_digest("reg.test/app:2"), None);
    let resolved = f.store.resolve("reg.test/app:1").unwrap();
    assert_eq!(resolved.repo_digests, img.repo_digests);
    assert!(f.store.layer_dirs(&resolved).iter().all(|d| d.is_dir()));

    // Pulled again from a mirror under another name: repo digests of both repositories are kept.
    let img = f
        .store
        .commit_pulled(&p.pulled(
            "mirror.test/app:1",
            &format!("mirror.test/app@{index_digest}"),
        ))
        .unwrap();
    assert_eq!(
        img.references,
        vec!["mirror.test/app:1".to_owned(), "reg.test/app:1".to_owned()]
    );
    assert_eq!(
        img.repo_digests,
        vec![
            format!("mirror.test/app@{index_digest}"),
            format!("reg.test/app@{index_digest}")
        ]
    );
    // The same repository serving the image under another digest (a re-pushed index): replaced, not added.
    let other_index = sha(b"another index");
    let img = f
        .store
        .commit_pulled(&p.pulled("reg.test/app:1", &format!("reg.test/app@{other_index}")))
        .unwrap();
    assert_eq!(
        img.repo_digests,
        vec![
            format!("mirror.test/app@{index_digest}"),
            format!("reg.test/app@{other_index}")
        ]
    );
    assert_eq!(
        f.store.resolve(&img.digest).unwrap().repo_digests,
        img.repo_digests
    );
    assert_eq!(f.store.list().unwrap().len(), 1);

    // A tag moving to a new image leaves the old one nameless (collected once unused).
    let q = publish(&[(app_layer("v2"), Compression::Gzip)], "v2");
    let img2 = q.pull(&f.store, "reg.test/app:1");
    assert_eq!(img2.references, vec!["reg.test/app:1".to_owned()]);
    assert_eq!(
        f.store.resolve(&p.manifest_digest).unwrap().references,
        vec!["mirror.test/app:1".to_owned()]
    );
}

#[test]
fn commit_pulled_refuses_incomplete_pulls() {
    let f = fixture();
    let p = publish(
        &[
            (base_layer(), Compression::Gzip),
            (app_layer("inc"), Compression::Gzip),
        ],
        "x",
    );
    let pulled = p.pulled(
        "reg.test/inc:1",
        &format!("reg.test/inc@{}", p.manifest_digest),
    );
    let refused = |what: &str| {
        let err = f.store.commit_pulled(&pulled).unwrap_err();
        assert!(err.to_string().contains(what), "{err}");
        assert_eq!(f.store.reference_digest("reg.test/inc:1"), None);
        assert_eq!(count(&f.root.join("images")), 0);
    };

    // Nothing stored: the config cannot be read.
    refused(&p.config_digest);
    p.fetch(&f.store);

    // A layer directory missing.
    let dir = f.layer_path(&p.diff_ids[1]);
    let aside = f.t.path().join("aside");
    fs::rename(&dir, &aside).unwrap();
    refused("not unpacked");
    fs::rename(&aside, &dir).unwrap();

    // The manifest missing.
    let manifest = f.blob_path(&p.manifest_digest);
    fs::rename(&manifest, &aside).unwrap();
    refused("not stored");
    fs::rename(&aside, &manifest).unwrap();

    // Layers that do not match the config's diff_ids.
    let mut short = pulled.clone();
    short.layers.pop();
    let err = f.store.commit_pulled(&short).unwrap_err();
    assert!(err.to_string().contains("diff_ids"), "{err}");

    let img = f.store.commit_pulled(&pulled).unwrap();
    assert_eq!(img.references, vec!["reg.test/inc:1".to_owned()]);
}

#[test]
fn config_diff_ids_checked() {
    let f = fixture();
    let p = publish(&[(app_layer("c"), Compression::Gzip)], "c");
    assert_eq!(
        f.store.config_diff_ids(&p.config, 1, "cfg").unwrap(),
        p.diff_ids
    );
    let err = f.store.config_diff_ids(&p.config, 2, "cfg").unwrap_err();
    assert!(
        err.to_string()
            .contains("1 diff_ids but the manifest has 2"),
        "{err}"
    );
    let bad = to_vec(&json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": ["md5:abc"]}}));
    assert!(f.store.config_diff_ids(&bad, 1, "cfg").is_err());
    assert!(f.store.config_diff_ids(b"{", 0, "cfg").is_err());
}

#[test]
fn put_and_read_blob() {
    let f = fixture();
    let doc = br#"{"hello":"world"}"#;
    let err = f.store.put_blob(doc, &sha(b"other"), "doc").unwrap_err();
    assert_mismatch(&err);
    assert_eq!(count(&f.root.join("blobs/sha256")), 0);
    assert_eq!(count(&f.root.join("ingest")), 0);
    assert!(!f.store.has_blob(&sha(doc)));
    f.store.put_blob(doc, &sha(doc), "doc").unwrap();
    assert!(f.store.has_blob(&sha(doc)));
    assert_eq!(f.store.read_blob(&sha(doc), "doc").unwrap(), doc);
    // Idempotent.
    f.store.put_blob(doc, &sha(doc), "doc").unwrap();
    assert!(f.store.read_blob("sha256:zz", "doc").is_err());
    assert!(f.store.read_blob(&sha(b"missing"), "doc").is_err());
    assert!(!f.store.has_blob("sha256:zz") && !f.store.has_layer("nonsense"));
}

// ---------------------------------------------------------------------------------------------------------------
// usage and prune

#[test]
fn usage_matches_disk_and_splits_shared_bytes() {
    let f = fixture();
    let pa = publish(
        &[
            (base_layer(), Compression::Gzip),
            (app_layer("a"), Compression::Gzip),
        ],
        "a",
    );
    let pb = publish(
        &[
            (base_layer(), Compression::Gzip),
            (app_layer("b"), Compression::Zstd),
        ],
        "b",
    );
    let a = pa.pull(&f.store, "reg.test/a:1");
    let b = pb.pull(&f.store, "reg.test/b:1");
    assert_eq!(pa.layers[0].digest, pb.layers[0].digest);

    let u = f.store.usage(&HashSet::new()).unwrap();
    let blobs_dir = f.root.join("blobs/sha256");
    let layers_dir = f.root.join("layers/sha256");
    assert_eq!(u.blobs, 7); // 2 manifests, 2 configs, 3 layer blobs
    assert_eq!(u.blobs, count(&blobs_dir) as u64);
    assert_eq!(u.layers, 3);
    assert_eq!(u.layers, count(&layers_dir) as u64);
    assert_eq!(u.blob_bytes, dir_bytes(&blobs_dir));
    assert_eq!(u.layer_bytes, dir_bytes(&layers_dir));
    assert!(u.blob_bytes > 0 && u.layer_bytes > 0);
    assert_eq!(u.reclaimable_bytes, 0);

    let own = |p: &Published, img: &StoredImage| -> u64 {
        disk_bytes(&f.blob_path(&img.digest))
            + disk_bytes(&f.blob_path(&img.config_digest))
            + disk_bytes(&f.blob_path(&p.layers[1].digest))
            + disk_bytes(&f.layer_path(&p.diff_ids[1]))
    };
    let shared =
        disk_bytes(&f.blob_path(&pa.layers[0].digest)) + disk_bytes(&f.layer_path(&pa.diff_ids[0]));
    assert_eq!(u.images.len(), 2);
    let (ua, ub) = (&u.images[0], &u.images[1]);
    assert_eq!(ua.references, vec!["reg.test/a:1".to_owned()]);
    assert_eq!(ua.digest, a.digest);
    assert_eq!(ub.digest, b.digest);
    assert_eq!(ua.unique_bytes, own(&pa, &a));
    assert_eq!(ua.total_bytes, own(&pa, &a) + shared);
    assert_eq!(ub.unique_bytes, own(&pb, &b));
    assert_eq!(ub.total_bytes, own(&pb, &b) + shared);
    assert_eq!(
        ua.unique_bytes + ub.unique_bytes + shared,
        u.blob_bytes + u.layer_bytes
    );

    // Content no image uses (a pull that never finished) is reclaimable and counted.
    let orphan_tar = app_layer("orphan");
    let orphan = gzip(&orphan_tar);
    let lr = layer_ref(&orphan, Compression::Gzip);
    f.pull(&orphan, &lr, &sha(&orphan_tar)).unwrap();
    let u2 = f.store.usage(&HashSet::new()).unwrap();
    assert_eq!((u2.blobs, u2.layers), (8, 4));
    assert_eq!(
        u2.reclaimable_bytes,
        disk_bytes(&f.blob_path(&lr.digest)) + disk_bytes(&f.layer_path(&sha(&orphan_tar)))
    );
    assert_eq!(u2.images, u.images);

    // Once B goes, the base layer is A's alone.
    f.store.remove("reg.test/b:1").unwrap();
    let u3 = f.store.usage(&HashSet::new()).unwrap();
    assert_eq!(u3.images.len(), 1);
    assert_eq!(u3.images[0].unique_bytes, u3.images[0].total_bytes);
    assert_eq!(u3.images[0].total_bytes, ua.total_bytes);
}

#[test]
fn usage_counts_uncompressed_and_repeated_layers_once() {
    // An uncompressed layer's blob digest is its diff_id; an image may list the same layer twice. Neither makes
    // content look shared, and the blob and the directory are both counted.
    let f = fixture();
    let tar = app_layer("plain");
    let p = publish(
        &[
            (tar.clone(), Compression::None),
            (tar.clone(), Compression::None),
        ],
        "p",
    );
    assert_eq!(p.layers[0].digest, p.diff_ids[0]);
    let img = p.pull(&f.store, "reg.test/plain:1");
    let u = f.store.usage(&HashSet::new()).unwrap();
    assert_eq!((u.blobs, u.layers), (3, 1));
    let expected = disk_bytes(&f.blob_path(&img.digest))
        + disk_bytes(&f.blob_path(&img.config_digest))
        + disk_bytes(&f.blob_path(&p.layers[0].digest))
        + disk_bytes(&f.layer_path(&p.diff_ids[0]));
    assert_eq!(u.images.len(), 1);
    assert_eq!(u.images[0].total_bytes, expected);
    assert_eq!(u.images[0].unique_bytes, expected);
    assert_eq!(expected, u.blob_bytes + u.layer_bytes);
}

#[test]
fn prune_keeps_named_and_in_use_images() {
    let f = fixture();
    let pa = publish(
        &[
            (base_layer(), Compression::Gzip),
            (app_layer("a"), Compression::Gzip),
        ],
        "a",
    );
    let pb = publish(
        &[
            (base_layer(), Compression::Gzip),
            (app_layer("b"), Compression::Gzip),
        ],
        "b",
    );
    let pc = publish(&[(app_layer("c"), Compression::Gzip)], "c");
    let a = pa.pull(&f.store, "reg.test/a:1");
    let b = pb.pull(&f.store, "reg.test/b:1");
    let c = pc.pull(&f.store, "reg.test/c:1");

    // Named images stay.
    assert_eq!(
        f.store.prune(false, &HashSet::new()).unwrap(),
        PruneReport::default()
    );
    assert_eq!(f.store.list().unwrap().len(), 3);

    // C loses its name but a sandbox runs on it: listed (nameless) by usage, kept by a prune that knows it.
    let c_in_use = set(&[c.digest.as_str()]);
    f.store.remove_keeping("reg.test/c:1", &c_in_use).unwrap();
    let u = f.store.usage(&c_in_use).unwrap();
    assert_eq!(u.images.len(), 3);
    assert!(u
        .images
        .iter()
        .any(|i| i.digest == c.digest && i.references.is_empty()));
    assert_eq!(
        f.store.prune(false, &c_in_use).unwrap(),
        PruneReport::default()
    );
    assert!(f.store.has_layer(&pc.diff_ids[0]));
    // Its content is reclaimable once nothing uses it; a plain prune then removes it.
    let unused = f.store.usage(&HashSet::new()).unwrap();
    assert_eq!(unused.images.len(), 2);
    let c_bytes = disk_bytes(&f.blob_path(&c.digest))
        + disk_bytes(&f.blob_path(&c.config_digest))
        + disk_bytes(&f.blob_path(&pc.layers[0].digest))
        + disk_bytes(&f.layer_path(&pc.diff_ids[0]));
    assert_eq!(unused.reclaimable_bytes, c_bytes);
    let r = f.store.prune(false, &HashSet::new()).unwrap();
    assert_eq!(r.images_removed, vec![c.digest.clone()]);
    assert_eq!((r.blobs_removed, r.layers_removed), (3, 1));
    assert_eq!(r.reclaimed_bytes, c_bytes);
    assert!(!f.store.has_layer(&pc.diff_ids[0]));

    // prune --all drops the names of every image not in use: A (in use) stays, B goes, the shared base stays.
    let before = f.store.usage(&HashSet::new()).unwrap();
    let b_unique = before
        .images
        .iter()
        .find(|i| i.digest == b.digest)
        .unwrap()
        .unique_bytes;
    let a_in_use = set(&[a.digest.as_str()]);
    let r = f.store.prune(true, &a_in_use).unwrap();
    assert_eq!(r.images_removed, vec![b.digest.clone()]);
    assert_eq!((r.blobs_removed, r.layers_removed), (3, 1));
    assert_eq!(r.reclaimed_bytes, b_unique);
    assert_eq!(f.store.resolve("reg.test/a:1").unwrap().digest, a.digest);
    assert!(matches!(
        f.store.resolve("reg.test/b:1"),
        Err(ImageError::NotFound(_))
    ));
    assert!(f.store.layer_dirs(&a).iter().all(|d| d.is_dir()));
    assert!(!f.store.has_layer(&pb.diff_ids[1]));
    assert_eq!(count(&f.root.join("blobs/sha256")), 4);
    assert_eq!(count(&f.root.join("layers/sha256")), 2);

    // Nothing in use: everything goes.
    let r = f.store.prune(true, &HashSet::new()).unwrap();
    assert_eq!(r.images_removed, vec![a.digest.clone()]);
    assert_eq!((r.blobs_removed, r.layers_removed), (4, 2));
    assert!(f.store.list().unwrap().is_empty());
    assert_eq!(count(&f.root.join("blobs/sha256")), 0);
    assert_eq!(count(&f.root.join("layers/sha256")), 0);
    assert_eq!(count(&f.root.join("images")), 0);
    let u = f.store.usage(&HashSet::new()).unwrap();
    assert_eq!(u, super::DiskUsage::default());
}
