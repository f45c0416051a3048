//! ARP: requests for a VIP are answered here with the cluster MAC, by exactly one member (the
//! owner of the requester's bucket); the kernel never sees ARP about a VIP.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use farm_common::{BucketKey, Control, stat};

use crate::{
    maps,
    ptr::{load, store},
    verdict,
};

const ARPOP_REQUEST: u16 = 1;
const ARPOP_REPLY: u16 = 2;

#[inline(always)]
pub fn handle(ctx: &XdpContext, ctl: &Control, l3: usize) -> u32 {
    // Fixed part (htype, ptype, hlen, plen, op) and the IPv4-over-Ethernet addresses.
    // One bounds check for the whole 28-byte ARP body, then plain reads.
    let Some(body) = load::<[u8; 28]>(ctx, l3) else {
        maps::stat(stat::ERR_ARP);
        return xdp_action::XDP_PASS;
    };
    let fixed = [
        body[0], body[1], body[2], body[3], body[4], body[5], body[6], body[7],
    ];
    let sha = [body[8], body[9], body[10], body[11], body[12], body[13]];
    let spa = [body[14], body[15], body[16], body[17]];
    let tpa = [body[24], body[25], body[26], body[27]];
    if fixed[..6] != [0, 1, 8, 0, 6, 4] {
        maps::stat(stat::ERR_ARP);
        return xdp_action::XDP_PASS;
    }
    // Somebody else speaking for a VIP (a member's announcement, or a member resolving a
    // client): the kernel must not take it as an address conflict or learn from it.
    if maps::vip_v4(ctl, spa).is_some() {
        maps::stat(stat::VIP_CLAIM_DROPPED);
        return xdp_action::XDP_DROP;
    }
    if maps::vip_v4(ctl, tpa).is_none() {
        maps::stat(stat::NOT_VIP);
        return xdp_action::XDP_PASS;
    }
    if !verdict::alive(ctl) {
        maps::stat(stat::DEADMAN_DROP);
        return xdp_action::XDP_DROP;
    }
    match u16::from_be_bytes([fixed[6], fixed[7]]) {
        ARPOP_REQUEST => {
            let b = maps::bucket_of(ctl, &BucketKey::V4(spa).msg());
            if !verdict::mine(ctl, b) {
                maps::stat(stat::ARP_LEFT_TO_PEER);
                return xdp_action::XDP_DROP;
            }
            let Some(eth_src) = load::<[u8; 6]>(ctx, 6) else {
                return xdp_action::XDP_DROP;
            };
            let ok = store(ctx, 0, eth_src)
                .and_then(|_| store(ctx, 6, ctl.if_mac))
                .and_then(|_| store(ctx, l3 + 6, ARPOP_REPLY.to_be_bytes()))
                .and_then(|_| store(ctx, l3 + 8, ctl.cluster_mac))
                .and_then(|_| store(ctx, l3 + 14, tpa))
                .and_then(|_| store(ctx, l3 + 18, sha))
                .and_then(|_| store(ctx, l3 + 24, spa));
            if ok.is_none() {
                return xdp_action::XDP_DROP;
            }
            maps::stat(stat::ARP_ANSWERED);
            verdict::answer(ctx, l3)
        }
        // The answer to a request a member sent from the VIP (with the cluster MAC, so it is
        // flooded): every member may be resolving this client.
        ARPOP_REPLY => verdict::accept(ctx, ctl),
        _ => {
            maps::stat(stat::ERR_ARP);
            xdp_action::XDP_DROP
        }
    }
}
