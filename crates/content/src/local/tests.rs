use super::*;
use berth_core::error::ErrorKind;

fn sha(data: &[u8]) -> Digest {
    Digest::sha256_from_bytes(&Sha256::digest(data))
}

fn store() -> (tempfile::TempDir, LocalStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    (dir, store)
}

#[test]
fn write_commit_read_delete() {
    let (dir, s) = store();
    let data = b"hello world".repeat(1000);
    let mut w = s.writer("ref/../1", data.len() as i64).unwrap();
    w.write(&data[..5000]).unwrap();
    w.write(&data[5000..]).unwrap();
    let d = sha(&data);
    assert_eq!(w.digest(), d);
    w.commit(data.len() as i64, Some(&d), Labels::new())
        .unwrap();
    assert!(dir.path().join("blobs/sha256").join(d.hex()).is_file());
    assert_eq!(fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);
    let info = s.info(&d).unwrap();
    assert_eq!(info.size, data.len() as i64);
    let r = s.reader_at(&d).unwrap();
    let mut buf = vec![0; 20];
    let n = r.read_at(&mut buf, 5).unwrap();
    assert_eq!(&buf[..n], &data[5..25]);
    let mut seen = vec![];
    s.walk(&mut |i| {
        seen.push(i.digest);
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, vec![d.clone()]);
    // Committing the same content again: AlreadyExists, ingest cleaned.
    let mut w = s.writer("again", 0).unwrap();
    w.write(&data).unwrap();
    let err = w.commit(0, None, Labels::new()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    assert_eq!(err.to_string(), format!("content {d}: already exists"));
    assert!(s.status("again").is_err());
    s.delete(&d).unwrap();
    assert_eq!(s.delete(&d).unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(
        s.info(&d).unwrap_err().to_string(),
        format!("content {d}: not found")
    );
}

#[test]
fn one_writer_per_ref_and_resume() {
    let (dir, s) = store();
    let mut w = s.writer("r", 10).unwrap();
    w.write(b"01234").unwrap();
    let err = s.writer("r", 10).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.to_string().starts_with("ref r locked for"), "{err}");
    drop(w);
    let st = s.status("r").unwrap();
    assert_eq!((st.offset, st.total, st.r#ref.as_str()), (5, 10, "r"));
    // A new store instance (a daemon restart) resumes at the stored offset.
    let s2 = LocalStore::open(dir.path()).unwrap();
    let mut w = s2.writer("r", 0).unwrap();
    assert_eq!(w.status().unwrap().offset, 5);
    assert_eq!(w.status().unwrap().total, 10);
    w.write(b"56789").unwrap();
    assert_eq!(w.digest(), sha(b"0123456789"));
    w.commit(10, Some(&sha(b"0123456789")), Labels::new())
        .unwrap();
    assert_eq!(s2.list_statuses().unwrap().len(), 0);
}

#[test]
fn mismatches_fail_and_keep_the_ingest() {
    let (_dir, s) = store();
    let mut w = s.writer("m", 0).unwrap();
    w.write(b"abc").unwrap();
    let err = w.commit(4, None, Labels::new()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert_eq!(
        err.to_string(),
        "unexpected commit size 3, expected 4: failed precondition"
    );
    let mut w = s.writer("m", 0).unwrap();
    assert_eq!(w.status().unwrap().offset, 3);
    let wrong = sha(b"abd");
    let err = w.commit(3, Some(&wrong), Labels::new()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(
        err.to_string().contains("unexpected commit digest"),
        "{err}"
    );
    assert_eq!(s.status("m").unwrap().offset, 3);
    // Truncate restarts it.
    let mut w = s.writer("m", 0).unwrap();
    w.truncate(0).unwrap();
    w.write(b"xyz").unwrap();
    w.commit(3, Some(&sha(b"xyz")), Labels::new()).unwrap();
    s.abort("m").unwrap_err();
}

#[test]
fn bad_inputs() {
    let (_dir, s) = store();
    assert_eq!(
        s.writer("", 0).err().unwrap().kind(),
        ErrorKind::InvalidArgument
    );
    // A negative total means "unknown", as in containerd: the writer opens, the commit
    // checks the size.
    let mut w = s.writer("neg", -1).unwrap();
    w.write(b"abc").unwrap();
    w.close().unwrap();
    s.abort("neg").unwrap();
    assert_eq!(
        s.writer("x", content::MAX_BLOB_SIZE + 1)
            .err()
            .unwrap()
            .kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(s.abort("nope").unwrap_err().kind(), ErrorKind::NotFound);
}

#[test]
fn repair_removes_crash_leftovers() {
    let (dir, s) = store();
    let mut w = s.writer("keep", 0).unwrap();
    w.write(b"partial").unwrap();
    drop(w);
    let ingest = dir.path().join("ingest");
    fs::create_dir(ingest.join("not-a-hash")).unwrap();
    let no_ref = ingest.join("a".repeat(64));
    fs::create_dir(&no_ref).unwrap();
    fs::write(no_ref.join("data"), b"x").unwrap();
    let keep = s.ingest_root("keep");
    fs::write(keep.join("updatedat.tmp"), b"1").unwrap();
    fs::write(dir.path().join("blobs/sha256/garbage"), b"x").unwrap();
    drop(s);
    let s = LocalStore::open(dir.path()).unwrap();
    assert!(!ingest.join("not-a-hash").exists());
    assert!(!no_ref.exists());
    assert!(!keep.join("updatedat.tmp").exists());
    assert!(!dir.path().join("blobs/sha256/garbage").exists());
    let statuses = s.list_statuses().unwrap();
    assert_eq!(statuses.len(), 1);
    assert_eq!(statuses[0].offset, 7);
}

/// Large writes are hashed on the writer's thread: the digest (mid-ingest, after a
/// truncate, at commit, after a resume) is still that of every byte written, in order.
#[test]
fn large_writes_are_hashed_off_the_write_path() {
    let (dir, s) = store();
    let chunk = HASH_OFF_THREAD_MIN * 3 + 17;
    let data: Vec<u8> = (0..chunk * 20).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut w = s.writer("big", data.len() as i64).unwrap();
    // Owned and borrowed buffers, large and small, interleaved.
    for (i, part) in data[..chunk * 10].chunks(chunk).enumerate() {
        if i % 2 == 0 {
            w.write_owned(Bytes::copy_from_slice(part)).unwrap();
        } else {
            w.write(part).unwrap();
        }
    }
    w.write(&data[chunk * 10..chunk * 10 + 100]).unwrap();
    assert_eq!(w.digest(), sha(&data[..chunk * 10 + 100]));
    // Writing on after a digest was taken starts hashing off the thread again.
    w.write_owned(Bytes::copy_from_slice(&data[chunk * 10 + 100..chunk * 15]))
        .unwrap();
    // A truncate forgets what the hashing thread had queued.
    w.truncate(0).unwrap();
    w.write_owned(Bytes::copy_from_slice(&data[..chunk * 12]))
        .unwrap();
    w.close().unwrap();
    drop(w);
    // Resumed: the data file is re-hashed, then the rest is written.
    let mut w = s.writer("big", data.len() as i64).unwrap();
    assert_eq!(w.status().unwrap().offset, (chunk * 12) as i64);
    for part in data[chunk * 12..].chunks(HASH_OFF_THREAD_MIN * 4) {
        w.write_owned(Bytes::copy_from_slice(part)).unwrap();
    }
    // The wrong digest is refused before anything becomes visible.
    let err = w
        .commit(data.len() as i64, Some(&sha(b"other")), Labels::new())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert_eq!(
        fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
    drop(w);
    let mut w = s.writer("big", data.len() as i64).unwrap();
    let d = sha(&data);
    w.commit(data.len() as i64, Some(&d), Labels::new())
        .unwrap();
    assert_eq!(w.digest(), d);
    assert_eq!(
        fs::read(dir.path().join("blobs/sha256").join(d.hex())).unwrap(),
        data
    );
}
