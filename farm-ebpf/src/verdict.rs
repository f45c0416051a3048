//! The decision for a frame addressed to a VIP: dead-man switch, bucket, ownership, counters.

use aya_ebpf::{
    bindings::{bpf_sock_tuple, xdp_action},
    helpers::{bpf_sk_release, bpf_skc_lookup_tcp, bpf_xdp_adjust_meta},
    programs::XdpContext,
};
use farm_common::{Control, Msg, bucket_state, stat};

use crate::{
    maps,
    ptr::{self, load, load_u8},
};

/// Where a TCP segment's headers are: during a handover its socket is looked up.
#[derive(Clone, Copy)]
pub struct Tcp {
    pub l3: usize,
    pub l4: usize,
    pub v6: bool,
}

const TCP_LISTEN: u32 = 10;
/// BPF_F_CURRENT_NETNS (-1): look the socket up in the namespace of the receiving device.
const CURRENT_NETNS: u64 = u64::MAX;

/// Whether the daemon has refreshed the dead-man deadline recently enough.
#[inline(always)]
pub fn alive(ctl: &Control) -> bool {
    ctl.deadline_ns != 0 && maps::coarse_now() <= ctl.deadline_ns
}

/// Whether this node answers ARP/NDP for requesters in bucket `b`: the owner, and during a
/// handover both the previous and the new owner (two replies carry the same cluster MAC, so
/// nothing goes unanswered while the bucket moves).
#[inline(always)]
pub fn mine(ctl: &Control, b: u32) -> bool {
    match maps::bucket(ctl, b) {
        Some(e) => e.state != bucket_state::NOT_MINE,
        None => false,
    }
}

/// Accept or drop a VIP frame hashed on `key` (`tcp`: where its TCP headers are, for TCP).
#[inline(always)]
pub fn deliver(ctx: &XdpContext, ctl: &Control, key: Msg, tcp: Option<Tcp>) -> u32 {
    if !alive(ctl) {
        maps::stat(stat::DEADMAN_DROP);
        return xdp_action::XDP_DROP;
    }
    let b = maps::bucket_of(ctl, &key);
    let len = ptr::frame_len(ctx);
    let state = maps::bucket(ctl, b).map_or(bucket_state::NOT_MINE, |e| ctl.effective_state(e));
    let take = match state {
        bucket_state::MINE => true,
        bucket_state::INCOMING | bucket_state::OUTGOING => {
            let take = handover(ctx, state, tcp);
            maps::stat(if take {
                stat::HANDOVER_ACCEPTED
            } else {
                stat::HANDOVER_DROPPED
            });
            take
        }
        _ => false,
    };
    if take {
        maps::count_bucket(b, true, len);
        accept(ctx, ctl)
    } else {
        maps::count_bucket(b, false, len);
        xdp_action::XDP_DROP
    }
}

/// A frame for a mirror group's VIP (`role`: `VipInfo::mirror`): all taken on the primary,
/// dropped elsewhere, and nowhere once the dead-man switch lapsed.
#[inline(always)]
pub fn mirror(ctx: &XdpContext, ctl: &Control, role: u8) -> u32 {
    if !alive(ctl) {
        maps::stat(stat::DEADMAN_DROP);
        return xdp_action::XDP_DROP;
    }
    if role == farm_common::mirror::PRIMARY {
        maps::stat(stat::MIRROR_ACCEPTED);
        accept(ctx, ctl)
    } else {
        maps::stat(stat::MIRROR_DROPPED);
        xdp_action::XDP_DROP
    }
}

/// Hand the frame to the stack: it was sent to the cluster MAC, which the kernel does not treat
/// as its own, so the destination becomes the interface's MAC.
#[inline(always)]
pub fn accept(ctx: &XdpContext, ctl: &Control) -> u32 {
    if ptr::store(ctx, 0, ctl.if_mac).is_none() {
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_PASS
}

/// A VIP frame that cannot be classified: dropped and counted.
#[inline(always)]
pub fn malformed(idx: u32) -> u32 {
    maps::stat(idx);
    xdp_action::XDP_DROP
}

/// The handover rule. Because every member sees every packet, a moving bucket needs no
/// forwarding: the new owner takes new connections and its own, the previous owner keeps its
/// established connections, and anything else would only make one of them answer with a reset.
#[inline(always)]
fn handover(ctx: &XdpContext, state: u8, tcp: Option<Tcp>) -> bool {
    let Some(t) = tcp else {
        // UDP and the rest stay with the previous owner until the handover ends.
        return state == bucket_state::OUTGOING;
    };
    let syn = load_u8(ctx, t.l4 + 13).is_some_and(|f| f & 0x12 == 0x02);
    if state == bucket_state::INCOMING {
        syn || own_socket(ctx, t)
    } else {
        !syn && own_socket(ctx, t)
    }
}

/// Whether this host has a socket for the segment other than a listener (a listener matches
/// every segment to its port, including other members' connections).
#[inline(always)]
fn own_socket(ctx: &XdpContext, t: Tcp) -> bool {
    // SAFETY: an all-zero tuple is a valid value of this plain-data union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size;
    // The addresses are read before the ports: the other way round, LLVM knows that the ports'
    // bounds check covers the addresses (the IPv4 header is at least 20 bytes) and drops theirs,
    // which the verifier cannot follow.
    let ports = |ctx: &XdpContext| load::<[u8; 4]>(ctx, t.l4);
    if t.v6 {
        let Some(a) = load::<[u8; 32]>(ctx, t.l3 + 8) else {
            return false;
        };
        let Some(ports) = ports(ctx) else {
            return false;
        };
        // SAFETY: writing the ipv6 member of the union.
        let v6 = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
        let mut i = 0;
        while i < 4 {
            v6.saddr[i] = u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]);
            v6.daddr[i] = u32::from_ne_bytes([
                a[16 + 4 * i],
                a[16 + 4 * i + 1],
                a[16 + 4 * i + 2],
                a[16 + 4 * i + 3],
            ]);
            i += 1;
        }
        v6.sport = u16::from_ne_bytes([ports[0], ports[1]]);
        v6.dport = u16::from_ne_bytes([ports[2], ports[3]]);
        size = 36;
    } else {
        let Some(a) = load::<[u8; 8]>(ctx, t.l3 + 12) else {
            return false;
        };
        let Some(ports) = ports(ctx) else {
            return false;
        };
        // SAFETY: writing the ipv4 member of the union.
        let v4 = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
        v4.saddr = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
        v4.daddr = u32::from_ne_bytes([a[4], a[5], a[6], a[7]]);
        v4.sport = u16::from_ne_bytes([ports[0], ports[1]]);
        v4.dport = u16::from_ne_bytes([ports[2], ports[3]]);
        size = 12;
    }
    // SAFETY: helper on our context with a tuple of the given size; the socket it returns is
    // released before returning.
    unsafe {
        let sk = bpf_skc_lookup_tcp(ctx.ctx.cast(), &mut tuple, size, CURRENT_NETNS, 0);
        if sk.is_null() {
            return false;
        }
        let state = (*sk).state;
        bpf_sk_release(sk.cast());
        state != TCP_LISTEN
    }
}

/// Sends an ARP/NDP answer built in place back to the requester. A frame that carried its VLAN
/// tag inline still carries it: XDP_TX. One without an inline tag may have had its tag in the
/// packet's metadata (rx VLAN offload, or a bridge on the way), which XDP cannot see; an XDP_TX
/// answer would leave untagged and never reach a client on a VLAN. Such an answer is passed up
/// marked with `REFLECT_META`, and the tc ingress program sends it back out of the interface
/// with the skb's tag (see `tc::ingress`). Where the driver has no room for metadata: XDP_TX.
#[inline(always)]
pub fn answer(ctx: &XdpContext, l3: usize) -> u32 {
    if l3 != ptr::ETH_HLEN {
        return xdp_action::XDP_TX;
    }
    // SAFETY: helper call on the context the kernel passed us.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(META_LEN as i32)) } != 0 {
        return xdp_action::XDP_TX;
    }
    let meta = ctx.metadata();
    if meta + META_LEN > ctx.data() {
        return xdp_action::XDP_TX;
    }
    // SAFETY: the META_LEN bytes at `meta` lie before `data`, checked above.
    unsafe { core::ptr::write_unaligned(meta as *mut u32, farm_common::REFLECT_META) };
    maps::stat(stat::ANSWERS_REFLECTED);
    xdp_action::XDP_PASS
}

/// Bytes of XDP metadata farm uses: the `REFLECT_META` word.
pub const META_LEN: usize = core::mem::size_of::<u32>();
