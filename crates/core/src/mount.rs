//! A mount as snapshotters describe it and the API carries it: containerd's `Mount`
//! (`type`, `source`, `target`, `options`). Performing mounts is the job of
//! `berth-snapshots::mount`; this type is only the description.

/// One mount of a snapshot's file system, in containerd's form: `type` is a file-system
/// type (`overlay`, `ext4`) or `bind`; `options` are fstab-style (`ro`, `rbind`,
/// `lowerdir=…`), mapped to flags and data at mount time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mount {
    pub r#type: String,
    pub source: String,
    /// A sub-path inside the mount point (used when several mounts stack); usually empty.
    pub target: String,
    pub options: Vec<String>,
}

impl Mount {
    /// A bind mount of `source`, read-only when `readonly`.
    pub fn bind(source: impl Into<String>, readonly: bool) -> Mount {
        Mount {
            r#type: "bind".into(),
            source: source.into(),
            target: String::new(),
            options: vec![if readonly { "ro" } else { "rw" }.into(), "rbind".into()],
        }
    }

    /// Whether the options make this mount read-only.
    pub fn is_readonly(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }

    /// The value of a `key=value` option (the last one if repeated).
    pub fn option(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find_map(|o| o.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_read_by_key() {
        let m = Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec!["upperdir=/u".into(), "lowerdir=/a:/b".into()],
        };
        assert_eq!(m.option("lowerdir"), Some("/a:/b"));
        assert_eq!(m.option("upper"), None);
        assert!(!m.is_readonly());
        assert!(Mount::bind("/x", true).is_readonly());
    }
}
