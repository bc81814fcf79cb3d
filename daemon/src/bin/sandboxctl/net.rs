//! Network flags of `sandboxctl run`: `-p`, `--network`, `--egress-allow`, `--allow-ingress`.

use sandbox_proto::{EgressRule, NetworkOptions, ServiceSpec};

use super::Failure;

fn fail(msg: String) -> Failure {
    Failure::new(1, anyhow::anyhow!(msg))
}

/// `-p [HOST_IP:][HOST_PORT:]PORT[/tcp|/udp]` (Docker's form; a missing host port is one the kernel picks).
pub(crate) fn publish(spec: &str) -> Result<ServiceSpec, Failure> {
    let bad = |why: &str| {
        fail(format!(
            "invalid -p {spec:?}: {why}; expected [HOST_IP:][HOST_PORT:]PORT[/tcp|/udp], e.g. 127.0.0.1:8080:8000"
        ))
    };
    let (ports, proto) = match spec.rsplit_once('/') {
        Some((p, proto)) => (p, Some(proto.to_ascii_lowercase())),
        None => (spec, None),
    };
    let parts: Vec<&str> = ports.split(':').collect();
    let num = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| bad(&format!("{s:?} is not a port")))
    };
    let (host_ip, host_port, port) = match parts.as_slice() {
        [p] => (None, None, num(p)?),
        [h, p] => (None, Some(num(h)?), num(p)?),
        [ip, h, p] => (
            Some((*ip).to_owned()),
            if h.is_empty() { None } else { Some(num(h)?) },
            num(p)?,
        ),
        _ => return Err(bad("too many ':'")),
    };
    Ok(ServiceSpec {
        port,
        protocol: proto,
        host_port,
        host_ip,
    })
}

/// `--egress-allow CIDR[:PORT[,PORT...]][/tcp|/udp]`.
pub(crate) fn egress_rule(spec: &str) -> Result<EgressRule, Failure> {
    let (rest, proto) = match spec.rsplit_once('/') {
        // A CIDR has a '/' too: only a protocol name after the last one is a protocol.
        Some((r, p)) if p.chars().all(|c| c.is_ascii_alphabetic()) && !p.is_empty() => {
            (r, Some(p.to_ascii_lowercase()))
        }
        _ => (spec, None),
    };
    let (cidr, ports) = match rest.split_once(':') {
        Some((c, p)) => (c, p),
        None => (rest, ""),
    };
    let ports = ports
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u32>().map_err(|_| {
                fail(format!(
                    "invalid --egress-allow {spec:?}: {p:?} is not a port; expected CIDR[:PORT[,PORT]][/tcp|/udp]"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if cidr.is_empty() {
        return Err(fail(format!(
            "invalid --egress-allow {spec:?}: expected CIDR[:PORT[,PORT]][/tcp|/udp]"
        )));
    }
    Ok(EgressRule {
        cidr: Some(cidr.to_owned()),
        dns_name: None,
        ports,
        protocol: proto,
    })
}

/// The request's network options from the flags (None when all are defaults).
pub(crate) fn options(
    network: Option<&str>,
    egress: &[String],
    allow_ingress: bool,
) -> Result<Option<NetworkOptions>, Failure> {
    let deny_egress = match network {
        None | Some("bridge") => false,
        Some("none") => true,
        Some(other) => {
            return Err(fail(format!(
                "invalid --network {other:?}: bridge (default) or none (no egress)"
            )))
        }
    };
    let egress = egress
        .iter()
        .map(|e| egress_rule(e))
        .collect::<Result<Vec<_>, _>>()?;
    if !deny_egress && egress.is_empty() && !allow_ingress {
        return Ok(None);
    }
    Ok(Some(NetworkOptions {
        deny_egress,
        deny_ingress: !allow_ingress,
        egress,
        session_peers: false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_forms() {
        let p = publish("127.0.0.1:8080:8000").expect("full");
        assert_eq!(
            (p.host_ip.as_deref(), p.host_port, p.port, p.protocol),
            (Some("127.0.0.1"), Some(8080), 8000, None)
        );
        let p = publish("8080:8000/udp").expect("no ip");
        assert_eq!(
            (p.host_ip, p.host_port, p.port, p.protocol.as_deref()),
            (None, Some(8080), 8000, Some("udp"))
        );
        let p = publish("8000").expect("port only");
        assert_eq!((p.host_port, p.port), (None, 8000));
        let p = publish("127.0.0.1::8000").expect("ephemeral host port");
        assert_eq!(
            (p.host_ip.as_deref(), p.host_port),
            (Some("127.0.0.1"), None)
        );
        assert!(publish("a:b").is_err());
        assert!(publish("1:2:3:4").is_err());
    }

    #[test]
    fn egress_forms() {
        let r = egress_rule("10.0.0.0/8:443").expect("cidr port");
        assert_eq!(
            (r.cidr.as_deref(), r.ports.as_slice(), r.protocol),
            (Some("10.0.0.0/8"), &[443u32][..], None)
        );
        let r = egress_rule("10.0.0.0/8:53,5353/udp").expect("ports proto");
        assert_eq!(
            (r.ports.as_slice(), r.protocol.as_deref()),
            (&[53u32, 5353][..], Some("udp"))
        );
        let r = egress_rule("192.0.2.7").expect("address");
        assert_eq!((r.cidr.as_deref(), r.ports.len()), (Some("192.0.2.7"), 0));
        assert!(egress_rule("10.0.0.0/8:http").is_err());
        assert!(options(Some("host"), &[], false).is_err());
        assert_eq!(options(None, &[], false).expect("none"), None);
        assert!(
            options(Some("none"), &[], false)
                .expect("deny")
                .expect("some")
                .deny_egress
        );
    }
}
