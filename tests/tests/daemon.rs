//! The daemon itself: socket, single instance, routes.

use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};

use sandbox_tests::{busybox_image, create_idle, json, Daemon};

#[test]
fn socket_is_0660_root_root() {
    let d = Daemon::start();
    let md = std::fs::metadata(&d.socket).expect("socket");
    assert!(md.file_type().is_socket());
    assert_eq!(md.mode() & 0o7777, 0o660, "mode {:o}", md.mode());
    assert_eq!((md.uid(), md.gid()), (0, 0));
    let v = d.client().version().expect("version");
    assert_eq!(v.api_version, "v1");
    assert!(matches!(v.cgroup_version.as_str(), "v1" | "v2"));
}

#[test]
fn a_second_daemon_on_the_same_state_dir_refuses_to_start() {
    let d = Daemon::start();
    let other_socket = d.socket.with_file_name("other.sock");
    let mut cmd = d.command_at(&other_socket);
    // The refusal is immediate: the command's exit is the event.
    let out = cmd.output().expect("second sandboxd");
    assert!(!out.status.success(), "the second daemon started");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another sandboxd"), "{err}");
    assert!(!other_socket.exists());
    // The first one is unaffected.
    d.client().version().expect("first daemon still answers");
}

#[test]
fn every_route_is_served() {
    let d = Daemon::start();
    let c = d.client();
    let image = busybox_image().display().to_string();
    let import = format!(r#"{{"path":{image:?},"reference":"busybox:latest"}}"#);
    // Copied from sandbox_daemon::api::ROUTES, with real ids and references, in an order that works.
    let (status, body) = c
        .request_raw("POST", "/v1/images/import", Some(import.into_bytes()))
        .expect("import");
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let sb = create_idle(&c, "routes");
    let id = sb.id.as_str();
    let routes: Vec<(&str, String, Option<&str>)> = vec![
        ("GET", "/v1/version".into(), None),
        ("GET", "/v1/sandboxes".into(), None),
        (
            "POST",
            "/v1/sandboxes".into(),
            Some(r#"{"image":"busybox","command":["true"]}"#),
        ),
        ("GET", format!("/v1/sandboxes/{id}"), None),
        (
            "POST",
            format!("/v1/sandboxes/{id}/exec"),
            Some(r#"{"command":["true"]}"#),
        ),
        ("GET", format!("/v1/sandboxes/{id}/logs"), None),
        (
            "POST",
            format!("/v1/sandboxes/{id}/stop"),
            Some(r#"{"grace_seconds":5}"#),
        ),
        ("POST", format!("/v1/sandboxes/{id}/wait"), Some("{}")),
        ("DELETE", format!("/v1/sandboxes/{id}"), None),
        ("GET", "/v1/images".into(), None),
        ("GET", "/v1/images/busybox%3Alatest".into(), None),
        (
            "DELETE",
            "/v1/images/busybox%3Alatest?force=true".into(),
            None,
        ),
        (
            "POST",
            "/v1/images/import".into(),
            Some(r#"{"path":"/nonexistent-image-path"}"#),
        ),
    ];
    assert_eq!(routes.len(), 13);
    for (method, path, body) in routes {
        let (status, resp) = c
            .request_raw(method, &path, body.map(|b| b.as_bytes().to_vec()))
            .expect("request");
        assert_ne!(status, 405, "{method} {path}");
        if status == 204 {
            continue;
        }
        let v = json(&resp);
        assert_ne!(
            v["error"]["code"], "NOT_FOUND",
            "{method} {path} hit the fallback: {v}"
        );
        assert!(
            (200..300).contains(&status) || v["error"]["code"].is_string(),
            "{method} {path}: {status} {v}"
        );
        if method == "POST" && path == "/v1/sandboxes" {
            assert_eq!(status, 201, "{v}");
        }
    }
}

/// A daemon stopped right after it started listening (its warm pool possibly still filling) leaves no
/// cgroups, supervisors or state behind: the leak checks of the guard run on drop.
#[test]
fn a_daemon_stopped_right_after_start_leaves_nothing() {
    for _ in 0..3 {
        let d = Daemon::start();
        drop(d);
    }
}
