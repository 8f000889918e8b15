//! Layer compression: detection by media type and magic bytes, decompression, and a
//! two-thread pipeline that decompresses and hashes while the consumer writes files.

use berth_core::diff::media_types as mt;
use berth_core::{Error, Result};
use sha2::{Digest as _, Sha256};
use std::io::{self, BufRead, BufReader, Read};
use std::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Uncompressed,
    Gzip,
    Zstd,
}

/// Whether `media_type` is a layer this crate applies, and with which compression
/// (`None`: not a layer type; the caller may try stream processors).
pub fn for_media_type(media_type: &str) -> Option<Compression> {
    // Docker and OCI types, with `+gzip`-style suffixes on unknown bases too.
    match media_type {
        mt::OCI_LAYER | mt::OCI_LAYER_NONDIST | mt::DOCKER_LAYER => Some(Compression::Uncompressed),
        mt::OCI_LAYER_GZIP
        | mt::OCI_LAYER_NONDIST_GZIP
        | mt::DOCKER_LAYER_GZIP
        | mt::DOCKER_LAYER_FOREIGN_GZIP => Some(Compression::Gzip),
        mt::OCI_LAYER_ZSTD | mt::OCI_LAYER_NONDIST_ZSTD => Some(Compression::Zstd),
        _ => None,
    }
}

/// Detects compression from the first bytes of a stream.
pub fn detect(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::Uncompressed
    }
}

/// Wraps `reader` in a decompressor; with `None`, the compression is detected from the
/// stream's first bytes (containerd's `DecompressStream`).
pub fn decompress<R: Read + Send + 'static>(
    reader: R,
    compression: Option<Compression>,
) -> Result<Box<dyn Read + Send>> {
    let mut buffered = BufReader::with_capacity(1 << 20, reader);
    let compression = match compression {
        Some(c) => c,
        None => detect(
            buffered
                .fill_buf()
                .map_err(|e| Error::unknown(format!("reading layer: {e}")))?,
        ),
    };
    Ok(match compression {
        Compression::Uncompressed => Box::new(buffered),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(buffered)
                .map_err(|e| Error::unknown(format!("zstd: {e}")))?,
        ),
    })
}

/// A reader that hashes (sha256) and counts what passes through.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Hashes bytes that did not come through `read` (a writer's side).
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.count += data.len() as u64;
    }

    /// `sha256:<hex>` and the byte count.
    pub fn finish(self) -> (String, u64) {
        (
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.count,
        )
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

const CHUNK: usize = 256 * 1024;

/// The consuming end of [`pipeline`].
pub struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    pos: usize,
    done: bool,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.current = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl ChannelReader {
    /// Reads and discards the rest (so the producer hashes the whole stream).
    pub fn drain(&mut self) -> io::Result<u64> {
        io::copy(self, &mut io::sink())
    }
}

/// Runs `source` (decompression + hashing) on its own thread, handing the bytes to
/// the returned reader; the join handle yields the uncompressed digest and size once
/// the stream has been read to its end.
pub fn pipeline(
    source: Box<dyn Read + Send>,
) -> (
    ChannelReader,
    std::thread::JoinHandle<Result<(String, u64)>>,
) {
    let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(16);
    let handle = std::thread::Builder::new()
        .name("layer-decompress".into())
        .spawn(move || {
            let mut reader = HashingReader::new(source);
            loop {
                let mut chunk = vec![0u8; CHUNK];
                let mut filled = 0;
                while filled < CHUNK {
                    match reader.read(&mut chunk[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            let msg = format!("decompressing layer: {e}");
                            let _ = tx.send(Err(io::Error::other(msg.clone())));
                            return Err(Error::invalid_argument(msg));
                        }
                    }
                }
                if filled == 0 {
                    break;
                }
                chunk.truncate(filled);
                if tx.send(Ok(chunk)).is_err() {
                    // The consumer stopped (it failed); its error is reported.
                    return Err(Error::unknown("layer consumer stopped"));
                }
            }
            Ok(reader.finish())
        })
        .expect("spawning the decompression thread");
    (
        ChannelReader {
            rx,
            current: Vec::new(),
            pos: 0,
            done: false,
        },
        handle,
    )
}
