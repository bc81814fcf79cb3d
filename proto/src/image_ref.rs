//! Image references, normalised the way Docker does: `python:3.11` is
//! `docker.io/library/python:3.11`.

use crate::error::{ApiError, ErrorCode};

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// Registry host (with port), e.g. `docker.io`, `127.0.0.1:5000`.
    pub registry: String,
    /// Repository path, e.g. `library/python`.
    pub repository: String,
    /// Tag, when no digest was given or alongside it (default `latest` without a digest).
    pub tag: Option<String>,
    /// `sha256:<64 hex>` when pinned.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses and normalises a reference.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let bad = |why: &str| {
            ApiError::new(
                ErrorCode::InvalidArgument,
                format!("invalid image reference {s:?}: {why}"),
            )
            .with_details(serde_json::json!({ "field": "image" }))
        };
        if s.is_empty() || s.len() > 512 {
            return Err(bad("must be 1 to 512 characters"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("only sha256 digests are supported"))?;
                if hex.len() != 64
                    || !hex
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                {
                    return Err(bad(
                        "digest must be sha256: followed by 64 lowercase hex characters",
                    ));
                }
                (r, Some(d.to_owned()))
            }
            None => (s, None),
        };
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (
                &rest[..last_slash + i],
                Some(rest[last_slash + i + 1..].to_owned()),
            ),
            None => (rest, None),
        };
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
                && !t.starts_with(['.', '-']);
            if !ok {
                return Err(bad("tag must be [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_owned(), path.to_owned())
            }
            _ => ("docker.io".to_owned(), name.to_owned()),
        };
        let registry = if registry == "index.docker.io" || registry == "registry-1.docker.io" {
            "docker.io".to_owned()
        } else {
            registry
        };
        let repository = if registry == "docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
        };
        if !repository.split('/').all(component_ok) {
            return Err(bad(
                "repository path components must be lowercase [a-z0-9] separated by . _ or -",
            ));
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_owned()),
            _ => tag,
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The canonical string: `registry/repository[:tag][@digest]`.
    pub fn canonical(&self) -> String {
        let mut s = format!("{}/{}", self.registry, self.repository);
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d);
        }
        s
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.canonical())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_normalisation() {
        let c = |s: &str| ImageRef::parse(s).unwrap().canonical();
        assert_eq!(c("python:3.11"), "docker.io/library/python:3.11");
        assert_eq!(c("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(c("library/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(c("user/app:v1"), "docker.io/user/app:v1");
        assert_eq!(
            c("index.docker.io/library/python:3.11"),
            "docker.io/library/python:3.11"
        );
        assert_eq!(c("127.0.0.1:5000/busybox"), "127.0.0.1:5000/busybox:latest");
        assert_eq!(c("localhost/x:y"), "localhost/x:y");
        assert_eq!(c("ghcr.io/a/b/c:1.0"), "ghcr.io/a/b/c:1.0");
        let d = format!("busybox@sha256:{}", "a".repeat(64));
        assert_eq!(
            c(&d),
            format!("docker.io/library/busybox@sha256:{}", "a".repeat(64))
        );
    }

    #[test]
    fn rejects_bad() {
        for s in [
            "",
            "UPPER",
            "a:",
            "a@sha256:xyz",
            "a@md5:00",
            "a:-x",
            "a//b",
            "-a",
        ] {
            assert!(ImageRef::parse(s).is_err(), "{s}");
        }
    }
}
