//! The resolver that gives containers each other's names across hosts.
//!
//! dockerd answers only for its own host's containers and forwards every
//! other name to the daemon's `dns` servers, from inside the container's
//! namespace. With `"dns": ["169.254.53.53"]` those queries reach us: inside
//! each overlay's namespace (a route that Join hands Docker) for overlay
//! containers, and on the host for everyone else. We answer the names the
//! other hosts published in the store and relay the rest, unchanged, to the
//! host's own upstream servers.
//!
//! This layer knows DNS only; the sockets are made by `dataplane` (inside a
//! namespace) and the names are kept current by `sync`.

pub mod forward;
pub mod message;
pub mod server;
pub mod table;
pub mod upstreams;

pub use forward::Forwarder;
pub use server::{Acl, DockerBridges, Resolver, Scope};
pub use table::{NameEntry, NameTable};
pub use upstreams::Upstreams;

/// The resolver's address unless `--dns-address` says otherwise.
pub const DEFAULT_ADDRESS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 53, 53);
