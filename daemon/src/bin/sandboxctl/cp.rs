//! `sandboxctl cp` and the file options of `sandboxctl run` (`--mount-file`, `--volume`).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use clap::Args;
use sandbox_proto::client::BlockingClient;
use sandbox_proto::{MountedFile, VolumeSpec};

use super::{print_json, CmdResult, Failure};

#[derive(Debug, Args)]
pub(crate) struct CpArgs {
    /// Permission bits (octal) of a file copied into a sandbox (default: the local file's; with `-`, the
    /// replaced file's, else 0644).
    #[arg(long, value_name = "OCTAL", value_parser = parse_octal)]
    mode: Option<u32>,
    /// Source: a local file, `-` (stdin), or NAME:/path in a sandbox.
    src: String,
    /// Destination: a local file or directory, `-` (stdout), or NAME:/path in a sandbox (a path ending in
    /// `/` gets the source's file name).
    dst: String,
}

fn parse_octal(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(format!(
            "invalid mode {s:?}: expected octal permission bits, e.g. 0644"
        )),
    }
}

/// `NAME:/path` (as `docker cp`: the part before the colon has no `/`); `None` for a local path.
fn remote(s: &str) -> Option<(&str, &str)> {
    let (name, path) = s.split_once(':')?;
    (!name.is_empty() && !name.contains('/') && path.starts_with('/')).then_some((name, path))
}

fn fail(msg: String) -> Failure {
    Failure::new(1, anyhow::anyhow!(msg))
}

pub(crate) fn cmd_cp(client: &BlockingClient, json: bool, a: CpArgs) -> CmdResult {
    match (remote(&a.src), remote(&a.dst)) {
        (Some(_), Some(_)) => Err(fail(
            "copying between two sandboxes is not supported: copy to the host first".into(),
        )),
        (None, None) => Err(fail(format!(
            "one of {:?} and {:?} must be NAME:/path in a sandbox",
            a.src, a.dst
        ))),
        (Some((name, path)), None) => download(client, json, name, path, &a.dst),
        (None, Some((name, path))) => upload(client, json, &a.src, name, path, a.mode),
    }
}

fn download(client: &BlockingClient, json: bool, name: &str, path: &str, dst: &str) -> CmdResult {
    if dst == "-" {
        let out = std::io::stdout().lock();
        client.read_file_to(name, path, out)?;
        return Ok(0);
    }
    let mut target = PathBuf::from(dst);
    if target.is_dir() {
        let base = Path::new(path)
            .file_name()
            .ok_or_else(|| fail(format!("{path} names no file")))?;
        target.push(base);
    }
    let file = std::fs::File::create(&target)
        .map_err(|e| fail(format!("creating {}: {e}", target.display())))?;
    match client.read_file_to(name, path, std::io::BufWriter::with_capacity(1 << 20, file)) {
        Ok(info) => {
            if json {
                print_json(&info)?;
            }
            Ok(0)
        }
        Err(e) => {
            // No partial copy is left behind.
            let _ = std::fs::remove_file(&target);
            Err(e.into())
        }
    }
}

fn upload(
    client: &BlockingClient,
    json: bool,
    src: &str,
    name: &str,
    path: &str,
    mode: Option<u32>,
) -> CmdResult {
    let mut path = path.to_owned();
    let info = if src == "-" {
        if path.ends_with('/') {
            return Err(fail(format!(
                "{path} is a directory: name the file to write"
            )));
        }
        client.write_file_from(name, &path, std::io::stdin(), mode)?
    } else {
        let file = std::fs::File::open(src).map_err(|e| fail(format!("opening {src}: {e}")))?;
        let meta = file
            .metadata()
            .map_err(|e| fail(format!("reading {src}: {e}")))?;
        if !meta.is_file() {
            return Err(fail(format!(
                "{src} is not a regular file (only files are copied)"
            )));
        }
        if path.ends_with('/') {
            if let Some(base) = Path::new(src).file_name() {
                path.push_str(&base.to_string_lossy());
            }
        }
        let mode = mode.or_else(|| {
            use std::os::unix::fs::PermissionsExt as _;
            Some(meta.permissions().mode() & 0o7777)
        });
        client.write_file_from(name, &path, file, mode)?
    };
    if json {
        print_json(&info)?;
    }
    Ok(0)
}

/// `--mount-file HOSTFILE:/path`: the local file's content, read-only at `/path` in the sandbox.
pub(crate) fn mounted_file(spec: &str) -> Result<MountedFile, Failure> {
    let (host, path) = spec
        .split_once(":/")
        .map(|(h, p)| (h, format!("/{p}")))
        .ok_or_else(|| {
            fail(format!(
                "invalid --mount-file {spec:?}: expected HOSTFILE:/path"
            ))
        })?;
    let content =
        std::fs::read(host).map_err(|e| fail(format!("reading --mount-file {host}: {e}")))?;
    Ok(MountedFile {
        mount_path: path,
        file_content: base64::engine::general_purpose::STANDARD.encode(content),
        mode: None,
    })
}

/// `--volume name:/path:size`.
pub(crate) fn volume(spec: &str) -> Result<VolumeSpec, Failure> {
    let bad = || {
        fail(format!(
            "invalid --volume {spec:?}: expected NAME:/path:SIZE, e.g. scratch:/scratch:64Mi"
        ))
    };
    let (name, rest) = spec.split_once(':').ok_or_else(bad)?;
    let (path, size) = rest.rsplit_once(':').ok_or_else(bad)?;
    if name.is_empty() || path.is_empty() || size.is_empty() {
        return Err(bad());
    }
    Ok(VolumeSpec {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        size: size.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides() {
        assert_eq!(remote("web:/etc/x"), Some(("web", "/etc/x")));
        assert_eq!(remote("./web:/etc/x"), None);
        assert_eq!(remote("/tmp/a:b"), None);
        assert_eq!(remote("-"), None);
        assert_eq!(remote("web:rel"), None);
    }

    #[test]
    fn volumes() {
        let v = volume("scratch:/data:64Mi").expect("valid");
        assert_eq!(
            (v.name.as_str(), v.mount_path.as_str(), v.size.as_str()),
            ("scratch", "/data", "64Mi")
        );
        assert!(volume("scratch:/data").is_err());
        assert!(volume("scratch").is_err());
        assert_eq!(parse_octal("0644"), Ok(0o644));
        assert!(parse_octal("9").is_err());
    }
}
