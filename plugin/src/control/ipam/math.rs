//! Address arithmetic: subnets and ranges as integer bounds, so that IPv4
//! and IPv6 share one allocator.

use crate::error::{PluginError, Result};
use crate::state::records::PoolRecord;
use ipnetwork::IpNetwork;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::pool_id;

/// The dynamic range of a pool as integer bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Span {
    pub(super) first: u128,
    pub(super) len: u128,
    pub(super) v6: bool,
}

impl Span {
    pub(super) fn of(record: &PoolRecord) -> Span {
        let (first, last) = host_bounds(&record.subnet);
        let (first, last) = match record.range {
            Some(r) => {
                let (rf, rl) = net_bounds(&r);
                (first.max(rf), last.min(rl))
            }
            None => (first, last),
        };
        Span {
            first,
            len: if last >= first { last - first + 1 } else { 0 },
            v6: record.subnet.is_ipv6(),
        }
    }

    pub(super) fn ip(&self, offset: u128) -> IpAddr {
        to_ip(self.first + offset, self.v6)
    }

    pub(super) fn offset(&self, ip: IpAddr) -> Option<u128> {
        let n = to_u128(ip);
        (n >= self.first && n - self.first < self.len).then(|| n - self.first)
    }

    /// The error of a pool with no address left. With an --ip-range smaller
    /// than the subnet, the range is what ran out: say so, with its bounds
    /// and size (not the subnet's, whose size would mislead).
    pub(super) fn exhausted(&self, subnet: &IpNetwork) -> PluginError {
        let (first, last) = host_bounds(subnet);
        let whole = if last >= first { last - first + 1 } else { 0 };
        if self.len > 0 && self.len < whole {
            return PluginError::Exhausted(format!(
                "no free address left in the --ip-range of subnet {} ({} to {}, {} addresses, \
                 all in use); remove containers from the network or recreate it with a larger \
                 --ip-range",
                pool_id(subnet),
                self.ip(0),
                self.ip(self.len - 1),
                self.len
            ));
        }
        PluginError::Exhausted(format!(
            "no free address left in subnet {} ({} addresses, all in use); remove containers \
             from the network or recreate it with a larger --subnet",
            pool_id(subnet),
            self.len
        ))
    }
}

/// Reject addresses Docker should never ask for: outside the subnet, the
/// network address or the IPv4 broadcast address.
pub(super) fn check_usable(subnet: &IpNetwork, ip: IpAddr) -> Result<()> {
    let (first, last) = host_bounds(subnet);
    let n = to_u128(ip);
    if ip.is_ipv4() != subnet.is_ipv4() || !subnet.contains(ip) {
        return Err(PluginError::BadRequest(format!(
            "address {ip} is not in subnet {}",
            pool_id(subnet)
        )));
    }
    if n < first || n > last {
        return Err(PluginError::BadRequest(format!(
            "address {ip} is the network or broadcast address of {}; pick an address between {} and {}",
            pool_id(subnet),
            to_ip(first, subnet.is_ipv6()),
            to_ip(last, subnet.is_ipv6())
        )));
    }
    Ok(())
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

pub(super) fn to_ip(n: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(n))
    } else {
        IpAddr::V4(Ipv4Addr::from(n as u32))
    }
}

/// First and last address of a subnet.
fn net_bounds(net: &IpNetwork) -> (u128, u128) {
    let bits: u32 = if net.is_ipv4() { 32 } else { 128 };
    let host_bits = bits - net.prefix() as u32;
    let first = to_u128(net.network());
    let span = if host_bits == 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    (first, first + span)
}

/// First and last address containers may get: without the network address,
/// and for IPv4 without broadcast (except on /31 and /32).
pub(super) fn host_bounds(net: &IpNetwork) -> (u128, u128) {
    let (first, last) = net_bounds(net);
    match net {
        IpNetwork::V4(n) if n.prefix() >= 31 => (first, last),
        IpNetwork::V4(_) => (first + 1, last - 1),
        IpNetwork::V6(n) if n.prefix() >= 127 => (first, last),
        IpNetwork::V6(_) => (first + 1, last),
    }
}

pub(super) fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    if a.is_ipv4() != b.is_ipv4() {
        return false;
    }
    let (af, al) = net_bounds(a);
    let (bf, bl) = net_bounds(b);
    af <= bl && bf <= al
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn host_bounds_skip_network_and_broadcast() {
        let (f, l) = host_bounds(&net("10.77.0.0/24"));
        assert_eq!(to_ip(f, false).to_string(), "10.77.0.1");
        assert_eq!(to_ip(l, false).to_string(), "10.77.0.254");
        let (f, l) = host_bounds(&net("10.77.0.0/31"));
        assert_eq!(l - f, 1);
        let (f, _) = host_bounds(&net("fd00::/64"));
        assert_eq!(to_ip(f, true).to_string(), "fd00::1");
    }

    #[test]
    fn overlap_detection() {
        assert!(overlaps(&net("10.0.0.0/16"), &net("10.0.1.0/24")));
        assert!(overlaps(&net("10.0.1.0/24"), &net("10.0.0.0/16")));
        assert!(!overlaps(&net("10.0.0.0/24"), &net("10.0.1.0/24")));
        assert!(!overlaps(&net("10.0.0.0/8"), &net("fd00::/8")));
    }

    #[test]
    fn span_honours_ip_range() {
        let rec = PoolRecord {
            subnet: net("10.77.0.0/24"),
            range: Some(net("10.77.0.128/25")),
            gateway: None,
            aux: BTreeSet::new(),
            refs: BTreeMap::new(),
        };
        let span = Span::of(&rec);
        assert_eq!(span.ip(0).to_string(), "10.77.0.128");
        // The subnet's broadcast address stays out even inside the range.
        assert_eq!(span.len, 127);
        assert_eq!(span.offset("10.77.0.127".parse().unwrap()), None);
    }

    #[test]
    fn exhaustion_names_the_ip_range_when_it_is_what_ran_out() {
        let rec = |range: Option<&str>| PoolRecord {
            subnet: net("10.83.0.0/24"),
            range: range.map(net),
            gateway: None,
            aux: BTreeSet::new(),
            refs: BTreeMap::new(),
        };
        let in_range = Span::of(&rec(Some("10.83.0.128/29")))
            .exhausted(&net("10.83.0.0/24"))
            .to_string();
        assert!(
            in_range.contains(
                "--ip-range of subnet 10.83.0.0/24 (10.83.0.128 to 10.83.0.135, 8 addresses"
            ),
            "{in_range}"
        );
        assert!(in_range.contains("larger --ip-range"), "{in_range}");
        let whole = Span::of(&rec(None))
            .exhausted(&net("10.83.0.0/24"))
            .to_string();
        assert!(
            whole.contains("subnet 10.83.0.0/24 (254 addresses") && !whole.contains("--ip-range"),
            "{whole}"
        );
        // A range as large as the subnet is the subnet.
        let all = Span::of(&rec(Some("10.83.0.0/24")))
            .exhausted(&net("10.83.0.0/24"))
            .to_string();
        assert!(!all.contains("--ip-range"), "{all}");
    }
}
