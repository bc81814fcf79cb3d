//! Daemon configuration: a TOML file, overridden by command-line flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The daemon's configuration (`/etc/sandboxd/config.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Path of the API socket.
    pub socket: PathBuf,
    /// Group that may use the socket (mode 0660); default root.
    pub socket_group: Option<String>,
    /// Where images, sandboxes and their state live.
    pub state_dir: PathBuf,
    /// Parent cgroup of every sandbox: relative = under the daemon's own cgroup, absolute = from the
    /// hierarchy's root (e.g. a delegated cgroup on a cgroup v2 host).
    pub cgroup_parent: String,
    /// First host uid handed to sandboxes; sandbox N gets `[uid_base + N*65536, +65536)`.
    pub uid_base: u32,
    /// How many sandboxes (uid ranges) may exist at once.
    pub max_sandboxes: u32,
    /// Default grace period between SIGTERM and SIGKILL when stopping.
    pub stop_grace_seconds: f64,
    /// Default cap on each of stdout and stderr of a unary exec.
    pub exec_max_output_bytes: u64,
    /// Keep one exec helper per running sandbox prepared ahead of time (in its namespaces and a leaf
    /// cgroup of its own, counted in its pids), so that an exec does not wait for a process to start and
    /// for a cgroup migration.
    pub exec_prepare: bool,
    /// Supervisors kept ready (mount namespace, seccomp filter and init in fresh namespaces prepared),
    /// so that creating a sandbox does not wait for a process to start; 0 disables the pool.
    pub warm_pool: usize,
    /// How images are pulled.
    pub pull: PullConfig,
    /// The main processes' logs.
    pub logs: LogsConfig,
    /// Per-registry settings, keyed by registry host as it appears in normalised references (`docker.io`,
    /// `ghcr.io`, `registry.example:5000`), in the spirit of containerd's `hosts.toml`.
    pub registries: BTreeMap<String, RegistryConfig>,
    /// Sandbox networking.
    pub network: NetworkConfig,
}

/// How sandboxes are networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// An address on the daemon's bridge, NAT to the outside, policy in the daemon's nftables table.
    Bridge,
    /// Loopback only, for every sandbox; no bridge, no firewall table.
    None,
}

/// `[network]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// `bridge` (default) or `none`.
    pub mode: NetworkMode,
    /// The host bridge sandboxd owns (created at start, removed at a clean stop with no sandbox left).
    pub bridge: String,
    /// The sandboxes' IPv4 subnet; the bridge (gateway) has its first address. Must not overlap a network
    /// the host already has.
    pub subnet: ipnet::Ipv4Net,
    /// The sandboxes' IPv6 subnet (optional; without it sandboxes have no IPv6). The bridge has its first
    /// address; a sandbox's address is the subnet's start plus its IPv4 address's index in `subnet`. Must not
    /// overlap a network the host has, and must hold as many addresses as `subnet` (prefix length at most
    /// 96 + that of `subnet`). Turns on `net.ipv6.conf.all.forwarding`.
    pub subnet6: Option<ipnet::Ipv6Net>,
    /// The nftables table (`inet <name>`) sandboxd owns.
    pub nft_table: String,
    /// Prefix of the host ends of the sandboxes' veth pairs (at most 6 characters; 8 hex characters follow).
    pub veth_prefix: String,
    /// Nameservers written to the sandboxes' `/etc/resolv.conf`; default: the host's (from
    /// `/etc/resolv.conf`, or systemd-resolved's upstream list when the host's is a loopback stub).
    pub dns: Vec<std::net::Ipv4Addr>,
    /// Search domains for `/etc/resolv.conf`.
    pub dns_search: Vec<String>,
    /// The host address published ports bind to when a service does not name one.
    pub publish_host_ip: std::net::Ipv4Addr,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            mode: NetworkMode::Bridge,
            bridge: "sandboxd0".to_owned(),
            subnet: "10.88.0.0/16".parse().unwrap_or_default(),
            subnet6: None,
            nft_table: "sandboxd".to_owned(),
            veth_prefix: "sbx".to_owned(),
            dns: Vec::new(),
            dns_search: Vec::new(),
            publish_host_ip: std::net::Ipv4Addr::LOCALHOST,
        }
    }
}

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl NetworkConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !valid_name(&self.bridge, 15) {
            return bad(format!(
                "network.bridge {:?}: 1 to 15 characters of [A-Za-z0-9_-]",
                self.bridge
            ));
        }
        if !valid_name(&self.nft_table, 64) {
            return bad(format!(
                "network.nft_table {:?}: 1 to 64 characters of [A-Za-z0-9_-]",
                self.nft_table
            ));
        }
        if !valid_name(&self.veth_prefix, 6) {
            return bad(format!(
                "network.veth_prefix {:?}: 1 to 6 characters of [A-Za-z0-9_-]",
                self.veth_prefix
            ));
        }
        if self.bridge.starts_with(&self.veth_prefix) {
            return bad("network.bridge must not start with network.veth_prefix".into());
        }
        if self.subnet.prefix_len() > 29 || self.subnet.prefix_len() < 8 {
            return bad(format!(
                "network.subnet {}: the prefix length must be 8 to 29",
                self.subnet
            ));
        }
        if self.subnet != self.subnet.trunc() {
            return bad(format!(
                "network.subnet {}: host bits are set (did you mean {}?)",
                self.subnet,
                self.subnet.trunc()
            ));
        }
        let s = self.subnet.network();
        if s.is_loopback() || s.is_link_local() || s.is_multicast() || s.is_unspecified() {
            return bad(format!(
                "network.subnet {}: not a usable unicast network",
                self.subnet
            ));
        }
        if let Some(s6) = self.subnet6 {
            if s6 != s6.trunc() {
                return bad(format!(
                    "network.subnet6 {s6}: host bits are set (did you mean {}?)",
                    s6.trunc()
                ));
            }
            if s6.prefix_len() < 16 || s6.prefix_len() > 96 + self.subnet.prefix_len() {
                return bad(format!(
                    "network.subnet6 {s6}: the prefix length must be 16 to {} (as many addresses as network.subnet {})",
                    96 + self.subnet.prefix_len(),
                    self.subnet
                ));
            }
            let n = s6.network();
            if n.is_loopback()
                || n.is_multicast()
                || n.is_unspecified()
                || n.segments()[0] & 0xffc0 == 0xfe80
                || n.to_ipv4_mapped().is_some()
            {
                return bad(format!(
                    "network.subnet6 {s6}: not a usable unicast network"
                ));
            }
        }
        if self.dns_search.iter().any(|d| {
            d.is_empty()
                || d.len() > 253
                || !d
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        }) {
            return bad("network.dns_search: domain names only".into());
        }
        Ok(())
    }
}

/// `[pull]`: how images are pulled.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PullConfig {
    /// A pull (resolve, every layer, commit) that takes longer fails with `PULL_TIMEOUT`.
    pub timeout_seconds: f64,
    /// Layer downloads running at once, over all pulls.
    pub max_concurrent_downloads: usize,
    /// Docker `config.json` to read registry credentials from (`auths`); default `$DOCKER_CONFIG/config.json`,
    /// else `~/.docker/config.json` of the daemon's user. A missing file means anonymous pulls.
    pub docker_config: Option<PathBuf>,
    /// Attempts per layer download (resuming where the last one stopped) before the pull fails.
    pub download_attempts: u32,
}

impl Default for PullConfig {
    fn default() -> Self {
        Self {
            timeout_seconds: 1800.0,
            max_concurrent_downloads: 3,
            docker_config: None,
            download_attempts: 3,
        }
    }
}

/// `[logs]`: the main process's log of each sandbox (`main.log` + `main.log.1` in its state directory).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogsConfig {
    /// Bound on the on-disk log of one sandbox, both files together (the older half is dropped first).
    pub max_bytes: u64,
}

impl Default for LogsConfig {
    fn default() -> Self {
        Self {
            max_bytes: sandbox_runtime::logs::DEFAULT_MAX_BYTES,
        }
    }
}

/// `[registries."<host>"]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Mirrors tried in order before the registry itself: `http://127.0.0.1:5000`, `https://mirror.example`, or a
    /// bare `host[:port]` (HTTPS, or plain HTTP on loopback).
    pub mirrors: Vec<String>,
    /// Talk plain HTTP to this registry (registries on loopback addresses always do, as in Docker).
    pub insecure: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(sandbox_proto::DEFAULT_SOCKET),
            socket_group: None,
            state_dir: PathBuf::from("/var/lib/sandboxd"),
            cgroup_parent: "sandboxd".to_owned(),
            uid_base: 0x4000_0000,
            max_sandboxes: 4096,
            stop_grace_seconds: 10.0,
            exec_max_output_bytes: 16 << 20,
            exec_prepare: true,
            warm_pool: 2,
            pull: PullConfig::default(),
            logs: LogsConfig::default(),
            registries: BTreeMap::new(),
            network: NetworkConfig::default(),
        }
    }
}

impl Config {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses TOML text (`origin` names it in errors).
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.uid_base == 0 {
            return Err(ConfigError::Invalid("uid_base must not be 0 (root)".into()));
        }
        let top = u64::from(self.uid_base)
            + u64::from(self.max_sandboxes) * u64::from(sandbox_runtime::spec::ID_RANGE);
        if top > u64::from(u32::MAX) {
            return Err(ConfigError::Invalid(format!(
                "uid_base {} + max_sandboxes {} x 65536 exceeds the 32-bit uid space",
                self.uid_base, self.max_sandboxes
            )));
        }
        if !self.state_dir.is_absolute() || !self.socket.is_absolute() {
            return Err(ConfigError::Invalid(
                "state_dir and socket must be absolute paths".into(),
            ));
        }
        if self.warm_pool > 64 {
            return Err(ConfigError::Invalid("warm_pool must be at most 64".into()));
        }
        if !(self.pull.timeout_seconds.is_finite() && self.pull.timeout_seconds > 0.0) {
            return Err(ConfigError::Invalid(
                "pull.timeout_seconds must be > 0".into(),
            ));
        }
        if !(1..=64).contains(&self.pull.max_concurrent_downloads) {
            return Err(ConfigError::Invalid(
                "pull.max_concurrent_downloads must be 1 to 64".into(),
            ));
        }
        if !(1..=20).contains(&self.pull.download_attempts) {
            return Err(ConfigError::Invalid(
                "pull.download_attempts must be 1 to 20".into(),
            ));
        }
        for (host, r) in &self.registries {
            if host.is_empty() || host.contains(['/', ' ']) {
                return Err(ConfigError::Invalid(format!(
                    "registries.{host:?}: the key must be a registry host[:port] such as \"docker.io\""
                )));
            }
            for m in &r.mirrors {
                crate::pull::Endpoint::mirror(m).map_err(|e| {
                    ConfigError::Invalid(format!("registries.{host:?}.mirrors: {e}"))
                })?;
            }
        }
        if self.logs.max_bytes < sandbox_runtime::logs::MIN_MAX_BYTES {
            return Err(ConfigError::Invalid(format!(
                "logs.max_bytes must be at least {}",
                sandbox_runtime::logs::MIN_MAX_BYTES
            )));
        }
        self.network.validate()?;
        if !(self.stop_grace_seconds.is_finite() && self.stop_grace_seconds >= 0.0) {
            return Err(ConfigError::Invalid(
                "stop_grace_seconds must be >= 0".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_validate() {
        let c = Config::parse(
            "socket = \"/tmp/s.sock\"\nstate_dir = \"/tmp/st\"\ncgroup_parent = \"t\"\n",
            "x",
        )
        .unwrap();
        assert_eq!(c.socket, PathBuf::from("/tmp/s.sock"));
        assert_eq!(c.uid_base, 0x4000_0000);
        assert!(Config::parse("bogus = 1", "x").is_err());
        assert!(Config::parse("uid_base = 0", "x").is_err());
        assert!(Config::parse("uid_base = 4294000000", "x").is_err());
        assert!(Config::parse("state_dir = \"rel\"", "x").is_err());
        let c = Config::parse(
            "[pull]\ntimeout_seconds = 60\nmax_concurrent_downloads = 4\n\n[registries.\"docker.io\"]\nmirrors = [\"http://127.0.0.1:5000\"]\n\n[registries.\"registry.example:5000\"]\ninsecure = true\n",
            "x",
        )
        .unwrap();
        assert_eq!(c.pull.max_concurrent_downloads, 4);
        assert_eq!(c.registries["docker.io"].mirrors, ["http://127.0.0.1:5000"]);
        assert!(c.registries["registry.example:5000"].insecure);
        assert!(
            Config::parse("[registries.\"docker.io\"]\nmirrors = [\"ftp://x\"]\n", "x").is_err()
        );
        assert!(Config::parse("[pull]\nmax_concurrent_downloads = 0\n", "x").is_err());
        assert_eq!(
            Config::parse("[logs]\nmax_bytes = 100000\n", "x")
                .unwrap()
                .logs
                .max_bytes,
            100_000
        );
        assert!(Config::parse("[logs]\nmax_bytes = 1000\n", "x").is_err());
        let c = Config::parse(
            "[network]\nbridge = \"br-t\"\nsubnet = \"10.213.5.0/24\"\ndns = [\"198.18.0.2\"]\n",
            "x",
        )
        .unwrap();
        assert_eq!(c.network.subnet.to_string(), "10.213.5.0/24");
        assert_eq!(c.network.mode, NetworkMode::Bridge);
        assert_eq!(c.network.subnet6, None);
        let c = Config::parse(
            "[network]\nsubnet = \"10.213.5.0/24\"\nsubnet6 = \"fd5b:d0c0:5::/64\"\n",
            "x",
        )
        .unwrap();
        assert_eq!(
            c.network.subnet6.map(|s| s.to_string()).as_deref(),
            Some("fd5b:d0c0:5::/64")
        );
        for bad in [
            "[network]\nsubnet6 = \"fd5b:d0c0:5::1/64\"\n",
            "[network]\nsubnet6 = \"fd5b:d0c0:5::/120\"\n",
            "[network]\nsubnet6 = \"fe80::/64\"\n",
            "[network]\nsubnet6 = \"ff02::/64\"\n",
            "[network]\nsubnet6 = \"10.0.0.0/8\"\n",
            "[network]\nsubnet = \"10.213.5.1/24\"\n",
            "[network]\nsubnet = \"10.213.5.0/30\"\n",
            "[network]\nsubnet = \"127.0.0.0/8\"\n",
            "[network]\nsubnet = \"not-a-net\"\n",
            "[network]\nbridge = \"a-bridge-name-too-long\"\n",
            "[network]\nnft_table = \"bad name\"\n",
            "[network]\nmode = \"host\"\n",
            "[network]\nveth_prefix = \"sand\"\nbridge = \"sandbox0\"\n",
        ] {
            assert!(Config::parse(bad, "x").is_err(), "{bad}");
        }
    }
}
