//! IPv6 neighbour discovery for the VIPs: solicitations are answered here with the cluster MAC
//! by the owner of the requester's bucket; nothing about a VIP reaches the kernel's NDP.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_tail, programs::XdpContext};
use farm_common::{BucketKey, Control, stat};

use crate::{
    csum,
    ipv6::{IPPROTO_ICMPV6, NDISC_NEIGHBOUR_ADVERTISEMENT, NDISC_NEIGHBOUR_SOLICITATION},
    maps,
    ptr::{frame_len, load, load_u8, store},
    verdict,
};

const ALL_NODES: [u8; 16] = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const ND_OPT_TARGET_LL_ADDR: u8 = 2;
/// NA flags: Solicited and Override.
const NA_FLAGS_SOLICITED_OVERRIDE: u8 = 0x60;
const NA_FLAGS_OVERRIDE: u8 = 0x20;
/// ICMPv6 length of our advertisement: 24 bytes of message and an 8-byte target link-layer
/// address option.
const NA_LEN: usize = 32;

/// ICMPv6 to a multicast destination: a solicitation for a VIP (answered), or a member's own NDP
/// traffic about a VIP (dropped). Anything else passes.
#[inline(always)]
pub fn multicast(ctx: &XdpContext, ctl: &Control, l3: usize) -> u32 {
    let l4 = l3 + 40;
    let Some(nh) = load_u8(ctx, l3 + 6) else {
        maps::stat(stat::NOT_VIP);
        return xdp_action::XDP_PASS;
    };
    let Some(ty) = load_u8(ctx, l4) else {
        maps::stat(stat::NOT_VIP);
        return xdp_action::XDP_PASS;
    };
    if nh != IPPROTO_ICMPV6
        || (ty != NDISC_NEIGHBOUR_SOLICITATION && ty != NDISC_NEIGHBOUR_ADVERTISEMENT)
    {
        maps::stat(stat::NOT_VIP);
        return xdp_action::XDP_PASS;
    }
    let Some(src) = load::<[u8; 16]>(ctx, l3 + 8) else {
        maps::stat(stat::ERR_NDP);
        return xdp_action::XDP_PASS;
    };
    let Some(target) = load::<[u8; 16]>(ctx, l4 + 8) else {
        maps::stat(stat::ERR_NDP);
        return xdp_action::XDP_PASS;
    };
    if maps::vip(ctl, &src).is_some()
        || (ty == NDISC_NEIGHBOUR_ADVERTISEMENT && maps::vip(ctl, &target).is_some())
    {
        maps::stat(stat::VIP_CLAIM_DROPPED);
        return xdp_action::XDP_DROP;
    }
    if ty == NDISC_NEIGHBOUR_SOLICITATION && maps::vip(ctl, &target).is_some() {
        return solicitation(ctx, ctl, l3, l4, src);
    }
    maps::stat(stat::NOT_VIP);
    xdp_action::XDP_PASS
}

/// A neighbour solicitation at `l4` (multicast, or unicast to a VIP).
#[inline(always)]
pub fn solicitation(ctx: &XdpContext, ctl: &Control, l3: usize, l4: usize, src: [u8; 16]) -> u32 {
    let Some(target) = load::<[u8; 16]>(ctx, l4 + 8) else {
        maps::stat(stat::ERR_NDP);
        return xdp_action::XDP_DROP;
    };
    if maps::vip(ctl, &target).is_none() {
        // Unicast to a VIP but about another address: ordinary VIP traffic.
        return verdict::deliver(ctx, ctl, BucketKey::V6(src).msg(), None);
    }
    if maps::vip(ctl, &src).is_some() {
        maps::stat(stat::VIP_CLAIM_DROPPED);
        return xdp_action::XDP_DROP;
    }
    if !verdict::alive(ctl) {
        maps::stat(stat::DEADMAN_DROP);
        return xdp_action::XDP_DROP;
    }
    if !verdict::mine(ctl, maps::bucket_of(ctl, &BucketKey::V6(src).msg())) {
        maps::stat(stat::NDP_LEFT_TO_PEER);
        return xdp_action::XDP_DROP;
    }
    let Some(eth_src) = load::<[u8; 6]>(ctx, 6) else {
        return xdp_action::XDP_DROP;
    };
    // Duplicate address detection comes from :: and is answered to all nodes, unsolicited.
    let dad = src == [0u8; 16];
    let (dst, flags) = if dad {
        (ALL_NODES, NA_FLAGS_OVERRIDE)
    } else {
        (src, NA_FLAGS_SOLICITED_OVERRIDE)
    };

    // Make the frame exactly Ethernet + IPv6 + NA.
    let want = (l3 + 40 + NA_LEN) as i64;
    let delta = want - frame_len(ctx) as i64;
    if delta != 0 {
        // SAFETY: helper on our own context; all pointers are re-derived afterwards.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta as i32) } != 0 {
            maps::stat(stat::ERR_NDP);
            return xdp_action::XDP_DROP;
        }
    }
    let na_l4 = l3 + 40;
    let mut mac_opt = [0u8; 8];
    mac_opt[0] = ND_OPT_TARGET_LL_ADDR;
    mac_opt[1] = 1;
    let mut i = 0;
    while i < 6 {
        mac_opt[2 + i] = ctl.cluster_mac[i];
        i += 1;
    }
    let head = [NDISC_NEIGHBOUR_ADVERTISEMENT, 0];
    let flag_word = [flags, 0, 0, 0];
    // Pseudo-header (source, destination, length, next header) and the message.
    let mut sum = csum::add(0, &target);
    sum = csum::add(sum, &dst);
    sum += NA_LEN as u32 + IPPROTO_ICMPV6 as u32;
    sum = csum::add(sum, &head);
    sum = csum::add(sum, &flag_word);
    sum = csum::add(sum, &target);
    sum = csum::add(sum, &mac_opt);
    let check = csum::finish(sum).to_be_bytes();

    let ok = store(ctx, 0, eth_src)
        .and_then(|_| store(ctx, 6, ctl.if_mac))
        .and_then(|_| store(ctx, l3, [0x60u8, 0, 0, 0]))
        .and_then(|_| store(ctx, l3 + 4, (NA_LEN as u16).to_be_bytes()))
        .and_then(|_| store(ctx, l3 + 6, [IPPROTO_ICMPV6, 255]))
        .and_then(|_| store(ctx, l3 + 8, target))
        .and_then(|_| store(ctx, l3 + 24, dst))
        .and_then(|_| store(ctx, na_l4, head))
        .and_then(|_| store(ctx, na_l4 + 2, check))
        .and_then(|_| store(ctx, na_l4 + 4, flag_word))
        .and_then(|_| store(ctx, na_l4 + 8, target))
        .and_then(|_| store(ctx, na_l4 + 24, mac_opt));
    if ok.is_none() {
        maps::stat(stat::ERR_NDP);
        return xdp_action::XDP_DROP;
    }
    maps::stat(stat::NDP_ANSWERED);
    verdict::answer(ctx, l3)
}

/// An advertisement sent to a VIP: the answer to a solicitation a member sent while resolving a
/// client. Claims of a VIP by someone else are dropped.
#[inline(always)]
pub fn advertisement_to_vip(ctx: &XdpContext, ctl: &Control, l4: usize) -> u32 {
    let Some(target) = load::<[u8; 16]>(ctx, l4 + 8) else {
        maps::stat(stat::ERR_NDP);
        return xdp_action::XDP_DROP;
    };
    if maps::vip(ctl, &target).is_some() {
        maps::stat(stat::VIP_CLAIM_DROPPED);
        return xdp_action::XDP_DROP;
    }
    if !verdict::alive(ctl) {
        maps::stat(stat::DEADMAN_DROP);
        return xdp_action::XDP_DROP;
    }
    verdict::accept(ctx, ctl)
}
