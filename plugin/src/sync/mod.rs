//! Long-running loops from the store to this host's kernel: one generic
//! list-watch-resync loop (`follow`) that the others reuse, peer sync
//! (`peers`), membership (`membership`: registration and the live set), the
//! devices that follow local endpoints (`devices`), reconciliation at start,
//! after a lost lease and of orphans (`reconcile`), the gone-host reaper
//! (`reaper`, one per cluster, elected in `leader`, its census in
//! `census_feed`), container names
//! (`publish`: Docker's API -> store; `names`: store -> each overlay's
//! resolver), and the supervisor that starts them and owns readiness.

pub mod census_feed;
pub mod cluster;
pub mod devices;
pub mod drift;
pub mod engine;
pub mod follow;
pub mod leader;
pub mod membership;
pub mod names;
pub mod path_probe;
pub mod peer_entries;
pub mod peers;
pub mod publish;
pub mod readiness;
pub mod reaper;
pub mod reconcile;
pub mod supervisor;
