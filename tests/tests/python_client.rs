//! The Python client (`proto/python`, package `sandboxd`): its unittest suite (the seed pages' snippets
//! and the API tests) run against a real daemon that pulls `python:3.11` through the test registry and
//! whose sandboxes reach an [`OutsideWorld`] (the test's stand-in for the internet, with a stand-in package
//! index for the seed's `pip install torch`), and its installation into a fresh virtual environment,
//! offline.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sandbox_tests::net::{NetSettings, OutsideWorld};
use sandbox_tests::{test_registry, workspace_root, Daemon};

/// The interpreter: `python3` from PATH.
const PYTHON: &str = "python3";

/// Skips the suite may report, each with the reason it must give.
const ALLOWED_SKIPS: &[&str] = &[
    // Checks the snippets against the seed pages, when they are next to the repository.
    "test_snippets_are_verbatim",
];

fn python_dir() -> PathBuf {
    workspace_root().join("proto").join("python")
}

fn show(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\n---- stdout ----\n{}\n---- stderr ----\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn python_client_suite_passes_against_the_daemon() {
    // The sandboxes' DNS is the world's responder, and `SANDBOXD_TEST_PIP_INDEX` its package index: the
    // seed's `pip install torch` installs the stand-in wheel through the daemon's NAT.
    let world = OutsideWorld::start();
    let d = Daemon::start_with_network(
        NetSettings {
            dns: world.dns_servers(),
            ..NetSettings::default()
        },
        Some(&format!(
            "[registries.\"docker.io\"]\nmirrors = [\"http://{}\"]\n",
            test_registry()
        )),
    );
    let root = workspace_root();
    let mut cmd = Command::new(PYTHON);
    cmd.args([
        "-m",
        "unittest",
        "discover",
        "-v",
        "-s",
        "proto/python/tests",
        "-t",
        "proto/python",
    ])
    .current_dir(&root)
    .env("SANDBOXD_SOCKET", &d.socket)
    .env("SANDBOXD_TEST_PIP_INDEX", world.pip_index())
    .env("PYTHONPATH", python_dir())
    .env("PYTHONDONTWRITEBYTECODE", "1")
    .env("PYTHONUNBUFFERED", "1");
    // The seed pages (`../shared/seeds`), when present, let the suite check that its copies of the
    // snippets are verbatim.
    let seeds = root.join("..").join("shared").join("seeds");
    if seeds.is_dir() {
        cmd.env("SANDBOXD_SEEDS_DIR", &seeds);
    }
    let out = cmd.output().expect("running python3 -m unittest");
    let report = show("python3 -m unittest discover", &out);
    println!("{report}");
    assert!(
        out.status.success(),
        "the Python client suite failed:\n{report}"
    );

    // unittest -v writes one line per test to stderr: only the known skips are allowed.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ran = stderr.lines().filter(|l| l.ends_with(" ... ok")).count();
    assert!(ran >= 50, "only {ran} tests passed:\n{report}");
    for line in stderr.lines().filter(|l| l.contains(" ... skipped")) {
        assert!(
            ALLOWED_SKIPS.iter().any(|t| line.starts_with(t)),
            "unexpected skip: {line}"
        );
    }

    // The seed's `pip install torch` fetched the stand-in wheel from the world's index, through the
    // daemon's masquerade (the world sees the host's address on its veth).
    let fetched = format!("http {} ", world.host_addr);
    let log = world.sync_log();
    assert!(
        log.iter()
            .any(|l| l.starts_with(&fetched)
                && l.ends_with(" /packages/torch-2.99.0-py3-none-any.whl")),
        "the stand-in wheel was not fetched from the outside world: {log:?}"
    );

    // The suite cleaned up after itself: context managers, sessions and its own clean-ups deleted every
    // sandbox it created.
    let left = d
        .client()
        .list(&[], None)
        .expect("listing sandboxes")
        .sandboxes;
    assert!(
        left.is_empty(),
        "sandboxes left by the Python suite: {:?}",
        left.iter()
            .map(|s| (&s.id, &s.status, &s.tags))
            .collect::<Vec<_>>()
    );
}

/// Copies the package sources (not build or cache directories) to `dest`.
fn copy_tree(src: &Path, dest: &Path) {
    fs::create_dir_all(dest).expect("creating the copy");
    for e in fs::read_dir(src).expect("reading proto/python").flatten() {
        let name = e.file_name();
        let n = name.to_string_lossy();
        if n == "__pycache__" || n == "build" || n == "dist" || n.ends_with(".egg-info") {
            continue;
        }
        let to = dest.join(&name);
        if e.file_type().expect("file type").is_dir() {
            copy_tree(&e.path(), &to);
        } else {
            fs::copy(e.path(), &to).expect("copying a file");
        }
    }
}

#[test]
fn python_client_installs_offline_into_a_fresh_venv() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let src = tmp.path().join("src");
    copy_tree(&python_dir(), &src);
    let venv = tmp.path().join("venv");
    let out = Command::new(PYTHON)
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .expect("python3 -m venv");
    assert!(out.status.success(), "{}", show("python3 -m venv", &out));

    // Offline: no index, no build isolation (the venv's own setuptools builds the wheel).
    let out = Command::new(venv.join("bin").join("pip"))
        .args([
            "install",
            "--no-index",
            "--no-build-isolation",
            "--disable-pip-version-check",
        ])
        .arg(&src)
        .current_dir(tmp.path())
        .output()
        .expect("pip install");
    assert!(out.status.success(), "{}", show("pip install", &out));

    // The installed package (not the source tree) imports and works against a daemon.
    let d = Daemon::start_mirrored("");
    let script = r#"
import sandboxd
from sandboxd import Sandbox, Session, SandboxDefaults, SandboxExecutionError, SandboxError
assert "/site-packages/sandboxd/" in sandboxd.__file__, sandboxd.__file__
for name in sandboxd.__all__:
    getattr(sandboxd, name)
with Sandbox.run(container_image="python:3.11") as sandbox:
    print(sandbox.exec(["python", "--version"]).result().stdout, end="")
"#;
    let out = Command::new(venv.join("bin").join("python"))
        .args(["-c", script])
        .current_dir(tmp.path())
        .env("SANDBOXD_SOCKET", &d.socket)
        .env_remove("PYTHONPATH")
        .output()
        .expect("running the installed client");
    let report = show("installed client", &out);
    println!("{report}");
    assert!(out.status.success(), "{report}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("Python 3.11"),
        "{report}"
    );
}
