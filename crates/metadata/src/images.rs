//! Image records (`images` table, `"{ns}/{name}"`), as containerd's `metadata/images.go`.

use crate::MetadataStore;
use crate::db::{get_json, to_json};
use crate::util::{Table, e, nanos, open_read, time};
use berth_core::content::{Descriptor, Digest, check_map};
use berth_core::filters::Filter;
use berth_core::labels::{self, Labels};
use berth_core::{Error, Result};
use redb::{ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::SystemTime;

pub(crate) const IMAGES: Table = Table::new("images");

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub name: String,
    pub labels: Labels,
    pub target: Descriptor,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ImageRecord {
    #[serde(default)]
    pub labels: Labels,
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    pub created_at: u64,
    pub updated_at: u64,
}

impl ImageRecord {
    fn image(self, name: &str) -> Image {
        Image {
            name: name.to_string(),
            labels: self.labels,
            target: Descriptor {
                media_type: self.media_type,
                digest: self.digest,
                size: self.size,
                annotations: self.annotations,
            },
            created_at: time(self.created_at),
            updated_at: time(self.updated_at),
        }
    }

    fn from_image(image: &Image) -> ImageRecord {
        ImageRecord {
            labels: image.labels.clone(),
            media_type: image.target.media_type.clone(),
            digest: image.target.digest.clone(),
            size: image.target.size,
            annotations: image.target.annotations.clone(),
            created_at: nanos(image.created_at),
            updated_at: nanos(image.updated_at),
        }
    }
}

fn validate(image: &Image) -> Result<()> {
    if image.name.is_empty() {
        return Err(Error::invalid_argument("image name must not be empty"));
    }
    if image.name.contains('\0') || image.name.len() > 4096 {
        return Err(Error::invalid_argument(format!(
            "image name {:?} is not valid",
            image.name
        )));
    }
    labels::validate_all(&image.labels).map_err(|err| err.context("image.Labels"))?;
    let t = &image.target;
    if let Err(err) = Digest::parse(&t.digest) {
        return Err(Error::invalid_argument(format!(
            "Target.Digest {:?} invalid: {}",
            t.digest,
            err.message().trim_end_matches(": invalid argument")
        )));
    }
    if t.size <= 0 {
        return Err(Error::invalid_argument(
            "Target.Size must be greater than zero",
        ));
    }
    if t.media_type.is_empty() {
        return Err(Error::invalid_argument("Target.MediaType must be set"));
    }
    Ok(())
}

/// containerd's image filter adaptor.
pub fn image_field(image: &Image, path: &[String]) -> Option<String> {
    let non_empty = |s: &String| (!s.is_empty()).then(|| s.clone());
    match path.first().map(String::as_str) {
        Some("name") => non_empty(&image.name),
        Some("target") => match path.get(1).map(String::as_str) {
            Some("digest") => non_empty(&image.target.digest),
            Some("mediatype") => non_empty(&image.target.media_type),
            _ => None,
        },
        Some("labels") => check_map(&path[1..], &image.labels),
        Some("annotations") => check_map(&path[1..], &image.target.annotations),
        _ => None,
    }
}

fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

fn not_found(name: &str) -> Error {
    Error::not_found(format!("image {name:?}"))
}

impl MetadataStore {
    pub fn get_image(&self, ns: &str, name: &str) -> Result<Image> {
        self.read(|tx| {
            let Some(t) = open_read(tx, IMAGES)? else {
                return Err(not_found(name));
            };
            get_json::<ImageRecord>(&t, &key(ns, name))?
                .map(|r| r.image(name))
                .ok_or_else(|| not_found(name))
        })
    }

    pub fn list_images(&self, ns: &str, filters: &[String]) -> Result<Vec<Image>> {
        let filter = Filter::parse_all(filters)?;
        self.read(|tx| {
            let Some(t) = open_read(tx, IMAGES)? else {
                return Ok(Vec::new());
            };
            let (start, end) = crate::namespace_range(ns);
            let mut out = Vec::new();
            for entry in t.range(start.as_str()..end.as_str()).map_err(e("range"))? {
                let (k, v) = entry.map_err(e("range"))?;
                let r: ImageRecord =
                    serde_json::from_slice(v.value()).map_err(e("decoding image"))?;
                let image = r.image(&k.value()[start.len()..]);
                if filter.matches(&|p: &[String]| image_field(&image, p)) {
                    out.push(image);
                }
            }
            Ok(out)
        })
    }

    pub fn create_image(&self, ns: &str, image: &Image) -> Result<Image> {
        let mut image = image.clone();
        validate(&image)?;
        image.created_at = SystemTime::now();
        image.updated_at = image.created_at;
        self.write(|tx| {
            MetadataStore::ensure_namespace(tx, ns)?;
            let mut t = tx.open_table(IMAGES).map_err(e("images"))?;
            let k = key(ns, &image.name);
            if t.get(k.as_str()).map_err(e("get"))?.is_some() {
                return Err(Error::already_exists(format!("image {:?}", image.name)));
            }
            t.insert(
                k.as_str(),
                to_json(&ImageRecord::from_image(&image))?.as_slice(),
            )
            .map_err(e("put"))?;
            Ok(())
        })?;
        Ok(round_trip(image))
    }

    pub fn update_image(&self, ns: &str, image: &Image, paths: &[String]) -> Result<Image> {
        if image.name.is_empty() {
            return Err(Error::invalid_argument("image name is required for update"));
        }
        self.write(|tx| {
            let mut t = tx.open_table(IMAGES).map_err(e("images"))?;
            let k = key(ns, &image.name);
            let current: ImageRecord = get_json(&t, &k)?.ok_or_else(|| not_found(&image.name))?;
            let created_at = current.created_at;
            let mut updated = current.image(&image.name);
            if paths.is_empty() {
                updated = image.clone();
            } else {
                for path in paths {
                    if let Some(key) = path.strip_prefix("labels.") {
                        set_or_remove(&mut updated.labels, key, image.labels.get(key));
                    } else if let Some(key) = path.strip_prefix("annotations.") {
                        set_or_remove(
                            &mut updated.target.annotations,
                            key,
                            image.target.annotations.get(key),
                        );
                    } else {
                        match path.as_str() {
                            "labels" => updated.labels = image.labels.clone(),
                            "target" => updated.target = image.target.clone(),
                            "annotations" => {
                                updated.target.annotations = image.target.annotations.clone()
                            }
                            _ => {
                                return Err(Error::invalid_argument(format!(
                                    "cannot update {path:?} field on image {:?}",
                                    image.name
                                )));
                            }
                        }
                    }
                }
            }
            updated.labels.retain(|_, v| !v.is_empty());
            validate(&updated)?;
            updated.created_at = time(created_at);
            updated.updated_at = SystemTime::now();
            t.insert(
                k.as_str(),
                to_json(&ImageRecord::from_image(&updated))?.as_slice(),
            )
            .map_err(e("put"))?;
            Ok(round_trip(updated))
        })
    }

    pub fn delete_image(&self, ns: &str, name: &str) -> Result<()> {
        self.write(|tx| {
            let mut t = tx.open_table(IMAGES).map_err(e("images"))?;
            if t.remove(key(ns, name).as_str())
                .map_err(e("delete"))?
                .is_none()
            {
                return Err(not_found(name));
            }
            Ok(()).inspect(|_| self.mark_dirty())
        })?;
        Ok(())
    }
}

/// Times as stored (nanosecond precision), so a create's reply equals a later get.
fn round_trip(mut image: Image) -> Image {
    image.created_at = time(nanos(image.created_at));
    image.updated_at = time(nanos(image.updated_at));
    image
}

fn set_or_remove(map: &mut HashMap<String, String>, key: &str, value: Option<&String>) {
    match value {
        Some(v) if !v.is_empty() => {
            map.insert(key.to_string(), v.clone());
        }
        _ => {
            map.remove(key);
        }
    }
}

/// Removes the record of image `name` (the collector's sweep of expired images).
pub(crate) fn remove_image_record(tx: &WriteTransaction, ns: &str, name: &str) -> Result<()> {
    let mut t = tx.open_table(IMAGES).map_err(e("images"))?;
    t.remove(key(ns, name).as_str()).map_err(e("delete"))?;
    Ok(())
}

/// Every image of every namespace, for the collector.
pub(crate) fn scan_images(
    tx: &WriteTransaction,
    f: &mut dyn FnMut(&str, &Image) -> Result<()>,
) -> Result<()> {
    let t = tx.open_table(IMAGES).map_err(e("images"))?;
    for entry in t.iter().map_err(e("iterate"))? {
        let (k, v) = entry.map_err(e("iterate"))?;
        let Some((ns, name)) = crate::util::split_key(k.value()) else {
            continue;
        };
        let r: ImageRecord = serde_json::from_slice(v.value()).map_err(e("decoding image"))?;
        f(ns, &r.image(name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::error::ErrorKind;

    fn image(name: &str) -> Image {
        Image {
            name: name.into(),
            labels: [("a".to_string(), "1".to_string())].into(),
            target: Descriptor {
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                digest: format!("sha256:{}", "b".repeat(64)),
                size: 10,
                annotations: HashMap::new(),
            },
            created_at: SystemTime::now(),
            updated_at: SystemTime::now(),
        }
    }

    #[test]
    fn image_crud_filters_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let md = MetadataStore::open(&dir.path().join("m.db")).unwrap();
        let created = md.create_image("ns", &image("docker.io/x:1")).unwrap();
        assert_eq!(md.get_image("ns", "docker.io/x:1").unwrap(), created);
        let err = md.create_image("ns", &image("docker.io/x:1")).unwrap_err();
        assert_eq!(err.to_string(), "image \"docker.io/x:1\": already exists");
        assert_eq!(
            md.get_image("other", "docker.io/x:1")
                .unwrap_err()
                .to_string(),
            "image \"docker.io/x:1\": not found"
        );
        md.create_image("ns", &image("y")).unwrap();
        assert_eq!(md.list_images("ns", &["name~=x".into()]).unwrap().len(), 1);
        assert_eq!(
            md.list_images("ns", &["labels.a==1".into()]).unwrap().len(),
            2
        );
        let d = format!("target.digest==sha256:{}", "b".repeat(64));
        assert_eq!(md.list_images("ns", &[d]).unwrap().len(), 2);
        assert!(md.list_images("ns", &["name==".into()]).is_err());

        let mut upd = image("y");
        upd.labels = [("b".to_string(), "2".to_string())].into();
        let got = md
            .update_image("ns", &upd, &["labels.b".into(), "labels.a".into()])
            .unwrap();
        assert_eq!(got.labels, [("b".to_string(), "2".to_string())].into());
        let err = md.update_image("ns", &upd, &["name".into()]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        let mut bad = image("z");
        bad.target.digest = "sha256:nope".into();
        assert_eq!(
            md.create_image("ns", &bad).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        bad = image("z");
        bad.target.size = 0;
        assert_eq!(
            md.create_image("ns", &bad).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        md.delete_image("ns", "y").unwrap();
        assert_eq!(
            md.delete_image("ns", "y").unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }
}
