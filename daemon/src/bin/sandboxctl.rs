//! `sandboxctl`: the command-line client of sandboxd.
//!
//! A thin layer over [`BlockingClient`]: parse flags, make one or a few API calls, print tables or the
//! API's JSON. Startup is kept cheap (no logging setup, one current-thread runtime) because
//! `sandboxctl run --rm IMAGE -- CMD` is on benchmarked paths.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use sandbox_proto::client::{BlockingClient, ClientError, LogStreamOptions};
use sandbox_proto::{
    CreateSandboxRequest, ErrorCode, ExecRequest, ImageInfo, ImportImageRequest, LayerStatus,
    OutputEncoding, PullEvent, PullImageRequest, PullPolicy, PullResult, Resources, SandboxInfo,
    SandboxStatus, WaitRequest, DEFAULT_SOCKET, SOCKET_ENV,
};
use serde::Serialize;

#[path = "sandboxctl/cp.rs"]
mod cp;
#[path = "sandboxctl/net.rs"]
mod net;

/// Exit status for failures of `sandboxctl run` before the sandbox ran (as `docker run`).
const EXIT_RUN_FAILED: i32 = 125;
/// Exit status of `exec` when the command timed out (as `timeout(1)`).
const EXIT_TIMEOUT: i32 = 124;
/// Exit status when the user interrupted a foreground wait a second time.
const EXIT_INTERRUPTED: i32 = 130;

#[derive(Debug, Parser)]
#[command(
    name = "sandboxctl",
    version,
    about = "Command-line client of sandboxd",
    max_term_width = 110
)]
struct Cli {
    /// Path of the daemon's Unix socket.
    #[arg(long, global = true, value_name = "PATH", env = SOCKET_ENV, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print the API's JSON instead of tables and messages.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create and start a sandbox; by default wait for it, print its output and exit with its status.
    Run(Box<RunArgs>),
    /// Run a command in a running sandbox and exit with its exit code.
    Exec(ExecArgs),
    /// List sandboxes.
    #[command(visible_alias = "ps")]
    Ls(LsArgs),
    /// Print sandboxes as JSON.
    Inspect {
        /// Sandbox ids or names.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
    /// Stop sandboxes (SIGTERM, then SIGKILL after the grace period).
    Stop {
        /// Seconds between SIGTERM and SIGKILL (daemon default 10).
        #[arg(short = 't', long = "time", value_name = "SECS")]
        time: Option<f64>,
        /// Sandbox ids or names.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
    /// Remove sandboxes.
    Rm {
        /// Kill running sandboxes first.
        #[arg(short, long)]
        force: bool,
        /// Sandbox ids or names.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
    /// Wait for a sandbox to exit; print its exit status and exit with it.
    Wait {
        /// Give up after this many seconds.
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
        /// Sandbox id or name.
        name: String,
    },
    /// Copy a file between this host and a sandbox: `cp FILE NAME:/path`, `cp NAME:/path FILE`
    /// (`-` for stdin or stdout). Files only.
    Cp(cp::CpArgs),
    /// Print a sandbox's main-process output (stdout to stdout, stderr to stderr).
    Logs(LogsArgs),
    /// Manage images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// List images (same as `image ls`).
    Images,
    /// Remove images (same as `image rm`).
    Rmi(RmiArgs),
    /// Pull an image from its registry (same as `image pull`).
    Pull(PullArgs),
    /// Daemon-wide information.
    #[command(subcommand)]
    System(SystemCommand),
    /// Print client and daemon versions.
    Version,
}

#[derive(Debug, Subcommand)]
enum SystemCommand {
    /// Disk used by images: per image (shared and unique) and in all, and what a prune would free.
    Df,
}

#[derive(Debug, Args)]
struct PullArgs {
    /// Platform to choose from a multi-platform image, os/arch[/variant] (default: the host's).
    #[arg(long, value_name = "PLATFORM")]
    platform: Option<String>,
    /// Print only the image digest.
    #[arg(short, long)]
    quiet: bool,
    /// Image reference, e.g. python:3.11 (docker.io/library/python:3.11).
    reference: String,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Import an OCI layout (directory or tarball) or a `docker save` tarball.
    Import {
        /// Path of the image on this host (made absolute; the daemon reads it).
        path: PathBuf,
        /// Name to store it under (default: the name recorded in the archive).
        reference: Option<String>,
    },
    /// List images.
    #[command(visible_alias = "list")]
    Ls,
    /// Remove images.
    #[command(visible_alias = "remove")]
    Rm(RmiArgs),
    /// Pull an image from its registry.
    Pull(PullArgs),
    /// Remove unused content: images no reference names, and blobs and layers no image needs.
    Prune {
        /// Also remove every image no sandbox uses.
        #[arg(short, long)]
        all: bool,
    },
}

#[derive(Debug, Args)]
struct RmiArgs {
    /// Remove even if sandboxes use the image.
    #[arg(short, long)]
    force: bool,
    /// Image references or digests.
    #[arg(required = true, value_name = "REF")]
    references: Vec<String>,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Remove the sandbox once it has exited and its output has been printed.
    #[arg(long)]
    rm: bool,
    /// Print the sandbox id and return at once.
    #[arg(short = 'd', long)]
    detach: bool,
    /// Name (and hostname) of the sandbox.
    #[arg(long)]
    name: Option<String>,
    /// Memory limit, e.g. 256Mi, 1G.
    #[arg(short = 'm', long, value_name = "QUANTITY")]
    memory: Option<String>,
    /// CPU limit in cores, e.g. 0.5, 2, 500m.
    #[arg(long, value_name = "CPUS")]
    cpus: Option<String>,
    /// Maximum number of processes.
    #[arg(long, visible_alias = "pids-limit", value_name = "N")]
    pids: Option<i64>,
    /// Environment variable K=V (K alone takes the value from this environment).
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Working directory inside the sandbox.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// user[:group] inside the sandbox.
    #[arg(short = 'u', long)]
    user: Option<String>,
    /// Tag for listing and filtering (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// Annotation K=V, free-form metadata returned as given (repeatable).
    #[arg(long = "annotation", value_name = "K=V")]
    annotations: Vec<String>,
    /// Stop the sandbox (TERMINATED) this many seconds after its creation, also across daemon restarts.
    #[arg(long = "max-lifetime", value_name = "SECONDS")]
    max_lifetime: Option<f64>,
    /// Run the image's Entrypoint + Cmd when no command is given.
    #[arg(long, conflicts_with = "command")]
    default_cmd: bool,
    /// Place a local file read-only in the sandbox at /path (repeatable).
    #[arg(long = "mount-file", value_name = "HOSTFILE:/path")]
    mount_files: Vec<String>,
    /// A size-limited scratch volume (tmpfs) at /path (repeatable), e.g. scratch:/scratch:64Mi.
    #[arg(long = "volume", value_name = "NAME:/path:SIZE")]
    volumes: Vec<String>,
    /// When to pull the image: missing (default), always, never.
    #[arg(long, value_name = "POLICY", default_value = "missing", value_parser = parse_pull_policy)]
    pull: PullPolicy,
    /// Publish a port of the sandbox on the host (repeatable): [HOST_IP:][HOST_PORT:]PORT[/udp]; the
    /// host address defaults to 127.0.0.1, a missing host port is one the kernel picks.
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "[IP:][HOSTPORT:]PORT[/PROTO]"
    )]
    publish: Vec<String>,
    /// `bridge` (default: egress through NAT) or `none` (no egress at all).
    #[arg(long, value_name = "MODE")]
    network: Option<String>,
    /// Allow egress only to these destinations (repeatable): CIDR[:PORT[,PORT]][/tcp|/udp].
    #[arg(long = "egress-allow", value_name = "CIDR[:PORTS][/PROTO]")]
    egress_allow: Vec<String>,
    /// Accept new connections into the sandbox from the host's networks (default: only published ports).
    #[arg(long)]
    allow_ingress: bool,
    /// Image reference, e.g. busybox, python:3.12.
    image: String,
    /// The main process and its arguments (none: the sandbox idles until stopped).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct ExecArgs {
    /// Environment variable K=V (K alone takes the value from this environment).
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Working directory inside the sandbox.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// user[:group] inside the sandbox.
    #[arg(short = 'u', long)]
    user: Option<String>,
    /// Kill the command after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Pass this terminal's stdin to the command.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Run the command on a pseudo-terminal (with -i: an interactive shell).
    #[arg(short = 't', long)]
    tty: bool,
    /// Sandbox id or name.
    name: String,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct LogsArgs {
    /// Keep printing new output until the sandbox has ended.
    #[arg(short, long)]
    follow: bool,
    /// Only the last N lines (over both streams).
    #[arg(long, value_name = "N")]
    tail: Option<u64>,
    /// Prefix every line with the time it was logged (RFC 3339, nanoseconds).
    #[arg(short, long)]
    timestamps: bool,
    /// Sandbox id or name.
    name: String,
}

#[derive(Debug, Args)]
struct LsArgs {
    /// Show all sandboxes (the default; accepted for docker muscle memory).
    #[arg(short, long)]
    all: bool,
    /// Only sandboxes in these states (repeatable or comma-separated), e.g. RUNNING.
    #[arg(long, value_name = "STATUS", value_delimiter = ',')]
    status: Vec<String>,
    /// Only sandboxes with this tag (repeatable: every one of them).
    #[arg(long, value_name = "TAG")]
    tag: Vec<String>,
}

/// A failed command: what to print and the exit status.
#[derive(Debug)]
struct Failure {
    status: i32,
    error: anyhow::Error,
}

impl Failure {
    fn new(status: i32, error: impl Into<anyhow::Error>) -> Self {
        Self {
            status,
            error: error.into(),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Self::new(1, e)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::new(1, e)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Self::new(1, e)
    }
}

type CmdResult = Result<i32, Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let status = match dispatch(cli) {
        Ok(s) => s,
        Err(f) => {
            report(&f.error);
            f.status
        }
    };
    flush_stdio();
    ExitCode::from(u8::try_from(status & 0xff).unwrap_or(1))
}

/// Prints `sandboxctl: <message>` (API errors read `<message> (<CODE>)`).
fn report(e: &anyhow::Error) {
    // `ClientError`'s message already includes what its source says; other errors get their chain.
    if e.downcast_ref::<ClientError>().is_some() {
        eprintln!("sandboxctl: {e}");
    } else {
        eprintln!("sandboxctl: {e:#}");
    }
}

fn flush_stdio() {
    // A closed pipe (e.g. `| head`) is not an error worth reporting.
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
}

fn dispatch(cli: Cli) -> CmdResult {
    let client = BlockingClient::new(&cli.socket)?;
    let json = cli.json;
    match cli.command {
        Command::Run(a) => cmd_run(&client, json, *a),
        Command::Exec(a) => cmd_exec(&client, json, a),
        Command::Ls(a) => cmd_ls(&client, json, a),
        Command::Inspect { names } => cmd_inspect(&client, &names),
        Command::Stop { time, names } => for_each(&names, json, |n| client.stop(n, time)),
        Command::Rm { force, names } => {
            let mut failed = false;
            for n in &names {
                match client.delete(n, force) {
                    Ok(()) if json => print_json(&serde_json::json!({ "removed": n }))?,
                    Ok(()) => println!("{n}"),
                    Err(e) => {
                        failed = true;
                        report(&e.into());
                    }
                }
            }
            Ok(i32::from(failed))
        }
        Command::Wait { timeout, name } => {
            let info = client.wait(
                &name,
                WaitRequest {
                    timeout_seconds: timeout,
                    ..WaitRequest::default()
                },
            )?;
            let status = exit_status(&info);
            if json {
                print_json(&info)?;
            } else {
                println!("{status}");
            }
            Ok(status)
        }
        Command::Logs(a) => cmd_logs(&client, json, a),
        Command::Image(ImageCommand::Import { path, reference }) => {
            cmd_import(&client, json, path, reference)
        }
        Command::Image(ImageCommand::Ls) | Command::Images => cmd_images(&client, json),
        Command::Image(ImageCommand::Rm(a)) | Command::Rmi(a) => cmd_rmi(&client, json, a),
        Command::Image(ImageCommand::Pull(a)) | Command::Pull(a) => cmd_pull(&client, json, a),
        Command::Image(ImageCommand::Prune { all }) => cmd_prune(&client, json, all),
        Command::System(SystemCommand::Df) => cmd_df(&client, json),
        Command::Version => cmd_version(&client, json),
        Command::Cp(a) => cp::cmd_cp(&client, json, a),
    }
}

/// Runs `op` on each name; prints the name (or the answer's JSON); reports failures and goes on.
fn for_each(
    names: &[String],
    json: bool,
    op: impl Fn(&str) -> Result<SandboxInfo, ClientError>,
) -> CmdResult {
    let mut failed = false;
    for n in names {
        match op(n) {
            Ok(info) if json => print_json(&info)?,
            Ok(_) => println!("{n}"),
            Err(e) => {
                failed = true;
                report(&e.into());
            }
        }
    }
    Ok(i32::from(failed))
}

fn parse_env(vars: &[String]) -> Result<BTreeMap<String, String>, Failure> {
    let mut env = BTreeMap::new();
    for v in vars {
        let (k, val) = match v.split_once('=') {
            Some((k, val)) => (k, val.to_owned()),
            None => match std::env::var(v) {
                Ok(val) => (v.as_str(), val),
                // Like docker: `-e K` with K unset locally passes nothing.
                Err(_) => continue,
            },
        };
        if k.is_empty() {
            return Err(Failure::new(
                1,
                anyhow::anyhow!("invalid environment variable {v:?}: expected K=V"),
            ));
        }
        env.insert(k.to_owned(), val);
    }
    Ok(env)
}

fn parse_annotations(pairs: &[String]) -> Result<BTreeMap<String, String>, Failure> {
    let mut out = BTreeMap::new();
    for p in pairs {
        let Some((k, v)) = p.split_once('=') else {
            return Err(Failure::new(
                1,
                anyhow::anyhow!("invalid annotation {p:?}: expected K=V"),
            ));
        };
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

/// The shell-style status of a finished sandbox (125 when it failed without an exit status).
fn exit_status(info: &SandboxInfo) -> i32 {
    match (&info.exit, info.status) {
        (Some(e), _) => e.shell_status(),
        (None, SandboxStatus::Completed) => 0,
        (None, _) => EXIT_RUN_FAILED,
    }
}

fn cmd_run(client: &BlockingClient, json: bool, a: RunArgs) -> CmdResult {
    let env = parse_env(&a.env).map_err(|f| Failure::new(EXIT_RUN_FAILED, f.error))?;
    let mounted_files = a
        .mount_files
        .iter()
        .map(|m| cp::mounted_file(m))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|f| Failure::new(EXIT_RUN_FAILED, f.error))?;
    let volumes = a
        .volumes
        .iter()
        .map(|v| cp::volume(v))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|f| Failure::new(EXIT_RUN_FAILED, f.error))?;
    let annotations =
        parse_annotations(&a.annotations).map_err(|f| Failure::new(EXIT_RUN_FAILED, f.error))?;
    let services = a
        .publish
        .iter()
        .map(|p| net::publish(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|f| Failure::new(EXIT_RUN_FAILED, f.error))?;
    let network = net::options(a.network.as_deref(), &a.egress_allow, a.allow_ingress)
        .map_err(|f| Failure::new(EXIT_RUN_FAILED, f.error))?;
    let req = CreateSandboxRequest {
        network,
        services,
        annotations,
        max_lifetime_seconds: a.max_lifetime,
        mounted_files,
        volumes,
        image: a.image,
        name: a.name,
        command: (!a.command.is_empty()).then_some(a.command),
        use_image_command: a.default_cmd,
        env,
        cwd: a.workdir,
        user: a.user,
        resources: Resources {
            memory: a.memory,
            cpu: a.cpus,
            pids: a.pids,
            ..Resources::default()
        },
        tags: a.tags,
        // Foreground --rm deletes explicitly after printing the output; detached --rm is the daemon's job.
        auto_remove: a.rm && a.detach,
        // The CLI pulls itself (with progress on stderr) when the daemon says the image is missing.
        pull: PullPolicy::Never,
    };
    if a.pull == PullPolicy::Always {
        pull_for_run(client, json, &req.image)?;
    }
    let info = match client.create(&req) {
        Err(e)
            if a.pull == PullPolicy::Missing && e.api_code() == Some(ErrorCode::ImageNotFound) =>
        {
            if !json {
                eprintln!("Unable to find image '{}' locally", req.image);
            }
            pull_for_run(client, json, &req.image)?;
            client.create(&req)
        }
        other => other,
    }
    .map_err(|e| Failure::new(EXIT_RUN_FAILED, e))?;
    if a.detach {
        if json {
            print_json(&info)?;
        } else {
            println!("{}", info.id);
        }
        return Ok(0);
    }
    let id = info.id;
    let done = match wait_foreground(client, &id) {
        Ok(Some(done)) => done,
        Ok(None) => {
            eprintln!("sandboxctl: detached from sandbox {id}; it is still stopping");
            return Ok(EXIT_INTERRUPTED);
        }
        Err(e) => return Err(e.into()),
    };
    let logs = client.logs(&id)?;
    write_output(&logs.stdout_bytes(), &logs.stderr_bytes());
    if a.rm {
        match client.delete(&id, true) {
            Ok(()) => {}
            // Already gone (e.g. removed by someone else): nothing left to do.
            Err(e) if e.api_code() == Some(ErrorCode::SandboxNotFound) => {}
            Err(e) => report(&e.into()),
        }
    }
    Ok(exit_status(&done))
}

/// Waits for the sandbox to exit. The first Ctrl-C stops it (grace 10 s) and keeps waiting for the
/// stop to finish; a second Ctrl-C gives up waiting (`Ok(None)`).
fn wait_foreground(client: &BlockingClient, id: &str) -> Result<Option<SandboxInfo>, ClientError> {
    let c = client.client();
    client.block_on(async {
        let wait = c.wait(id, WaitRequest::default());
        tokio::pin!(wait);
        tokio::select! {
            r = &mut wait => return r.map(Some),
            _ = tokio::signal::ctrl_c() => {}
        }
        eprintln!("sandboxctl: stopping sandbox {id} (Ctrl-C again to stop waiting)");
        let stop = async {
            match c.stop(id, Some(10.0)).await {
                // It ended on its own meanwhile.
                Err(e) if e.api_code() == Some(ErrorCode::SandboxNotRunning) => c.get(id).await,
                other => other,
            }
        };
        tokio::select! {
            r = stop => r.map(Some),
            _ = tokio::signal::ctrl_c() => Ok(None),
        }
    })
}

/// Writes raw output bytes: stdout to stdout, then stderr to stderr.
fn write_output(stdout: &[u8], stderr: &[u8]) {
    // Write errors (a closed pipe) are ignored: the exit status matters more than the output.
    if !stdout.is_empty() {
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(stdout);
        let _ = o.flush();
    }
    if !stderr.is_empty() {
        let mut e = std::io::stderr().lock();
        let _ = e.write_all(stderr);
        let _ = e.flush();
    }
}

/// `logs`: the collected answer for `--json` alone, else the entries as they come (JSON lines with
/// `--json`).
fn cmd_logs(client: &BlockingClient, json: bool, a: LogsArgs) -> CmdResult {
    if json && !a.follow && a.tail.is_none() && !a.timestamps {
        print_json(&client.logs(&a.name)?)?;
        return Ok(0);
    }
    let opts = LogStreamOptions {
        follow: a.follow,
        tail_lines: a.tail,
        timestamps: a.timestamps,
        ..LogStreamOptions::default()
    };
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    let mut last_err = false;
    for entry in client.logs_stream(&a.name, opts)? {
        let entry = entry?;
        let written = if json {
            let line = serde_json::to_string(&entry).map_err(anyhow::Error::from)?;
            writeln!(out, "{line}")
        } else {
            let is_err = entry.is_stderr();
            // Flush what the other stream has buffered, so that both keep their relative order.
            let switched = if is_err != last_err {
                if last_err {
                    err.flush()
                } else {
                    out.flush()
                }
            } else {
                Ok(())
            };
            last_err = is_err;
            let w: &mut dyn Write = if is_err { &mut err } else { &mut out };
            switched
                .and_then(|()| match &entry.timestamp {
                    Some(ts) => write!(w, "{ts} "),
                    None => Ok(()),
                })
                .and_then(|()| w.write_all(&entry.bytes()))
        };
        let flushed = if a.follow {
            out.flush().and_then(|()| err.flush())
        } else {
            Ok(())
        };
        if written.and(flushed).is_err() {
            // The reader went away (e.g. `| head`).
            return Ok(0);
        }
    }
    let _ = out.flush();
    let _ = err.flush();
    Ok(0)
}

fn cmd_exec(client: &BlockingClient, json: bool, a: ExecArgs) -> CmdResult {
    if !json {
        return exec_streaming(client, a);
    }
    let req = ExecRequest {
        command: a.command,
        cwd: a.workdir,
        env: parse_env(&a.env)?,
        user: a.user,
        timeout_seconds: a.timeout,
        ..ExecRequest::default()
    };
    match client.exec(&a.name, &req) {
        Ok(r) => {
            if json {
                print_json(&r)?;
            } else {
                write_output(&r.stdout_bytes(), &r.stderr_bytes());
                if r.stdout_truncated || r.stderr_truncated {
                    eprintln!("sandboxctl: output truncated by the daemon's limit");
                }
            }
            Ok(r.exit_code)
        }
        Err(e) if e.api_code() == Some(ErrorCode::ExecTimeout) => {
            if json {
                let body = e.api_error().map(|err| serde_json::json!({ "error": err }));
                print_json(&body)?;
            } else if let Some(d) = e.api_error().and_then(|err| err.details.as_ref()) {
                let enc = match d.get("encoding").and_then(|v| v.as_str()) {
                    Some("base64") => OutputEncoding::Base64,
                    _ => OutputEncoding::Utf8,
                };
                let field = |k: &str| {
                    d.get(k)
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_owned()
                };
                let partial = sandbox_proto::LogsResult {
                    stdout: field("stdout"),
                    stderr: field("stderr"),
                    encoding: enc,
                };
                write_output(&partial.stdout_bytes(), &partial.stderr_bytes());
            }
            Err(Failure::new(EXIT_TIMEOUT, e))
        }
        Err(e) => Err(e.into()),
    }
}

/// Puts a terminal in raw mode and restores it when dropped.
struct RawMode {
    saved: Option<nix::sys::termios::Termios>,
}

impl RawMode {
    fn enter(on: bool) -> Self {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !on {
            return Self { saved: None };
        }
        let Ok(saved) = tcgetattr(&stdin) else {
            return Self { saved: None };
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &raw);
        Self { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                t,
            );
        }
    }
}

/// `exec` without `--json`: output as it comes, stdin with `-i`, a terminal with `-t`.
fn exec_streaming(client: &BlockingClient, a: ExecArgs) -> CmdResult {
    use sandbox_proto::exec_stream::StreamEvent;
    use std::io::IsTerminal;
    use std::os::fd::AsFd;
    let local_tty = std::io::stdin().is_terminal();
    let size = if a.tty {
        sandbox_runtime::sys::get_winsize(std::io::stdout().as_fd())
            .or_else(|_| sandbox_runtime::sys::get_winsize(std::io::stdin().as_fd()))
            .ok()
    } else {
        None
    };
    // SIGWINCH is taken by a thread of its own (sigwait); it must be blocked before any thread starts.
    let winch = nix::sys::signal::SigSet::from(nix::sys::signal::Signal::SIGWINCH);
    if a.tty {
        let _ = winch.thread_block();
    }
    let init = sandbox_proto::stream::ExecStreamInit {
        command: a.command.clone(),
        cwd: a.workdir,
        env: parse_env(&a.env)?,
        user: a.user,
        timeout_seconds: a.timeout,
        stdin: a.interactive,
        tty: a.tty,
        width: size.map(|s| s.0),
        height: size.map(|s| s.1),
    };
    let (mut stream, _ready) = client.exec_stream(&a.name, &init)?;
    let _raw = RawMode::enter(a.tty && a.interactive && local_tty);
    if a.interactive {
        let mut w = stream.writer()?;
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match std::io::Read::read(&mut stdin, &mut buf) {
                    Ok(0) => {
                        let _ = w.close_stdin();
                        return;
                    }
                    Ok(n) => {
                        if w.write_stdin(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        let _ = w.close_stdin();
                        return;
                    }
                }
            }
        });
    }
    if a.tty {
        let mut w = stream.writer()?;
        std::thread::spawn(move || {
            while winch.wait().is_ok() {
                if let Ok((cols, rows)) =
                    sandbox_runtime::sys::get_winsize(std::io::stdout().as_fd())
                {
                    if w.resize(cols, rows).is_err() {
                        return;
                    }
                }
            }
        });
    }
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    loop {
        match stream.next()? {
            Some(StreamEvent::Stdout(d)) => {
                let _ = out.write_all(&d);
                let _ = out.flush();
            }
            Some(StreamEvent::Stderr(d)) => {
                let _ = err.write_all(&d);
                let _ = err.flush();
            }
            Some(StreamEvent::Ready(_)) => {}
            Some(StreamEvent::Exit(x)) => {
                drop(_raw);
                if x.timed_out {
                    return Err(Failure::new(
                        EXIT_TIMEOUT,
                        anyhow::anyhow!(
                            "command {:?} timed out after {} s; its process tree was killed",
                            a.command,
                            a.timeout.unwrap_or(0.0)
                        ),
                    ));
                }
                return Ok(x.exit_code);
            }
            None => {
                return Err(Failure::new(
                    1,
                    anyhow::anyhow!("the exec stream ended without an exit status"),
                ))
            }
        }
    }
}

fn cmd_ls(client: &BlockingClient, json: bool, a: LsArgs) -> CmdResult {
    let _ = a.all;
    let mut statuses = Vec::new();
    for s in a.status.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let st = SandboxStatus::parse(s).ok_or_else(|| {
            anyhow::anyhow!(
                "unknown status {s:?} (one of PENDING, CREATING, RUNNING, TERMINATING, COMPLETED, FAILED, TERMINATED)"
            )
        })?;
        statuses.push(st);
    }
    let tags: Vec<&str> = a.tag.iter().map(String::as_str).collect();
    let list = client.list_filtered(&statuses, &tags)?;
    if json {
        print_json(&list)?;
        return Ok(0);
    }
    let now = now_unix();
    let mut rows = vec![["ID", "NAME", "IMAGE", "STATUS", "CREATED", "COMMAND"].map(String::from)];
    for s in &list.sandboxes {
        let status = match &s.exit {
            Some(e) if s.status.is_terminal() => format!("{} ({})", s.status, e.shell_status()),
            _ => s.status.to_string(),
        };
        rows.push([
            s.id.clone(),
            s.name.clone(),
            short_image(&s.image),
            status,
            ago(&s.created_at, now),
            short_command(&s.command),
        ]);
    }
    print_table(&rows)?;
    Ok(0)
}

fn cmd_inspect(client: &BlockingClient, names: &[String]) -> CmdResult {
    let mut found = Vec::new();
    let mut failed = false;
    for n in names {
        match client.get(n) {
            Ok(info) => found.push(info),
            Err(e) => {
                failed = true;
                report(&e.into());
            }
        }
    }
    // One name: the object itself (handy with jq); several: an array.
    if names.len() == 1 {
        if let Some(info) = found.first() {
            print_json(info)?;
        }
    } else {
        print_json(&found)?;
    }
    Ok(i32::from(failed))
}

fn cmd_import(
    client: &BlockingClient,
    json: bool,
    path: PathBuf,
    reference: Option<String>,
) -> CmdResult {
    let abs = match std::fs::canonicalize(&path) {
        Ok(p) => p,
        // The daemon reports a missing path with its own error; just make it absolute.
        Err(_) => std::env::current_dir()?.join(&path),
    };
    let path = abs
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("path {} is not valid UTF-8", abs.display()))?
        .to_owned();
    let info = client.import_image(&ImportImageRequest { path, reference })?;
    if json {
        print_json(&info)?;
    } else {
        let refs = if info.references.is_empty() {
            "<none>".to_owned()
        } else {
            info.references.join(", ")
        };
        println!("Imported {refs} ({})", info.digest);
    }
    Ok(0)
}

fn cmd_images(client: &BlockingClient, json: bool) -> CmdResult {
    let list = client.images()?;
    if json {
        print_json(&list)?;
        return Ok(0);
    }
    let now = now_unix();
    let mut rows = vec![["REFERENCE", "DIGEST", "SIZE", "CREATED"].map(String::from)];
    for img in &list.images {
        let created = img
            .created
            .as_deref()
            .map_or_else(|| "-".to_owned(), |c| ago(c, now));
        let refs: Vec<String> = if img.references.is_empty() {
            vec!["<none>".to_owned()]
        } else {
            img.references.iter().map(|r| short_image(r)).collect()
        };
        for r in refs {
            rows.push([
                r,
                short_digest(&img.digest),
                human_size(img.size),
                created.clone(),
            ]);
        }
    }
    print_table(&rows)?;
    Ok(0)
}

fn cmd_rmi(client: &BlockingClient, json: bool, a: RmiArgs) -> CmdResult {
    let mut failed = false;
    let mut removed: Vec<ImageInfo> = Vec::new();
    for r in &a.references {
        match client.remove_image(r, a.force) {
            Ok(info) if json => removed.push(info),
            Ok(info) => println!("Deleted: {} ({})", info.references.join(", "), info.digest),
            Err(e) => {
                failed = true;
                report(&e.into());
            }
        }
    }
    if json {
        print_json(&removed)?;
    }
    Ok(i32::from(failed))
}

fn parse_pull_policy(s: &str) -> Result<PullPolicy, String> {
    match s {
        "missing" => Ok(PullPolicy::Missing),
        "always" => Ok(PullPolicy::Always),
        "never" => Ok(PullPolicy::Never),
        _ => Err(format!("{s:?}: expected missing, always or never")),
    }
}

/// Pulls the image of a `run`, with progress on stderr.
fn pull_for_run(client: &BlockingClient, json: bool, image: &str) -> Result<(), Failure> {
    let req = PullImageRequest {
        reference: image.to_owned(),
        platform: None,
    };
    let mut progress = Progress::new(!json, std::io::stderr());
    client
        .pull_image_progress(&req, |ev| progress.event(ev))
        .map_err(|e| Failure::new(EXIT_RUN_FAILED, e))?;
    Ok(())
}

fn cmd_pull(client: &BlockingClient, json: bool, a: PullArgs) -> CmdResult {
    let req = PullImageRequest {
        reference: a.reference,
        platform: a.platform,
    };
    let result: PullResult = if json || a.quiet {
        client.pull_image(&req)?
    } else {
        let mut progress = Progress::new(true, std::io::stdout());
        client.pull_image_progress(&req, |ev| progress.event(ev))?
    };
    if json {
        print_json(&result)?;
    } else if a.quiet {
        println!("{}", result.image.digest);
    } else {
        let reference = result.image.references.first().cloned().unwrap_or_default();
        println!("Digest: {}", result.resolved_digest);
        if result.layers_downloaded == 0 {
            println!("Status: Image is up to date for {reference}");
        } else {
            println!(
                "Status: Downloaded newer image for {reference} ({} in {} layer(s))",
                human_size(result.downloaded_bytes),
                result.layers_downloaded
            );
        }
    }
    Ok(0)
}

/// Prints pull progress: a line per layer when its status changes; on a terminal, also a running total.
struct Progress<W: Write> {
    enabled: bool,
    tty: bool,
    out: W,
    layers: Vec<(String, u64, LayerStatus, u64)>,
    total_shown: bool,
}

impl<W: Write + std::io::IsTerminal> Progress<W> {
    fn new(enabled: bool, out: W) -> Self {
        let tty = out.is_terminal();
        Self {
            enabled,
            tty,
            out,
            layers: Vec::new(),
            total_shown: false,
        }
    }

    fn clear_total(&mut self) {
        if self.total_shown {
            let _ = write!(self.out, "\r\x1b[K");
            self.total_shown = false;
        }
    }

    fn event(&mut self, ev: &PullEvent) {
        if !self.enabled {
            return;
        }
        match ev {
            PullEvent::Resolved {
                reference,
                digest,
                platform,
                layers,
                ..
            } => {
                self.clear_total();
                let _ = writeln!(
                    self.out,
                    "{reference}: resolved to {} ({platform}), {} layer(s)",
                    short_digest(digest),
                    layers.len()
                );
                self.layers = layers
                    .iter()
                    .map(|l| (l.digest.clone(), l.size, l.status, l.downloaded))
                    .collect();
            }
            PullEvent::Layer(l) => {
                let Some(entry) = self.layers.iter_mut().find(|e| e.0 == l.digest) else {
                    return;
                };
                let changed = entry.2 != l.status;
                entry.2 = l.status;
                entry.3 = l.downloaded;
                if changed {
                    let what = match l.status {
                        LayerStatus::Waiting => "waiting",
                        LayerStatus::Downloading => "downloading",
                        LayerStatus::Exists => "already exists",
                        LayerStatus::Done => "pull complete",
                    };
                    self.clear_total();
                    let _ = writeln!(
                        self.out,
                        "{}: {what} ({})",
                        short_digest(&l.digest),
                        human_size(l.size)
                    );
                }
                if self.tty {
                    let (done, total): (u64, u64) = self
                        .layers
                        .iter()
                        .filter(|e| e.2 != LayerStatus::Exists)
                        .fold((0, 0), |(d, t), e| {
                            let d_e = if e.2 == LayerStatus::Done { e.1 } else { e.3 };
                            (d + d_e, t + e.1)
                        });
                    let _ = write!(
                        self.out,
                        "\r\x1b[Kdownloaded {} of {}",
                        human_size(done),
                        human_size(total)
                    );
                    self.total_shown = true;
                }
            }
            PullEvent::Done(_) | PullEvent::Error { .. } => self.clear_total(),
        }
        let _ = self.out.flush();
    }
}

fn cmd_prune(client: &BlockingClient, json: bool, all: bool) -> CmdResult {
    let r = client.prune_images(all)?;
    if json {
        print_json(&r)?;
    } else {
        for d in &r.images_removed {
            println!("Deleted image: {d}");
        }
        println!(
            "Removed {} image(s), {} blob(s), {} layer(s); reclaimed {}",
            r.images_removed.len(),
            r.blobs_removed,
            r.layers_removed,
            human_size(r.reclaimed_bytes)
        );
    }
    Ok(0)
}

fn cmd_df(client: &BlockingClient, json: bool) -> CmdResult {
    let u = client.image_usage()?;
    if json {
        print_json(&u)?;
        return Ok(0);
    }
    let mut rows = vec![["REFERENCE", "DIGEST", "SIZE", "UNIQUE", "SANDBOXES"].map(String::from)];
    for i in &u.images {
        let name = i
            .references
            .first()
            .map_or_else(|| "<none>".to_owned(), |r| short_image(r));
        rows.push([
            name,
            short_digest(&i.digest),
            human_size(i.total_bytes),
            human_size(i.unique_bytes),
            i.sandboxes.to_string(),
        ]);
    }
    print_table(&rows)?;
    println!();
    println!(
        "Blobs: {} ({}); layers: {} ({}); total {}; reclaimable {}",
        u.blobs,
        human_size(u.blob_bytes),
        u.layers,
        human_size(u.layer_bytes),
        human_size(u.blob_bytes + u.layer_bytes),
        human_size(u.reclaimable_bytes)
    );
    Ok(0)
}

fn cmd_version(client: &BlockingClient, json: bool) -> CmdResult {
    let client_version = env!("CARGO_PKG_VERSION");
    let daemon = client.version();
    if json {
        let daemon = daemon?;
        print_json(
            &serde_json::json!({ "client": { "version": client_version }, "daemon": daemon }),
        )?;
        return Ok(0);
    }
    println!("Client: sandboxctl {client_version}");
    let v = daemon?;
    println!(
        "Daemon: sandboxd {} (API {}, cgroup {})",
        v.version, v.api_version, v.cgroup_version
    );
    Ok(0)
}

fn print_json(v: &impl Serialize) -> Result<(), Failure> {
    let s = serde_json::to_string_pretty(v).map_err(anyhow::Error::from)?;
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{s}");
    Ok(())
}

/// Left-aligned columns separated by three spaces; the last column is not padded.
fn print_table<const N: usize>(rows: &[[String; N]]) -> Result<(), Failure> {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == N {
                out.push_str(cell);
            } else {
                out.push_str(cell);
                let pad = widths[i] - cell.chars().count() + 3;
                out.push_str(&" ".repeat(pad));
            }
        }
        let trimmed = out.trim_end().len();
        out.truncate(trimmed);
        out.push('\n');
    }
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(out.as_bytes());
    Ok(())
}

/// `docker.io/library/busybox:latest` -> `busybox:latest`; `docker.io/me/app:1` -> `me/app:1`;
/// digests shortened to 12 hex characters.
fn short_image(image: &str) -> String {
    let s = image
        .strip_prefix("docker.io/library/")
        .or_else(|| image.strip_prefix("docker.io/"))
        .unwrap_or(image);
    match s.split_once("@sha256:") {
        Some((name, hex)) => format!("{name}@sha256:{}", &hex[..hex.len().min(12)]),
        None => s.to_owned(),
    }
}

fn short_digest(d: &str) -> String {
    let hex = d.split_once(':').map_or(d, |(_, h)| h);
    hex.chars().take(12).collect()
}

fn short_command(cmd: &[String]) -> String {
    const MAX: usize = 30;
    if cmd.is_empty() {
        return "-".to_owned();
    }
    let joined = cmd.join(" ");
    let inner = if joined.chars().count() > MAX {
        let mut s: String = joined.chars().take(MAX - 1).collect();
        s.push('…');
        s
    } else {
        joined
    };
    format!("\"{inner}\"")
}

/// `1536` -> `1.5KiB`.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A human age: `5s ago`, `3m ago`, `2h ago`, `4d ago`; the raw string when it is not RFC 3339.
fn ago(timestamp: &str, now: i64) -> String {
    let Some(t) = parse_rfc3339(timestamp) else {
        return timestamp.to_owned();
    };
    let d = now - t;
    if d < 1 {
        "just now".to_owned()
    } else if d < 60 {
        format!("{d}s ago")
    } else if d < 3600 {
        format!("{}m ago", d / 60)
    } else if d < 86_400 {
        format!("{}h ago", d / 3600)
    } else if d < 86_400 * 60 {
        format!("{}d ago", d / 86_400)
    } else {
        format!("{}mo ago", d / (86_400 * 30))
    }
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' => 0,
        sign @ (b'+' | b'-') => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            let o = oh * 3600 + om * 60;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec - offset)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_parses_command_after_image() {
        let cli = Cli::try_parse_from(["sandboxctl", "run", "--rm", "busybox", "--", "/bin/true"])
            .expect("parse");
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert!(a.rm && !a.detach);
        assert_eq!(a.image, "busybox");
        assert_eq!(a.command, ["/bin/true"]);

        let cli = Cli::try_parse_from([
            "sandboxctl",
            "run",
            "-d",
            "-e",
            "A=1",
            "--memory",
            "256Mi",
            "busybox",
            "sh",
            "-c",
            "echo hi",
        ])
        .expect("parse");
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert!(a.detach);
        assert_eq!(a.command, ["sh", "-c", "echo hi"]);
        assert_eq!(a.memory.as_deref(), Some("256Mi"));

        let cli = Cli::try_parse_from(["sandboxctl", "--json", "run", "busybox"]).expect("parse");
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert!(cli.json && a.command.is_empty());

        assert!(
            Cli::try_parse_from(["sandboxctl", "run", "--default-cmd", "busybox", "--", "x"])
                .is_err()
        );
    }

    #[test]
    fn exec_and_aliases_parse() {
        let cli = Cli::try_parse_from([
            "sandboxctl",
            "exec",
            "--timeout",
            "2",
            "web",
            "--",
            "ls",
            "-l",
        ])
        .expect("parse");
        let Command::Exec(a) = cli.command else {
            panic!("not exec")
        };
        assert_eq!(a.name, "web");
        assert_eq!(a.command, ["ls", "-l"]);
        assert_eq!(a.timeout, Some(2.0));
        assert!(Cli::try_parse_from(["sandboxctl", "exec", "web"]).is_err());

        let cli = Cli::try_parse_from(["sandboxctl", "ps", "--status", "RUNNING,FAILED", "--json"])
            .expect("parse");
        let Command::Ls(a) = cli.command else {
            panic!("not ls")
        };
        assert_eq!(a.status, ["RUNNING", "FAILED"]);
        assert!(cli.json);

        let cli =
            Cli::try_parse_from(["sandboxctl", "image", "rm", "-f", "busybox"]).expect("parse");
        assert!(matches!(
            cli.command,
            Command::Image(ImageCommand::Rm(RmiArgs { force: true, .. }))
        ));
        let cli = Cli::try_parse_from(["sandboxctl", "--socket", "/tmp/s.sock", "images"])
            .expect("parse");
        assert_eq!(cli.socket, PathBuf::from("/tmp/s.sock"));
    }

    #[test]
    fn logs_run_and_ls_flags_parse() {
        let cli = Cli::try_parse_from(["sandboxctl", "logs", "-f", "--tail", "5", "-t", "web"])
            .expect("parse");
        let Command::Logs(a) = cli.command else {
            panic!("not logs")
        };
        assert!(a.follow && a.timestamps);
        assert_eq!((a.tail, a.name.as_str()), (Some(5), "web"));
        let cli = Cli::try_parse_from([
            "sandboxctl",
            "run",
            "--max-lifetime",
            "2.5",
            "--annotation",
            "team=ml",
            "--annotation",
            "x=a=b",
            "busybox",
        ])
        .expect("parse");
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert_eq!(a.max_lifetime, Some(2.5));
        let ann = parse_annotations(&a.annotations)
            .map_err(|f| f.error)
            .expect("annotations");
        assert_eq!(ann["team"], "ml");
        assert_eq!(ann["x"], "a=b");
        assert!(parse_annotations(&["novalue".into()]).is_err());
        let cli =
            Cli::try_parse_from(["sandboxctl", "ls", "--tag", "a", "--tag", "b"]).expect("parse");
        let Command::Ls(a) = cli.command else {
            panic!("not ls")
        };
        assert_eq!(a.tag, ["a", "b"]);
    }

    #[test]
    fn env_parsing() {
        let env = parse_env(&["A=1".into(), "B=x=y".into(), "C=".into()])
            .map_err(|f| f.error)
            .expect("env");
        assert_eq!(env["A"], "1");
        assert_eq!(env["B"], "x=y");
        assert_eq!(env["C"], "");
        assert!(parse_env(&["=1".into()]).is_err());
    }

    #[test]
    fn formatting() {
        assert_eq!(
            short_image("docker.io/library/busybox:latest"),
            "busybox:latest"
        );
        assert_eq!(short_image("docker.io/me/app:1"), "me/app:1");
        assert_eq!(short_image("127.0.0.1:5000/x:y"), "127.0.0.1:5000/x:y");
        assert_eq!(short_digest("sha256:0123456789abcdef0123"), "0123456789ab");
        assert_eq!(human_size(512), "512B");
        assert_eq!(human_size(1536), "1.5KiB");
        assert_eq!(human_size(4 * 1024 * 1024), "4.0MiB");
        assert_eq!(short_command(&[]), "-");
        assert_eq!(short_command(&["sh".into(), "-c".into()]), "\"sh -c\"");
        assert_eq!(short_command(&["x".repeat(40)]).chars().count(), 32);
    }

    #[test]
    fn rfc3339_and_ages() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2024-02-29T12:00:00.123456789Z"),
            Some(1_709_208_000)
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T14:00:00+02:00"),
            Some(1_709_208_000)
        );
        assert_eq!(parse_rfc3339("nonsense"), None);
        let t = 1_709_208_000;
        assert_eq!(ago("2024-02-29T12:00:00Z", t + 5), "5s ago");
        assert_eq!(ago("2024-02-29T12:00:00Z", t + 300), "5m ago");
        assert_eq!(ago("2024-02-29T12:00:00Z", t + 7200), "2h ago");
        assert_eq!(ago("2024-02-29T12:00:00Z", t + 3 * 86_400), "3d ago");
        assert_eq!(ago("garbage", t), "garbage");
    }

    #[test]
    fn exit_statuses() {
        let mut info: SandboxInfo = serde_json::from_value(serde_json::json!({
            "id": "0123456789abcdef", "name": "n", "image": "i", "image_digest": "d", "status": "FAILED",
            "command": [], "created_at": "t", "status_updated_at": "t", "limits": {}, "host_uid": 0
        }))
        .expect("info");
        assert_eq!(exit_status(&info), 125);
        info.exit = Some(sandbox_proto::ExitInfo {
            signal: Some(9),
            reason: "killed".into(),
            ..Default::default()
        });
        assert_eq!(exit_status(&info), 137);
        info.exit = None;
        info.status = SandboxStatus::Completed;
        assert_eq!(exit_status(&info), 0);
    }
}
