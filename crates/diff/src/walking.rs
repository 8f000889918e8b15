//! `io.containerd.differ.v1.walking`: applies layer blobs from the content store to
//! snapshot mounts, and writes the difference of two mount sets as a new gzip layer.

use crate::apply::{ApplyOptions, Whiteouts, apply_tar};
use crate::compression::{self, Compression, HashingReader};
use crate::processor::StreamProcessor;
use berth_core::content::{ContentStore, Descriptor, Digest, ReaderAt, Scope, WriterOpts};
use berth_core::diff::{Applier, ApplyConfig, Comparer, DiffConfig, media_types as mt};
use berth_core::labels::UNCOMPRESSED;
use berth_core::mount::Mount;
use berth_core::{Error, Result};
use berth_snapshots::mount::TempMount;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

/// The walking differ.
#[derive(Clone)]
pub struct WalkingDiff {
    content: Arc<dyn ContentStore>,
    /// Where temporary mounts are made.
    tmp: PathBuf,
    processors: Arc<Vec<StreamProcessor>>,
}

/// Sequential reading of a blob.
struct BlobReader {
    inner: Box<dyn ReaderAt>,
    offset: i64,
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self
            .inner
            .read_at(buf, self.offset)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.offset += n as i64;
        Ok(n)
    }
}

/// Where an apply writes and how it treats whiteouts.
enum Target {
    Dir(PathBuf, Whiteouts),
    Mounted(TempMount),
}

fn target_for(mounts: &[Mount], tmp: &std::path::Path) -> Result<Target> {
    if let [m] = mounts {
        if m.r#type == "overlay"
            && let Some(upper) = m.option("upperdir")
        {
            let lowers = m
                .option("lowerdir")
                .map(|l| l.split(':').map(PathBuf::from).collect())
                .unwrap_or_default();
            return Ok(Target::Dir(
                PathBuf::from(upper),
                Whiteouts::Overlay {
                    lowers,
                    userxattr: m.options.iter().any(|o| o == "userxattr"),
                },
            ));
        }
        if m.r#type == "bind" && !m.is_readonly() {
            return Ok(Target::Dir(PathBuf::from(&m.source), Whiteouts::Apply));
        }
    }
    Ok(Target::Mounted(TempMount::new(mounts, tmp, false)?))
}

impl WalkingDiff {
    pub fn new(
        content: Arc<dyn ContentStore>,
        tmp: PathBuf,
        processors: Vec<StreamProcessor>,
    ) -> WalkingDiff {
        WalkingDiff {
            content,
            tmp,
            processors: Arc::new(processors),
        }
    }

    /// The blocking apply.
    pub fn apply_blocking(
        &self,
        scope: &Scope,
        desc: &Descriptor,
        mounts: &[Mount],
        config: &ApplyConfig,
    ) -> Result<Descriptor> {
        let digest = Digest::parse(&desc.digest)?;
        let reader = self.content.reader_at(scope, &digest)?;
        let mut stream: Box<dyn Read + Send> = Box::new(BlobReader {
            inner: reader,
            offset: 0,
        });
        let mut media_type = desc.media_type.clone();
        let mut children = Vec::new();
        let compression = loop {
            if let Some(c) = compression::for_media_type(&media_type) {
                break c;
            }
            let Some(p) = self.processors.iter().find(|p| p.accepts(&media_type)) else {
                return Err(Error::not_implemented(format!(
                    "unsupported diff media type: {media_type}"
                )));
            };
            let (out, child) = p.spawn(&media_type, stream)?;
            children.push(child);
            stream = out;
            media_type = p.returns.clone();
        };
        let _ = Compression::Uncompressed;
        let source = compression::decompress(stream, Some(compression))?;
        let (mut reader, producer) = compression::pipeline(source);
        let target = target_for(mounts, &self.tmp)?;
        let (dir, whiteouts) = match &target {
            Target::Dir(dir, w) => (dir.clone(), w.clone()),
            Target::Mounted(m) => (m.path().to_path_buf(), Whiteouts::Apply),
        };
        let applied = apply_tar(&dir, &mut reader, &ApplyOptions { whiteouts });
        let drained = applied.as_ref().ok().map(|_| reader.drain());
        drop(reader);
        let produced = producer
            .join()
            .map_err(|_| Error::unknown("decompression thread panicked"))?;
        if let Target::Mounted(m) = target {
            m.close()?;
        }
        for child in children {
            child.wait()?;
        }
        // A broken stream explains a failed apply better than the apply's own error.
        let (diff_id, size) = match (applied, produced) {
            (Err(e), Err(p)) if !p.message().contains("consumer stopped") => {
                return Err(p.context(e.message().to_string()));
            }
            (Err(e), _) => return Err(e),
            (Ok(_), Err(p)) => return Err(p),
            (Ok(_), Ok(v)) => v,
        };
        if let Some(Err(e)) = drained {
            return Err(Error::unknown(format!("reading layer: {e}")));
        }
        if let Some(expected) = &config.expected_diff_id
            && *expected != diff_id
        {
            return Err(Error::failed_precondition(format!(
                "layer {}: uncompressed digest {diff_id} does not match the expected {expected}",
                desc.digest
            )));
        }
        Ok(Descriptor {
            media_type: mt::OCI_LAYER.to_string(),
            digest: diff_id,
            size: size as i64,
            annotations: Default::default(),
        })
    }

    /// The blocking compare.
    pub fn compare_blocking(
        &self,
        scope: &Scope,
        lower: &[Mount],
        upper: &[Mount],
        config: &DiffConfig,
    ) -> Result<Descriptor> {
        let media_type = if config.media_type.is_empty() {
            mt::OCI_LAYER_GZIP.to_string()
        } else {
            config.media_type.clone()
        };
        let compression = compression::for_media_type(&media_type).ok_or_else(|| {
            Error::invalid_argument(format!("unsupported diff media type: {media_type}"))
        })?;
        let lower_mount = if lower.is_empty() {
            None
        } else {
            Some(TempMount::new(lower, &self.tmp, true)?)
        };
        let empty = if lower_mount.is_none() {
            Some(berth_snapshots::mount::tempdir_in(&self.tmp)?)
        } else {
            None
        };
        let upper_mount = TempMount::new(upper, &self.tmp, true)?;
        let lower_path = lower_mount
            .as_ref()
            .map(|m| m.path().to_path_buf())
            .or(empty.clone())
            .expect("one of them");
        let reference = if config.reference.is_empty() {
            format!(
                "diff-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            )
        } else {
            config.reference.clone()
        };
        let writer = self.content.writer(
            scope,
            WriterOpts {
                r#ref: reference,
                total: 0,
                expected: None,
            },
        )?;
        let result = (|| -> Result<(String, Box<dyn berth_core::content::Writer>, u64)> {
            let sink = ContentSink { writer, count: 0 };
            let (diff_id, sink) = match compression {
                Compression::Gzip => {
                    let gz = flate2::write::GzEncoder::new(sink, flate2::Compression::default());
                    let hashing = HashingWriter::new(gz);
                    let hashing =
                        crate::compare::write_diff(&lower_path, upper_mount.path(), hashing)?;
                    let (id, gz) = hashing.finish();
                    (
                        id,
                        gz.finish()
                            .map_err(|e| Error::unknown(format!("gzip: {e}")))?,
                    )
                }
                Compression::Zstd => {
                    let z = zstd::stream::write::Encoder::new(sink, 3)
                        .map_err(|e| Error::unknown(format!("zstd: {e}")))?;
                    let hashing = HashingWriter::new(z);
                    let hashing =
                        crate::compare::write_diff(&lower_path, upper_mount.path(), hashing)?;
                    let (id, z) = hashing.finish();
                    (
                        id,
                        z.finish()
                            .map_err(|e| Error::unknown(format!("zstd: {e}")))?,
                    )
                }
                Compression::Uncompressed => {
                    let hashing = HashingWriter::new(sink);
                    let hashing =
                        crate::compare::write_diff(&lower_path, upper_mount.path(), hashing)?;
                    hashing.finish()
                }
            };
            Ok((diff_id, sink.writer, sink.count))
        })();
        upper_mount.close()?;
        if let Some(m) = lower_mount {
            m.close()?;
        }
        if let Some(dir) = empty {
            let _ = std::fs::remove_dir(dir);
        }
        let (diff_id, mut writer, size) = result?;
        let digest = writer.digest();
        let mut labels = config.labels.clone();
        labels.insert(UNCOMPRESSED.to_string(), diff_id);
        match writer.commit(size as i64, Some(&digest), labels) {
            Ok(()) => {}
            Err(e) if e.is(berth_core::error::ErrorKind::AlreadyExists) => {}
            Err(e) => return Err(e),
        }
        Ok(Descriptor {
            media_type,
            digest: digest.to_string(),
            size: size as i64,
            annotations: Default::default(),
        })
    }
}

struct ContentSink {
    writer: Box<dyn berth_core::content::Writer>,
    count: u64,
}

impl Write for ContentSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer
            .write(buf)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.count += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Hashes what is written through it (the diffID of a produced layer).
struct HashingWriter<W> {
    inner: W,
    hasher: HashingReader<std::io::Empty>,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: HashingReader::new(std::io::empty()),
        }
    }
    fn finish(self) -> (String, W) {
        (self.hasher.finish().0, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[async_trait::async_trait]
impl Applier for WalkingDiff {
    async fn apply(
        &self,
        scope: &Scope,
        desc: &Descriptor,
        mounts: &[Mount],
        config: ApplyConfig,
    ) -> Result<Descriptor> {
        let this = self.clone();
        let (scope, desc, mounts) = (scope.clone(), desc.clone(), mounts.to_vec());
        tokio::task::spawn_blocking(move || this.apply_blocking(&scope, &desc, &mounts, &config))
            .await
            .map_err(|e| Error::unknown(format!("apply task failed: {e}")))?
    }
}

#[async_trait::async_trait]
impl Comparer for WalkingDiff {
    async fn compare(
        &self,
        scope: &Scope,
        lower: &[Mount],
        upper: &[Mount],
        config: DiffConfig,
    ) -> Result<Descriptor> {
        let this = self.clone();
        let (scope, lower, upper) = (scope.clone(), lower.to_vec(), upper.to_vec());
        tokio::task::spawn_blocking(move || this.compare_blocking(&scope, &lower, &upper, &config))
            .await
            .map_err(|e| Error::unknown(format!("diff task failed: {e}")))?
    }
}
