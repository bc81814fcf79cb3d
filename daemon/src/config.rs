//! Daemon configuration: a TOML file, overridden by command-line flags.

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
    /// Supervisors kept ready (mount namespace, seccomp filter and init in fresh namespaces prepared),
    /// so that creating a sandbox does not wait for a process to start; 0 disables the pool.
    pub warm_pool: usize,
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
            warm_pool: 2,
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
    }
}
