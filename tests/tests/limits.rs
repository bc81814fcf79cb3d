//! cgroup limits enforced on the sandbox's processes.

use sandbox_tests::sandbox_proto::{Resources, SandboxStatus};
use sandbox_tests::{busybox, create, wait_exited, Daemon};

#[test]
fn memory_limit_oom_kills_and_is_reported() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let mut req = busybox(Some(&[
        "sh",
        "-c",
        r#"x=$(head -c 100000000 /dev/zero | tr "\0" a); echo survived"#,
    ]));
    req.resources = Resources {
        memory: Some("16Mi".into()),
        ..Resources::default()
    };
    let sb = create(&c, &req);
    assert_eq!(sb.limits.memory_bytes, Some(16 << 20));
    let done = wait_exited(&c, &sb.id);
    assert_eq!(done.status, SandboxStatus::Failed, "{done:?}");
    let exit = done.exit.expect("exit info");
    assert!(exit.oom_killed, "{exit:?}");
    assert!(exit.reason.to_uppercase().contains("OOM"), "{exit:?}");
    assert!(
        done.status_reason
            .unwrap_or_default()
            .to_uppercase()
            .contains("OOM"),
        "status_reason should say OOM"
    );
    let logs = c.logs(&sb.id).expect("logs");
    assert!(!logs.stdout.contains("survived"), "{logs:?}");
}

#[test]
fn pids_limit_stops_a_fork_bomb() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    // Prints how many background processes it managed to start; busybox sh gives up (exit 2) at the
    // first failed fork.
    let mut req = busybox(Some(&[
        "sh",
        "-c",
        "n=0; for i in $(seq 1 50); do sleep 1000 & n=$((n+1)); echo $n; done; wait",
    ]));
    req.resources = Resources {
        pids: Some(20),
        ..Resources::default()
    };
    let sb = create(&c, &req);
    assert_eq!(sb.limits.pids, Some(20));
    let done = wait_exited(&c, &sb.id);
    assert_eq!(done.status, SandboxStatus::Failed, "{done:?}");
    let logs = c.logs(&sb.id).expect("logs");
    assert!(logs.stderr.contains("can't fork"), "{logs:?}");
    let started: u32 = logs
        .stdout
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    // init + sh + sleeps <= 20 (seq's and the subshell's tasks come and go).
    assert!(
        (1..=18).contains(&started),
        "{started} background processes started under pids=20"
    );
}

#[test]
fn pids_limit_leaves_the_sandbox_usable_after_a_failed_fork() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let mut req = busybox(None);
    req.resources = Resources {
        pids: Some(20),
        ..Resources::default()
    };
    let sb = create(&c, &req);
    // A fork bomb in an exec: the inner shell gives up at the first failed fork, leaving its sleeps
    // (re-parented to the sandbox's init) holding the pids; the outer one then blocks without forking
    // (opening a FIFO nobody writes) until the exec's timeout kills the whole tree.
    let r = c.exec(
        &sb.id,
        &sandbox_tests::sandbox_proto::ExecRequest {
            timeout_seconds: Some(2.0),
            ..sandbox_tests::exec_req(&[
                "sh",
                "-c",
                "mkfifo /tmp/block; sh -c 'for i in $(seq 1 50); do sleep 1000 & done'; echo forks-failed; read x < /tmp/block",
            ])
        },
    );
    let err = sandbox_tests::expect_api_error(
        r,
        sandbox_tests::sandbox_proto::ErrorCode::ExecTimeout,
        408,
    );
    let details = err.details.expect("details");
    assert!(
        details["stdout"]
            .as_str()
            .unwrap_or("")
            .contains("forks-failed"),
        "{details}"
    );
    assert!(
        details["stderr"]
            .as_str()
            .unwrap_or("")
            .contains("can't fork"),
        "{details}"
    );
    // The tree was killed: the sandbox answers exec again.
    assert_eq!(sandbox_tests::sh(&c, &sb.id, "echo ok").trim(), "ok");
    let ps = sandbox_tests::sh(&c, &sb.id, "ps");
    assert!(!ps.contains("sleep"), "{ps}");
}
