//! Every method through the real socket of the real binary, and bad input of
//! every kind: each gets Docker's error shape with a clear message, and the
//! plugin keeps serving.

mod support;

use serde_json::json;
use support::{Netns, Plugin};

const ROOT_TIER: &str = "needs root: scripts/test runs this tier";

#[tokio::test]
#[ignore = "needs root: scripts/test runs this tier"]
async fn every_method_answers_and_repeats_are_idempotent() {
    let _ = ROOT_TIER;
    let ns = Netns::new();
    let dir = Plugin::dir_for("methods");
    let plugin = Plugin::start(&ns, &dir, "h1").await;
    let c = plugin.client();

    let act = c.call("Plugin.Activate", json!({})).await.ok();
    assert_eq!(
        act,
        json!({"Implements": ["NetworkDriver", "IpamDriver", "authz"]})
    );
    // Docker sends no body on some calls.
    let caps = c.raw("NetworkDriver.GetCapabilities", b"").await.ok();
    assert_eq!(
        caps,
        json!({"Scope": "local", "ConnectivityScope": "global"})
    );
    // The authorization hook allows what it has nothing against, and what
    // it cannot read: a hook that fails would deny the engine's whole API.
    for body in [
        &br#"{"RequestMethod":"GET","RequestUri":"/v1.45/containers/json"}"#[..],
        br#"{"RequestMethod":"DELETE","RequestUri":"/v1.45/networks/nosuchnet"}"#,
        b"not json",
        b"",
    ] {
        let answer = c.raw("AuthZPlugin.AuthZReq", body).await.ok();
        assert_eq!(
            answer,
            json!({"Allow": true}),
            "{:?}",
            String::from_utf8_lossy(body)
        );
    }
    // Docker sends the whole answer it checks: a large one is no reason to
    // fail (that would fail the engine's request).
    for body in [&b"{}"[..], &vec![b' '; 6 << 20]] {
        let answer = c.raw("AuthZPlugin.AuthZRes", body).await.ok();
        assert_eq!(answer, json!({"Allow": true}));
    }
    let ipam_caps = c.raw("IpamDriver.GetCapabilities", b"").await.ok();
    // No MAC from Docker: the driver derives it from the address.
    assert_eq!(ipam_caps["RequiresMACAddress"], json!(false));
    assert!(ipam_caps["RequiresRequestReplay"].is_boolean());
    let spaces = c.raw("IpamDriver.GetDefaultAddressSpaces", b"").await.ok();
    let space = spaces["LocalDefaultAddressSpace"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!space.is_empty());

    let pool = c.request_pool("10.77.0.0/24").await.ok();
    assert_eq!(pool["PoolID"], json!("10.77.0.0/24"));
    assert_eq!(pool["Pool"], json!("10.77.0.0/24"));
    let gw = c.request_gateway("10.77.0.0/24").await.ok();
    assert_eq!(gw["Address"], json!("10.77.0.1/24"));
    // The gateway request is idempotent: the same gateway again.
    assert_eq!(
        c.request_gateway("10.77.0.0/24").await.ok()["Address"],
        json!("10.77.0.1/24")
    );
    let aux = c.request_aux("10.77.0.0/24", "10.77.0.250").await.ok();
    assert_eq!(aux["Address"], json!("10.77.0.250/24"));

    let create = json!({
        "NetworkID": "net1",
        "Options": {"com.docker.network.enable_ipv6": false, "com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": space, "Pool": "10.77.0.0/24", "Gateway": "10.77.0.1/24",
                      "AuxAddresses": {"router": "10.77.0.250/24"}}],
        "IPv6Data": []
    });
    assert_eq!(
        c.call("NetworkDriver.CreateNetwork", create.clone())
            .await
            .ok(),
        json!({})
    );
    assert_eq!(
        c.call("NetworkDriver.CreateNetwork", create).await.ok(),
        json!({})
    );
    // Once the network exists here, a given address is a container's (--ip),
    // and a container never gets an aux address.
    let e = c.request_address("10.77.0.0/24", "10.77.0.250").await.err();
    assert!(
        e.contains("10.77.0.250") && e.contains("aux address"),
        "{e}"
    );

    let addr = c.request_address("10.77.0.0/24", "").await.ok();
    let addr = addr["Address"].as_str().unwrap().to_string();
    assert_eq!(addr, "10.77.0.2/24");
    let ep = json!({"NetworkID": "net1", "EndpointID": "ep0123456789abcdef",
                    "Interface": {"Address": addr, "AddressIPv6": "", "MacAddress": ""}, "Options": {}});
    let created = c
        .call("NetworkDriver.CreateEndpoint", ep.clone())
        .await
        .ok();
    let mac = created["Interface"]["MacAddress"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(mac.len(), 17);
    // Only what Docker left empty comes back.
    assert!(created["Interface"].get("Address").is_none());
    c.call("NetworkDriver.CreateEndpoint", ep).await.ok();

    let info = c
        .call(
            "NetworkDriver.EndpointOperInfo",
            json!({"NetworkID": "net1", "EndpointID": "ep0123456789abcdef"}),
        )
        .await
        .ok();
    assert_eq!(info["Value"]["mac"], json!(mac));

    let join = json!({"NetworkID": "net1", "EndpointID": "ep0123456789abcdef", "SandboxKey": "/var/run/docker/netns/x", "Options": {}});
    let joined = c.call("NetworkDriver.Join", join.clone()).await.ok();
    let src = joined["InterfaceName"]["SrcName"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(joined["InterfaceName"]["DstPrefix"], json!("eth"));
    assert_eq!(joined["Gateway"], json!(""));
    assert!(
        ns.links().contains(&src),
        "the container side {src} is in the host namespace"
    );
    // Join replayed: same answer, still one link.
    let again = c.call("NetworkDriver.Join", join).await.ok();
    assert_eq!(again["InterfaceName"]["SrcName"], json!(src));

    for m in [
        "NetworkDriver.ProgramExternalConnectivity",
        "NetworkDriver.RevokeExternalConnectivity",
    ] {
        let r = c
            .call(
                m,
                json!({"NetworkID": "net1", "EndpointID": "ep0123456789abcdef", "Options": {}}),
            )
            .await;
        assert_eq!(r.ok(), json!({}));
    }
    for m in ["NetworkDriver.DiscoverNew", "NetworkDriver.DiscoverDelete"] {
        assert_eq!(
            c.call(m, json!({"DiscoveryType": 1, "DiscoveryData": {}}))
                .await
                .ok(),
            json!({})
        );
    }

    let leave = json!({"NetworkID": "net1", "EndpointID": "ep0123456789abcdef"});
    c.call("NetworkDriver.Leave", leave.clone()).await.ok();
    assert!(!ns.links().contains(&src));
    c.call("NetworkDriver.DeleteEndpoint", leave.clone())
        .await
        .ok();
    c.call("NetworkDriver.DeleteEndpoint", leave).await.ok();
    c.release_address("10.77.0.0/24", "10.77.0.2").await.ok();
    c.release_address("10.77.0.0/24", "10.77.0.250").await.ok();
    c.release_address("10.77.0.0/24", "10.77.0.1").await.ok();
    c.call("NetworkDriver.DeleteNetwork", json!({"NetworkID": "net1"}))
        .await
        .ok();
    c.call("NetworkDriver.DeleteNetwork", json!({"NetworkID": "net1"}))
        .await
        .ok();
    c.release_pool("10.77.0.0/24").await.ok();

    let mut plugin = plugin;
    plugin.stop();
    let left = support::store_keys(&dir).await;
    let alloc: Vec<_> = left
        .iter()
        .filter(|k| k.contains("/ipam/pool/") || k.contains("/overlay/") || k.contains("/net/"))
        .collect();
    assert!(alloc.is_empty(), "store keeps {alloc:?}");
}

#[tokio::test]
#[ignore = "needs root: scripts/test runs this tier"]
async fn bad_input_gets_a_clear_error_and_the_plugin_keeps_serving() {
    let ns = Netns::new();
    let dir = Plugin::dir_for("bad");
    let plugin = Plugin::start(&ns, &dir, "h1").await;
    let c = plugin.client();

    // Transport-level mistakes.
    let e = c.raw("NetworkDriver.CreateNetwork", b"").await.err();
    assert!(e.contains("empty"), "{e}");
    let e = c
        .raw("NetworkDriver.CreateNetwork", b"{not json")
        .await
        .err();
    assert!(e.contains("malformed JSON"), "{e}");
    let e = c
        .call("NetworkDriver.CreateNetwork", json!({"NetworkID": 5}))
        .await
        .err();
    assert!(e.contains("invalid type"), "{e}");
    let e = c
        .call("IpamDriver.RequestPool", json!({"Pool": ["10.0.0.0/8"]}))
        .await
        .err();
    assert!(e.contains("invalid type"), "{e}");
    let e = c
        .call("NetworkDriver.CreateNetwork", json!([1, 2]))
        .await
        .err();
    assert!(e.contains("malformed"), "{e}");
    let r = c.call("NetworkDriver.NoSuchMethod", json!({})).await;
    assert_eq!(r.status, 404);
    assert!(r.err().contains("not a method"));

    // Missing fields.
    let e = c.call("NetworkDriver.CreateNetwork", json!({})).await.err();
    assert!(e.contains("NetworkID"), "{e}");
    let e = c
        .call("NetworkDriver.Join", json!({"NetworkID": "x"}))
        .await
        .err();
    assert!(e.contains("EndpointID"), "{e}");
    let e = c.call("IpamDriver.ReleasePool", json!({})).await.err();
    assert!(e.contains("PoolID"), "{e}");

    // Unknown things.
    let e = c.call("NetworkDriver.CreateEndpoint", json!({"NetworkID": "nope", "EndpointID": "e1", "Interface": {"Address": "10.77.0.9/24"}})).await.err();
    assert!(e.contains("not a rustoverlay network"), "{e}");
    let e = c.request_address("10.99.0.0/24", "").await.err();
    assert!(e.contains("not claimed"), "{e}");
    let e = c.request_address("garbage", "").await.err();
    assert!(e.contains("not a rustoverlay pool"), "{e}");
    let e = c.release_pool("10.99.0.0/24").await.err();
    assert!(e.contains("not claimed"), "{e}");

    // Docker's default IPAM cannot be shared across hosts: refused with the
    // right command.
    let e = c
        .call("NetworkDriver.CreateNetwork", json!({"NetworkID": "d1", "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": "172.20.0.0/16"}]}))
        .await
        .err();
    assert!(e.contains("--ipam-driver rustoverlay"), "{e}");

    // Pools: bad subnets, overlap, double release.
    for bad in ["10.0.0.0/33", "300.1.1.1/24", "10.0.0.0"] {
        let e = c.request_pool(bad).await.err();
        assert!(e.contains("not a valid subnet"), "{bad}: {e}");
    }
    let e = c
        .call(
            "IpamDriver.RequestPool",
            json!({"Pool": "", "SubPool": "10.1.0.0/24", "V6": false}),
        )
        .await
        .err();
    assert!(e.contains("--ip-range"), "{e}");
    c.request_pool("10.77.0.0/16").await.ok();
    let e = c.request_pool("10.77.3.0/24").await.err();
    assert!(e.contains("overlaps subnet 10.77.0.0/16"), "{e}");
    c.release_pool("10.77.0.0/16").await.ok();
    let e = c.release_pool("10.77.0.0/16").await.err();
    assert!(
        e.contains("not claimed") || e.contains("released twice"),
        "{e}"
    );

    // Addresses: outside, taken, double release, exhausted.
    c.request_pool("10.78.0.0/29").await.ok(); // 6 usable addresses
    c.request_gateway("10.78.0.0/29").await.ok();
    // The network exists on this host, so a given address is a container's
    // (--ip), not an aux reservation.
    c.call(
        "NetworkDriver.CreateNetwork",
        json!({"NetworkID": "n78", "IPv4Data": [{"AddressSpace": "RustOverlayLocal", "Pool": "10.78.0.0/29"}]}),
    )
    .await
    .ok();
    let e = c.request_address("10.78.0.0/29", "10.9.9.9").await.err();
    assert!(e.contains("not in subnet"), "{e}");
    let e = c.request_address("10.78.0.0/29", "10.78.0.7").await.err();
    assert!(e.contains("broadcast"), "{e}");
    c.request_address("10.78.0.0/29", "10.78.0.5").await.ok();
    // A retry (the first answer lost) gets the same allocation: it is this
    // host's and no endpoint is bound to it yet.
    c.request_address("10.78.0.0/29", "10.78.0.5").await.ok();
    // Once an endpoint is bound to it, it is in use.
    c.call(
        "NetworkDriver.CreateEndpoint",
        json!({"NetworkID": "n78", "EndpointID": "e5", "Interface": {"Address": "10.78.0.5/29"}}),
    )
    .await
    .ok();
    let e = c.request_address("10.78.0.0/29", "10.78.0.5").await.err();
    assert!(e.contains("already in use"), "{e}");
    let e = c.request_address("10.78.0.0/29", "10.78.0.1").await.err();
    assert!(e.contains("gateway"), "{e}");
    let mut got = vec![];
    for _ in 0..4 {
        got.push(
            c.request_address("10.78.0.0/29", "").await.ok()["Address"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // The cursor stepped over the --ip address 10.78.0.5.
    assert_eq!(
        got,
        [
            "10.78.0.2/29",
            "10.78.0.3/29",
            "10.78.0.4/29",
            "10.78.0.6/29"
        ]
    );
    let e = c.request_address("10.78.0.0/29", "").await.err();
    assert!(e.contains("no free address"), "{e}");
    c.release_address("10.78.0.0/29", "10.78.0.3").await.ok();
    let e = c.release_address("10.78.0.0/29", "10.78.0.3").await.err();
    assert!(e.contains("not allocated"), "{e}");
    let e = c.release_address("10.78.0.0/29", "nonsense").await.err();
    assert!(e.contains("not an IP"), "{e}");
    // The released address is the one free address left.
    assert_eq!(
        c.request_address("10.78.0.0/29", "").await.ok()["Address"],
        json!("10.78.0.3/29")
    );

    // An unknown endpoint on a known network.
    for m in [
        "NetworkDriver.Join",
        "NetworkDriver.Leave",
        "NetworkDriver.EndpointOperInfo",
    ] {
        let e = c
            .call(
                m,
                json!({"NetworkID": "n78", "EndpointID": "nosuchendpoint", "SandboxKey": "/x"}),
            )
            .await
            .err();
        assert!(
            e.contains("endpoint nosuchendpoint does not exist"),
            "{m}: {e}"
        );
    }
    // An endpoint address outside the network, a malformed MAC.
    let e = c
        .call("NetworkDriver.CreateEndpoint", json!({"NetworkID": "n78", "EndpointID": "e2", "Interface": {"Address": "10.1.1.1/24"}}))
        .await
        .err();
    assert!(e.contains("outside the network"), "{e}");
    let e = c
        .call("NetworkDriver.CreateEndpoint", json!({"NetworkID": "n78", "EndpointID": "e2", "Interface": {"Address": "10.78.0.2/29", "MacAddress": "zz"}}))
        .await
        .err();
    assert!(e.contains("not a MAC"), "{e}");

    // Still serving.
    c.call("Plugin.Activate", json!({})).await.ok();
}

#[tokio::test]
#[ignore = "needs root: scripts/test runs this tier"]
async fn ipv6_pool_and_ip_range() {
    let ns = Netns::new();
    let dir = Plugin::dir_for("v6");
    let plugin = Plugin::start(&ns, &dir, "h1").await;
    let c = plugin.client();
    let p = c
        .call(
            "IpamDriver.RequestPool",
            json!({"Pool": "fd00:77::/64", "SubPool": "", "V6": true}),
        )
        .await
        .ok();
    assert_eq!(p["PoolID"], json!("fd00:77::/64"));
    assert_eq!(
        c.request_gateway("fd00:77::/64").await.ok()["Address"],
        json!("fd00:77::1/64")
    );
    assert_eq!(
        c.request_address("fd00:77::/64", "").await.ok()["Address"],
        json!("fd00:77::2/64")
    );
    let e = c
        .call(
            "IpamDriver.RequestPool",
            json!({"Pool": "", "SubPool": "", "V6": true}),
        )
        .await
        .err();
    assert!(e.contains("IPv6"), "{e}");

    let r = c
        .call(
            "IpamDriver.RequestPool",
            json!({"Pool": "10.80.0.0/24", "SubPool": "10.80.0.128/25", "V6": false}),
        )
        .await
        .ok();
    assert_eq!(r["PoolID"], json!("10.80.0.0/24"));
    assert_eq!(
        c.request_address("10.80.0.0/24", "").await.ok()["Address"],
        json!("10.80.0.128/24")
    );
    // The same subnet with another range is refused with the range to use.
    let e = c
        .call(
            "IpamDriver.RequestPool",
            json!({"Pool": "10.80.0.0/24", "SubPool": "", "V6": false}),
        )
        .await
        .err();
    assert!(e.contains("--ip-range 10.80.0.128/25"), "{e}");
    // No subnet: the next free one of the default pool.
    let auto = c.request_pool("").await.ok();
    assert_eq!(auto["Pool"], json!("10.200.0.0/24"));
    let auto2 = c.request_pool("").await.ok();
    assert_eq!(auto2["Pool"], json!("10.200.1.0/24"));
}
