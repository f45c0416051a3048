//! IPv4: header (any IHL), fragments, TCP/UDP ports, ICMP echo and ICMP errors.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use farm_common::{Control, Msg, VipInfo, VipKey, affinity, proto_mask, stat};

use crate::{
    maps,
    ptr::{Region, load},
    verdict,
};

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;

/// The fields of an IPv4 header that classification needs.
struct Hdr {
    ihl_bytes: usize,
    is_fragment: bool,
    proto: u8,
    /// The addresses' bytes read little-endian (one load each; `to_le_bytes` gives the bytes).
    src: u32,
    dst: u32,
}

/// Reads the header at `l3`. `Err(idx)` names the parse error to count.
#[inline(always)]
fn header(ctx: &XdpContext, l3: usize) -> Result<Hdr, u32> {
    // One bounds check for the fixed header (LLVM may otherwise merge per-field checks in a way
    // the verifier cannot follow).
    let h = Region::at::<20>(ctx, l3).ok_or(stat::ERR_IPV4_SHORT)?;
    let vihl = h.u8(0);
    let frag = u16::from_be(h.u16(6));
    let proto = h.u8(9);
    let src = h.u32(12);
    let dst = h.u32(16);
    let ihl_bytes = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl_bytes < 20 {
        return Err(stat::ERR_IPV4_BAD_HEADER);
    }
    Ok(Hdr {
        ihl_bytes,
        // MF set, or a non-zero fragment offset.
        is_fragment: frag & 0x3fff != 0,
        proto,
        src,
        dst,
    })
}

#[inline(always)]
fn proto_bit(proto: u8) -> u8 {
    match proto {
        IPPROTO_TCP => proto_mask::TCP,
        IPPROTO_UDP => proto_mask::UDP,
        _ => 0,
    }
}

/// The key of a TCP/UDP packet of `client` (read little-endian) from `client_port` (its two
/// bytes read little-endian) to `vip_port` (host order).
#[inline(always)]
fn key_for(vip: &VipInfo, proto: u8, client: u32, client_port: u16, vip_port: u16) -> Msg {
    if vip.affinity_for(proto_bit(proto), vip_port) == affinity::CONNECTION {
        Msg::v4_port(client, client_port)
    } else {
        Msg::v4(client)
    }
}

#[inline(always)]
pub fn handle(ctx: &XdpContext, ctl: &Control, l3: usize) -> u32 {
    // A header too short to read passes (the kernel drops it); a header for a VIP that is
    // malformed is dropped here; anything not for a VIP passes untouched.
    let h = match header(ctx, l3) {
        Ok(h) => h,
        Err(stat::ERR_IPV4_SHORT) => {
            maps::stat(stat::ERR_IPV4_SHORT);
            return xdp_action::XDP_PASS;
        }
        Err(e) => {
            // Bad version or IHL: dropped if it claims to be for a VIP.
            let Some(dst) = load::<[u8; 4]>(ctx, l3 + 16) else {
                return xdp_action::XDP_PASS;
            };
            if maps::vip_v4(ctl, dst).is_none() {
                maps::stat(stat::NOT_VIP);
                return xdp_action::XDP_PASS;
            }
            return verdict::malformed(e);
        }
    };
    let (w0, w1) = maps::v4_words(h.dst);
    let Some(vip) = maps::vip_words(ctl, w0, w1) else {
        return not_vip(ctx, ctl, &h, l3);
    };
    if vip.mirror != farm_common::mirror::FARM {
        return verdict::mirror(ctx, ctl, vip.mirror);
    }
    if h.is_fragment {
        // Every fragment of a datagram carries the same source address, and only the first one
        // carries ports: hashing all fragments on the client address keeps them together.
        maps::stat(stat::FRAGMENTS);
        return verdict::deliver(ctx, ctl, Msg::v4(h.src), None);
    }
    let l4 = l3 + (h.ihl_bytes & 0x3c);
    match h.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let Some(ports) = crate::ptr::ld32(ctx, l4) else {
                return verdict::malformed(stat::ERR_L4_SHORT);
            };
            let sport = ports as u16;
            let dport = u16::from_be((ports >> 16) as u16);
            let key = key_for(vip, h.proto, h.src, sport, dport);
            let tcp = (h.proto == IPPROTO_TCP).then_some(verdict::Tcp { l3, l4, v6: false });
            verdict::deliver(ctx, ctl, key, tcp)
        }
        IPPROTO_ICMP => {
            let Some(icmp) = load::<[u8; 8]>(ctx, l4) else {
                return verdict::malformed(stat::ERR_L4_SHORT);
            };
            let ty = icmp[0];
            if ty == ICMP_DEST_UNREACH || ty == ICMP_TIME_EXCEEDED {
                maps::stat(stat::ICMP_ERRORS);
                return match icmp_error_key(ctx, vip, l4 + 8) {
                    Some(key) => verdict::deliver(ctx, ctl, key, None),
                    None => verdict::malformed(stat::ERR_ICMP_INNER),
                };
            }
            verdict::deliver(ctx, ctl, Msg::v4(h.src), None)
        }
        _ => verdict::deliver(ctx, ctl, Msg::v4(h.src), None),
    }
}

/// Not for a VIP: passed, unless it is a datagram to the heartbeat port from an address that
/// is no member's (dropped: a flood must not reach farmd's heartbeat socket).
#[inline(always)]
fn not_vip(ctx: &XdpContext, ctl: &Control, h: &Hdr, l3: usize) -> u32 {
    maps::stat(stat::NOT_VIP);
    if h.proto == IPPROTO_UDP
        && !h.is_fragment
        && let Some(ports) = load::<[u8; 4]>(ctx, l3 + (h.ihl_bytes & 0x3c))
        && maps::foreign_heartbeat(
            ctl,
            [ports[2], ports[3]],
            &VipKey::v4(h.src.to_le_bytes()).addr,
        )
    {
        maps::stat(stat::HEARTBEAT_FOREIGN);
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_PASS
}

/// An ICMP error quotes the packet that caused it: a packet the VIP sent to a client. Its
/// destination is the client and its ports are swapped, so the error lands on the node that
/// owns that client's flow (path-MTU discovery keeps working).
#[inline(always)]
fn icmp_error_key(ctx: &XdpContext, vip: &VipInfo, inner: usize) -> Option<Msg> {
    let h = header(ctx, inner).ok()?;
    if h.is_fragment {
        return Some(Msg::v4(h.dst));
    }
    if h.proto != IPPROTO_TCP && h.proto != IPPROTO_UDP {
        return Some(Msg::v4(h.dst));
    }
    let il4 = inner + (h.ihl_bytes & 0x3c);
    let ports = crate::ptr::ld32(ctx, il4)?;
    let vip_port = u16::from_be(ports as u16);
    let client_port = (ports >> 16) as u16;
    Some(key_for(vip, h.proto, h.dst, client_port, vip_port))
}
