//! The domain over the store: cluster-wide IPAM (`ipam`), overlays with
//! their networks and endpoints (`overlay`), and reclaiming what gone hosts
//! held (`reclaim`). No kernel and no HTTP here: every promise of this layer
//! is kept by store transactions, so it is tested on the memory store alone.

pub mod cluster;
pub mod ipam;
pub mod names;
pub mod overlay;
pub mod reclaim;
pub mod status;
