//! Layouts of the maps shared by the XDP program and the daemon.
//!
//! Rules (from firezone's relay and aya's pitfalls): `#[repr(C)]`, every byte accounted for by an
//! explicit field (no implicit padding, so lookups never miss on garbage), and anything that is in
//! network order on the wire (addresses, ports) kept as byte arrays with accessors.

/// log2 of the number of buckets.
pub const BUCKET_BITS: u32 = 16;
/// Buckets per farm. 65536 gives fine-grained shares (a node with weight 1 of 32 still owns
/// ~2048 buckets) while keeping per-bucket per-CPU counters at 2 MiB per CPU. Balance does not
/// depend on this number: the assignment splits buckets exactly (see the daemon's `assign`).
pub const BUCKETS: u32 = 1 << BUCKET_BITS;
pub const BUCKET_MASK: u32 = BUCKETS - 1;

/// Port rules per VIP.
pub const MAX_RULES: usize = 8;
/// VIPs per farm (IPv4 and IPv6 together).
pub const MAX_VIPS: u32 = 64;
/// log2 of the slots of a VIP table. The daemon chooses a multiplier that puts every VIP in a
/// slot of its own, so a lookup is one array access and one compare (a hash map lookup costs
/// several times more, on every packet, VIP or not).
pub const VIP_SLOT_BITS: u32 = 10;
pub const VIP_SLOTS: u32 = 1 << VIP_SLOT_BITS;
/// Members per farm (owner indices are bytes; `NO_OWNER` is reserved).
pub const MAX_MEMBERS: usize = 64;
pub const NO_OWNER: u8 = 0xff;

// Map names, as the XDP program declares them.
pub const MAP_CONTROL: &str = "FARM_CONTROL";
pub const MAP_VIPS_0: &str = "FARM_VIPS_0";
pub const MAP_VIPS_1: &str = "FARM_VIPS_1";
pub const MAP_BUCKETS_0: &str = "FARM_BUCKETS_0";
pub const MAP_BUCKETS_1: &str = "FARM_BUCKETS_1";
pub const MAP_BUCKET_COUNTERS: &str = "FARM_BUCKET_COUNTERS";
pub const MAP_STATS: &str = "FARM_STATS";
/// Heartbeat source addresses (IPv4 as IPv4-mapped IPv6) of the configured members: datagrams
/// to the heartbeat port from any other address are dropped (see `Control::hb_port`).
pub const MAP_HB_PEERS: &str = "FARM_HB_PEERS";
/// Every map, in the order an in-place upgrade hands them over (pinned by name).
pub const MAPS: [&str; 8] = [
    MAP_CONTROL,
    MAP_VIPS_0,
    MAP_VIPS_1,
    MAP_BUCKETS_0,
    MAP_BUCKETS_1,
    MAP_BUCKET_COUNTERS,
    MAP_STATS,
    MAP_HB_PEERS,
];
/// The maps' layout (their set, types, sizes and value formats). An in-place upgrade hands
/// the maps over as they are when both farmd builds have the same layout; a build that changes
/// the layout bumps this and migrates from the previous one (`upgrade::migrate`).
pub const MAP_LAYOUT: u32 = 1;
/// Entries of `FARM_HB_PEERS`: 64 members, a few heartbeat networks each.
pub const HB_PEERS_MAX: u32 = 512;
pub const PROG_XDP: &str = "farm_xdp";
pub const PROG_EGRESS: &str = "farm_egress";
pub const PROG_INGRESS: &str = "farm_ingress";
pub const PROG_EMPTY: &str = "farm_empty";
pub const PROG_TX: &str = "farm_tx";

/// The single entry of `FARM_CONTROL`: what the daemon tells the data plane besides the buckets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Control {
    /// Dead-man switch: CLOCK_MONOTONIC (coarse) nanoseconds after which this node stops
    /// accepting VIP traffic and answering ARP/NDP for the VIPs. 0 = not armed yet (the program
    /// accepts nothing until the daemon arms it).
    pub deadline_ns: u64,
    /// Hash key, see `HashKey::from_bytes`.
    pub hash_key: [u8; 16],
    /// Which bucket table is live: 0 = `FARM_BUCKETS_0`, 1 = `FARM_BUCKETS_1`. The daemon writes
    /// the other table and then flips this, so a packet sees one whole table or the other.
    pub active_table: u32,
    /// Multiplier of the VIP slot hash for the live VIP table (see `vip_slot`).
    pub vip_mult: u32,
    /// The interface's own MAC: accepted frames are rewritten to it so the stack takes them.
    pub if_mac: [u8; 6],
    /// The cluster MAC that the VIPs resolve to.
    pub cluster_mac: [u8; 6],
    /// Which VIP table is live: 0 = `FARM_VIPS_0`, 1 = `FARM_VIPS_1` (swapped like buckets).
    pub vip_table: u8,
    /// The heartbeat UDP port, big-endian (0: no filter). UDP datagrams to it that are not for
    /// a VIP and come from an address not in `FARM_HB_PEERS` are dropped before the kernel
    /// queues them for farmd: a flood from anywhere else costs the heartbeat thread nothing.
    pub hb_port: [u8; 2],
    /// `control_flags::*` bits.
    pub flags: u8,
    /// Handover switch points (bit i = member i), written together with `active_table` so a new
    /// table never meets the masks of an old move:
    /// - `givers_ready`: previous owners that have released their OUTGOING buckets (take no new
    ///   connections in them). Until its bit is set, an OUTGOING bucket acts as MINE on the
    ///   previous owner and an INCOMING one as NOT_MINE on the new owner; after, as the states
    ///   say. The switch is one write on each side, one message apart.
    pub givers_ready: u64,
    /// - `givers_done`: previous owners that have handed over (no connection left): their
    ///   buckets are wholly the new owner's (INCOMING acts as MINE), and a previous owner whose
    ///   own bit is set takes nothing of them any more (OUTGOING acts as NOT_MINE).
    pub givers_done: u64,
}

impl Control {
    /// The hash key: two 8-byte loads (`hash_key` is 8-aligned, asserted below) rather than
    /// sixteen byte loads on every packet.
    #[inline(always)]
    pub fn key(&self) -> crate::HashKey {
        let p = self.hash_key.as_ptr().cast::<u64>();
        // SAFETY: `hash_key` is at offset 8 of a `repr(C)` struct aligned to 8, so both words
        // are aligned and inside the field.
        unsafe {
            crate::HashKey {
                k0: u64::from_le(p.read()),
                k1: u64::from_le(p.add(1).read()),
            }
        }
    }

    /// How this node treats a bucket in `entry`'s state, after the handover masks.
    #[inline(always)]
    pub fn effective_state(&self, entry: &BucketEntry) -> u8 {
        let bit = if (entry.prev_owner as usize) < MAX_MEMBERS {
            1u64 << entry.prev_owner
        } else {
            0
        };
        match entry.state {
            bucket_state::INCOMING if self.givers_done & bit != 0 => bucket_state::MINE,
            bucket_state::INCOMING if self.givers_ready & bit == 0 => bucket_state::NOT_MINE,
            bucket_state::OUTGOING if self.givers_done & bit != 0 => bucket_state::NOT_MINE,
            bucket_state::OUTGOING if self.givers_ready & bit == 0 => bucket_state::MINE,
            s => s,
        }
    }
}

/// Bits of `Control::flags`.
pub mod control_flags {
    /// Every packet's bucket is hashed: the per-CPU bucket cache is neither read nor filled
    /// (the benchmark measures the hash path with it).
    pub const NO_BUCKET_CACHE: u8 = 1;
}

/// Bucket states, as seen by this node.
pub mod bucket_state {
    /// Another node owns the bucket: drop.
    pub const NOT_MINE: u8 = 0;
    /// This node owns the bucket: accept.
    pub const MINE: u8 = 1;
    /// Handover, new owner: accepts TCP SYNs (new connections) and TCP packets of its own
    /// sockets; leaves other TCP packets and all non-TCP traffic to the previous owner.
    pub const INCOMING: u8 = 2;
    /// Handover, previous owner: accepts TCP packets of its own sockets (never a SYN) and all
    /// non-TCP traffic until the handover ends.
    pub const OUTGOING: u8 = 3;
}

/// One bucket of `FARM_BUCKETS_{0,1}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct BucketEntry {
    /// `bucket_state::*`, from this node's point of view.
    pub state: u8,
    /// Member index of the owner (`NO_OWNER` when nobody owns it).
    pub owner: u8,
    /// Member index of the previous owner during a handover (`NO_OWNER` otherwise).
    pub prev_owner: u8,
    pub flags: u8,
}

impl BucketEntry {
    pub const fn owned_by(owner: u8, me: u8) -> Self {
        Self {
            state: if owner == me && owner != NO_OWNER {
                bucket_state::MINE
            } else {
                bucket_state::NOT_MINE
            },
            owner,
            prev_owner: NO_OWNER,
            flags: 0,
        }
    }
}

/// log2 of the entries of the data plane's per-CPU bucket cache (`FARM_BUCKET_CACHE`).
pub const CACHE_BITS: u32 = 12;

/// An entry of the per-CPU bucket cache: a bucket key (as `crate::Msg`'s words), a tag of the
/// hash key it was hashed with, and its bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct CacheEntry {
    pub m0: u64,
    pub m1: u64,
    pub last: u64,
    pub key_tag: u64,
    pub bucket: u32,
    pub _reserved: u32,
}

/// Per-bucket, per-CPU traffic counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct BucketCounters {
    pub accepted_packets: u64,
    pub accepted_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
}

/// Key of `FARM_VIPS`: the VIP address as 16 bytes. IPv4 VIPs are stored IPv4-mapped
/// (`::ffff:a.b.c.d`), which no real IPv6 packet on the wire carries as a destination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct VipKey {
    pub addr: [u8; 16],
}

impl VipKey {
    pub const fn v4(a: [u8; 4]) -> Self {
        Self {
            addr: [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
            ],
        }
    }
    pub const fn v6(addr: [u8; 16]) -> Self {
        Self { addr }
    }
}

/// Protocol bits of a port rule.
pub mod proto_mask {
    pub const TCP: u8 = 1;
    pub const UDP: u8 = 2;
}

/// Affinity of a port rule.
pub mod affinity {
    /// Hash on the client (source) address only.
    pub const CLIENT: u8 = 0;
    /// Hash on the client address and source port.
    pub const CONNECTION: u8 = 1;
}

/// A port rule: a protocol set and a destination port range, with its affinity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct PortRule {
    /// First port of the range, network order.
    pub port_lo: [u8; 2],
    /// Last port of the range (inclusive), network order.
    pub port_hi: [u8; 2],
    /// `proto_mask::*` bits.
    pub protocols: u8,
    /// `affinity::*`.
    pub affinity: u8,
    pub _reserved: [u8; 2],
}

impl PortRule {
    pub const fn new(protocols: u8, lo: u16, hi: u16, affinity: u8) -> Self {
        Self {
            port_lo: lo.to_be_bytes(),
            port_hi: hi.to_be_bytes(),
            protocols,
            affinity,
            _reserved: [0; 2],
        }
    }
    pub const fn lo(&self) -> u16 {
        u16::from_be_bytes(self.port_lo)
    }
    pub const fn hi(&self) -> u16 {
        u16::from_be_bytes(self.port_hi)
    }
    /// Whether a packet of protocol bit `proto` to `port` (host order) falls under this rule.
    #[inline(always)]
    pub const fn matches(&self, proto: u8, port: u16) -> bool {
        self.protocols & proto != 0 && port >= self.lo() && port <= self.hi()
    }
}

/// Slot of a VIP table: which VIP (if any) lives in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct VipSlot {
    /// The VIP (16 bytes, IPv4 mapped as in `VipKey`).
    pub addr: [u8; 16],
    pub info: VipInfo,
    /// 1 when a VIP occupies the slot.
    pub used: u8,
    pub _reserved: [u8; 7],
}

/// The slot of `addr` in a VIP table with multiplier `mult`: the four 32-bit words of the
/// address folded by XOR, times `mult`, top bits.
#[inline(always)]
pub fn vip_slot(addr: &[u8; 16], mult: u32) -> u32 {
    let w = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    let fold = w(0) ^ w(4) ^ w(8) ^ w(12);
    fold.wrapping_mul(mult) >> (32 - VIP_SLOT_BITS)
}

/// `vip_slot` of an address given as two little-endian words (its bytes 0-7 and 8-15).
#[inline(always)]
pub fn vip_slot_words(w0: u64, w1: u64, mult: u32) -> u32 {
    let x = w0 ^ w1;
    let fold = (x as u32) ^ ((x >> 32) as u32);
    fold.wrapping_mul(mult) >> (32 - VIP_SLOT_BITS)
}

/// Value of a VIP slot's `info`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct VipInfo {
    pub rules: [PortRule; MAX_RULES],
    /// How many of `rules` are in use.
    pub nrules: u8,
    /// Index of the VIP in the configuration (for counters and logs).
    pub index: u8,
    /// A mirror group's VIP: whole on its primary, on no other node (see `mirror`); 0 for a
    /// farm VIP, split by buckets.
    pub mirror: u8,
    pub _reserved: [u8; 5],
}

/// Values of `VipInfo::mirror`.
pub mod mirror {
    /// A farm VIP: bucket by bucket.
    pub const FARM: u8 = 0;
    /// This node is the mirror group's primary: every frame for the VIP is taken.
    pub const PRIMARY: u8 = 1;
    /// Another node is (or none is): every frame for the VIP is dropped.
    pub const NOT_PRIMARY: u8 = 2;
}

impl VipInfo {
    /// Affinity of a TCP/UDP packet to `port`. Traffic to a VIP that matches no rule (other
    /// ports, other protocols, ICMP echo) is still delivered to exactly one node: by client.
    #[inline(always)]
    pub fn affinity_for(&self, proto: u8, port: u16) -> u8 {
        let mut i = 0;
        while i < MAX_RULES {
            if i < self.nrules as usize && self.rules[i].matches(proto, port) {
                return self.rules[i].affinity;
            }
            i += 1;
        }
        affinity::CLIENT
    }
}

/// XDP metadata word that marks an ARP/NDP answer XDP built in place and passed up for the tc
/// ingress program to send back out of the interface. A VLAN tag the NIC (rx VLAN offload) or
/// a bridge moved into the packet's metadata is invisible to XDP, so an XDP_TX answer would
/// leave untagged; the skb keeps the tag, and a tc redirect to egress sends it with it.
pub const REFLECT_META: u32 = 0xfa4d_7e1f;

/// Indices of the per-CPU `FARM_STATS` counters.
pub mod stat {
    /// ARP requests for a VIP answered (with the cluster MAC) by this node.
    pub const ARP_ANSWERED: u32 = 0;
    /// ARP requests for a VIP left to the member that owns the requester's bucket.
    pub const ARP_LEFT_TO_PEER: u32 = 1;
    /// IPv6 neighbour solicitations for a VIP answered by this node.
    pub const NDP_ANSWERED: u32 = 2;
    pub const NDP_LEFT_TO_PEER: u32 = 3;
    /// Frames not addressed to a VIP, passed untouched.
    pub const NOT_VIP: u32 = 4;
    /// VIP frames dropped because the dead-man switch expired (daemon hung or gone).
    pub const DEADMAN_DROP: u32 = 5;
    /// VIP fragments hashed by client address.
    pub const FRAGMENTS: u32 = 6;
    /// ICMP errors classified by their inner packet.
    pub const ICMP_ERRORS: u32 = 7;
    /// ARP/NDP for the VIP sent by someone else claiming the VIP (dropped).
    pub const VIP_CLAIM_DROPPED: u32 = 8;
    /// Egress: ARP/NDP from a VIP rewritten to carry the cluster MAC.
    pub const EGRESS_REWRITTEN: u32 = 9;
    /// Totals of the per-bucket counters (so that status needs no scan of every bucket).
    pub const ACCEPTED_PACKETS: u32 = 10;
    pub const ACCEPTED_BYTES: u32 = 11;
    pub const DROPPED_PACKETS: u32 = 12;
    pub const DROPPED_BYTES: u32 = 13;
    /// Packets of buckets in handover accepted / dropped by the handover rule.
    pub const HANDOVER_ACCEPTED: u32 = 14;
    pub const HANDOVER_DROPPED: u32 = 15;
    // Parse errors, by kind. VIP-bound frames with a parse error are dropped; frames whose
    // destination cannot even be read are passed (the kernel drops them too).
    pub const ERR_ETH_SHORT: u32 = 16;
    pub const ERR_VLAN_SHORT: u32 = 17;
    pub const ERR_IPV4_SHORT: u32 = 18;
    pub const ERR_IPV4_BAD_HEADER: u32 = 19;
    pub const ERR_IPV6_SHORT: u32 = 20;
    pub const ERR_IPV6_EXT: u32 = 21;
    pub const ERR_L4_SHORT: u32 = 22;
    pub const ERR_ICMP_INNER: u32 = 23;
    pub const ERR_ARP: u32 = 24;
    pub const ERR_NDP: u32 = 25;
    /// Frames for a mirror group's VIP taken by this node (its primary) / dropped (not primary).
    pub const MIRROR_ACCEPTED: u32 = 26;
    pub const MIRROR_DROPPED: u32 = 27;
    /// ARP/NDP answers built by XDP for a frame without an in-frame VLAN tag, sent back out by
    /// the tc ingress program with the tag the frame had in its metadata, if any (see
    /// `REFLECT_META`).
    pub const ANSWERS_REFLECTED: u32 = 28;
    /// Datagrams to the heartbeat port from an address that is no member's, dropped.
    pub const HEARTBEAT_FOREIGN: u32 = 29;
    pub const COUNT: u32 = 32;

    /// Names for display, indexed like the constants (empty = unused slot).
    pub const NAMES: [&str; COUNT as usize] = [
        "arp_answered",
        "arp_left_to_peer",
        "ndp_answered",
        "ndp_left_to_peer",
        "not_vip_passed",
        "deadman_dropped",
        "fragments",
        "icmp_errors_classified",
        "vip_claim_dropped",
        "egress_rewritten",
        "accepted_packets",
        "accepted_bytes",
        "dropped_packets",
        "dropped_bytes",
        "handover_accepted",
        "handover_dropped",
        "err_eth_short",
        "err_vlan_short",
        "err_ipv4_short",
        "err_ipv4_bad_header",
        "err_ipv6_short",
        "err_ipv6_ext_headers",
        "err_l4_short",
        "err_icmp_inner",
        "err_arp",
        "err_ndp",
        "mirror_accepted",
        "mirror_dropped",
        "answers_reflected",
        "heartbeat_foreign_dropped",
        "",
        "",
    ];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `repr(C)` with only integer / byte-array fields and no padding
    // (checked by the size assertions below), so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::Control {}
    unsafe impl aya::Pod for super::BucketEntry {}
    unsafe impl aya::Pod for super::BucketCounters {}
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::VipSlot {}
}

// No implicit padding anywhere: the sizes are the sums of the fields.
const _: () =
    assert!(core::mem::size_of::<Control>() == 8 + 16 + 4 + 4 + 6 + 6 + 1 + 2 + 1 + 8 + 8);
const _: () = assert!(core::mem::size_of::<VipSlot>() == 16 + 72 + 1 + 7);
const _: () =
    assert!(core::mem::offset_of!(Control, hash_key) == 8 && core::mem::align_of::<Control>() == 8);
const _: () = assert!(core::mem::offset_of!(VipSlot, addr) == 0);
const _: () = assert!(core::mem::size_of::<BucketEntry>() == 4);
const _: () = assert!(core::mem::size_of::<BucketCounters>() == 32);
const _: () = assert!(core::mem::size_of::<CacheEntry>() == 40);
const _: () = assert!(core::mem::size_of::<VipKey>() == 16);
const _: () = assert!(core::mem::size_of::<PortRule>() == 8);
const _: () = assert!(core::mem::size_of::<VipInfo>() == 8 * MAX_RULES + 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_endian = "little")]
    fn vip_slot_of_words_is_vip_slot_of_bytes() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let a: [u8; 16] = core::array::from_fn(|i| (x >> (i % 8 * 8)) as u8 ^ (i as u8));
            let w0 = u64::from_le_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
            let w1 = u64::from_le_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
            let mult = (x >> 7) as u32 | 1;
            assert_eq!(vip_slot_words(w0, w1, mult), vip_slot(&a, mult));
        }
    }

    #[test]
    fn the_key_reads_as_its_bytes_say() {
        let c = Control {
            hash_key: core::array::from_fn(|i| i as u8 * 17),
            ..Control::default()
        };
        assert_eq!(c.key(), crate::HashKey::from_bytes(&c.hash_key));
    }
}
