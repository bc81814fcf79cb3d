//! Files of a running sandbox (read, write, streamed, atomic, resolved inside the sandbox's root), and the
//! create-time `mounted_files` (read-only) and `volumes` (size-limited tmpfs).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};

use base64::Engine as _;
use sandbox_tests::sandbox_proto::client::BlockingClient;
use sandbox_tests::sandbox_proto::{
    CreateSandboxRequest, ErrorCode, ImportImageRequest, MountedFile, SandboxStatus, VolumeSpec,
};
use sandbox_tests::{
    busybox, create, create_idle, exec, expect_api_error, field_of, proc_status_field, sh,
    wait_exited, Daemon,
};
use sha2::{Digest, Sha256};

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A raw request; answers the status and body.
fn raw(
    c: &BlockingClient,
    method: &str,
    uri: &str,
    body: Option<&[u8]>,
) -> (u16, serde_json::Value) {
    let (status, bytes) = c
        .request_raw(method, uri, body.map(<[u8]>::to_vec))
        .expect("raw request");
    let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, v)
}

#[test]
fn write_and_read_back_with_parents_and_mode() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "files-rt");
    let data: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let info = c
        .write_file(&sb.id, "/data/sub/blob.bin", &data, Some(0o600))
        .expect("write");
    assert_eq!(
        (info.path.as_str(), info.size, info.mode),
        ("/data/sub/blob.bin", 100_000, 0o600)
    );
    assert_eq!(
        c.read_file(&sb.id, "/data/sub/blob.bin").expect("read"),
        data
    );
    // As the sandbox sees it: owned by its root, the mode asked for, parents 0755.
    assert_eq!(
        sh(
            &c,
            &sb.id,
            "stat -c '%a %u %g' /data/sub/blob.bin /data/sub /data"
        ),
        "600 0 0\n755 0 0\n755 0 0\n"
    );
    // Replacing keeps the mode unless one is given; the name (by name, too) and `..` resolve lexically.
    let info = c
        .write_file("files-rt", "/data/x/../sub/blob.bin", b"short", None)
        .expect("overwrite");
    assert_eq!((info.size, info.mode), (5, 0o600));
    let mut out = Vec::new();
    let got = c
        .read_file_to(&sb.id, "/data/sub/./blob.bin", &mut out)
        .expect("read_file_to");
    assert_eq!(
        (out.as_slice(), got.size, got.mode),
        (&b"short"[..], 5, 0o600)
    );
    // A new file without a mode is 0644; an empty body is an empty file.
    let info = c.write_file(&sb.id, "/empty", b"", None).expect("empty");
    assert_eq!((info.size, info.mode), (0, 0o644));
    assert_eq!(c.read_file(&sb.id, "/empty").expect("read empty"), b"");
    // parents=false and a missing parent.
    let (status, v) = raw(
        &c,
        "PUT",
        &format!("/v1/sandboxes/{}/files?path=/nope/f&parents=false", sb.id),
        Some(b"x"),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("FILE_NOT_FOUND"))
    );
    // What exec wrote, the API reads (and the other way round).
    sh(&c, &sb.id, "printf 'from exec' > /tmp/e.txt");
    assert_eq!(
        c.read_file(&sb.id, "/tmp/e.txt").expect("read"),
        b"from exec"
    );
    c.write_file(&sb.id, "/tmp/script.sh", b"echo from api\n", Some(0o755))
        .expect("write script");
    assert_eq!(sh(&c, &sb.id, "/tmp/script.sh"), "from api\n");
    c.delete(&sb.id, true).expect("delete");
    d.assert_only_sandboxes(&[]);
}

#[test]
fn cli_cp_both_ways_and_through_stdio() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    create_idle(&c, "files-cp");
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("in.txt");
    std::fs::write(&src, b"copied in\n").expect("write local");
    std::fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o640))
        .expect("chmod");
    d.ctl_ok(&["cp", src.to_str().expect("utf-8"), "files-cp:/srv/"]);
    assert_eq!(
        sh(&c, "files-cp", "cat /srv/in.txt; stat -c %a /srv/in.txt"),
        "copied in\n640\n"
    );
    let back = tmp.path().join("out.txt");
    d.ctl_ok(&["cp", "files-cp:/srv/in.txt", back.to_str().expect("utf-8")]);
    assert_eq!(std::fs::read(&back).expect("read back"), b"copied in\n");
    // Into a local directory: the file keeps its name.
    let dir = tmp.path().join("dir");
    std::fs::create_dir(&dir).expect("mkdir");
    d.ctl_ok(&["cp", "files-cp:/srv/in.txt", dir.to_str().expect("utf-8")]);
    assert_eq!(
        std::fs::read(dir.join("in.txt")).expect("read"),
        b"copied in\n"
    );
    // stdout and stdin.
    assert_eq!(
        d.ctl_ok(&["cp", "files-cp:/srv/in.txt", "-"]),
        "copied in\n"
    );
    let mut child = Command::new(sandbox_tests::bin_dir().join("sandboxctl"))
        .args(["cp", "-", "files-cp:/srv/stdin.txt"])
        .env(sandbox_tests::sandbox_proto::SOCKET_ENV, &d.socket)
        .stdin(Stdio::piped())
        .spawn()
        .expect("sandboxctl cp -");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"through stdin")
        .expect("write stdin");
    assert!(child.wait().expect("wait").success());
    assert_eq!(
        c.read_file("files-cp", "/srv/stdin.txt").expect("read"),
        b"through stdin"
    );
    // Errors: a missing file (nothing left locally), two local paths.
    let missing = tmp.path().join("missing.txt");
    let out = d.ctl(&["cp", "files-cp:/nope", missing.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("FILE_NOT_FOUND"),
        "{out:?}"
    );
    assert!(!missing.exists());
    assert!(!d.ctl(&["cp", "/a", "/b"]).status.success());
    d.ctl_ok(&["rm", "-f", "files-cp"]);
    d.assert_only_sandboxes(&[]);
}

/// A reader of `len` deterministic pseudo-random bytes that hashes what it hands out.
struct Generated {
    left: u64,
    state: u64,
    hash: std::sync::Arc<std::sync::Mutex<Sha256>>,
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX))
            & !7;
        let n = if n == 0 {
            buf.len().min(self.left as usize)
        } else {
            n
        };
        for chunk in buf[..n].chunks_mut(8) {
            // xorshift64
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let b = self.state.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        self.left -= n as u64;
        self.hash.lock().expect("hash").update(&buf[..n]);
        Ok(n)
    }
}

/// A writer that only hashes.
struct Hashing(Sha256, u64);

impl Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        self.1 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn kib(field: &str) -> u64 {
    field
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a kB value")
}

/// A 1 GiB file goes in and comes back out unchanged, while the daemon's peak resident memory grows by
/// less than 64 MiB (nothing holds the file in memory).
#[test]
fn a_gigabyte_round_trips_with_bounded_daemon_memory() {
    const SIZE: u64 = 1 << 30;
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "files-big");
    // Warm up the paths once (thread pools, allocator arenas), then measure.
    c.write_file(&sb.id, "/big/warm", &[7u8; 1 << 20], None)
        .expect("warm-up write");
    c.read_file(&sb.id, "/big/warm").expect("warm-up read");
    let before = kib(&proc_status_field(d.pid(), "VmHWM"));
    let hash = std::sync::Arc::new(std::sync::Mutex::new(Sha256::new()));
    let src = Generated {
        left: SIZE,
        state: 0x9e37_79b9_7f4a_7c15,
        hash: hash.clone(),
    };
    let info = c
        .write_file_from(&sb.id, "/big/file.bin", src, Some(0o644))
        .expect("1 GiB upload");
    assert_eq!(info.size, SIZE);
    let after_write = kib(&proc_status_field(d.pid(), "VmHWM"));
    let mut sink = Hashing(Sha256::new(), 0);
    let got = c
        .read_file_to(&sb.id, "/big/file.bin", &mut sink)
        .expect("1 GiB download");
    let after_read = kib(&proc_status_field(d.pid(), "VmHWM"));
    assert_eq!((got.size, sink.1), (SIZE, SIZE));
    let sent = hash.lock().expect("hash").clone().finalize();
    assert_eq!(sink.0.finalize(), sent, "the file came back different");
    eprintln!(
        "daemon VmHWM: {before} kB before, {after_write} kB after the 1 GiB upload, {after_read} kB after the download"
    );
    assert!(
        after_read.saturating_sub(before) < 64 * 1024,
        "the daemon's peak RSS grew by {} kB moving 1 GiB",
        after_read - before
    );
    assert_eq!(
        sh(&c, &sb.id, "stat -c %s /big/file.bin"),
        format!("{SIZE}\n")
    );
    c.delete(&sb.id, true).expect("delete");
    d.assert_only_sandboxes(&[]);
}

#[test]
fn bad_paths_missing_files_and_directories() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "files-err");
    let e = expect_api_error(
        c.read_file(&sb.id, "/no/such/file"),
        ErrorCode::FileNotFound,
        404,
    );
    assert!(e.message.contains("/no/such/file"), "{e:?}");
    let e = expect_api_error(c.read_file(&sb.id, "/etc"), ErrorCode::FileError, 400);
    assert_eq!(e.details.expect("details")["errno"], "EISDIR");
    let e = expect_api_error(
        c.read_file(&sb.id, "/etc/passwd/x"),
        ErrorCode::FileError,
        400,
    );
    assert_eq!(e.details.expect("details")["errno"], "ENOTDIR");
    let e = expect_api_error(c.read_file(&sb.id, "/dev/null"), ErrorCode::FileError, 400);
    assert_eq!(e.details.expect("details")["errno"], "EINVAL");
    let e = expect_api_error(
        c.write_file(&sb.id, "/etc", b"x", None),
        ErrorCode::FileError,
        400,
    );
    assert_eq!(e.details.expect("details")["errno"], "EISDIR");
    for p in [
        "etc/passwd",
        "",
        "/../../etc/passwd",
        "/etc/../../../etc/shadow",
    ] {
        let e = expect_api_error(c.read_file(&sb.id, p), ErrorCode::InvalidArgument, 400);
        assert_eq!(field_of(&e), "path", "{p:?}");
        let e = expect_api_error(
            c.write_file(&sb.id, p, b"x", None),
            ErrorCode::InvalidArgument,
            400,
        );
        assert_eq!(field_of(&e), "path", "{p:?}");
    }
    let (status, v) = raw(&c, "GET", &format!("/v1/sandboxes/{}/files", sb.id), None);
    assert_eq!(
        (status, v["error"]["details"]["field"].as_str()),
        (400, Some("path"))
    );
    let (status, v) = raw(
        &c,
        "PUT",
        &format!("/v1/sandboxes/{}/files?path=/x&mode=999", sb.id),
        Some(b"x"),
    );
    assert_eq!(
        (status, v["error"]["details"]["field"].as_str()),
        (400, Some("mode"))
    );
    expect_api_error(
        c.read_file("no-such-sandbox", "/etc/passwd"),
        ErrorCode::SandboxNotFound,
        404,
    );
    // Read-only paths refuse writes.
    expect_api_error(
        c.write_file(&sb.id, "/proc/sys/kernel/x", b"1", None),
        ErrorCode::FileReadOnly,
        409,
    );
    c.delete(&sb.id, true).expect("delete");
    d.assert_only_sandboxes(&[]);
}

#[test]
fn symlinks_inside_the_sandbox_never_reach_host_files() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "files-links");
    let host = tempfile::Builder::new()
        .prefix("sandboxd-files-marker-")
        .tempdir_in("/tmp")
        .expect("host dir");
    let marker = host.path().join("marker");
    std::fs::write(&marker, b"HOST ONLY").expect("marker");
    let m = marker.display().to_string();
    let h = host.path().display().to_string();
    let host_shadow = std::fs::read("/etc/shadow").unwrap_or_default();
    sh(
        &c,
        &sb.id,
        &format!(
            "mkdir -p /a/b && ln -s /etc/shadow /shadow-link && ln -s {m} /abs-link && \
             ln -s ../../../../../../..{m} /a/b/rel-link && ln -s {h} /dir-link && \
             ln -s /proc/1/root{m} /proc-link && ln -s {h}/new-file /new-link"
        ),
    );
    // The sandbox's own /etc/shadow (or nothing), never the host's.
    let inside = c
        .exec(&sb.id, &sandbox_tests::exec_req(&["cat", "/etc/shadow"]))
        .expect("exec");
    match c.read_file(&sb.id, "/shadow-link") {
        Ok(v) => {
            assert_eq!(v, inside.stdout.as_bytes());
            if !host_shadow.is_empty() {
                assert_ne!(v, host_shadow);
            }
        }
        Err(e) => assert_eq!(e.api_code(), Some(ErrorCode::FileNotFound), "{e}"),
    }
    for p in [
        "/abs-link".to_owned(),
        "/a/b/rel-link".to_owned(),
        "/dir-link/marker".to_owned(),
        "/proc-link".to_owned(),
        format!("/proc/1/root{m}"),
        format!("/proc/self/root{m}"),
        format!("/proc/self/cwd{m}"),
    ] {
        match c.read_file(&sb.id, &p) {
            Ok(v) => assert_ne!(v, b"HOST ONLY", "{p} read the host file"),
            Err(e) => assert!(
                matches!(
                    e.api_code(),
                    Some(ErrorCode::FileNotFound | ErrorCode::FileError)
                ),
                "{p}: {e}"
            ),
        }
    }
    // Writes through the links land inside the sandbox (or fail), never on the host.
    for p in [
        "/abs-link".to_owned(),
        "/a/b/rel-link".to_owned(),
        "/dir-link/marker".to_owned(),
        "/dir-link/created".to_owned(),
        "/new-link".to_owned(),
        "/proc-link".to_owned(),
        format!("/proc/1/root{m}"),
        format!("/proc/self/root{m}"),
    ] {
        let _ = c.write_file(&sb.id, &p, b"FROM THE SANDBOX", None);
    }
    assert_eq!(std::fs::read(&marker).expect("marker"), b"HOST ONLY");
    let mut names: Vec<String> = std::fs::read_dir(host.path())
        .expect("read host dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["marker"], "files appeared in the host directory");
    // The absolute link's write went to the same path inside the sandbox.
    assert_eq!(
        c.read_file(&sb.id, &m).expect("inside"),
        b"FROM THE SANDBOX"
    );
    c.delete(&sb.id, true).expect("delete");
    d.assert_only_sandboxes(&[]);
}

#[test]
fn mounted_files_are_read_only_and_volumes_are_size_limited() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let mut req = busybox(None);
    req.name = Some("files-mounts".into());
    req.mounted_files = vec![
        MountedFile {
            mount_path: "/etc/app.conf".into(),
            file_content: b64(b"key=value\n"),
            mode: None,
        },
        MountedFile {
            mount_path: "/opt/cfg/settings.json".into(),
            file_content: b64(b"{}"),
            mode: Some(0o640),
        },
        MountedFile {
            mount_path: "/scratch/inside-volume.txt".into(),
            file_content: b64(b"on the volume"),
            mode: None,
        },
    ];
    req.volumes = vec![VolumeSpec {
        name: "scratch".into(),
        mount_path: "/scratch".into(),
        size: "1Mi".into(),
    }];
    let sb = create(&c, &req);
    assert_eq!(
        sb.mounted_files,
        [
            "/etc/app.conf",
            "/opt/cfg/settings.json",
            "/scratch/inside-volume.txt"
        ]
    );
    assert_eq!(sb.volumes, req.volumes);
    let id = sb.id.clone();
    assert_eq!(sh(&c, &id, "cat /etc/app.conf"), "key=value\n");
    assert_eq!(
        sh(
            &c,
            &id,
            "stat -c '%a %u %g' /etc/app.conf /opt/cfg/settings.json /scratch/inside-volume.txt"
        ),
        "444 0 0\n640 0 0\n444 0 0\n"
    );
    let mounts = sh(&c, &id, "grep -E ' /(etc/app.conf|scratch) ' /proc/mounts");
    let app = mounts
        .lines()
        .find(|l| l.contains("/etc/app.conf"))
        .expect("app.conf mount");
    for opt in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(
            app.split(' ')
                .nth(3)
                .expect("options")
                .split(',')
                .any(|o| o == opt),
            "{app}"
        );
    }
    let vol = mounts
        .lines()
        .find(|l| l.contains(" /scratch "))
        .expect("volume mount");
    assert!(
        vol.starts_with("tmpfs /scratch tmpfs rw,nosuid,nodev"),
        "{vol}"
    );
    // Not writable from inside, nor through the API.
    let r = exec(&c, &id, &["sh", "-c", "echo x > /etc/app.conf"]);
    assert_ne!(r.exit_code, 0, "writing a mounted file succeeded");
    assert_ne!(exec(&c, &id, &["rm", "-f", "/etc/app.conf"]).exit_code, 0);
    let e = expect_api_error(
        c.write_file(&id, "/etc/app.conf", b"x", None),
        ErrorCode::FileReadOnly,
        409,
    );
    assert!(e.message.contains("/etc/app.conf"), "{e:?}");
    assert_eq!(
        c.read_file(&id, "/etc/app.conf").expect("read"),
        b"key=value\n"
    );
    // The volume: writable from exec and through the API (owned by the sandbox's root), 1777, limited.
    assert_eq!(sh(&c, &id, "stat -c '%a %u' /scratch"), "1777 0\n");
    assert_eq!(
        sh(&c, &id, "echo hi > /scratch/a && cat /scratch/a"),
        "hi\n"
    );
    let info = c
        .write_file(&id, "/scratch/dir/api.txt", b"api", None)
        .expect("write on volume");
    assert_eq!(info.size, 3);
    assert_eq!(
        sh(&c, &id, "stat -c '%u %g' /scratch/dir/api.txt /scratch/dir"),
        "0 0\n0 0\n"
    );
    let r = exec(
        &c,
        &id,
        &[
            "dd",
            "if=/dev/zero",
            "of=/scratch/big",
            "bs=4096",
            "count=512",
        ],
    );
    assert_ne!(r.exit_code, 0, "2 MiB fit in a 1 MiB volume: {r:?}");
    assert!(r.stderr.contains("No space left"), "{r:?}");
    sh(&c, &id, "rm -f /scratch/big");
    let e = expect_api_error(
        c.write_file(&id, "/scratch/too-big", &vec![1u8; 2 << 20], None),
        ErrorCode::ResourceExhausted,
        507,
    );
    assert_eq!(e.details.expect("details")["resource"], "disk");
    assert_eq!(sh(&c, &id, "ls -A /scratch"), "a\ndir\ninside-volume.txt\n");
    // The mounted files' sources are in the state directory, owned by the sandbox's root.
    let staged = d.sandbox_dir(&id).join("mounted-files/0");
    let meta = std::fs::metadata(&staged).expect("staged file");
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), sb.host_uid);
    c.delete(&id, true).expect("delete");
    d.assert_gone(&id);
    d.assert_only_sandboxes(&[]);
}

#[test]
fn bad_mounted_files_and_volumes_are_refused_and_leave_nothing() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let file = |p: &str, content: &str| MountedFile {
        mount_path: p.into(),
        file_content: content.into(),
        mode: None,
    };
    let vol = |n: &str, p: &str, s: &str| VolumeSpec {
        name: n.into(),
        mount_path: p.into(),
        size: s.into(),
    };
    let big = b64(&vec![0u8; 9 << 20]);
    let cases: Vec<(CreateSandboxRequest, &str)> = vec![
        (
            CreateSandboxRequest {
                mounted_files: vec![file("etc/x", "")],
                ..busybox(None)
            },
            "mounted_files[0].mount_path",
        ),
        (
            CreateSandboxRequest {
                mounted_files: vec![file("/a/../etc/x", "")],
                ..busybox(None)
            },
            "mounted_files[0].mount_path",
        ),
        (
            CreateSandboxRequest {
                mounted_files: vec![file("/ok", ""), file("/proc/x", "")],
                ..busybox(None)
            },
            "mounted_files[1].mount_path",
        ),
        (
            CreateSandboxRequest {
                mounted_files: vec![file("/", "")],
                ..busybox(None)
            },
            "mounted_files[0].mount_path",
        ),
        (
            CreateSandboxRequest {
                mounted_files: vec![file("/dev", "")],
                ..busybox(None)
            },
            "mounted_files[0].mount_path",
        ),
        (
            CreateSandboxRequest {
                mounted_files: vec![file("/x", "%%%")],
                ..busybox(None)
            },
            "mounted_files[0].file_content",
        ),
        (
            CreateSandboxRequest {
                mounted_files: vec![file("/x", ""), file("/x", "")],
                ..busybox(None)
            },
            "mounted_files[1].mount_path",
        ),
        (
            CreateSandboxRequest {
                mounted_files: vec![file("/x", &big), file("/y", &big)],
                ..busybox(None)
            },
            "mounted_files",
        ),
        (
            CreateSandboxRequest {
                volumes: vec![vol("v", "/sys/fs", "1Mi")],
                ..busybox(None)
            },
            "volumes[0].mount_path",
        ),
        (
            CreateSandboxRequest {
                volumes: vec![vol("bad name", "/v", "1Mi")],
                ..busybox(None)
            },
            "volumes[0].name",
        ),
        (
            CreateSandboxRequest {
                volumes: vec![vol("v", "/v", "1Mi"), vol("v", "/w", "1Mi")],
                ..busybox(None)
            },
            "volumes[1].name",
        ),
        (
            CreateSandboxRequest {
                volumes: vec![vol("v", "/v", "lots")],
                ..busybox(None)
            },
            "volumes[0].size",
        ),
        (
            CreateSandboxRequest {
                volumes: vec![vol("v", "/v", "1k")],
                ..busybox(None)
            },
            "volumes[0].size",
        ),
        (
            CreateSandboxRequest {
                mounted_files: vec![file("/v", "")],
                volumes: vec![vol("v", "/v", "1Mi")],
                ..busybox(None)
            },
            "volumes[0].mount_path",
        ),
        (
            CreateSandboxRequest {
                mounted_files: vec![file("/f", "")],
                volumes: vec![vol("v", "/f/sub", "1Mi")],
                ..busybox(None)
            },
            "volumes[0].mount_path",
        ),
    ];
    for (req, want) in cases {
        let e = expect_api_error(c.create(&req), ErrorCode::InvalidArgument, 400);
        assert_eq!(field_of(&e), want, "{e:?}");
    }
    // A mount the image cannot take (a file over a directory) fails the creation cleanly.
    let req = CreateSandboxRequest {
        mounted_files: vec![file("/etc", "")],
        ..busybox(None)
    };
    expect_api_error(c.create(&req), ErrorCode::StartFailed, 500);
    assert!(c.list(&[], None).expect("list").sandboxes.is_empty());
    d.assert_only_sandboxes(&[]);
    // The CLI's flags.
    let tmp = tempfile::tempdir().expect("tempdir");
    let conf = tmp.path().join("app.conf");
    std::fs::write(&conf, b"from the cli\n").expect("write");
    let id = d
        .ctl_ok(&[
            "run",
            "-d",
            "--mount-file",
            &format!("{}:/etc/cli.conf", conf.display()),
            "--volume",
            "scratch:/scratch:2Mi",
            "busybox",
        ])
        .trim()
        .to_owned();
    assert_eq!(
        sh(
            &c,
            &id,
            "cat /etc/cli.conf; df -k /scratch | tail -1 | awk '{print $2}'"
        ),
        "from the cli\n2048\n"
    );
    d.ctl_ok(&["rm", "-f", &id]);
    d.assert_only_sandboxes(&[]);
}

/// An image's symlinks at (or above) mount paths never steer a mount onto the host.
#[test]
fn image_symlinks_cannot_redirect_mounts_to_the_host() {
    let d = Daemon::start();
    let host = tempfile::Builder::new()
        .prefix("sandboxd-files-mnt-")
        .tempdir_in("/tmp")
        .expect("host dir");
    let marker = host.path().join("marker");
    std::fs::write(&marker, b"HOST ONLY").expect("marker");
    let h = host.path().display().to_string();
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("img");
    sandbox_tests::busybox_with_symlinks(
        &img,
        &[
            ("/etc/app.conf", &format!("{h}/marker")),
            ("/etc/old.conf", &format!("/.sandboxd-oldroot{h}/marker")),
            ("/data", &h),
            ("/up", "../../../../etc"),
            ("/dangling", &h),
        ],
    );
    let c = d.client();
    c.import_image(&ImportImageRequest {
        path: img.display().to_string(),
        reference: Some("links:1".into()),
    })
    .expect("import");
    let req = CreateSandboxRequest {
        image: "links:1".into(),
        mounted_files: vec![
            MountedFile {
                mount_path: "/etc/app.conf".into(),
                file_content: b64(b"mounted"),
                mode: None,
            },
            MountedFile {
                mount_path: "/etc/old.conf".into(),
                file_content: b64(b"mounted too"),
                mode: None,
            },
            MountedFile {
                mount_path: "/up/sub/f".into(),
                file_content: b64(b"below a link"),
                mode: None,
            },
        ],
        volumes: vec![VolumeSpec {
            name: "v".into(),
            mount_path: "/data".into(),
            size: "1Mi".into(),
        }],
        ..CreateSandboxRequest::default()
    };
    let sb = create(&c, &req);
    assert_eq!(std::fs::read(&marker).expect("marker"), b"HOST ONLY");
    let names: Vec<_> = std::fs::read_dir(host.path())
        .expect("host dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["marker"]);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mountinfo.contains(&h),
        "a mount appeared on the host: {mountinfo}"
    );
    assert_eq!(
        sh(&c, &sb.id, "cat /etc/app.conf; echo; cat /etc/old.conf"),
        "mounted\nmounted too"
    );
    assert_eq!(sh(&c, &sb.id, "stat -f -c %T /data"), "tmpfs\n");
    assert_eq!(sh(&c, &sb.id, "cat /etc/sub/f"), "below a link");
    c.delete(&sb.id, true).expect("delete");
    // Below a dangling link (to a path that exists only on the host) nothing is created: the creation
    // fails (as `mkdir -p` would), leaving nothing behind, and the host directory is untouched.
    let req = CreateSandboxRequest {
        image: "links:1".into(),
        mounted_files: vec![MountedFile {
            mount_path: "/dangling/f".into(),
            file_content: b64(b"x"),
            mode: None,
        }],
        ..CreateSandboxRequest::default()
    };
    expect_api_error(c.create(&req), ErrorCode::StartFailed, 500);
    assert_eq!(std::fs::read_dir(host.path()).expect("host dir").count(), 1);
    d.assert_only_sandboxes(&[]);
}

#[test]
fn files_of_a_finished_sandbox_are_not_running() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create(&c, &busybox(Some(&["true"])));
    let done = wait_exited(&c, &sb.id);
    assert_eq!(done.status, SandboxStatus::Completed);
    expect_api_error(
        c.read_file(&sb.id, "/etc/passwd"),
        ErrorCode::SandboxNotRunning,
        409,
    );
    expect_api_error(
        c.write_file(&sb.id, "/x", b"x", None),
        ErrorCode::SandboxNotRunning,
        409,
    );
    c.delete(&sb.id, false).expect("delete");
    d.assert_only_sandboxes(&[]);
}

/// Sends the head of a PUT and part of its body on a raw connection, then closes it.
fn abandoned_upload(socket: &Path, id: &str, path: &str, head_extra: &str, body: &[u8]) {
    let mut s = UnixStream::connect(socket).expect("connect");
    write!(
        s,
        "PUT /v1/sandboxes/{id}/files?path={path} HTTP/1.1\r\nHost: localhost\r\n{head_extra}\r\n"
    )
    .expect("head");
    s.write_all(body).expect("partial body");
    s.flush().expect("flush");
    s.shutdown(std::net::Shutdown::Both).expect("shutdown");
}

#[test]
fn an_interrupted_upload_leaves_the_old_file_and_no_temporary_file() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "files-abort");
    c.write_file(&sb.id, "/data/f", b"old content", None)
        .expect("write");
    let half = vec![b'n'; 512 * 1024];
    abandoned_upload(
        &d.socket,
        &sb.id,
        "/data/f",
        "Content-Length: 1048576\r\n",
        &half,
    );
    let mut chunked = format!("{:x}\r\n", half.len()).into_bytes();
    chunked.extend_from_slice(&half);
    chunked.extend_from_slice(b"\r\n");
    abandoned_upload(
        &d.socket,
        &sb.id,
        "/data/f",
        "Transfer-Encoding: chunked\r\n",
        &chunked,
    );
    // A new file's upload interrupted: no file at all.
    abandoned_upload(
        &d.socket,
        &sb.id,
        "/data/g",
        "Content-Length: 100\r\n",
        b"only part",
    );
    // The daemon serves on (and a later complete upload works); the old content is there, nothing else.
    assert_eq!(
        c.read_file(&sb.id, "/data/f").expect("read"),
        b"old content"
    );
    assert_eq!(sh(&c, &sb.id, "ls -a /data"), ".\n..\nf\n");
    c.write_file(&sb.id, "/data/f", b"new content", None)
        .expect("write");
    assert_eq!(
        c.read_file(&sb.id, "/data/f").expect("read"),
        b"new content"
    );
    // A download abandoned midway does not disturb the daemon either.
    c.write_file(&sb.id, "/data/big", &vec![3u8; 8 << 20], None)
        .expect("write big");
    let mut s = UnixStream::connect(&d.socket).expect("connect");
    write!(
        s,
        "GET /v1/sandboxes/{}/files?path=/data/big HTTP/1.1\r\nHost: localhost\r\n\r\n",
        sb.id
    )
    .expect("request");
    let mut first = [0u8; 4096];
    let n = s.read(&mut first).expect("read");
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    drop(s);
    assert_eq!(
        c.read_file(&sb.id, "/data/big").expect("read").len(),
        8 << 20
    );
    c.delete(&sb.id, true).expect("delete");
    d.assert_only_sandboxes(&[]);
}
