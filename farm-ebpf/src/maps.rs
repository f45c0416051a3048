//! The maps, and small accessors over them.

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use farm_common::{
    BUCKETS, BucketCounters, BucketEntry, CACHE_BITS, CacheEntry, Control, Msg, VIP_SLOTS, VipInfo,
    VipSlot, bucket_of_msg, control_flags, hash::le64, vip_slot_words,
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

/// Recent keys' buckets, per CPU (see `bucket_of`). Not pinned: each program instance starts
/// with an empty cache.
#[map]
static FARM_BUCKET_CACHE: PerCpuArray<CacheEntry> =
    PerCpuArray::with_max_entries(1 << CACHE_BITS, 0);

/// This CPU's reading of the coarse clock and the tick it was read at (see `coarse_now`). Not
/// pinned.
#[map]
static FARM_CLOCK: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

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

/// CLOCK_MONOTONIC_COARSE, now. That clock only moves at a timer tick, and jiffies counts the
/// ticks: `bpf_jiffies64` is inlined by the verifier (two loads), while
/// `bpf_ktime_get_coarse_ns` is a function call (~8 ns per packet measured here, with the CPU's
/// speculation mitigations on calls and returns). So each CPU reads the clock once per tick
/// and keeps the reading. Read just as a tick happens, a kept reading can be one tick old (the
/// tick count and the clock advance one after the other): the dead-man switch then lapses up
/// to two ticks (2-8 ms) late.
#[inline(always)]
pub fn coarse_now() -> u64 {
    // SAFETY: helpers without arguments; the per-CPU slot has no other writer while the
    // program runs on this CPU.
    unsafe {
        let j = bpf_jiffies64();
        match FARM_CLOCK.get_ptr_mut(0) {
            Some(c) => {
                if (*c)[0] != j {
                    (*c)[0] = j;
                    (*c)[1] = bpf_ktime_get_coarse_ns();
                }
                (*c)[1]
            }
            None => bpf_ktime_get_coarse_ns(),
        }
    }
}

#[inline(always)]
pub fn control() -> Option<&'static Control> {
    FARM_CONTROL.get(0)
}

/// The VIP `addr`, if it is one: one array access and a compare.
#[inline(always)]
pub fn vip(ctl: &Control, addr: &[u8; 16]) -> Option<&'static VipInfo> {
    vip_words(ctl, le64(addr, 0), le64(addr, 8))
}

/// The VIP whose address is the two little-endian words `w0` (bytes 0-7) and `w1` (8-15).
#[inline(always)]
pub fn vip_words(ctl: &Control, w0: u64, w1: u64) -> Option<&'static VipInfo> {
    let slot = vip_slot_words(w0, w1, ctl.vip_mult);
    let s = if ctl.vip_table == 0 {
        FARM_VIPS_0.get(slot)?
    } else {
        FARM_VIPS_1.get(slot)?
    };
    let a = s.addr.as_ptr().cast::<u64>();
    // SAFETY: array map values are 8-aligned (the kernel allocates them at 8-byte strides) and
    // `addr` is at offset 0 of the slot: two aligned words inside it.
    let (a0, a1) = unsafe { (a.read(), a.add(1).read()) };
    if s.used != 0 && a0 == w0 && a1 == w1 {
        Some(&s.info)
    } else {
        None
    }
}

/// The words of an IPv4 address `a` (read little-endian from the wire) in its IPv4-mapped
/// form, as `VipKey::v4` stores it.
#[inline(always)]
pub const fn v4_words(a: u32) -> (u64, u64) {
    (0, 0xffff_0000 | ((a as u64) << 32))
}

#[inline(always)]
pub fn vip_v4(ctl: &Control, a: [u8; 4]) -> Option<&'static VipInfo> {
    let (w0, w1) = v4_words(u32::from_le_bytes(a));
    vip_words(ctl, w0, w1)
}

/// The bucket of `m`: from this CPU's cache of recent keys, or SipHash (and cached).
///
/// The cache is direct-mapped, indexed by a cheap fold of the key: the packets of one
/// connection or client after the first skip the hash. A client can choose keys that share a
/// slot with another client's and evict it, but each of its packets evicts at most one entry,
/// so it makes others compute at most one hash per packet it sends itself (and computes one
/// itself). An entry is tagged with the whole key and the hash key it was computed with.
#[inline(always)]
pub fn bucket_of(ctl: &Control, m: &Msg) -> u32 {
    let key = ctl.key();
    if ctl.flags & control_flags::NO_BUCKET_CACHE != 0 {
        return bucket_of_msg(&key, m);
    }
    let tag = key.k0 ^ key.k1;
    let x = m.m0 ^ m.m1 ^ m.last;
    let fold = (x as u32) ^ ((x >> 32) as u32);
    let idx = fold.wrapping_mul(0x9e37_79b1) >> (32 - CACHE_BITS);
    let Some(e) = FARM_BUCKET_CACHE.get_ptr_mut(idx) else {
        return bucket_of_msg(&key, m);
    };
    // SAFETY: this CPU's entry; nothing else runs on this CPU while the program does.
    unsafe {
        if (*e).m0 == m.m0 && (*e).m1 == m.m1 && (*e).last == m.last && (*e).key_tag == tag {
            return (*e).bucket;
        }
        let b = bucket_of_msg(&key, m);
        *e = CacheEntry {
            m0: m.m0,
            m1: m.m1,
            last: m.last,
            key_tag: tag,
            bucket: b,
            _reserved: 0,
        };
        b
    }
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
