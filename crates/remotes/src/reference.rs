//! Image references: `host[:port]/path[:tag][@digest]`.
//!
//! [`Reference::parse`] is containerd's strict form (the first component is always the
//! registry host, as `ctr` expects); [`Reference::parse_normalized`] is the familiar
//! Docker form (`busybox` → `docker.io/library/busybox:latest`) the `berth` CLI accepts.

use berth_core::content::Digest;
use berth_core::{Error, Result};
use std::fmt;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry host as written (`docker.io`, `localhost:5000`, `[::1]:5000`).
    pub host: String,
    /// Repository path inside the registry (`library/busybox`).
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

fn valid_path_component(c: &str) -> bool {
    // distribution's path-component grammar: [a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*
    if c.is_empty() {
        return false;
    }
    let b = c.as_bytes();
    if !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    c.bytes()
        .all(|x| x.is_ascii_lowercase() || x.is_ascii_digit() || matches!(x, b'.' | b'_' | b'-'))
}

fn valid_tag(t: &str) -> bool {
    // [\w][\w.-]{0,127}
    !t.is_empty()
        && t.len() <= 128
        && (t.as_bytes()[0].is_ascii_alphanumeric() || t.as_bytes()[0] == b'_')
        && t.bytes()
            .all(|x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
}

fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|x| x.is_ascii_alphanumeric() || b".-:[]_".contains(&x))
}

impl Reference {
    /// Parses a fully qualified reference (`host/path[:tag][@digest]`).
    pub fn parse(s: &str) -> Result<Reference> {
        let invalid = |why: &str| Error::invalid_argument(format!("reference {s:?}: {why}"));
        if s.is_empty() || s.len() > 4096 {
            return Err(invalid("invalid length"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (
                r,
                Some(Digest::parse(d).map_err(|e| e.context(format!("reference {s:?}")))?),
            ),
            None => (s, None),
        };
        let (locator, tag) = match rest.rfind(':') {
            Some(i) if !rest[i + 1..].contains('/') => {
                (&rest[..i], Some(rest[i + 1..].to_string()))
            }
            _ => (rest, None),
        };
        if let Some(t) = &tag
            && !valid_tag(t)
        {
            return Err(invalid("invalid tag"));
        }
        let Some((host, repository)) = locator.split_once('/') else {
            return Err(invalid("object required (expected host/repository)"));
        };
        if !valid_host(host) {
            return Err(invalid("invalid registry host"));
        }
        if !repository.split('/').all(valid_path_component) {
            return Err(invalid(
                "invalid repository name (lowercase letters, digits and separators)",
            ));
        }
        Ok(Reference {
            host: host.to_string(),
            repository: repository.to_string(),
            tag,
            digest,
        })
    }

    /// Parses a Docker-style reference: a missing registry means `docker.io`, a one-part
    /// Docker Hub name gets `library/`, a missing tag and digest means `:latest`.
    pub fn parse_normalized(s: &str) -> Result<Reference> {
        let first = s.split('/').next().unwrap_or_default();
        let has_host = s.contains('/')
            && (first.contains('.')
                || first.contains(':')
                || first == "localhost"
                || first.starts_with('['));
        let full = if has_host {
            s.to_string()
        } else if s.contains('/') {
            format!("docker.io/{s}")
        } else {
            format!("docker.io/library/{s}")
        };
        let mut r = Reference::parse(&full)?;
        if r.host == "index.docker.io" {
            r.host = "docker.io".into();
        }
        if r.host == "docker.io" && !r.repository.contains('/') {
            r.repository = format!("library/{}", r.repository);
        }
        if r.tag.is_none() && r.digest.is_none() {
            r.tag = Some("latest".into());
        }
        Ok(r)
    }

    /// `host/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.host, self.repository)
    }

    /// The key of the content label naming the repositories a blob came from on this
    /// registry: `containerd.io/distribution.source.<host>`, where the host is Go's
    /// `url.Hostname()` of it, as containerd writes and reads the label — without the
    /// port and without IPv6 brackets (`localhost:5000` → `…source.localhost`).
    pub fn distribution_source_label(&self) -> String {
        format!(
            "{DISTRIBUTION_SOURCE_PREFIX}.{}",
            hostname_without_port(&self.host)
        )
    }

    /// The key Berth wrote before it matched containerd (the host with its port), still
    /// read by pushes for blobs pulled then.
    pub fn legacy_distribution_source_label(&self) -> String {
        format!("{DISTRIBUTION_SOURCE_PREFIX}.{}", self.host)
    }

    /// What to ask the registry's manifests endpoint for: the digest if any, else the tag.
    pub fn object(&self) -> Option<String> {
        self.digest
            .as_ref()
            .map(|d| d.to_string())
            .or_else(|| self.tag.clone())
    }
}

/// The prefix of the content labels recording where a blob was pulled from.
pub const DISTRIBUTION_SOURCE_PREFIX: &str = "containerd.io/distribution.source";

/// Go's `url.Hostname()` of a registry host: `[::1]:5000` → `::1`, `host:5000` → `host`.
fn hostname_without_port(host: &str) -> &str {
    if let Some(bracketed) = host.strip_prefix('[') {
        return bracketed.split(']').next().unwrap_or(bracketed);
    }
    host.split(':').next().unwrap_or(host)
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Whether `host` (with an optional port) names this machine: `localhost`, `127.*`, `::1`.
pub fn is_localhost(host: &str) -> bool {
    let h = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') => h,
            _ => host,
        }
    };
    h == "localhost"
        || h == "::1"
        || h.parse::<std::net::Ipv4Addr>()
            .map(|a| a.is_loopback())
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distribution_source_labels_name_the_host_as_go_url_hostname_does() {
        for (reference, host) in [
            ("docker.io/library/busybox:1", "docker.io"),
            ("localhost:5000/a/b:v1", "localhost"),
            ("127.0.0.1:5080/x", "127.0.0.1"),
            ("[::1]:5000/x", "::1"),
            ("registry.example:443/x", "registry.example"),
        ] {
            let r = Reference::parse(reference).unwrap();
            assert_eq!(
                r.distribution_source_label(),
                format!("containerd.io/distribution.source.{host}"),
                "{reference}"
            );
        }
        let r = Reference::parse("localhost:5000/a").unwrap();
        assert_eq!(
            r.legacy_distribution_source_label(),
            "containerd.io/distribution.source.localhost:5000"
        );
    }

    #[test]
    fn strict_and_normalized() {
        let r = Reference::parse("localhost:5000/a/b:v1").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str()),
            ("localhost:5000", "a/b")
        );
        assert_eq!(r.tag.as_deref(), Some("v1"));
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("h.io/x@{d}")).unwrap();
        assert_eq!(r.object().unwrap(), d);
        assert!(Reference::parse("busybox").is_err());
        assert!(Reference::parse("h.io/UPPER").is_err());
        let n = Reference::parse_normalized("busybox").unwrap();
        assert_eq!(n.to_string(), "docker.io/library/busybox:latest");
        let n = Reference::parse_normalized("user/app:1").unwrap();
        assert_eq!(n.to_string(), "docker.io/user/app:1");
        let n = Reference::parse_normalized("localhost:5000/app").unwrap();
        assert_eq!(n.to_string(), "localhost:5000/app:latest");
        assert!(is_localhost("localhost:5000"));
        assert!(is_localhost("127.0.0.1:1"));
        assert!(is_localhost("[::1]:5000"));
        assert!(!is_localhost("example.com:5000"));
    }
}
