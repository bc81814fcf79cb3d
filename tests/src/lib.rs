//! Shared harness of the privileged end-to-end tests: a real `sandboxd` per test (own socket, state
//! directory and cgroup parent), the real `sandboxctl`, and the busybox OCI image built by
//! `scripts/build-busybox-image`.
//!
//! Every [`Daemon`] checks, when dropped, that nothing of its sandboxes is left behind: no state
//! directories, no mounts, no cgroups, no supervisor processes, and (after a clean shutdown) none of its
//! network: no veth, no bridge, no nftables table. A test that leaks fails.
//!
//! Every daemon gets a network of its own (bridge, subnet, nftables table and host-veth prefix, see
//! [`net::DaemonNetwork`]), so that tests run in parallel.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use sandbox_proto::client::{BlockingClient, ClientError};
use sandbox_proto::{
    CreateSandboxRequest, ErrorCode, ExecRequest, ExecResult, ImageInfo, ImportImageRequest,
    SandboxInfo, SandboxStatus, WaitCondition, WaitRequest,
};

pub use sandbox_proto;

pub mod fake_registry;
pub mod net;
pub mod oci;

/// How long a daemon may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The test registry's `host:port` (`$SANDBOXD_TEST_REGISTRY`, set by `scripts/test`, which starts Debian's
/// `docker-registry` on loopback and pushes the test images with `scripts/test-images`).
pub fn test_registry() -> String {
    match std::env::var("SANDBOXD_TEST_REGISTRY") {
        Ok(r) if !r.is_empty() => r,
        _ => panic!(
            "SANDBOXD_TEST_REGISTRY is not set: run the tests through scripts/test, which starts the test \
             registry and pushes the test images (or start one with scripts/lib/registry.sh and scripts/test-images)"
        ),
    }
}

/// The test registry's log (`$SANDBOXD_TEST_REGISTRY_LOG`): one access-log line per request it served.
pub fn test_registry_log() -> PathBuf {
    PathBuf::from(
        std::env::var_os("SANDBOXD_TEST_REGISTRY_LOG")
            .expect("SANDBOXD_TEST_REGISTRY_LOG is not set: run the tests through scripts/test"),
    )
}

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().expect("tests/ has a parent").to_path_buf()
}

/// Where `sandboxd` and `sandboxctl` live: `$SANDBOXD_BIN_DIR`, else `<workspace>/target/release`.
pub fn bin_dir() -> PathBuf {
    match std::env::var_os("SANDBOXD_BIN_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => workspace_root().join("target").join("release"),
    }
}

fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build --release` first (or set SANDBOXD_BIN_DIR)",
        p.display()
    );
    p
}

/// Runs `scripts/build-busybox-image OUTDIR [--tar FILE]`; panics with its output on failure.
pub fn build_busybox_image(outdir: &Path, tar: Option<&Path>) {
    let mut cmd = Command::new(workspace_root().join("scripts/build-busybox-image"));
    cmd.arg(outdir);
    if let Some(t) = tar {
        cmd.arg("--tar").arg(t);
    }
    let out = cmd.output().expect("running scripts/build-busybox-image");
    assert!(
        out.status.success(),
        "build-busybox-image failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Copies the busybox image to `dir` (an OCI layout) with one more layer holding symlinks,
/// `(path, target)` each: the hostile-image tests' way to plant links where the runtime works.
pub fn busybox_with_symlinks(dir: &Path, links: &[(&str, &str)]) {
    let script = r#"
set -euo pipefail
src=$1; dst=$2; shift 2
cp -r "$src" "$dst"
work=$(mktemp -d)
mkdir "$work/root"
while [ $# -gt 0 ]; do
  mkdir -p "$work/root/$(dirname "$1")"
  ln -s "$2" "$work/root/$1"
  shift 2
done
tar --numeric-owner --owner=0 --group=0 -C "$work/root" -cf "$work/layer.tar" .
layer=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
cp "$work/layer.tar" "$dst/blobs/sha256/$layer"
lsize=$(stat -c %s "$work/layer.tar")
m=$(jq -r '.manifests[0].digest' "$dst/index.json" | cut -d: -f2)
c=$(jq -r '.config.digest' "$dst/blobs/sha256/$m" | cut -d: -f2)
jq -c --arg d "sha256:$layer" '.rootfs.diff_ids += [$d]' "$dst/blobs/sha256/$c" > "$work/config.json"
cd_=$(sha256sum "$work/config.json" | cut -d' ' -f1); csize=$(stat -c %s "$work/config.json")
cp "$work/config.json" "$dst/blobs/sha256/$cd_"
jq -c --arg c "sha256:$cd_" --argjson cs "$csize" --arg l "sha256:$layer" --argjson ls "$lsize" \
  '.config.digest=$c | .config.size=$cs | .layers += [{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":$l,"size":$ls}]' \
  "$dst/blobs/sha256/$m" > "$work/manifest.json"
md=$(sha256sum "$work/manifest.json" | cut -d' ' -f1); msize=$(stat -c %s "$work/manifest.json")
cp "$work/manifest.json" "$dst/blobs/sha256/$md"
jq -c --arg d "sha256:$md" --argjson s "$msize" '.manifests[0].digest=$d | .manifests[0].size=$s' "$dst/index.json" > "$work/index.json"
cp "$work/index.json" "$dst/index.json"
rm -rf "$work"
"#;
    let mut cmd = Command::new("bash");
    cmd.args(["-c", script, "build"])
        .arg(busybox_image())
        .arg(dir);
    for (p, t) in links {
        cmd.args([p.trim_start_matches('/'), t]);
    }
    assert!(cmd.status().expect("bash").success(), "building the image");
}

fn manifest_digest(layout: &Path) -> Option<String> {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).ok()?).ok()?;
    index["manifests"][0]["digest"].as_str().map(str::to_owned)
}

/// The busybox OCI layout, built once per test binary run into `target/test-images/busybox-oci`.
///
/// Built in a temporary directory next to it and renamed into place, so several test binaries running
/// at once never see a half-written layout. The build is reproducible: when another binary already put
/// a layout with the same manifest digest in place, that one is used.
pub fn busybox_image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let base = workspace_root().join("target").join("test-images");
        fs::create_dir_all(&base).expect("creating target/test-images");
        let dest = base.join("busybox-oci");
        let tmp = tempfile::Builder::new()
            .prefix(".build-")
            .tempdir_in(&base)
            .expect("temp dir in target/test-images");
        let built = tmp.path().join("busybox-oci");
        build_busybox_image(&built, None);
        let digest = manifest_digest(&built).expect("the built layout has an index.json");
        for _ in 0..3 {
            match fs::rename(&built, &dest) {
                Ok(()) => return dest,
                Err(_) if manifest_digest(&dest).as_deref() == Some(digest.as_str()) => {
                    // Same reproducible build already in place (from another binary or an earlier run).
                    return dest;
                }
                Err(_) => {
                    // A stale layout (e.g. another busybox version): move it aside atomically, then retry.
                    let trash = tmp.path().join("stale");
                    let _ = fs::remove_dir_all(&trash);
                    let _ = fs::rename(&dest, &trash);
                }
            }
        }
        panic!(
            "could not put the busybox layout in place at {}",
            dest.display()
        );
    })
}

/// The reference the shared image is imported under.
pub const BUSYBOX: &str = "busybox:latest";

/// Mounted cgroup hierarchies: `(mount point, mount root, controllers or super options)`.
fn cgroup_mounts() -> Vec<(PathBuf, String, Vec<String>, bool)> {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("reading mountinfo");
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 5 || post.len() < 3 {
            continue;
        }
        let fstype = post[0];
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        let opts: Vec<String> = post[2].split(',').map(str::to_owned).collect();
        out.push((
            PathBuf::from(pre[4]),
            pre[3].to_owned(),
            opts,
            fstype == "cgroup2",
        ));
    }
    out
}

/// `<hierarchy mount>/<this process's cgroup there>/<parent>` for every mounted cgroup hierarchy, keyed
/// by the hierarchy's mount point. The daemon is a child of this process, so it starts in the same cgroups.
pub fn cgroup_parent_dirs(parent: &str) -> BTreeMap<PathBuf, PathBuf> {
    let own = fs::read_to_string("/proc/self/cgroup").expect("reading /proc/self/cgroup");
    let own: Vec<(String, Vec<String>, String)> = own
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let id = it.next()?.to_owned();
            let ctls = it
                .next()?
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            Some((id, ctls, it.next()?.to_owned()))
        })
        .collect();
    let mut out = BTreeMap::new();
    for (mount_point, mount_root, opts, v2) in cgroup_mounts() {
        let path = own.iter().find_map(|(id, ctls, path)| {
            let matches = if v2 {
                id == "0" && ctls.is_empty()
            } else {
                ctls.iter().any(|c| opts.contains(c))
            };
            matches.then_some(path.as_str())
        });
        let Some(path) = path else { continue };
        let root = mount_root.trim_end_matches('/');
        let Some(rel) = path.strip_prefix(root) else {
            continue;
        };
        let dir = mount_point.join(rel.trim_start_matches('/')).join(parent);
        out.insert(mount_point, dir);
    }
    out
}

/// Host pids of `sandboxd shim` processes (supervisors) of the daemon using `state_dir` and
/// `cgroup_parent`: a supervisor started for a sandbox has `SANDBOXD_SHIM_STATE_DIR=<state_dir>/...` in
/// its environment; a pooled one (started ahead of any sandbox) has `SANDBOXD_SHIM_POOL_CGROUP=<json>`
/// naming its cgroup under `cgroup_parent`.
pub fn shim_processes(state_dir: &Path, cgroup_parent: &str) -> Vec<i32> {
    shim_environments(state_dir, cgroup_parent)
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

/// Ids of the pooled supervisors' cgroups (from their `SANDBOXD_SHIM_POOL_CGROUP`).
pub fn pool_cgroup_ids(state_dir: &Path, cgroup_parent: &str) -> Vec<String> {
    let marker = format!("/{cgroup_parent}/");
    let mut ids = Vec::new();
    for (_, env) in shim_environments(state_dir, cgroup_parent) {
        for var in env {
            let Some(json) = var.strip_prefix("SANDBOXD_SHIM_POOL_CGROUP=") else {
                continue;
            };
            for (i, _) in json.match_indices(&marker) {
                let rest = &json[i + marker.len()..];
                let id: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric())
                    .collect();
                if !id.is_empty() && !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
    }
    ids
}

/// `(pid, environment)` of every supervisor of this daemon (see [`shim_processes`]).
fn shim_environments(state_dir: &Path, cgroup_parent: &str) -> Vec<(i32, Vec<String>)> {
    let needle = format!("SANDBOXD_SHIM_STATE_DIR={}/", state_dir.display());
    let pool_marker = format!("/{cgroup_parent}/");
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if !cmdline.starts_with(b"sandboxd\0shim\0") {
            continue;
        }
        let Ok(env) = fs::read(e.path().join("environ")) else {
            continue;
        };
        let env: Vec<String> = env
            .split(|b| *b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        let ours = env.iter().any(|v| {
            v.starts_with(&needle)
                || (v.starts_with("SANDBOXD_SHIM_POOL_CGROUP=") && v.contains(&pool_marker))
        });
        if ours {
            out.push((pid, env));
        }
    }
    out
}

/// Mount points (field 5 of mountinfo) under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("reading mountinfo");
    let d = dir.display().to_string();
    text.lines()
        .filter(|l| l.contains(&d))
        .map(str::to_owned)
        .collect()
}

/// Safety bound of [`wait_pid_exit`]: a test fails instead of hanging when a process never exits.
const PID_EXIT_BOUND_MS: i32 = 120_000;

/// Opens a pidfd on `pid` and blocks until the process has exited (panics after a generous bound).
pub fn wait_pid_exit(pid: i32) {
    assert!(
        wait_pid_exit_within(pid, PID_EXIT_BOUND_MS),
        "process {pid} did not exit within {PID_EXIT_BOUND_MS} ms"
    );
}

/// Waits on a pidfd until `pid` has exited; false if it is still running after `bound_ms`.
pub fn wait_pid_exit_within(pid: i32, bound_ms: i32) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ESRCH),
            "pidfd_open({pid}): {e}"
        );
        return true; // already gone
    }
    let fd = fd as i32;
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `p` is a valid pollfd for the duration of the call and we pass a count of 1.
        let r = unsafe { libc::poll(&mut p, 1, bound_ms) };
        if r >= 0 {
            // SAFETY: `fd` is the descriptor pidfd_open returned above, owned here and closed once.
            unsafe { libc::close(fd) };
            return r > 0;
        }
        let e = std::io::Error::last_os_error();
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::Interrupted,
            "poll on pidfd: {e}"
        );
    }
}

/// Sends `sig` to `pid`.
pub fn kill(pid: i32, sig: i32) {
    // SAFETY: kill takes plain integers.
    let r = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        r,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// One field of `/proc/<pid>/status` (e.g. `Uid`), without the key.
pub fn proc_status_field(pid: i32, key: &str) -> String {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc/<pid>/status");
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// A `sandboxd` started for one test, with its own socket, state directory and cgroup parent.
#[derive(Debug)]
pub struct Daemon {
    /// The API socket.
    pub socket: PathBuf,
    /// `--state-dir`.
    pub state_dir: PathBuf,
    /// `--cgroup-parent` (relative: created under the daemon's own cgroup in every hierarchy).
    pub cgroup_parent: String,
    /// The daemon's log (its stderr), appended to across restarts.
    pub log: PathBuf,
    /// `--config`, when the daemon runs with a configuration file.
    pub config: Option<PathBuf>,
    /// Its network (the generated or the caller's `[network]` section).
    pub network: net::DaemonNetwork,
    child: Option<Child>,
    /// The last stop was a SIGKILL ([`Daemon::kill9`]): the network is not expected to be cleaned up.
    killed: bool,
    dir: Option<tempfile::TempDir>,
}

impl Daemon {
    /// Starts a fresh daemon and waits until it listens.
    pub fn start() -> Self {
        Self::start_with_config(None)
    }

    /// Starts a fresh daemon whose registry configuration names the test registry
    /// (`$SANDBOXD_TEST_REGISTRY`) as the mirror of `docker.io`: `python:3.11` is pulled by its public name
    /// through the real pull path. `extra` is appended to the configuration file.
    pub fn start_mirrored(extra: &str) -> Self {
        let reg = test_registry();
        Self::start_with_config(Some(&format!(
            "[registries.\"docker.io\"]\nmirrors = [\"http://{reg}\"]\n\n{extra}"
        )))
    }

    /// Starts a fresh daemon with `config` (TOML) as its configuration file. Unless `config` has a
    /// `[network]` section of its own, a generated one is appended: a bridge, subnet, nftables table and
    /// veth prefix of this daemon's own (see [`net::DaemonNetwork::generate`]).
    pub fn start_with_config(config: Option<&str>) -> Self {
        Self::start_with_state_dir(None, config)
    }

    /// Like [`Daemon::start_with_config`], with `settings` in the generated `[network]` section.
    pub fn start_with_network(settings: net::NetSettings, config: Option<&str>) -> Self {
        Self::start_full(None, config, &settings)
    }

    /// Like [`Daemon::start_with_config`], with `--state-dir state_dir` when given (e.g. on a small
    /// file system of the test's own) instead of `state` in the daemon's temporary directory. The socket,
    /// log and config file stay in the temporary directory; the Docker config directory is the state
    /// directory's sibling `docker-config`. The caller owns (and removes) the state directory.
    pub fn start_with_state_dir(state_dir: Option<&Path>, config: Option<&str>) -> Self {
        Self::start_full(state_dir, config, &net::NetSettings::default())
    }

    fn start_full(
        state_dir: Option<&Path>,
        config: Option<&str>,
        settings: &net::NetSettings,
    ) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        // The state directory's ancestors must be traversable by the sandboxes' unprivileged root
        // (the rootfs is bind-mounted from inside the sandbox's user namespace), so 0755, not 0700.
        let dir = tempfile::Builder::new()
            .prefix("sandboxd-test-")
            .permissions(fs::Permissions::from_mode(0o755))
            .tempdir()
            .expect("temp dir");
        let text = config.unwrap_or_default();
        let (network, text) = match net::DaemonNetwork::from_config(text) {
            Some(n) => (n, text.to_owned()),
            None => {
                let (n, section) = net::DaemonNetwork::generate(settings);
                (n, format!("{text}\n{section}"))
            }
        };
        let config = {
            let p = dir.path().join("config.toml");
            fs::write(&p, text).expect("writing the daemon's config file");
            Some(p)
        };
        let mut d = Self {
            socket: dir.path().join("s.sock"),
            state_dir: state_dir.map_or_else(|| dir.path().join("state"), Path::to_path_buf),
            cgroup_parent: format!("sandboxd-test-{}-{n}", std::process::id()),
            log: dir.path().join("sandboxd.log"),
            config,
            network,
            child: None,
            killed: false,
            dir: Some(dir),
        };
        d.spawn();
        d
    }

    /// The `sandboxd` command line this daemon runs with.
    pub fn command(&self) -> Command {
        self.command_at(&self.socket)
    }

    /// This daemon's command line with another socket (same state directory and cgroup parent).
    pub fn command_at(&self, socket: &Path) -> Command {
        let mut cmd = Command::new(bin("sandboxd"));
        cmd.arg("--socket")
            .arg(socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .arg("--log")
            .arg("info");
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        // Credentials come only from what a test configures, never from the host's Docker login.
        cmd.env(
            "DOCKER_CONFIG",
            self.state_dir.with_file_name("docker-config"),
        );
        cmd
    }

    /// Leftovers of unfinished image work: ingest files, temporary and doomed layer directories, temporary
    /// files. None may survive a finished pull or import.
    pub fn image_store_leftovers(&self) -> Vec<String> {
        let store = self.state_dir.join("images");
        let mut out = Vec::new();
        for sub in ["ingest", "tmp"] {
            if let Ok(rd) = fs::read_dir(store.join(sub)) {
                out.extend(
                    rd.flatten()
                        .map(|e| format!("{sub}/{}", e.file_name().to_string_lossy())),
                );
            }
        }
        if let Ok(rd) = fs::read_dir(store.join("layers/sha256")) {
            out.extend(
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with('.'))
                    .map(|n| format!("layers/sha256/{n}")),
            );
        }
        out
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        self.killed = false;
        let mut cmd = self.command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("SANDBOXD_LOG")
            // Its own process group: a Ctrl-C of the test run does not reach it before the guard does.
            .process_group(0);
        let mut child = cmd.spawn().expect("spawning sandboxd");
        let stderr = child.stderr.take().expect("stderr pipe");
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log file");
        // The daemon logs "sandboxd listening" once its socket is bound, listening and has its final
        // mode and owner: that line is the readiness event. The thread keeps copying the daemon's stderr
        // into the log so that the pipe never fills; end-of-file means the daemon exited.
        let (tx, rx) = mpsc::channel::<bool>();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut line = Vec::new();
            let mut told = false;
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let _ = log.write_all(&line);
                        if !told && String::from_utf8_lossy(&line).contains("sandboxd listening") {
                            told = true;
                            let _ = tx.send(true);
                        }
                    }
                }
            }
            if !told {
                let _ = tx.send(false);
            }
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(true) => {}
            Ok(false) => {
                let status = child.wait().expect("wait for sandboxd");
                panic!(
                    "sandboxd exited during start-up ({status}):\n{}",
                    self.log_text()
                );
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "sandboxd did not listen within {START_TIMEOUT:?}:\n{}",
                    self.log_text()
                );
            }
        }
        self.child = Some(child);
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon running").id() as i32
    }

    /// A client of this daemon.
    pub fn client(&self) -> BlockingClient {
        BlockingClient::new(&self.socket).expect("client runtime")
    }

    /// Runs `sandboxctl ARGS` against this daemon (socket chosen through `SANDBOXD_SOCKET`).
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin("sandboxctl"))
            .args(args)
            .env(sandbox_proto::SOCKET_ENV, &self.socket)
            .stdin(Stdio::null())
            .output()
            .expect("running sandboxctl")
    }

    /// Like [`Daemon::ctl`], asserting success; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "sandboxctl {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// SIGKILLs the daemon (sandboxes keep running) and reaps it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        self.killed = true;
        kill(child.id() as i32, libc::SIGKILL);
        let status = child.wait().expect("wait for sandboxd");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
    }

    /// Starts the daemon again on the same socket, state directory and cgroup parent.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop_daemon();
        }
        self.spawn();
    }

    /// SIGTERM and wait (graceful shutdown; sandboxes keep running).
    pub fn stop_daemon(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(child.id() as i32, libc::SIGTERM);
            let _ = child.wait();
        }
    }

    /// Imports the shared busybox layout as `busybox:latest`.
    pub fn import_busybox(&self) -> ImageInfo {
        self.client()
            .import_image(&ImportImageRequest {
                path: busybox_image().display().to_string(),
                reference: Some(BUSYBOX.to_owned()),
            })
            .expect("importing busybox")
    }

    /// A sandbox's state directory.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("sandboxes").join(id)
    }

    /// Sandbox directories in `<state>/sandboxes`. Hidden entries (`.removed-<id>`: a removed sandbox's
    /// directory being deleted in the background) are left out; [`Daemon::all_sandbox_entries`] has them.
    pub fn sandbox_dirs(&self) -> Vec<String> {
        let mut v = self.all_sandbox_entries();
        v.retain(|n| !n.starts_with('.'));
        v
    }

    /// Every entry of `<state>/sandboxes`, hidden ones included.
    pub fn all_sandbox_entries(&self) -> Vec<String> {
        match fs::read_dir(self.state_dir.join("sandboxes")) {
            Ok(rd) => {
                let mut v: Vec<String> = rd
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                v.sort();
                v
            }
            Err(_) => Vec::new(),
        }
    }

    /// The cgroup parent in every hierarchy, keyed by mount point.
    pub fn cgroup_parents(&self) -> BTreeMap<PathBuf, PathBuf> {
        cgroup_parent_dirs(&self.cgroup_parent)
    }

    /// The parent directory in the hierarchy mounted at `/sys/fs/cgroup/<controller>` (v1).
    pub fn cgroup_parent_of(&self, controller: &str) -> PathBuf {
        let mp = PathBuf::from("/sys/fs/cgroup").join(controller);
        self.cgroup_parents()
            .get(&mp)
            .cloned()
            .unwrap_or_else(|| panic!("no cgroup hierarchy mounted at {}", mp.display()))
    }

    /// Sub-directories (sandbox cgroups) under the parent in every hierarchy.
    pub fn sandbox_cgroups(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for dir in self.cgroup_parents().values() {
            if let Ok(rd) = fs::read_dir(dir) {
                v.extend(
                    rd.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
        v.sort();
        v
    }

    /// Asserts that nothing but the given sandbox ids has a state directory or a cgroup.
    pub fn assert_only_sandboxes(&self, ids: &[&str]) {
        let mut want: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
        want.sort();
        assert_eq!(self.sandbox_dirs(), want, "sandbox state directories");
        // Other cgroups may only be the warm pool's. Scan, then read the pool's ids, then scan again: a
        // cgroup seen in the first scan was listed in pool.json before it was made, and leaves pool.json only
        // after it is removed, so one absent from pool.json and still present in the second scan is a leak.
        let name_of = |cg: &PathBuf| {
            cg.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        };
        let first: Vec<String> = self.sandbox_cgroups().iter().map(name_of).collect();
        let pool = self.pool_cgroup_ids();
        let second: Vec<String> = self.sandbox_cgroups().iter().map(name_of).collect();
        let leaked: Vec<&String> = first
            .iter()
            .filter(|n| !want.contains(n) && !pool.contains(n) && second.contains(n))
            .collect();
        assert!(
            leaked.is_empty(),
            "cgroups of neither {want:?} nor the warm pool: {leaked:?} (pool: {pool:?})"
        );
    }

    /// Asserts that nothing of sandbox `id` is left: no state directory, no cgroup, no supervisor.
    pub fn assert_gone(&self, id: &str) {
        assert!(
            !self.sandbox_dirs().iter().any(|d| d == id),
            "state directory of {id} left"
        );
        for cg in self.sandbox_cgroups() {
            assert_ne!(
                cg.file_name().unwrap_or_default().to_string_lossy(),
                id,
                "cgroup {} left",
                cg.display()
            );
        }
        let var = format!("SANDBOXD_SHIM_STATE_DIR={}", self.sandbox_dir(id).display());
        for (pid, env) in shim_environments(&self.state_dir, &self.cgroup_parent) {
            assert!(
                !env.contains(&var),
                "supervisor {pid} of {id} still running"
            );
        }
    }

    /// Supervisors of this daemon (for a sandbox, or pooled).
    pub fn shims(&self) -> Vec<i32> {
        shim_processes(&self.state_dir, &self.cgroup_parent)
    }

    /// Ids of the warm pool's cgroups.
    /// Ids the daemon has reserved for pooled supervisors (`state_dir/pool.json`). The daemon writes an id
    /// there before it creates the cgroup and removes it only after the cgroup is gone.
    pub fn pool_cgroup_ids(&self) -> Vec<String> {
        fs::read(self.state_dir.join("pool.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn cleanup(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.child.is_some() {
            let c = self.client();
            match c.list(&[], None) {
                Ok(list) => {
                    for s in list.sandboxes {
                        if let Err(e) = c.delete(&s.id, true) {
                            // Auto-removed meanwhile is fine.
                            if e.api_code() != Some(ErrorCode::SandboxNotFound) {
                                problems.push(format!("force-deleting sandbox {}: {e}", s.id));
                            }
                        }
                    }
                }
                Err(e) => problems.push(format!("listing sandboxes at cleanup: {e}")),
            }
            self.stop_daemon();
        }
        let leftovers = self.image_store_leftovers();
        if !leftovers.is_empty() {
            problems.push(format!(
                "unfinished image store content left: {leftovers:?}"
            ));
        }
        // The daemon has exited: background deletions must have finished too.
        let left = self.all_sandbox_entries();
        if !left.is_empty() {
            problems.push(format!("sandbox state directories left: {left:?}"));
        }
        let root = self
            .state_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mounts = mounts_under(&root);
        if !mounts.is_empty() {
            problems.push(format!("mounts left under {}: {mounts:#?}", root.display()));
            for m in mounts.iter().rev() {
                if let Some(mp) = m.split(' ').nth(4) {
                    if let Ok(c) = std::ffi::CString::new(mp) {
                        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
                        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                    }
                }
            }
        }
        // Pooled supervisors of a daemon that was SIGKILLed end by themselves when their stdin closes:
        // give every remaining supervisor a bounded wait (10 s) on its pidfd before calling it a leak.
        let shims: Vec<i32> = shim_processes(&self.state_dir, &self.cgroup_parent)
            .into_iter()
            .filter(|&pid| !wait_pid_exit_within(pid, 10_000))
            .collect();
        if !shims.is_empty() {
            problems.push(format!("sandbox supervisors still running: pids {shims:?}"));
            for pid in shims {
                // SAFETY: kill takes plain integers; these are supervisors of this test's own daemon.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                wait_pid_exit(pid);
            }
        }
        for (mp, dir) in self.cgroup_parents() {
            if !dir.exists() {
                continue;
            }
            let subs: Vec<PathBuf> = fs::read_dir(&dir)
                .map(|rd| {
                    rd.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default();
            if !subs.is_empty() {
                problems.push(format!("cgroups left in {}: {subs:?}", mp.display()));
                for s in &subs {
                    kill_cgroup_tree(s);
                    remove_cgroup_tree(s);
                }
            }
            if let Err(e) = fs::remove_dir(&dir) {
                problems.push(format!(
                    "removing the test cgroup parent {}: {e}",
                    dir.display()
                ));
            }
        }
        // The network: the daemon removes its bridge and table on a clean shutdown with no sandbox left;
        // the sandboxes' veths go with their network namespaces (the kernel removes them asynchronously,
        // waited for on link events). After a SIGKILL they stay: removed here without complaint.
        if self.killed {
            self.network.remove_leftovers();
        } else {
            problems.extend(self.network.leftovers(true));
        }
        problems
    }
}

/// SIGKILLs every process in a leaked sandbox cgroup (all of them were started by this test's daemon)
/// and waits for each to exit.
fn kill_cgroup_tree(dir: &Path) {
    let mut pids = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(procs) = fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(rd) = fs::read_dir(&d) {
            stack.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    for &pid in &pids {
        // SAFETY: kill takes plain integers; these processes belong to this test's sandboxes.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for pid in pids {
        wait_pid_exit(pid);
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let problems = self.cleanup();
        let log = self.log_text();
        if std::thread::panicking() {
            eprintln!("---- sandboxd log ----\n{log}");
            for p in &problems {
                eprintln!("leak check: {p}");
            }
            // Keep the state for inspection only if asked to.
            if std::env::var_os("SANDBOXD_TEST_KEEP").is_some() {
                if let Some(d) = self.dir.take() {
                    eprintln!("keeping {}", d.keep().display());
                }
            }
            return;
        }
        if !problems.is_empty() {
            eprintln!("---- sandboxd log ----\n{log}");
            panic!("the test leaked:\n- {}", problems.join("\n- "));
        }
    }
}

// ------------------------------------------------------------------------------------------ helpers

/// A create request for busybox with `command` (None: idle).
pub fn busybox(command: Option<&[&str]>) -> CreateSandboxRequest {
    CreateSandboxRequest {
        image: BUSYBOX.to_owned(),
        command: command.map(|c| c.iter().map(|s| (*s).to_owned()).collect()),
        ..CreateSandboxRequest::default()
    }
}

/// Creates a sandbox, panicking on error.
pub fn create(c: &BlockingClient, req: &CreateSandboxRequest) -> SandboxInfo {
    c.create(req)
        .unwrap_or_else(|e| panic!("creating {req:?}: {e}"))
}

/// Creates an idle busybox sandbox named `name`.
pub fn create_idle(c: &BlockingClient, name: &str) -> SandboxInfo {
    let mut req = busybox(None);
    req.name = Some(name.to_owned());
    let info = create(c, &req);
    assert_eq!(info.status, SandboxStatus::Running);
    info
}

/// Waits (no timeout) until the sandbox is in a terminal state.
pub fn wait_exited(c: &BlockingClient, id: &str) -> SandboxInfo {
    c.wait(
        id,
        WaitRequest {
            condition: WaitCondition::Exited,
            timeout_seconds: None,
        },
    )
    .unwrap_or_else(|e| panic!("waiting for {id}: {e}"))
}

/// An exec request running `argv`.
pub fn exec_req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        command: argv.iter().map(|s| (*s).to_owned()).collect(),
        ..ExecRequest::default()
    }
}

/// Runs `argv` in the sandbox; panics on an API error.
pub fn exec(c: &BlockingClient, id: &str, argv: &[&str]) -> ExecResult {
    c.exec(id, &exec_req(argv))
        .unwrap_or_else(|e| panic!("exec {argv:?} in {id}: {e}"))
}

/// `details.field` of an INVALID_ARGUMENT error ("" when there is none).
pub fn field_of(e: &sandbox_proto::ApiError) -> String {
    e.details
        .as_ref()
        .and_then(|d| d["field"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// Runs `sh -c script` in the sandbox and asserts exit 0; returns stdout.
pub fn sh(c: &BlockingClient, id: &str, script: &str) -> String {
    let r = exec(c, id, &["sh", "-c", script]);
    assert_eq!(
        r.exit_code, 0,
        "`{script}` exited {}: stdout {:?} stderr {:?}",
        r.exit_code, r.stdout, r.stderr
    );
    r.stdout
}

/// Asserts that `r` failed with `code` and HTTP `status`; returns the error.
#[track_caller]
pub fn expect_api_error<T: std::fmt::Debug>(
    r: Result<T, ClientError>,
    code: ErrorCode,
    status: u16,
) -> sandbox_proto::ApiError {
    match r {
        Ok(v) => panic!("expected {code} ({status}), got success: {v:?}"),
        Err(e) => {
            assert_eq!(e.api_code(), Some(code), "unexpected error: {e:?}");
            assert_eq!(e.http_status(), Some(status), "unexpected status: {e:?}");
            e.api_error().cloned().expect("api error")
        }
    }
}

/// Parses JSON, panicking with the text on failure.
pub fn json(text: &[u8]) -> serde_json::Value {
    serde_json::from_slice(text)
        .unwrap_or_else(|e| panic!("invalid JSON ({e}): {}", String::from_utf8_lossy(text)))
}
