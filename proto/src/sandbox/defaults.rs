//! [`SandboxDefaults`]: the configuration a sandbox is created with.

use std::collections::BTreeMap;

use crate::types::{
    CreateSandboxRequest, MountedFile, NetworkOptions, Resources, ServiceSpec, VolumeSpec,
};

/// The image a sandbox runs when none is given, as in the hosted product.
pub const DEFAULT_CONTAINER_IMAGE: &str = "python:3.11";

/// How a sandbox is created: image, main command, lifetime, tags, resources, environment, files,
/// volumes, annotations and name.
///
/// `SandboxDefaults::default()` is `python:3.11` with no command (the sandbox idles until stopped).
/// Override with the `with_*` methods, which consume and return the value, so defaults shared by a
/// [`Session`](super::Session) can be adjusted per sandbox:
///
/// ```
/// use sandbox_proto::sandbox::SandboxDefaults;
///
/// let defaults = SandboxDefaults::default()
///     .with_max_lifetime_seconds(300.0)
///     .with_tag("batch-job")
///     .with_cpu("500m")
///     .with_memory("512Mi")
///     .with_environment_variable("MODE", "test");
/// let gpu = defaults.clone().with_container_image("python:3.12").with_tag("big");
/// assert_eq!(gpu.tags, ["batch-job", "big"]);
/// assert_eq!(defaults.container_image, "python:3.11");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxDefaults {
    /// Image reference; no registry means Docker Hub (`python:3.11` is `docker.io/library/python:3.11`).
    pub container_image: String,
    /// The main process (`args` are its arguments). `None`: the sandbox idles until stopped, unless the
    /// sandbox is run with a command of its own.
    pub command: Option<String>,
    /// Arguments of `command`.
    pub args: Vec<String>,
    /// The daemon stops the sandbox (TERMINATED) this many seconds after its creation.
    pub max_lifetime_seconds: Option<f64>,
    /// Tags, for listing and filtering.
    pub tags: Vec<String>,
    /// CPU, memory and pids (requests and limits).
    pub resources: Resources,
    /// Environment of the main process and of every exec.
    pub environment_variables: BTreeMap<String, String>,
    /// Files placed read-only in the sandbox at creation.
    pub mounted_files: Vec<MountedFile>,
    /// Size-limited scratch volumes.
    pub volumes: Vec<VolumeSpec>,
    /// Free-form key/value metadata.
    pub annotations: BTreeMap<String, String>,
    /// Unique name (also the hostname); default `sb-` and the id's first 8 characters.
    pub name: Option<String>,
    /// Network policy (default: egress open, ingress denied).
    pub network: Option<NetworkOptions>,
    /// Ports published on the host.
    pub services: Vec<ServiceSpec>,
}

impl Default for SandboxDefaults {
    fn default() -> Self {
        Self {
            container_image: DEFAULT_CONTAINER_IMAGE.to_owned(),
            command: None,
            args: Vec::new(),
            max_lifetime_seconds: None,
            tags: Vec::new(),
            resources: Resources::default(),
            environment_variables: BTreeMap::new(),
            mounted_files: Vec::new(),
            volumes: Vec::new(),
            annotations: BTreeMap::new(),
            name: None,
            network: None,
            services: Vec::new(),
        }
    }
}

impl SandboxDefaults {
    /// The defaults: `python:3.11`, no command.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the image.
    pub fn with_container_image(mut self, image: impl Into<String>) -> Self {
        self.container_image = image.into();
        self
    }

    /// Sets the main process and its arguments (an empty `argv` clears it: the sandbox idles).
    pub fn with_command<I, S>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut it = argv.into_iter().map(Into::into);
        self.command = it.next();
        self.args = it.collect();
        self
    }

    /// Sets the lifetime.
    pub fn with_max_lifetime_seconds(mut self, seconds: f64) -> Self {
        self.max_lifetime_seconds = Some(seconds);
        self
    }

    /// Adds a tag.
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Adds tags.
    pub fn with_tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }

    /// Replaces the resources.
    pub fn with_resources(mut self, resources: Resources) -> Self {
        self.resources = resources;
        self
    }

    /// Sets the CPU (request and limit), in cores: `"500m"`, `"2"`.
    pub fn with_cpu(mut self, cpu: impl Into<String>) -> Self {
        self.resources.cpu = Some(cpu.into());
        self
    }

    /// Sets the memory (request and limit): `"512Mi"`, `"1G"`.
    pub fn with_memory(mut self, memory: impl Into<String>) -> Self {
        self.resources.memory = Some(memory.into());
        self
    }

    /// Sets the maximum number of processes.
    pub fn with_pids(mut self, pids: i64) -> Self {
        self.resources.pids = Some(pids);
        self
    }

    /// Adds (or replaces) an environment variable.
    pub fn with_environment_variable(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        self.environment_variables.insert(name.into(), value.into());
        self
    }

    /// Adds environment variables (replacing those of the same names).
    pub fn with_environment_variables<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        self.environment_variables
            .extend(vars.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Adds a read-only file at `mount_path` with `content` (mode `0444`).
    pub fn with_mounted_file(
        mut self,
        mount_path: impl Into<String>,
        content: impl AsRef<[u8]>,
    ) -> Self {
        use base64::Engine as _;
        self.mounted_files.push(MountedFile {
            mount_path: mount_path.into(),
            file_content: base64::engine::general_purpose::STANDARD.encode(content),
            mode: None,
        });
        self
    }

    /// Adds a scratch volume of at most `size` (`"64Mi"`) at `mount_path`.
    pub fn with_volume(
        mut self,
        name: impl Into<String>,
        mount_path: impl Into<String>,
        size: impl Into<String>,
    ) -> Self {
        self.volumes.push(VolumeSpec {
            name: name.into(),
            mount_path: mount_path.into(),
            size: size.into(),
        });
        self
    }

    /// Adds (or replaces) an annotation.
    pub fn with_annotation(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// Sets the network policy.
    pub fn with_network(mut self, network: NetworkOptions) -> Self {
        self.network = Some(network);
        self
    }

    /// Publishes a TCP port of the sandbox on the host (127.0.0.1, a port the kernel picks; see
    /// `SandboxInfo::exposed_ports`).
    pub fn with_service(mut self, port: u16) -> Self {
        self.services.push(ServiceSpec {
            port: u32::from(port),
            ..ServiceSpec::default()
        });
        self
    }

    /// Sets the name.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The create request for these defaults. A non-empty `command` replaces the defaults' command.
    pub fn to_request(&self, command: Vec<String>) -> CreateSandboxRequest {
        let command = if !command.is_empty() {
            Some(command)
        } else {
            self.command.as_ref().map(|c| {
                std::iter::once(c.clone())
                    .chain(self.args.iter().cloned())
                    .collect()
            })
        };
        CreateSandboxRequest {
            image: self.container_image.clone(),
            name: self.name.clone(),
            command,
            env: self.environment_variables.clone(),
            resources: self.resources.clone(),
            tags: self.tags.clone(),
            max_lifetime_seconds: self.max_lifetime_seconds,
            annotations: self.annotations.clone(),
            mounted_files: self.mounted_files.clone(),
            volumes: self.volumes.clone(),
            network: self.network.clone(),
            services: self.services.clone(),
            ..CreateSandboxRequest::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_build_requests() {
        let d = SandboxDefaults::new();
        let r = d.to_request(Vec::new());
        assert_eq!(r.image, "python:3.11");
        assert_eq!(r.command, None);

        let d = d
            .with_command(["sleep", "5"])
            .with_container_image("busybox")
            .with_tags(["a", "b"])
            .with_memory("64Mi")
            .with_pids(32)
            .with_environment_variables([("A", "1")])
            .with_mounted_file("/etc/x", b"hi")
            .with_volume("scratch", "/scratch", "8Mi")
            .with_annotation("k", "v")
            .with_name("n1")
            .with_max_lifetime_seconds(60.0);
        let r = d.to_request(Vec::new());
        assert_eq!(r.command, Some(vec!["sleep".into(), "5".into()]));
        assert_eq!(r.image, "busybox");
        assert_eq!(r.tags, ["a", "b"]);
        assert_eq!(r.resources.memory.as_deref(), Some("64Mi"));
        assert_eq!(r.resources.pids, Some(32));
        assert_eq!(r.env["A"], "1");
        assert_eq!(r.mounted_files[0].file_content, "aGk=");
        assert_eq!(r.volumes[0].size, "8Mi");
        assert_eq!(r.annotations["k"], "v");
        assert_eq!(r.name.as_deref(), Some("n1"));
        assert_eq!(r.max_lifetime_seconds, Some(60.0));

        let r = d.to_request(vec!["true".into()]);
        assert_eq!(r.command, Some(vec!["true".into()]));
        let idle = d.with_command(Vec::<String>::new());
        assert_eq!(idle.to_request(Vec::new()).command, None);
    }
}
