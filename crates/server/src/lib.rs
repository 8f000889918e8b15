//! `berthd`: containerd's daemon shape in Rust. This crate reads `config.toml`, wires
//! every crate's plugin registrations together, serves them on the gRPC, ttrpc, metrics
//! and debug endpoints, and runs the daemon's lifecycle (signals, shutdown, state dumps).

pub mod config;
pub mod daemon;
pub mod endpoints;
pub mod grpc;
mod lazy_native;
pub mod logging;
pub mod notify;
pub mod opt;
pub mod plugins;
pub mod publish;
pub mod sockets;
pub mod state;
pub mod ttrpc_server;
