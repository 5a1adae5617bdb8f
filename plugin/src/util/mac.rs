//! MAC addresses: the text form the store and Docker use, and the MAC an
//! endpoint gets when Docker leaves it to us.

use std::net::IpAddr;

/// Parse a MAC in the usual `aa:bb:cc:dd:ee:ff` form.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A MAC derived from the endpoint's IPv4 address (unique on the overlay
/// because the address is), or random for IPv6-only endpoints. Locally
/// administered, unicast.
pub fn mac_for(ipv4: Option<IpAddr>) -> [u8; 6] {
    match ipv4 {
        Some(IpAddr::V4(ip)) => {
            let o = ip.octets();
            [0x02, 0x52, o[0], o[1], o[2], o[3]]
        }
        _ => {
            let mut m: [u8; 6] = rand::random();
            m[0] = (m[0] & 0xfe) | 0x02;
            m
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip() {
        let m = parse_mac("02:42:0a:4d:00:02").unwrap();
        assert_eq!(format_mac(&m), "02:42:0a:4d:00:02");
        assert!(parse_mac("02:42:0a:4d:00").is_none());
        assert!(parse_mac("02:42:0a:4d:00:02:03").is_none());
        assert!(parse_mac("zz:42:0a:4d:00:02").is_none());
    }

    #[test]
    fn derived_macs_are_local_unicast() {
        let m = mac_for(Some("10.77.0.2".parse().unwrap()));
        assert_eq!(format_mac(&m), "02:52:0a:4d:00:02");
        let r = mac_for(None);
        assert_eq!(r[0] & 0x03, 0x02);
    }
}
