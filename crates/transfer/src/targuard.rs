//! A bound on what the `tar` crate reads into memory from an archive.
//!
//! The `tar` crate reads the data of GNU long-name (`L`), long-link (`K`) and PAX
//! extended-header (`x`) entries whole into a `Vec` before it hands out the entry they
//! describe, whatever size their header declares, and turns each extension block of a
//! GNU sparse (`S`) entry into an in-memory list: an archive of one such entry as large
//! as the stream makes the daemon hold all of it (the CVE-2023-25153 / GHSA-259w-8hf6-59c2
//! class; Go's `archive/tar`, containerd's reader, refuses special entries over 1 MiB).
//! [`TarGuard`] sits between the stream and the `tar` crate and follows the archive's
//! blocks as the crate does (headers, data rounded up to 512 bytes, a PAX `size` record
//! overriding the next entry's header size, the end at the first all-zero block), and
//! fails the read that completes an extension header declaring more than
//! [`MAX_TAR_EXTENSION`] bytes, or a GNU sparse header (image archives have none).
//! Whatever it cannot follow (a bad checksum) it passes on untouched for the crate to
//! refuse.

use std::io::{self, Read};

/// Largest GNU long-name / long-link or PAX extended-header entry: Go's
/// `archive/tar` `maxSpecialFileSize`.
pub(crate) const MAX_TAR_EXTENSION: u64 = 1 << 20;

const BLOCK: usize = 512;

enum State {
    /// Collecting a header block.
    Header { buf: Box<[u8; BLOCK]>, have: usize },
    /// Data and padding of an entry still to pass.
    Skip(u64),
    /// A PAX extended header's data (its `size` record is needed), then its padding.
    Pax { data: Vec<u8>, size: u64, pad: u64 },
    /// Past the end of the archive, or lost: everything passes.
    Done,
    /// An error was returned; every later read returns it again.
    Failed(String),
}

pub(crate) struct TarGuard<R> {
    inner: R,
    state: State,
    /// The `size` record of the PAX header describing the next entry.
    pax_size: Option<u64>,
}

fn header_state() -> State {
    State::Header {
        buf: Box::new([0u8; BLOCK]),
        have: 0,
    }
}

fn padded(size: u64) -> Option<u64> {
    size.checked_add(BLOCK as u64 - 1)
        .map(|s| s & !(BLOCK as u64 - 1))
}

/// The `tar` crate's `pax_extensions_value(…, "size")`.
fn pax_size(data: &[u8]) -> Option<u64> {
    for ext in tar::PaxExtensions::new(data) {
        let ext = ext.ok()?;
        if ext.key() != Ok("size") {
            continue;
        }
        return ext.value().ok()?.parse().ok();
    }
    None
}

impl<R: Read> TarGuard<R> {
    pub(crate) fn new(inner: R) -> TarGuard<R> {
        TarGuard {
            inner,
            state: header_state(),
            pax_size: None,
        }
    }

    /// What a complete header block means for the bytes after it.
    fn header(&mut self, block: &[u8; BLOCK]) -> Result<State, String> {
        if block.iter().all(|b| *b == 0) {
            return Ok(State::Done);
        }
        let h = tar::Header::from_byte_slice(block);
        let sum: u32 = block[..148]
            .iter()
            .chain(&block[156..])
            .map(|b| u32::from(*b))
            .sum::<u32>()
            + 8 * 32;
        let Ok(size) = h.entry_size() else {
            return Ok(State::Done);
        };
        if h.cksum().ok() != Some(sum) {
            return Ok(State::Done);
        }
        let kind = h.entry_type();
        let what = if kind.is_gnu_longname() {
            Some("GNU long name")
        } else if kind.is_gnu_longlink() {
            Some("GNU long link")
        } else if kind.is_pax_local_extensions() {
            Some("PAX extended header")
        } else {
            None
        };
        if let Some(what) = what {
            if size > MAX_TAR_EXTENSION {
                return Err(format!(
                    "tar {what} entry of {size} bytes is larger than the {MAX_TAR_EXTENSION} allowed"
                ));
            }
            let recognized = h.as_ustar().is_some() || h.as_gnu().is_some();
            let Some(total) = padded(size) else {
                return Ok(State::Done);
            };
            if kind.is_pax_local_extensions() && recognized {
                return Ok(State::Pax {
                    data: Vec::with_capacity(size as usize),
                    size,
                    pad: total - size,
                });
            }
            return Ok(State::Skip(total));
        }
        if kind.is_gnu_sparse() {
            return Err("GNU sparse tar entries are not supported in image archives".into());
        }
        // A PAX header describes the next entry that is not an extension header
        // (`x` headers only count from ustar or GNU headers, as the crate has it).
        let size = match self.pax_size.take() {
            Some(s) if !kind.is_pax_global_extensions() => s,
            _ => size,
        };
        Ok(padded(size).map_or(State::Done, State::Skip))
    }

    /// Follows the blocks in `bytes`, the next ones of the stream.
    fn observe(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Done => return Ok(()),
                State::Failed(e) => return Err(e.clone()),
                State::Skip(left) => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    bytes = &bytes[n as usize..];
                    if *left == 0 {
                        self.state = header_state();
                    }
                }
                State::Pax { data, size, pad } => {
                    let want = (*size - data.len() as u64).min(bytes.len() as u64) as usize;
                    data.extend_from_slice(&bytes[..want]);
                    bytes = &bytes[want..];
                    if data.len() as u64 == *size {
                        if let Some(s) = pax_size(data) {
                            self.pax_size = Some(s);
                        }
                        self.state = if *pad == 0 {
                            header_state()
                        } else {
                            State::Skip(*pad)
                        };
                    }
                }
                State::Header { buf, have } => {
                    let n = (BLOCK - *have).min(bytes.len());
                    buf[*have..*have + n].copy_from_slice(&bytes[..n]);
                    *have += n;
                    bytes = &bytes[n..];
                    if *have == BLOCK {
                        let block = std::mem::replace(buf, Box::new([0u8; BLOCK]));
                        match self.header(&block) {
                            Ok(State::Skip(0)) => self.state = header_state(),
                            Ok(s) => self.state = s,
                            Err(e) => {
                                self.state = State::Failed(e.clone());
                                return Err(e);
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let State::Failed(e) = &self.state {
            return Err(io::Error::new(io::ErrorKind::InvalidData, e.clone()));
        }
        let n = self.inner.read(buf)?;
        self.observe(&buf[..n])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(entries: &[(tar::EntryType, &str, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (kind, name, data) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(*kind);
            h.set_path(name).unwrap();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append(&h, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn names(bytes: &[u8]) -> std::io::Result<Vec<(String, Vec<u8>)>> {
        let mut a = tar::Archive::new(TarGuard::new(bytes));
        let mut out = vec![];
        for e in a.entries()? {
            let mut e = e?;
            let name = e.path()?.to_string_lossy().to_string();
            let mut data = vec![];
            e.read_to_end(&mut data)?;
            out.push((name, data));
        }
        Ok(out)
    }

    #[test]
    fn passes_ordinary_archives_with_long_names_and_pax_sizes() {
        let long = "d/".repeat(80) + "file";
        let bytes = archive(&[
            (tar::EntryType::Regular, "oci-layout", b"{}".to_vec()),
            (
                tar::EntryType::GNULongName,
                "././@LongLink",
                format!("{long}\0").into_bytes(),
            ),
            (tar::EntryType::Regular, "x", vec![7u8; 1000]),
            // A PAX size record overriding the header's (what Go writes past 8 GiB).
            (tar::EntryType::XHeader, "pax", b"12 size=600\n".to_vec()),
            (tar::EntryType::Regular, "big", vec![]),
        ]);
        // The last header says 0 bytes; the PAX record says 600: append them.
        let mut bytes = bytes[..bytes.len() - 1024].to_vec();
        bytes.extend(vec![9u8; 600]);
        bytes.extend(vec![0u8; 424 + 1024]);
        let got = names(&bytes).unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["oci-layout", long.as_str(), "big"]);
        assert_eq!(got[1].1, vec![7u8; 1000]);
        assert_eq!(got[2].1, vec![9u8; 600]);
    }

    #[test]
    fn refuses_oversized_extension_entries_and_sparse_files() {
        for kind in [
            tar::EntryType::GNULongName,
            tar::EntryType::GNULongLink,
            tar::EntryType::XHeader,
        ] {
            let bytes = archive(&[
                (kind, "ext", vec![b'a'; MAX_TAR_EXTENSION as usize + 1]),
                (tar::EntryType::Regular, "f", vec![]),
            ]);
            let e = names(&bytes).unwrap_err();
            assert!(
                e.to_string().contains(&MAX_TAR_EXTENSION.to_string()),
                "{kind:?}: {e}"
            );
        }
        // One PAX record exactly as large as allowed.
        let head = format!("{MAX_TAR_EXTENSION} comment=");
        let mut comment = head.into_bytes();
        comment.resize(MAX_TAR_EXTENSION as usize - 1, b'c');
        comment.push(b'\n');
        let at_limit = archive(&[
            (tar::EntryType::XHeader, "ext", comment),
            (tar::EntryType::Regular, "f", b"ok".to_vec()),
        ]);
        assert_eq!(names(&at_limit).unwrap()[0].1, b"ok");
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_path("s").unwrap();
        h.set_size(0);
        h.set_cksum();
        let mut sparse = h.as_bytes().to_vec();
        sparse.extend([0u8; 1024]);
        let e = names(&sparse).unwrap_err();
        assert!(e.to_string().contains("sparse"), "{e}");
    }
}
