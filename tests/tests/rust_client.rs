//! The high-level Rust client (`sandbox_proto::sandbox`, async, and `sandbox_proto::blocking`) against a
//! real daemon: the seed flows of the Python client in Rust — run, exec, check, streaming lines, stdin,
//! cancel, timeouts, files, logs, sessions that start sandboxes on first use and end them on close,
//! list/from_id/delete, and the error mapping.

use std::time::Duration;

use sandbox_tests::sandbox_proto::blocking;
use sandbox_tests::sandbox_proto::client::{BlockingClient, Client};
use sandbox_tests::sandbox_proto::sandbox::{
    ExecOptions, Sandbox, SandboxDefaults, SandboxError, Session, CLIENT_TIMEOUT, SESSION_CLOSED,
};
use sandbox_tests::sandbox_proto::SandboxStatus;
use sandbox_tests::{Daemon, BUSYBOX};

const NO_COMMAND: [&str; 0] = [];

fn busybox() -> SandboxDefaults {
    SandboxDefaults::default().with_container_image(BUSYBOX)
}

/// Ids of the sandboxes the daemon knows.
fn daemon_ids(c: &BlockingClient) -> Vec<String> {
    let mut v: Vec<String> = c
        .list(&[], None)
        .expect("list")
        .sandboxes
        .into_iter()
        .map(|s| s.id)
        .collect();
    v.sort();
    v
}

/// [`daemon_ids`] from inside an async block.
async fn ids(client: &Client) -> Vec<String> {
    let mut v: Vec<String> = client
        .list(&[], None)
        .await
        .expect("list")
        .sandboxes
        .into_iter()
        .map(|s| s.id)
        .collect();
    v.sort();
    v
}

#[test]
fn python_image_seed_flow_and_missing_image() {
    let d = Daemon::start_mirrored("");
    let c = d.client();
    // `with Sandbox.run(container_image="python:3.11") as sandbox:` — the default image.
    let (id, version) =
        blocking::Sandbox::scoped(&c, NO_COMMAND, &SandboxDefaults::default(), |sb| {
            let r = sb
                .exec(["python", "--version"], ExecOptions::new())?
                .result(None)?;
            assert_eq!(r.returncode, 0, "{r:?}");
            sb.write_file("/data/hello.txt", b"hello")?;
            assert_eq!(sb.read_file("/data/hello.txt")?, b"hello");
            let info = sb.info()?.expect("started");
            assert_eq!(info.image, "docker.io/library/python:3.11");
            Ok::<_, SandboxError>((sb.sandbox_id().map(str::to_owned), r.stdout))
        })
        .expect("scoped sandbox");
    assert!(version.starts_with("Python 3.11."), "{version:?}");
    assert!(id.is_some());
    // Leaving the scope stopped and deleted it.
    assert!(daemon_ids(&c).is_empty());

    // The local registry has no python:3.15: a clear not-found error naming the image.
    let err = blocking::Sandbox::run(
        &c,
        NO_COMMAND,
        &SandboxDefaults::default().with_container_image("python:3.15"),
    )
    .expect_err("no such image");
    match &err {
        SandboxError::ImageNotFound { image, message, .. } => {
            assert!(message.contains("python:3.15"), "{message}");
            assert_eq!(image.as_deref(), Some("docker.io/library/python:3.15"));
        }
        other => panic!("expected ImageNotFound, got {other:?}"),
    }
    assert_eq!(err.code(), "IMAGE_NOT_FOUND");
    assert!(daemon_ids(&c).is_empty());
}

#[test]
fn run_with_a_command_waits_until_complete() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let client = Client::new(&d.socket);
    c.block_on(async {
        // Exit 0: COMPLETED, returncode 0.
        let sb = Sandbox::run(&client, ["sh", "-c", "echo done"], &busybox())
            .await
            .expect("run");
        let info = sb
            .wait_until_complete(Some(Duration::from_secs(60)), true)
            .await
            .expect("complete");
        assert_eq!(info.status, SandboxStatus::Completed);
        assert_eq!(sb.returncode(), Some(0));
        assert_eq!(
            sb.status().await.expect("status"),
            Some(SandboxStatus::Completed)
        );
        sb.remove(false).await.expect("remove");

        // Non-zero: FAILED, the error carries the final state.
        let sb = Sandbox::run(&client, ["sh", "-c", "exit 3"], &busybox())
            .await
            .expect("run");
        match sb.wait_until_complete(None, true).await {
            Err(SandboxError::Failed {
                info: Some(info), ..
            }) => {
                assert_eq!(info.status, SandboxStatus::Failed);
                assert_eq!(info.exit.as_ref().and_then(|e| e.code), Some(3));
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        assert_eq!(sb.returncode(), Some(3));
        sb.remove(false).await.expect("remove");

        // Idle: RUNNING until stopped; a wait past its timeout; stopped is TERMINATED.
        let sb = Sandbox::run(&client, NO_COMMAND, &busybox())
            .await
            .expect("run");
        assert_eq!(
            sb.wait(Some(Duration::from_secs(30)))
                .await
                .expect("running")
                .status,
            SandboxStatus::Running
        );
        let err = sb
            .wait_until_complete(Some(Duration::from_millis(200)), true)
            .await
            .expect_err("still running");
        assert!(matches!(err, SandboxError::Timeout { .. }), "{err:?}");
        assert!(sb.returncode().is_none());
        let stopped = sb.stop(10.0, false).await.expect("stop").expect("info");
        assert_eq!(stopped.status, SandboxStatus::Terminated);
        match sb.wait_until_complete(None, true).await {
            Err(SandboxError::Terminated { info: Some(i), .. }) => {
                assert_eq!(i.status, SandboxStatus::Terminated)
            }
            other => panic!("expected Terminated, got {other:?}"),
        }
        let info = sb.wait_until_complete(None, false).await.expect("no raise");
        assert_eq!(info.status, SandboxStatus::Terminated);
        // Exec in an ended sandbox.
        let err = sb
            .exec(["true"], ExecOptions::new())
            .await
            .expect_err("not running");
        assert!(matches!(err, SandboxError::NotRunning { .. }), "{err:?}");
        sb.remove(false).await.expect("remove");
        // Gone: stop and remove are fine with missing_ok, not without.
        assert!(sb.stop(1.0, true).await.expect("missing ok").is_none());
        let err = sb.stop(1.0, false).await.expect_err("gone");
        assert!(matches!(err, SandboxError::NotFound { .. }), "{err:?}");
        sb.remove(true).await.expect("missing ok");
    });
    assert!(daemon_ids(&c).is_empty());
}

#[test]
fn exec_check_streaming_stdin_cancel_and_timeout() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let client = Client::new(&d.socket);
    c.block_on(async {
        let sb = Sandbox::run(&client, NO_COMMAND, &busybox())
            .await
            .expect("run");

        // check=True: a non-zero exit is Execution, with the result.
        let p = sb
            .exec(
                ["sh", "-c", "echo out; echo oops >&2; exit 4"],
                ExecOptions::new().with_check(true),
            )
            .await
            .expect("exec");
        match p.result(None).await {
            Err(SandboxError::Execution { result, .. }) => {
                assert_eq!(result.returncode, 4);
                assert_eq!(result.stdout, "out\n");
                assert_eq!(result.stderr, "oops\n");
                assert_eq!(
                    result.command,
                    ["sh", "-c", "echo out; echo oops >&2; exit 4"]
                );
            }
            other => panic!("expected Execution, got {other:?}"),
        }
        // Without check the same is a plain result.
        let r = sb
            .exec(["sh", "-c", "exit 4"], ExecOptions::new())
            .await
            .expect("exec")
            .result(None)
            .await
            .expect("result");
        assert_eq!(r.returncode, 4);

        // Lines arrive while the command still runs: it prints two, then blocks on stdin until the
        // test has read them and answered.
        let mut p = sb
            .exec(
                [
                    "sh",
                    "-c",
                    "echo first; echo second; read x; echo got-$x; echo err >&2",
                ],
                ExecOptions::new().with_stdin(true).with_env("A", "1"),
            )
            .await
            .expect("exec");
        assert_eq!(p.next_stdout_line().await.as_deref(), Some("first"));
        assert_eq!(p.next_stdout_line().await.as_deref(), Some("second"));
        assert_eq!(p.poll().expect("poll"), None, "still waiting for stdin");
        let stdin = p.stdin().expect("stdin").clone();
        stdin.writeline("abc").await.expect("write");
        assert_eq!(p.next_stdout_line().await.as_deref(), Some("got-abc"));
        assert_eq!(p.next_stdout_line().await, None);
        let mut errs = p.stderr_lines();
        assert_eq!(errs.next().await.as_deref(), Some("err"));
        assert_eq!(errs.next().await, None);
        let r = p.result(None).await.expect("result");
        assert_eq!(r.stdout, "first\nsecond\ngot-abc\n");
        assert_eq!(r.stderr_bytes, b"err\n");
        assert_eq!(p.wait(None).await.expect("wait"), 0);

        // Stdin written and closed: the command reads to end-of-file.
        let p = sb
            .exec(["cat"], ExecOptions::new().with_stdin(true))
            .await
            .expect("exec");
        let stdin = p.stdin().expect("stdin");
        stdin.write(b"a\nb").await.expect("write");
        stdin.close().await.expect("close");
        assert_eq!(p.result(None).await.expect("result").stdout, "a\nb");

        // cancel() kills the tree: 137, cancelled.
        let p = sb
            .exec(["sh", "-c", "sleep 1000 & wait"], ExecOptions::new())
            .await
            .expect("exec");
        p.cancel().await.expect("cancel");
        let r = p.result(None).await.expect("result");
        assert_eq!(r.returncode, 137);
        assert!(r.cancelled && !r.timed_out);
        p.cancel().await.expect("cancel after the end is a no-op");

        // timeout_seconds: CommandTimeout with the output so far.
        let p = sb
            .exec(
                ["sh", "-c", "echo started; sleep 1000"],
                ExecOptions::new().with_timeout_seconds(0.5),
            )
            .await
            .expect("exec");
        match p.result(None).await {
            Err(SandboxError::CommandTimeout {
                result: Some(r), ..
            }) => {
                assert!(r.timed_out);
                assert_eq!(r.returncode, 137);
                assert_eq!(r.stdout, "started\n");
            }
            other => panic!("expected CommandTimeout, got {other:?}"),
        }
        // A client-side wait past its timeout: the command keeps running.
        let p = sb
            .exec(["sleep", "1000"], ExecOptions::new())
            .await
            .expect("exec");
        let err = p
            .result(Some(Duration::from_millis(100)))
            .await
            .expect_err("client timeout");
        assert_eq!(err.code(), CLIENT_TIMEOUT);
        assert_eq!(p.poll().expect("poll"), None);
        p.cancel().await.expect("cancel");
        assert_eq!(p.wait(None).await.expect("wait"), 137);

        // Bad commands are Validation errors.
        let err = sb
            .exec(Vec::<String>::new(), ExecOptions::new())
            .await
            .expect_err("empty");
        assert!(
            matches!(&err, SandboxError::Validation { field: Some(f), .. } if f == "command"),
            "{err:?}"
        );
        let err = sb
            .exec(["true"], ExecOptions::new().with_cwd("relative"))
            .await
            .expect_err("relative cwd");
        assert!(matches!(err, SandboxError::Validation { .. }), "{err:?}");

        sb.close(1.0).await.expect("close");
    });
    assert!(daemon_ids(&c).is_empty());
}

#[test]
fn large_output_is_capped_for_the_result_but_streamed_whole_to_a_reader() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let client = Client::new(&d.socket);
    c.block_on(async {
        let sb = Sandbox::run(&client, NO_COMMAND, &busybox())
            .await
            .expect("run");
        // 40000 lines of 100 bytes (4 MB), the result keeps 1 MiB, a reader sees every line.
        let script = "i=0; while [ $i -lt 40000 ]; do printf '%099d\\n' $i; i=$((i+1)); done";
        let p = sb
            .exec(
                ["sh", "-c", script],
                ExecOptions::new().with_max_output_bytes(1 << 20),
            )
            .await
            .expect("exec");
        let mut lines = p.stdout_lines();
        let mut n = 0u32;
        while let Some(l) = lines.next().await {
            assert_eq!(l, format!("{n:099}"));
            n += 1;
        }
        assert_eq!(n, 40000);
        let r = p.result(None).await.expect("result");
        assert!(r.stdout_truncated);
        assert_eq!(r.stdout_bytes.len(), 1 << 20);
        sb.close(1.0).await.expect("close");
    });
}

#[test]
fn files_and_logs() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let client = Client::new(&d.socket);
    c.block_on(async {
        let sb = Sandbox::run(
            &client,
            ["sh", "-c", "echo one; echo two >&2; echo three"],
            &busybox(),
        )
        .await
        .expect("run");
        sb.wait_until_complete(None, true).await.expect("complete");
        let mut logs = sb.stream_logs(false, None, false).await.expect("logs");
        let mut all = Vec::new();
        while let Some(l) = logs.next_line().await {
            all.push(l.expect("line"));
        }
        all.sort();
        assert_eq!(all, ["one\n", "three\n", "two\n"]);
        let mut logs = sb.stream_logs(true, Some(1), true).await.expect("logs");
        // One line (the last written; stdout and stderr are read apart, so either may be last),
        // prefixed with its timestamp.
        let last = logs.next_line().await.expect("one line").expect("line");
        let (ts, data) = last.split_once(' ').expect("timestamp prefix");
        assert!(ts.ends_with('Z'), "{last:?}");
        assert!(["two\n", "three\n"].contains(&data), "{last:?}");
        assert!(logs.next_line().await.is_none());
        sb.remove(false).await.expect("remove");

        let sb = Sandbox::run(&client, NO_COMMAND, &busybox())
            .await
            .expect("run");
        let fi = sb
            .write_file_with_mode("/a/b/c.sh", b"#!/bin/sh\necho hi\n", Some(0o755))
            .await
            .expect("write");
        assert_eq!((fi.size, fi.mode), (18, 0o755));
        let r = sb
            .exec(["/a/b/c.sh"], ExecOptions::new())
            .await
            .expect("exec")
            .result(None)
            .await
            .expect("result");
        assert_eq!(r.stdout, "hi\n");
        let err = sb.read_file("/nope").await.expect_err("missing");
        match &err {
            SandboxError::File { path, .. } => assert_eq!(path.as_deref(), Some("/nope")),
            other => panic!("expected File, got {other:?}"),
        }
        assert_eq!(err.code(), "FILE_NOT_FOUND");
        sb.close(1.0).await.expect("close");
    });
    assert!(daemon_ids(&c).is_empty());
}

#[test]
fn session_starts_sandboxes_on_first_use_and_ends_them() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let client = Client::new(&d.socket);
    c.block_on(async {
        let session = Session::new(&client, busybox().with_tag("batch-job"));
        let a = session.sandbox().expect("a");
        let b = session
            .sandbox_with(|d| d.with_tag("second").with_environment_variable("WHO", "b"))
            .expect("b");
        let never = session.sandbox().expect("never used");
        // Nothing exists before first use.
        assert!(ids(&client).await.is_empty());
        assert!(a.sandbox_id().is_none() && !a.is_started());
        assert_eq!(a.status().await.expect("status"), None);

        // Concurrent first operations create the sandbox once.
        let (r1, r2) = tokio_join(
            a.exec(["echo", "a1"], ExecOptions::new()),
            a.exec(["echo", "a2"], ExecOptions::new()),
        )
        .await;
        assert_eq!(
            r1.expect("a1").result(None).await.expect("a1").stdout,
            "a1\n"
        );
        assert_eq!(
            r2.expect("a2").result(None).await.expect("a2").stdout,
            "a2\n"
        );
        let a_id = a.sandbox_id().expect("created").to_owned();
        assert_eq!(ids(&client).await, std::slice::from_ref(&a_id));

        b.write_file("/x", b"b").await.expect("write starts b");
        let r = b
            .exec(["sh", "-c", "cat /x; echo $WHO"], ExecOptions::new())
            .await
            .expect("exec")
            .result(None)
            .await
            .expect("result");
        assert_eq!(r.stdout, "bb\n");
        let b_id = b.sandbox_id().expect("created").to_owned();
        assert_eq!(ids(&client).await.len(), 2);

        let mut mine: Vec<String> = session
            .list()
            .await
            .expect("list")
            .iter()
            .filter_map(|s| s.sandbox_id().map(str::to_owned))
            .collect();
        mine.sort();
        let mut want = vec![a_id.clone(), b_id.clone()];
        want.sort();
        assert_eq!(mine, want);
        let tagged = Sandbox::list(&client, &["batch-job", "second"], &[])
            .await
            .expect("list");
        assert_eq!(tagged.len(), 1);
        assert_eq!(tagged[0].sandbox_id(), Some(b_id.as_str()));
        let running = Sandbox::list(&client, &["batch-job"], &[SandboxStatus::Running])
            .await
            .expect("list");
        assert_eq!(running.len(), 2);

        session.close().await.expect("close");
        assert!(ids(&client).await.is_empty(), "session sandboxes left");
        assert!(never.sandbox_id().is_none());
        let err = session.sandbox().expect_err("closed");
        assert_eq!(err.code(), SESSION_CLOSED);
    });
}

/// Polls two futures together (the harness has no `tokio::join!`).
async fn tokio_join<A: std::future::Future, B: std::future::Future>(
    a: A,
    b: B,
) -> (A::Output, B::Output) {
    let mut a = std::pin::pin!(a);
    let mut b = std::pin::pin!(b);
    let (mut ra, mut rb) = (None, None);
    std::future::poll_fn(|cx| {
        if ra.is_none() {
            if let std::task::Poll::Ready(v) = a.as_mut().poll(cx) {
                ra = Some(v);
            }
        }
        if rb.is_none() {
            if let std::task::Poll::Ready(v) = b.as_mut().poll(cx) {
                rb = Some(v);
            }
        }
        if ra.is_some() && rb.is_some() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    match (ra, rb) {
        (Some(a), Some(b)) => (a, b),
        _ => unreachable!("both futures completed"),
    }
}

#[test]
fn list_from_id_delete_and_validation_errors() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let client = Client::new(&d.socket);
    c.block_on(async {
        let sb = Sandbox::run(&client, NO_COMMAND, &busybox().with_tag("found-me").with_name("fm"))
            .await
            .expect("run");
        let id = sb.sandbox_id().expect("id").to_owned();
        let found = Sandbox::list(&client, &["found-me"], &[])
            .await
            .expect("list");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].sandbox_id(), Some(id.as_str()));
        assert!(Sandbox::list(&client, &["found-me"], &[SandboxStatus::Completed])
            .await
            .expect("list")
            .is_empty());

        // from_id, by id and by name.
        for key in [id.as_str(), "fm"] {
            let again = Sandbox::from_id(&client, key).await.expect("from_id");
            assert_eq!(again.sandbox_id(), Some(id.as_str()));
            let r = again
                .exec(["hostname"], ExecOptions::new())
                .await
                .expect("exec")
                .result(None)
                .await
                .expect("result");
            assert_eq!(r.stdout, "fm\n");
        }
        let err = Sandbox::from_id(&client, "no-such-box")
            .await
            .expect_err("missing");
        match &err {
            SandboxError::NotFound { sandbox_id, .. } => {
                assert_eq!(sandbox_id.as_deref(), Some("no-such-box"))
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
        Sandbox::delete(&client, "no-such-box", true)
            .await
            .expect("missing ok");
        let err = Sandbox::delete(&client, "no-such-box", false)
            .await
            .expect_err("missing");
        assert!(matches!(err, SandboxError::NotFound { .. }), "{err:?}");
        Sandbox::delete(&client, &id, false).await.expect("delete");
        assert!(ids(&client).await.is_empty());

        // Bad input names the field.
        let err = Sandbox::run(&client, NO_COMMAND, &busybox().with_memory("lots"))
            .await
            .expect_err("bad memory");
        match &err {
            SandboxError::Validation { field, .. } => {
                assert_eq!(field.as_deref(), Some("resources.memory"))
            }
            other => panic!("expected Validation, got {other:?}"),
        }
        let err = Sandbox::run(&client, NO_COMMAND, &busybox().with_max_lifetime_seconds(-1.0))
            .await
            .expect_err("bad lifetime");
        assert!(
            matches!(&err, SandboxError::Validation { field: Some(f), .. } if f == "max_lifetime_seconds"),
            "{err:?}"
        );
        // A failed creation is not remembered: nothing was created, nothing to stop.
        let sb = Sandbox::new(&client, NO_COMMAND, &busybox().with_cpu("a lot"));
        assert!(sb.exec(["true"], ExecOptions::new()).await.is_err());
        assert!(sb.stop(1.0, false).await.expect("nothing to stop").is_none());
        assert!(sb.sandbox_id().is_none());
        assert!(ids(&client).await.is_empty());

        // Unreachable daemon: a client error.
        let gone = Client::new(d.socket.with_file_name("nope.sock"));
        let err = Sandbox::run(&gone, NO_COMMAND, &busybox())
            .await
            .expect_err("no daemon");
        assert!(matches!(err, SandboxError::Client(_)), "{err:?}");
        assert_eq!(err.code(), "CONNECTION_ERROR");
    });
}

#[test]
fn blocking_api() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();

    // Sandbox, Process with a line iterator and stdin, files streamed both ways.
    let sb = blocking::Sandbox::run(&c, NO_COMMAND, &busybox()).expect("run");
    let p = sb
        .exec(
            [
                "sh",
                "-c",
                "echo ready; while read l; do echo \"<$l>\"; done; echo bye",
            ],
            ExecOptions::new().with_stdin(true),
        )
        .expect("exec");
    let mut lines = p.stdout_lines();
    assert_eq!(lines.next().as_deref(), Some("ready"));
    let stdin = p.stdin().expect("stdin");
    stdin.writeline("x").expect("write");
    assert_eq!(lines.next().as_deref(), Some("<x>"));
    stdin.writeline("y").expect("write");
    stdin.close().expect("close");
    assert_eq!(lines.collect::<Vec<_>>(), ["<y>", "bye"]);
    assert_eq!(p.wait(None).expect("wait"), 0);
    assert_eq!(
        p.result(None).expect("result").stdout,
        "ready\n<x>\n<y>\nbye\n"
    );

    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let fi = sb
        .write_file_from("/big/file", std::io::Cursor::new(data.clone()), None)
        .expect("upload");
    assert_eq!(fi.size, data.len() as u64);
    let mut back = Vec::new();
    let fi = sb.read_file_to("/big/file", &mut back).expect("download");
    assert_eq!(fi.size, data.len() as u64);
    assert!(back == data, "round trip differs");
    let r = sb
        .exec(["false"], ExecOptions::new().with_check(true))
        .expect("exec")
        .result(None)
        .expect_err("check");
    assert_eq!(r.result().map(|r| r.returncode), Some(1));
    sb.close(1.0).expect("close");
    assert!(daemon_ids(&c).is_empty());

    // A command run to its end, with logs.
    let job = blocking::Sandbox::run(&c, ["sh", "-c", "echo job-output"], &busybox()).expect("run");
    job.wait_until_complete(None, true).expect("complete");
    assert_eq!(job.returncode(), Some(0));
    let logs: Vec<String> = job
        .stream_logs(false, None, false)
        .expect("logs")
        .map(|l| l.expect("line"))
        .collect();
    assert_eq!(logs, ["job-output\n"]);
    blocking::Sandbox::delete(&c, job.sandbox_id().expect("id"), false).expect("delete");

    // scoped: ended also when the closure fails.
    let mut seen = None;
    let r: Result<(), SandboxError> = blocking::Sandbox::scoped(&c, NO_COMMAND, &busybox(), |sb| {
        seen = sb.sandbox_id().map(str::to_owned);
        sb.read_file("/missing")?;
        Ok(())
    });
    assert!(matches!(r, Err(SandboxError::File { .. })), "{r:?}");
    assert!(seen.is_some());
    assert!(daemon_ids(&c).is_empty());

    // A session: lazy starts, from_id adoption, and ended when dropped.
    let other = blocking::Sandbox::run(&c, NO_COMMAND, &busybox()).expect("run");
    {
        let session = blocking::Session::new(&c, busybox().with_tag("blocking")).expect("session");
        let a = session.sandbox().expect("a");
        let _unused = session.sandbox().expect("unused");
        assert_eq!(daemon_ids(&c).len(), 1);
        a.wait(None).expect("wait starts it");
        assert_eq!(
            a.exec(["echo", "hi"], ExecOptions::new())
                .expect("exec")
                .result(None)
                .expect("result")
                .stdout,
            "hi\n"
        );
        let adopted = session
            .from_id(other.sandbox_id().expect("id"))
            .expect("adopt");
        assert_eq!(
            adopted.status().expect("status"),
            Some(SandboxStatus::Running)
        );
        assert_eq!(session.list().expect("list").len(), 1);
        assert_eq!(daemon_ids(&c).len(), 2);
    }
    assert!(
        daemon_ids(&c).is_empty(),
        "the dropped session ended its sandboxes"
    );
}
