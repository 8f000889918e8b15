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

mod local;
mod plugin;

pub use local::LocalStore;
pub use plugin::{ContentConfig, registration, registrations};
