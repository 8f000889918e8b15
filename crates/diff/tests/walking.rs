//! The walking differ on real snapshotters: layers (gzip, zstd, plain) applied to
//! overlay and native snapshots, whiteouts across layers, diffID verification, and a
//! compare whose output re-applies to the same tree.

use berth_core::Result;
use berth_core::content::{
    ContentStore, Descriptor, Digest, Info, ReaderAt, Scope, Status, Writer, WriterOpts,
};
use berth_core::diff::{Applier, ApplyConfig, Comparer, DiffConfig, media_types as mt};
use berth_core::error::ErrorKind;
use berth_core::labels::Labels;
use berth_core::snapshot::Snapshotter;
use berth_diff::walking::WalkingDiff;
use berth_snapshots::mount::TempMount;
use sha2::Digest as _;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct MemStore {
    blobs: Mutex<HashMap<String, (Vec<u8>, Labels)>>,
}

struct MemReader(Vec<u8>);
impl ReaderAt for MemReader {
    fn size(&self) -> i64 {
        self.0.len() as i64
    }
    fn read_at(&self, buf: &mut [u8], offset: i64) -> Result<usize> {
        let start = (offset as usize).min(self.0.len());
        let n = buf.len().min(self.0.len() - start);
        buf[..n].copy_from_slice(&self.0[start..start + n]);
        Ok(n)
    }
}

struct MemWriter {
    store: Arc<MemStore>,
    data: Vec<u8>,
}
fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}
impl Writer for MemWriter {
    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.data.extend_from_slice(data);
        Ok(())
    }
    fn status(&self) -> Result<Status> {
        unimplemented!()
    }
    fn digest(&self) -> Digest {
        Digest::parse(&sha(&self.data)).unwrap()
    }
    fn truncate(&mut self, _: i64) -> Result<()> {
        unimplemented!()
    }
    fn commit(&mut self, _size: i64, _e: Option<&Digest>, labels: Labels) -> Result<()> {
        self.store
            .blobs
            .lock()
            .unwrap()
            .insert(sha(&self.data), (self.data.clone(), labels));
        Ok(())
    }
    fn close(&mut self) -> Result<()> {
        Ok(())
    }
}

struct Shared(Arc<MemStore>);
impl ContentStore for Shared {
    fn info(&self, _: &Scope, _: &Digest) -> Result<Info> {
        unimplemented!()
    }
    fn update(&self, _: &Scope, _: Info, _: &[String]) -> Result<Info> {
        unimplemented!()
    }
    fn walk(&self, _: &Scope, _: &[String], _: &mut dyn FnMut(Info) -> Result<()>) -> Result<()> {
        unimplemented!()
    }
    fn delete(&self, _: &Scope, _: &Digest) -> Result<()> {
        unimplemented!()
    }
    fn reader_at(&self, _: &Scope, d: &Digest) -> Result<Box<dyn ReaderAt>> {
        let blobs = self.0.blobs.lock().unwrap();
        let (data, _) = blobs
            .get(d.as_str())
            .ok_or_else(|| berth_core::Error::not_found(d))?;
        Ok(Box::new(MemReader(data.clone())))
    }
    fn writer(&self, _: &Scope, _: WriterOpts) -> Result<Box<dyn Writer>> {
        Ok(Box::new(MemWriter {
            store: self.0.clone(),
            data: Vec::new(),
        }))
    }
    fn status(&self, _: &Scope, _: &str) -> Result<Status> {
        unimplemented!()
    }
    fn list_statuses(&self, _: &Scope, _: &[String]) -> Result<Vec<Status>> {
        unimplemented!()
    }
    fn abort(&self, _: &Scope, _: &str) -> Result<()> {
        unimplemented!()
    }
}

fn tar_of(entries: &[(&str, Option<&str>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_ustar();
        match data {
            Some(d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(d.len() as u64);
                h.set_mtime(1_700_000_000);
                b.append_data(&mut h, name, d.as_bytes()).unwrap();
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                h.set_mtime(1_700_000_000);
                b.append_data(&mut h, name, std::io::empty()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn put(store: &MemStore, data: Vec<u8>, media_type: &str) -> Descriptor {
    let digest = sha(&data);
    let size = data.len() as i64;
    store
        .blobs
        .lock()
        .unwrap()
        .insert(digest.clone(), (data, Labels::new()));
    Descriptor {
        media_type: media_type.into(),
        digest,
        size,
        annotations: Default::default(),
    }
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

async fn unpack_and_check(s: &dyn Snapshotter, tmp: &Path) {
    let mem = Arc::new(MemStore::default());
    let differ = WalkingDiff::new(Arc::new(Shared(mem.clone())), tmp.join("diff"), vec![]);
    let scope = Scope::new("default");
    let l1 = tar_of(&[
        ("a/", None),
        ("a/x", Some("1")),
        ("a/y", Some("2")),
        ("b/", None),
        ("b/z", Some("3")),
        ("keep", Some("k")),
        ("gone", Some("g")),
    ]);
    let l1_id = sha(&l1);
    let l2 = tar_of(&[
        (".wh.gone", Some("")),
        ("a/", None),
        ("a/.wh..wh..opq", Some("")),
        ("a/new", Some("n")),
        ("b/.wh.z", Some("")),
        ("c", Some("c")),
    ]);
    let l2_id = sha(&l2);
    let d1 = put(&mem, gzip(&l1), mt::OCI_LAYER_GZIP);
    let d2 = put(
        &mem,
        zstd::encode_all(l2.as_slice(), 3).unwrap(),
        mt::OCI_LAYER_ZSTD,
    );

    let m = s.prepare("extract-1", "", Labels::new()).await.unwrap();
    let cfg = ApplyConfig {
        expected_diff_id: Some(l1_id.clone()),
        ..Default::default()
    };
    let got = differ.apply(&scope, &d1, &m, cfg).await.unwrap();
    assert_eq!(got.digest, l1_id);
    s.commit("L1", "extract-1", Labels::new()).await.unwrap();

    // A wrong diffID is refused.
    let m = s.prepare("extract-bad", "L1", Labels::new()).await.unwrap();
    let cfg = ApplyConfig {
        expected_diff_id: Some(l1_id.clone()),
        ..Default::default()
    };
    let err = differ.apply(&scope, &d2, &m, cfg).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    s.remove("extract-bad").await.unwrap();

    let m = s.prepare("extract-2", "L1", Labels::new()).await.unwrap();
    let got = differ
        .apply(&scope, &d2, &m, ApplyConfig::default())
        .await
        .unwrap();
    assert_eq!(got.digest, l2_id);
    s.commit("L2", "extract-2", Labels::new()).await.unwrap();

    let m = s.view("check", "L2", Labels::new()).await.unwrap();
    let mnt = TempMount::new(&m, &tmp.join("mnt"), false).unwrap();
    let r = mnt.path();
    let mut names: Vec<String> = walkdir(r);
    names.sort();
    assert_eq!(names, ["a", "a/new", "b", "c", "keep"], "merged tree");
    mnt.close().unwrap();
    s.remove("check").await.unwrap();

    // Compare: change the tree in an active snapshot and write the diff.
    let lower = s.view("lower", "L2", Labels::new()).await.unwrap();
    let upper = s.prepare("work", "L2", Labels::new()).await.unwrap();
    let mnt = TempMount::new(&upper, &tmp.join("mnt"), false).unwrap();
    std::fs::write(mnt.path().join("added"), "new file").unwrap();
    std::fs::remove_file(mnt.path().join("keep")).unwrap();
    std::fs::write(mnt.path().join("a/new"), "changed").unwrap();
    mnt.close().unwrap();
    let desc = differ
        .compare(&scope, &lower, &upper, DiffConfig::default())
        .await
        .unwrap();
    assert_eq!(desc.media_type, mt::OCI_LAYER_GZIP);
    let labels = mem
        .blobs
        .lock()
        .unwrap()
        .get(&desc.digest)
        .unwrap()
        .1
        .clone();
    let uncompressed = labels.get("containerd.io/uncompressed").unwrap().clone();
    // Re-apply the produced layer on L2 and compare trees.
    let m = s.prepare("replay", "L2", Labels::new()).await.unwrap();
    let cfg = ApplyConfig {
        expected_diff_id: Some(uncompressed),
        ..Default::default()
    };
    differ.apply(&scope, &desc, &m, cfg).await.unwrap();
    let mnt = TempMount::new(&m, &tmp.join("mnt"), false).unwrap();
    assert!(!mnt.path().join("keep").exists());
    assert_eq!(
        std::fs::read_to_string(mnt.path().join("added")).unwrap(),
        "new file"
    );
    assert_eq!(
        std::fs::read_to_string(mnt.path().join("a/new")).unwrap(),
        "changed"
    );
    mnt.close().unwrap();
    for key in ["replay", "work", "lower", "L2", "L1"] {
        s.remove(key).await.unwrap();
    }
}

fn walkdir(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn overlay_unpack_whiteouts_and_compare() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = berth_snapshots::overlay::Overlay::new(&dir.path().join("root"), &Default::default())
        .unwrap();
    unpack_and_check(&s, dir.path()).await;
}

#[tokio::test]
async fn native_unpack_whiteouts_and_compare() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = berth_snapshots::native::Native::new(&dir.path().join("root")).unwrap();
    unpack_and_check(&s, dir.path()).await;
}

#[tokio::test]
async fn stream_processor_turns_a_custom_type_into_a_layer() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = berth_snapshots::native::Native::new(&dir.path().join("root")).unwrap();
    let mem = Arc::new(MemStore::default());
    // A custom media type that is gzip, decoded by an external `gzip -dc`.
    let processor = berth_diff::processor::StreamProcessor {
        accepts: vec!["application/vnd.example.layer.v1+gz".into()],
        returns: mt::OCI_LAYER.into(),
        path: "gzip".into(),
        args: vec!["-dc".into()],
        env: vec![],
    };
    let differ = WalkingDiff::new(
        Arc::new(Shared(mem.clone())),
        dir.path().join("diff"),
        vec![processor],
    );
    let layer = tar_of(&[("hello", Some("world"))]);
    let desc = put(&mem, gzip(&layer), "application/vnd.example.layer.v1+gz");
    let m = s.prepare("p", "", Labels::new()).await.unwrap();
    let got = differ
        .apply(&Scope::new("default"), &desc, &m, ApplyConfig::default())
        .await
        .unwrap();
    assert_eq!(got.digest, sha(&layer));
    assert_eq!(
        std::fs::read_to_string(Path::new(&m[0].source).join("hello")).unwrap(),
        "world"
    );
    let unknown = put(&mem, vec![1, 2, 3], "application/x-unknown");
    let err = differ
        .apply(&Scope::new("default"), &unknown, &m, ApplyConfig::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotImplemented);
    s.remove("p").await.unwrap();
}

#[tokio::test]
async fn unpacker_builds_the_chain_and_reuses_it() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s: Arc<dyn Snapshotter> = Arc::new(
        berth_snapshots::overlay::Overlay::new(&dir.path().join("root"), &Default::default())
            .unwrap(),
    );
    let mem = Arc::new(MemStore::default());
    let differ = Arc::new(WalkingDiff::new(
        Arc::new(Shared(mem.clone())),
        dir.path().join("diff"),
        vec![],
    ));
    let l1 = tar_of(&[("a", Some("1"))]);
    let l2 = tar_of(&[(".wh.a", Some("")), ("b", Some("2"))]);
    let layers = vec![
        put(&mem, gzip(&l1), mt::OCI_LAYER_GZIP),
        put(&mem, gzip(&l2), mt::OCI_LAYER_GZIP),
    ];
    let diff_ids = vec![sha(&l1), sha(&l2)];
    let scope = Scope::new("default");
    let u = berth_diff::unpack::Unpacker::new(
        s.clone(),
        differ.clone(),
        scope.clone(),
        diff_ids.clone(),
        Labels::new(),
    );
    let top = u.unpack_all(&layers).await.unwrap();
    assert_eq!(s.walk(&["kind==committed".into()]).await.unwrap().len(), 2);
    let info = s.stat(&top).await.unwrap();
    assert_eq!(info.parent, diff_ids[0]);
    // A second unpack of the same image reuses the snapshots.
    let again = berth_diff::unpack::Unpacker::new(
        s.clone(),
        differ.clone(),
        scope.clone(),
        diff_ids.clone(),
        Labels::new(),
    );
    assert_eq!(again.unpack_all(&layers).await.unwrap(), top);
    assert_eq!(s.walk(&[]).await.unwrap().len(), 2);
    // A wrong diffID fails and leaves no active snapshot behind.
    let bad =
        berth_diff::unpack::Unpacker::new(s.clone(), differ, scope, vec![sha(&l2)], Labels::new());
    assert!(bad.unpack_all(&layers[..1]).await.is_err());
    assert_eq!(s.walk(&["kind==active".into()]).await.unwrap().len(), 0);
    let m = s.view("check", &top, Labels::new()).await.unwrap();
    let mnt = TempMount::new(&m, &dir.path().join("mnt"), false).unwrap();
    assert!(!mnt.path().join("a").exists());
    assert_eq!(std::fs::read_to_string(mnt.path().join("b")).unwrap(), "2");
    mnt.close().unwrap();
    for k in ["check", top.as_str(), diff_ids[0].as_str()] {
        s.remove(k).await.unwrap();
    }
}
