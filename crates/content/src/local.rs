use berth_core::content::{
    self, BlobStore, Digest, Info, ReaderAt, Status, Writer, validate_ref, validate_total,
};
use berth_core::labels::Labels;
use berth_core::{Error, Result};
use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind as IoKind, Read, Seek, SeekFrom, Write as _};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The local store; see the crate documentation for the layout.
pub struct LocalStore {
    root: PathBuf,
    locks: Arc<Mutex<HashMap<String, SystemTime>>>,
    gc_lock: RwLock<()>,
}

fn io_error(what: impl std::fmt::Display, err: std::io::Error) -> Error {
    let kind = match err.kind() {
        IoKind::NotFound => berth_core::error::ErrorKind::NotFound,
        _ => berth_core::error::ErrorKind::Unknown,
    };
    Error::with_message(kind, format!("{what}: {err}"))
}

fn to_nanos(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()
}

fn from_nanos(n: u128) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(n.min(u64::MAX as u128) as u64)
}

/// Writes `data` to `path` through a temporary file and a rename, so a reader never sees
/// a half-written file.
fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
    }
    fs::rename(&tmp, path)
}

fn read_string(path: &Path) -> std::io::Result<String> {
    fs::read_to_string(path)
}

fn read_time(path: &Path) -> Option<SystemTime> {
    read_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u128>().ok())
        .map(from_nanos)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

fn hex_sha256(s: &str) -> String {
    let hash = Sha256::digest(s.as_bytes());
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_hex_of_len(name: &str, len: usize) -> bool {
    name.len() == len && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex_len(alg: &str) -> Option<usize> {
    match alg {
        "sha256" => Some(64),
        "sha384" => Some(96),
        "sha512" => Some(128),
        _ => None,
    }
}

impl LocalStore {
    /// Opens the store at `root`, creating it if needed, and repairs what a crash may
    /// have left (see the crate documentation).
    pub fn open(root: &Path) -> Result<LocalStore> {
        for dir in ["blobs/sha256", "ingest"] {
            let p = root.join(dir);
            fs::create_dir_all(&p).map_err(|e| io_error(format!("creating {}", p.display()), e))?;
        }
        let store = LocalStore {
            root: root.to_path_buf(),
            locks: Arc::default(),
            gc_lock: RwLock::new(()),
        };
        store.repair()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn repair(&self) -> Result<()> {
        let ingest = self.root.join("ingest");
        let entries = fs::read_dir(&ingest)
            .map_err(|e| io_error(format!("reading {}", ingest.display()), e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            let valid = path.is_dir()
                && is_hex_of_len(&name, 64)
                && read_string(&path.join("ref"))
                    .map(|r| hex_sha256(&r) == name)
                    .unwrap_or(false)
                && path.join("data").is_file();
            if !valid {
                tracing::warn!(path = %path.display(), "removing incomplete ingest");
                let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
                continue;
            }
            for f in fs::read_dir(&path).into_iter().flatten().flatten() {
                if f.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = fs::remove_file(f.path());
                }
            }
        }
        let blobs = self.root.join("blobs");
        for alg_dir in fs::read_dir(&blobs).into_iter().flatten().flatten() {
            let alg = alg_dir.file_name().to_string_lossy().to_string();
            let Some(len) = hex_len(&alg) else { continue };
            for blob in fs::read_dir(alg_dir.path()).into_iter().flatten().flatten() {
                let name = blob.file_name().to_string_lossy().to_string();
                if !is_hex_of_len(&name, len) || !blob.path().is_file() {
                    tracing::warn!(path = %blob.path().display(), "removing stray file among blobs");
                    let _ =
                        fs::remove_file(blob.path()).or_else(|_| fs::remove_dir_all(blob.path()));
                }
            }
        }
        Ok(())
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm())
            .join(digest.hex())
    }

    fn ingest_root(&self, r#ref: &str) -> PathBuf {
        self.root.join("ingest").join(hex_sha256(r#ref))
    }

    fn try_lock(&self, r#ref: &str) -> Result<()> {
        let mut locks = self.locks.lock().unwrap();
        if let Some(since) = locks.get(r#ref) {
            let held = SystemTime::now().duration_since(*since).unwrap_or_default();
            return Err(Error::unavailable(format!(
                "ref {ref} locked for {held:?} (since {})",
                berth_core_time(*since)
            )));
        }
        locks.insert(r#ref.to_string(), SystemTime::now());
        Ok(())
    }

    fn status_at(&self, path: &Path) -> Result<Status> {
        let data = path.join("data");
        let meta =
            fs::metadata(&data).map_err(|e| io_error(format!("stat {}", data.display()), e))?;
        let r#ref = read_string(&path.join("ref"))
            .map_err(|e| io_error(format!("read {}", path.join("ref").display()), e))?;
        let started_at = read_time(&path.join("startedat"))
            .ok_or_else(|| Error::unknown(format!("could not read startedat of ingest {ref:?}")))?;
        let mut updated_at = read_time(&path.join("updatedat")).unwrap_or(started_at);
        if let Ok(m) = meta.modified()
            && m > updated_at
        {
            updated_at = m;
        }
        let total = read_string(&path.join("total"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Ok(Status {
            r#ref,
            offset: meta.len() as i64,
            total,
            expected: String::new(),
            started_at,
            updated_at,
        })
    }

    fn info_of(&self, digest: Digest, meta: &fs::Metadata) -> Info {
        let created = meta.modified().unwrap_or(UNIX_EPOCH);
        Info {
            digest,
            size: meta.len() as i64,
            created_at: created,
            updated_at: meta.accessed().unwrap_or(created),
            labels: Labels::new(),
        }
    }

    fn open_writer(&self, r#ref: &str, mut total: i64) -> Result<LocalWriter> {
        let path = self.ingest_root(r#ref);
        let data = path.join("data");
        let mut hasher = Sha256::new();
        let mut offset = 0i64;
        let mut resumed: Option<Status> = None;
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == IoKind::AlreadyExists => {
                match self.resume_status(&path, r#ref, total, &mut hasher) {
                    Ok(status) => resumed = Some(status),
                    Err(err) => {
                        tracing::info!(r#ref, error = %err, "cannot resume ingest, starting over");
                        hasher = Sha256::new();
                    }
                }
            }
            Err(e) => return Err(io_error(format!("creating {}", path.display()), e)),
        }
        let (started_at, updated_at) = match &resumed {
            Some(status) => {
                offset = status.offset;
                if status.total > 0 {
                    total = status.total;
                }
                (status.started_at, status.updated_at)
            }
            None => {
                let now = SystemTime::now();
                let io = |e| io_error(format!("writing ingest {}", path.display()), e);
                // Truncate first: a stale data file must not be resumed under a new ref.
                File::create(&data).map_err(io)?;
                write_atomic(&path.join("ref"), r#ref.as_bytes()).map_err(io)?;
                write_atomic(
                    &path.join("startedat"),
                    to_nanos(now).to_string().as_bytes(),
                )
                .map_err(io)?;
                write_atomic(
                    &path.join("updatedat"),
                    to_nanos(now).to_string().as_bytes(),
                )
                .map_err(io)?;
                if total > 0 {
                    write_atomic(&path.join("total"), total.to_string().as_bytes()).map_err(io)?;
                } else {
                    let _ = fs::remove_file(path.join("total"));
                }
                (now, now)
            }
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data)
            .map_err(|e| io_error("failed to open data file", e))?;
        file.seek(SeekFrom::Start(offset as u64))
            .map_err(|e| io_error("could not seek to current write offset", e))?;
        Ok(LocalWriter {
            root: self.root.clone(),
            file: Some(file),
            path,
            r#ref: r#ref.to_string(),
            offset,
            total,
            hash: RefCell::new(Hashing::InPlace(hasher)),
            started_at,
            updated_at,
            locks: self.locks.clone(),
            locked: true,
            writeback_started: offset,
        })
    }

    fn resume_status(
        &self,
        path: &Path,
        r#ref: &str,
        total: i64,
        hasher: &mut Sha256,
    ) -> Result<Status> {
        let mut status = self.status_at(path)?;
        if status.r#ref != r#ref {
            return Err(Error::unknown(format!(
                "ref key does not match: {ref} != {}",
                status.r#ref
            )));
        }
        if total > 0 && status.total > 0 && total != status.total {
            return Err(Error::unknown(format!(
                "provided total differs from status: {total} != {}",
                status.total
            )));
        }
        let mut f = File::open(path.join("data")).map_err(|e| io_error("open data", e))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n_total = 0i64;
        loop {
            let n = f.read(&mut buf).map_err(|e| io_error("read data", e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            n_total += n as i64;
        }
        status.offset = n_total;
        Ok(status)
    }
}

/// RFC 3339-ish rendering for messages (seconds since the epoch keeps it dependency-free).
fn berth_core_time(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:09}s since epoch", d.as_secs(), d.subsec_nanos())
}

impl BlobStore for LocalStore {
    fn info(&self, digest: &Digest) -> Result<Info> {
        let p = self.blob_path(digest);
        match fs::metadata(&p) {
            Ok(meta) => Ok(self.info_of(digest.clone(), &meta)),
            Err(e) if e.kind() == IoKind::NotFound => {
                Err(Error::not_found(format!("content {digest}")))
            }
            Err(e) => Err(io_error(format!("stat {}", p.display()), e)),
        }
    }

    fn reader_at(&self, digest: &Digest) -> Result<Box<dyn ReaderAt>> {
        let p = self.blob_path(digest);
        let file = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == IoKind::NotFound => {
                return Err(Error::not_found(format!("content {digest}")));
            }
            Err(e) => {
                return Err(io_error(
                    format!("blob {digest} expected at {}", p.display()),
                    e,
                ));
            }
        };
        let size = file.metadata().map_err(|e| io_error("stat blob", e))?.len() as i64;
        Ok(Box::new(FileReader { file, size }))
    }

    fn delete(&self, digest: &Digest) -> Result<()> {
        match fs::remove_file(self.blob_path(digest)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == IoKind::NotFound => {
                Err(Error::not_found(format!("content {digest}")))
            }
            Err(e) => Err(io_error(format!("deleting content {digest}"), e)),
        }
    }

    fn walk(&self, f: &mut dyn FnMut(Info) -> Result<()>) -> Result<()> {
        let blobs = self.root.join("blobs");
        let algs = fs::read_dir(&blobs).map_err(|e| io_error("reading blobs", e))?;
        for alg_dir in algs.flatten() {
            let alg = alg_dir.file_name().to_string_lossy().to_string();
            let Some(len) = hex_len(&alg) else { continue };
            let entries = fs::read_dir(alg_dir.path()).map_err(|e| io_error("reading blobs", e))?;
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if !is_hex_of_len(&name, len) {
                    continue;
                }
                let Ok(meta) = entry.metadata() else { continue };
                let digest = Digest::parse(&format!("{alg}:{name}"))?;
                f(self.info_of(digest, &meta))?;
            }
        }
        Ok(())
    }

    fn writer(&self, r#ref: &str, total: i64) -> Result<Box<dyn Writer>> {
        validate_ref(r#ref)?;
        validate_total(total)?;
        // containerd retries a busy ref briefly before reporting it locked.
        let mut last = None;
        for attempt in 0..5u32 {
            match self.try_lock(r#ref) {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(1 << attempt));
                }
            }
        }
        if let Some(err) = last {
            return Err(err);
        }
        match self.open_writer(r#ref, total) {
            Ok(w) => Ok(Box::new(w)),
            Err(e) => {
                self.locks.lock().unwrap().remove(r#ref);
                Err(e)
            }
        }
    }

    fn status(&self, r#ref: &str) -> Result<Status> {
        self.status_at(&self.ingest_root(r#ref))
    }

    fn list_statuses(&self) -> Result<Vec<Status>> {
        let ingest = self.root.join("ingest");
        let mut out = Vec::new();
        for entry in fs::read_dir(&ingest)
            .map_err(|e| io_error("reading ingests", e))?
            .flatten()
        {
            match self.status_at(&entry.path()) {
                Ok(s) => out.push(s),
                Err(e) if e.is(berth_core::error::ErrorKind::NotFound) => {}
                Err(e) => tracing::warn!(path = %entry.path().display(), error = %e, "bad ingest"),
            }
        }
        Ok(out)
    }

    fn abort(&self, r#ref: &str) -> Result<()> {
        let root = self.ingest_root(r#ref);
        match fs::remove_dir_all(&root) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == IoKind::NotFound => {
                Err(Error::not_found(format!("ingest ref {ref:?}")))
            }
            Err(e) => Err(io_error(format!("aborting ingest {ref:?}"), e)),
        }
    }

    fn gc_lock(&self) -> &RwLock<()> {
        &self.gc_lock
    }
}

struct FileReader {
    file: File,
    size: i64,
}

impl ReaderAt for FileReader {
    fn size(&self) -> i64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: i64) -> Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        self.file
            .read_at(buf, offset as u64)
            .map_err(|e| io_error("reading blob", e))
    }
}

struct LocalWriter {
    root: PathBuf,
    file: Option<File>,
    path: PathBuf,
    r#ref: String,
    offset: i64,
    total: i64,
    hash: RefCell<Hashing>,
    started_at: SystemTime,
    updated_at: SystemTime,
    locks: Arc<Mutex<HashMap<String, SystemTime>>>,
    locked: bool,
    /// The data file up to here has been handed to the kernel's writeback.
    writeback_started: i64,
}

/// Written data is handed to the kernel's writeback every this many bytes, so the disk
/// works while the rest arrives and the fsync at commit has only the tail left to wait
/// for (it still is what makes the blob durable).
const WRITEBACK_EVERY: i64 = 8 << 20;

/// Starts writing `len` bytes of `file` at `offset` back to disk without waiting for it.
/// Only a hint: a failure shows again in the fsync at commit.
fn start_writeback(file: &File, offset: i64, len: i64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open
    // for as long as `file` is borrowed.
    let rc = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "sync_file_range");
    }
}

/// Writes at least this large are hashed on a thread of the writer's own, so the reply to
/// a client's write waits for the file write only; smaller ones (manifests, configs, the
/// many small blobs of a pull) are hashed in place rather than paying for a thread.
const HASH_OFF_THREAD_MIN: usize = 64 << 10;
/// Buffers queued for the hashing thread before `write` waits for it: bounds the memory
/// an ingest holds when hashing falls behind the disk (8 × a 1 MiB gRPC message).
const HASH_QUEUE_DEPTH: usize = 8;

/// The sha256 of an ingest's data so far.
enum Hashing {
    InPlace(Sha256),
    /// A thread hashes the queued buffers in order and hands the hasher back when the
    /// queue's sender is dropped.
    OffThread {
        queue: SyncSender<Bytes>,
        thread: JoinHandle<Sha256>,
    },
}

impl Hashing {
    /// Hashes `data`, which was just written: in place if it is small and no thread is
    /// running, otherwise queued for the thread (started here if needed).
    fn update(&mut self, data: &[u8], owned: impl FnOnce() -> Bytes) {
        if let Hashing::InPlace(hasher) = self {
            if data.len() < HASH_OFF_THREAD_MIN {
                hasher.update(data);
                return;
            }
            let (queue, queued) = sync_channel::<Bytes>(HASH_QUEUE_DEPTH);
            let mut thread_hasher = hasher.clone();
            let spawned = std::thread::Builder::new()
                .name("ingest-sha256".into())
                .spawn(move || {
                    for buf in queued {
                        thread_hasher.update(&buf);
                    }
                    thread_hasher
                });
            match spawned {
                Ok(thread) => *self = Hashing::OffThread { queue, thread },
                Err(err) => {
                    tracing::warn!(error = %err, "cannot start a hashing thread, hashing in place");
                    hasher.update(data);
                    return;
                }
            }
        }
        if let Hashing::OffThread { queue, .. } = self
            && queue.send(owned()).is_err()
        {
            // The thread only stops early by panicking: surface that panic here.
            self.catch_up();
        }
    }

    /// Waits for the hashing thread (if any) to hash everything queued.
    fn catch_up(&mut self) -> &mut Sha256 {
        if let Hashing::OffThread { .. } = self {
            let Hashing::OffThread { queue, thread } =
                std::mem::replace(self, Hashing::InPlace(Sha256::new()))
            else {
                unreachable!("matched above")
            };
            drop(queue);
            let hasher = thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            *self = Hashing::InPlace(hasher);
        }
        match self {
            Hashing::InPlace(hasher) => hasher,
            Hashing::OffThread { .. } => unreachable!("joined above"),
        }
    }
}

impl LocalWriter {
    fn unlock(&mut self) {
        if self.locked {
            self.locks.lock().unwrap().remove(&self.r#ref);
            self.locked = false;
        }
    }

    fn closed() -> Error {
        Error::failed_precondition("cannot use a closed writer")
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        let _ = Writer::close(self);
    }
}

impl Writer for LocalWriter {
    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.write_to_file(data)?;
        // Copying is several times cheaper than hashing, so a large borrowed buffer is
        // still worth handing to the hashing thread.
        self.hash
            .get_mut()
            .update(data, || Bytes::copy_from_slice(data));
        Ok(())
    }

    fn write_owned(&mut self, data: Bytes) -> Result<()> {
        self.write_to_file(&data)?;
        let queued = data.clone();
        self.hash.get_mut().update(&data, move || queued);
        Ok(())
    }

    fn status(&self) -> Result<Status> {
        Ok(Status {
            r#ref: self.r#ref.clone(),
            offset: self.offset,
            total: self.total,
            expected: String::new(),
            started_at: self.started_at,
            updated_at: self.updated_at,
        })
    }

    fn digest(&self) -> Digest {
        let mut hash = self.hash.borrow_mut();
        Digest::sha256_from_bytes(&hash.catch_up().clone().finalize())
    }

    fn truncate(&mut self, size: i64) -> Result<()> {
        if size != 0 {
            return Err(Error::invalid_argument("Truncate: unsupported size"));
        }
        let file = self.file.as_mut().ok_or_else(Self::closed)?;
        file.set_len(0).map_err(|e| io_error("truncate", e))?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| io_error("seek", e))?;
        self.offset = 0;
        self.writeback_started = 0;
        // A hashing thread still working on the old data is left to finish alone.
        *self.hash.get_mut() = Hashing::InPlace(Sha256::new());
        Ok(())
    }

    fn commit(&mut self, size: i64, expected: Option<&Digest>, _labels: Labels) -> Result<()> {
        let result = self.commit_inner(size, expected);
        self.unlock();
        result
    }

    fn close(&mut self) -> Result<()> {
        if let Some(file) = self.file.take() {
            let _ = file.sync_data();
            let _ = write_atomic(
                &self.path.join("updatedat"),
                to_nanos(self.updated_at).to_string().as_bytes(),
            );
        }
        self.unlock();
        Ok(())
    }
}

impl LocalWriter {
    fn write_to_file(&mut self, data: &[u8]) -> Result<()> {
        let file = self.file.as_mut().ok_or_else(Self::closed)?;
        let new_offset = self.offset + data.len() as i64;
        if new_offset > content::MAX_BLOB_SIZE {
            return Err(Error::invalid_argument(format!(
                "write of {} bytes at {} exceeds the maximum blob size {}",
                data.len(),
                self.offset,
                content::MAX_BLOB_SIZE
            )));
        }
        file.write_all(data)
            .map_err(|e| io_error(format!("writing ingest {:?}", self.r#ref), e))?;
        if new_offset - self.writeback_started >= WRITEBACK_EVERY {
            start_writeback(
                file,
                self.writeback_started,
                new_offset - self.writeback_started,
            );
            self.writeback_started = new_offset;
        }
        self.offset = new_offset;
        self.updated_at = SystemTime::now();
        Ok(())
    }

    fn commit_inner(&mut self, size: i64, expected: Option<&Digest>) -> Result<()> {
        let file = self
            .file
            .take()
            .ok_or_else(|| Error::failed_precondition("cannot commit on closed writer"))?;
        file.sync_all().map_err(|e| io_error("sync failed", e))?;
        let actual_size = file
            .metadata()
            .map_err(|e| io_error("stat on ingest file failed", e))?
            .len() as i64;
        drop(file);
        if size > 0 && size != actual_size {
            return Err(Error::failed_precondition(format!(
                "unexpected commit size {actual_size}, expected {size}"
            )));
        }
        // The hashing thread kept going during the fsync above; the digest is of every
        // byte written, verified before the blob becomes visible.
        let digest = Digest::sha256_from_bytes(&self.hash.get_mut().catch_up().clone().finalize());
        if let Some(expected) = expected
            && *expected != digest
        {
            return Err(Error::failed_precondition(format!(
                "unexpected commit digest {digest}, expected {expected}"
            )));
        }
        let target = self
            .root
            .join("blobs")
            .join(digest.algorithm())
            .join(digest.hex());
        let dir = target
            .parent()
            .expect("blob path has a parent")
            .to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| io_error("creating blob directory", e))?;
        if target.exists() {
            if let Err(e) = fs::remove_dir_all(&self.path) {
                tracing::error!(r#ref = %self.r#ref, error = %e, "failed to remove ingest directory");
            }
            return Err(Error::already_exists(format!("content {digest}")));
        }
        let ingest = self.path.join("data");
        fs::rename(&ingest, &target).map_err(|e| io_error("committing blob", e))?;
        // A blob never changes once committed.
        let _ = fs::set_permissions(&target, fs::Permissions::from_mode(0o444));
        sync_dir(&dir).map_err(|e| io_error("syncing blob directory", e))?;
        if let Err(e) = fs::remove_dir_all(&self.path) {
            tracing::error!(r#ref = %self.r#ref, error = %e, "failed to remove ingest directory");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
