//! IPv4: header (any IHL), fragments, TCP/UDP ports, ICMP echo and ICMP errors.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use farm_common::{BucketKey, Control, VipInfo, affinity, proto_mask, stat};

use crate::{
    maps,
    ptr::{load, load_u8, load_u16_be},
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
    src: [u8; 4],
    dst: [u8; 4],
}

/// Reads the header at `l3`. `Err(idx)` names the parse error to count.
#[inline(always)]
fn header(ctx: &XdpContext, l3: usize) -> Result<Hdr, u32> {
    let vihl = load_u8(ctx, l3).ok_or(stat::ERR_IPV4_SHORT)?;
    let frag = load_u16_be(ctx, l3 + 6).ok_or(stat::ERR_IPV4_SHORT)?;
    let proto = load_u8(ctx, l3 + 9).ok_or(stat::ERR_IPV4_SHORT)?;
    let src = load::<[u8; 4]>(ctx, l3 + 12).ok_or(stat::ERR_IPV4_SHORT)?;
    let dst = load::<[u8; 4]>(ctx, l3 + 16).ok_or(stat::ERR_IPV4_SHORT)?;
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

#[inline(always)]
fn key_for(vip: &VipInfo, proto: u8, client: [u8; 4], client_port: [u8; 2], vip_port: u16) -> BucketKey {
    if vip.affinity_for(proto_bit(proto), vip_port) == affinity::CONNECTION {
        BucketKey::V4Port(client, client_port)
    } else {
        BucketKey::V4(client)
    }
}

#[inline(always)]
pub fn handle(ctx: &XdpContext, ctl: &Control, l3: usize) -> u32 {
    // Destination first: anything whose destination cannot be read or is not a VIP passes.
    let Some(dst) = load::<[u8; 4]>(ctx, l3 + 16) else {
        maps::stat(stat::ERR_IPV4_SHORT);
        return xdp_action::XDP_PASS;
    };
    let Some(vip) = maps::vip_v4(dst) else {
        maps::stat(stat::NOT_VIP);
        return xdp_action::XDP_PASS;
    };
    let h = match header(ctx, l3) {
        Ok(h) => h,
        Err(e) => return verdict::malformed(e),
    };
    if h.is_fragment {
        // Every fragment of a datagram carries the same source address, and only the first one
        // carries ports: hashing all fragments on the client address keeps them together.
        maps::stat(stat::FRAGMENTS);
        return verdict::deliver(ctx, ctl, BucketKey::V4(h.src));
    }
    let l4 = l3 + (h.ihl_bytes & 0x3c);
    match h.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let (Some(sport), Some(dport)) =
                (load::<[u8; 2]>(ctx, l4), load_u16_be(ctx, l4 + 2))
            else {
                return verdict::malformed(stat::ERR_L4_SHORT);
            };
            let key = key_for(vip, h.proto, h.src, sport, dport);
            verdict::deliver(ctx, ctl, key)
        }
        IPPROTO_ICMP => {
            let Some(ty) = load_u8(ctx, l4) else {
                return verdict::malformed(stat::ERR_L4_SHORT);
            };
            if load::<[u8; 8]>(ctx, l4).is_none() {
                return verdict::malformed(stat::ERR_L4_SHORT);
            }
            if ty == ICMP_DEST_UNREACH || ty == ICMP_TIME_EXCEEDED {
                maps::stat(stat::ICMP_ERRORS);
                return match icmp_error_key(ctx, vip, l4 + 8) {
                    Some(key) => verdict::deliver(ctx, ctl, key),
                    None => verdict::malformed(stat::ERR_ICMP_INNER),
                };
            }
            verdict::deliver(ctx, ctl, BucketKey::V4(h.src))
        }
        _ => verdict::deliver(ctx, ctl, BucketKey::V4(h.src)),
    }
}

/// An ICMP error quotes the packet that caused it: a packet the VIP sent to a client. Its
/// destination is the client and its ports are swapped, so the error lands on the node that
/// owns that client's flow (path-MTU discovery keeps working).
#[inline(always)]
fn icmp_error_key(ctx: &XdpContext, vip: &VipInfo, inner: usize) -> Option<BucketKey> {
    let h = header(ctx, inner).ok()?;
    if h.is_fragment {
        return Some(BucketKey::V4(h.dst));
    }
    if h.proto != IPPROTO_TCP && h.proto != IPPROTO_UDP {
        return Some(BucketKey::V4(h.dst));
    }
    let il4 = inner + (h.ihl_bytes & 0x3c);
    let vip_port = load_u16_be(ctx, il4)?;
    let client_port = load::<[u8; 2]>(ctx, il4 + 2)?;
    Some(key_for(vip, h.proto, h.dst, client_port, vip_port))
}
