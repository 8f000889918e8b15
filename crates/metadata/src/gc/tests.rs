use super::*;
use crate::SharingPolicy;
use crate::content::tests::{put, setup};
use crate::images::Image;
use berth_core::content::{ContentStore, Descriptor, Scope, WriterOpts};
use std::collections::HashMap;

fn image(name: &str, target: &Digest, size: i64) -> Image {
    Image {
        name: name.into(),
        labels: Labels::new(),
        target: Descriptor {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: target.to_string(),
            size,
            annotations: HashMap::new(),
        },
        created_at: SystemTime::now(),
        updated_at: SystemTime::now(),
    }
}

fn has(cs: &dyn ContentStore, ns: &str, d: &Digest) -> bool {
    cs.info(&Scope::new(ns), d).is_ok()
}

#[test]
fn collects_exactly_what_nothing_references() {
    let (dir, md, cs) = setup(SharingPolicy::Shared);
    let a = Scope::new("a");
    let layer = put(&*cs, &a, "l", b"layer", Labels::new());
    let config = put(&*cs, &a, "c", b"config", Labels::new());
    let manifest = put(
        &*cs,
        &a,
        "m",
        b"manifest",
        [
            (
                "containerd.io/gc.ref.content.l.0".to_string(),
                layer.to_string(),
            ),
            (
                "containerd.io/gc.ref.content.config".to_string(),
                config.to_string(),
            ),
            (
                "containerd.io/gc.ref.snapshot.overlayfs".to_string(),
                "sn".to_string(),
            ),
        ]
        .into(),
    );
    let orphan = put(&*cs, &a, "o", b"orphan", Labels::new());
    let rooted = put(
        &*cs,
        &a,
        "r",
        b"rooted",
        [(GC_ROOT.to_string(), "1".to_string())].into(),
    );
    md.create_image("a", &image("img", &manifest, 8)).unwrap();
    let c = Collector::new(md.clone());
    let stats = c.collect().unwrap();
    assert_eq!(stats.removed_blobs, 1, "{stats:?}");
    for d in [&layer, &config, &manifest, &rooted] {
        assert!(has(&*cs, "a", d), "{d}");
    }
    assert!(!has(&*cs, "a", &orphan));
    assert!(
        !dir.path()
            .join("content/blobs/sha256")
            .join(orphan.hex())
            .exists()
    );

    md.delete_image("a", "img").unwrap();
    c.collect().unwrap();
    for d in [&layer, &config, &manifest] {
        assert!(!has(&*cs, "a", d), "{d}");
        assert!(
            !dir.path()
                .join("content/blobs/sha256")
                .join(d.hex())
                .exists()
        );
    }
    assert!(has(&*cs, "a", &rooted));
}

#[test]
fn blobs_shared_by_namespaces_stay_until_the_last_record_goes() {
    let (dir, md, cs) = setup(SharingPolicy::Shared);
    let d = put(
        &*cs,
        &Scope::new("a"),
        "x",
        b"both",
        [(GC_ROOT.to_string(), "y".to_string())].into(),
    );
    let mut w = cs
        .writer(
            &Scope::new("b"),
            WriterOpts {
                r#ref: "x".into(),
                total: 4,
                expected: Some(d.clone()),
            },
        )
        .unwrap();
    w.commit(4, Some(&d), Labels::new()).unwrap();
    let c = Collector::new(md.clone());
    c.collect().unwrap();
    assert!(!has(&*cs, "b", &d));
    assert!(has(&*cs, "a", &d));
    assert!(
        dir.path()
            .join("content/blobs/sha256")
            .join(d.hex())
            .exists()
    );
}

/// `ctr content rm` deletes the record only; the next collection (not just the first
/// after start-up) must remove the file once no namespace has a record of it.
#[test]
fn a_deleted_record_lets_the_next_collection_remove_the_blob() {
    let (dir, md, cs) = setup(SharingPolicy::Shared);
    let c = Collector::new(md.clone());
    let a = Scope::new("a");
    let d = put(
        &*cs,
        &a,
        "x",
        b"kept until deleted",
        [(GC_ROOT.to_string(), "y".to_string())].into(),
    );
    c.collect().unwrap();
    let file = dir.path().join("content/blobs/sha256").join(d.hex());
    assert!(file.exists());
    cs.delete(&a, &d).unwrap();
    c.collect().unwrap();
    assert!(
        !file.exists(),
        "blob file left after its last record was deleted"
    );
}

/// containerd 2.x: an image whose `gc.expire` has passed is no root; it stays while the
/// image its `gc.bref.image` names exists, and goes (with what only it kept) after.
#[test]
fn expired_images_live_as_long_as_their_back_reference() {
    let (_dir, md, cs) = setup(SharingPolicy::Shared);
    let c = Collector::new(md.clone());
    let a = Scope::new("a");
    let main_target = put(&*cs, &a, "m", b"main manifest", Labels::new());
    let extra_target = put(&*cs, &a, "x", b"extra manifest", Labels::new());
    let expired = |name: &str, bref: Option<&str>, target: &Digest| {
        let mut img = image(name, target, 8);
        img.labels
            .insert(GC_EXPIRE.into(), "2000-01-01T00:00:00Z".into());
        if let Some(b) = bref {
            img.labels
                .insert("containerd.io/gc.bref.image".into(), b.into());
        }
        img
    };
    md.create_image("a", &image("main:1", &main_target, 8))
        .unwrap();
    md.create_image("a", &expired("extra:1", Some("main:1"), &extra_target))
        .unwrap();
    md.create_image("a", &expired("lonely:1", None, &main_target))
        .unwrap();
    let mut future = image("later:1", &main_target, 8);
    future
        .labels
        .insert(GC_EXPIRE.into(), "2999-01-01T00:00:00Z".into());
    md.create_image("a", &future).unwrap();
    let names = || {
        let mut v: Vec<String> = md
            .list_images("a", &[])
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        v.sort();
        v
    };
    c.collect().unwrap();
    assert_eq!(names(), ["extra:1", "later:1", "main:1"]);
    assert!(has(&*cs, "a", &extra_target));
    md.delete_image("a", "main:1").unwrap();
    c.collect().unwrap();
    assert_eq!(names(), ["later:1"]);
    assert!(!has(&*cs, "a", &extra_target));
    assert!(has(&*cs, "a", &main_target));
}

#[test]
fn leases_protect_until_deleted_or_expired_and_ingests() {
    let (dir, md, cs) = setup(SharingPolicy::Shared);
    md.create_lease("a", Some("keep"), &Labels::new()).unwrap();
    md.create_lease(
        "a",
        Some("old"),
        &[(GC_EXPIRE.to_string(), "2001-01-01T00:00:00Z".to_string())].into(),
    )
    .unwrap();
    let keep = Scope::new("a").with_lease(Some("keep".into()));
    let old = Scope::new("a").with_lease(Some("old".into()));
    let d1 = put(&*cs, &keep, "1", b"one", Labels::new());
    let d2 = put(&*cs, &old, "2", b"two", Labels::new());
    // An ingest in progress under the lease, with its writer open.
    let mut w = cs
        .writer(
            &keep,
            WriterOpts {
                r#ref: "busy".into(),
                ..Default::default()
            },
        )
        .unwrap();
    w.write(b"partial").unwrap();
    // An unleased ingest gets a 24 h expiry: kept too.
    let mut w2 = cs
        .writer(
            &Scope::new("a"),
            WriterOpts {
                r#ref: "free".into(),
                ..Default::default()
            },
        )
        .unwrap();
    w2.write(b"x").unwrap();
    drop(w2);
    let c = Collector::new(md.clone());
    c.collect().unwrap();
    assert!(has(&*cs, "a", &d1));
    assert!(!has(&*cs, "a", &d2));
    assert_eq!(
        md.list_leases("a", &[]).unwrap().len(),
        1,
        "expired lease removed"
    );
    assert_eq!(cs.list_statuses(&Scope::new("a"), &[]).unwrap().len(), 2);
    w.write(b" more").unwrap();
    let d = w.digest();
    w.commit(0, Some(&d), Labels::new()).unwrap();
    assert!(has(&*cs, "a", &d));
    md.delete_lease("a", "keep").unwrap();
    c.collect().unwrap();
    assert!(!has(&*cs, "a", &d1));
    assert!(!has(&*cs, "a", &d));
    assert!(
        !dir.path()
            .join("content/blobs/sha256")
            .join(d1.hex())
            .exists()
    );
}

#[test]
fn first_collection_and_repair_fix_crash_leftovers() {
    let (dir, md, cs) = setup(SharingPolicy::Shared);
    let a = Scope::new("a");
    let d = put(
        &*cs,
        &a,
        "x",
        b"rooted",
        [(GC_ROOT.to_string(), "1".to_string())].into(),
    );
    let gone = put(
        &*cs,
        &a,
        "y",
        b"vanishes",
        [(GC_ROOT.to_string(), "1".to_string())].into(),
    );
    // A blob whose record was never committed (crash between rename and commit).
    let blobs = md.blob_store().unwrap();
    let mut w = blobs.writer("stray", 0).unwrap();
    w.write(b"stray").unwrap();
    let stray = w.digest();
    w.commit(0, None, Labels::new()).unwrap();
    // A record whose blob is missing.
    std::fs::remove_file(dir.path().join("content/blobs/sha256").join(gone.hex())).unwrap();
    let c = Collector::new(md.clone());
    assert_eq!(c.repair().unwrap(), 1);
    assert!(!has(&*cs, "a", &gone));
    c.collect().unwrap();
    assert!(blobs.info(&stray).is_err());
    assert!(has(&*cs, "a", &d));
}

#[test]
fn rfc3339_parsing() {
    let t = parse_rfc3339("1970-01-02T00:00:01.5+01:00").unwrap();
    assert_eq!(
        t.duration_since(SystemTime::UNIX_EPOCH).unwrap(),
        Duration::from_millis(86_401_500 - 3_600_000)
    );
    assert!(parse_rfc3339("garbage").is_none());
}

#[test]
fn ten_thousand_blobs() {
    let (_dir, md, cs) = setup(SharingPolicy::Shared);
    let a = Scope::new("a");
    for i in 0..200u32 {
        put(&*cs, &a, &format!("r{i}"), &i.to_le_bytes(), Labels::new());
    }
    let c = Collector::new(md.clone());
    let t = Instant::now();
    let stats = c.collect().unwrap();
    assert_eq!(stats.removed_blobs, 200);
    eprintln!("gc of 200 blobs: {:?} ({stats:?})", t.elapsed());
}
