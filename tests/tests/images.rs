//! Image import (layout directory and tarball), listing, removal.

use sandbox_tests::sandbox_proto::{ErrorCode, ImportImageRequest};
use sandbox_tests::{
    build_busybox_image, busybox, busybox_image, create, create_idle, expect_api_error, json,
    Daemon,
};

#[test]
fn import_directory_and_tarball_then_list() {
    let d = Daemon::start();
    let c = d.client();
    let dir = tempfile::tempdir().expect("tempdir");
    let tar = dir.path().join("busybox-oci.tar");
    build_busybox_image(&dir.path().join("layout"), Some(&tar));

    let image = busybox_image().display().to_string();
    let out = d.ctl_ok(&["--json", "image", "import", &image, "busybox:latest"]);
    let from_dir = json(out.as_bytes());
    let digest = from_dir["digest"].as_str().expect("digest").to_owned();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
    assert_eq!(
        from_dir["references"][0],
        "docker.io/library/busybox:latest"
    );

    let from_tar = c
        .import_image(&ImportImageRequest {
            path: tar.display().to_string(),
            reference: Some("localhost/bb-tar:1".into()),
        })
        .expect("import tarball");
    assert!(from_tar.digest.starts_with("sha256:"));
    assert!(!from_tar.layers.is_empty());
    assert!(
        from_tar.platform.starts_with("linux/"),
        "{}",
        from_tar.platform
    );

    // The table lists both references with the short digest.
    let table = d.ctl_ok(&["images"]);
    let short = &digest["sha256:".len().."sha256:".len() + 12];
    let row = table
        .lines()
        .find(|l| l.starts_with("busybox:latest"))
        .unwrap_or_else(|| panic!("busybox not listed:\n{table}"));
    assert!(row.contains(short), "{row}");
    assert!(
        table.lines().any(|l| l.starts_with("localhost/bb-tar:1")),
        "{table}"
    );
    let list = c.images().expect("images").images;
    assert!(list.iter().any(|i| i.digest == digest));

    // Both run.
    for image in ["busybox", "localhost/bb-tar:1"] {
        let out = d.ctl(&["run", "--rm", image, "--", "echo", "ran"]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "ran\n",
            "{image}: {out:?}"
        );
        assert_eq!(out.status.code(), Some(0));
    }
    // Lookup by reference and by digest.
    assert_eq!(c.image("busybox").expect("by short ref").digest, digest);
    assert_eq!(c.image(&digest).expect("by digest").digest, digest);
    d.assert_only_sandboxes(&[]);
}

#[test]
fn remove_image_in_use_needs_force() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "img-user");

    expect_api_error(
        c.remove_image("busybox:latest", false),
        ErrorCode::ImageInUse,
        409,
    );
    let out = d.ctl(&["rmi", "busybox"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("IMAGE_IN_USE"));
    assert!(c.image("busybox").is_ok(), "refused removal removed it");

    let out = d.ctl_ok(&["rmi", "-f", "busybox"]);
    assert!(out.contains("Deleted"), "{out}");
    expect_api_error(c.image("busybox"), ErrorCode::ImageNotFound, 404);
    assert!(!d.ctl_ok(&["images"]).contains("busybox"));
    // Pull policy `never`: no registry is asked (with the default the daemon would pull busybox).
    let mut req = busybox(None);
    req.pull = sandbox_tests::sandbox_proto::PullPolicy::Never;
    expect_api_error(c.create(&req), ErrorCode::ImageNotFound, 404);
    let out = d.ctl(&["run", "--rm", "--pull", "never", "busybox", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("IMAGE_NOT_FOUND"));
    d.assert_only_sandboxes(&[&sb.id]);

    // Unused images go without force; unknown ones are IMAGE_NOT_FOUND.
    d.import_busybox();
    c.delete(&sb.id, true).expect("delete");
    c.remove_image("busybox", false).expect("remove unused");
    expect_api_error(
        c.remove_image("busybox", false),
        ErrorCode::ImageNotFound,
        404,
    );
    // A sandbox created from a re-import still works.
    d.import_busybox();
    let sb = create(&c, &busybox(Some(&["true"])));
    sandbox_tests::wait_exited(&c, &sb.id);
}

/// `rmi -f` of an image that a running sandbox uses must untag it without pulling the unpacked layers
/// out from under the sandbox's overlay (docker keeps them until the last container is gone).
#[test]
fn forced_image_removal_keeps_running_sandboxes_working() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "img-force");
    c.remove_image("busybox", true).expect("forced removal");
    // Files the sandbox had not opened yet (overlay keeps already-looked-up lower files alive).
    let r = sandbox_tests::exec(
        &c,
        &sb.id,
        &[
            "sh",
            "-c",
            "echo alive; grep -c '^NAME=\"BusyBox\"' /etc/os-release",
        ],
    );
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "alive\n1\n"), "{r:?}");
}
