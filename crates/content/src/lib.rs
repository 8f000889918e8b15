//! The local content store (`io.containerd.content.v1.content`): containerd's
//! `content/local` layout and semantics.
//!
//! ```text
//! {root}/blobs/<alg>/<hex>             committed, read-only blobs
//! {root}/ingest/<sha256(ref)>/         one in-progress write ("ingest")
//!     ref        the client's ref (never used raw as a file name)
//!     data       the bytes written so far
//!     total      declared size, if known
//!     startedat  updatedat   unix nanoseconds
//! ```
//!
//! Crash safety: a blob only appears under `blobs/` by an atomic rename of a fsynced data
//! file, followed by a fsync of the directory, so a blob is always complete. An ingest is
//! resumed at the length of its data file (re-hashing it). [`LocalStore::open`] repairs
//! what a crash can leave behind: temporary files, ingest directories without a valid
//! `ref`/`data`, and stray names under `blobs/`.
//!
//! Throughput: a writer hashes writes of 64 KiB or more on a thread of its own (the
//! buffers are shared, not copied, when they come in as `Bytes`), so a write returns once
//! the data is in the file; the digest is joined at commit, after the fsync, and verified
//! before the rename. Every 8 MiB the writer starts the kernel's writeback of what it
//! wrote (`sync_file_range`), so the fsync at commit is left with the tail.

mod local;
mod plugin;

pub use local::LocalStore;
pub use plugin::{ContentConfig, registration, registrations};
