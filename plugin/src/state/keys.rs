//! The store's key layout, in one place. Every key the plugin reads or writes is
//! built here, so a reader can see the whole schema at a glance:
//!
//! ```text
//! /rustoverlay/v1/ipam/pools                      index of claimed subnets (CAS'd as a whole)
//! /rustoverlay/v1/ipam/pool/<pool>/record         subnet, ip-range, gateway, aux, refs per host
//! /rustoverlay/v1/ipam/pool/<pool>/alloc          allocation cursor and free-queue bounds
//! /rustoverlay/v1/ipam/pool/<pool>/addr/<ip>      one allocated address
//! /rustoverlay/v1/ipam/pool/<pool>/free/<seq>     released address waiting for reuse (FIFO)
//! /rustoverlay/v1/ipam/pool/<pool>/bound/<ip>     the endpoint an address is bound to
//! /rustoverlay/v1/vni/next                        VNI allocation cursor
//! /rustoverlay/v1/vni/<vni>                       VNI claim -> overlay
//! /rustoverlay/v1/overlay/<overlay>/record        VNI, subnets, Docker networks per host
//! /rustoverlay/v1/overlay/<overlay>/ep/<ep>       endpoint: address, MAC, host, VTEP
//! /rustoverlay/v1/host/<host>/net/<docker-net>    this host's Docker network -> overlay
//! /rustoverlay/v1/hosts/<host>                    live host registration (under a lease)
//! /rustoverlay/v1/reaper                          the host that reclaims gone hosts (under its lease)
//! /rustoverlay/v1/names/<overlay>/<host>/<ep>     a container's names on the overlay (under the host's lease)
//! /rustoverlay/v1/cluster/<overlay>               a network defined once for every host (`-o cluster=true`)
//! /rustoverlay/v1/overlay/<overlay>/epgen         touched by every endpoint created on a cluster network
//! ```
//!
//! `<pool>` and `<overlay>` are the subnet with `/` replaced by `_`
//! (`10.77.0.0_24`), so the same subnet names the same pool on every host.

use ipnetwork::IpNetwork;
use std::net::IpAddr;

pub const ROOT: &str = "/rustoverlay/v1/";

/// A subnet as a key segment: `10.77.0.0/24` -> `10.77.0.0_24`.
pub fn subnet_segment(net: &IpNetwork) -> String {
    format!("{}_{}", net.network(), net.prefix())
}

pub fn pools_index() -> String {
    format!("{ROOT}ipam/pools")
}

pub fn pool_prefix(pool: &str) -> String {
    format!("{ROOT}ipam/pool/{pool}/")
}

pub fn pool_record(pool: &str) -> String {
    format!("{ROOT}ipam/pool/{pool}/record")
}

pub fn pool_alloc(pool: &str) -> String {
    format!("{ROOT}ipam/pool/{pool}/alloc")
}

pub fn pool_addr_prefix(pool: &str) -> String {
    format!("{ROOT}ipam/pool/{pool}/addr/")
}

pub fn pool_addr(pool: &str, ip: IpAddr) -> String {
    format!("{ROOT}ipam/pool/{pool}/addr/{ip}")
}

/// The endpoint an address is bound to: written and removed with the
/// endpoint's record, so one address has at most one endpoint, and the
/// address cannot be released while its endpoint's record stays.
pub fn pool_bound(pool: &str, ip: IpAddr) -> String {
    format!("{ROOT}ipam/pool/{pool}/bound/{ip}")
}

/// A host's claimed run of a pool (`records::ClaimedRun`).
pub fn pool_run(pool: &str, host: &str) -> String {
    format!("{ROOT}ipam/pool/{pool}/run/{host}")
}

pub fn pool_runs(pool: &str) -> String {
    format!("{ROOT}ipam/pool/{pool}/run/")
}

pub fn pool_free(pool: &str, seq: u64) -> String {
    // Zero-padded so that key order is queue order.
    format!("{ROOT}ipam/pool/{pool}/free/{seq:020}")
}

pub fn vni_next() -> String {
    format!("{ROOT}vni/next")
}

pub fn vni_claim(vni: u32) -> String {
    format!("{ROOT}vni/{vni}")
}

/// Prefix of the VNI claims (and the cursor, `vni/next`).
pub fn vni_prefix() -> String {
    format!("{ROOT}vni/")
}

pub fn overlay_record(overlay: &str) -> String {
    format!("{ROOT}overlay/{overlay}/record")
}

pub fn overlay_endpoints(overlay: &str) -> String {
    format!("{ROOT}overlay/{overlay}/ep/")
}

pub fn endpoint(overlay: &str, endpoint_id: &str) -> String {
    format!("{ROOT}overlay/{overlay}/ep/{endpoint_id}")
}

pub fn host_networks(host: &str) -> String {
    format!("{ROOT}host/{host}/net/")
}

pub fn host_network(host: &str, docker_network: &str) -> String {
    format!("{ROOT}host/{host}/net/{docker_network}")
}

pub fn hosts() -> String {
    format!("{ROOT}hosts/")
}

pub fn host_registration(host: &str) -> String {
    format!("{ROOT}hosts/{host}")
}

pub fn reaper() -> String {
    format!("{ROOT}reaper")
}

/// Every published name on an overlay.
pub fn overlay_names(overlay: &str) -> String {
    format!("{ROOT}names/{overlay}/")
}

/// One host's published names on an overlay.
pub fn host_names(overlay: &str, host: &str) -> String {
    format!("{ROOT}names/{overlay}/{host}/")
}

/// The names of one endpoint's container.
pub fn endpoint_names(overlay: &str, host: &str, endpoint_id: &str) -> String {
    format!("{ROOT}names/{overlay}/{host}/{endpoint_id}")
}

/// Every network defined once for the whole cluster.
pub fn cluster_networks() -> String {
    format!("{ROOT}cluster/")
}

pub fn cluster_network(overlay: &str) -> String {
    format!("{ROOT}cluster/{overlay}")
}

/// Written by each CreateEndpoint on a cluster network, so that a removal
/// that saw no endpoint can tell that one was created since.
pub fn overlay_epgen(overlay: &str) -> String {
    format!("{ROOT}overlay/{overlay}/epgen")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_prefix_does_not_cover_longer_pool_names() {
        // 10.0.0.0/2 must not own the keys of 10.0.0.0/24.
        let short = pool_prefix("10.0.0.0_2");
        let long = pool_record("10.0.0.0_24");
        assert!(!long.starts_with(&short));
    }

    #[test]
    fn segment_is_canonical() {
        let net: IpNetwork = "10.77.0.9/24".parse().unwrap();
        let net = IpNetwork::new(net.network(), net.prefix()).unwrap();
        assert_eq!(subnet_segment(&net), "10.77.0.0_24");
        let v6: IpNetwork = "fd00:77::/64".parse().unwrap();
        assert_eq!(subnet_segment(&v6), "fd00:77::_64");
    }
}
