//! Docker's request fields turned into the domain's values. Every check of
//! what Docker sent (missing fields, malformed addresses, foreign address
//! spaces) happens here, with a message that names the field and the fix.

use super::wire::{
    CreateEndpointRequest, CreateNetworkRequest, IpamData, Options, ENDPOINT_OPTION_PREFIX,
    GATEWAY_ADDRESS_TYPE, GENERIC_OPTIONS, GLOBAL_ADDRESS_SPACE, LOCAL_ADDRESS_SPACE,
    REQUEST_ADDRESS_TYPE,
};
use crate::control::ipam::{parse_pool_id, PoolRequest};
use crate::driver::{EndpointSpec, NetworkSpec, PoolSpec, CREATE_HINT};
use crate::error::{PluginError, Result};
use crate::util::mac::parse_mac;
use ipnetwork::IpNetwork;
use std::collections::HashMap;
use std::net::IpAddr;

fn require(field: &str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(PluginError::BadRequest(format!(
            "{field} is missing or empty in the request"
        )));
    }
    Ok(())
}

/// Docker's NetworkIDs and EndpointIDs are hex; they become parts of store
/// keys and link names, so anything that could break those is refused.
pub fn require_id(field: &str, value: &str) -> Result<()> {
    require(field, value)?;
    let ok = value.len() <= 128
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        return Err(PluginError::BadRequest(format!(
            "{field} {value:?} is not a Docker ID (up to 128 letters, digits, '-' or '_')"
        )));
    }
    Ok(())
}

pub fn network_spec(req: CreateNetworkRequest) -> Result<NetworkSpec> {
    require_id("NetworkID", &req.network_id)?;
    let ipv4 = pools_of(
        &req.network_id,
        req.ipv4_data.as_deref().unwrap_or_default(),
    )?;
    let ipv6 = pools_of(
        &req.network_id,
        req.ipv6_data.as_deref().unwrap_or_default(),
    )?;
    check_driver_options(req.options.as_ref())?;
    let cluster = cluster_option(req.options.as_ref())?;
    Ok(NetworkSpec {
        network_id: req.network_id,
        ipv4,
        ipv6,
        cluster,
    })
}

/// The driver options (`-o key=value`) this plugin acts on. Anything else is
/// refused: an option taken in silence is a promise broken in silence (with
/// `-o encrypted=true` accepted, traffic crossed the underlay in clear).
const DRIVER_OPTIONS: &[&str] = &["cluster"];

fn check_driver_options(options: Option<&Options>) -> Result<()> {
    let given = match options.and_then(|o| o.get(GENERIC_OPTIONS)) {
        None | Some(serde_json::Value::Null) => return Ok(()),
        Some(serde_json::Value::Object(map)) => map,
        Some(other) => {
            return Err(PluginError::BadRequest(format!(
                "{GENERIC_OPTIONS} is {other}, not a map of driver options"
            )))
        }
    };
    let known = DRIVER_OPTIONS.join(", ");
    if let Some(key) = given.keys().find(|k| !DRIVER_OPTIONS.contains(&k.as_str())) {
        return Err(PluginError::BadRequest(if key == "encrypted" {
            "-o encrypted is not supported yet: rustoverlay would carry this network's \
             traffic between hosts unencrypted; remove -o encrypted (and encrypt in the \
             application, e.g. with TLS)"
                .to_string()
        } else {
            format!("unknown driver option -o {key}; rustoverlay knows only: {known}; remove it")
        }));
    }
    Ok(())
}

/// `-o cluster=true`: the network is defined once for every host.
fn cluster_option(options: Option<&Options>) -> Result<bool> {
    let value = options
        .and_then(|o| o.get(GENERIC_OPTIONS))
        .and_then(|g| g.get("cluster"));
    match value {
        None => Ok(false),
        Some(serde_json::Value::Bool(b)) => Ok(*b),
        Some(serde_json::Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err(PluginError::BadRequest(format!(
                "option cluster={s:?} is not a boolean; use -o cluster=true or leave it out"
            ))),
        },
        Some(other) => Err(PluginError::BadRequest(format!(
            "option cluster={other} is not a boolean; use -o cluster=true or leave it out"
        ))),
    }
}

fn pools_of(network_id: &str, data: &[IpamData]) -> Result<Vec<PoolSpec>> {
    data.iter()
        .map(|d| {
            if d.address_space != LOCAL_ADDRESS_SPACE && d.address_space != GLOBAL_ADDRESS_SPACE {
                return Err(PluginError::BadRequest(format!(
                    "network {network_id} uses another IPAM driver (address space {:?}), which \
                     cannot keep addresses unique across hosts; create it with {CREATE_HINT}",
                    d.address_space
                )));
            }
            let subnet = parse_pool_id(&d.pool)?;
            let aux = d
                .aux_addresses
                .iter()
                .flatten()
                .map(|(name, cidr)| {
                    cidr.split('/')
                        .next()
                        .and_then(|ip| ip.parse::<IpAddr>().ok())
                        .ok_or_else(|| {
                            PluginError::BadRequest(format!(
                                "aux address {name}={cidr:?} is not an address"
                            ))
                        })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(PoolSpec { subnet, aux })
        })
        .collect()
}

pub fn endpoint_spec(req: CreateEndpointRequest) -> Result<EndpointSpec> {
    require_id("NetworkID", &req.network_id)?;
    require_id("EndpointID", &req.endpoint_id)?;
    let iface = req.interface.unwrap_or_default();
    let mac = match iface.mac_address.trim() {
        "" => None,
        s => Some(parse_mac(s).ok_or_else(|| {
            PluginError::BadRequest(format!("MacAddress {s:?} is not a MAC address"))
        })?),
    };
    Ok(EndpointSpec {
        ipv4: cidr_address("Address", &iface.address)?,
        ipv6: cidr_address("AddressIPv6", &iface.address_ipv6)?,
        network_id: req.network_id,
        endpoint_id: req.endpoint_id,
        mac,
    })
}

/// An endpoint address as Docker sends it ("10.77.0.2/24").
fn cidr_address(field: &str, value: &str) -> Result<Option<IpNetwork>> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|_| {
        PluginError::BadRequest(format!("{field} {value:?} is not an address in CIDR form"))
    })
}

/// Validate a RequestPool's fields into a [`PoolRequest`].
pub fn pool_request(pool: &str, sub_pool: &str, v6: bool) -> Result<PoolRequest> {
    let parse = |what: &str, s: &str| -> Result<IpNetwork> {
        let net: IpNetwork = s
            .contains('/')
            .then(|| s.parse().ok())
            .flatten()
            .ok_or_else(|| {
                PluginError::BadRequest(format!(
                    "{what} {s:?} is not a valid subnet in CIDR form (e.g. 10.77.0.0/24)"
                ))
            })?;
        IpNetwork::new(net.network(), net.prefix())
            .map_err(|e| PluginError::BadRequest(format!("{what} {s:?}: {e}")))
    };
    let subnet = match pool.trim() {
        "" => None,
        s => Some(parse("subnet", s)?),
    };
    let range = match sub_pool.trim() {
        "" => None,
        s => Some(parse("ip-range", s)?),
    };
    PoolRequest::new(subnet, range, v6)
}

pub fn check_address_space(space: &str) -> Result<()> {
    match space {
        "" | LOCAL_ADDRESS_SPACE | GLOBAL_ADDRESS_SPACE => Ok(()),
        other => Err(PluginError::BadRequest(format!(
            "address space {other:?} is not one of rustoverlay's ({LOCAL_ADDRESS_SPACE}, {GLOBAL_ADDRESS_SPACE})"
        ))),
    }
}

pub fn require_pool_id(pool_id: &str) -> Result<()> {
    if pool_id.trim().is_empty() {
        return Err(PluginError::BadRequest(
            "PoolID is missing or empty in the request".into(),
        ));
    }
    Ok(())
}

/// What RequestAddress's options say the address is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressPurpose {
    /// The network's gateway (`RequestAddressType` says so).
    Gateway,
    /// A container's address: newer engines name the endpoint in the options.
    Endpoint,
    /// Nothing says: a container's address on older engines, or one of a
    /// network's aux addresses, which Docker reserves with no options at all
    /// while it creates the network on a host.
    Unmarked,
}

pub fn address_purpose(options: Option<&HashMap<String, String>>) -> AddressPurpose {
    let Some(options) = options else {
        return AddressPurpose::Unmarked;
    };
    if options
        .get(REQUEST_ADDRESS_TYPE)
        .is_some_and(|t| t == GATEWAY_ADDRESS_TYPE)
    {
        return AddressPurpose::Gateway;
    }
    if options
        .keys()
        .any(|k| k.starts_with(ENDPOINT_OPTION_PREFIX))
    {
        return AddressPurpose::Endpoint;
    }
    AddressPurpose::Unmarked
}

/// Docker sends a plain IP; accept a CIDR too, since some tools do.
pub fn plain_ip(s: &str) -> Result<Option<IpAddr>> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let ip_part = s.split('/').next().unwrap_or(s);
    ip_part
        .parse()
        .map(Some)
        .map_err(|_| PluginError::BadRequest(format!("Address {s:?} is not an IP address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn ids_that_could_break_keys_or_link_names_are_refused() {
        assert!(require_id("EndpointID", "0123456789abcdef").is_ok());
        assert!(require_id("EndpointID", "ep-1_x").is_ok());
        for bad in ["", " ", "a/b", "ééé", "a b", &"x".repeat(129)] {
            assert!(require_id("EndpointID", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_cluster_option_is_a_boolean_or_refused() {
        let with = |v: serde_json::Value| -> Options {
            HashMap::from([(
                GENERIC_OPTIONS.to_string(),
                serde_json::json!({ "cluster": v }),
            )])
        };
        assert!(!cluster_option(None).unwrap());
        assert!(cluster_option(Some(&with("true".into()))).unwrap());
        assert!(cluster_option(Some(&with(true.into()))).unwrap());
        assert!(!cluster_option(Some(&with("false".into()))).unwrap());
        let err = cluster_option(Some(&with("maybe".into()))).unwrap_err();
        assert!(err.to_string().contains("-o cluster=true"), "{err}");
        assert!(cluster_option(Some(&with(3.into()))).is_err());
        assert!(cluster_option(Some(&with("".into()))).is_err());
    }

    #[test]
    fn driver_options_other_than_cluster_are_refused() {
        let with =
            |v: serde_json::Value| -> Options { HashMap::from([(GENERIC_OPTIONS.to_string(), v)]) };
        assert!(check_driver_options(None).is_ok());
        assert!(check_driver_options(Some(&with(serde_json::json!({})))).is_ok());
        assert!(check_driver_options(Some(&with(serde_json::Value::Null))).is_ok());
        let cluster = with(serde_json::json!({"cluster": "true"}));
        assert!(check_driver_options(Some(&cluster)).is_ok());
        let err = check_driver_options(Some(&with(
            serde_json::json!({"cluster": "true", "encrypted": "true"}),
        )))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("encrypted") && err.contains("unencrypted"),
            "{err}"
        );
        let err = check_driver_options(Some(&with(
            serde_json::json!({"com.docker.network.driver.mtu": "1400"}),
        )))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("-o com.docker.network.driver.mtu") && err.contains("cluster"),
            "{err}"
        );
        assert!(check_driver_options(Some(&with(serde_json::json!(["encrypted"])))).is_err());
        // Other top-level options (IPv6, internal) are Docker's, not the user's.
        let top = HashMap::from([(
            "com.docker.network.enable_ipv6".to_string(),
            serde_json::Value::Bool(true),
        )]);
        assert!(check_driver_options(Some(&top)).is_ok());
    }

    #[test]
    fn address_purpose_follows_the_options_docker_sends() {
        let opts = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(address_purpose(None), AddressPurpose::Unmarked);
        assert_eq!(address_purpose(Some(&opts(&[]))), AddressPurpose::Unmarked);
        assert_eq!(
            address_purpose(Some(&opts(&[(REQUEST_ADDRESS_TYPE, GATEWAY_ADDRESS_TYPE)]))),
            AddressPurpose::Gateway
        );
        assert_eq!(
            address_purpose(Some(&opts(&[(
                "com.docker.network.endpoint.name",
                "web-1"
            )]))),
            AddressPurpose::Endpoint
        );
    }

    #[test]
    fn pool_request_validation() {
        assert!(pool_request("", "10.0.0.0/24", false).is_err());
        assert!(pool_request("10.0.0.0/24", "10.0.1.0/25", false).is_err());
        assert!(pool_request("10.0.0.0/24", "", true).is_err());
        assert!(pool_request("bogus", "", false).is_err());
        assert!(pool_request("", "", true).is_err());
        let r = pool_request("10.0.0.7/24", "10.0.0.128/25", false).unwrap();
        assert_eq!(r.subnet, Some(net("10.0.0.0/24")));
    }
}
