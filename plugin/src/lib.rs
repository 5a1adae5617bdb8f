//! rustoverlay: a Docker network and IPAM plugin that gives plain Docker hosts
//! shared multi-host VXLAN overlays, with a key-value store as the single
//! source of truth.
//!
//! Layers, each a folder, dependencies pointing down only (ARCHITECTURE.md):
//! `api` (Docker's HTTP) -> `driver` (NetworkDriver on this host) -> `sync`
//! (loops from the store to the kernel) -> `control` (domain over the store)
//! -> `state` (store schema); `dataplane` (the kernel, behind a trait) under
//! `driver` and `sync`; `util` under all. `cmd` wires them together.

pub mod api;
pub mod cli;
pub mod cmd;
pub mod control;
pub mod dataplane;
pub mod dns;
pub mod docker;
pub mod driver;
pub mod error;
pub mod state;
pub mod sync;
pub mod telemetry;
pub mod util;
