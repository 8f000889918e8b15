//! Field paths of Update requests (`labels`, `labels.<key>`, `image`, …).
//!
//! containerd's update semantics: an empty mask replaces every updatable field; a path
//! `labels.<key>` sets or (with an empty / missing value) removes one label; `labels`
//! replaces all labels. Objects decide which top-level paths they accept.

use crate::labels::Labels;
use crate::{Error, Result};

/// One parsed path of an update mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldPath {
    /// `labels`: replace all labels.
    AllLabels,
    /// `labels.<key>`: set or remove one label.
    Label(String),
    /// Any other top-level field, validated by the object.
    Field(String),
}

impl FieldPath {
    pub fn parse(path: &str) -> FieldPath {
        match path.split_once('.') {
            Some(("labels", key)) => FieldPath::Label(key.to_string()),
            _ if path == "labels" => FieldPath::AllLabels,
            _ => FieldPath::Field(path.to_string()),
        }
    }
}

/// Applies the label part of an update to `current` from `requested`; returns the paths
/// that are not about labels so the caller can apply (or reject) them.
pub fn apply_labels(current: &mut Labels, requested: &Labels, paths: &[String]) -> Vec<String> {
    let mut others = Vec::new();
    for path in paths {
        match FieldPath::parse(path) {
            FieldPath::AllLabels => *current = requested.clone(),
            FieldPath::Label(key) => match requested.get(&key) {
                Some(value) if !value.is_empty() => {
                    current.insert(key, value.clone());
                }
                _ => {
                    current.remove(&key);
                }
            },
            FieldPath::Field(field) => others.push(field),
        }
    }
    others
}

/// The error for a path an object does not have, as containerd words it.
pub fn unsupported(object: &str, path: &str) -> Error {
    Error::invalid_argument(format!("cannot update {path:?} field on {object}"))
}

/// Rejects every path in `others` (for objects whose only updatable field is labels).
pub fn only_labels(object: &str, others: &[String]) -> Result<()> {
    match others.first() {
        Some(path) => Err(unsupported(object, path)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_paths_set_remove_and_replace() {
        let mut current: Labels = [("a".into(), "1".into()), ("b".into(), "2".into())].into();
        let requested: Labels = [("a".into(), "9".into())].into();
        let others = apply_labels(
            &mut current,
            &requested,
            &["labels.a".into(), "labels.b".into(), "image".into()],
        );
        assert_eq!(current, [("a".to_string(), "9".to_string())].into());
        assert_eq!(others, vec!["image".to_string()]);

        apply_labels(&mut current, &Labels::new(), &["labels".into()]);
        assert!(current.is_empty());
    }
}
