//! Where names that are not ours are sent: `--dns-upstream`, else the host's
//! resolv.conf, else (when that names only systemd-resolved's stub,
//! 127.0.0.53) the upstream list systemd-resolved keeps, as Docker does.
//!
//! The files are re-read when they change (checked at most once a second),
//! so a DHCP renewal or a VPN needs no restart. There is no built-in public
//! fallback: with no upstream the resolver answers SERVFAIL at once and says
//! why in the log, rather than sending the host's queries somewhere the
//! operator never chose.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

const RESOLVED_STUB: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 53));
const RECHECK: Duration = Duration::from_secs(1);

/// The nameservers of a resolv.conf text, in order. Zone suffixes of
/// link-local IPv6 servers (`fe80::1%eth0`) are dropped with the server:
/// a scoped address means nothing outside the host's namespace.
pub fn nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        .filter_map(|addr| addr.parse().ok())
        .collect()
}

/// The upstreams from a resolv.conf (and systemd-resolved's own list, when
/// resolv.conf points only at its stub), without our own address.
pub fn from_files(resolv: &str, resolved: Option<&str>, own: IpAddr) -> Vec<SocketAddr> {
    let mut servers = nameservers(resolv);
    if servers == [RESOLVED_STUB] {
        if let Some(resolved) = resolved {
            servers = nameservers(resolved);
        }
    }
    servers
        .into_iter()
        .filter(|ip| *ip != own)
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Where the host's resolver files are (under /host for the managed plugin).
#[derive(Debug, Clone)]
pub struct Files {
    pub resolv_conf: PathBuf,
    pub resolved_conf: PathBuf,
}

impl Default for Files {
    fn default() -> Self {
        Files {
            resolv_conf: "/etc/resolv.conf".into(),
            resolved_conf: "/run/systemd/resolve/resolv.conf".into(),
        }
    }
}

#[derive(Debug)]
struct Cached {
    checked: Instant,
    stamp: Option<(SystemTime, SystemTime)>,
    servers: Vec<SocketAddr>,
}

/// The current upstream list.
#[derive(Debug)]
pub struct Upstreams {
    fixed: Vec<SocketAddr>,
    files: Files,
    own: IpAddr,
    cached: Mutex<Option<Cached>>,
}

impl Upstreams {
    /// `fixed` (from `--dns-upstream`) wins over the files when not empty.
    pub fn new(fixed: Vec<SocketAddr>, files: Files, own: IpAddr) -> Self {
        Upstreams {
            fixed,
            files,
            own,
            cached: Mutex::new(None),
        }
    }

    pub fn current(&self) -> Vec<SocketAddr> {
        if !self.fixed.is_empty() {
            return self.fixed.clone();
        }
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cached.as_ref() {
            if c.checked.elapsed() < RECHECK {
                return c.servers.clone();
            }
        }
        let stamp = self.stamp();
        if let Some(c) = cached.as_mut() {
            if c.stamp == stamp && stamp.is_some() {
                c.checked = Instant::now();
                return c.servers.clone();
            }
        }
        let servers = self.read();
        // Said when the list changes, not at every re-read.
        if cached.as_ref().map(|c| &c.servers) != Some(&servers) {
            if servers.is_empty() {
                tracing::warn!(
                    resolv_conf = %self.files.resolv_conf.display(),
                    "no upstream DNS server: names that are not on an overlay get SERVFAIL; \
                     set --dns-upstream or a nameserver in the host's resolv.conf"
                );
            } else {
                tracing::info!(?servers, "DNS upstreams");
            }
        }
        *cached = Some(Cached {
            checked: Instant::now(),
            stamp,
            servers: servers.clone(),
        });
        servers
    }

    fn stamp(&self) -> Option<(SystemTime, SystemTime)> {
        let mtime = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        Some((
            mtime(&self.files.resolv_conf)?,
            mtime(&self.files.resolved_conf).unwrap_or(SystemTime::UNIX_EPOCH),
        ))
    }

    fn read(&self) -> Vec<SocketAddr> {
        let resolved = read_host_file(&self.files.resolved_conf);
        match read_host_file(&self.files.resolv_conf) {
            Some(resolv) => from_files(&resolv, resolved.as_deref(), self.own),
            // No resolv.conf: systemd-resolved's list is still the host's.
            None => from_files(resolved.as_deref().unwrap_or_default(), None, self.own),
        }
    }
}

/// Read a host file. The managed plugin sees the host's files under /host,
/// where an absolute link (`/etc/resolv.conf` ->
/// `/run/systemd/resolve/stub-resolv.conf`) points into the plugin's own
/// root: such a link is followed under /host too.
fn read_host_file(path: &std::path::Path) -> Option<String> {
    if let Ok(text) = std::fs::read_to_string(path) {
        return Some(text);
    }
    let target = std::fs::read_link(path).ok()?;
    let root = std::path::Path::new("/host");
    if !(path.starts_with(root) && target.is_absolute()) {
        return None;
    }
    std::fs::read_to_string(root.join(target.strip_prefix("/").ok()?)).ok()
}

impl Files {
    /// Files that do not exist: no upstream but the fixed ones (tests never
    /// read the machine's resolv.conf, whose servers are outside).
    #[cfg(test)]
    pub(crate) fn none() -> Self {
        Files {
            resolv_conf: "/nonexistent/rustoverlay/resolv.conf".into(),
            resolved_conf: "/nonexistent/rustoverlay/resolved.conf".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 53, 53));

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn nameservers_come_in_order_and_odd_lines_are_skipped() {
        let text = "# generated\nsearch example.org\nnameserver 192.0.2.1\n\
                    nameserver  2001:db8::1 \nnameserver fe80::1%eth0\nnameserver\noptions ndots:2\n";
        assert_eq!(
            nameservers(text),
            vec![
                "192.0.2.1".parse::<IpAddr>().unwrap(),
                "2001:db8::1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn the_resolved_stub_is_replaced_by_resolveds_own_list() {
        let stub = "nameserver 127.0.0.53\noptions edns0 trust-ad\n";
        let real = "nameserver 192.0.2.7\nnameserver 192.0.2.8\n";
        assert_eq!(
            from_files(stub, Some(real), OWN),
            vec![sa("192.0.2.7:53"), sa("192.0.2.8:53")]
        );
        assert_eq!(
            from_files(stub, None, OWN),
            vec![sa("127.0.0.53:53")],
            "without resolved's file the stub is still an upstream from the host"
        );
        let mixed = "nameserver 127.0.0.53\nnameserver 192.0.2.9\n";
        assert_eq!(
            from_files(mixed, Some(real), OWN),
            vec![sa("127.0.0.53:53"), sa("192.0.2.9:53")]
        );
    }

    #[test]
    fn our_own_address_is_never_an_upstream() {
        let text = "nameserver 169.254.53.53\nnameserver 192.0.2.1\n";
        assert_eq!(from_files(text, None, OWN), vec![sa("192.0.2.1:53")]);
    }

    #[test]
    fn without_resolv_conf_resolveds_list_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files {
            resolv_conf: dir.path().join("missing"),
            resolved_conf: dir.path().join("resolved.conf"),
        };
        std::fs::write(&files.resolved_conf, "nameserver 192.0.2.5\n").unwrap();
        let up = Upstreams::new(vec![], files, OWN);
        assert_eq!(up.current(), vec![sa("192.0.2.5:53")]);
    }

    #[test]
    fn a_changed_file_is_read_again_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files {
            resolv_conf: dir.path().join("resolv.conf"),
            resolved_conf: dir.path().join("none"),
        };
        std::fs::write(&files.resolv_conf, "nameserver 192.0.2.1\n").unwrap();
        let up = Upstreams::new(vec![], files.clone(), OWN);
        assert_eq!(up.current(), vec![sa("192.0.2.1:53")]);
        std::fs::write(&files.resolv_conf, "nameserver 192.0.2.2\n").unwrap();
        // Force the next call past the once-a-second check.
        up.cached.lock().unwrap().as_mut().unwrap().checked -= RECHECK;
        up.cached.lock().unwrap().as_mut().unwrap().stamp = None;
        assert_eq!(up.current(), vec![sa("192.0.2.2:53")]);

        let fixed = Upstreams::new(vec![sa("198.51.100.1:5353")], files, OWN);
        assert_eq!(fixed.current(), vec![sa("198.51.100.1:5353")]);
    }
}
