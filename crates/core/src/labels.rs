//! Label rules shared by every object that carries labels.

use crate::{Error, Result};
use std::collections::HashMap;

/// containerd bounds each key+value pair to 4 KiB.
pub const MAX_LABEL_SIZE: usize = 4096;

pub type Labels = HashMap<String, String>;

/// Well-known label keys.
pub const GC_ROOT: &str = "containerd.io/gc.root";
pub const GC_EXPIRE: &str = "containerd.io/gc.expire";
pub const GC_FLAT: &str = "containerd.io/gc.flat";
pub const GC_REF_CONTENT: &str = "containerd.io/gc.ref.content";
pub const GC_REF_SNAPSHOT: &str = "containerd.io/gc.ref.snapshot";
pub const UNCOMPRESSED: &str = "containerd.io/uncompressed";

pub fn validate(key: &str, value: &str) -> Result<()> {
    if key.len() + value.len() > MAX_LABEL_SIZE {
        let short: String = key.chars().take(10).collect();
        return Err(Error::invalid_argument(format!(
            "label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), key: {short}"
        )));
    }
    Ok(())
}

pub fn validate_all(labels: &Labels) -> Result<()> {
    labels.iter().try_for_each(|(k, v)| validate(k, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_label_size() {
        validate("a", "b").unwrap();
        validate("k", &"v".repeat(MAX_LABEL_SIZE - 1)).unwrap();
        assert!(validate("k", &"v".repeat(MAX_LABEL_SIZE)).is_err());
    }
}
