//! The maps, and small accessors over them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use farm_common::{
    BUCKETS, BucketCounters, BucketEntry, Control, VIP_SLOTS, VipInfo, VipKey, VipSlot, vip_slot,
};

#[map]
static FARM_CONTROL: Array<Control> = Array::with_max_entries(1, 0);

#[map]
static FARM_VIPS_0: Array<VipSlot> = Array::with_max_entries(VIP_SLOTS, 0);

#[map]
static FARM_VIPS_1: Array<VipSlot> = Array::with_max_entries(VIP_SLOTS, 0);

/// The bucket tables are memory-mapped by farmd (BPF_F_MMAPABLE): rewriting 65536 entries is a
/// copy, not 65536 system calls (which took ~60 ms, on the failover path).
const BPF_F_MMAPABLE: u32 = aya_ebpf::bindings::BPF_F_MMAPABLE;

#[map]
static FARM_BUCKETS_0: Array<BucketEntry> = Array::with_max_entries(BUCKETS, BPF_F_MMAPABLE);

#[map]
static FARM_BUCKETS_1: Array<BucketEntry> = Array::with_max_entries(BUCKETS, BPF_F_MMAPABLE);

#[map]
static FARM_BUCKET_COUNTERS: PerCpuArray<BucketCounters> =
    PerCpuArray::with_max_entries(BUCKETS, 0);

#[map]
static FARM_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(farm_common::stat::COUNT, 0);

#[map]
static FARM_HB_PEERS: HashMap<[u8; 16], u8> =
    HashMap::with_max_entries(farm_common::HB_PEERS_MAX, 0);

/// Whether a datagram `to` the heartbeat port from `from` (IPv6, or IPv4-mapped) is dropped:
/// the filter is on and `from` is no member's heartbeat address.
#[inline(always)]
pub fn foreign_heartbeat(ctl: &Control, to_port: [u8; 2], from: &[u8; 16]) -> bool {
    ctl.hb_port != [0, 0]
        && to_port == ctl.hb_port
        // SAFETY: the value is not kept beyond the lookup.
        && unsafe { FARM_HB_PEERS.get(from) }.is_none()
}

#[inline(always)]
pub fn control() -> Option<&'static Control> {
    FARM_CONTROL.get(0)
}

/// The VIP `addr`, if it is one: one array access and a compare.
#[inline(always)]
pub fn vip(ctl: &Control, addr: &[u8; 16]) -> Option<&'static VipInfo> {
    let slot = vip_slot(addr, ctl.vip_mult);
    let s = if ctl.vip_table == 0 {
        FARM_VIPS_0.get(slot)?
    } else {
        FARM_VIPS_1.get(slot)?
    };
    if s.used != 0 && same16(&s.addr, addr) {
        Some(&s.info)
    } else {
        None
    }
}

#[inline(always)]
fn same16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let w = |x: &[u8; 16], i: usize| {
        u64::from_ne_bytes([
            x[i],
            x[i + 1],
            x[i + 2],
            x[i + 3],
            x[i + 4],
            x[i + 5],
            x[i + 6],
            x[i + 7],
        ])
    };
    w(a, 0) == w(b, 0) && w(a, 8) == w(b, 8)
}

#[inline(always)]
pub fn vip_v4(ctl: &Control, a: [u8; 4]) -> Option<&'static VipInfo> {
    vip(ctl, &VipKey::v4(a).addr)
}

#[inline(always)]
pub fn bucket(ctl: &Control, b: u32) -> Option<&'static BucketEntry> {
    if ctl.active_table == 0 {
        FARM_BUCKETS_0.get(b)
    } else {
        FARM_BUCKETS_1.get(b)
    }
}

#[inline(always)]
pub fn stat(idx: u32) {
    if let Some(p) = FARM_STATS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn stat_add(idx: u32, packets: u64, bytes: u64) {
    if let Some(p) = FARM_STATS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slots, no concurrent writer on this CPU; idx + 1 is in the array
        // (checked below by the verifier through the second lookup).
        unsafe { *p += packets };
    }
    if let Some(p) = FARM_STATS.get_ptr_mut(idx + 1) {
        // SAFETY: as above.
        unsafe { *p += bytes };
    }
}

#[inline(always)]
pub fn count_bucket(b: u32, accepted: bool, bytes: u64) {
    if accepted {
        stat_add(farm_common::stat::ACCEPTED_PACKETS, 1, bytes);
    } else {
        stat_add(farm_common::stat::DROPPED_PACKETS, 1, bytes);
    }
    if let Some(c) = FARM_BUCKET_COUNTERS.get_ptr_mut(b) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            if accepted {
                (*c).accepted_packets += 1;
                (*c).accepted_bytes += bytes;
            } else {
                (*c).dropped_packets += 1;
                (*c).dropped_bytes += bytes;
            }
        }
    }
}
