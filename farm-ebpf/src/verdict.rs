//! The decision for a frame addressed to a VIP: dead-man switch, bucket, ownership, counters.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use farm_common::{BucketKey, Control, bucket_of, bucket_state, stat};

use crate::{maps, ptr};

/// Whether the daemon has refreshed the dead-man deadline recently enough.
#[inline(always)]
pub fn alive(ctl: &Control) -> bool {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    ctl.deadline_ns != 0 && now <= ctl.deadline_ns
}

/// Whether this node currently answers for bucket `b` (owner, or new owner during a handover).
#[inline(always)]
pub fn mine(ctl: &Control, b: u32) -> bool {
    match maps::bucket(ctl, b) {
        Some(e) => e.state == bucket_state::MINE || e.state == bucket_state::INCOMING,
        None => false,
    }
}

/// Accept or drop a VIP frame hashed on `key`.
#[inline(always)]
pub fn deliver(ctx: &XdpContext, ctl: &Control, key: BucketKey) -> u32 {
    if !alive(ctl) {
        maps::stat(stat::DEADMAN_DROP);
        return xdp_action::XDP_DROP;
    }
    let b = bucket_of(&ctl.key(), key);
    let len = ptr::frame_len(ctx);
    if mine(ctl, b) {
        maps::count_bucket(b, true, len);
        accept(ctx, ctl)
    } else {
        maps::count_bucket(b, false, len);
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
