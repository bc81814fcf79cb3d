//! In-process benchmarks through the Rust client (`sandbox_proto::client::BlockingClient`).
//!
//! ```text
//! sandbox-bench start IMAGE RUNS   # create(/bin/true) -> exited, per run (then delete, untimed)
//! sandbox-bench exec IMAGE RUNS    # exec(true) round trips in one running sandbox
//! ```
//! The socket comes from `SANDBOXD_SOCKET`. Prints one JSON object: runs, median, p90, p99, mean, min (ms).

use std::time::Instant;

use sandbox_proto::client::BlockingClient;
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: sandbox-bench start|exec IMAGE RUNS");
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
        other => fail("unknown mode", &other),
    }
    println!("{}", stats(samples));
}
