//! Bad input: each gets a stable code and HTTP status, and nothing is left half-created.

use sandbox_tests::sandbox_proto::{
    ErrorCode, ImportImageRequest, Resources, SandboxStatus, StopRequest, WaitRequest,
};
use sandbox_tests::{busybox, create, exec_req, expect_api_error, json, wait_exited, Daemon};

/// No sandbox state directory, no cgroup but the warm pool's, no sandbox listed.
fn assert_nothing_left(d: &Daemon) {
    d.assert_only_sandboxes(&[]);
    assert!(d
        .client()
        .list(&[], None)
        .expect("list")
        .sandboxes
        .is_empty());
}

#[test]
fn bad_create_requests() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();

    // Pull policy `never`: a missing image is IMAGE_NOT_FOUND without asking any registry (with the default
    // policy the daemon would pull, and the answer would depend on whether Docker Hub is reachable).
    let mut missing = busybox(None).clone_with_image("nope:latest");
    missing.pull = sandbox_tests::sandbox_proto::PullPolicy::Never;
    let e = expect_api_error(c.create(&missing), ErrorCode::ImageNotFound, 404);
    assert!(e.message.contains("nope"), "{e:?}");
    assert_nothing_left(&d);

    for (field, res) in [
        (
            "resources.memory",
            Resources {
                memory: Some("12Qi".into()),
                ..Resources::default()
            },
        ),
        (
            "resources.cpu",
            Resources {
                cpu: Some("lots".into()),
                ..Resources::default()
            },
        ),
        (
            "resources.cpu",
            Resources {
                cpu: Some("-1".into()),
                ..Resources::default()
            },
        ),
        (
            "resources.pids",
            Resources {
                pids: Some(0),
                ..Resources::default()
            },
        ),
    ] {
        let mut req = busybox(None);
        req.resources = res.clone();
        let e = expect_api_error(c.create(&req), ErrorCode::InvalidArgument, 400);
        assert_eq!(
            e.details.as_ref().map(|d| d["field"].clone()),
            Some(field.into()),
            "{res:?}: {e:?}"
        );
        assert_nothing_left(&d);
    }

    let mut req = busybox(None);
    req.name = Some("bad name/..".into());
    let e = expect_api_error(c.create(&req), ErrorCode::InvalidArgument, 400);
    assert_eq!(e.details.expect("details")["field"], "name");
    assert_nothing_left(&d);
}

trait WithImage {
    fn clone_with_image(&self, image: &str) -> Self;
}

impl WithImage for sandbox_tests::sandbox_proto::CreateSandboxRequest {
    fn clone_with_image(&self, image: &str) -> Self {
        let mut r = self.clone();
        r.image = image.to_owned();
        r
    }
}

#[test]
fn malformed_bodies_and_unknown_routes() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();

    for body in [
        &b"{\"image\": "[..],
        b"not json",
        b"[1,2]",
        b"{\"image\":\"busybox\",\"bogus\":1}",
    ] {
        let (status, resp) = c
            .request_raw("POST", "/v1/sandboxes", Some(body.to_vec()))
            .expect("raw request");
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(body));
        let v = json(&resp);
        assert_eq!(v["error"]["code"], "INVALID_REQUEST", "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let (status, resp) = c
        .request_raw("POST", "/v1/sandboxes", None)
        .expect("raw request");
    assert_eq!(status, 400);
    assert_eq!(json(&resp)["error"]["code"], "INVALID_REQUEST");
    assert_nothing_left(&d);

    let (status, resp) = c.request_raw("GET", "/v1/nope", None).expect("raw");
    assert_eq!(status, 404);
    let v = json(&resp);
    assert_eq!(v["error"]["code"], "NOT_FOUND", "{v}");
    let (status, _) = c.request_raw("GET", "/v2/sandboxes", None).expect("raw");
    assert_eq!(status, 404);
    let (status, resp) = c.request_raw("PUT", "/v1/sandboxes", None).expect("raw");
    assert_eq!(status, 405);
    assert!(json(&resp)["error"]["code"].is_string());
}

#[test]
fn unknown_sandbox_ids() {
    let d = Daemon::start();
    let c = d.client();
    let id = "0000000000000000";
    expect_api_error(c.get(id), ErrorCode::SandboxNotFound, 404);
    expect_api_error(c.get("no-such-name"), ErrorCode::SandboxNotFound, 404);
    expect_api_error(c.stop(id, None), ErrorCode::SandboxNotFound, 404);
    expect_api_error(c.delete(id, true), ErrorCode::SandboxNotFound, 404);
    expect_api_error(
        c.wait(id, WaitRequest::default()),
        ErrorCode::SandboxNotFound,
        404,
    );
    expect_api_error(
        c.exec(id, &exec_req(&["true"])),
        ErrorCode::SandboxNotFound,
        404,
    );
    expect_api_error(c.logs(id), ErrorCode::SandboxNotFound, 404);
    let _ = StopRequest::default();
    let out = d.ctl(&["inspect", id]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SANDBOX_NOT_FOUND"));
}

#[test]
fn images_that_are_not_images() {
    let d = Daemon::start();
    let c = d.client();
    let dir = tempfile::tempdir().expect("tempdir");

    let junk = dir.path().join("junk.tar");
    let mut bytes = vec![0u8; 64 * 1024];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
    }
    std::fs::write(&junk, &bytes).expect("write junk");
    let e = expect_api_error(
        c.import_image(&ImportImageRequest {
            path: junk.display().to_string(),
            reference: Some("junk:1".into()),
        }),
        ErrorCode::InvalidImage,
        400,
    );
    assert!(!e.message.is_empty());

    // A real tar archive that is not an image.
    let tar = dir.path().join("notimage.tar");
    std::fs::write(dir.path().join("hello.txt"), "hi").expect("file");
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(dir.path())
        .arg("-cf")
        .arg(&tar)
        .arg("hello.txt")
        .status()
        .expect("tar");
    assert!(st.success());
    expect_api_error(
        c.import_image(&ImportImageRequest {
            path: tar.display().to_string(),
            reference: Some("junk:2".into()),
        }),
        ErrorCode::InvalidImage,
        400,
    );
    // A directory that is not an OCI layout.
    expect_api_error(
        c.import_image(&ImportImageRequest {
            path: dir.path().display().to_string(),
            reference: Some("junk:3".into()),
        }),
        ErrorCode::InvalidImage,
        400,
    );
    // Through the CLI: a clear message with the code, exit status 1.
    let out = d.ctl(&["image", "import", junk.to_str().expect("utf-8"), "junk:4"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("INVALID_IMAGE"));
    assert!(c.images().expect("images").images.is_empty());
    // Nothing half-imported is visible as an image.
    expect_api_error(c.image("junk:1"), ErrorCode::ImageNotFound, 404);
}

#[test]
fn a_main_command_that_does_not_exist() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create(&c, &busybox(Some(&["nope-cmd", "arg"])));
    let done = wait_exited(&c, &sb.id);
    assert_eq!(done.status, SandboxStatus::Failed);
    assert_eq!(
        done.exit.as_ref().and_then(|e| e.code),
        Some(127),
        "{done:?}"
    );
    let logs = c.logs(&sb.id).expect("logs");
    assert!(
        logs.stderr
            .contains("\"nope-cmd\": executable file not found in $PATH"),
        "{logs:?}"
    );
    // The CLI shows the same and exits 127.
    let out = d.ctl(&["run", "--rm", "busybox", "--", "nope-cmd"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("executable file not found in $PATH"));
    c.delete(&sb.id, false).expect("delete");
    assert_nothing_left(&d);
}
