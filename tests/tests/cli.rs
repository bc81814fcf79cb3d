//! The walkthrough of the issue, through the real `sandboxctl` (and curl).

use std::process::Command;

use sandbox_tests::sandbox_proto::{SandboxStatus, WaitRequest};
use sandbox_tests::{busybox_image, json, Daemon};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Reads one cgroup file of the sandbox in the hierarchy mounted at `/sys/fs/cgroup/<ctl>`.
fn cg(d: &Daemon, ctl: &str, id: &str, file: &str) -> String {
    let p = d.cgroup_parent_of(ctl).join(id).join(file);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
        .trim()
        .to_owned()
}

#[test]
fn cli_walkthrough() {
    let d = Daemon::start();
    let image = busybox_image().display().to_string();
    let out = d.ctl_ok(&["image", "import", &image, "busybox:latest"]);
    assert!(out.contains("busybox:latest"), "{out}");

    // run --rm: prints the output, exits with the sandbox's status, leaves nothing behind.
    let out = d.ctl(&[
        "run",
        "--rm",
        "busybox",
        "--",
        "sh",
        "-c",
        "echo hi; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hi\n");
    assert!(d
        .client()
        .list(&[], None)
        .expect("list")
        .sandboxes
        .is_empty());
    d.assert_only_sandboxes(&[]);

    // run -d with limits: idles; the limits are in the cgroup files.
    let id = d
        .ctl_ok(&[
            "run", "-d", "--name", "web", "--memory", "256Mi", "--cpus", "0.5", "--pids", "64",
            "busybox",
        ])
        .trim()
        .to_owned();
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "run -d prints the id, got {id:?}"
    );
    let version = d.client().version().expect("version");
    if version.cgroup_version == "v1" {
        assert_eq!(cg(&d, "memory", &id, "memory.limit_in_bytes"), "268435456");
        assert_eq!(cg(&d, "cpu", &id, "cpu.cfs_quota_us"), "50000");
        assert_eq!(cg(&d, "cpu", &id, "cpu.cfs_period_us"), "100000");
        assert_eq!(cg(&d, "pids", &id, "pids.max"), "64");
    } else {
        let dir = d
            .cgroup_parents()
            .into_values()
            .find(|p| p.exists())
            .expect("a v2 parent")
            .join(&id);
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .expect(f)
                .trim()
                .to_owned()
        };
        assert_eq!(read("memory.max"), "268435456");
        assert_eq!(read("cpu.max"), "50000 100000");
        assert_eq!(read("pids.max"), "64");
    }

    let out = d.ctl_ok(&["exec", "web", "--", "cat", "/etc/os-release"]);
    assert!(out.contains("NAME=\"BusyBox\""), "{out}");

    let table = d.ctl_ok(&["ls"]);
    let mut lines = table.lines();
    let header = lines.next().expect("header");
    assert!(
        header.starts_with("ID") && header.contains("STATUS"),
        "{table}"
    );
    let row = lines
        .find(|l| l.split_whitespace().nth(1) == Some("web"))
        .unwrap_or_else(|| panic!("no row for web in:\n{table}"));
    assert!(row.starts_with(&id), "{row}");
    assert!(row.split_whitespace().any(|c| c == "RUNNING"), "{row}");

    let list = json(d.ctl_ok(&["ls", "--json"]).as_bytes());
    let sandboxes = list["sandboxes"].as_array().expect("sandboxes array");
    assert_eq!(sandboxes.len(), 1, "{list}");
    assert_eq!(sandboxes[0]["name"], "web");
    assert_eq!(sandboxes[0]["status"], "RUNNING");

    let info = json(d.ctl_ok(&["inspect", "web"]).as_bytes());
    assert_eq!(info["id"], id.as_str());
    assert_eq!(info["status"], "RUNNING");
    assert_eq!(info["limits"]["memory_bytes"], 268_435_456u64);
    assert_eq!(info["limits"]["cpu_millis"], 500);
    assert_eq!(info["limits"]["pids"], 64);

    // curl works on the socket.
    let curl = Command::new("curl")
        .args(["-sS", "--fail", "--unix-socket"])
        .arg(&d.socket)
        .arg("http://localhost/v1/sandboxes")
        .output()
        .expect("running curl");
    assert!(curl.status.success(), "curl: {}", text(&curl.stderr));
    let body = json(&curl.stdout);
    let arr = body["sandboxes"].as_array().expect("sandboxes array");
    assert!(arr.iter().any(|s| s["id"] == id.as_str()), "{body}");

    assert_eq!(d.ctl_ok(&["stop", "web"]).trim(), "web");
    let info = json(d.ctl_ok(&["inspect", "web"]).as_bytes());
    assert_eq!(info["status"], "TERMINATED", "{info}");
    assert_eq!(d.ctl_ok(&["rm", "web"]).trim(), "web");
    let out = d.ctl(&["inspect", "web"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("SANDBOX_NOT_FOUND"),
        "{}",
        text(&out.stderr)
    );
    d.assert_only_sandboxes(&[]);
}

#[test]
fn sandboxctl_takes_the_socket_from_the_environment() {
    let d = Daemon::start();
    // With SANDBOXD_SOCKET (set by ctl) it reaches this daemon.
    let out = d.ctl_ok(&["version"]);
    assert!(out.contains("Daemon: sandboxd"), "{out}");
    // With SANDBOXD_SOCKET pointing elsewhere it does not, and says which socket it tried.
    let bogus = d.socket.with_file_name("nothing-here.sock");
    let out = Command::new(sandbox_tests::bin_dir().join("sandboxctl"))
        .arg("version")
        .env("SANDBOXD_SOCKET", &bogus)
        .output()
        .expect("sandboxctl");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains(&bogus.display().to_string()), "{err}");
    // --socket overrides the variable.
    let out = Command::new(sandbox_tests::bin_dir().join("sandboxctl"))
        .arg("--socket")
        .arg(&d.socket)
        .arg("version")
        .env("SANDBOXD_SOCKET", &bogus)
        .output()
        .expect("sandboxctl");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn cli_run_exit_status_and_logs() {
    let d = Daemon::start();
    d.import_busybox();
    // Foreground run without --rm: the status is the sandbox's; the sandbox stays, FAILED with the code.
    let out = d.ctl(&[
        "run",
        "--name",
        "keep",
        "busybox",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    let info = d
        .client()
        .wait("keep", WaitRequest::default())
        .expect("wait");
    assert_eq!(info.status, SandboxStatus::Failed);
    let out = d.ctl(&["logs", "keep"]);
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    // Killed by a signal: 128 + 9 like a shell.
    let out = d.ctl(&["run", "--rm", "busybox", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137));
    d.ctl_ok(&["rm", "keep"]);
    d.assert_only_sandboxes(&[]);
}
