//! The names of everything the plugin creates in the kernel. Reconciliation
//! finds its own devices by these names, so they are built only here.

/// The overlay's network namespace (a file under `<state-dir>/netns/`).
pub fn netns_name(vni: u32) -> String {
    format!("ro-{vni}")
}

/// The VNI of one of our namespaces, from its name.
pub fn vni_of_netns(name: &str) -> Option<u32> {
    name.strip_prefix("ro-")?.parse().ok()
}

pub fn bridge_name(vni: u32) -> String {
    format!("ro-br-{vni}")
}

pub fn vxlan_name(vni: u32) -> String {
    format!("ro-vx-{vni}")
}

/// The part of an endpoint ID that names its links (IFNAMSIZ is 16): its
/// first 12 characters. Cut on a character boundary, so that no stored or
/// received ID can make it panic.
pub fn short_id(endpoint_id: &str) -> &str {
    match endpoint_id.char_indices().nth(12) {
        Some((end, _)) => &endpoint_id[..end],
        None => endpoint_id,
    }
}

/// Bridge-side name of an endpoint's veth (inside the overlay namespace).
pub fn bridge_port_name(endpoint_id: &str) -> String {
    format!("ro-{}", short_id(endpoint_id))
}

/// The endpoint short ID of a bridge port, or None for the bridge and the
/// VXLAN device.
pub fn port_endpoint(link_name: &str) -> Option<&str> {
    let id = link_name.strip_prefix("ro-")?;
    (!id.starts_with("br-") && !id.starts_with("vx-")).then_some(id)
}

/// Container-side name (in the host namespace until Docker moves it).
pub fn container_link_name(endpoint_id: &str) -> String {
    format!("rc-{}", short_id(endpoint_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz() {
        let id = "0123456789abcdef0123456789abcdef";
        assert!(bridge_port_name(id).len() <= 15);
        assert!(container_link_name(id).len() <= 15);
        assert!(bridge_name(16_777_215).len() <= 15);
        assert!(vxlan_name(16_777_215).len() <= 15);
    }

    #[test]
    fn short_ids_never_split_a_character() {
        assert_eq!(short_id("0123456789abcdef"), "0123456789ab");
        assert_eq!(short_id("abc"), "abc");
        assert_eq!(short_id("ééééééééééééé"), "éééééééééééé");
    }

    #[test]
    fn names_parse_back() {
        assert_eq!(vni_of_netns(&netns_name(4097)), Some(4097));
        assert_eq!(
            port_endpoint(&bridge_port_name("abcdef0123456789")),
            Some("abcdef012345")
        );
        assert_eq!(port_endpoint(&bridge_name(7)), None);
        assert_eq!(port_endpoint(&vxlan_name(7)), None);
    }
}
