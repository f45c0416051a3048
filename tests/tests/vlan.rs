//! 802.1Q: clients on a VLAN resolve the VIP. A tagged ARP request or neighbour solicitation
//! reaches a member with its tag in the frame (the switch port sends tags inline: tx VLAN
//! offload off) or in the packet's metadata (the veth and bridge default, as rx VLAN offload on
//! many NICs): either way exactly one member answers, its owner, with the cluster MAC, and the
//! answer carries the client's tag. Raw tagged frames from 100 client addresses.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use farm_tests::{
    probe::{self, Answer},
    topology::{Spec, Topology, VIP4, VIP6},
};

const VID: u16 = 100;

/// Checks one answer per requester, tagged `VID`, with the cluster MAC, from its owner's MAC.
fn check<K: std::fmt::Debug + Ord + Copy + Into<IpAddr>>(
    what: &str,
    got: &BTreeMap<K, Vec<Answer>>,
    owner_mac: &dyn Fn(IpAddr) -> [u8; 6],
    cluster: [u8; 6],
) {
    let mut bad = Vec::new();
    for (&src, answers) in got {
        let owner = owner_mac(src.into());
        let ok = answers.len() == 1
            && answers[0].vlan == Some(VID)
            && answers[0].lladdr == Some(cluster)
            && answers[0].eth_src == owner;
        if !ok {
            bad.push((src, answers.clone()));
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: {} of {} requesters not answered exactly once, tagged {VID}, with the cluster \
         MAC, by their owner; e.g. {:?}",
        bad.len(),
        got.len(),
        &bad[..bad.len().min(3)]
    );
}

#[test]
fn tagged_arp_and_ns_answered_tagged_by_the_owner() {
    let Some(t) = Topology::started(
        "tagged_arp_and_ns_answered_tagged_by_the_owner",
        Spec {
            nodes: 3,
            client_addrs: 100,
            ..Spec::default()
        },
    ) else {
        return;
    };
    let cluster = t.cluster_mac();
    let v4: Vec<Ipv4Addr> = t.client_v4.clone();
    let v6: Vec<Ipv6Addr> = t.client_v6.clone();
    let mut clients: Vec<IpAddr> = v4.iter().map(|&a| IpAddr::V4(a)).collect();
    clients.extend(v6.iter().map(|&a| IpAddr::V6(a)));
    let owners = t.owners(0, &clients);
    let macs: BTreeMap<String, [u8; 6]> = (0..3)
        .map(|i| (t.nodes[i].name.clone(), t.node_mac(i)))
        .collect();
    let owner_mac = |c: IpAddr| macs[&owners[&c]];

    for placement in ["metadata", "frame"] {
        if placement == "frame" {
            // The switch puts the tag back into the frame on the way to every member.
            for n in &t.nodes {
                let out = std::process::Command::new("ip")
                    .args(["netns", "exec", &t.switch.name, "ethtool", "-K", &n.name])
                    .args(["txvlan", "off"])
                    .output()
                    .expect("ethtool");
                assert!(out.status.success(), "ethtool: {out:?}");
            }
        }
        let got = probe::arp_many(
            &t.client,
            "eth0",
            v4.clone(),
            VIP4,
            Some(VID),
            Duration::from_millis(1500),
        );
        check(
            &format!("ARP, tag in the {placement}"),
            &got,
            &owner_mac,
            cluster,
        );
        let got = probe::neighbour_solicitations(
            &t.client,
            "eth0",
            v6.clone(),
            VIP6,
            Some(VID),
            Duration::from_millis(1500),
        );
        check(
            &format!("NS, tag in the {placement}"),
            &got,
            &owner_mac,
            cluster,
        );
        eprintln!(
            "tag in the {placement}: {} ARP and {} NS requesters each answered once, tagged, by \
             their owner",
            v4.len(),
            v6.len()
        );
    }
}
