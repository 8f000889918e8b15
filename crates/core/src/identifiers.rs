//! Identifier validation with containerd's rules and messages: namespaces, containers,
//! snapshots and leases all use it.

use crate::{Error, Result};

const MAX_LENGTH: usize = 76;
/// containerd's rule, quoted in error messages as containerd quotes it.
const PATTERN: &str = r"^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$";

/// [`PATTERN`] checked by hand: every request carries a namespace, and compiling a regex
/// for it would keep the regex engine's code and tables resident in an idle daemon.
fn matches_pattern(id: &str) -> bool {
    id.split(['.', '_', '-'])
        .all(|run| !run.is_empty() && run.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Accepts alphanumerics separated by single `.`, `_` or `-`, at most 76 characters.
pub fn validate(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid_argument("identifier must not be empty"));
    }
    if id.len() > MAX_LENGTH {
        return Err(Error::invalid_argument(format!(
            "identifier {id:?} greater than maximum length ({MAX_LENGTH} characters)"
        )));
    }
    if !matches_pattern(id) {
        return Err(Error::invalid_argument(format!(
            "identifier {id:?} must match {PATTERN}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn accepts_containerd_identifiers() {
        for id in [
            "default",
            "k8s.io",
            "a-b_c.d",
            "A1",
            "x".repeat(76).as_str(),
        ] {
            validate(id).unwrap_or_else(|e| panic!("{id}: {e}"));
        }
    }

    #[test]
    fn rejects_bad_identifiers_as_invalid_argument() {
        for id in [
            "",
            "-a",
            "a-",
            "a..b",
            "a/b",
            "../x",
            "a b",
            "é",
            "x".repeat(77).as_str(),
            "a.-b",
            "_a",
            "a\n",
        ] {
            let err = validate(id).expect_err(id);
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{id}");
        }
    }
}
