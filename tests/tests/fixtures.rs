//! XDP packet fixtures: crafted frames through BPF_PROG_TEST_RUN, each with its expected verdict
//! and, where the program rewrites or answers, the expected output frame.
//!
//! The bucket table marks even buckets as this node's, so the expected verdict of every frame
//! follows from `farm_common::bucket_of` — the same function the program runs.

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun as _, TestRunOptions};
use farm_common::{BUCKETS, BucketEntry, BucketKey};
use farm_daemon::dataplane::Dataplane;
use farm_tests::{
    fixture::{UDP_CONN_PORT, VIP4, VIP6, client4, client6, dataplane, mine},
    frames::*,
    require_root,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const ROUTER4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const OTHER4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);

fn verdict(k: BucketKey) -> u32 {
    if mine(k) { XDP_PASS } else { XDP_DROP }
}

fn run(dp: &mut Dataplane, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let r = dp
        .xdp_program()
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// A frame to the cluster MAC carrying an IPv4 packet.
fn v4_frame(ip: &V4, l4: &[u8]) -> Vec<u8> {
    eth(CLUSTER_MAC, CLIENT_MAC, 0x0800, &ip.build(l4))
}

fn v6_frame(
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    nh: u8,
    ext: &[u8],
    l4: &[u8],
) -> Vec<u8> {
    eth(dst_mac, CLIENT_MAC, 0x86dd, &ipv6(src, dst, nh, ext, l4))
}

/// The frame as the stack should get it: destination MAC rewritten to the interface's.
fn rewritten(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[..6].copy_from_slice(&IF_MAC);
    f
}

/// An extra check of an output frame.
type Check = Box<dyn Fn(&[u8]) -> Result<(), String>>;

struct Case {
    name: String,
    frame: Vec<u8>,
    verdict: u32,
    /// Expected output frame (checked for XDP_PASS and XDP_TX).
    output: Option<Vec<u8>>,
    /// Extra check of the output frame.
    check: Option<Check>,
}

fn case(name: impl Into<String>, frame: Vec<u8>, verdict: u32) -> Case {
    let output = match verdict {
        XDP_PASS => Some(frame.clone()),
        _ => None,
    };
    Case {
        name: name.into(),
        frame,
        verdict,
        output,
        check: None,
    }
}

/// A frame for a VIP: on PASS the output is the rewritten frame.
fn vip_case(name: impl Into<String>, frame: Vec<u8>, verdict: u32) -> Case {
    let output = (verdict == XDP_PASS).then(|| rewritten(&frame));
    Case {
        name: name.into(),
        frame,
        verdict,
        output,
        check: None,
    }
}

fn cases() -> Vec<Case> {
    let (m4, t4) = (client4(true), client4(false));
    let (m6, t6) = (client6(true), client6(false));
    let tcp80 = tcp(40000, 80);
    let mut v = Vec::new();

    // --- Truncation at every header -------------------------------------------------------
    let full = v4_frame(&V4::new(m4, VIP4, 6), &tcp80);
    // (BPF_PROG_TEST_RUN, like every driver, never runs XDP on less than an Ethernet header.)
    v.push(case(
        "ethernet header only, IPv4 type",
        full[..14].to_vec(),
        XDP_PASS,
    ));
    v.push(case(
        "vlan tag truncated",
        eth_vlan(CLUSTER_MAC, CLIENT_MAC, 7, 0x0800, &[])[..16].to_vec(),
        XDP_PASS,
    ));
    v.push(case(
        "ipv4 header truncated (destination unreadable)",
        full[..14 + 12].to_vec(),
        XDP_PASS,
    ));
    v.push(case(
        "ipv4 to VIP, tcp header truncated",
        full[..14 + 20 + 2].to_vec(),
        XDP_DROP,
    ));
    let full6 = v6_frame(CLUSTER_MAC, m6, VIP6, 6, &[], &tcp80);
    v.push(case(
        "ipv6 header truncated",
        full6[..14 + 30].to_vec(),
        XDP_PASS,
    ));
    v.push(case(
        "ipv6 to VIP, tcp header truncated",
        full6[..14 + 40 + 3].to_vec(),
        XDP_DROP,
    ));

    // --- IPv4 headers -----------------------------------------------------------------------
    let mut bad_ihl = v4_frame(&V4::new(m4, VIP4, 6), &tcp80);
    bad_ihl[14] = 0x44; // IHL 4: shorter than the minimum
    v.push(case("ipv4 to VIP with IHL 4", bad_ihl, XDP_DROP));
    let mut bad_ver = v4_frame(&V4::new(m4, VIP4, 6), &tcp80);
    bad_ver[14] = 0x65;
    v.push(case(
        "ipv4 to VIP with version 6 in the header",
        bad_ver,
        XDP_DROP,
    ));
    let mut bad_ihl_other = v4_frame(&V4::new(m4, OTHER4, 6), &tcp80);
    bad_ihl_other[14] = 0x44;
    v.push(case(
        "ipv4 not for a VIP with IHL 4 (the kernel's business)",
        bad_ihl_other,
        XDP_PASS,
    ));
    v.push(vip_case(
        "tcp to VIP, my client",
        v4_frame(&V4::new(m4, VIP4, 6), &tcp80),
        XDP_PASS,
    ));
    v.push(vip_case(
        "tcp to VIP, another member's client",
        v4_frame(&V4::new(t4, VIP4, 6), &tcp80),
        XDP_DROP,
    ));
    let mut opts = V4::new(m4, VIP4, 6);
    opts.options = 12;
    v.push(vip_case(
        "ipv4 with 12 bytes of options, my client",
        v4_frame(&opts, &tcp80),
        XDP_PASS,
    ));
    let mut opts = V4::new(t4, VIP4, 6);
    opts.options = 40;
    v.push(vip_case(
        "ipv4 with 40 bytes of options, other client",
        v4_frame(&opts, &tcp80),
        XDP_DROP,
    ));
    let vlan = eth_vlan(
        CLUSTER_MAC,
        CLIENT_MAC,
        42,
        0x0800,
        &V4::new(m4, VIP4, 6).build(&tcp80),
    );
    v.push(vip_case(
        "vlan-tagged tcp to VIP, my client",
        vlan,
        XDP_PASS,
    ));
    let vlan = eth_vlan(
        CLUSTER_MAC,
        CLIENT_MAC,
        42,
        0x0800,
        &V4::new(t4, VIP4, 6).build(&tcp80),
    );
    v.push(vip_case(
        "vlan-tagged tcp to VIP, other client",
        vlan,
        XDP_DROP,
    ));
    v.push(case(
        "ipv4 tcp not for a VIP passes untouched",
        eth(
            IF_MAC,
            CLIENT_MAC,
            0x0800,
            &V4::new(t4, OTHER4, 6).build(&tcp80),
        ),
        XDP_PASS,
    ));
    v.push(vip_case(
        "other IP protocol (GRE) to VIP, by client",
        v4_frame(&V4::new(m4, VIP4, 47), &[0; 8]),
        XDP_PASS,
    ));

    // --- connection affinity ----------------------------------------------------------------
    for port in [41000u16, 41001, 41002, 41003] {
        let k = BucketKey::V4Port(m4.octets(), port.to_be_bytes());
        v.push(vip_case(
            format!("udp {UDP_CONN_PORT} connection affinity, port {port}"),
            v4_frame(&V4::new(m4, VIP4, 17), &udp(port, UDP_CONN_PORT, b"hello")),
            verdict(k),
        ));
    }

    // --- Fragments: every fragment of a datagram goes where its client address goes ---------
    // A source port whose (address, port) bucket is NOT ours while the address's bucket is:
    // the fragments must still be accepted, whatever the affinity.
    let port_not_mine = (1000u16..)
        .find(|p| !mine(BucketKey::V4Port(m4.octets(), p.to_be_bytes())))
        .expect("port");
    let mut first = V4::new(m4, VIP4, 17);
    first.mf = true;
    first.id = 77;
    let udp_first = udp(port_not_mine, UDP_CONN_PORT, &[0xab; 24]);
    v.push(vip_case(
        "first fragment (MF, offset 0), by client address",
        v4_frame(&first, &udp_first),
        XDP_PASS,
    ));
    let mut middle = first.clone();
    middle.frag_offset = 4;
    v.push(vip_case(
        "middle fragment (MF, offset 32)",
        v4_frame(&middle, &[0xcd; 32]),
        XDP_PASS,
    ));
    let mut last = middle.clone();
    last.mf = false;
    last.frag_offset = 8;
    v.push(vip_case(
        "last fragment (offset 64)",
        v4_frame(&last, &[0xef; 8]),
        XDP_PASS,
    ));
    let mut other_frag = last.clone();
    other_frag.src = t4;
    v.push(vip_case(
        "fragment of another member's client",
        v4_frame(&other_frag, &[0; 8]),
        XDP_DROP,
    ));

    // --- ICMP ----------------------------------------------------------------------------------
    v.push(vip_case(
        "icmp echo to VIP, my client",
        v4_frame(&V4::new(m4, VIP4, 1), &icmp(8, 0, [0, 1, 0, 1], b"ping")),
        XDP_PASS,
    ));
    v.push(vip_case(
        "icmp echo to VIP, other client",
        v4_frame(&V4::new(t4, VIP4, 1), &icmp(8, 0, [0, 1, 0, 1], b"ping")),
        XDP_DROP,
    ));
    // Frag-needed from a router, quoting a packet the VIP sent to my client: the router's own
    // address does not matter (choose one whose bucket is not ours).
    let router = (1..=250u8)
        .map(|i| Ipv4Addr::new(198, 51, 100, i))
        .find(|a| !mine(BucketKey::V4(a.octets())))
        .unwrap_or(ROUTER4);
    let inner = V4::new(VIP4, m4, 6).build(&tcp(80, 40000)[..8]);
    v.push(vip_case(
        "icmp frag-needed quoting VIP->my client tcp: classified by inner destination",
        v4_frame(
            &V4::new(router, VIP4, 1),
            &icmp(3, 4, [0, 0, 0x05, 0xdc], &inner),
        ),
        XDP_PASS,
    ));
    let inner = V4::new(VIP4, t4, 6).build(&tcp(80, 40000)[..8]);
    v.push(vip_case(
        "icmp frag-needed quoting VIP->other client",
        v4_frame(
            &V4::new(router, VIP4, 1),
            &icmp(3, 4, [0, 0, 0x05, 0xdc], &inner),
        ),
        XDP_DROP,
    ));
    // Time exceeded quoting a connection-affinity UDP packet: (client, client port) swapped.
    let cport = 42424u16;
    let inner = V4::new(VIP4, m4, 17).build(&udp(UDP_CONN_PORT, cport, &[])[..8]);
    v.push(vip_case(
        "icmp time exceeded quoting VIP:5000->client:42424 udp (connection affinity)",
        v4_frame(&V4::new(router, VIP4, 1), &icmp(11, 0, [0; 4], &inner)),
        verdict(BucketKey::V4Port(m4.octets(), cport.to_be_bytes())),
    ));
    v.push(vip_case(
        "icmp error whose quoted packet is truncated",
        v4_frame(
            &V4::new(router, VIP4, 1),
            &icmp(3, 4, [0; 4], &[0x45, 0, 0]),
        ),
        XDP_DROP,
    ));

    // --- ARP -----------------------------------------------------------------------------------
    let arp_req = |spa: Ipv4Addr, tpa: Ipv4Addr| {
        eth(
            [0xff; 6],
            CLIENT_MAC,
            0x0806,
            &arp(1, CLIENT_MAC, spa, [0; 6], tpa),
        )
    };
    // Untagged in the frame (a tag may be in the packet's metadata): the answer goes up marked,
    // for the tc program to send out with the skb's tag.
    let mut c = case(
        "arp request for VIP from my client: answered with the cluster MAC",
        arp_req(m4, VIP4),
        XDP_PASS,
    );
    c.output = Some(reflected(&eth(
        CLIENT_MAC,
        IF_MAC,
        0x0806,
        &arp(2, CLUSTER_MAC, VIP4, CLIENT_MAC, m4),
    )));
    v.push(c);
    // Tagged in the frame: answered from XDP, the tag kept.
    let mut c = case(
        "vlan-tagged arp request for VIP from my client: answered tagged",
        eth_vlan(
            [0xff; 6],
            CLIENT_MAC,
            7,
            0x0806,
            &arp(1, CLIENT_MAC, m4, [0; 6], VIP4),
        ),
        XDP_TX,
    );
    c.output = Some(eth_vlan(
        CLIENT_MAC,
        IF_MAC,
        7,
        0x0806,
        &arp(2, CLUSTER_MAC, VIP4, CLIENT_MAC, m4),
    ));
    v.push(c);
    v.push(case(
        "arp request for VIP from another member's client: left to it",
        arp_req(t4, VIP4),
        XDP_DROP,
    ));
    v.push(case(
        "arp request not for a VIP",
        arp_req(m4, OTHER4),
        XDP_PASS,
    ));
    v.push(case(
        "gratuitous arp for the VIP from a peer: kept from the kernel",
        eth(
            [0xff; 6],
            [2, 0, 0, 0, 0, 0x22],
            0x0806,
            &arp(1, CLUSTER_MAC, VIP4, [0; 6], VIP4),
        ),
        XDP_DROP,
    ));
    v.push(vip_case(
        "arp reply to the VIP (answers a member's request): accepted",
        eth(
            CLUSTER_MAC,
            CLIENT_MAC,
            0x0806,
            &arp(2, CLIENT_MAC, t4, CLUSTER_MAC, VIP4),
        ),
        XDP_PASS,
    ));
    let mut weird = arp_req(m4, VIP4);
    weird[14 + 4] = 8; // hardware address length 8
    v.push(case("arp with unexpected address lengths", weird, XDP_PASS));
    v.push(case(
        "arp truncated",
        arp_req(m4, VIP4)[..14 + 20].to_vec(),
        XDP_PASS,
    ));

    // --- IPv6 ----------------------------------------------------------------------------------
    v.push(vip_case(
        "ipv6 tcp to VIP, my client",
        v6_frame(CLUSTER_MAC, m6, VIP6, 6, &[], &tcp80),
        XDP_PASS,
    ));
    v.push(vip_case(
        "ipv6 tcp to VIP, other client",
        v6_frame(CLUSTER_MAC, t6, VIP6, 6, &[], &tcp80),
        XDP_DROP,
    ));
    let ext = [ext_opts(60), ext_opts(6)].concat();
    v.push(vip_case(
        "ipv6 hop-by-hop + destination options, my client",
        v6_frame(CLUSTER_MAC, m6, VIP6, 0, &ext, &tcp80),
        XDP_PASS,
    ));
    v.push(vip_case(
        "ipv6 hop-by-hop + destination options, other client",
        v6_frame(CLUSTER_MAC, t6, VIP6, 0, &ext, &tcp80),
        XDP_DROP,
    ));
    let port6 = (1000u16..)
        .find(|p| !mine(BucketKey::V6Port(m6.octets(), p.to_be_bytes())))
        .expect("port");
    v.push(vip_case(
        "ipv6 first fragment (M set) of a connection-affinity datagram, by client address",
        v6_frame(
            CLUSTER_MAC,
            m6,
            VIP6,
            44,
            &ext_frag(17, 0, true, 9),
            &udp(port6, UDP_CONN_PORT, &[0; 16]),
        ),
        XDP_PASS,
    ));
    v.push(vip_case(
        "ipv6 later fragment (offset 24)",
        v6_frame(
            CLUSTER_MAC,
            m6,
            VIP6,
            44,
            &ext_frag(17, 3, false, 9),
            &[0; 16],
        ),
        XDP_PASS,
    ));
    v.push(vip_case(
        "ipv6 atomic fragment is a whole datagram (connection affinity applies)",
        v6_frame(
            CLUSTER_MAC,
            m6,
            VIP6,
            44,
            &ext_frag(17, 0, false, 9),
            &udp(port6, UDP_CONN_PORT, &[]),
        ),
        XDP_DROP,
    ));
    let many: Vec<u8> = (0..7).flat_map(|_| ext_opts(60)).collect();
    v.push(case(
        "ipv6 with 7 extension headers (beyond the walk) to VIP",
        v6_frame(CLUSTER_MAC, m6, VIP6, 60, &many, &tcp80),
        XDP_DROP,
    ));
    v.push(case(
        "ipv6 not for a VIP passes untouched",
        v6_frame(
            IF_MAC,
            t6,
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11),
            6,
            &[],
            &tcp80,
        ),
        XDP_PASS,
    ));
    let inner6 = ipv6(VIP6, m6, 6, &[], &tcp(80, 40000)[..8]);
    let router6 = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);
    v.push(vip_case(
        "icmpv6 packet-too-big quoting VIP->my client",
        v6_frame(
            CLUSTER_MAC,
            router6,
            VIP6,
            58,
            &[],
            &icmp(2, 0, [0, 0, 0x05, 0x00], &inner6),
        ),
        XDP_PASS,
    ));
    let inner6 = ipv6(VIP6, t6, 6, &[], &tcp(80, 40000)[..8]);
    v.push(vip_case(
        "icmpv6 destination unreachable quoting VIP->other client",
        v6_frame(
            CLUSTER_MAC,
            router6,
            VIP6,
            58,
            &[],
            &icmp(1, 4, [0; 4], &inner6),
        ),
        XDP_DROP,
    ));
    v.push(vip_case(
        "icmpv6 echo to VIP, my client",
        v6_frame(
            CLUSTER_MAC,
            m6,
            VIP6,
            58,
            &[],
            &icmp(128, 0, [0, 1, 0, 1], b"ping"),
        ),
        XDP_PASS,
    ));

    // --- Neighbour discovery ----------------------------------------------------------------------
    let ns = |src: Ipv6Addr, target: Ipv6Addr| {
        let mut m = neighbour_solicitation(target, CLIENT_MAC);
        let sum = icmpv6_sum(src, solicited_node(target), &m);
        m[2..4].copy_from_slice(&sum.to_be_bytes());
        eth(
            [0x33, 0x33, 0xff, 0, 1, 0],
            CLIENT_MAC,
            0x86dd,
            &ipv6_hops(src, solicited_node(target), 58, 255, &m),
        )
    };
    let mut c = case(
        "neighbour solicitation for VIP from my client: advertisement with the cluster MAC",
        ns(m6, VIP6),
        XDP_PASS,
    );
    c.output = None;
    c.check = Some(Box::new(move |out: &[u8]| {
        let frame = out
            .strip_prefix(&farm_common::REFLECT_META.to_ne_bytes()[..])
            .ok_or_else(|| format!("not marked for the tc program: {:02x?}", &out[..4]))?;
        check_na(frame, m6)
    }));
    v.push(c);
    v.push(case(
        "neighbour solicitation for VIP from another client: left to its owner",
        ns(t6, VIP6),
        XDP_DROP,
    ));
    v.push(case(
        "neighbour solicitation for another address",
        ns(m6, Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11)),
        XDP_PASS,
    ));
    v.push(case(
        "neighbour solicitation from the VIP (a peer resolving): dropped",
        ns(VIP6, Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99)),
        XDP_DROP,
    ));

    // --- Not IP at all -------------------------------------------------------------------------
    v.push(case(
        "LLDP passes untouched",
        eth([0x01, 0x80, 0xc2, 0, 0, 0x0e], CLIENT_MAC, 0x88cc, &[0; 40]),
        XDP_PASS,
    ));
    v
}

fn ipv6_hops(src: Ipv6Addr, dst: Ipv6Addr, nh: u8, hops: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = ipv6(src, dst, nh, &[], payload);
    p[7] = hops;
    p
}

fn icmpv6_sum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    farm_daemon::announce::icmpv6_checksum(&src, &dst, msg)
}

/// An answer as BPF_PROG_TEST_RUN returns it when the program passes it up marked for the tc
/// program (the metadata word, then the frame).
fn reflected(frame: &[u8]) -> Vec<u8> {
    let mut out = farm_common::REFLECT_META.to_ne_bytes().to_vec();
    out.extend_from_slice(frame);
    out
}

/// The advertisement the program built in place of a solicitation from `client`.
fn check_na(out: &[u8], client: Ipv6Addr) -> Result<(), String> {
    if out.len() != 14 + 40 + 32 {
        return Err(format!("length {} (want 86)", out.len()));
    }
    if out[..6] != CLIENT_MAC || out[6..12] != IF_MAC {
        return Err(format!("ethernet {:02x?}", &out[..12]));
    }
    let ip = &out[14..54];
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).expect("16"));
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).expect("16"));
    if src != VIP6 || dst != client || ip[6] != 58 || ip[7] != 255 || ip[4..6] != [0, 32] {
        return Err(format!("ipv6 header {ip:02x?}"));
    }
    let icmp = &out[54..];
    if icmp[0] != 136 || icmp[4] != 0x60 || icmp[8..24] != VIP6.octets() {
        return Err(format!("advertisement {icmp:02x?}"));
    }
    if icmp[24..26] != [2, 1] || icmp[26..32] != CLUSTER_MAC {
        return Err(format!("target link-layer option {:02x?}", &icmp[24..32]));
    }
    let mut zeroed = icmp.to_vec();
    zeroed[2] = 0;
    zeroed[3] = 0;
    let want = icmpv6_sum(src, dst, &zeroed);
    if u16::from_be_bytes([icmp[2], icmp[3]]) != want {
        return Err(format!("checksum {:02x?}, want {want:04x}", &icmp[2..4]));
    }
    Ok(())
}

#[test]
fn xdp_packet_fixtures() {
    if !require_root("xdp_packet_fixtures") {
        return;
    }
    let mut dp = dataplane();
    let cases = cases();
    let mut failures = Vec::new();
    for c in &cases {
        let (ret, out) = run(&mut dp, &c.frame);
        if ret != c.verdict {
            failures.push(format!("{}: verdict {ret}, want {}", c.name, c.verdict));
            continue;
        }
        if let Some(want) = &c.output
            && &out != want
        {
            failures.push(format!(
                "{}: output frame\n  got  {out:02x?}\n  want {want:02x?}",
                c.name
            ));
        }
        if let Some(check) = &c.check
            && let Err(e) = check(&out)
        {
            failures.push(format!("{}: {e}", c.name));
        }
    }
    eprintln!("{} fixtures run", cases.len());
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // Counters moved for what the fixtures exercised.
    let stats = dp.stats().expect("stats");
    for (name, min) in [
        ("arp_answered", 1),
        ("arp_left_to_peer", 1),
        ("ndp_answered", 1),
        ("answers_reflected", 2),
        ("ndp_left_to_peer", 1),
        ("fragments", 4),
        ("icmp_errors_classified", 5),
        ("vip_claim_dropped", 2),
        ("err_ipv4_bad_header", 2),
        ("err_l4_short", 2),
        ("err_ipv6_ext_headers", 1),
        ("err_icmp_inner", 1),
        ("err_vlan_short", 1),
        ("err_ipv4_short", 2),
        ("err_ipv6_short", 1),
        ("err_arp", 2),
    ] {
        assert!(
            stats[name] >= min,
            "counter {name} = {} (want >= {min}): {stats:?}",
            stats[name]
        );
    }
}

#[test]
fn dead_man_switch_stops_vip_traffic_only() {
    if !require_root("dead_man_switch_stops_vip_traffic_only") {
        return;
    }
    let mut dp = dataplane();
    let m4 = client4(true);
    let tcp_frame = v4_frame(&V4::new(m4, VIP4, 6), &tcp(40000, 80));
    let arp_frame = eth(
        [0xff; 6],
        CLIENT_MAC,
        0x0806,
        &arp(1, CLIENT_MAC, m4, [0; 6], VIP4),
    );
    let other = eth(
        IF_MAC,
        CLIENT_MAC,
        0x0800,
        &V4::new(m4, OTHER4, 6).build(&tcp(1, 2)),
    );
    assert_eq!(run(&mut dp, &tcp_frame).0, XDP_PASS);
    assert_eq!(run(&mut dp, &arp_frame).0, XDP_PASS, "answered (marked)");
    // Deadline in the past, as when the daemon stops refreshing it.
    dp.arm(std::time::Duration::ZERO).expect("arm");
    // The program reads the clock once per tick per CPU: the deadline may be seen up to two
    // ticks late (8 ms at HZ 250, 20 ms at HZ 100).
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(
        run(&mut dp, &tcp_frame).0,
        XDP_DROP,
        "VIP traffic after the deadline"
    );
    assert_eq!(
        run(&mut dp, &arp_frame).0,
        XDP_DROP,
        "ARP for the VIP after the deadline"
    );
    assert_eq!(
        run(&mut dp, &other).0,
        XDP_PASS,
        "non-VIP traffic is never affected"
    );
    // Never armed (0) means not serving.
    dp.disarm().expect("disarm");
    assert_eq!(run(&mut dp, &tcp_frame).0, XDP_DROP);
    assert!(dp.stats().expect("stats")["deadman_dropped"] >= 3);
}

/// The per-CPU bucket cache gives every packet the bucket SipHash gives it: for clients that
/// collide in the cache, on a first packet (a miss) and a second (a hit), with client and
/// connection affinity, IPv4 and IPv6, and after the hash key changed (entries hashed with
/// the old key must not answer).
#[test]
fn the_bucket_cache_agrees_with_the_hash() {
    if !require_root("the_bucket_cache_agrees_with_the_hash") {
        return;
    }
    use farm_common::{HashKey, bucket_of, control_flags::NO_BUCKET_CACHE};
    let mut dp = dataplane();
    // 600 clients, 4 frames each, in a 4096-entry cache: many share a slot.
    let mut frames: Vec<(String, Vec<u8>, BucketKey)> = Vec::new();
    for i in 0..600u32 {
        let a4 = Ipv4Addr::from(0xcb00_7100 + i * 7);
        let a6 = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 1, 0, 0, (i >> 16) as u16, i as u16);
        let port = 40000 + (i % 1000) as u16;
        frames.push((
            format!("{a4} tcp/80"),
            v4_frame(&V4::new(a4, VIP4, 6), &tcp(port, 80)),
            BucketKey::V4(a4.octets()),
        ));
        frames.push((
            format!("{a4}:{port} udp/{UDP_CONN_PORT}"),
            v4_frame(&V4::new(a4, VIP4, 17), &udp(port, UDP_CONN_PORT, b"x")),
            BucketKey::V4Port(a4.octets(), port.to_be_bytes()),
        ));
        frames.push((
            format!("{a6} tcp/80"),
            v6_frame(CLUSTER_MAC, a6, VIP6, 6, &[], &tcp(port, 80)),
            BucketKey::V6(a6.octets()),
        ));
        frames.push((
            format!("[{a6}]:{port} udp/{UDP_CONN_PORT}"),
            v6_frame(
                CLUSTER_MAC,
                a6,
                VIP6,
                17,
                &[],
                &udp(port, UDP_CONN_PORT, b"x"),
            ),
            BucketKey::V6Port(a6.octets(), port.to_be_bytes()),
        ));
    }
    let expect = |key: &HashKey, k: BucketKey| {
        if bucket_of(key, k).is_multiple_of(2) {
            XDP_PASS
        } else {
            XDP_DROP
        }
    };
    let check = |dp: &mut Dataplane, key: &HashKey, what: &str| {
        let mut wrong = Vec::new();
        for (name, frame, k) in &frames {
            let want = expect(key, *k);
            for pass in ["first", "second"] {
                let got = run(dp, frame).0;
                if got != want {
                    wrong.push(format!("{name} ({pass} packet): {got}, want {want}"));
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "{what}: {} wrong verdicts:\n{}",
            wrong.len(),
            wrong[..wrong.len().min(20)].join("\n")
        );
    };
    let key = farm_tests::fixture::KEY;
    check(&mut dp, &key, "cache on");
    dp.set_control_flags(NO_BUCKET_CACHE).expect("flags");
    check(&mut dp, &key, "cache off");
    dp.set_control_flags(0).expect("flags");
    // A new key: the verdicts follow it at once, although every key is in the cache.
    let other = HashKey {
        k0: 0x0dd0_0000_0000_0003,
        k1: 0x0dd0_0000_0000_0004,
    };
    dp.set_identity(other, IF_MAC, CLUSTER_MAC)
        .expect("identity");
    let moved = frames
        .iter()
        .filter(|(_, _, k)| expect(&key, *k) != expect(&other, *k))
        .count();
    assert!(
        moved > 500,
        "the keys must disagree on many clients: {moved}"
    );
    check(&mut dp, &other, "after the key changed");
}

#[test]
fn bucket_table_swap_is_whole() {
    if !require_root("bucket_table_swap_is_whole") {
        return;
    }
    let mut dp = dataplane();
    let t4 = client4(false);
    let frame = v4_frame(&V4::new(t4, VIP4, 6), &tcp(40000, 80));
    assert_eq!(run(&mut dp, &frame).0, XDP_DROP);
    // Give this node every bucket; only the differing half is written, to the idle table.
    let all_mine = vec![BucketEntry::owned_by(0, 0); BUCKETS as usize];
    let written = dp.set_buckets(&all_mine).expect("swap");
    assert_eq!(written, BUCKETS as usize, "first swap fills the idle table");
    assert_eq!(run(&mut dp, &frame).0, XDP_PASS);
    let written = dp.set_buckets(&all_mine).expect("swap back");
    assert_eq!(
        written,
        BUCKETS as usize / 2,
        "the other table differs in the odd buckets"
    );
    assert_eq!(run(&mut dp, &frame).0, XDP_PASS);
}

/// The handover rules against real sockets: inside a namespace with the VIPs and a client on
/// loopback, a listener on VIP:80 and one established connection from the client's port 40000.
#[test]
fn handover_keeps_connections_with_their_owner() {
    if !require_root("handover_keeps_connections_with_their_owner") {
        return;
    }
    use farm_common::bucket_state::{INCOMING, OUTGOING};
    use std::net::{IpAddr, SocketAddr, TcpListener};

    let ns = farm_tests::netns::Netns::new(format!("{}-ho", farm_tests::netns::unique_stem()));
    let (c4, c6) = (client4(false), client6(false));
    ns.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"]);
    ns.ip(&["addr", "add", &format!("{c4}/32"), "dev", "lo"]);
    ns.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"]);
    ns.ip(&["addr", "add", &format!("{c6}/128"), "dev", "lo", "nodad"]);
    let failures = ns.run(move || {
        let l4 = TcpListener::bind((VIP4, 80)).expect("listen v4");
        let l6 = TcpListener::bind((VIP6, 80)).expect("listen v6");
        let connect = |from: IpAddr, to: SocketAddr| {
            let domain = if to.is_ipv4() {
                socket2::Domain::IPV4
            } else {
                socket2::Domain::IPV6
            };
            // The kernel installs an IPv6 address's local route from a work queue, even with
            // nodad: right after `ip addr add` the VIP can still be unreachable for a moment.
            let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                let s = socket2::Socket::new(domain, socket2::Type::STREAM, None).expect("socket");
                s.set_reuse_address(true).expect("SO_REUSEADDR");
                s.bind(&SocketAddr::new(from, 40000).into()).expect("bind");
                match s.connect(&to.into()) {
                    Ok(()) => break s,
                    Err(e)
                        if e.kind() == std::io::ErrorKind::NetworkUnreachable
                            && std::time::Instant::now() < until =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => panic!("connect {from} -> {to}: {e}"),
                }
            }
        };
        let _c4 = connect(IpAddr::V4(c4), SocketAddr::new(IpAddr::V4(VIP4), 80));
        let _s4 = l4.accept().expect("accept v4");
        let _c6 = connect(IpAddr::V6(c6), SocketAddr::new(IpAddr::V6(VIP6), 80));
        let _s6 = l6.accept().expect("accept v6");

        let mut dp = dataplane();
        // Member 1 hands the client's buckets to member 0 (this node as the new owner), or this
        // node (as member 1) hands them to member 0; `ready`/`done`: the control masks.
        let set = |dp: &mut Dataplane, state: u8, ready: u64, done: u64| {
            let mut entries: Vec<BucketEntry> = (0..BUCKETS)
                .map(|b| BucketEntry::owned_by(if b % 2 == 0 { 0 } else { 1 }, 0))
                .collect();
            for k in [BucketKey::V4(c4.octets()), BucketKey::V6(c6.octets())] {
                let b = farm_common::bucket_of(&farm_tests::fixture::KEY, k) as usize;
                entries[b] = BucketEntry {
                    state,
                    owner: 0,
                    prev_owner: 1,
                    flags: 0,
                };
            }
            dp.set_buckets_and_masks(&entries, ready, done)
                .expect("buckets");
        };
        let v4 = |sport: u16, flags: u8| {
            eth(
                CLUSTER_MAC,
                CLIENT_MAC,
                0x0800,
                &V4::new(c4, VIP4, 6).build(&tcp_flags(sport, 80, flags)),
            )
        };
        let v6 = |sport: u16, flags: u8| {
            eth(
                CLUSTER_MAC,
                CLIENT_MAC,
                0x86dd,
                &ipv6(c6, VIP6, 6, &[], &tcp_flags(sport, 80, flags)),
            )
        };
        let udp4 = eth(
            CLUSTER_MAC,
            CLIENT_MAC,
            0x0800,
            &V4::new(c4, VIP4, 17).build(&udp(40000, 53, b"q")),
        );
        let (syn, ack) = (0x02u8, 0x10u8);
        // The previous owner's bit in the control masks.
        const GIVER: u64 = 1 << 1;
        const READY: u64 = GIVER;
        // (name, bucket state, givers_ready, givers_done, frame, verdict)
        type Case<'a> = (&'a str, u8, u64, u64, Vec<u8>, u32);
        let cases: Vec<Case> = vec![
            (
                "new owner: SYN of a new connection",
                INCOMING,
                READY,
                0,
                v4(40001, syn),
                XDP_PASS,
            ),
            (
                "new owner: segment of a connection it does not hold",
                INCOMING,
                READY,
                0,
                v4(40001, ack),
                XDP_DROP,
            ),
            (
                "new owner: segment of its own connection",
                INCOMING,
                READY,
                0,
                v4(40000, ack),
                XDP_PASS,
            ),
            (
                "new owner: UDP stays with the previous owner",
                INCOMING,
                READY,
                0,
                udp4.clone(),
                XDP_DROP,
            ),
            (
                "new owner: IPv6 SYN",
                INCOMING,
                READY,
                0,
                v6(40001, syn),
                XDP_PASS,
            ),
            (
                "previous owner: no new connections",
                OUTGOING,
                READY,
                0,
                v4(40001, syn),
                XDP_DROP,
            ),
            (
                "previous owner: its established connection",
                OUTGOING,
                READY,
                0,
                v4(40000, ack),
                XDP_PASS,
            ),
            (
                "previous owner: only its listener matches (not its connection)",
                OUTGOING,
                READY,
                0,
                v4(40001, ack),
                XDP_DROP,
            ),
            (
                "previous owner: UDP until the handover ends",
                OUTGOING,
                READY,
                0,
                udp4.clone(),
                XDP_PASS,
            ),
            (
                "previous owner: its established IPv6 connection",
                OUTGOING,
                READY,
                0,
                v6(40000, ack),
                XDP_PASS,
            ),
            (
                "previous owner: IPv6 segment matching only the listener",
                OUTGOING,
                READY,
                0,
                v6(40002, ack),
                XDP_DROP,
            ),
            (
                "previous owner before it released: still takes SYNs (acts as owner)",
                OUTGOING,
                0,
                0,
                v4(40001, syn),
                XDP_PASS,
            ),
            (
                "new owner, previous owner not ready yet: SYN dropped (it may still take it)",
                INCOMING,
                0,
                0,
                v4(40001, syn),
                XDP_DROP,
            ),
            (
                "new owner, previous owner handed over: UDP is the new owner's",
                INCOMING,
                READY,
                GIVER,
                udp4.clone(),
                XDP_PASS,
            ),
            (
                "new owner, previous owner handed over: every segment",
                INCOMING,
                READY,
                GIVER,
                v4(40001, ack),
                XDP_PASS,
            ),
            (
                "previous owner, handed over: not even its old connection",
                OUTGOING,
                0,
                GIVER,
                v4(40000, ack),
                XDP_DROP,
            ),
            (
                "previous owner, handed over: no UDP",
                OUTGOING,
                0,
                GIVER,
                udp4.clone(),
                XDP_DROP,
            ),
        ];
        let mut failures = Vec::new();
        for (name, state, ready, done, frame, want) in cases {
            set(&mut dp, state, ready, done);
            let (got, _) = run(&mut dp, &frame);
            if got != want {
                failures.push(format!("{name}: verdict {got}, want {want}"));
            }
        }
        let stats = dp.stats().expect("stats");
        if stats["handover_accepted"] < 5 || stats["handover_dropped"] < 5 {
            failures.push(format!("handover counters: {stats:?}"));
        }
        failures
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn heartbeats_from_strangers_are_dropped_before_the_stack() {
    if !require_root("heartbeats_from_strangers_are_dropped_before_the_stack") {
        return;
    }
    let mut dp = dataplane();
    const HB: u16 = 7946;
    let member4 = Ipv4Addr::new(10, 201, 0, 12);
    let member6: Ipv6Addr = "fd00:201::12".parse().expect("v6");
    let stranger6: Ipv6Addr = "fd00:201::99".parse().expect("v6");
    let to_me = |src: Ipv4Addr, dport: u16| {
        eth(
            IF_MAC,
            CLIENT_MAC,
            0x0800,
            &V4::new(src, OTHER4, 17).build(&udp(HB, dport, b"FRMH")),
        )
    };
    let to_me6 = |src: Ipv6Addr, dport: u16| {
        v6_frame(
            IF_MAC,
            src,
            "fd00:201::11".parse().expect("v6"),
            17,
            &[],
            &udp(HB, dport, b"FRMH"),
        )
    };
    // Off (port 0): everything passes, as before farmd configures it.
    assert_eq!(run(&mut dp, &to_me(ROUTER4, HB)).0, XDP_PASS);
    dp.set_heartbeat_filter(HB, &[member4.into(), member6.into()])
        .expect("filter");
    assert_eq!(run(&mut dp, &to_me(member4, HB)).0, XDP_PASS, "a member");
    assert_eq!(run(&mut dp, &to_me(ROUTER4, HB)).0, XDP_DROP, "a stranger");
    assert_eq!(
        run(&mut dp, &to_me(ROUTER4, HB + 1)).0,
        XDP_PASS,
        "another port"
    );
    assert_eq!(
        run(&mut dp, &to_me6(member6, HB)).0,
        XDP_PASS,
        "a member (v6)"
    );
    assert_eq!(
        run(&mut dp, &to_me6(stranger6, HB)).0,
        XDP_DROP,
        "a stranger (v6)"
    );
    // VIP traffic on that port is the service's, not heartbeats.
    let vip = v4_frame(&V4::new(ROUTER4, VIP4, 17), &udp(40000, HB, b"x"));
    assert_eq!(
        run(&mut dp, &vip).0,
        verdict(BucketKey::V4(ROUTER4.octets())),
        "VIP traffic"
    );
    // A member removed from the list is a stranger.
    dp.set_heartbeat_filter(HB, &[member6.into()])
        .expect("filter");
    assert_eq!(run(&mut dp, &to_me(member4, HB)).0, XDP_DROP);
    assert!(dp.stats().expect("stats")["heartbeat_foreign_dropped"] >= 3);
}
