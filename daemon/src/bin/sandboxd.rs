//! `sandboxd`: the sandbox daemon.
//!
//! The same binary is also the per-sandbox supervisor (`sandboxd shim <state-dir>`) and the exec helper
//! (`sandboxd exec-helper`). Those two are dispatched before any async runtime or thread exists, so they
//! run single-threaded, as namespace work requires.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use sandbox_daemon::config::Config;

/// The sandboxd daemon: runs sandboxes and serves the API on a Unix socket.
#[derive(Debug, Parser)]
#[command(name = "sandboxd", version)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, env = "SANDBOXD_CONFIG")]
    config: Option<PathBuf>,
    /// API socket path (overrides the config file).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// State directory (overrides the config file).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Parent cgroup for sandboxes (overrides the config file).
    #[arg(long)]
    cgroup_parent: Option<String>,
    /// Group allowed to use the socket (overrides the config file).
    #[arg(long)]
    socket_group: Option<String>,
    /// Log filter, e.g. `info` or `sandbox_daemon=debug`.
    #[arg(long, env = "SANDBOXD_LOG", default_value = "info")]
    log: String,
}

fn main() {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match argv.get(1).and_then(|a| a.to_str()) {
        Some("shim") => {
            // The state directory comes through the environment, not argv: the sandbox's pid 1 is this
            // process's clone, and its command line is readable inside the sandbox.
            let dir = std::env::var_os(sandbox_runtime::shim::STATE_DIR_ENV).map(PathBuf::from);
            let cgroup = std::env::var(sandbox_runtime::shim::POOL_CGROUP_ENV)
                .ok()
                .and_then(|j| serde_json::from_str(&j).ok());
            std::process::exit(sandbox_runtime::shim::main(dir, cgroup));
        }
        Some("exec-helper") => std::process::exit(sandbox_runtime::exec::main()),
        _ => {}
    }
    if let Err(e) = run(Args::parse()) {
        eprintln!("sandboxd: {e:#}");
        std::process::exit(1);
    }
}

fn group_gid(name: &str) -> anyhow::Result<u32> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let groups = std::fs::read_to_string("/etc/group").context("reading /etc/group")?;
    groups
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 3 && f[0] == name)
                .then(|| f[2].parse().ok())
                .flatten()
        })
        .with_context(|| format!("no group {name:?} in /etc/group"))
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(s) = args.socket {
        cfg.socket = s;
    }
    if let Some(s) = args.state_dir {
        cfg.state_dir = s;
    }
    if let Some(c) = args.cgroup_parent {
        cfg.cgroup_parent = c;
    }
    if let Some(g) = args.socket_group {
        cfg.socket_group = Some(g);
    }
    cfg.validate()?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if !nix::unistd::geteuid().is_root() {
        bail!("sandboxd must run as root (it creates namespaces, cgroups and mounts)");
    }
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let lock_path = cfg.state_dir.join("sandboxd.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .with_context(|| {
            format!(
                "another sandboxd uses {} ({})",
                cfg.state_dir.display(),
                lock_path.display()
            )
        })?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(cfg))
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let gid = cfg.socket_group.as_deref().map(group_gid).transpose()?;
    let socket = cfg.socket.clone();
    let manager = sandbox_daemon::manager::Manager::start(cfg).await?;
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            bail!("{} is in use by a running daemon", socket.display());
        }
        std::fs::remove_file(&socket)
            .with_context(|| format!("removing stale {}", socket.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660))?;
    nix::unistd::chown(
        &socket,
        Some(nix::unistd::Uid::from_raw(0)),
        Some(nix::unistd::Gid::from_raw(gid.unwrap_or(0))),
    )?;
    tracing::info!(socket = %socket.display(), "sandboxd listening");
    let app = sandbox_daemon::api::router(Arc::clone(&manager));
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let int = tokio::signal::ctrl_c();
        tokio::select! {
            _ = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {},
            _ = int => {},
        }
        tracing::info!("shutting down; running sandboxes keep running");
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    let _ = std::fs::remove_file(&socket);
    manager.drain_pool().await;
    manager.shutdown_network().await;
    let m = Arc::clone(&manager);
    let _ = tokio::task::spawn_blocking(move || m.finish_background_work()).await;
    Ok(())
}
