//! The tc programs.
//!
//! Egress: ARP and NDP the kernel sends from a VIP carry the cluster MAC as link-layer address,
//! so a client never learns one member's own MAC for the VIP. (The Ethernet source stays the
//! member's MAC: the cluster MAC is never a source, so switches keep flooding it.)
//!
//! Ingress: ARP/NDP answers the XDP program passed up marked are sent back out with the VLAN
//! tag their request had in the packet's metadata (see `verdict::answer`). And: some drivers
//! (veth) run native XDP on an skb whose packet type was already set from
//! the original destination MAC, and do not reset it after the program rewrote that MAC; the
//! stack then drops the frame as "for another host" (unicast cluster MAC), or TCP drops it as
//! not addressed to this host (multicast cluster MAC). Frames the XDP program accepted carry the
//! interface's own MAC, so they are marked as ours here.

use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_redirect, programs::TcContext};
use farm_common::{REFLECT_META, stat};

use crate::{ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IPV6, ipv6, maps, verdict};

const PACKET_HOST: u32 = 0;

#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    let _ = rewrite(ctx);
    TC_ACT_OK as i32
}

#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    if let Some(verdict) = reflect(ctx) {
        return verdict;
    }
    // SAFETY: reading a field of the context the kernel passed us.
    let pkt_type = unsafe { (*ctx.skb.skb).pkt_type };
    if pkt_type != PACKET_HOST
        && let Some(ctl) = maps::control()
        && let Ok(dst) = ctx.load::<[u8; 6]>(0)
        && dst == ctl.if_mac
    {
        let _ = ctx.change_type(PACKET_HOST);
    }
    TC_ACT_OK as i32
}

/// An ARP/NDP answer the XDP program built and marked (see `verdict::answer`): sent back out of
/// the interface it came in on. The skb still holds the VLAN tag its request had in metadata,
/// and egress puts it back on the wire.
#[inline(always)]
fn reflect(ctx: &TcContext) -> Option<i32> {
    let skb = ctx.skb.skb;
    // SAFETY: reading fields of the context the kernel passed us.
    let (meta, data, ifindex) = unsafe {
        (
            (*skb).data_meta as usize,
            (*skb).data as usize,
            (*skb).ifindex,
        )
    };
    if meta + verdict::META_LEN > data {
        return None;
    }
    // SAFETY: the META_LEN bytes at `meta` lie before `data`, checked above.
    let word = unsafe { core::ptr::read_unaligned(meta as *const u32) };
    if word != REFLECT_META {
        return None;
    }
    // SAFETY: helper call with a plain interface index.
    Some(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

#[inline(always)]
fn be16(ctx: &TcContext, off: usize) -> Option<u16> {
    ctx.load::<[u8; 2]>(off).ok().map(u16::from_be_bytes)
}

#[inline(always)]
fn rewrite(ctx: &TcContext) -> Option<()> {
    let ctl = maps::control()?;
    let mut ethertype = be16(ctx, 12)?;
    let mut l3 = 14;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = be16(ctx, 16)?;
        l3 = 18;
    }
    if ethertype == ETH_P_ARP {
        let spa = ctx.load::<[u8; 4]>(l3 + 14).ok()?;
        maps::vip_v4(ctl, spa)?;
        ctx.store(l3 + 8, &ctl.cluster_mac, 0).ok()?;
        maps::stat(stat::EGRESS_REWRITTEN);
        return Some(());
    }
    if ethertype != ETH_P_IPV6 {
        return None;
    }
    let nh = ctx.load::<u8>(l3 + 6).ok()?;
    if nh != ipv6::IPPROTO_ICMPV6 {
        return None;
    }
    let src = ctx.load::<[u8; 16]>(l3 + 8).ok()?;
    maps::vip(ctl, &src)?;
    let l4 = l3 + 40;
    let ty = ctx.load::<u8>(l4).ok()?;
    if ty != ipv6::NDISC_NEIGHBOUR_SOLICITATION && ty != ipv6::NDISC_NEIGHBOUR_ADVERTISEMENT {
        return None;
    }
    // The first option follows the 24-byte message: source (NS) or target (NA) link-layer
    // address, one 8-byte unit long.
    let opt = l4 + 24;
    let hdr = ctx.load::<[u8; 2]>(opt).ok()?;
    if (hdr[0] != 1 && hdr[0] != 2) || hdr[1] != 1 {
        return None;
    }
    let old = ctx.load::<[u8; 6]>(opt + 2).ok()?;
    let new = ctl.cluster_mac;
    let mut i = 0;
    while i < 6 {
        // The helper takes the 16-bit words as they lie in the packet.
        let from = u16::from_ne_bytes([old[i], old[i + 1]]) as u64;
        let to = u16::from_ne_bytes([new[i], new[i + 1]]) as u64;
        ctx.l4_csum_replace(l4 + 2, from, to, 2).ok()?;
        i += 2;
    }
    ctx.store(opt + 2, &new, 0).ok()?;
    maps::stat(stat::EGRESS_REWRITTEN);
    Some(())
}
