//! Berth's registry client (distribution spec v2) and pull pipeline.
//!
//! - [`reference`]: image references (`host/repo:tag@digest`), strict and Docker-style.
//! - [`hosts`]: containerd's `hosts.toml` (`config_path`) and the deprecated CRI
//!   `registry.mirrors`/`configs` keys.
//! - [`auth`]: `WWW-Authenticate` challenges, bearer tokens, basic auth, Docker
//!   `config.json` credentials.
//! - [`client`]: the [`Resolver`] — resolve (HEAD/GET on manifests), fetch (ranges,
//!   foreign URLs), push (exists check, cross-repo mount, monolithic or chunked upload),
//!   per-host TLS, retries with backoff and fallback across hosts.
//! - [`manifest`], [`platform`]: OCI / Docker schema 2 manifests and indexes, platform
//!   matching; schema 1 refused.
//! - [`pull`]: the pipeline into a [`pull::BlobSink`], with progress, cancellation and
//!   an in-order layer hook for pipelined unpacking.

pub mod auth;
pub mod client;
pub mod hosts;
pub mod manifest;
pub mod platform;
pub mod pull;
pub mod reference;
pub mod store_sink;
pub mod verify;

pub use client::{Resolved, Resolver, ResolverOptions};
pub use platform::Platform;
pub use reference::Reference;
