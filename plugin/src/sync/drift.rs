//! Is this host's kernel in step with the store? For `rustoverlay status`:
//! per overlay with devices here, the FDB and neighbour entries the store's
//! remote endpoints call for but the kernel lacks (or holds differently),
//! the entries no record calls for, and the overlay namespaces of networks
//! without a local endpoint. Read fresh from the store and the kernel, not
//! from what peer sync remembers, so it also catches a peer sync that is
//! behind.

use super::membership::LiveSet;
use super::peer_entries::{desired_of, diff};
use crate::control::overlay::Overlays;
use crate::dataplane::Dataplane;
use crate::error::Result;
use crate::util::mac::format_mac;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The JSON form is `status --json`'s `local` object (README).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LocalView {
    pub host: String,
    pub vtep: IpAddr,
    /// True when nothing below differs.
    pub in_step: bool,
    pub overlays: Vec<OverlayDrift>,
    /// VNIs whose namespace exists here though no local endpoint uses it
    /// (and no linger explains it).
    pub namespaces_without_endpoints: Vec<u32>,
    /// VNIs whose devices outlive their last local endpoint by `--linger`:
    /// expected, not drift.
    #[serde(default)]
    pub lingering: Vec<u32>,
    /// Overlays with a local endpoint whose devices are missing or cannot
    /// be read: the worst drift, containers there are cut off.
    #[serde(default)]
    pub broken: Vec<BrokenOverlay>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BrokenOverlay {
    pub overlay: String,
    pub vni: u32,
    pub why: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OverlayDrift {
    pub overlay: String,
    pub vni: u32,
    /// Remote endpoints of live hosts: what the entries are for.
    pub remote_endpoints: usize,
    /// MAC -> VTEP entries missing, or pointing at another VTEP.
    pub missing_fdb: Vec<FdbEntry>,
    /// IP -> MAC entries missing, or with another MAC.
    pub missing_neigh: Vec<NeighEntry>,
    /// MACs with an FDB entry that no record calls for.
    pub stale_fdb: Vec<String>,
    /// IPs with a neighbour entry that no record calls for.
    pub stale_neigh: Vec<IpAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FdbEntry {
    pub mac: String,
    pub vtep: IpAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NeighEntry {
    pub ip: IpAddr,
    pub mac: String,
}

impl OverlayDrift {
    pub fn is_empty(&self) -> bool {
        self.missing_fdb.is_empty()
            && self.missing_neigh.is_empty()
            && self.stale_fdb.is_empty()
            && self.stale_neigh.is_empty()
    }
}

/// Compare the kernel with the store, overlay by overlay.
pub async fn local_view(
    host: &str,
    overlays: &Overlays,
    dataplane: &dyn Dataplane,
    live: &LiveSet,
    lingering: &[u32],
) -> Result<LocalView> {
    // One entry per overlay: several Docker networks may share one.
    let mut wanted: BTreeMap<u32, String> = BTreeMap::new();
    for net in overlays.local_networks().await? {
        wanted.insert(net.vni, net.overlay);
    }
    let mut drifts = Vec::new();
    let mut broken = Vec::new();
    let mut waiting = Vec::new();
    let present = dataplane.local_vnis();
    let mut unused: Vec<u32> = present
        .iter()
        .filter(|v| !wanted.contains_key(v))
        .copied()
        .collect();
    for (&vni, overlay) in &wanted {
        let (eps, _) = overlays.endpoints(overlay).await?;
        let has_local = eps.iter().any(|e| e.host == host);
        if !present.contains(&vni) {
            if has_local {
                broken.push(BrokenOverlay {
                    overlay: overlay.clone(),
                    vni,
                    why: format!("a local endpoint, but no namespace ro-{vni}"),
                });
            }
            continue;
        }
        if !has_local {
            if lingering.contains(&vni) {
                waiting.push(vni);
            } else {
                unused.push(vni);
            }
        }
        let have = match dataplane.peers(vni).await {
            Ok(have) => have,
            Err(e) => {
                broken.push(BrokenOverlay {
                    overlay: overlay.clone(),
                    vni,
                    why: format!("its devices cannot be read: {e}"),
                });
                continue;
            }
        };
        let is_live = |h: &String| live.as_ref().is_none_or(|l| l.contains(h));
        let remote: Vec<_> = eps
            .iter()
            .filter(|e| e.host != host && is_live(&e.host))
            .collect();
        let want = desired_of(remote.iter().copied());
        let d = diff(&want, &have);
        let mut drift = OverlayDrift {
            overlay: overlay.clone(),
            vni,
            remote_endpoints: remote.len(),
            missing_fdb: Vec::new(),
            missing_neigh: Vec::new(),
            stale_fdb: d.stale_fdb.iter().map(format_mac).collect(),
            stale_neigh: d.stale_neigh,
        };
        for entry in d.missing {
            if have.fdb.get(&entry.mac) != Some(&entry.vtep) {
                let fdb = FdbEntry {
                    mac: format_mac(&entry.mac),
                    vtep: entry.vtep,
                };
                if !drift.missing_fdb.contains(&fdb) {
                    drift.missing_fdb.push(fdb);
                }
            }
            if let Some(ip) = entry.ip.filter(|ip| have.neigh.get(ip) != Some(&entry.mac)) {
                drift.missing_neigh.push(NeighEntry {
                    ip,
                    mac: format_mac(&entry.mac),
                });
            }
        }
        drifts.push(drift);
    }
    unused.sort();
    Ok(LocalView {
        host: host.to_string(),
        vtep: dataplane.vtep(),
        in_step: unused.is_empty()
            && broken.is_empty()
            && drifts.iter().all(OverlayDrift::is_empty),
        overlays: drifts,
        namespaces_without_endpoints: unused,
        lingering: waiting,
        broken,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::fake::FakeDataplane;
    use crate::dataplane::PeerEntry;
    use crate::state::records::{EndpointRecord, LocalNetwork};
    use crate::state::{codec::encode, keys};
    use kvstore_backends::{KvStore, MemoryStore};
    use std::sync::Arc;

    const VNI: u32 = 4100;
    const OVERLAY: &str = "10.77.0.0_24";

    fn ep(id: &str, host: &str, vtep: &str, ip: &str, mac: &str) -> EndpointRecord {
        EndpointRecord {
            endpoint_id: id.into(),
            network_id: "n1".into(),
            host: host.into(),
            vtep: vtep.parse().unwrap(),
            mac: mac.into(),
            ipv4: Some(format!("{ip}/24").parse().unwrap()),
            ipv6: None,
            created_at: 1,
            created_ms: 0,
        }
    }

    #[tokio::test]
    async fn drift_names_missing_and_stale_entries_and_none_once_converged() {
        let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
        let net = LocalNetwork {
            network_id: "n1".into(),
            overlay: OVERLAY.into(),
            vni: VNI,
            subnets: vec!["10.77.0.0/24".parse().unwrap()],
            cluster: false,
        };
        store
            .put(&keys::host_network("a", "n1"), encode(&net))
            .await
            .unwrap();
        let mine = ep("e1", "a", "192.0.2.1", "10.77.0.2", "02:00:00:00:00:02");
        let theirs = ep("e2", "b", "192.0.2.2", "10.77.0.3", "02:00:00:00:00:03");
        for e in [&mine, &theirs] {
            store
                .put(&keys::endpoint(OVERLAY, &e.endpoint_id), encode(e))
                .await
                .unwrap();
        }
        let overlays = Overlays::new(store.clone(), "a");
        let fake = FakeDataplane::new("192.0.2.1".parse().unwrap());
        fake.ensure_network(VNI).await.unwrap();
        // A stale entry of a container that went, and none of e2's.
        let gone = PeerEntry {
            mac: [2, 0, 0, 0, 0, 9],
            ip: Some("10.77.0.9".parse().unwrap()),
            vtep: "192.0.2.2".parse().unwrap(),
        };
        fake.add_peer(VNI, &gone).await.unwrap();
        let live: LiveSet = None;

        let view = local_view("a", &overlays, fake.as_ref(), &live, &[])
            .await
            .unwrap();
        assert!(!view.in_step);
        let d = &view.overlays[0];
        assert_eq!(d.remote_endpoints, 1);
        assert_eq!(
            d.missing_fdb,
            vec![FdbEntry {
                mac: "02:00:00:00:00:03".into(),
                vtep: "192.0.2.2".parse().unwrap()
            }]
        );
        assert_eq!(
            d.missing_neigh,
            vec![NeighEntry {
                ip: "10.77.0.3".parse().unwrap(),
                mac: "02:00:00:00:00:03".into()
            }]
        );
        assert_eq!(d.stale_fdb, vec!["02:00:00:00:00:09".to_string()]);
        assert_eq!(d.stale_neigh, vec!["10.77.0.9".parse::<IpAddr>().unwrap()]);

        fake.remove_peer(VNI, gone.mac, gone.ip).await.unwrap();
        // The entry the store's remote endpoint calls for.
        let wanted = PeerEntry {
            mac: [2, 0, 0, 0, 0, 3],
            ip: Some("10.77.0.3".parse().unwrap()),
            vtep: "192.0.2.2".parse().unwrap(),
        };
        fake.add_peer(VNI, &wanted).await.unwrap();
        let view = local_view("a", &overlays, fake.as_ref(), &live, &[])
            .await
            .unwrap();
        assert!(view.in_step, "{view:?}");

        // A local endpoint without devices: broken, named.
        fake.remove_network(VNI).await.unwrap();
        let view = local_view("a", &overlays, fake.as_ref(), &live, &[])
            .await
            .unwrap();
        assert!(!view.in_step);
        assert_eq!(view.broken.len(), 1);
        assert!(
            view.broken[0].why.contains("no namespace"),
            "{:?}",
            view.broken
        );
        fake.ensure_network(VNI).await.unwrap();
        fake.add_peer(VNI, &wanted).await.unwrap();
        let view = local_view("a", &overlays, fake.as_ref(), &live, &[])
            .await
            .unwrap();
        assert!(view.in_step, "{view:?}");

        // Without the local endpoint, the namespace is reported unused.
        store.delete(&keys::endpoint(OVERLAY, "e1")).await.unwrap();
        let view = local_view("a", &overlays, fake.as_ref(), &live, &[])
            .await
            .unwrap();
        assert_eq!(view.namespaces_without_endpoints, vec![VNI]);
        assert!(!view.in_step);
        // Unless its devices wait out the linger: expected, not drift.
        let view = local_view("a", &overlays, fake.as_ref(), &live, &[VNI])
            .await
            .unwrap();
        assert!(view.namespaces_without_endpoints.is_empty(), "{view:?}");
        assert_eq!(view.lingering, vec![VNI]);
        assert!(view.in_step, "{view:?}");
    }
}
