//! In-process benchmarks through the Rust client (`sandbox_proto::client::BlockingClient`).
//!
//! ```text
//! sandbox-bench start IMAGE RUNS   # create(/bin/true) -> exited, per run (then delete, untimed)
//! sandbox-bench exec IMAGE RUNS    # exec(true) round trips in one running sandbox
//! sandbox-bench exec-stream IMAGE RUNS   # the same through the exec stream (Ready..Exit)
//! sandbox-bench first-exec IMAGE RUNS    # create (idle) -> first exec(true) result
//! sandbox-bench files-1m IMAGE RUNS      # write + read back 1 MiB
//! sandbox-bench files-100m IMAGE RUNS    # write + read back 100 MiB
//! sandbox-bench stream-mbps IMAGE RUNS   # exec stream of `head -c 1G /dev/zero`: MB/s per run
//! sandbox-bench churn IMAGE RUNS         # create (idle) + delete --force, per run
//! ```
//! The socket comes from `SANDBOXD_SOCKET`. Prints one JSON object: runs, median, p90, p99, mean, min (ms).

use std::time::Instant;

use sandbox_proto::client::BlockingClient;
use sandbox_proto::exec_stream::StreamEvent;
use sandbox_proto::{CreateSandboxRequest, ExecRequest, WaitCondition, WaitRequest};

fn stats(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    serde_json::json!({
        "runs": v.len(),
        "median_ms": pct(0.5),
        "p90_ms": pct(0.9),
        "p99_ms": pct(0.99),
        "mean_ms": v.iter().sum::<f64>() / v.len() as f64,
        "min_ms": v[0],
    })
}

/// Creates an idle sandbox and answers its id.
fn idle(c: &BlockingClient, image: &str) -> String {
    match c.create(&CreateSandboxRequest {
        image: image.to_owned(),
        ..Default::default()
    }) {
        Ok(sb) => sb.id,
        Err(e) => {
            eprintln!("sandbox-bench: create: {e}");
            std::process::exit(1)
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: sandbox-bench start|exec|exec-stream|first-exec|files-1m|files-100m|stream-mbps|churn IMAGE RUNS");
        std::process::exit(2);
    }
    let image = args[2].clone();
    let runs: usize = args[3].parse().unwrap_or(100).max(1);
    let c = match BlockingClient::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sandbox-bench: {e}");
            std::process::exit(1);
        }
    };
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
        eprintln!("sandbox-bench: {what}: {e}");
        std::process::exit(1)
    };
    let mut samples = Vec::with_capacity(runs);
    match args[1].as_str() {
        "start" => {
            let req = CreateSandboxRequest {
                image,
                command: Some(vec!["/bin/true".into()]),
                ..Default::default()
            };
            let wait = WaitRequest {
                condition: WaitCondition::Exited,
                timeout_seconds: Some(60.0),
            };
            for _ in 0..runs {
                let t = Instant::now();
                let sb = c.create(&req).unwrap_or_else(|e| fail("create", &e));
                let done = c
                    .wait(&sb.id, wait.clone())
                    .unwrap_or_else(|e| fail("wait", &e));
                samples.push(t.elapsed().as_secs_f64() * 1000.0);
                if done.exit.as_ref().and_then(|x| x.code) != Some(0) {
                    fail("run", &format!("unexpected end {:?}", done.exit));
                }
                c.delete(&sb.id, true)
                    .unwrap_or_else(|e| fail("delete", &e));
            }
        }
        "exec" => {
            let sb = c
                .create(&CreateSandboxRequest {
                    image,
                    ..Default::default()
                })
                .unwrap_or_else(|e| fail("create", &e));
            let req = ExecRequest {
                command: vec!["true".into()],
                ..Default::default()
            };
            for _ in 0..runs {
                let t = Instant::now();
                let r = c.exec(&sb.id, &req).unwrap_or_else(|e| fail("exec", &e));
                samples.push(t.elapsed().as_secs_f64() * 1000.0);
                if r.exit_code != 0 {
                    fail("exec", &format!("exit code {}", r.exit_code));
                }
            }
            c.delete(&sb.id, true)
                .unwrap_or_else(|e| fail("delete", &e));
        }
        "exec-stream" => {
            let sb = idle(&c, &image);
            let init = sandbox_proto::stream::ExecStreamInit {
                command: vec!["true".into()],
                ..Default::default()
            };
            for _ in 0..runs {
                let t = Instant::now();
                let (mut s, _) = c
                    .exec_stream(&sb, &init)
                    .unwrap_or_else(|e| fail("exec stream", &e));
                loop {
                    match s.next().unwrap_or_else(|e| fail("exec stream", &e)) {
                        Some(StreamEvent::Exit(x)) if x.exit_code == 0 => break,
                        Some(StreamEvent::Exit(x)) => fail("exec", &format!("{x:?}")),
                        Some(_) => {}
                        None => fail("exec stream", &"no exit"),
                    }
                }
                samples.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            let _ = c.delete(&sb, true);
        }
        "first-exec" => {
            let req = ExecRequest {
                command: vec!["true".into()],
                ..Default::default()
            };
            for _ in 0..runs {
                let t = Instant::now();
                let sb = idle(&c, &image);
                c.exec(&sb, &req).unwrap_or_else(|e| fail("exec", &e));
                samples.push(t.elapsed().as_secs_f64() * 1000.0);
                let _ = c.delete(&sb, true);
            }
        }
        "files-1m" | "files-100m" => {
            let size = if args[1] == "files-1m" {
                1 << 20
            } else {
                100 << 20
            };
            let data: Vec<u8> = (0..size).map(|i: usize| (i * 7 % 251) as u8).collect();
            let sb = idle(&c, &image);
            for _ in 0..runs {
                let t = Instant::now();
                c.write_file(&sb, "/tmp/bench.bin", &data, None)
                    .unwrap_or_else(|e| fail("write", &e));
                let back = c
                    .read_file(&sb, "/tmp/bench.bin")
                    .unwrap_or_else(|e| fail("read", &e));
                samples.push(t.elapsed().as_secs_f64() * 1000.0);
                if back != data {
                    fail("files", &"read back differs");
                }
            }
            let _ = c.delete(&sb, true);
        }
        "stream-mbps" => {
            // Samples are MB/s (not ms) for this mode.
            let sb = idle(&c, &image);
            let init = sandbox_proto::stream::ExecStreamInit {
                command: vec![
                    "head".into(),
                    "-c".into(),
                    "1073741824".into(),
                    "/dev/zero".into(),
                ],
                ..Default::default()
            };
            for _ in 0..runs {
                let t = Instant::now();
                let (mut s, _) = c
                    .exec_stream(&sb, &init)
                    .unwrap_or_else(|e| fail("exec stream", &e));
                let mut n = 0u64;
                loop {
                    match s.next().unwrap_or_else(|e| fail("exec stream", &e)) {
                        Some(StreamEvent::Stdout(d)) => n += d.len() as u64,
                        Some(StreamEvent::Exit(_)) => break,
                        Some(_) => {}
                        None => fail("exec stream", &"no exit"),
                    }
                }
                let secs = t.elapsed().as_secs_f64();
                if n != 1 << 30 {
                    fail("stream", &format!("got {n} bytes"));
                }
                samples.push(n as f64 / secs / 1e6);
            }
            let _ = c.delete(&sb, true);
        }
        "churn" => {
            for _ in 0..runs {
                let t = Instant::now();
                let sb = idle(&c, &image);
                c.delete(&sb, true).unwrap_or_else(|e| fail("delete", &e));
                samples.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        other => fail("unknown mode", &other),
    }
    println!("{}", stats(samples));
}
