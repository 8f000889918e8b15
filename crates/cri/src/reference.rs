//! Image references as containerd's CRI reads them: Docker's `ParseDockerRef`
//! (`busybox` → `docker.io/library/busybox:latest`; a reference with a tag and a digest
//! keeps only the digest) and the names a pull records.

use berth_core::{Error, Result};
use berth_remotes::Reference;

/// Docker's `ParseDockerRef`: the familiar form made fully qualified.
pub fn normalize(reference: &str) -> Result<Reference> {
    let invalid = |why: &str| Error::invalid_argument(format!("reference {reference:?}: {why}"));
    if reference.is_empty() {
        return Err(invalid("invalid reference format"));
    }
    if reference.len() == 64 && reference.bytes().all(|b| b.is_ascii_hexdigit()) {
        // Docker refuses a bare image ID as a repository name.
        return Err(invalid(
            "invalid repository name (cannot specify 64-byte hexadecimal strings)",
        ));
    }
    let mut parsed = Reference::parse_normalized(reference)?;
    if parsed.digest.is_some() {
        parsed.tag = None;
    }
    Ok(parsed)
}

/// The records containerd's CRI adds for a pulled reference: its tag name (none for a
/// digest reference) and `repo@<manifest digest>` (the reference itself when it is one).
pub fn repo_digest_and_tag(reference: &Reference, target_digest: &str) -> (String, Option<String>) {
    let tag = reference.tag.as_ref().map(|_| reference.to_string());
    let digest = match &reference.digest {
        Some(_) => reference.to_string(),
        None => format!("{}@{target_digest}", reference.name()),
    };
    (digest, tag)
}

/// Splits an image's record names into CRI's `repo_tags` and `repo_digests`, as
/// containerd's `parseImageReferences`: the image-ID record and anything unparsable
/// belong to neither.
pub fn split_references(names: &[String]) -> (Vec<String>, Vec<String>) {
    let (mut tags, mut digests) = (vec![], vec![]);
    for name in names {
        let Ok(parsed) = Reference::parse(name) else {
            continue;
        };
        if parsed.digest.is_some() {
            digests.push(parsed.to_string());
        } else if parsed.tag.is_some() {
            tags.push(parsed.to_string());
        }
    }
    (tags, digests)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    #[test]
    fn references_normalise_as_docker() {
        for (given, want) in [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("library/busybox", "docker.io/library/busybox:latest"),
            ("docker.io/busybox", "docker.io/library/busybox:latest"),
            ("user/app", "docker.io/user/app:latest"),
            ("host:5000/x", "host:5000/x:latest"),
            ("localhost/x:1", "localhost/x:1"),
        ] {
            assert_eq!(normalize(given).unwrap().to_string(), want, "{given}");
        }
        let with_both = normalize(&format!("busybox:1@{DIGEST}")).unwrap();
        assert_eq!(
            with_both.to_string(),
            format!("docker.io/library/busybox@{DIGEST}")
        );
        for bad in ["", "UPPER", "a b", "x:", &DIGEST[7..], "busybox@sha256:12"] {
            let err = normalize(bad).unwrap_err();
            assert!(
                err.is(berth_core::error::ErrorKind::InvalidArgument),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn pull_records_and_their_split() {
        let tagged = normalize("busybox").unwrap();
        let (digest, tag) = repo_digest_and_tag(&tagged, DIGEST);
        assert_eq!(digest, format!("docker.io/library/busybox@{DIGEST}"));
        assert_eq!(tag.as_deref(), Some("docker.io/library/busybox:latest"));
        let pinned = normalize(&format!("busybox@{DIGEST}")).unwrap();
        let (digest, tag) = repo_digest_and_tag(&pinned, "sha256:ignored");
        assert_eq!(digest, format!("docker.io/library/busybox@{DIGEST}"));
        assert!(tag.is_none());

        let names = vec![
            DIGEST.to_string(),
            "docker.io/library/busybox:latest".to_string(),
            format!("docker.io/library/busybox@{DIGEST}"),
        ];
        let (tags, digests) = split_references(&names);
        assert_eq!(tags, ["docker.io/library/busybox:latest"]);
        assert_eq!(digests, [format!("docker.io/library/busybox@{DIGEST}")]);
    }
}
