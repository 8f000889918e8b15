//! Platforms (`os/arch[/variant]`) and the matching used to pick a manifest from an index.

use berth_core::{Error, Result};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: String,
}

/// Normalizes architecture names and arm variants the way containerd's `platforms` does.
fn normalize_arch(arch: &str, variant: &str) -> (String, String) {
    let a = arch.to_ascii_lowercase();
    let v = variant.to_ascii_lowercase();
    match a.as_str() {
        "i386" => ("386".into(), String::new()),
        "x86_64" | "x86-64" | "amd64" => {
            ("amd64".into(), if v == "v1" { String::new() } else { v })
        }
        "aarch64" | "arm64" => (
            "arm64".into(),
            if v == "8" || v == "v8" {
                String::new()
            } else {
                v
            },
        ),
        "armhf" => ("arm".into(), "v7".into()),
        "armel" => ("arm".into(), "v6".into()),
        "arm" => (
            "arm".into(),
            match v.as_str() {
                "" | "7" => "v7".into(),
                "5" | "6" | "8" => format!("v{v}"),
                _ => v,
            },
        ),
        _ => (a, v),
    }
}

impl Platform {
    pub fn new(os: &str, arch: &str, variant: &str) -> Platform {
        let (architecture, variant) = normalize_arch(arch, variant);
        Platform {
            os: os.to_ascii_lowercase(),
            architecture,
            variant,
        }
    }

    /// The platform this binary runs on.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform::new(std::env::consts::OS, arch, "")
    }

    /// Parses `os[/arch[/variant]]` (or a bare architecture, meaning the host's OS).
    pub fn parse(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        let bad = || Error::invalid_argument(format!("platform {s:?}: expected os/arch[/variant]"));
        if parts.iter().any(|p| p.is_empty()) || parts.len() > 3 {
            return Err(bad());
        }
        let known_os = ["linux", "windows", "darwin", "freebsd"];
        match parts.as_slice() {
            [one] if known_os.contains(one) => {
                let h = Platform::host();
                Ok(Platform::new(one, &h.architecture, &h.variant))
            }
            [arch] => Ok(Platform::new(std::env::consts::OS, arch, "")),
            [os, arch] => Ok(Platform::new(os, arch, "")),
            [os, arch, variant] => Ok(Platform::new(os, arch, variant)),
            _ => Err(bad()),
        }
    }

    /// How well `other` serves a request for `self`: `None` if it does not, lower is
    /// better. An arm/v7 host also runs v6 and v5 images (in that order of preference);
    /// an empty variant on either side matches any.
    pub fn match_rank(&self, other: &Platform) -> Option<usize> {
        let o = Platform::new(&other.os, &other.architecture, &other.variant);
        if o.os != self.os || o.architecture != self.architecture {
            return None;
        }
        if self.variant.is_empty() || o.variant.is_empty() || o.variant == self.variant {
            return Some(if o.variant == self.variant { 0 } else { 1 });
        }
        if self.architecture == "arm" {
            let order = ["v8", "v7", "v6", "v5"];
            let want = order.iter().position(|v| *v == self.variant)?;
            let have = order.iter().position(|v| *v == o.variant)?;
            if have >= want {
                return Some(1 + have - want);
            }
        }
        if self.architecture == "amd64" {
            // amd64/v3 hosts run v2 and v1 images.
            let lvl = |v: &str| v.trim_start_matches('v').parse::<u32>().ok();
            if let (Some(w), Some(h)) = (lvl(&self.variant), lvl(&o.variant))
                && h <= w
            {
                return Some(1 + (w - h) as usize);
            }
        }
        None
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if !self.variant.is_empty() {
            write!(f, "/{}", self.variant)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        let amd = Platform::parse("linux/amd64").unwrap();
        assert_eq!(
            amd.match_rank(&Platform::new("linux", "x86_64", "")),
            Some(0)
        );
        assert!(
            amd.match_rank(&Platform::new("linux", "arm64", ""))
                .is_none()
        );
        let arm7 = Platform::parse("linux/arm/v7").unwrap();
        assert_eq!(
            arm7.match_rank(&Platform::new("linux", "arm", "v7")),
            Some(0)
        );
        assert_eq!(
            arm7.match_rank(&Platform::new("linux", "arm", "v6")),
            Some(2)
        );
        assert!(
            arm7.match_rank(&Platform::new("linux", "arm", "v8"))
                .is_none()
        );
        let a64 = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(a64.variant, "");
        assert_eq!(
            a64.match_rank(&Platform::new("linux", "aarch64", "v8")),
            Some(0)
        );
        assert!(Platform::parse("linux//x").is_err());
    }
}
