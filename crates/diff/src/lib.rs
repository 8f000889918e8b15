//! Layer application and comparison.
//!
//! - [`apply`]: root-confined tar extraction ([`confined`] resolves every path with
//!   `openat2(RESOLVE_IN_ROOT)`), whiteouts applied or translated for overlay;
//! - [`compression`]: gzip/zstd detection and a decompress+hash pipeline thread;
//! - [`compare`]: the double walk that writes a layer from two trees;
//! - [`walking`]: `io.containerd.differ.v1.walking` on top of the content store;
//! - [`processor`]: the `stream_processors` config;
//! - [`unpack`]: the daemon-side unpacker (layers → chain-ID snapshots).

pub mod apply;
pub mod compare;
pub mod compression;
pub mod confined;
pub mod processor;
pub mod unpack;
pub mod walking;

mod plugin;

pub use plugin::{DiffConfig, DifferInstance, registrations};
