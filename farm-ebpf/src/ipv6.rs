//! IPv6: fixed header, a bounded walk over extension headers (fragment header included),
//! TCP/UDP ports, ICMPv6 echo, errors and neighbour discovery.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use farm_common::{Control, Msg, VipInfo, affinity, proto_mask, stat};

use crate::{
    maps, ndp,
    ptr::{Region, load, load_u8},
    verdict,
};

pub const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked at most; a packet with more is dropped if it is for a VIP.
const MAX_EXT_HEADERS: usize = 6;
/// Extension headers may not push the transport header beyond this offset.
const MAX_L4_OFFSET: usize = 512;

const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
pub const NDISC_NEIGHBOUR_SOLICITATION: u8 = 135;
pub const NDISC_NEIGHBOUR_ADVERTISEMENT: u8 = 136;

/// Where the transport header starts, which protocol it is, and whether this is a fragment.
pub struct Transport {
    pub proto: u8,
    pub off: usize,
    pub is_fragment: bool,
}

/// Walks the extension headers after the fixed header at `l3`. `Err(idx)` names the error.
#[inline(always)]
pub fn transport(ctx: &XdpContext, l3: usize) -> Result<Transport, u32> {
    let mut nh = load_u8(ctx, l3 + 6).ok_or(stat::ERR_IPV6_SHORT)?;
    let mut off = l3 + 40;
    let mut is_fragment = false;
    for _ in 0..MAX_EXT_HEADERS {
        match nh {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let h = load::<[u8; 2]>(ctx, off).ok_or(stat::ERR_IPV6_EXT)?;
                nh = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let h = load::<[u8; 2]>(ctx, off).ok_or(stat::ERR_IPV6_EXT)?;
                nh = h[0];
                off += (h[1] as usize + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let h = load::<[u8; 4]>(ctx, off).ok_or(stat::ERR_IPV6_EXT)?;
                nh = h[0];
                let offset_m = u16::from_be_bytes([h[2], h[3]]);
                // Fragment offset non-zero or M set: part of a fragmented datagram. An atomic
                // fragment (offset 0, M clear) is a whole datagram and is treated as such.
                if offset_m & 0xfff9 != 0 {
                    is_fragment = true;
                }
                off += 8;
            }
            _ => break,
        }
        if off > MAX_L4_OFFSET {
            return Err(stat::ERR_IPV6_EXT);
        }
    }
    if matches!(
        nh,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT
    ) {
        return Err(stat::ERR_IPV6_EXT);
    }
    Ok(Transport {
        proto: nh,
        off,
        is_fragment,
    })
}

/// The key of a TCP/UDP packet of `client` (its halves read little-endian) from `client_port`
/// (its bytes read little-endian) to `vip_port` (host order).
#[inline(always)]
fn key_for(vip: &VipInfo, proto: u8, client: (u64, u64), client_port: u16, vip_port: u16) -> Msg {
    let bit = match proto {
        IPPROTO_TCP => proto_mask::TCP,
        IPPROTO_UDP => proto_mask::UDP,
        _ => 0,
    };
    if vip.affinity_for(bit, vip_port) == affinity::CONNECTION {
        Msg::v6_port(client.0, client.1, client_port)
    } else {
        Msg::v6(client.0, client.1)
    }
}

/// The 16 bytes of an address held as two little-endian words.
#[inline(always)]
fn bytes16(w: (u64, u64)) -> [u8; 16] {
    let (a, b) = (w.0.to_le_bytes(), w.1.to_le_bytes());
    [
        a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], b[0], b[1], b[2], b[3], b[4], b[5], b[6],
        b[7],
    ]
}

#[inline(always)]
pub fn handle(ctx: &XdpContext, ctl: &Control, l3: usize) -> u32 {
    let Some(hdr) = Region::at::<40>(ctx, l3) else {
        maps::stat(stat::ERR_IPV6_SHORT);
        return xdp_action::XDP_PASS;
    };
    let src = (hdr.u64(8), hdr.u64(16));
    let dst = (hdr.u64(24), hdr.u64(32));
    let Some(vip) = maps::vip_words(ctl, dst.0, dst.1) else {
        // Neighbour discovery for a VIP arrives at a multicast address.
        if dst.0 as u8 == 0xff {
            return ndp::multicast(ctx, ctl, l3);
        }
        maps::stat(stat::NOT_VIP);
        // A datagram to the heartbeat port (UDP right after the fixed header, as farmd
        // sends them) from an address that is no member's: dropped.
        if hdr.u8(6) == IPPROTO_UDP
            && let Some(ports) = load::<[u8; 4]>(ctx, l3 + 40)
            && maps::foreign_heartbeat(ctl, [ports[2], ports[3]], &bytes16(src))
        {
            maps::stat(stat::HEARTBEAT_FOREIGN);
            return xdp_action::XDP_DROP;
        }
        return xdp_action::XDP_PASS;
    };
    if hdr.u8(0) >> 4 != 6 {
        return verdict::malformed(stat::ERR_IPV6_SHORT);
    }
    let t = match transport(ctx, l3) {
        Ok(t) => t,
        Err(e) => return verdict::malformed(e),
    };
    if t.is_fragment {
        maps::stat(stat::FRAGMENTS);
        return verdict::deliver(ctx, ctl, Msg::v6(src.0, src.1), None);
    }
    let l4 = t.off;
    if vip.mirror != farm_common::mirror::FARM {
        // A mirror group's VIP: whole on its primary; neighbour discovery as for any VIP.
        let ty = if t.proto == IPPROTO_ICMPV6 {
            match load::<[u8; 8]>(ctx, l4) {
                Some(icmp) => icmp[0],
                None => return verdict::malformed(stat::ERR_L4_SHORT),
            }
        } else {
            0
        };
        if ty != NDISC_NEIGHBOUR_SOLICITATION && ty != NDISC_NEIGHBOUR_ADVERTISEMENT {
            return verdict::mirror(ctx, ctl, vip.mirror);
        }
    }
    match t.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let Some(ports) = crate::ptr::ld32(ctx, l4) else {
                return verdict::malformed(stat::ERR_L4_SHORT);
            };
            let sport = ports as u16;
            let dport = u16::from_be((ports >> 16) as u16);
            let tcp = (t.proto == IPPROTO_TCP).then_some(verdict::Tcp { l3, l4, v6: true });
            verdict::deliver(ctx, ctl, key_for(vip, t.proto, src, sport, dport), tcp)
        }
        IPPROTO_ICMPV6 => {
            let Some(icmp) = load::<[u8; 8]>(ctx, l4) else {
                return verdict::malformed(stat::ERR_L4_SHORT);
            };
            let ty = icmp[0];
            match ty {
                NDISC_NEIGHBOUR_SOLICITATION => ndp::solicitation(ctx, ctl, l3, l4, bytes16(src)),
                // An advertisement sent to the VIP answers a solicitation one of the members
                // sent while resolving a client: every member may be waiting for it.
                NDISC_NEIGHBOUR_ADVERTISEMENT => ndp::advertisement_to_vip(ctx, ctl, l4),
                ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOOBIG | ICMPV6_TIME_EXCEED => {
                    maps::stat(stat::ICMP_ERRORS);
                    match icmp_error_key(ctx, vip, l4 + 8) {
                        Some(key) => verdict::deliver(ctx, ctl, key, None),
                        None => verdict::malformed(stat::ERR_ICMP_INNER),
                    }
                }
                _ => verdict::deliver(ctx, ctl, Msg::v6(src.0, src.1), None),
            }
        }
        _ => verdict::deliver(ctx, ctl, Msg::v6(src.0, src.1), None),
    }
}

/// The quoted packet was sent by the VIP to a client: classify by its destination (the client)
/// and its ports, swapped.
#[inline(always)]
fn icmp_error_key(ctx: &XdpContext, vip: &VipInfo, inner: usize) -> Option<Msg> {
    let c = Region::at::<16>(ctx, inner + 24)?;
    let client = (c.u64(0), c.u64(8));
    let t = transport(ctx, inner).ok()?;
    if t.is_fragment || (t.proto != IPPROTO_TCP && t.proto != IPPROTO_UDP) {
        return Some(Msg::v6(client.0, client.1));
    }
    let ports = crate::ptr::ld32(ctx, t.off)?;
    let vip_port = u16::from_be(ports as u16);
    let client_port = (ports >> 16) as u16;
    Some(key_for(vip, t.proto, client, client_port, vip_port))
}
