//! The image records a transfer writes: containerd 2.x's `transfer/image.Store.Store`.
//!
//! For what a pull resolved to, or the index of an imported archive, the records are the
//! store's `name` (with its `labels`) and every extra reference that is not a prefix
//! (its name) or asks for the digest (`name@digest`). For each manifest listed in an
//! imported archive's index, only prefix references apply: the name comes from the
//! entry's `io.containerd.image.name` annotation (kept only if the prefix translation
//! leaves it as it is), else from `org.opencontainers.image.ref.name` (a tag gets
//! `prefix:`; a full reference is kept, and outside the prefix only with
//! `allow_overwrite`); with `add_digest`, `prefix@digest` is recorded too, unless
//! `skip_named_digest` and a name was found, and instead of the name when none was.
//! Records made for extra references carry the store's labels plus, when the store has
//! a name, `containerd.io/gc.bref.image` = that name and an already-passed
//! `containerd.io/gc.expire`: the metadata collector keeps them exactly as long as the
//! image of the store's name exists (as containerd 2.x's). An existing record of the
//! same name is replaced (target and labels).

use crate::{ImageReference, ImageStore, LocalTransfer, StoredImage, blocking};
use berth_core::content::Descriptor;
use berth_core::error::ErrorKind;
use berth_core::labels::{GC_EXPIRE, Labels};
use berth_core::{Error, Result};
use berth_metadata::images::Image;
use std::collections::HashMap;
use std::time::SystemTime;

pub(crate) const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
pub(crate) const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// containerd's `refTranslator`: a tag-only name gets `prefix:`; a full reference is
/// kept, or (with `check_prefix`) dropped unless it is under `prefix`.
pub(crate) fn translate(prefix: &str, check_prefix: bool, name: &str) -> String {
    if prefix.is_empty() {
        return String::new();
    }
    if name.contains(['/', ':', '@']) {
        let under = name
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', ':', '@']));
        if check_prefix && !under {
            return String::new();
        }
        return name.to_string();
    }
    format!("{prefix}:{name}")
}

/// containerd's `imageName`: `io.containerd.image.name` (kept only if the translation
/// leaves it unchanged), else `org.opencontainers.image.ref.name` translated.
pub(crate) fn image_name(annotations: &HashMap<String, String>, r: &ImageReference) -> String {
    let tr = |n: &str| translate(&r.name, !r.allow_overwrite, n);
    if let Some(name) = annotations
        .get(ANNOTATION_IMAGE_NAME)
        .filter(|n| !n.is_empty())
    {
        return if tr(name) == *name {
            name.clone()
        } else {
            String::new()
        };
    }
    annotations
        .get(ANNOTATION_REF_NAME)
        .filter(|n| !n.is_empty())
        .map(|n| tr(n))
        .unwrap_or_default()
}

/// The `(name, labels)` of the records for `desc`: `from_annotation` for the manifests an
/// imported index lists (containerd marks them `io.containerd.import.ref-source:
/// annotation`), otherwise for a pull's target or an archive's index.
pub(crate) fn records(
    dst: &ImageStore,
    desc: &Descriptor,
    from_annotation: bool,
) -> Vec<(String, Labels)> {
    let extra_labels = || {
        let mut l = dst.labels.clone();
        if !dst.name.is_empty() {
            // Deleted with the image of the store's name; expired at once.
            l.insert("containerd.io/gc.bref.image".into(), dst.name.clone());
            l.insert(
                GC_EXPIRE.into(),
                berth_core::time::rfc3339(SystemTime::now()),
            );
        }
        l
    };
    let digest_name = |r: &ImageReference| format!("{}@{}", r.name, desc.digest);
    let mut out = vec![];
    if from_annotation {
        for r in dst.extra_references.iter().filter(|r| r.is_prefix) {
            let name = image_name(&desc.annotations, r);
            if name.is_empty() {
                if r.add_digest {
                    out.push((digest_name(r), extra_labels()));
                }
                continue;
            }
            out.push((name, extra_labels()));
            if r.add_digest && !r.skip_named_digest {
                out.push((digest_name(r), extra_labels()));
            }
        }
    } else {
        if !dst.name.is_empty() {
            out.push((dst.name.clone(), dst.labels.clone()));
        }
        // skip_named_digest applies to names found through a prefix only.
        for r in &dst.extra_references {
            if r.is_prefix && !r.add_digest {
                continue;
            }
            let name = if r.add_digest {
                digest_name(r)
            } else {
                r.name.clone()
            };
            out.push((name, extra_labels()));
        }
    }
    out
}

/// Whether [`records`] of a pull's target names anything (checked before downloading).
pub(crate) fn names_target(dst: &ImageStore) -> bool {
    !dst.name.is_empty()
        || dst
            .extra_references
            .iter()
            .any(|r| !r.is_prefix || r.add_digest)
}

/// Creates or replaces the records for `desc`. No name at all is containerd's
/// `NotFound` ("no image name found").
pub(crate) async fn store(
    t: &LocalTransfer,
    ns: &str,
    dst: &ImageStore,
    desc: &Descriptor,
    from_annotation: bool,
) -> Result<Vec<StoredImage>> {
    let records = records(dst, desc, from_annotation);
    if records.is_empty() {
        return Err(Error::not_found("no image name found"));
    }
    let (md, n, target) = (t.md.clone(), ns.to_string(), desc.clone());
    blocking(move || {
        let now = SystemTime::now();
        let mut stored = vec![];
        for (name, labels) in records {
            let record = Image {
                name,
                labels,
                target: target.clone(),
                created_at: now,
                updated_at: now,
            };
            // containerd's loop: create; an existing name is updated; one removed
            // meanwhile is created again.
            let mut attempts = 0;
            let s = loop {
                attempts += 1;
                match md.create_image(&n, &record) {
                    Ok(image) => {
                        break StoredImage {
                            image,
                            created: true,
                        };
                    }
                    Err(e) if e.is(ErrorKind::AlreadyExists) => {
                        match md.update_image(&n, &record, &[]) {
                            Ok(image) => {
                                break StoredImage {
                                    image,
                                    created: false,
                                };
                            }
                            Err(e) if e.is(ErrorKind::NotFound) && attempts < 10 => continue,
                            Err(e) => return Err(e),
                        }
                    }
                    Err(e) => return Err(e),
                }
            };
            stored.push(s);
        }
        Ok(stored)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(name: &str, overwrite: bool) -> ImageReference {
        ImageReference {
            name: name.into(),
            is_prefix: true,
            allow_overwrite: overwrite,
            ..Default::default()
        }
    }

    fn desc(annotations: &[(&str, &str)]) -> Descriptor {
        Descriptor {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            size: 1,
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn names(r: &[(String, Labels)]) -> Vec<&str> {
        r.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn names_follow_containerds_ref_translation() {
        assert_eq!(translate("import-x", false, "latest"), "import-x:latest");
        assert_eq!(translate("import-x", false, "a.io/b:1"), "a.io/b:1");
        assert_eq!(translate("a.io/b", true, "a.io/b:1"), "a.io/b:1");
        assert_eq!(
            translate("a.io/b", true, "a.io/b@sha256:1"),
            "a.io/b@sha256:1"
        );
        assert_eq!(translate("a.io/b", true, "a.io/bc:1"), "");
        assert_eq!(translate("a.io/b", true, "a.io/b/c:1"), "a.io/b/c:1");
        assert_eq!(translate("", false, "latest"), "");
        let mut a = HashMap::new();
        a.insert(ANNOTATION_REF_NAME.to_string(), "latest".to_string());
        a.insert(
            ANNOTATION_IMAGE_NAME.to_string(),
            "import.local/busybox:latest".to_string(),
        );
        assert_eq!(
            image_name(&a, &prefix("import-2026", true)),
            "import.local/busybox:latest"
        );
        // Without overwrite, a full name outside the prefix is not used, and the ref
        // name is not tried instead.
        assert_eq!(image_name(&a, &prefix("other.io/x", false)), "");
        assert_eq!(
            image_name(&a, &prefix("import.local/busybox", false)),
            "import.local/busybox:latest"
        );
        a.remove(ANNOTATION_IMAGE_NAME);
        assert_eq!(image_name(&a, &prefix("base", true)), "base:latest");
        assert_eq!(image_name(&a, &prefix("base", false)), "base:latest");
        // A full reference as ref name: kept with overwrite, checked without.
        a.insert(ANNOTATION_REF_NAME.to_string(), "x.io/y:2".to_string());
        assert_eq!(image_name(&a, &prefix("base", true)), "x.io/y:2");
        assert_eq!(image_name(&a, &prefix("base", false)), "");
        assert_eq!(image_name(&HashMap::new(), &prefix("base", true)), "");
    }

    #[test]
    fn the_index_gets_the_name_and_plain_references() {
        let mut labels = Labels::new();
        labels.insert("a".into(), "b".into());
        let dst = ImageStore {
            name: "idx.io/all:1".into(),
            labels: labels.clone(),
            extra_references: vec![
                ImageReference {
                    name: "extra.io/plain:1".into(),
                    ..Default::default()
                },
                prefix("skipped.io/prefix", true),
                ImageReference {
                    name: "digests.io/d".into(),
                    is_prefix: true,
                    add_digest: true,
                    skip_named_digest: true,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let d = desc(&[(ANNOTATION_REF_NAME, "ignored")]);
        let r = records(&dst, &d, false);
        let digest = format!("digests.io/d@sha256:{}", "a".repeat(64));
        assert_eq!(
            names(&r),
            ["idx.io/all:1", "extra.io/plain:1", digest.as_str()]
        );
        // The store's own record has its labels only; the extra ones point back at it
        // and are expired at once.
        assert_eq!(r[0].1, labels);
        for (_, l) in &r[1..] {
            assert_eq!(l["a"], "b");
            assert_eq!(l["containerd.io/gc.bref.image"], "idx.io/all:1");
            assert!(l.contains_key(GC_EXPIRE));
        }
        // Without a store name: the store's labels only.
        let anonymous = ImageStore {
            name: String::new(),
            ..dst.clone()
        };
        let r = records(&anonymous, &d, false);
        assert_eq!(names(&r)[0], "extra.io/plain:1");
        assert!(r.iter().all(|(_, l)| *l == labels));
        // Nothing names it: no records.
        assert!(records(&ImageStore::default(), &d, false).is_empty());
        assert!(!names_target(&ImageStore::default()));
        assert!(!names_target(&ImageStore {
            extra_references: vec![prefix("p", true)],
            ..Default::default()
        }));
    }

    #[test]
    fn manifests_get_prefix_names_and_digests() {
        let d = desc(&[
            (ANNOTATION_IMAGE_NAME, "docker.io/library/busybox:latest"),
            (ANNOTATION_REF_NAME, "latest"),
        ]);
        let digest = |p: &str| format!("{p}@sha256:{}", "a".repeat(64));
        let store = |refs: Vec<ImageReference>| ImageStore {
            name: "not-for-manifests".into(),
            extra_references: refs,
            ..Default::default()
        };
        // Plain references and the store name do not name manifests.
        let r = records(
            &store(vec![ImageReference {
                name: "plain.io/x:1".into(),
                ..Default::default()
            }]),
            &d,
            true,
        );
        assert!(r.is_empty());
        // ctr 2.x's default: the date prefix with overwrite.
        let r = records(&store(vec![prefix("import-2026-11-27", true)]), &d, true);
        assert_eq!(names(&r), ["docker.io/library/busybox:latest"]);
        // --base-name without overwrite: the full name is outside the prefix.
        let r = records(&store(vec![prefix("example.com/base", false)]), &d, true);
        assert!(r.is_empty());
        // --digests: name and digest, or the digest only with skip_named_digest…
        let with_digest = |skip: bool| ImageReference {
            name: "import-2026-11-27".into(),
            is_prefix: true,
            allow_overwrite: true,
            add_digest: true,
            skip_named_digest: skip,
        };
        let r = records(&store(vec![with_digest(false)]), &d, true);
        assert_eq!(
            names(&r),
            [
                "docker.io/library/busybox:latest",
                digest("import-2026-11-27").as_str()
            ]
        );
        let r = records(&store(vec![with_digest(true)]), &d, true);
        assert_eq!(names(&r), ["docker.io/library/busybox:latest"]);
        // …and the digest when no name is found.
        let unnamed = desc(&[]);
        let r = records(&store(vec![with_digest(true)]), &unnamed, true);
        assert_eq!(names(&r), [digest("import-2026-11-27").as_str()]);
        // A tag-only ref name under a prefix.
        let tagged = desc(&[(ANNOTATION_REF_NAME, "v2")]);
        let r = records(
            &store(vec![prefix("example.com/base", false)]),
            &tagged,
            true,
        );
        assert_eq!(names(&r), ["example.com/base:v2"]);
        // Several prefixes: one record each.
        let r = records(
            &store(vec![prefix("a.io/x", true), prefix("b.io/y", true)]),
            &tagged,
            true,
        );
        assert_eq!(names(&r), ["a.io/x:v2", "b.io/y:v2"]);
    }
}
