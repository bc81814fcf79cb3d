//! `resources` of a create request: quantities parsed into limits (the cgroup's hard limits) and requests
//! (cgroup weight and soft memory limit), and the metadata checks of a create (annotations, lifetime).
//!
//! The top-level `cpu`, `memory` and `pids` count as both request and limit (`pids` is a limit only).
//! `resources.limits.X` overrides the limit, `resources.requests.X` the request. A request without any
//! limit of its kind stands alone; a request above its limit is refused.

use std::collections::BTreeMap;

use sandbox_proto::{quantity, ApiError, ResourceLimits, ResourceValues, Resources};

/// Smallest memory limit accepted (below it a sandbox cannot even start its init).
const MIN_MEMORY_LIMIT: u64 = 4 << 20;
/// Longest annotation key.
const MAX_ANNOTATION_KEY: usize = 253;
/// Bound on all annotations together (keys and values).
const MAX_ANNOTATIONS_BYTES: usize = 256 << 10;
/// Longest lifetime accepted: ten years.
const MAX_LIFETIME_SECONDS: f64 = 315_360_000.0;

/// Parsed resources: hard limits and requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// Hard limits, written to the cgroup's limit files.
    pub limits: ResourceLimits,
    /// Requests (`pids` is never set): cgroup weight and soft memory limit.
    pub requests: ResourceLimits,
}

fn pids(field: &str, p: Option<i64>) -> Result<Option<u64>, ApiError> {
    match p {
        None => Ok(None),
        Some(p) if p >= 1 => Ok(Some(p as u64)),
        Some(p) => Err(ApiError::invalid_argument(
            field,
            format!("{field} must be at least 1, got {p}"),
        )),
    }
}

fn memory(field: &str, v: Option<&str>) -> Result<Option<u64>, ApiError> {
    v.map(|m| quantity::parse_memory(field, m)).transpose()
}

fn cpu(field: &str, v: Option<&str>) -> Result<Option<u64>, ApiError> {
    v.map(|c| quantity::parse_cpu(field, c)).transpose()
}

/// Parses `resources`; errors name the precise field (`resources.limits.memory`).
pub fn parse(r: &Resources) -> Result<Parsed, ApiError> {
    let empty = ResourceValues::default();
    let lim = r.limits.as_ref().unwrap_or(&empty);
    let req = r.requests.as_ref().unwrap_or(&empty);
    let top_memory = memory("resources.memory", r.memory.as_deref())?;
    let top_cpu = cpu("resources.cpu", r.cpu.as_deref())?;
    let top_pids = pids("resources.pids", r.pids)?;
    let lim_memory = memory("resources.limits.memory", lim.memory.as_deref())?;
    let lim_cpu = cpu("resources.limits.cpu", lim.cpu.as_deref())?;
    let lim_pids = pids("resources.limits.pids", lim.pids)?;
    let req_memory = memory("resources.requests.memory", req.memory.as_deref())?;
    let req_cpu = cpu("resources.requests.cpu", req.cpu.as_deref())?;
    if req.pids.is_some() {
        return Err(ApiError::invalid_argument(
            "resources.requests.pids",
            "pids is a limit only: use resources.pids or resources.limits.pids",
        ));
    }
    let limits = ResourceLimits {
        memory_bytes: lim_memory.or(top_memory),
        cpu_millis: lim_cpu.or(top_cpu),
        pids: lim_pids.or(top_pids),
    };
    let requests = ResourceLimits {
        memory_bytes: req_memory.or(top_memory),
        cpu_millis: req_cpu.or(top_cpu),
        pids: None,
    };
    if let Some(m) = limits.memory_bytes.filter(|m| *m < MIN_MEMORY_LIMIT) {
        let field = if lim_memory.is_some() {
            "resources.limits.memory"
        } else {
            "resources.memory"
        };
        return Err(ApiError::invalid_argument(
            field,
            format!("{field} must be at least 4Mi, got {m} bytes"),
        ));
    }
    if let (Some(rq), Some(l)) = (requests.memory_bytes, limits.memory_bytes) {
        if rq > l {
            return Err(ApiError::invalid_argument(
                "resources.requests.memory",
                format!("the memory request ({rq} bytes) exceeds the memory limit ({l} bytes)"),
            ));
        }
    }
    if let (Some(rq), Some(l)) = (requests.cpu_millis, limits.cpu_millis) {
        if rq > l {
            return Err(ApiError::invalid_argument(
                "resources.requests.cpu",
                format!("the cpu request ({rq}m) exceeds the cpu limit ({l}m)"),
            ));
        }
    }
    Ok(Parsed { limits, requests })
}

/// Checks annotations: keys non-empty, at most 253 bytes, no NUL; at most 256 KiB in all.
pub fn validate_annotations(a: &BTreeMap<String, String>) -> Result<(), ApiError> {
    let mut total = 0usize;
    for (k, v) in a {
        if k.is_empty() || k.len() > MAX_ANNOTATION_KEY {
            return Err(ApiError::invalid_argument(
                "annotations",
                format!(
                    "annotation keys must be 1-{MAX_ANNOTATION_KEY} bytes, got {} bytes",
                    k.len()
                ),
            ));
        }
        if k.contains('\0') || v.contains('\0') {
            return Err(ApiError::invalid_argument(
                "annotations",
                format!("annotation {k:?} contains a NUL character"),
            ));
        }
        total += k.len() + v.len();
    }
    if total > MAX_ANNOTATIONS_BYTES {
        return Err(ApiError::invalid_argument(
            "annotations",
            format!("annotations total {total} bytes; at most {MAX_ANNOTATIONS_BYTES} are allowed"),
        ));
    }
    Ok(())
}

/// Checks `max_lifetime_seconds`: finite, positive, at most ten years.
pub fn validate_lifetime(t: Option<f64>) -> Result<(), ApiError> {
    match t {
        Some(t) if !(t.is_finite() && t > 0.0 && t <= MAX_LIFETIME_SECONDS) => {
            Err(ApiError::invalid_argument(
                "max_lifetime_seconds",
                format!("max_lifetime_seconds must be a positive number of seconds (at most ten years), got {t}"),
            ))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(e: ApiError) -> String {
        assert_eq!(e.code, sandbox_proto::ErrorCode::InvalidArgument);
        e.details.expect("details")["field"]
            .as_str()
            .expect("field")
            .to_owned()
    }

    fn vals(cpu: Option<&str>, memory: Option<&str>) -> Option<ResourceValues> {
        Some(ResourceValues {
            cpu: cpu.map(str::to_owned),
            memory: memory.map(str::to_owned),
            pids: None,
        })
    }

    #[test]
    fn top_level_values_are_requests_and_limits() {
        let p = parse(&Resources {
            memory: Some("512Mi".into()),
            cpu: Some("500m".into()),
            pids: Some(10),
            ..Resources::default()
        })
        .unwrap();
        assert_eq!(p.limits.memory_bytes, Some(512 << 20));
        assert_eq!(p.limits.cpu_millis, Some(500));
        assert_eq!(p.limits.pids, Some(10));
        assert_eq!(p.requests.memory_bytes, Some(512 << 20));
        assert_eq!(p.requests.cpu_millis, Some(500));
        assert_eq!(p.requests.pids, None);
        assert_eq!(parse(&Resources::default()).unwrap(), Parsed::default());
    }

    #[test]
    fn requests_and_limits_apart() {
        let p = parse(&Resources {
            cpu: Some("2".into()),
            requests: vals(Some("0.5"), Some("1G")),
            limits: vals(None, Some("2Gi")),
            ..Resources::default()
        })
        .unwrap();
        assert_eq!(p.limits.cpu_millis, Some(2000));
        assert_eq!(p.limits.memory_bytes, Some(2 << 30));
        assert_eq!(p.requests.cpu_millis, Some(500));
        assert_eq!(p.requests.memory_bytes, Some(1_000_000_000));
        // A request alone.
        let p = parse(&Resources {
            requests: vals(Some("250m"), None),
            ..Resources::default()
        })
        .unwrap();
        assert_eq!(p.requests.cpu_millis, Some(250));
        assert!(p.limits.is_empty());
    }

    #[test]
    fn bad_values_name_their_field() {
        let f = |r: Resources| field(parse(&r).unwrap_err());
        assert_eq!(
            f(Resources {
                limits: vals(None, Some("12Qi")),
                ..Resources::default()
            }),
            "resources.limits.memory"
        );
        assert_eq!(
            f(Resources {
                requests: vals(Some("lots"), None),
                ..Resources::default()
            }),
            "resources.requests.cpu"
        );
        assert_eq!(
            f(Resources {
                cpu: Some("-1".into()),
                ..Resources::default()
            }),
            "resources.cpu"
        );
        assert_eq!(
            f(Resources {
                requests: vals(None, Some("2Gi")),
                limits: vals(None, Some("1Gi")),
                ..Resources::default()
            }),
            "resources.requests.memory"
        );
        assert_eq!(
            f(Resources {
                cpu: Some("1".into()),
                requests: vals(Some("2"), None),
                ..Resources::default()
            }),
            "resources.requests.cpu"
        );
        assert_eq!(
            f(Resources {
                limits: vals(None, Some("1Mi")),
                ..Resources::default()
            }),
            "resources.limits.memory"
        );
        assert_eq!(
            f(Resources {
                requests: Some(ResourceValues {
                    pids: Some(3),
                    ..ResourceValues::default()
                }),
                ..Resources::default()
            }),
            "resources.requests.pids"
        );
        assert_eq!(
            f(Resources {
                limits: Some(ResourceValues {
                    pids: Some(0),
                    ..ResourceValues::default()
                }),
                ..Resources::default()
            }),
            "resources.limits.pids"
        );
    }

    #[test]
    fn annotations_and_lifetimes() {
        let mut a = BTreeMap::from([("team".to_owned(), "ml".to_owned())]);
        validate_annotations(&a).unwrap();
        a.insert(String::new(), "x".into());
        assert_eq!(field(validate_annotations(&a).unwrap_err()), "annotations");
        let a = BTreeMap::from([("k".repeat(254), String::new())]);
        assert!(validate_annotations(&a).is_err());
        let a = BTreeMap::from([("big".to_owned(), "v".repeat(256 << 10))]);
        assert!(validate_annotations(&a).is_err());
        validate_lifetime(None).unwrap();
        validate_lifetime(Some(0.5)).unwrap();
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e12] {
            assert_eq!(
                field(validate_lifetime(Some(bad)).unwrap_err()),
                "max_lifetime_seconds"
            );
        }
    }
}
