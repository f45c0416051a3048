//! A data plane loaded for packet fixtures and benchmarks (no interface): a fixed hash key, two
//! VIPs, and a bucket table in which the even buckets are this node's, so the expected verdict of
//! any frame follows from `farm_common::bucket_of`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use farm_common::{BUCKETS, BucketEntry, BucketKey, HashKey, affinity, bucket_of, proto_mask};
use farm_daemon::{
    config::{Rule, Vip},
    dataplane::Dataplane,
};

use crate::frames::{CLUSTER_MAC, IF_MAC};

pub const KEY: HashKey = HashKey {
    k0: 0x5eed_0000_0000_0001,
    k1: 0x5eed_0000_0000_0002,
};
pub const VIP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
/// First port of the UDP rule with `connection` affinity (the range is 100 ports wide).
pub const UDP_CONN_PORT: u16 = 5000;

/// Whether this node owns the bucket of `k`.
pub fn mine(k: BucketKey) -> bool {
    bucket_of(&KEY, k).is_multiple_of(2)
}

/// The first client address (203.0.113.x) whose client-affinity bucket is / is not ours.
pub fn client4(want_mine: bool) -> Ipv4Addr {
    (1..=250u8)
        .map(|i| Ipv4Addr::new(203, 0, 113, i))
        .find(|a| mine(BucketKey::V4(a.octets())) == want_mine)
        .expect("some address of each kind")
}

/// The first client address (2001:db8:c::x) whose bucket is / is not ours.
pub fn client6(want_mine: bool) -> Ipv6Addr {
    (1..=250u16)
        .map(|i| Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, i))
        .find(|a| mine(BucketKey::V6(a.octets())) == want_mine)
        .expect("some address of each kind")
}

/// TCP/80 with client affinity, UDP/5000-5100 with connection affinity.
pub fn rules() -> Vec<Rule> {
    vec![
        Rule {
            protocols: proto_mask::TCP,
            port_lo: 80,
            port_hi: 80,
            affinity: affinity::CLIENT,
        },
        Rule {
            protocols: proto_mask::UDP,
            port_lo: UDP_CONN_PORT,
            port_hi: UDP_CONN_PORT + 100,
            affinity: affinity::CONNECTION,
        },
    ]
}

/// Loads the program with VIP4 and VIP6, the even buckets ours, and the dead-man switch armed
/// for ten minutes.
pub fn dataplane() -> Dataplane {
    let mut dp = Dataplane::load().expect("load the XDP program");
    dp.set_identity(KEY, IF_MAC, CLUSTER_MAC).expect("identity");
    dp.set_vips(&[
        Vip {
            address: IpAddr::V4(VIP4),
            rules: rules(),
        },
        Vip {
            address: IpAddr::V6(VIP6),
            rules: rules(),
        },
    ])
    .expect("vips");
    let entries: Vec<BucketEntry> = (0..BUCKETS)
        .map(|b| BucketEntry::owned_by(if b % 2 == 0 { 0 } else { 1 }, 0))
        .collect();
    dp.set_buckets(&entries).expect("buckets");
    dp.arm(std::time::Duration::from_secs(600)).expect("arm");
    dp
}
