//! The names the resolver answers for: per overlay, every endpoint's names as
//! its host published them, and which names a query may use.
//!
//! A query is answered from the overlays of the container that sent it, in
//! the forms Docker's embedded DNS accepts for local containers (`name`,
//! `alias`, `name.<network>`), plus `tasks.<alias>`: dockerd answers a name
//! that one of its own containers holds without asking anybody, so an alias
//! held on several hosts is complete only under a name dockerd never knows
//! outside Swarm.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

/// One endpoint's names on one overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameEntry {
    pub host: String,
    pub endpoint: String,
    pub container: String,
    /// Container name and aliases, lower case.
    pub names: Vec<String>,
    pub addrs: Vec<IpAddr>,
}

#[derive(Debug, Default)]
struct OverlayNames {
    /// By (host, endpoint).
    entries: HashMap<(String, String), NameEntry>,
    /// This host's Docker network names for the overlay, lower case.
    networks: BTreeSet<String>,
}

/// Names per overlay ID.
#[derive(Debug, Default)]
pub struct NameTable {
    local_host: String,
    overlays: HashMap<String, OverlayNames>,
}

impl NameTable {
    pub fn new(local_host: &str) -> Self {
        NameTable {
            local_host: local_host.to_string(),
            overlays: HashMap::new(),
        }
    }

    /// Replace everything known of the overlay's endpoints.
    pub fn replace(&mut self, overlay: &str, entries: Vec<NameEntry>) {
        let names = self.overlays.entry(overlay.to_string()).or_default();
        names.entries = entries
            .into_iter()
            .map(|e| ((e.host.clone(), e.endpoint.clone()), normalised(e)))
            .collect();
    }

    pub fn put(&mut self, overlay: &str, entry: NameEntry) {
        let names = self.overlays.entry(overlay.to_string()).or_default();
        names.entries.insert(
            (entry.host.clone(), entry.endpoint.clone()),
            normalised(entry),
        );
    }

    pub fn remove(&mut self, overlay: &str, host: &str, endpoint: &str) {
        if let Some(names) = self.overlays.get_mut(overlay) {
            names
                .entries
                .remove(&(host.to_string(), endpoint.to_string()));
        }
    }

    /// Forget the overlay's endpoints (this host no longer follows it). Its
    /// network names stay: they come from Docker, not from the store.
    pub fn clear(&mut self, overlay: &str) {
        if let Some(names) = self.overlays.get_mut(overlay) {
            names.entries.clear();
        }
    }

    /// This host's Docker network names of each overlay.
    pub fn set_networks(&mut self, networks: HashMap<String, BTreeSet<String>>) {
        for names in self.overlays.values_mut() {
            names.networks.clear();
        }
        for (overlay, nets) in networks {
            self.overlays.entry(overlay).or_default().networks =
                nets.into_iter().map(|n| n.to_lowercase()).collect();
        }
    }

    /// The overlays a query from `source`, arriving on `overlay`'s listener,
    /// may see: that overlay, and every other overlay the same local
    /// container has an endpoint on.
    fn scope<'a>(&'a self, overlay: &'a str, source: IpAddr) -> BTreeSet<&'a str> {
        let mut scope = BTreeSet::from([overlay]);
        let container = self.overlays.get(overlay).and_then(|names| {
            names
                .entries
                .values()
                .find(|e| e.host == self.local_host && e.addrs.contains(&source))
                .map(|e| e.container.as_str())
        });
        if let Some(container) = container {
            for (id, names) in &self.overlays {
                if names
                    .entries
                    .values()
                    .any(|e| e.host == self.local_host && e.container == container)
                {
                    scope.insert(id.as_str());
                }
            }
        }
        scope
    }

    /// The addresses of `name` for a query from `source` on `overlay`'s
    /// listener, or `None` when the name is not ours (forward it).
    pub fn lookup(&self, overlay: &str, source: IpAddr, name: &str) -> Option<Vec<IpAddr>> {
        let mut found: Option<BTreeSet<IpAddr>> = None;
        for id in self.scope(overlay, source) {
            let Some(names) = self.overlays.get(id) else {
                continue;
            };
            for candidate in candidates(name, &names.networks) {
                for entry in names.entries.values() {
                    if entry.names.iter().any(|n| n == candidate) {
                        found
                            .get_or_insert_with(BTreeSet::new)
                            .extend(entry.addrs.iter().copied());
                    }
                }
            }
        }
        found.map(|addrs| addrs.into_iter().collect())
    }

    /// Names on the overlay, for the status output and tests.
    pub fn names(&self, overlay: &str) -> BTreeSet<String> {
        self.overlays
            .get(overlay)
            .map(|o| {
                o.entries
                    .values()
                    .flat_map(|e| e.names.iter().cloned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn normalised(mut entry: NameEntry) -> NameEntry {
    for name in &mut entry.names {
        *name = name.to_lowercase();
    }
    entry
}

/// The bare names a query name may stand for on an overlay with these local
/// network names: itself, `tasks.<x>`'s x, and `<x>.<network>`'s x.
fn candidates<'a>(name: &'a str, networks: &BTreeSet<String>) -> Vec<&'a str> {
    let mut out = vec![name];
    if let Some(rest) = name.strip_prefix("tasks.") {
        out.push(rest);
    }
    for net in networks {
        if let Some(rest) = name
            .strip_suffix(net.as_str())
            .and_then(|r| r.strip_suffix('.'))
        {
            if !rest.is_empty() {
                out.push(rest);
                if let Some(inner) = rest.strip_prefix("tasks.") {
                    out.push(inner);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(host: &str, ep: &str, container: &str, names: &[&str], addr: &str) -> NameEntry {
        NameEntry {
            host: host.into(),
            endpoint: ep.into(),
            container: container.into(),
            names: names.iter().map(|n| n.to_string()).collect(),
            addrs: vec![addr.parse().unwrap()],
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn table() -> NameTable {
        let mut t = NameTable::new("b");
        t.replace(
            "ov1",
            vec![
                entry("a", "e1", "c1", &["Web", "front"], "10.77.0.2"),
                entry("c", "e2", "c2", &["api", "front"], "10.77.0.3"),
                entry("b", "e3", "c3", &["client"], "10.77.0.4"),
            ],
        );
        t.replace("ov2", vec![entry("a", "e4", "c4", &["db"], "10.88.0.2")]);
        t.set_networks(HashMap::from([
            ("ov1".to_string(), BTreeSet::from(["AppNet".to_string()])),
            ("ov2".to_string(), BTreeSet::from(["other".to_string()])),
        ]));
        t
    }

    #[test]
    fn names_aliases_and_network_suffixes_resolve_case_blind() {
        let t = table();
        let me = ip("10.77.0.4");
        assert_eq!(t.lookup("ov1", me, "web"), Some(vec![ip("10.77.0.2")]));
        assert_eq!(
            t.lookup("ov1", me, "web.appnet"),
            Some(vec![ip("10.77.0.2")])
        );
        assert_eq!(t.lookup("ov1", me, "api"), Some(vec![ip("10.77.0.3")]));
        assert_eq!(t.lookup("ov1", me, "web.other"), None);
        assert_eq!(t.lookup("ov1", me, "example.org"), None);
    }

    #[test]
    fn an_alias_on_several_hosts_gives_every_address() {
        let t = table();
        let all = Some(vec![ip("10.77.0.2"), ip("10.77.0.3")]);
        assert_eq!(t.lookup("ov1", ip("10.77.0.4"), "front"), all);
        assert_eq!(t.lookup("ov1", ip("10.77.0.4"), "tasks.front"), all);
        assert_eq!(t.lookup("ov1", ip("10.77.0.4"), "tasks.front.appnet"), all);
    }

    #[test]
    fn another_overlays_names_stay_hidden_unless_the_container_is_on_it() {
        let mut t = table();
        assert_eq!(t.lookup("ov1", ip("10.77.0.4"), "db"), None);
        // The client joins ov2 too: now both overlays are in its scope.
        t.put("ov2", entry("b", "e5", "c3", &["client"], "10.88.0.9"));
        assert_eq!(
            t.lookup("ov1", ip("10.77.0.4"), "db"),
            Some(vec![ip("10.88.0.2")])
        );
        // An address that is not a local container's sees only the listener's overlay.
        assert_eq!(t.lookup("ov1", ip("10.77.0.2"), "db"), None);
    }

    #[test]
    fn a_removed_endpoint_takes_its_names_along() {
        let mut t = table();
        t.remove("ov1", "a", "e1");
        assert_eq!(t.lookup("ov1", ip("10.77.0.4"), "web"), None);
        assert_eq!(
            t.lookup("ov1", ip("10.77.0.4"), "front"),
            Some(vec![ip("10.77.0.3")])
        );
        t.clear("ov1");
        assert!(t.names("ov1").is_empty());
        assert_eq!(
            t.lookup("ov1", ip("10.77.0.4"), "tasks.front.appnet"),
            None,
            "network names stay but match nothing"
        );
    }
}
