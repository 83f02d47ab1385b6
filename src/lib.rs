//! `dfs`: a small self-hosted distributed file system.
//!
//! # Layout
//! - [`rpc`]: generated gRPC code (`proto/dfs.proto`) and shared transport settings.
//! - [`master`]: the metadata daemon: namespace in an embedded ACID store, worker registry and
//!   health, placement, cluster status and the event feed. It never carries file bytes.
//! - [`worker`]: the storage daemon: self-describing chunk files written durably, the pipelined
//!   write path, checksum-verified reads, registration and heartbeats.
//! - [`client`]: the library every front end uses (CLI, console, tests): streamed uploads and
//!   downloads verified end to end, with retries and replica fail-over.
//! - [`cluster`]: a whole cluster in one process (master + N workers on port 0).
//! - [`cli`]: the scriptable `dfs-tui --cmd` front end.
//! - Small shared modules: [`chunk`] (ids, checksums, on-disk format), [`digest`] (whole-file
//!   digests), [`names`], [`config`], [`events`], [`logging`], [`server`].

pub mod chunk;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod digest;
pub mod events;
pub mod groupsync;
pub mod logging;
pub mod logwriter;
pub mod master;
pub mod names;
pub mod prealloc;
pub mod procstat;
pub mod rpc;
pub mod security;
pub mod server;
pub mod ui;
pub mod worker;
