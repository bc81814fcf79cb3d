//! Registry pulls end to end: a real daemon pulls from the real test registry (Debian's `docker-registry` on
//! loopback, `$SANDBOXD_TEST_REGISTRY`, filled by `scripts/test-images`) as the mirror of `docker.io`, so the
//! public names (`python:3.11`, `debian:bookworm`, `busybox`) go through the whole pull path: mirror resolution,
//! index and platform choice, single-flight downloads, streaming unpack, the store, and sandboxes running on the
//! result. Hostile layers are pushed by the tests themselves (`hostile/<case>`, a fresh tag per run) and pulled
//! through the daemon.
//!
//! What the registry served is read from its access log (`$SANDBOXD_TEST_REGISTRY_LOG`, one line per request;
//! the daemon's requests carry its `sandboxd/` user agent). Tests that count requests for the public test images
//! hold [`exclusive_library`]; every other test that pulls them holds [`shared_library`], so no other pull in
//! this binary adds lines to a counted window. Hostile cases use their own repositories and need neither.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sandbox_tests::oci::{
    self, sha256_digest, Compression, Entry, Image, ImageConfig, Layer, LayerBuilder, Platform,
    Registry,
};
use sandbox_tests::sandbox_proto::client::BlockingClient;
use sandbox_tests::sandbox_proto::{
    ApiError, CreateSandboxRequest, ErrorCode, PullEvent, PullImageRequest, PullPolicy, PullResult,
    SandboxStatus,
};
use sandbox_tests::{
    create, exec, expect_api_error, json, sh, test_registry, test_registry_log, wait_exited, Daemon,
};
use serde_json::Value;

const PYTHON: &str = "python:3.11";
const PYTHON_REF: &str = "docker.io/library/python:3.11";
const DEBIAN: &str = "debian:bookworm";
const DEBIAN_REF: &str = "docker.io/library/debian:bookworm";
const BUSYBOX_REF: &str = "docker.io/library/busybox:latest";

// ------------------------------------------------------------------------------------------ helpers

/// Serialises the tests that count the registry's requests for the public test images against every other
/// test of this binary that pulls those images.
static LIBRARY: RwLock<()> = RwLock::new(());

/// For a test that pulls the public test images without counting requests.
fn shared_library() -> RwLockReadGuard<'static, ()> {
    LIBRARY.read().unwrap_or_else(|e| e.into_inner())
}

/// For a test that counts the registry's requests for the public test images.
fn exclusive_library() -> RwLockWriteGuard<'static, ()> {
    LIBRARY.write().unwrap_or_else(|e| e.into_inner())
}

/// A name no other test (or earlier run against the same registry) used.
fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn pull_req(reference: &str, platform: Option<&str>) -> PullImageRequest {
    PullImageRequest {
        reference: reference.to_owned(),
        platform: platform.map(str::to_owned),
    }
}

#[track_caller]
fn pull(c: &BlockingClient, reference: &str) -> PullResult {
    c.pull_image(&pull_req(reference, None))
        .unwrap_or_else(|e| panic!("pulling {reference}: {e:?}"))
}

fn sandbox_req(image: &str, pull: PullPolicy) -> CreateSandboxRequest {
    CreateSandboxRequest {
        image: image.to_owned(),
        pull,
        ..CreateSandboxRequest::default()
    }
}

fn details(e: &ApiError) -> &Value {
    e.details
        .as_ref()
        .unwrap_or_else(|| panic!("no details in {e:?}"))
}

fn hex_of(digest: &str) -> &str {
    digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("not a sha256 digest: {digest}"))
}

/// What the test registry serves, read directly (not through the daemon).
struct Upstream {
    reg: Registry,
}

impl Upstream {
    fn new() -> Self {
        Self {
            reg: Registry::new(&test_registry()),
        }
    }

    /// (digest, JSON) of the manifest or index `repo:reference`.
    fn manifest(&self, repo: &str, reference: &str) -> (String, Value) {
        let (_, bytes) = self.reg.get_manifest(repo, reference).unwrap_or_else(|e| {
            panic!("GET manifest {repo}:{reference} from the test registry: {e:#}")
        });
        (sha256_digest(&bytes), json(&bytes))
    }

    /// The manifest digest an index lists for `platform` (`os/arch[/variant]`).
    fn platform_digest(index: &Value, platform: &str) -> String {
        index["manifests"]
            .as_array()
            .expect("an index")
            .iter()
            .find(|m| platform_of(&m["platform"]) == platform)
            .unwrap_or_else(|| panic!("no {platform} in {index}"))["digest"]
            .as_str()
            .expect("digest")
            .to_owned()
    }

    /// `(digest, size)` of each layer of a manifest.
    fn layers(manifest: &Value) -> Vec<(String, u64)> {
        manifest["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|l| {
                (
                    l["digest"].as_str().expect("digest").to_owned(),
                    l["size"].as_u64().expect("size"),
                )
            })
            .collect()
    }
}

fn platform_of(p: &Value) -> String {
    let mut s = format!(
        "{}/{}",
        p["os"].as_str().unwrap_or_default(),
        p["architecture"].as_str().unwrap_or_default()
    );
    if let Some(v) = p["variant"].as_str() {
        s.push('/');
        s.push_str(v);
    }
    s
}

/// The registry's access log, as far as it goes.
///
/// The registry writes a request's access-log line when its handler returns, before the server flushes the last
/// bytes of the answer: once a client has the whole answer, the line is in the file. [`RegLog::settled`] checks
/// that on a request of its own before answering the lines, so a count taken after a pull returned includes
/// every request of that pull.
struct RegLog {
    path: PathBuf,
    upstream: Upstream,
}

impl RegLog {
    fn new() -> Self {
        Self {
            path: test_registry_log(),
            upstream: Upstream::new(),
        }
    }

    fn settled(&self) -> Vec<String> {
        let marker = sha256_digest(unique("sentinel").as_bytes());
        let found = self
            .upstream
            .reg
            .blob_exists("sandboxd-tests/sentinel", &marker)
            .expect("HEAD of the sentinel blob");
        assert!(!found, "the sentinel blob exists?");
        let text = fs::read_to_string(&self.path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.path.display()));
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        assert!(
            lines.iter().any(|l| l.contains(hex_of(&marker))),
            "the registry's access log ({}) has no line for a request that was already answered: the log \
             cannot be used to count requests",
            self.path.display()
        );
        lines
    }
}

/// Access-log lines of requests the daemon made (`sandboxd/` user agent) with `method` on a path containing
/// `needle` (for example `/blobs/sha256:…` or `library/python/manifests/3.11`).
fn daemon_requests(lines: &[String], method: &str, needle: &str) -> usize {
    let m = format!("\"{method} /v2/");
    lines
        .iter()
        .filter(|l| l.contains(&m) && l.contains(needle) && l.contains("\"sandboxd/"))
        .count()
}

fn blob_gets(lines: &[String], digest: &str) -> usize {
    daemon_requests(lines, "GET", &format!("/blobs/{digest}"))
}

fn layers_root(d: &Daemon) -> PathBuf {
    d.state_dir.join("images/layers/sha256")
}

fn layer_dir(d: &Daemon, diff_id: &str) -> PathBuf {
    layers_root(d).join(hex_of(diff_id))
}

fn blob_path(d: &Daemon, digest: &str) -> PathBuf {
    d.state_dir.join("images/blobs/sha256").join(hex_of(digest))
}

/// Every name in a store directory (hidden ones included).
fn names_in(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Blob files and layer directories the store holds (`sha256:<hex>` names only).
fn store_counts(d: &Daemon) -> (u64, u64) {
    let count = |dir: PathBuf| {
        names_in(&dir)
            .iter()
            .filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            .count() as u64
    };
    (
        count(d.state_dir.join("images/blobs/sha256")),
        count(layers_root(d)),
    )
}

/// Every path under `root` (not following symlinks), with its metadata.
fn walk(root: &Path) -> Vec<(PathBuf, fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                stack.push(p.clone());
            }
            out.push((p, m));
        }
    }
    out
}

/// Device nodes under `root` that are not overlayfs whiteouts (0/0 character devices).
fn device_nodes(root: &Path) -> Vec<String> {
    walk(root)
        .into_iter()
        .filter(|(_, m)| {
            let t = m.file_type();
            t.is_block_device() || (t.is_char_device() && m.rdev() != 0)
        })
        .map(|(p, m)| format!("{} (rdev {:#x})", p.display(), m.rdev()))
        .collect()
}

/// A directory on the host a hostile layer aims at; it exists, so a naive unpacker would succeed in writing
/// into it. Removed on drop.
struct Canary {
    dir: PathBuf,
}

impl Canary {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("sandboxd-canary"));
        fs::create_dir(&dir).expect("canary dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod canary");
        Self { dir }
    }

    /// A path inside, as a string for a symlink target or tar path.
    fn path(&self) -> String {
        self.dir.display().to_string()
    }

    fn contents(&self) -> BTreeSet<String> {
        names_in(&self.dir)
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Content hash, mtime and link count of a host file that hostile layers aim at (a hard link to it would raise
/// the count).
fn fingerprint(p: &str) -> (String, i64, i64, u64) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {p}: {e}"));
    let bytes = fs::read(p).unwrap_or_else(|e| panic!("read {p}: {e}"));
    (sha256_digest(&bytes), m.mtime(), m.mtime_nsec(), m.nlink())
}

/// Pushes a one-layer image made of `entries` (written raw, gzip) as `hostile/<case>:<fresh tag>`; answers the
/// reference to pull it by (the registry's own name: loopback, plain HTTP) and the layer.
fn push_layer_image(case: &str, entries: &[Entry]) -> (String, Layer) {
    push_layer_image_with(case, entries, Compression::Gzip)
}

fn push_layer_image_with(
    case: &str,
    entries: &[Entry],
    compression: Compression,
) -> (String, Layer) {
    let mut b = LayerBuilder::new();
    for e in entries {
        b.append(e).expect("append entry");
    }
    let layer = b.finish(compression).expect("layer");
    let image = Image::new(
        ImageConfig::new(Platform::host()).cmd(["/bin/sh"]),
        vec![layer.clone()],
    );
    let reg = test_registry();
    let tag = unique("t");
    let repo = format!("hostile/{case}");
    oci::push_image(&reg, &repo, &tag, &image)
        .unwrap_or_else(|e| panic!("pushing {repo}:{tag}: {e:#}"));
    (format!("{reg}/{repo}:{tag}"), layer)
}

/// Pulls a hostile image and checks that the pull was refused for `entry`, with nothing of the layer
/// committed and nothing of the pull left behind. Answers the error.
#[track_caller]
fn expect_hostile(d: &Daemon, reference: &str, layer: &Layer, entry: &str) -> ApiError {
    let c = d.client();
    let layers_before = names_in(&layers_root(d));
    let err = expect_api_error(
        c.pull_image(&pull_req(reference, None)),
        ErrorCode::HostileLayer,
        422,
    );
    eprintln!("{reference}: {}", err.message);
    assert_eq!(
        details(&err)["entry"],
        entry,
        "details.entry must name the offending entry: {err:?}"
    );
    assert!(
        err.message.contains(entry),
        "the message must name the offending entry {entry:?}: {}",
        err.message
    );
    assert_eq!(
        names_in(&layers_root(d)),
        layers_before,
        "a refused layer left something in layers/sha256"
    );
    assert!(
        !layer_dir(d, &layer.diff_id).exists(),
        "the hostile layer was committed"
    );
    assert!(
        !blob_path(d, &layer.digest).exists(),
        "the hostile layer's blob was committed"
    );
    assert_eq!(d.image_store_leftovers(), Vec::<String>::new());
    let images = c.images().expect("images").images;
    assert!(
        images
            .iter()
            .all(|i| i.layers.iter().all(|l| *l != layer.diff_id)),
        "an image with the hostile layer was stored: {images:?}"
    );
    err
}

// ------------------------------------------------------------------------------------------ public images

#[test]
fn python_by_public_name_pulls_through_the_mirror_and_runs() {
    let _lib = shared_library();
    let d = Daemon::start_mirrored("");
    let c = d.client();
    let up = Upstream::new();
    let (index_digest, index) = up.manifest("library/python", "3.11");
    let host = Platform::host().to_string();
    let manifest_digest = Upstream::platform_digest(&index, &host);
    let (got, manifest) = up.manifest("library/python", &manifest_digest);
    assert_eq!(got, manifest_digest);
    let layers = Upstream::layers(&manifest);
    assert_eq!(layers.len(), 2, "the test image has two layers: {manifest}");
    let total: u64 = layers.iter().map(|(_, s)| s).sum();

    let mut events: Vec<PullEvent> = Vec::new();
    let r = c
        .pull_image_progress(&pull_req(PYTHON, None), |ev| events.push(ev.clone()))
        .expect("pull python:3.11");
    assert_eq!(r.image.references, vec![PYTHON_REF.to_owned()]);
    assert_eq!(
        r.resolved_digest, index_digest,
        "resolved_digest is the index's"
    );
    assert_eq!(r.image.digest, manifest_digest, "the host's manifest");
    assert_eq!(
        r.image.config_digest,
        manifest["config"]["digest"]
            .as_str()
            .expect("config digest")
    );
    assert_eq!(r.image.platform, host);
    assert_eq!(r.image.layers.len(), 2);
    assert_eq!(
        r.image.repo_digests,
        vec![format!("docker.io/library/python@{index_digest}")]
    );
    assert_eq!(r.image.size, total);
    assert_eq!((r.layers_downloaded, r.layers_present), (2, 0));
    assert_eq!(r.downloaded_bytes, total);
    assert!(!r.joined);

    // The progress stream: resolved first, then per-layer progress ending in `done`, then the result.
    match events.first() {
        Some(PullEvent::Resolved {
            reference,
            resolved_digest,
            digest,
            platform,
            layers: ls,
        }) => {
            assert_eq!(reference, PYTHON_REF);
            assert_eq!(resolved_digest, &index_digest);
            assert_eq!(digest, &manifest_digest);
            assert_eq!(platform, &host);
            let listed: Vec<(String, u64)> =
                ls.iter().map(|l| (l.digest.clone(), l.size)).collect();
            assert_eq!(listed, layers);
        }
        other => panic!("first event is not `resolved`: {other:?}"),
    }
    assert_eq!(events.last(), Some(&PullEvent::Done(r.clone())));
    for (digest, size) in &layers {
        assert!(
            events.iter().any(|e| matches!(e, PullEvent::Layer(l)
                if &l.digest == digest
                    && l.status == sandbox_tests::sandbox_proto::LayerStatus::Done
                    && l.downloaded == *size)),
            "no `done` event for layer {digest}: {events:?}"
        );
    }
    for (diff_id, (digest, _)) in r.image.layers.iter().zip(&layers) {
        assert!(layer_dir(&d, diff_id).is_dir(), "layer {diff_id} unpacked");
        assert!(blob_path(&d, digest).is_file(), "blob {digest} stored");
    }
    assert_eq!(c.image(PYTHON).expect("lookup").digest, manifest_digest);

    let sb = create(&c, &sandbox_req(PYTHON, PullPolicy::Never));
    assert_eq!(sb.image, PYTHON_REF);
    assert_eq!(sb.image_digest, manifest_digest);
    let r = exec(&c, &sb.id, &["python", "-c", "print(1+1)"]);
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "2\n"), "{r:?}");
    let r = exec(&c, &sb.id, &["python3", "-m", "pip", "--version"]);
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert!(
        r.stdout.starts_with("pip ") && r.stdout.contains("(python 3.11)"),
        "{r:?}"
    );
    sh(
        &c,
        &sb.id,
        "test ! -e /usr/lib/python3.11/EXTERNALLY-MANAGED && test -x /usr/bin/python3.11",
    );
    c.delete(&sb.id, true).expect("delete");
}

#[test]
fn shared_base_layer_is_downloaded_once() {
    let _lib = exclusive_library();
    let d = Daemon::start_mirrored("");
    let c = d.client();
    let log = RegLog::new();
    let up = Upstream::new();
    let (_, debian_manifest) = up.manifest("library/debian", "bookworm");
    let (_, index) = up.manifest("library/python", "3.11");
    let (_, python_manifest) = up.manifest(
        "library/python",
        &Upstream::platform_digest(&index, &Platform::host().to_string()),
    );
    let base = Upstream::layers(&debian_manifest);
    let py = Upstream::layers(&python_manifest);
    assert_eq!(base.len(), 1);
    assert_eq!(py.len(), 2);
    assert_eq!(
        py[0], base[0],
        "premise: python:3.11's first layer is debian:bookworm's blob"
    );
    let (base_blob, top_blob) = (&base[0].0, &py[1].0);

    let debian = pull(&c, DEBIAN);
    assert_eq!(debian.image.references, vec![DEBIAN_REF.to_owned()]);
    assert_eq!((debian.layers_downloaded, debian.layers_present), (1, 0));
    assert_eq!(debian.downloaded_bytes, base[0].1);

    let before = log.settled();
    let python = pull(&c, PYTHON);
    let after = log.settled();
    assert_eq!(
        (python.layers_downloaded, python.layers_present),
        (1, 1),
        "{python:?}"
    );
    assert_eq!(python.downloaded_bytes, py[1].1);
    assert_eq!(python.image.layers[0], debian.image.layers[0]);
    assert_eq!(
        blob_gets(&after, base_blob),
        blob_gets(&before, base_blob),
        "the shared base layer was fetched again from the registry"
    );
    assert_eq!(
        blob_gets(&after, top_blob),
        blob_gets(&before, top_blob) + 1,
        "python's own layer is fetched exactly once"
    );

    // Again: the registry is asked (the tag may have moved), nothing is downloaded.
    let again = pull(&c, PYTHON);
    let last = log.settled();
    assert_eq!(again.image.digest, python.image.digest);
    assert_eq!(again.resolved_digest, python.resolved_digest);
    assert_eq!(again.downloaded_bytes, 0);
    assert_eq!(
        (again.layers_downloaded, again.layers_present),
        (0, 2),
        "{again:?}"
    );
    for b in [base_blob, top_blob] {
        assert_eq!(blob_gets(&last, b), blob_gets(&after, b), "{b} fetched");
    }
    let manifest_gets = |l: &[String]| daemon_requests(l, "GET", "/library/python/manifests/");
    assert!(
        manifest_gets(&last) > manifest_gets(&after),
        "a second pull must ask the registry again"
    );
}

#[test]
fn concurrent_pulls_share_one_download() {
    let _lib = exclusive_library();
    let d = Daemon::start_mirrored("");
    let log = RegLog::new();
    let up = Upstream::new();
    let (_, index) = up.manifest("library/python", "3.11");
    let (_, manifest) = up.manifest(
        "library/python",
        &Upstream::platform_digest(&index, &Platform::host().to_string()),
    );
    let layers = Upstream::layers(&manifest);
    let before = log.settled();

    const N: usize = 8;
    let barrier = Arc::new(Barrier::new(N));
    let threads: Vec<_> = (0..N)
        .map(|_| {
            let socket = d.socket.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let c = BlockingClient::new(&socket).expect("client");
                barrier.wait();
                c.pull_image(&pull_req(PYTHON, None))
            })
        })
        .collect();
    let results: Vec<PullResult> = threads
        .into_iter()
        .map(|t| t.join().expect("thread").expect("concurrent pull"))
        .collect();
    let after = log.settled();

    let first = &results[0];
    for r in &results {
        assert_eq!(r.image.digest, first.image.digest);
        assert_eq!(r.resolved_digest, first.resolved_digest);
        assert_eq!(r.image.references, vec![PYTHON_REF.to_owned()]);
    }
    let joined = results.iter().filter(|r| r.joined).count();
    eprintln!("{joined} of {N} concurrent pulls joined one in progress");
    assert!(
        results
            .iter()
            .any(|r| !r.joined && r.layers_downloaded == 2),
        "one pull downloaded both layers: {results:?}"
    );
    for (digest, _) in &layers {
        assert_eq!(
            blob_gets(&after, digest) - blob_gets(&before, digest),
            1,
            "layer {digest} must be fetched exactly once for {N} concurrent pulls"
        );
    }
    assert_eq!(
        d.client().images().expect("images").images.len(),
        1,
        "one image stored"
    );
}

#[test]
fn concurrent_creates_pull_a_missing_image_once() {
    let _lib = exclusive_library();
    let d = Daemon::start_mirrored("");
    let log = RegLog::new();
    let up = Upstream::new();
    let (_, index) = up.manifest("library/python", "3.11");
    let (_, manifest) = up.manifest(
        "library/python",
        &Upstream::platform_digest(&index, &Platform::host().to_string()),
    );
    let layers = Upstream::layers(&manifest);
    let before = log.settled();

    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let socket = d.socket.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let c = BlockingClient::new(&socket).expect("client");
                barrier.wait();
                // The default policy: pull when missing.
                c.create(&sandbox_req(PYTHON, PullPolicy::default()))
            })
        })
        .collect();
    let sandboxes: Vec<_> = threads
        .into_iter()
        .map(|t| t.join().expect("thread").expect("create pulling its image"))
        .collect();
    let after = log.settled();
    assert_ne!(sandboxes[0].id, sandboxes[1].id);
    assert_eq!(sandboxes[0].image_digest, sandboxes[1].image_digest);
    for (digest, _) in &layers {
        assert_eq!(
            blob_gets(&after, digest) - blob_gets(&before, digest),
            1,
            "layer {digest} must be fetched once for two creates"
        );
    }
    let c = d.client();
    for sb in &sandboxes {
        assert_eq!(sb.status, SandboxStatus::Running);
        let r = exec(&c, &sb.id, &["python3", "-c", "print('ran')"]);
        assert_eq!((r.exit_code, r.stdout.as_str()), (0, "ran\n"), "{r:?}");
    }
    assert_eq!(c.images().expect("images").images.len(), 1);
}

#[test]
fn pull_policies_on_create() {
    let _lib = exclusive_library();
    let d = Daemon::start_mirrored("");
    let c = d.client();
    let log = RegLog::new();
    let up = Upstream::new();
    let (_, manifest) = up.manifest("library/debian", "bookworm");
    let base_blob = Upstream::layers(&manifest)[0].0.clone();
    let manifest_gets = |l: &[String]| daemon_requests(l, "GET", "/library/debian/manifests/");
    let any_debian = |l: &[String]| {
        daemon_requests(l, "GET", "/library/debian/")
            + daemon_requests(l, "HEAD", "/library/debian/")
    };

    // never + missing: IMAGE_NOT_FOUND, the registry is not asked, nothing is left.
    let l0 = log.settled();
    let err = expect_api_error(
        c.create(&sandbox_req(DEBIAN, PullPolicy::Never)),
        ErrorCode::ImageNotFound,
        404,
    );
    assert!(err.message.contains("debian"), "{err:?}");
    let l1 = log.settled();
    assert_eq!(
        any_debian(&l1),
        any_debian(&l0),
        "`never` asked the registry"
    );
    assert!(c.list(&[], None).expect("list").sandboxes.is_empty());
    d.assert_only_sandboxes(&[]);
    assert!(c.images().expect("images").images.is_empty());

    // missing: pulls.
    let sb1 = create(&c, &sandbox_req(DEBIAN, PullPolicy::Missing));
    let l2 = log.settled();
    assert_eq!(blob_gets(&l2, &base_blob) - blob_gets(&l1, &base_blob), 1);
    assert!(manifest_gets(&l2) > manifest_gets(&l1));
    let version = sh(&c, &sb1.id, "cat /etc/debian_version");
    assert!(version.starts_with("12."), "{version}");

    // missing, stored: the registry is not asked.
    let sb2 = create(&c, &sandbox_req(DEBIAN, PullPolicy::Missing));
    let l3 = log.settled();
    assert_eq!(
        any_debian(&l3),
        any_debian(&l2),
        "`missing` asked the registry for a stored image"
    );

    // always: re-resolved at the registry, nothing downloaded.
    let sb3 = create(&c, &sandbox_req(DEBIAN, PullPolicy::Always));
    let l4 = log.settled();
    assert!(
        manifest_gets(&l4) > manifest_gets(&l3),
        "`always` must ask the registry"
    );
    assert_eq!(blob_gets(&l4, &base_blob), blob_gets(&l3, &base_blob));
    assert_eq!(
        daemon_requests(&l4, "GET", "/blobs/"),
        daemon_requests(&l3, "GET", "/blobs/"),
        "`always` downloaded blobs of a stored image"
    );
    for sb in [&sb1, &sb2, &sb3] {
        assert_eq!(sb.image_digest, sb1.image_digest);
        assert_eq!(sb.status, SandboxStatus::Running);
    }
    sh(&c, &sb3.id, "test -s /etc/os-release");
    assert_eq!(c.images().expect("images").images.len(), 1);
    d.assert_only_sandboxes(&[&sb1.id, &sb2.id, &sb3.id]);
}

#[test]
fn busybox_zstd_and_platform_choice() {
    let _lib = shared_library();
    let d = Daemon::start_mirrored("");
    let c = d.client();
    let up = Upstream::new();
    let (index_digest, index) = up.manifest("library/busybox", "latest");
    let host = Platform::host().to_string();
    let other = Platform::other_than_host().to_string();
    let host_digest = Upstream::platform_digest(&index, &host);
    let other_digest = Upstream::platform_digest(&index, &other);
    let (_, host_manifest) = up.manifest("library/busybox", &host_digest);
    assert_eq!(
        host_manifest["layers"][0]["mediaType"], "application/vnd.oci.image.layer.v1.tar+zstd",
        "premise: busybox's layer is zstd"
    );

    let r = pull(&c, "busybox");
    assert_eq!(r.image.references, vec![BUSYBOX_REF.to_owned()]);
    assert_eq!(r.resolved_digest, index_digest);
    assert_eq!(r.image.digest, host_digest);
    assert_eq!(r.image.platform, host);
    let mut req = sandbox_req("busybox", PullPolicy::Never);
    req.command = Some(vec!["sh".into(), "-c".into(), "echo ok".into()]);
    let sb = create(&c, &req);
    let done = wait_exited(&c, &sb.id);
    assert_eq!(done.exit.as_ref().and_then(|e| e.code), Some(0), "{done:?}");
    assert_eq!(c.logs(&sb.id).expect("logs").stdout, "ok\n");
    c.delete(&sb.id, false).expect("delete");

    // The other platform of the index: the placeholder image.
    let p = c
        .pull_image(&pull_req("busybox", Some(&other)))
        .expect("pull the other platform");
    assert_eq!(p.image.digest, other_digest);
    assert_eq!(p.image.platform, other);
    assert_eq!(p.resolved_digest, index_digest);
    assert_eq!(p.image.layers.len(), 1);
    let placeholder = layer_dir(&d, &p.image.layers[0]).join("PLACEHOLDER.txt");
    let text = fs::read_to_string(&placeholder)
        .unwrap_or_else(|e| panic!("{}: {e}", placeholder.display()));
    assert!(text.contains("placeholder image for"), "{text}");
    assert!(
        !layer_dir(&d, &r.image.layers[0])
            .join("PLACEHOLDER.txt")
            .exists(),
        "the host image is not the placeholder"
    );
    assert_eq!(c.image("busybox").expect("lookup").digest, other_digest);

    // A platform the index does not have.
    let err = expect_api_error(
        c.pull_image(&pull_req("busybox", Some("linux/s390x"))),
        ErrorCode::PlatformNotFound,
        404,
    );
    let det = details(&err);
    assert_eq!(det["platform"], "linux/s390x", "{err:?}");
    let available: Vec<&str> = det["available"]
        .as_array()
        .unwrap_or_else(|| panic!("details.available: {err:?}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for p in [&host, &other] {
        assert!(available.contains(&p.as_str()), "{p} not in {available:?}");
        assert!(err.message.contains(p.as_str()), "{}", err.message);
    }
}

#[test]
fn images_rmi_prune_and_disk_usage() {
    let _lib = shared_library();
    let d = Daemon::start_mirrored("");
    let c = d.client();
    let debian = pull(&c, DEBIAN);
    let python = pull(&c, PYTHON);
    let files = |d: &Daemon| store_counts(d);

    // images: name, digest, size and creation time, as the API and the table.
    let list = c.images().expect("images").images;
    assert_eq!(list.len(), 2, "{list:?}");
    for (name, pulled) in [("debian:bookworm", &debian), ("python:3.11", &python)] {
        let info = list
            .iter()
            .find(|i| i.digest == pulled.image.digest)
            .unwrap_or_else(|| panic!("{name} not listed: {list:?}"));
        assert_eq!(info, &pulled.image);
        assert!(info.size > 0 && info.created.is_some(), "{info:?}");
    }
    let table = d.ctl_ok(&["images"]);
    let header = table.lines().next().unwrap_or_default();
    for col in ["REFERENCE", "DIGEST", "SIZE", "CREATED"] {
        assert!(header.contains(col), "{table}");
    }
    for (name, pulled) in [("debian:bookworm", &debian), ("python:3.11", &python)] {
        let row = table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} not in:\n{table}"));
        assert!(row.contains(&hex_of(&pulled.image.digest)[..12]), "{row}");
        assert!(row.contains("MiB"), "size column: {row}");
        assert!(row.contains(" ago"), "created column: {row}");
    }

    // df: the base layer is shared, so debian's unique part is only its manifest and config.
    let df = c.image_usage().expect("df");
    let usage = |digest: &str| {
        df.images
            .iter()
            .find(|u| u.digest == digest)
            .unwrap_or_else(|| panic!("{digest} not in df: {df:?}"))
            .clone()
    };
    let (du, pu) = (usage(&debian.image.digest), usage(&python.image.digest));
    assert!(
        du.unique_bytes * 100 < du.total_bytes,
        "debian shares all but its manifest and config with python: {du:?}"
    );
    assert!(
        pu.unique_bytes > python.downloaded_bytes,
        "python's own layer (blob and unpacked) is unique to it: {pu:?}"
    );
    assert_eq!(
        du.total_bytes - du.unique_bytes,
        pu.total_bytes - pu.unique_bytes,
        "both share exactly the base layer: {df:?}"
    );
    assert_eq!((du.sandboxes, pu.sandboxes), (0, 0));
    assert_eq!(
        (df.blobs, df.layers),
        files(&d),
        "df against the files: {df:?}"
    );
    assert_eq!(df.layers, 2);
    assert_eq!(df.reclaimable_bytes, 0, "{df:?}");
    let text = d.ctl_ok(&["system", "df"]);
    assert!(
        text.lines().any(|l| l.starts_with("python:3.11")) && text.contains("Blobs: "),
        "{text}"
    );

    // rmi while a sandbox uses the image: refused; forced: untagged, the sandbox keeps running.
    let sb = create(&c, &sandbox_req(PYTHON, PullPolicy::Never));
    expect_api_error(c.remove_image(PYTHON, false), ErrorCode::ImageInUse, 409);
    let out = d.ctl(&["rmi", PYTHON]);
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("IMAGE_IN_USE"),
        "{out:?}"
    );
    d.ctl_ok(&["rmi", "-f", PYTHON]);
    expect_api_error(c.image(PYTHON), ErrorCode::ImageNotFound, 404);
    assert!(
        !d.ctl_ok(&["images"]).contains("python"),
        "python still listed"
    );
    let top = layer_dir(&d, &python.image.layers[1]);
    assert!(top.is_dir(), "the in-use layer must stay");
    let r = exec(&c, &sb.id, &["python3", "-c", "print(6*7)"]);
    assert_eq!(r.stdout, "42\n", "{r:?}");
    let df = c.image_usage().expect("df");
    let pu = df
        .images
        .iter()
        .find(|u| u.digest == python.image.digest)
        .unwrap_or_else(|| panic!("an untagged image in use is still counted: {df:?}"));
    assert!(pu.references.is_empty() && pu.sandboxes == 1, "{pu:?}");

    // A prune now keeps it (in use).
    let report = c.prune_images(false).expect("prune");
    assert!(
        !report.images_removed.contains(&python.image.digest),
        "{report:?}"
    );
    assert!(top.is_dir());
    sh(&c, &sb.id, "python3 -c 'import json'");

    // Once its last sandbox is deleted, the nameless image is collected at once (its unique content freed, the
    // shared base kept).
    c.delete(&sb.id, true).expect("delete");
    assert!(!top.exists(), "python's own layer outlived its last user");
    assert!(
        layer_dir(&d, &debian.image.layers[0]).is_dir(),
        "the base layer debian still uses must stay"
    );
    let df = c.image_usage().expect("df");
    assert_eq!((df.blobs, df.layers), files(&d), "{df:?}");
    assert_eq!((df.layers, df.images.len()), (1, 1), "{df:?}");
    assert_eq!(df.reclaimable_bytes, 0, "{df:?}");

    // A failed pull leaves the manifest and config it fetched: garbage that a plain prune reclaims.
    let (r, _) = push_layer_image("prune-garbage", &[Entry::file("../x", "x")]);
    expect_api_error(
        c.pull_image(&pull_req(&r, None)),
        ErrorCode::HostileLayer,
        422,
    );
    let df = c.image_usage().expect("df");
    assert_eq!((df.blobs, df.layers), files(&d), "{df:?}");
    assert!(df.reclaimable_bytes > 0, "{df:?}");
    let out = json(d.ctl_ok(&["--json", "image", "prune"]).as_bytes());
    assert_eq!(out["images_removed"], serde_json::json!([]), "{out}");
    assert_eq!(out["layers_removed"], 0, "{out}");
    assert!(out["blobs_removed"].as_u64().unwrap_or(0) >= 2, "{out}");
    assert_eq!(
        out["reclaimed_bytes"].as_u64(),
        Some(df.reclaimable_bytes),
        "prune frees what df called reclaimable: {out}"
    );
    let df = c.image_usage().expect("df");
    assert_eq!((df.blobs, df.layers), files(&d), "{df:?}");
    assert_eq!(df.reclaimable_bytes, 0, "{df:?}");
    assert_eq!(
        c.image(DEBIAN).expect("debian kept").digest,
        debian.image.digest
    );

    // prune -a removes the unused named image too.
    let out = json(d.ctl_ok(&["--json", "image", "prune", "-a"]).as_bytes());
    assert_eq!(
        out["images_removed"],
        serde_json::json!([debian.image.digest]),
        "{out}"
    );
    assert!(out["reclaimed_bytes"].as_u64().unwrap_or(0) > 0, "{out}");
    assert!(out["layers_removed"].as_u64() == Some(1), "{out}");
    let df = c.image_usage().expect("df");
    assert_eq!((df.blobs, df.layers), files(&d), "{df:?}");
    assert_eq!((df.blobs, df.layers, df.images.len()), (0, 0, 0), "{df:?}");
    assert!(c.images().expect("images").images.is_empty());
    let text = d.ctl_ok(&["image", "prune"]);
    assert!(text.contains("Removed 0 image(s)"), "{text}");
}

#[test]
fn cli_pull_and_run_pulling_first() {
    let _lib = shared_library();
    let up = Upstream::new();
    let (index_digest, _) = up.manifest("library/python", "3.11");
    {
        let d = Daemon::start_mirrored("");
        let out = d.ctl_ok(&["pull", PYTHON]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines
                .first()
                .is_some_and(|l| l.starts_with(PYTHON_REF) && l.contains("2 layer(s)")),
            "{out}"
        );
        let complete = lines
            .iter()
            .filter(|l| l.contains(": pull complete"))
            .count();
        assert_eq!(complete, 2, "one line per layer:\n{out}");
        assert!(
            lines.contains(&format!("Digest: {index_digest}").as_str()),
            "{out}"
        );
        assert!(
            out.contains(&format!("Status: Downloaded newer image for {PYTHON_REF}")),
            "{out}"
        );
        let again = d.ctl_ok(&["pull", PYTHON]);
        assert_eq!(
            again
                .lines()
                .filter(|l| l.contains(": already exists"))
                .count(),
            2,
            "{again}"
        );
        assert!(
            again.contains(&format!("Status: Image is up to date for {PYTHON_REF}")),
            "{again}"
        );
    }
    let d = Daemon::start_mirrored("");
    let out = d.ctl(&["run", "--rm", PYTHON, "--", "python", "-c", "print(6*7)"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n", "{out:?}");
    assert!(
        stderr.contains("Unable to find image 'python:3.11' locally"),
        "{stderr}"
    );
    assert!(
        stderr.matches(": pull complete").count() == 2,
        "progress on stderr: {stderr}"
    );
    assert_eq!(
        d.client().image(PYTHON).expect("stored").repo_digests,
        vec![format!("docker.io/library/python@{index_digest}")]
    );
    d.assert_only_sandboxes(&[]);
}

// ------------------------------------------------------------------------------------------ hostile layers

#[test]
fn hostile_path_traversal_is_refused() {
    let d = Daemon::start();
    let canary = Canary::new();
    let passwd = fingerprint("/etc/passwd");
    // `../x`: a naive unpacker writes next to the layer directory, into layers/sha256.
    let escape = format!("../{}", unique("sandboxd-escape"));
    let (r, layer) = push_layer_image(
        "traversal",
        &[
            Entry::dir("etc"),
            Entry::file("etc/ok", "fine\n"),
            Entry::file(&escape, "escaped\n"),
        ],
    );
    expect_hostile(&d, &r, &layer, &escape);
    assert!(
        !layers_root(&d).join(&escape[3..]).exists() && !d.state_dir.join(&escape[3..]).exists()
    );

    // Deep enough to reach the host's root from anywhere: into the canary.
    let deep = format!(
        "a/../../../../../../../../../../../..{}/pwned",
        canary.path()
    );
    let (r, layer) = push_layer_image(
        "traversal-deep",
        &[Entry::dir("a"), Entry::file(&deep, "pwned\n")],
    );
    expect_hostile(&d, &r, &layer, &deep);
    assert_eq!(
        canary.contents(),
        BTreeSet::new(),
        "written outside the store"
    );
    assert_eq!(fingerprint("/etc/passwd"), passwd);
}

#[test]
fn hostile_absolute_paths_land_inside_the_layer() {
    // A leading `/` is how many real layers name their entries: it is normalised into the layer root, not
    // refused. What matters is that nothing reaches the host's root.
    let d = Daemon::start();
    let c = d.client();
    let canary = Canary::new();
    let top = format!("/{}", unique("sandboxd-abs"));
    let in_canary = format!("{}/abs", canary.path());
    let (r, layer) = push_layer_image(
        "absolute",
        &[
            Entry::file(format!("{top}/file"), "inside\n"),
            Entry::file(&in_canary, "inside too\n"),
        ],
    );
    let p = c
        .pull_image(&pull_req(&r, None))
        .unwrap_or_else(|e| panic!("absolute paths are normalised, not refused: {e:?}"));
    assert_eq!(p.image.layers, vec![layer.diff_id.clone()]);
    let root = layer_dir(&d, &layer.diff_id);
    assert_eq!(
        fs::read_to_string(root.join(&top[1..]).join("file")).expect("in the layer"),
        "inside\n"
    );
    assert_eq!(
        fs::read_to_string(root.join(&in_canary[1..])).expect("in the layer"),
        "inside too\n"
    );
    assert!(!Path::new(&top).exists(), "{top} was created on the host");
    assert_eq!(
        canary.contents(),
        BTreeSet::new(),
        "written outside the store"
    );
}

#[test]
fn hostile_symlink_escapes_are_refused() {
    let d = Daemon::start();
    let passwd = fingerprint("/etc/passwd");
    for (case, relative) in [("symlink-absolute", false), ("symlink-relative", true)] {
        let canary = Canary::new();
        let target = if relative {
            format!("../../../../../../../../../../../..{}", canary.path())
        } else {
            canary.path()
        };
        // The symlink itself is stored as data; the write through it must be refused.
        let (r, layer) = push_layer_image(
            case,
            &[
                Entry::symlink("evil", &target),
                Entry::file("evil/pwned", "pwned\n"),
            ],
        );
        let err = expect_hostile(&d, &r, &layer, "evil/pwned");
        assert!(err.message.contains("symlink"), "{case}: {err:?}");
        assert_eq!(
            canary.contents(),
            BTreeSet::new(),
            "{case}: written outside"
        );

        // Deeper in the layer, and a directory entry below the link.
        let (r, layer) = push_layer_image(
            &format!("{case}-dir"),
            &[
                Entry::dir("d"),
                Entry::symlink("d/evil", &target),
                Entry::dir("d/evil/sub"),
                Entry::file("d/evil/sub/pwned", "pwned\n"),
            ],
        );
        expect_hostile(&d, &r, &layer, "d/evil/sub");
        assert_eq!(
            canary.contents(),
            BTreeSet::new(),
            "{case}: written outside"
        );
    }
    // A link to a host file, then a regular file of the same name: the link is replaced inside the layer,
    // the host file is untouched.
    let canary = Canary::new();
    let victim = canary.dir.join("victim");
    fs::write(&victim, "original\n").expect("victim");
    let (r, layer) = push_layer_image(
        "symlink-replaced",
        &[
            Entry::symlink("f", victim.display().to_string()),
            Entry::file("f", "layer's own\n"),
        ],
    );
    d.client()
        .pull_image(&pull_req(&r, None))
        .expect("a file replacing a symlink is fine");
    assert_eq!(fs::read_to_string(&victim).expect("victim"), "original\n");
    let f = layer_dir(&d, &layer.diff_id).join("f");
    assert!(fs::symlink_metadata(&f).expect("f").is_file());
    assert_eq!(fs::read_to_string(&f).expect("f"), "layer's own\n");
    assert_eq!(fingerprint("/etc/passwd"), passwd);
}

#[test]
fn hostile_hardlinks_out_of_the_layer_are_refused() {
    let d = Daemon::start();
    let passwd = fingerprint("/etc/passwd");
    let cases: [(&str, Vec<Entry>, &str); 4] = [
        (
            "hardlink-absolute",
            vec![Entry::hardlink("passwd", "/etc/passwd")],
            "passwd",
        ),
        (
            "hardlink-traversal",
            vec![
                Entry::dir("x"),
                Entry::hardlink("x/passwd", "../../etc/passwd"),
            ],
            "x/passwd",
        ),
        (
            // Through a symlink of the layer that points at the host's /etc.
            "hardlink-through-symlink",
            vec![
                Entry::symlink("hostetc", "/etc"),
                Entry::hardlink("passwd", "hostetc/passwd"),
            ],
            "passwd",
        ),
        (
            // To a symlink of the layer (a hard link to a symlink would carry the host path along).
            "hardlink-to-symlink",
            vec![
                Entry::symlink("l", "/etc/passwd"),
                Entry::hardlink("passwd", "l"),
            ],
            "passwd",
        ),
    ];
    for (case, entries, entry) in cases {
        let (r, layer) = push_layer_image(case, &entries);
        let err = expect_hostile(&d, &r, &layer, entry);
        assert!(err.message.contains("hardlink"), "{case}: {err:?}");
        assert_eq!(
            fingerprint("/etc/passwd"),
            passwd,
            "{case}: /etc/passwd changed (content, mtime or link count)"
        );
    }
}

#[test]
fn hostile_whiteouts_are_refused() {
    let d = Daemon::start();
    let canary = Canary::new();
    let victim = canary.dir.join("victim");
    fs::write(&victim, "keep me\n").expect("victim");
    let cases: Vec<(&str, Vec<Entry>, String)> = vec![
        (
            // `.wh.` + `..`: a whiteout of the parent directory.
            "whiteout-dotdot",
            vec![Entry::dir("a"), Entry::file("a/.wh...", "")],
            "a/.wh...".to_owned(),
        ),
        (
            "whiteout-dotdot-root",
            vec![Entry::file(".wh...", "")],
            ".wh...".to_owned(),
        ),
        (
            // A whiteout whose path climbs out of the root.
            "whiteout-climbs",
            vec![Entry::dir("a"), Entry::file("a/../../.wh.passwd", "")],
            "a/../../.wh.passwd".to_owned(),
        ),
        (
            // A whiteout name used as a directory.
            "whiteout-as-dir",
            vec![Entry::file(".wh.x/y", "")],
            ".wh.x/y".to_owned(),
        ),
        (
            // Deleting a host file through a symlink.
            "whiteout-through-symlink",
            vec![
                Entry::symlink("evil", canary.path()),
                Entry::file("evil/.wh.victim", ""),
            ],
            "evil/.wh.victim".to_owned(),
        ),
        (
            // Marking a host directory opaque through a symlink.
            "opaque-through-symlink",
            vec![
                Entry::symlink("evil", canary.path()),
                Entry::opaque_whiteout("evil"),
            ],
            "evil/.wh..wh..opq".to_owned(),
        ),
    ];
    for (case, entries, entry) in cases {
        let (r, layer) = push_layer_image(case, &entries);
        expect_hostile(&d, &r, &layer, &entry);
        assert_eq!(
            fs::read_to_string(&victim).map_err(|e| e.kind()),
            Ok("keep me\n".to_owned()),
            "{case}: the host file was removed or replaced"
        );
        assert!(
            fs::metadata(&victim).expect("victim").file_type().is_file(),
            "{case}"
        );
        assert_eq!(
            xattr::get(&canary.dir, "trusted.overlay.opaque").expect("getxattr"),
            None,
            "{case}: the host directory was marked opaque"
        );
        assert_eq!(
            canary.contents(),
            BTreeSet::from(["victim".to_owned()]),
            "{case}"
        );
    }
}

#[test]
fn device_nodes_are_never_created() {
    let d = Daemon::start();
    let c = d.client();
    let (r, layer) = push_layer_image(
        "devices",
        &[
            Entry::dir("dev"),
            Entry::char_device("dev/null", 1, 3),
            Entry::char_device("dev/mem", 1, 1),
            Entry::block_device("dev/sda", 8, 0),
            Entry::char_device("devnull-at-root", 1, 3),
            Entry::file("etc/ok", "ok\n"),
        ],
    );
    let layers_before = names_in(&layers_root(&d));
    match c.pull_image(&pull_req(&r, None)) {
        // Skipped: the rest of the layer is there, the devices are not.
        Ok(p) => {
            assert_eq!(p.image.layers, vec![layer.diff_id.clone()]);
            let root = layer_dir(&d, &layer.diff_id);
            assert_eq!(
                fs::read_to_string(root.join("etc/ok")).expect("etc/ok"),
                "ok\n"
            );
            for p in ["dev/null", "dev/mem", "dev/sda", "devnull-at-root"] {
                assert!(
                    fs::symlink_metadata(root.join(p)).is_err(),
                    "{p} exists in the layer"
                );
            }
        }
        // Refused: then like any hostile layer, naming a device entry.
        Err(e) => {
            let e = e.api_error().cloned().unwrap_or_else(|| panic!("{e:?}"));
            assert_eq!(e.code, ErrorCode::HostileLayer, "{e:?}");
            assert!(
                details(&e)["entry"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("dev") && s != "dev"),
                "{e:?}"
            );
            assert_eq!(names_in(&layers_root(&d)), layers_before);
        }
    }
    let nodes = device_nodes(&d.state_dir.join("images"));
    assert!(nodes.is_empty(), "device nodes in the store: {nodes:?}");
}

#[test]
fn layer_with_50000_entries() {
    let d = Daemon::start();
    let c = d.client();
    const DIRS: usize = 50;
    const PER_DIR: usize = 1000;
    let mut entries = Vec::with_capacity(DIRS * (PER_DIR + 1));
    for i in 0..DIRS {
        entries.push(Entry::dir(format!("d{i:02}")));
        for j in 0..PER_DIR {
            entries.push(Entry::file(
                format!("d{i:02}/f{j:04}"),
                format!("{i}/{j}\n"),
            ));
        }
    }
    // zstd: quicker to make than gzip in a debug build of the tests.
    let (r, layer) = push_layer_image_with("many-entries", &entries, Compression::Zstd);
    let started = Instant::now();
    let p = c
        .pull_image(&pull_req(&r, None))
        .unwrap_or_else(|e| panic!("pulling a 50,000-entry layer: {e:?}"));
    eprintln!(
        "pulled a layer of {} entries ({} bytes compressed) in {:?}",
        DIRS * (PER_DIR + 1),
        layer.size,
        started.elapsed()
    );
    assert_eq!(p.image.layers, vec![layer.diff_id.clone()]);
    let root = layer_dir(&d, &layer.diff_id);
    let all = walk(&root);
    assert_eq!(
        all.len(),
        DIRS * (PER_DIR + 1),
        "entries in the unpacked layer"
    );
    assert_eq!(
        all.iter().filter(|(_, m)| m.is_file()).count(),
        DIRS * PER_DIR
    );
    for (i, j) in [(0, 0), (17, 423), (49, 999)] {
        let f = root.join(format!("d{i:02}/f{j:04}"));
        assert_eq!(fs::read_to_string(&f).expect("file"), format!("{i}/{j}\n"));
    }
}

// ------------------------------------------------------------------------------------------ host exposure

/// Runs `sh -c script` as `nobody` (65534:65534, no supplementary groups) on the host; (exit code, output).
fn as_nobody(script: &str) -> (Option<i32>, String) {
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .uid(65534)
        .gid(65534)
        .current_dir("/")
        .output()
        .expect("running sh as nobody");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

/// Image content is root's on the host (owners, setuid bits, world-writable directories, as the image says).
/// An unprivileged host user must not be able to use it: a setuid-root program of any pulled image would be a
/// root shell for every local user, and a world-writable directory of a layer (every Debian image's `/tmp`) would
/// let any local user change what all sandboxes of that image see.
#[test]
fn pulled_layers_are_out_of_reach_of_unprivileged_host_users() {
    let d = Daemon::start();
    let c = d.client();
    // A setuid-root copy of the host's `id`: `id -u` prints the effective uid.
    let mut id_bin = Vec::new();
    fs::File::open("/usr/bin/id")
        .and_then(|mut f| f.read_to_end(&mut id_bin))
        .expect("reading /usr/bin/id");
    let (r, layer) = push_layer_image(
        "setuid",
        &[
            Entry::dir("bin"),
            Entry::file("bin/rootid", &id_bin).with_mode(0o4755),
            Entry::dir("tmp").with_mode(0o1777),
        ],
    );
    c.pull_image(&pull_req(&r, None)).expect("pull");
    let root = layer_dir(&d, &layer.diff_id);
    let meta = fs::metadata(root.join("bin/rootid")).expect("rootid");
    assert_eq!(
        (meta.uid(), meta.mode() & 0o7777),
        (0, 0o4755),
        "premise: the layer keeps the image's owner and mode"
    );

    let mut problems = Vec::new();
    let (code, out) = as_nobody(&format!("{}/bin/rootid -u", root.display()));
    if code == Some(0) {
        problems.push(format!(
            "nobody ran the image's setuid-root program from the store, effective uid {:?}",
            out.trim()
        ));
    }
    let planted = root.join("tmp").join(unique("planted"));
    let (code, _) = as_nobody(&format!("echo x > {}", planted.display()));
    if code == Some(0) || planted.exists() {
        problems.push(format!(
            "nobody wrote {} into the shared layer",
            planted.display()
        ));
        let _ = fs::remove_file(&planted);
    }
    let modes: BTreeMap<String, String> = [
        d.state_dir.clone(),
        d.state_dir.join("images"),
        d.state_dir.join("images/layers"),
        layers_root(&d),
        root.clone(),
    ]
    .iter()
    .map(|p| {
        (
            p.display().to_string(),
            format!(
                "{:o}",
                fs::metadata(p).map(|m| m.mode() & 0o7777).unwrap_or(0)
            ),
        )
    })
    .collect();
    assert!(
        problems.is_empty(),
        "pulled image content is usable by unprivileged host users:\n- {}\nmodes on the way: {modes:#?}",
        problems.join("\n- ")
    );
}
