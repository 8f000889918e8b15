use super::*;
use crate::SharingPolicy;
use berth_core::error::ErrorKind;
use sha2_free::sha256;

/// A tiny helper computing digests through the local store itself.
mod sha2_free {
    pub fn sha256(data: &[u8]) -> berth_core::content::Digest {
        let dir = tempfile::tempdir().unwrap();
        let s = berth_content::LocalStore::open(dir.path()).unwrap();
        let mut w = berth_core::content::BlobStore::writer(&s, "x", 0).unwrap();
        w.write(data).unwrap();
        w.digest()
    }
}

pub(crate) fn setup(
    policy: SharingPolicy,
) -> (tempfile::TempDir, Arc<MetadataStore>, Arc<dyn ContentStore>) {
    let dir = tempfile::tempdir().unwrap();
    let md = Arc::new(MetadataStore::open(&dir.path().join("m.db")).unwrap());
    let blobs: Arc<dyn BlobStore> =
        Arc::new(berth_content::LocalStore::open(&dir.path().join("content")).unwrap());
    md.attach_blobs(blobs, policy);
    let cs = md.content_store().unwrap();
    (dir, md, cs)
}

pub(crate) fn put(
    cs: &dyn ContentStore,
    scope: &Scope,
    r#ref: &str,
    data: &[u8],
    labels: Labels,
) -> Digest {
    let d = sha256(data);
    let mut w = cs
        .writer(
            scope,
            WriterOpts {
                r#ref: r#ref.into(),
                total: data.len() as i64,
                expected: Some(d.clone()),
            },
        )
        .unwrap();
    w.write(data).unwrap();
    w.commit(data.len() as i64, Some(&d), labels).unwrap();
    d
}

#[test]
fn namespaced_write_info_update_delete() {
    let (_dir, md, cs) = setup(SharingPolicy::Shared);
    let a = Scope::new("a");
    let d = put(
        &*cs,
        &a,
        "r1",
        b"hello",
        [("x".to_string(), "1".to_string())].into(),
    );
    let info = cs.info(&a, &d).unwrap();
    assert_eq!(info.size, 5);
    assert_eq!(info.labels.get("x").unwrap(), "1");
    let err = cs.info(&Scope::new("b"), &d).unwrap_err();
    assert_eq!(err.to_string(), format!("content digest {d}: not found"));
    // Writing it again in the same namespace: AlreadyExists at open.
    let err = cs
        .writer(
            &a,
            WriterOpts {
                r#ref: "r2".into(),
                total: 5,
                expected: Some(d.clone()),
            },
        )
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    // Update labels by path.
    let mut upd = info.clone();
    upd.labels = [("y".to_string(), "2".to_string())].into();
    let got = cs
        .update(&a, upd.clone(), &["labels.y".into(), "labels.x".into()])
        .unwrap();
    assert_eq!(got.labels, [("y".to_string(), "2".to_string())].into());
    assert_eq!(
        cs.update(&a, upd, &["size".into()]).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    let mut seen = 0;
    cs.walk(&a, &["labels.y==2".into()], &mut |_| {
        seen += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, 1);
    cs.delete(&a, &d).unwrap();
    assert_eq!(cs.delete(&a, &d).unwrap_err().kind(), ErrorKind::NotFound);
    assert!(md.dirty() > 0);
}

#[test]
fn shared_policy_commits_without_upload_isolated_uploads() {
    let (_dir, _md, cs) = setup(SharingPolicy::Shared);
    let d = put(&*cs, &Scope::new("a"), "r", b"shared bytes", Labels::new());
    let b = Scope::new("b");
    let mut w = cs
        .writer(
            &b,
            WriterOpts {
                r#ref: "r".into(),
                total: 0,
                expected: Some(d.clone()),
            },
        )
        .unwrap();
    assert_eq!(w.status().unwrap().offset, 12);
    w.commit(12, Some(&d), Labels::new()).unwrap();
    assert_eq!(cs.info(&b, &d).unwrap().size, 12);

    let (_dir, _md, cs) = setup(SharingPolicy::Isolated);
    let d = put(&*cs, &Scope::new("a"), "r", b"shared bytes", Labels::new());
    let mut w = cs
        .writer(
            &b,
            WriterOpts {
                r#ref: "r".into(),
                total: 0,
                expected: Some(d.clone()),
            },
        )
        .unwrap();
    assert_eq!(w.status().unwrap().offset, 0);
    // Committing without the data fails; with it, succeeds.
    assert_eq!(
        w.commit(12, Some(&d), Labels::new()).unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );
    let mut w = cs
        .writer(
            &b,
            WriterOpts {
                r#ref: "r".into(),
                total: 0,
                expected: Some(d.clone()),
            },
        )
        .unwrap();
    w.write(b"shared bytes").unwrap();
    w.commit(12, Some(&d), Labels::new()).unwrap();
    assert_eq!(cs.info(&b, &d).unwrap().size, 12);
}

#[test]
fn statuses_abort_and_leases() {
    let (_dir, md, cs) = setup(SharingPolicy::Shared);
    md.create_lease("a", Some("l"), &Labels::new()).unwrap();
    let a = Scope::new("a").with_lease(Some("l".into()));
    let mut w = cs
        .writer(
            &a,
            WriterOpts {
                r#ref: "up/1".into(),
                total: 10,
                ..Default::default()
            },
        )
        .unwrap();
    w.write(b"12345").unwrap();
    let err = cs
        .writer(
            &a,
            WriterOpts {
                r#ref: "up/1".into(),
                ..Default::default()
            },
        )
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    drop(w);
    let st = cs.status(&a, "up/1").unwrap();
    assert_eq!((st.offset, st.total, st.r#ref.as_str()), (5, 10, "up/1"));
    assert_eq!(
        cs.list_statuses(&a, &["ref==up/1".into()]).unwrap().len(),
        1
    );
    assert!(cs.list_statuses(&Scope::new("b"), &[]).unwrap().is_empty());
    let res = md.list_lease_resources("a", "l").unwrap();
    assert_eq!(
        res,
        vec![crate::leases::Resource {
            id: "up/1".into(),
            r#type: "ingests".into()
        }]
    );
    // Resume and commit with a size mismatch: FailedPrecondition, ingest kept.
    let mut w = cs
        .writer(
            &a,
            WriterOpts {
                r#ref: "up/1".into(),
                ..Default::default()
            },
        )
        .unwrap();
    w.write(b"67890").unwrap();
    let err = w.commit(11, None, Labels::new()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert_eq!(
        err.to_string(),
        "\"up/1\" failed size validation: 10 != 11: failed precondition"
    );
    assert_eq!(cs.status(&a, "up/1").unwrap().offset, 10);
    let mut w = cs
        .writer(
            &a,
            WriterOpts {
                r#ref: "up/1".into(),
                ..Default::default()
            },
        )
        .unwrap();
    let d = w.digest();
    w.commit(10, Some(&d), Labels::new()).unwrap();
    let res = md.list_lease_resources("a", "l").unwrap();
    assert_eq!(
        res,
        vec![crate::leases::Resource {
            id: d.to_string(),
            r#type: "content".into()
        }]
    );
    // Abort.
    let mut w = cs
        .writer(
            &a,
            WriterOpts {
                r#ref: "gone".into(),
                ..Default::default()
            },
        )
        .unwrap();
    w.write(b"x").unwrap();
    drop(w);
    cs.abort(&a, "gone").unwrap();
    assert_eq!(
        cs.abort(&a, "gone").unwrap_err().to_string(),
        "reference gone: not found"
    );
    // A lease that does not exist.
    let bad = Scope::new("a").with_lease(Some("nope".into()));
    let err = cs
        .writer(
            &bad,
            WriterOpts {
                r#ref: "z".into(),
                ..Default::default()
            },
        )
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}
