//! The maps, and small accessors over them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use farm_common::{BUCKETS, BucketCounters, BucketEntry, Control, MAX_VIPS, VipInfo, VipKey};

#[map]
static FARM_CONTROL: Array<Control> = Array::with_max_entries(1, 0);

#[map]
static FARM_VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS, 0);

#[map]
static FARM_BUCKETS_0: Array<BucketEntry> = Array::with_max_entries(BUCKETS, 0);

#[map]
static FARM_BUCKETS_1: Array<BucketEntry> = Array::with_max_entries(BUCKETS, 0);

#[map]
static FARM_BUCKET_COUNTERS: PerCpuArray<BucketCounters> =
    PerCpuArray::with_max_entries(BUCKETS, 0);

#[map]
static FARM_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(farm_common::stat::COUNT, 0);

#[inline(always)]
pub fn control() -> Option<&'static Control> {
    FARM_CONTROL.get(0)
}

#[inline(always)]
pub fn vip(addr: &[u8; 16]) -> Option<&'static VipInfo> {
    // SAFETY: the daemon never removes a VIP entry while the program runs with it except on
    // reload, where a stale read only affects one packet's rule lookup.
    unsafe { FARM_VIPS.get(VipKey { addr: *addr }) }
}

#[inline(always)]
pub fn vip_v4(a: [u8; 4]) -> Option<&'static VipInfo> {
    vip(&VipKey::v4(a).addr)
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
pub fn count_bucket(b: u32, accepted: bool, bytes: u64) {
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
