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

/// An overlay's endpoint records by ID, indexed by the MACs and IPs of
/// their entries: a change settles the entries it touches from the few
/// records that share them, not from all of them (at 5,000 endpoints,
/// deriving everything again for each event made peer sync fall behind).
#[derive(Debug, Default)]
pub struct Known {
    records: HashMap<String, EndpointRecord>,
    by_mac: HashMap<[u8; 6], HashSet<String>>,
    by_ip: HashMap<IpAddr, HashSet<String>>,
}

impl Known {
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn contains_key(&self, id: &str) -> bool {
        self.records.contains_key(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &EndpointRecord)> {
        self.records.iter()
    }

    pub fn values(&self) -> impl Iterator<Item = &EndpointRecord> {
        self.records.values()
    }

    /// Add or replace a record; the one it replaced.
    pub fn insert(&mut self, id: String, ep: EndpointRecord) -> Option<EndpointRecord> {
        let old = self.remove(&id);
        for entry in entries(&ep) {
            self.by_mac.entry(entry.mac).or_default().insert(id.clone());
            if let Some(ip) = entry.ip {
                self.by_ip.entry(ip).or_default().insert(id.clone());
            }
        }
        self.records.insert(id, ep);
        old
    }

    pub fn remove(&mut self, id: &str) -> Option<EndpointRecord> {
        let old = self.records.remove(id)?;
        for entry in entries(&old) {
            unindex(&mut self.by_mac, &entry.mac, id);
            if let Some(ip) = entry.ip {
                unindex(&mut self.by_ip, &ip, id);
            }
        }
        Some(old)
    }

    /// Every record with one of these entries' MACs or IPs, and every record
    /// sharing a MAC with those: all that decides those entries.
    pub fn sharing(&self, touched: &[PeerEntry]) -> Vec<&EndpointRecord> {
        let mut ids: HashSet<&String> = HashSet::new();
        for entry in touched {
            ids.extend(self.by_mac.get(&entry.mac).into_iter().flatten());
            if let Some(ip) = entry.ip {
                ids.extend(self.by_ip.get(&ip).into_iter().flatten());
            }
        }
        // An IP's entry names its MAC's VTEP: the records with that MAC too.
        let macs: Vec<[u8; 6]> = ids
            .iter()
            .filter_map(|id| self.records.get(*id))
            .flat_map(entries)
            .map(|e| e.mac)
            .collect();
        for mac in macs {
            ids.extend(self.by_mac.get(&mac).into_iter().flatten());
        }
        ids.into_iter()
            .filter_map(|id| self.records.get(id))
            .collect()
    }
}

fn unindex<K: std::hash::Hash + Eq>(index: &mut HashMap<K, HashSet<String>>, key: &K, id: &str) {
    if let Some(ids) = index.get_mut(key) {
        ids.remove(id);
        if ids.is_empty() {
            index.remove(key);
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, mac: &str, ip: &str, vtep: &str, created_at: u64) -> EndpointRecord {
        EndpointRecord {
            endpoint_id: id.into(),
            network_id: "n".into(),
            host: "b".into(),
            vtep: vtep.parse().unwrap(),
            mac: mac.into(),
            ipv4: Some(format!("{ip}/24").parse().unwrap()),
            ipv6: None,
            created_at,
            created_ms: 0,
        }
    }

    fn ids(recs: Vec<&EndpointRecord>) -> Vec<String> {
        let mut out: Vec<String> = recs.into_iter().map(|e| e.endpoint_id.clone()).collect();
        out.sort();
        out
    }

    /// What decides a touched entry: the records sharing its MAC or IP, and
    /// those sharing a MAC with them (an IP's entry names its MAC's VTEP).
    /// Settling from them gives what deriving from every record gives.
    #[test]
    fn a_change_is_settled_from_the_records_that_share_its_entries() {
        let mut known = Known::default();
        let a = record("a", "02:00:00:00:00:01", "10.77.0.1", "192.0.2.1", 1);
        // b re-issued a's IP with another MAC; c shares b's MAC on another IP.
        let b = record("b", "02:00:00:00:00:02", "10.77.0.1", "192.0.2.2", 2);
        let c = record("c", "02:00:00:00:00:02", "10.77.0.3", "192.0.2.3", 3);
        let d = record("d", "02:00:00:00:00:04", "10.77.0.4", "192.0.2.4", 4);
        for ep in [&a, &b, &c, &d] {
            assert!(known.insert(ep.endpoint_id.clone(), ep.clone()).is_none());
        }
        let touched = entries(&a);
        assert_eq!(ids(known.sharing(&touched)), ["a", "b", "c"]);
        let all = desired_of(known.values());
        let some = desired_of(known.sharing(&touched).into_iter());
        for e in &touched {
            assert_eq!(
                some.neigh.get(&e.ip.unwrap()),
                all.neigh.get(&e.ip.unwrap())
            );
            let mac = all.neigh[&e.ip.unwrap()];
            assert_eq!(
                some.fdb.get(&mac),
                all.fdb.get(&mac),
                "the VTEP of the IP's MAC"
            );
            assert_eq!(some.fdb.get(&e.mac), all.fdb.get(&e.mac));
        }

        // Replacing and removing keep the index exact.
        let moved = record("a", "02:00:00:00:00:01", "10.77.0.5", "192.0.2.9", 5);
        assert_eq!(known.insert("a".into(), moved.clone()), Some(a.clone()));
        assert_eq!(ids(known.sharing(&entries(&a))), ["a", "b", "c"]);
        assert_eq!(ids(known.sharing(&entries(&moved))), ["a"]);
        assert_eq!(known.remove("b"), Some(b));
        assert_eq!(ids(known.sharing(&entries(&c))), ["c"]);
        assert!(known.remove("b").is_none());
        assert_eq!(known.len(), 3);
        assert!(known.contains_key("d") && !known.is_empty());
    }
}
