//! Every bad input of a registry pull, end to end through a real daemon: the exact error code and HTTP
//! status, a message naming the image and the cause, nothing partial left in the image store (no ingest
//! or temporary files, no unfinished layer directories, no committed blob or layer of the failed
//! content), and the daemon still pulling fine afterwards. A failed pull may keep the manifest and
//! config it already verified (unreferenced, like the completed layers of a failed multi-layer pull,
//! until the next garbage collection): each test lists exactly which.
//!
//! The real test registry (`$SANDBOXD_TEST_REGISTRY`, see `scripts/test`) serves as a mirror of
//! `docker.io`; the error paths it cannot produce come from [`FakeRegistry`].

use std::collections::BTreeSet;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use sandbox_tests::fake_registry::{
    foreign_platform_index, host_arch, image_for, invalid_json_manifest,
    manifest_missing_layer_digest, sha256_digest, simple_image, FakeRegistry, ImageParts,
    SIMPLE_FILE,
};
use sandbox_tests::oci::Registry;
use sandbox_tests::sandbox_proto::client::ClientError;
use sandbox_tests::sandbox_proto::{ApiError, ErrorCode, PullImageRequest, PullResult};
use sandbox_tests::{expect_api_error, test_registry, Daemon};

// ------------------------------------------------------------------------------------------ helpers

fn pull_platform(
    d: &Daemon,
    reference: &str,
    platform: Option<&str>,
) -> Result<PullResult, ClientError> {
    d.client().pull_image(&PullImageRequest {
        reference: reference.to_owned(),
        platform: platform.map(str::to_owned),
    })
}

fn pull(d: &Daemon, reference: &str) -> Result<PullResult, ClientError> {
    pull_platform(d, reference, None)
}

#[track_caller]
fn pull_ok(d: &Daemon, reference: &str) -> PullResult {
    pull(d, reference).unwrap_or_else(|e| panic!("pulling {reference}: {e}\n{}", d.log_text()))
}

/// `sha256:<hex>` → `<hex>`, the name a blob or layer has in the store.
fn hex(digest: &str) -> String {
    digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("not a sha256 digest: {digest}"))
        .to_owned()
}

/// Committed content of the image store: the entries of `images/blobs/sha256` and
/// `images/layers/sha256` (hidden ones included).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Content {
    blobs: BTreeSet<String>,
    layers: BTreeSet<String>,
}

fn entries(dir: &Path) -> BTreeSet<String> {
    match fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

fn content(d: &Daemon) -> Content {
    let store = d.state_dir.join("images");
    Content {
        blobs: entries(&store.join("blobs/sha256")),
        layers: entries(&store.join("layers/sha256")),
    }
}

/// Asserts that since `before` no layer directory and no blob appeared, except the blobs `documents`
/// (digests of verified manifests and configs that a failed pull may keep until the next garbage
/// collection, as its layers do).
#[track_caller]
fn assert_nothing_new(d: &Daemon, before: &Content, documents: &[&str]) {
    let after = content(d);
    let allowed: BTreeSet<String> = documents.iter().map(|d| hex(d)).collect();
    let new_blobs: Vec<&String> = after
        .blobs
        .difference(&before.blobs)
        .filter(|b| !allowed.contains(*b))
        .collect();
    let new_layers: Vec<&String> = after.layers.difference(&before.layers).collect();
    assert!(
        new_blobs.is_empty() && new_layers.is_empty(),
        "a failed pull committed blobs {new_blobs:?} and layers {new_layers:?}"
    );
    assert_eq!(
        d.image_store_leftovers(),
        Vec::<String>::new(),
        "unfinished image store content after a failed pull"
    );
}

/// Pulls `reference` expecting `code` (with its HTTP status) and a message containing every one of
/// `names` (the image and the cause); checks that nothing new is committed but `documents` (see
/// [`assert_nothing_new`]) and that nothing unfinished is left, right after the answer.
#[track_caller]
fn pull_fails(
    d: &Daemon,
    reference: &str,
    code: ErrorCode,
    names: &[&str],
    documents: &[&str],
) -> ApiError {
    let before = content(d);
    let e = expect_api_error(pull(d, reference), code, code.http_status());
    for n in names {
        assert!(
            e.message.contains(n),
            "the error does not name {n:?}: {}",
            e.message
        );
    }
    assert_nothing_new(d, &before, documents);
    e
}

/// A loopback port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    l.local_addr().expect("local address").port()
}

/// `Authorization: Basic base64(user:pass)`.
fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// `%XX` escapes decoded (enough for the query strings asserted on here).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| {
            std::str::from_utf8(h)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        });
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The Docker config directory the harness points the daemon at (`DOCKER_CONFIG`).
fn docker_config_dir(d: &Daemon) -> PathBuf {
    d.state_dir.with_file_name("docker-config")
}

fn write_docker_config(path: &Path, registry: &str, entry: &serde_json::Value) {
    fs::create_dir_all(path.parent().expect("a parent")).expect("creating the config directory");
    let cfg = serde_json::json!({ "auths": { registry: entry } });
    fs::write(path, serde_json::to_vec_pretty(&cfg).expect("json")).expect("writing config.json");
}

/// A one-layer image whose layer holds a `size`-byte file of pseudo-random (incompressible-looking)
/// bytes seeded by `seed`, so that it has a digest of its own.
fn big_image(reg: &FakeRegistry, repo: &str, size: usize, seed: u32) -> (ImageParts, Vec<u8>) {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    let data: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let parts = image_for(reg, repo, "v1", host_arch(), &[("big.bin", &data)]);
    (parts, data)
}

/// The `Range` header of each GET of `path`, in order.
fn get_ranges(reg: &FakeRegistry, path: &str) -> Vec<Option<String>> {
    reg.requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == path)
        .map(|r| r.header("range").map(str::to_owned))
        .collect()
}

fn blob_path(repo: &str, digest: &str) -> String {
    format!("/v2/{repo}/blobs/{digest}")
}

/// A unpacked layer file of the store.
fn layer_file(d: &Daemon, diff_id: &str, name: &str) -> PathBuf {
    d.state_dir
        .join("images/layers/sha256")
        .join(hex(diff_id))
        .join(name)
}

// ------------------------------------------------------------------------------- 1. not found

/// Unknown repository and unknown tag on the real registry, reached as the `docker.io` mirror: the
/// mirror's 404 wins over the unreachable upstream (no network here), and is quoted in the message.
#[test]
fn unknown_repository_and_tag_are_image_not_found() {
    let reg = test_registry();
    let mirror = format!("http://{reg}");
    let d = Daemon::start_mirrored("");
    for (reference, canonical, path) in [
        (
            "nosuchrepo:1",
            "docker.io/library/nosuchrepo:1",
            "/v2/library/nosuchrepo/manifests/1",
        ),
        (
            "python:nosuchtag",
            "docker.io/library/python:nosuchtag",
            "/v2/library/python/manifests/nosuchtag",
        ),
    ] {
        // The message quotes the mirror's answer to the manifest request (distribution answers
        // MANIFEST_UNKNOWN for both; NAME_UNKNOWN is as good for an unknown repository) and also says
        // that the registry itself could not be reached.
        let e = pull_fails(
            &d,
            reference,
            ErrorCode::ImageNotFound,
            &[
                canonical,
                &format!("{mirror}{path}"),
                "https://index.docker.io",
            ],
            &[],
        );
        assert!(
            ["answered MANIFEST_UNKNOWN", "answered NAME_UNKNOWN"]
                .iter()
                .any(|a| e.message.contains(a)),
            "the mirror's 404 answer is not quoted: {}",
            e.message
        );
        assert_eq!(
            e.details.as_ref().map(|d| d["reference"].clone()),
            Some(canonical.into()),
            "{e:?}"
        );
    }
    assert!(content(&d).blobs.is_empty() && content(&d).layers.is_empty());
    let r = pull_ok(&d, "busybox:latest");
    assert!(
        r.image
            .references
            .contains(&"docker.io/library/busybox:latest".to_owned()),
        "{r:?}"
    );
}

// ---------------------------------------------------------------------------- 2. unreachable

#[test]
fn closed_port_is_registry_unreachable() {
    let d = Daemon::start();
    let port = closed_port();
    let reference = format!("127.0.0.1:{port}/team/app:1");
    pull_fails(
        &d,
        &reference,
        ErrorCode::RegistryUnreachable,
        &[&reference, "Connection refused"],
        &[],
    );
    assert!(content(&d).blobs.is_empty());
}

// ---------------------------------------------------------------------------------- 3. auth

#[test]
fn deny_all_is_registry_unauthorized() {
    let reg = FakeRegistry::start();
    let parts = simple_image(&reg, "private/app", "v1");
    reg.deny_all();
    let d = Daemon::start();
    pull_fails(
        &d,
        &parts.reference,
        ErrorCode::RegistryUnauthorized,
        &[&parts.reference, "access", "refused"],
        &[],
    );
    assert!(
        reg.requests().iter().any(|r| r.path == "/token"),
        "the token endpoint was not asked: {:?}",
        reg.requests()
    );
    assert_eq!(
        reg.count("GET", &blob_path("private/app", &parts.layer_digest)),
        0
    );
}

/// Basic auth: refused without credentials; with `auth` = base64(user:pass) for `127.0.0.1:PORT` in
/// `$DOCKER_CONFIG/config.json` (read at every pull) the same daemon pulls.
#[test]
fn basic_auth_needs_the_docker_config_credentials() {
    let reg = FakeRegistry::start();
    let parts = simple_image(&reg, "private/app", "v1");
    reg.require_basic("alice", "s3cret");
    let d = Daemon::start();
    pull_fails(
        &d,
        &parts.reference,
        ErrorCode::RegistryUnauthorized,
        &[&parts.reference],
        &[],
    );
    assert!(reg
        .requests()
        .iter()
        .all(|r| r.header("authorization").is_none()));

    let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    write_docker_config(
        &docker_config_dir(&d).join("config.json"),
        &reg.addr(),
        &serde_json::json!({ "auth": auth }),
    );
    let r = pull_ok(&d, &parts.reference);
    assert_eq!(r.image.digest, parts.manifest_digest);
    assert_eq!(r.layers_downloaded, 1);
    let layer = blob_path("private/app", &parts.layer_digest);
    let want = basic("alice", "s3cret");
    let gets: Vec<_> = reg
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == layer)
        .collect();
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert_eq!(gets[0].header("authorization"), Some(want.as_str()));
    assert_eq!(
        fs::read(layer_file(&d, &parts.diff_id, SIMPLE_FILE.0)).expect("the layer's file"),
        SIMPLE_FILE.1
    );
}

/// Bearer token flow with credentials (given by `[pull] docker_config`): refused without them; with
/// them the token endpoint is asked with the Basic credentials and the pull succeeds.
#[test]
fn bearer_token_flow_with_credentials() {
    let reg = FakeRegistry::start();
    let parts = simple_image(&reg, "team/app", "v2");
    reg.require_bearer(Some(("bob", "pw")));
    let auth_dir = tempfile::tempdir().expect("temp dir");
    let auth_file = auth_dir.path().join("auth.json");
    let d = Daemon::start_with_config(Some(&format!(
        "[pull]\ndocker_config = \"{}\"\n",
        auth_file.display()
    )));
    pull_fails(
        &d,
        &parts.reference,
        ErrorCode::RegistryUnauthorized,
        &[&parts.reference],
        &[],
    );
    let want = basic("bob", "pw");
    assert!(
        !reg.requests()
            .iter()
            .any(|r| r.header("authorization") == Some(want.as_str())),
        "credentials were sent before any were configured"
    );

    write_docker_config(
        &auth_file,
        &reg.addr(),
        &serde_json::json!({ "username": "bob", "password": "pw" }),
    );
    let r = pull_ok(&d, &parts.reference);
    assert_eq!(r.image.digest, parts.manifest_digest);
    let token_asks: Vec<_> = reg
        .requests()
        .into_iter()
        .filter(|r| r.path == "/token" && r.header("authorization") == Some(want.as_str()))
        .collect();
    assert!(
        !token_asks.is_empty(),
        "the token endpoint was never asked with the Basic credentials: {:?}",
        reg.requests()
    );
    assert!(
        token_asks[0]
            .query
            .as_deref()
            .is_some_and(|q| percent_decode(q).contains("scope=repository:team/app:pull")),
        "{token_asks:?}"
    );
    let layer = blob_path("team/app", &parts.layer_digest);
    let gets: Vec<_> = reg
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == layer)
        .collect();
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert_eq!(
        gets[0].header("authorization"),
        Some("Bearer fake-registry-token")
    );
}

// ------------------------------------------------------------------------ 4. malformed manifest

#[test]
fn malformed_manifests_are_invalid_image() {
    let reg = FakeRegistry::start();
    invalid_json_manifest(&reg, "bad/img", "json");
    manifest_missing_layer_digest(&reg, "bad/img", "nodigest");
    let d = Daemon::start();
    let reference = reg.reference("bad/img", "json");
    pull_fails(
        &d,
        &reference,
        ErrorCode::InvalidImage,
        &[&reference, "manifest"],
        &[],
    );
    let reference = reg.reference("bad/img", "nodigest");
    pull_fails(
        &d,
        &reference,
        ErrorCode::InvalidImage,
        &[&reference, "digest"],
        &[],
    );
    // The valid image next to them pulls.
    let r = pull_ok(&d, &reg.reference("bad/img", "nodigest-valid"));
    assert_eq!(r.layers_downloaded, 1);
}

// --------------------------------------------------------------------------- 5. platform

#[test]
fn index_for_another_platform_only_is_platform_not_found() {
    let reg = FakeRegistry::start();
    let idx = foreign_platform_index(&reg, "multi/app", "latest");
    let d = Daemon::start();
    let host = format!("linux/{}", host_arch());
    let e = pull_fails(
        &d,
        &idx.reference,
        ErrorCode::PlatformNotFound,
        &[&idx.reference, &host],
        &[],
    );
    let details = e.details.expect("details");
    let available: Vec<&str> = details["available"]
        .as_array()
        .unwrap_or_else(|| panic!("details.available: {details}"))
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(available, [idx.platform.as_str()], "{details}");
    assert_eq!(details["reference"], idx.reference.as_str(), "{details}");
    assert_eq!(
        reg.count("GET", &blob_path("multi/app", &idx.image.layer_digest)),
        0
    );
    // Asked for explicitly, the foreign image pulls.
    let r = pull_platform(&d, &idx.reference, Some(&idx.platform))
        .unwrap_or_else(|e| panic!("pulling {} for {}: {e}", idx.reference, idx.platform));
    assert_eq!(r.image.digest, idx.image.manifest_digest);
    assert_eq!(r.resolved_digest, idx.index_digest);
}

// --------------------------------------------------------------------------- 6. digests

/// A tampered layer blob (same length, one byte changed) is DIGEST_MISMATCH naming the layer digest; no
/// blob or layer of it is committed; once the registry serves the real bytes, the pull succeeds.
#[test]
fn tampered_layer_is_digest_mismatch() {
    let reg = FakeRegistry::start();
    let parts = simple_image(&reg, "evil/app", "v1");
    let mut tampered = parts.layer.clone();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x55;
    reg.put_blob_as("evil/app", &parts.layer_digest, tampered);
    let d = Daemon::start();
    pull_fails(
        &d,
        &parts.reference,
        ErrorCode::DigestMismatch,
        &[&parts.reference, &parts.layer_digest],
        // The manifest and the config are authentic and verified.
        &[&parts.manifest_digest, &parts.config_digest],
    );
    assert!(!content(&d).blobs.contains(&hex(&parts.layer_digest)));
    assert!(!content(&d).layers.contains(&hex(&parts.diff_id)));

    reg.put_blob_as("evil/app", &parts.layer_digest, parts.layer.clone());
    let r = pull_ok(&d, &parts.reference);
    assert_eq!(r.layers_downloaded, 1);
    assert_eq!(
        fs::read(layer_file(&d, &parts.diff_id, SIMPLE_FILE.0)).expect("the layer's file"),
        SIMPLE_FILE.1
    );
}

/// A tampered config blob (same length) is DIGEST_MISMATCH naming the config digest; no layer is
/// fetched and nothing but the (authentic) manifest is committed.
#[test]
fn tampered_config_is_digest_mismatch() {
    let reg = FakeRegistry::start();
    let parts = simple_image(&reg, "evil/conf", "v1");
    let text = String::from_utf8(parts.config.clone()).expect("utf-8 config");
    let tampered = text.replace("/bin/sh", "/bin/xx");
    assert_eq!(tampered.len(), text.len());
    assert_ne!(tampered, text);
    reg.put_blob_as("evil/conf", &parts.config_digest, tampered.into_bytes());
    let d = Daemon::start();
    pull_fails(
        &d,
        &parts.reference,
        ErrorCode::DigestMismatch,
        &[&parts.reference, &parts.config_digest],
        &[&parts.manifest_digest],
    );
    assert!(!content(&d).blobs.contains(&hex(&parts.config_digest)));
    assert_eq!(
        reg.count("GET", &blob_path("evil/conf", &parts.layer_digest)),
        0
    );

    reg.put_blob_as("evil/conf", &parts.config_digest, parts.config.clone());
    assert_eq!(
        pull_ok(&d, &parts.reference).image.digest,
        parts.manifest_digest
    );
}

// ----------------------------------------------------------------------- 7. truncation, resume

/// A blob truncated on every GET fails with REGISTRY_ERROR after `download_attempts` GETs, the later
/// ones resuming with `Range: bytes=<received>-`; nothing of the layer is committed.
#[test]
fn truncated_blob_is_registry_error_after_the_configured_attempts() {
    let reg = FakeRegistry::start();
    let (parts, _) = big_image(&reg, "cut/app", 300_000, 1);
    let served = 100_000;
    reg.truncate_blob("cut/app", &parts.layer_digest, served);
    let d = Daemon::start_with_config(Some("[pull]\ndownload_attempts = 2\n"));
    pull_fails(
        &d,
        &parts.reference,
        ErrorCode::RegistryError,
        &[&parts.reference, &parts.layer_digest, "2 attempts"],
        &[&parts.manifest_digest, &parts.config_digest],
    );
    let path = blob_path("cut/app", &parts.layer_digest);
    assert_eq!(
        get_ranges(&reg, &path),
        [None, Some(format!("bytes={served}-"))],
        "GETs of the truncated blob"
    );
    let c = content(&d);
    assert!(!c.blobs.contains(&hex(&parts.layer_digest)));
    assert!(!c.layers.contains(&hex(&parts.diff_id)));
}

/// A blob cut off on its first GET only: the second GET asks for the rest (`Range: bytes=N-`), the
/// registry sends only the rest (no restart from zero), and the pull succeeds with the right content.
#[test]
fn truncated_once_resumes_with_range() {
    let reg = FakeRegistry::start();
    let (parts, data) = big_image(&reg, "cut/resume", 300_000, 2);
    let served = 100_000;
    reg.truncate_blob_first("cut/resume", &parts.layer_digest, served, 1);
    let d = Daemon::start_with_config(Some("[pull]\ndownload_attempts = 2\n"));
    let r = pull_ok(&d, &parts.reference);
    assert_eq!(r.image.digest, parts.manifest_digest);
    let path = blob_path("cut/resume", &parts.layer_digest);
    assert_eq!(
        get_ranges(&reg, &path),
        [None, Some(format!("bytes={served}-"))],
        "GETs of the blob cut off once"
    );
    // Exactly the blob once: the cut-off prefix, then the rest.
    assert_eq!(reg.bytes_sent(&path), parts.layer.len() as u64);
    assert_eq!(r.downloaded_bytes, parts.layer.len() as u64);
    assert_eq!(
        fs::read(layer_file(&d, &parts.diff_id, "big.bin")).expect("the layer's file"),
        data
    );
    assert!(content(&d).blobs.contains(&hex(&parts.layer_digest)));
    assert_eq!(d.image_store_leftovers(), Vec::<String>::new());
}

// ------------------------------------------------------------------------------- 8. timeout

/// A blob that stalls after its response head: PULL_TIMEOUT at `pull.timeout_seconds`, and the
/// download's ingest file and unfinished layer directory are gone when the error is answered.
#[test]
fn stalled_blob_is_pull_timeout_and_cleaned_up() {
    let reg = FakeRegistry::start();
    let parts = simple_image(&reg, "slow/app", "v1");
    reg.stall_blob("slow/app", &parts.layer_digest);
    let d = Daemon::start_with_config(Some("[pull]\ntimeout_seconds = 2\n"));
    pull_fails(
        &d,
        &parts.reference,
        ErrorCode::PullTimeout,
        &[&parts.reference, "timeout_seconds"],
        &[&parts.manifest_digest, &parts.config_digest],
    );
    assert_eq!(
        reg.count("GET", &blob_path("slow/app", &parts.layer_digest)),
        1
    );
    let c = content(&d);
    assert!(!c.blobs.contains(&hex(&parts.layer_digest)));
    assert!(!c.layers.contains(&hex(&parts.diff_id)));
    // The daemon still answers.
    assert!(d
        .client()
        .images()
        .expect("listing images")
        .images
        .is_empty());
}

// ---------------------------------------------------------------------------------- 9. 5xx

#[test]
fn server_errors_are_registry_error() {
    let reg = FakeRegistry::start();
    let d = Daemon::start_with_config(Some("[pull]\ndownload_attempts = 2\n"));

    // Every blob (the config first) answers 500.
    let parts = simple_image(&reg, "broken/app", "v1");
    reg.status_for("/v2/broken/app/blobs/", 500);
    pull_fails(
        &d,
        &parts.reference,
        ErrorCode::RegistryError,
        &[&parts.reference, "500"],
        &[&parts.manifest_digest],
    );
    assert_eq!(
        reg.count("GET", &blob_path("broken/app", &parts.layer_digest)),
        0
    );

    // Only the layer answers 503: retried up to download_attempts, then REGISTRY_ERROR.
    let parts = simple_image(&reg, "broken/layer", "v1");
    let path = blob_path("broken/layer", &parts.layer_digest);
    reg.status_for(&path, 503);
    pull_fails(
        &d,
        &parts.reference,
        ErrorCode::RegistryError,
        &[&parts.reference, &parts.layer_digest, "503", "2 attempts"],
        &[&parts.manifest_digest, &parts.config_digest],
    );
    assert_eq!(reg.count("GET", &path), 2);

    // A healthy image of the same registry pulls, and the garbage collection after it drops the
    // documents the failed pulls kept.
    let good = simple_image(&reg, "fine/app", "v1");
    assert_eq!(
        pull_ok(&d, &good.reference).image.digest,
        good.manifest_digest
    );
    let want: BTreeSet<String> = [
        &good.manifest_digest,
        &good.config_digest,
        &good.layer_digest,
    ]
    .into_iter()
    .map(|d| hex(d))
    .collect();
    assert_eq!(content(&d).blobs, want);
}

// ------------------------------------------------------------------------------ 10. disk full

/// A tmpfs mounted for one test; unmounted (and its directory removed) when dropped, also on panic.
struct Tmpfs {
    mount_point: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sandboxd-pull-tmpfs-")
            .permissions(fs::Permissions::from_mode(0o755))
            .tempdir()
            .expect("temp dir");
        let mount_point = dir.path().join("fs");
        fs::create_dir(&mount_point).expect("creating the mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0755"))
            .arg("tmpfs")
            .arg(&mount_point)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            mount_point,
            _dir: dir,
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.mount_point.as_os_str().as_encoded_bytes())
            .expect("a path without NUL");
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the calls.
        if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
            // SAFETY: as above.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// The state directory on an 8 MiB tmpfs and `debian:bookworm` (47 MB) pulled: RESOURCE_EXHAUSTED with
/// `details.resource = "disk"`, nothing partial left, and the freed space serves a small pull after.
#[test]
fn disk_full_is_resource_exhausted() {
    let reg = test_registry();
    let fs = Tmpfs::mount("8m");
    let state_dir = fs.mount_point.join("d").join("state");
    let d = Daemon::start_with_state_dir(
        Some(&state_dir),
        Some(&format!(
            "[registries.\"docker.io\"]\nmirrors = [\"http://{reg}\"]\n"
        )),
    );
    // What the registry serves for it: a manifest, a config and one layer.
    let (_, manifest) = Registry::new(&reg)
        .get_manifest("library/debian", "bookworm")
        .expect("the debian manifest from the test registry");
    let manifest_digest = sha256_digest(&manifest);
    let m: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest JSON");
    let config_digest = m["config"]["digest"].as_str().expect("config digest");
    let layer_digest = m["layers"][0]["digest"].as_str().expect("layer digest");
    let e = pull_fails(
        &d,
        "debian:bookworm",
        ErrorCode::ResourceExhausted,
        &[
            "docker.io/library/debian:bookworm",
            layer_digest,
            "disk full",
        ],
        &[&manifest_digest, config_digest],
    );
    assert_eq!(
        e.details.as_ref().map(|d| d["resource"].clone()),
        Some("disk".into()),
        "{e:?}"
    );
    assert!(!content(&d).blobs.contains(&hex(layer_digest)));
    assert!(content(&d).layers.is_empty(), "{:?}", content(&d));
    // The daemon still answers, and the space of the failed download is free again.
    assert!(d
        .client()
        .images()
        .expect("listing images")
        .images
        .is_empty());
    let r = pull_ok(&d, "busybox:latest");
    assert_eq!(r.layers_downloaded, 1);
    drop(d);
    drop(fs);
}

// -------------------------------------------------------------------------- 11. mirror fallback

/// An unreachable first mirror, then the real registry as the second: the image comes from the
/// second mirror and the registry itself is never asked.
#[test]
fn unreachable_mirror_falls_back_to_the_next_mirror() {
    let real = test_registry();
    let upstream = FakeRegistry::start();
    let closed = closed_port();
    let d = Daemon::start_with_config(Some(&format!(
        "[registries.\"{}\"]\nmirrors = [\"http://127.0.0.1:{closed}\", \"http://{real}\"]\n",
        upstream.addr()
    )));
    let reference = format!("{}/library/busybox:latest", upstream.addr());
    let r = pull_ok(&d, &reference);
    assert!(r.image.references.contains(&reference), "{r:?}");
    assert_eq!(
        upstream.requests(),
        Vec::new(),
        "the registry itself was asked"
    );
}

/// A mirror that does not have the image (404) falls back to the registry itself.
#[test]
fn mirror_without_the_image_falls_back_to_the_registry() {
    let real = test_registry();
    let upstream = FakeRegistry::start();
    // Named for this registry's port: the mirror's log is shared by every test and run.
    let repo = format!(
        "only/upstream-{}",
        upstream.addr().rsplit(':').next().unwrap_or("0")
    );
    let parts = simple_image(&upstream, &repo, "v1");
    let d = Daemon::start_with_config(Some(&format!(
        "[registries.\"{}\"]\nmirrors = [\"http://{real}\"]\n",
        upstream.addr()
    )));
    let r = pull_ok(&d, &parts.reference);
    assert_eq!(r.image.digest, parts.manifest_digest);
    let manifest = format!("/v2/{repo}/manifests/v1");
    assert_eq!(upstream.count("GET", &manifest), 1);
    assert_eq!(
        upstream.count("GET", &blob_path(&repo, &parts.layer_digest)),
        1
    );
    // The mirror was asked first, and answered 404.
    let log = fs::read_to_string(sandbox_tests::test_registry_log()).expect("registry log");
    assert!(
        log.lines()
            .any(|l| l.contains(&manifest) && l.contains(" 404 ")),
        "the mirror's 404 for {manifest} is not in its log"
    );
}

// ----------------------------------------------------------------------------- 12. bad requests

#[test]
fn invalid_reference_and_platform_are_invalid_argument() {
    let reg = FakeRegistry::start();
    let parts = simple_image(&reg, "ok/app", "v1");
    let d = Daemon::start();
    let before = content(&d);

    let e = expect_api_error(pull(&d, "UPPER:case"), ErrorCode::InvalidArgument, 400);
    assert_eq!(
        e.details.as_ref().map(|d| d["field"].clone()),
        Some("reference".into()),
        "{e:?}"
    );
    assert!(e.message.contains("UPPER:case"), "{e:?}");

    for platform in ["linux", "linux/amd64/v1/extra", "linux/"] {
        let e = expect_api_error(
            pull_platform(&d, &parts.reference, Some(platform)),
            ErrorCode::InvalidArgument,
            400,
        );
        assert_eq!(
            e.details.as_ref().map(|d| d["field"].clone()),
            Some("platform".into()),
            "{e:?}"
        );
        assert!(e.message.contains(&format!("{platform:?}")), "{e:?}");
    }
    // Refused before any registry was asked.
    assert_eq!(reg.requests(), Vec::new());
    assert_nothing_new(&d, &before, &[]);
    // The same reference with a valid platform pulls.
    let host = format!("linux/{}", host_arch());
    let r =
        pull_platform(&d, &parts.reference, Some(&host)).expect("pulling with a valid platform");
    assert_eq!(r.image.digest, parts.manifest_digest);
}
