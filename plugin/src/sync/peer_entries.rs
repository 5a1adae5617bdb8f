//! The FDB and neighbour entries an overlay's remote endpoints call for,
//! and how the kernel's differ: shared by peer sync (which converges the
//! kernel) and `status` (which reports the drift).

use crate::dataplane::{KernelPeers, PeerEntry};
use crate::state::records::EndpointRecord;
use crate::util::mac::parse_mac;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

/// What the kernel should hold for these remote endpoints: for every MAC
/// and IP, the entry of the newest record that has it. Two records can
/// share an address for a moment (a stale record beside a re-issued one);
/// deriving entries from all records means removing one record never
/// removes the other's entries.
pub fn desired_of<'a>(remote: impl Iterator<Item = &'a EndpointRecord>) -> Desired {
    let mut remote: Vec<&EndpointRecord> = remote.collect();
    remote.sort_by(|a, b| (a.created_at, &a.endpoint_id).cmp(&(b.created_at, &b.endpoint_id)));
    let mut want = Desired::default();
    for ep in remote {
        for entry in entries(ep) {
            want.fdb.insert(entry.mac, entry.vtep);
            if let Some(ip) = entry.ip {
                want.neigh.insert(ip, entry.mac);
            }
        }
    }
    want
}

/// How the kernel differs from what is wanted.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Entries to add: an FDB entry missing or pointing elsewhere, or a
    /// neighbour entry missing or with another MAC.
    pub missing: Vec<PeerEntry>,
    /// FDB entries (MACs) and neighbour entries (IPs) no record calls for.
    pub stale_fdb: Vec<[u8; 6]>,
    pub stale_neigh: Vec<IpAddr>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.stale_fdb.is_empty() && self.stale_neigh.is_empty()
    }
}

pub fn diff(want: &Desired, have: &KernelPeers) -> Diff {
    let mut stale_fdb: Vec<[u8; 6]> = have
        .fdb
        .keys()
        .filter(|m| !want.fdb.contains_key(*m))
        .copied()
        .collect();
    let mut stale_neigh: Vec<IpAddr> = have
        .neigh
        .keys()
        .filter(|ip| !want.neigh.contains_key(*ip))
        .copied()
        .collect();
    let mut missing: Vec<PeerEntry> = want
        .entries()
        .into_iter()
        .filter(|entry| {
            let fdb_ok = have.fdb.get(&entry.mac) == Some(&entry.vtep);
            let neigh_ok = entry
                .ip
                .is_none_or(|ip| have.neigh.get(&ip) == Some(&entry.mac));
            !(fdb_ok && neigh_ok)
        })
        .collect();
    stale_fdb.sort();
    stale_neigh.sort();
    missing.sort_by_key(|e| (e.mac, e.ip));
    Diff {
        missing,
        stale_fdb,
        stale_neigh,
    }
}

/// The entries the kernel should hold for an overlay.
#[derive(Debug, Default)]
pub struct Desired {
    pub fdb: HashMap<[u8; 6], IpAddr>,
    pub neigh: HashMap<IpAddr, [u8; 6]>,
}

impl Desired {
    /// As add operations: each IP with its MAC, then MACs without an IP.
    pub fn entries(&self) -> Vec<PeerEntry> {
        // Every neighbour's MAC has an FDB entry (both come from one record).
        let mut out: Vec<PeerEntry> = self
            .neigh
            .iter()
            .filter_map(|(ip, mac)| {
                Some(PeerEntry {
                    mac: *mac,
                    ip: Some(*ip),
                    vtep: *self.fdb.get(mac)?,
                })
            })
            .collect();
        let with_ip: HashSet<[u8; 6]> = out.iter().map(|e| e.mac).collect();
        out.extend(
            self.fdb
                .iter()
                .filter(|(mac, _)| !with_ip.contains(*mac))
                .map(|(mac, vtep)| PeerEntry {
                    mac: *mac,
                    ip: None,
                    vtep: *vtep,
                }),
        );
        out
    }
}

/// The kernel entries of one endpoint (IPv4 and IPv6 share the MAC).
pub fn entries(ep: &EndpointRecord) -> Vec<PeerEntry> {
    let Some(mac) = parse_mac(&ep.mac) else {
        tracing::warn!(endpoint = %ep.endpoint_id, mac = %ep.mac, "endpoint with an invalid MAC");
        return vec![];
    };
    let ips: Vec<Option<IpAddr>> = match (ep.ipv4, ep.ipv6) {
        (None, None) => vec![None],
        (a, b) => [a, b].into_iter().flatten().map(|n| Some(n.ip())).collect(),
    };
    ips.into_iter()
        .map(|ip| PeerEntry {
            mac,
            ip,
            vtep: ep.vtep,
        })
        .collect()
}
