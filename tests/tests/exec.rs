//! Exec into a running sandbox: options, output handling, timeouts, errors.

use sandbox_tests::sandbox_proto::{ErrorCode, ExecRequest, OutputEncoding, SandboxStatus};
use sandbox_tests::{
    busybox, create, create_idle, exec, exec_req, expect_api_error, sh, wait_exited, Daemon,
};

#[test]
fn exec_cwd_env_and_user_through_the_cli() {
    let d = Daemon::start();
    d.import_busybox();
    create_idle(&d.client(), "ex-cli");
    assert_eq!(
        d.ctl_ok(&["exec", "-w", "/tmp", "ex-cli", "--", "pwd"]),
        "/tmp\n"
    );
    assert_eq!(d.ctl_ok(&["exec", "ex-cli", "--", "pwd"]), "/\n");
    assert_eq!(
        d.ctl_ok(&["exec", "-e", "A=b", "ex-cli", "--", "sh", "-c", "echo $A"]),
        "b\n"
    );
    // The image's environment is kept (PATH from the image config).
    assert!(d
        .ctl_ok(&["exec", "ex-cli", "--", "sh", "-c", "echo $PATH"])
        .contains("/bin"));
    assert_eq!(
        d.ctl_ok(&["exec", "-u", "app", "ex-cli", "--", "id", "-u"]),
        "1000\n"
    );
    assert_eq!(
        d.ctl_ok(&["exec", "-u", "app", "ex-cli", "--", "id", "-g"]),
        "1000\n"
    );
    assert_eq!(
        d.ctl_ok(&["exec", "-u", "nobody", "ex-cli", "--", "id", "-u"]),
        "65534\n"
    );
    assert_eq!(
        d.ctl_ok(&["exec", "-u", "1234:55", "ex-cli", "--", "id", "-g"]),
        "55\n"
    );
    assert_eq!(d.ctl_ok(&["exec", "ex-cli", "--", "id", "-u"]), "0\n");
    // Exit codes pass through the CLI.
    let out = d.ctl(&["exec", "ex-cli", "--", "sh", "-c", "exit 42"]);
    assert_eq!(out.status.code(), Some(42));
    // A cwd that does not exist is an error, not a silent fallback.
    let out = d.ctl(&["exec", "-w", "/does/not/exist", "ex-cli", "--", "pwd"]);
    assert!(!out.status.success(), "{out:?}");
}

#[test]
fn exec_stdin_exit_codes_signals_and_enoent() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "ex-io");

    let r = c
        .exec(
            &sb.id,
            &ExecRequest {
                stdin: Some("hello\nworld\n".into()),
                ..exec_req(&["cat"])
            },
        )
        .expect("exec cat");
    assert_eq!(r.exit_code, 0);
    assert_eq!(r.stdout, "hello\nworld\n");
    // Without stdin the process reads end-of-file at once.
    assert_eq!(exec(&c, &sb.id, &["cat"]).stdout, "");

    let r = exec(&c, &sb.id, &["sh", "-c", "echo out; echo err >&2; exit 42"]);
    assert_eq!((r.exit_code, r.signal), (42, None));
    assert_eq!(r.stdout, "out\n");
    assert_eq!(r.stderr, "err\n");
    let r = exec(&c, &sb.id, &["false"]);
    assert_eq!(r.exit_code, 1);

    let r = exec(&c, &sb.id, &["sh", "-c", "kill -9 $$"]);
    assert_eq!((r.exit_code, r.signal), (137, Some(9)));

    let r = exec(&c, &sb.id, &["nope-cmd"]);
    assert_eq!(r.exit_code, 127, "{r:?}");
    assert!(
        r.stderr.contains("executable file not found in $PATH"),
        "{r:?}"
    );
    assert!(r.stderr.contains("nope-cmd"), "{r:?}");
    // A path that exists but is not executable: 126 like a shell (or 127); never success.
    let r = exec(&c, &sb.id, &["/etc/passwd"]);
    assert!(matches!(r.exit_code, 126 | 127), "{r:?}");
}

#[test]
fn exec_timeout_kills_the_process_tree() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "ex-timeout");
    let r = c.exec(
        &sb.id,
        &ExecRequest {
            timeout_seconds: Some(1.0),
            ..exec_req(&["sh", "-c", "echo started; sleep 1000 & sleep 1000"])
        },
    );
    let e = expect_api_error(r, ErrorCode::ExecTimeout, 408);
    assert!(e.message.contains("timed out"), "{e:?}");
    let details = e.details.expect("details with partial output");
    assert_eq!(details["stdout"], "started\n");
    let ps = sh(&c, &sb.id, "ps -o pid,stat,args");
    assert!(
        !ps.contains("sleep"),
        "processes survived the timeout:\n{ps}"
    );
    // The sandbox itself is untouched.
    assert_eq!(c.get(&sb.id).expect("get").status, SandboxStatus::Running);
}

#[test]
fn exec_output_cap_and_binary_output() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "ex-out");

    let r = c
        .exec(
            &sb.id,
            &ExecRequest {
                max_output_bytes: Some(10),
                ..exec_req(&[
                    "sh",
                    "-c",
                    "head -c 1000 /dev/zero | tr '\\0' a; echo e >&2",
                ])
            },
        )
        .expect("exec");
    assert_eq!(r.exit_code, 0);
    assert_eq!(r.stdout, "a".repeat(10));
    assert!(r.stdout_truncated);
    assert_eq!(r.stderr, "e\n");
    assert!(!r.stderr_truncated);

    let r = exec(
        &c,
        &sb.id,
        &["sh", "-c", "head -c 1000 /dev/zero | tr '\\0' a"],
    );
    assert_eq!(r.stdout.len(), 1000);
    assert!(!r.stdout_truncated);

    // 100 random bytes, made certainly invalid UTF-8 by a leading 0xff.
    let r = exec(
        &c,
        &sb.id,
        &["sh", "-c", "printf '\\377'; head -c 99 /dev/urandom"],
    );
    assert_eq!(r.encoding, OutputEncoding::Base64, "{r:?}");
    let bytes = r.stdout_bytes();
    assert_eq!(bytes.len(), 100);
    assert_eq!(bytes[0], 0xff);
}

#[test]
fn twenty_concurrent_execs() {
    let d = Daemon::start();
    d.import_busybox();
    let sb = create_idle(&d.client(), "ex-many");
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let d = &d;
                let id = sb.id.clone();
                s.spawn(move || {
                    let c = d.client();
                    let r = exec(
                        &c,
                        &id,
                        &["sh", "-c", "echo $0; exit $(($0 % 7))", &i.to_string()],
                    );
                    (i, r)
                })
            })
            .collect();
        for h in handles {
            let (i, r) = h.join().expect("thread");
            assert_eq!(r.stdout, format!("{i}\n"), "exec {i}: {r:?}");
            assert_eq!(r.exit_code, i % 7, "exec {i}: {r:?}");
        }
    });
    // While the sandbox runs, each exec's leaf cgroup goes once its helper has reported (in the
    // background); one helper waits prepared for the next exec. Removing the sandbox leaves nothing: no
    // cgroup, no leaf, no helper process.
    d.client().delete(&sb.id, true).expect("delete");
    d.assert_gone(&sb.id);
    for parent in d.cgroup_parents().values() {
        assert!(!parent.join(&sb.id).exists(), "cgroup of {} left", sb.id);
    }
    let helpers: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let after = &stat[stat.rfind(')')? + 2..];
            let mut f = after.split(' ');
            let state = f.next()?;
            let ppid: i32 = f.next()?.parse().ok()?;
            let cmd = std::fs::read_to_string(e.path().join("cmdline")).ok()?;
            (ppid == d.pid() && state != "Z" && cmd.contains("exec-helper")).then_some(cmd)
        })
        .collect();
    assert!(helpers.is_empty(), "exec helpers left: {helpers:?}");
}

#[test]
fn exec_in_a_finished_sandbox_is_refused() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create(&c, &busybox(Some(&["true"])));
    let done = wait_exited(&c, &sb.id);
    assert_eq!(done.status, SandboxStatus::Completed);
    expect_api_error(
        c.exec(&sb.id, &exec_req(&["true"])),
        ErrorCode::SandboxNotRunning,
        409,
    );
    // And a stopped one.
    let idle = create_idle(&c, "ex-stopped");
    c.stop(&idle.id, Some(5.0)).expect("stop");
    expect_api_error(
        c.exec(&idle.id, &exec_req(&["true"])),
        ErrorCode::SandboxNotRunning,
        409,
    );
    // Bad exec requests.
    let e = expect_api_error(
        c.exec(&sb.id, &exec_req(&[])),
        ErrorCode::InvalidArgument,
        400,
    );
    assert_eq!(e.details.expect("details")["field"], "command");
    expect_api_error(
        c.exec("0000000000000000", &exec_req(&["true"])),
        ErrorCode::SandboxNotFound,
        404,
    );
}

#[test]
fn an_exec_that_ends_its_sandbox_gets_its_exit_status() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    // The main process ends once /tmp/go exists; the exec creates it and then blocks, so it can only end
    // by being killed with the sandbox's pid namespace. Its answer is that exit (137, SIGKILL), not an
    // error: the daemon waits for the reports of execs in flight before it tears the sandbox down.
    let sb = create(
        &c,
        &busybox(Some(&[
            "sh",
            "-c",
            "while [ ! -e /tmp/go ]; do usleep 1000; done; exit 0",
        ])),
    );
    let r = exec(&c, &sb.id, &["sh", "-c", "touch /tmp/go; exec sleep 1000"]);
    assert_eq!(r.exit_code, 137, "{r:?}");
    assert_eq!(r.signal, Some(9), "{r:?}");
    let done = wait_exited(&c, &sb.id);
    assert_eq!(done.status, SandboxStatus::Completed);
}
