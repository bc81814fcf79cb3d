//! Sandbox lifecycle: exit statuses, stop, wait, delete, names, logs, auto-remove.

use sandbox_tests::sandbox_proto::{ErrorCode, SandboxStatus, WaitCondition, WaitRequest};
use sandbox_tests::{busybox, create, create_idle, expect_api_error, sh, wait_exited, Daemon};

#[test]
fn exit_statuses_are_recorded() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();

    let ok = create(&c, &busybox(Some(&["true"])));
    let done = wait_exited(&c, &ok.id);
    assert_eq!(done.status, SandboxStatus::Completed, "{done:?}");
    let exit = done.exit.expect("exit");
    assert_eq!(
        (exit.code, exit.signal, exit.oom_killed),
        (Some(0), None, false)
    );
    assert!(done.finished_at.is_some());
    assert_eq!(done.pid, None, "a finished sandbox has no pid");

    let bad = create(&c, &busybox(Some(&["sh", "-c", "exit 5"])));
    let done = wait_exited(&c, &bad.id);
    assert_eq!(done.status, SandboxStatus::Failed);
    let exit = done.exit.expect("exit");
    assert_eq!((exit.code, exit.signal), (Some(5), None));
    assert!(exit.reason.contains('5'), "{exit:?}");

    let killed = create(&c, &busybox(Some(&["sh", "-c", "kill -9 $$"])));
    let done = wait_exited(&c, &killed.id);
    assert_eq!(done.status, SandboxStatus::Failed);
    let exit = done.exit.expect("exit");
    assert_eq!(
        (exit.code, exit.signal, exit.oom_killed),
        (None, Some(9), false)
    );

    let mut ids = [ok.id.as_str(), bad.id.as_str(), killed.id.as_str()];
    ids.sort();
    d.assert_only_sandboxes(&ids);
    for id in ids {
        c.delete(id, false).expect("delete a finished sandbox");
        d.assert_gone(id);
    }
    d.assert_only_sandboxes(&[]);
}

#[test]
fn stop_honours_sigterm() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "lc-stop");
    // A generous grace period: if SIGTERM were ignored, the stop would end in SIGKILL (signal 9).
    let done = c.stop(&sb.id, Some(30.0)).expect("stop");
    assert_eq!(done.status, SandboxStatus::Terminated, "{done:?}");
    let exit = done.exit.expect("exit");
    assert_ne!(exit.signal, Some(9), "SIGTERM was not honoured: {exit:?}");
    // Stopping again is a no-op answering the same state.
    let again = c.stop(&sb.id, Some(30.0)).expect("stop again");
    assert_eq!(again.status, SandboxStatus::Terminated);

    // A main process that ends on SIGTERM.
    let sb = create(&c, &busybox(Some(&["sleep", "1000"])));
    let done = c.stop(&sb.id, Some(30.0)).expect("stop");
    assert_eq!(done.status, SandboxStatus::Terminated);
    assert_eq!(done.exit.expect("exit").signal, Some(15));
}

#[test]
fn stop_kills_a_main_that_ignores_sigterm_after_the_grace_period() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    // SIGTERM ignored (SIG_IGN survives exec); then it tells it is ready through a FIFO.
    let sb = create(
        &c,
        &busybox(Some(&[
            "sh",
            "-c",
            "trap '' TERM; mkfifo /tmp/ready.tmp && mv /tmp/ready.tmp /tmp/ready && echo ready > /tmp/ready; exec sleep 1000",
        ])),
    );
    // The FIFO appears once the trap is set; this loop runs inside the sandbox because nothing outside
    // can be told when a file appears in it. Reading the FIFO then waits for the main's write.
    let ready = sh(
        &c,
        &sb.id,
        "while [ ! -p /tmp/ready ]; do usleep 1000; done; cat /tmp/ready",
    );
    assert_eq!(ready, "ready\n");
    let done = c.stop(&sb.id, Some(1.0)).expect("stop");
    assert_eq!(done.status, SandboxStatus::Terminated, "{done:?}");
    let exit = done.exit.expect("exit");
    assert_eq!(exit.signal, Some(9), "{exit:?}");
    assert!(done.status_reason.unwrap_or_default().contains("stop"));
}

#[test]
fn wait_conditions_and_timeout() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "lc-wait");
    let info = c
        .wait(
            &sb.id,
            WaitRequest {
                condition: WaitCondition::Running,
                timeout_seconds: Some(60.0),
            },
        )
        .expect("wait running");
    assert_eq!(info.status, SandboxStatus::Running);

    let e = expect_api_error(
        c.wait(
            &sb.id,
            WaitRequest {
                condition: WaitCondition::Exited,
                timeout_seconds: Some(0.5),
            },
        ),
        ErrorCode::WaitTimeout,
        408,
    );
    assert!(!e.message.is_empty());
    assert_eq!(c.get(&sb.id).expect("get").status, SandboxStatus::Running);

    // A wait started before the exit is answered by the exit. The main waits for a file the test writes
    // (through the files API: an exec that ends its sandbox races the sandbox's end) after starting the
    // waiter.
    let fin = create(
        &c,
        &busybox(Some(&[
            "sh",
            "-c",
            "while [ ! -e /tmp/go ]; do usleep 1000; done; exit $(cat /tmp/go)",
        ])),
    );
    std::thread::scope(|s| {
        let waiter = s.spawn(|| d.client().wait(&fin.id, WaitRequest::default()));
        c.write_file(&fin.id, "/tmp/go", b"4", None).expect("go");
        let done = waiter.join().expect("thread").expect("wait");
        assert_eq!(done.status, SandboxStatus::Failed);
        assert_eq!(done.exit.expect("exit").code, Some(4));
    });
    // wait on a finished sandbox answers at once, whatever the condition.
    let info = c
        .wait(
            &fin.id,
            WaitRequest {
                condition: WaitCondition::Running,
                timeout_seconds: Some(60.0),
            },
        )
        .expect("wait");
    assert_eq!(info.status, SandboxStatus::Failed);
    expect_api_error(
        c.wait("no-such-sandbox", WaitRequest::default()),
        ErrorCode::SandboxNotFound,
        404,
    );
}

#[test]
fn delete_running_needs_force_and_names_are_unique() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "lc-del");
    expect_api_error(c.delete(&sb.id, false), ErrorCode::SandboxRunning, 409);
    assert_eq!(
        c.get(&sb.id).expect("still there").status,
        SandboxStatus::Running
    );

    // Name conflict: refused, nothing created.
    let mut req = busybox(None);
    req.name = Some("lc-del".into());
    expect_api_error(c.create(&req), ErrorCode::NameConflict, 409);
    d.assert_only_sandboxes(&[&sb.id]);
    assert_eq!(c.list(&[], None).expect("list").sandboxes.len(), 1);

    // Names resolve like ids.
    assert_eq!(c.get("lc-del").expect("by name").id, sb.id);

    let shim: serde_json::Value = serde_json::from_slice(
        &std::fs::read(d.sandbox_dir(&sb.id).join("shim.json")).expect("shim.json"),
    )
    .expect("shim.json is JSON");
    let shim_pid = shim["pid"].as_i64().expect("pid") as i32;
    assert!(
        d.shims().contains(&shim_pid),
        "supervisor {shim_pid} is not running"
    );
    c.delete("lc-del", true).expect("force delete");
    expect_api_error(c.get(&sb.id), ErrorCode::SandboxNotFound, 404);
    d.assert_gone(&sb.id);
    d.assert_only_sandboxes(&[]);
    // Zero wait: the delete answered after the supervisor had exited (and been reaped).
    assert!(
        sandbox_tests::wait_pid_exit_within(shim_pid, 0),
        "supervisor {shim_pid} survived the delete"
    );
    // The name is free again.
    create(&c, &req);
}

#[test]
fn logs_of_the_main_process() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create(
        &c,
        &busybox(Some(&[
            "sh",
            "-c",
            "echo to-out; echo to-err >&2; echo more-out",
        ])),
    );
    wait_exited(&c, &sb.id);
    let logs = c.logs(&sb.id).expect("logs");
    assert_eq!(logs.stdout, "to-out\nmore-out\n");
    assert_eq!(logs.stderr, "to-err\n");
    let out = d.ctl(&["logs", &sb.id]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "to-out\nmore-out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to-err\n");
}

#[test]
fn auto_remove_removes_the_sandbox_after_exit() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let mut req = busybox(Some(&["sh", "-c", "exit 0"]));
    req.auto_remove = true;
    let sb = create(&c, &req);
    assert!(sb.auto_remove);
    // Either the wait sees the exit, or the sandbox is already gone.
    match c.wait(&sb.id, WaitRequest::default()) {
        Ok(info) => assert!(info.status.is_terminal(), "{info:?}"),
        Err(e) => assert_eq!(e.api_code(), Some(ErrorCode::SandboxNotFound), "{e:?}"),
    }
    wait_auto_removed(&d, &sb.id);
    expect_api_error(c.get(&sb.id), ErrorCode::SandboxNotFound, 404);
    d.assert_only_sandboxes(&[]);

    // Detached `run --rm` asks for auto_remove.
    let id = d.ctl_ok(&["run", "-d", "--rm", "busybox", "--", "true"]);
    let id = id.trim();
    match c.wait(id, WaitRequest::default()) {
        Ok(info) => assert!(info.auto_remove && info.status.is_terminal(), "{info:?}"),
        Err(e) => assert_eq!(e.api_code(), Some(ErrorCode::SandboxNotFound), "{e:?}"),
    }
    wait_auto_removed(&d, id);
    d.assert_only_sandboxes(&[]);
}

/// Waits for the removal itself (`wait` with condition `removed`); a sandbox already gone is not found.
fn wait_auto_removed(d: &Daemon, id: &str) {
    let c = d.client();
    let req = WaitRequest {
        condition: WaitCondition::Removed,
        timeout_seconds: Some(120.0),
    };
    match c.wait(id, req) {
        Ok(info) => assert!(info.status.is_terminal(), "{info:?}"),
        Err(e) => assert_eq!(e.api_code(), Some(ErrorCode::SandboxNotFound), "{e:?}"),
    }
    assert!(!c
        .list(&[], None)
        .expect("list")
        .sandboxes
        .iter()
        .any(|s| s.id == id));
    assert!(!d.sandbox_dirs().iter().any(|s| s == id));
}
