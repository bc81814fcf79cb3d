//! Parsing of Kubernetes-style resource quantities (`"512Mi"`, `"1G"`, `"500m"`, `"0.5"`).

use crate::error::ApiError;

/// Parses a memory quantity into bytes: a plain integer, or a number with one of the suffixes
/// `k K M G T P E` (powers of 1000) or `Ki Mi Gi Ti Pi Ei` (powers of 1024). Fractions are allowed
/// (`"1.5Gi"`); the result is rounded down to a whole byte and must be at least 1.
pub fn parse_memory(field: &str, s: &str) -> Result<u64, ApiError> {
    let bad = || {
        ApiError::invalid_argument(
            field,
            format!("invalid memory quantity {s:?}: expected a number with an optional suffix Ki, Mi, Gi, Ti, k, M, G or T (e.g. \"256Mi\")"),
        )
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') {
        return Err(bad());
    }
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => return Err(bad()),
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    let bytes = v * mult;
    if !bytes.is_finite() || !(1.0..=9.2e18).contains(&bytes) {
        return Err(ApiError::invalid_argument(
            field,
            format!("memory quantity {s:?} is out of range (1 byte to 8 EiB)"),
        ));
    }
    Ok(bytes as u64)
}

/// Parses a CPU quantity into millicores: `"2"` (cores), `"0.5"`, or `"500m"`. Must be at least 1m.
pub fn parse_cpu(field: &str, s: &str) -> Result<u64, ApiError> {
    let bad = || {
        ApiError::invalid_argument(
            field,
            format!("invalid cpu quantity {s:?}: expected cores (\"0.5\", \"2\") or millicores (\"500m\")"),
        )
    };
    let t = s.trim();
    let (num, milli) = match t.strip_suffix('m') {
        Some(n) => (n, true),
        None => (t, false),
    };
    if num.is_empty()
        || !num.chars().all(|c| c.is_ascii_digit() || c == '.')
        || num.starts_with('.')
    {
        return Err(bad());
    }
    let v: f64 = num.parse().map_err(|_| bad())?;
    let m = if milli { v } else { v * 1000.0 };
    if !m.is_finite() || m.round() < 1.0 || m > 1e9 {
        return Err(ApiError::invalid_argument(
            field,
            format!("cpu quantity {s:?} is out of range (1m to 1000000 cores)"),
        ));
    }
    Ok(m.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory() {
        assert_eq!(parse_memory("m", "256Mi").unwrap(), 256 << 20);
        assert_eq!(parse_memory("m", "1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_memory("m", "1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_memory("m", "4096").unwrap(), 4096);
        for bad in ["12Qi", "", "Mi", "-1Mi", "1.Mi", "0", "1 Mi", "1mi"] {
            let e = parse_memory("resources.memory", bad).unwrap_err();
            assert_eq!(e.code, crate::ErrorCode::InvalidArgument, "{bad}");
            assert_eq!(e.details.unwrap()["field"], "resources.memory");
        }
    }

    #[test]
    fn cpu() {
        assert_eq!(parse_cpu("c", "0.5").unwrap(), 500);
        assert_eq!(parse_cpu("c", "500m").unwrap(), 500);
        assert_eq!(parse_cpu("c", "2").unwrap(), 2000);
        for bad in ["", "m", "-1", "0", "0.0001", "1core", "x"] {
            assert!(parse_cpu("c", bad).is_err(), "{bad}");
        }
    }
}
