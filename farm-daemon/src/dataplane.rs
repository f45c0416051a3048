//! The XDP data plane as the daemon drives it: load the eBPF object, fill its maps, attach it
//! (links pinned on bpffs, so that the program outlives a crashed daemon and its dead-man switch
//! can stop the node from serving), swap bucket tables, keep the dead-man switch armed, and read
//! the counters.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, IterableMap as _, MapData, PerCpuArray},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc,
    },
};
use farm_common::{
    BUCKETS, BucketCounters, BucketEntry, Control, MAP_BUCKET_COUNTERS, MAP_BUCKETS_0,
    MAP_BUCKETS_1, MAP_CONTROL, MAP_HB_PEERS, MAP_STATS, MAP_VIPS_0, MAP_VIPS_1, PROG_EGRESS,
    PROG_EMPTY, PROG_INGRESS, PROG_TX, PROG_XDP, PortRule, VIP_SLOTS, VipInfo, VipKey, VipSlot,
    stat, vip_slot,
};

use crate::config::{self, Vip};

/// The compiled eBPF object (built by build.rs from farm-ebpf).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/farm"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("link: {0}")]
    Link(#[from] LinkError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a bpf filesystem and cannot be mounted ({source}); mount one with \
         `mount -t bpf bpf {path}` or set runtime.bpffs"
    )]
    Bpffs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a bpf filesystem, and farmd runs in a mount namespace of its own (as under \
         `ip netns exec`, which mounts a fresh /sys, or a systemd unit with ProtectSystem=): a \
         bpffs mounted here would vanish with farmd, and with it the pinned programs that keep a \
         crashed member's node silent. Run farmd with the host's mounts: `nsenter \
         --net=/run/netns/NAME farmd ...` instead of `ip netns exec NAME farmd ...`; or mount a \
         bpffs in the host where farmd's namespace inherits it (e.g. `mkdir -p /run/farm/bpf && \
         mount -t bpf bpf /run/farm/bpf`) and set runtime.bpffs to it; under systemd, mount \
         /sys/fs/bpf at boot (systemd does by default)"
    )]
    PrivateBpffs { path: PathBuf },
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> DataplaneError {
    move |source| DataplaneError::Program { name, source }
}

/// Now, on the clock the XDP program reads (`bpf_ktime_get_coarse_ns` = CLOCK_MONOTONIC_COARSE).
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A bucket table's values, memory-mapped (BPF_F_MMAPABLE array: one element every 8 bytes).
struct MappedTable {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone and only written through `&mut self`.
unsafe impl Send for MappedTable {}

impl MappedTable {
    const STRIDE: usize = 8;

    fn new(fd: &aya::maps::MapFd) -> Option<Self> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = (BUCKETS as usize * Self::STRIDE).next_multiple_of(page);
        // SAFETY: a shared read-write mapping of a map fd we hold; checked for failure below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        Some(Self {
            ptr: std::ptr::NonNull::new(p.cast())?,
            len,
        })
    }

    fn set(&mut self, bucket: usize, e: BucketEntry) {
        assert!(bucket < BUCKETS as usize);
        // SAFETY: in bounds (checked), 8-byte aligned (page-aligned base, stride 8), and the
        // element is a plain 4-byte value the program reads whole.
        unsafe {
            self.ptr
                .as_ptr()
                .add(bucket * Self::STRIDE)
                .cast::<BucketEntry>()
                .write_volatile(e)
        }
    }
}

impl Drop for MappedTable {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The control map and the value last written to it.
struct ControlWord {
    map: Array<MapData, Control>,
    value: Control,
}

/// The data plane's control word, shared between the main loop (tables, masks, VIPs) and the
/// heartbeat thread (dead-man deadline). Every write is the whole value under one lock, so
/// neither overwrites the other's fields with stale ones.
#[derive(Clone)]
pub struct Deadman(std::sync::Arc<std::sync::Mutex<ControlWord>>);

impl Deadman {
    fn update(&self, f: impl FnOnce(&mut Control)) -> Result<(), DataplaneError> {
        let mut w = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut w.value);
        let value = w.value;
        w.map.set(0, value, 0).map_err(map_err(MAP_CONTROL))
    }

    fn get(&self) -> Control {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .value
    }

    /// Refreshes the deadline: the node serves for `timeout` from now unless refreshed again.
    pub fn arm(&self, timeout: Duration) -> Result<(), DataplaneError> {
        self.update(|c| c.deadline_ns = coarse_now_ns() + timeout.as_nanos() as u64)
    }

    /// Stops serving now (deadline in the past).
    pub fn disarm(&self) -> Result<(), DataplaneError> {
        self.update(|c| c.deadline_ns = 0)
    }

    /// As `arm`, without waiting: `None` when another thread holds the control word (the
    /// heartbeat thread never waits for the main loop; it refreshes at its next tick).
    pub fn try_arm(&self, timeout: Duration) -> Option<Result<(), DataplaneError>> {
        let mut w = match self.0.try_lock() {
            Ok(w) => w,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        w.value.deadline_ns = coarse_now_ns() + timeout.as_nanos() as u64;
        let value = w.value;
        Some(w.map.set(0, value, 0).map_err(map_err(MAP_CONTROL)))
    }
}

/// The per-bucket traffic counters (per CPU in the kernel), readable from any thread.
#[derive(Clone)]
pub struct BucketCounterReader(std::sync::Arc<PerCpuArray<MapData, BucketCounters>>);

impl BucketCounterReader {
    /// Counters of one bucket, summed over CPUs.
    pub fn bucket(&self, b: u32) -> Result<BucketCounters, DataplaneError> {
        let v = self.0.get(&b, 0).map_err(map_err(MAP_BUCKET_COUNTERS))?;
        Ok(v.iter().fold(BucketCounters::default(), |mut a, c| {
            a.accepted_packets += c.accepted_packets;
            a.accepted_bytes += c.accepted_bytes;
            a.dropped_packets += c.dropped_packets;
            a.dropped_bytes += c.dropped_bytes;
            a
        }))
    }

    /// (bucket, packets, bytes) of every bucket that saw traffic, accepted and dropped summed.
    pub fn all(&self) -> Result<Vec<(u32, u64, u64)>, DataplaneError> {
        let mut seen = Vec::new();
        for b in 0..BUCKETS {
            let c = self.bucket(b)?;
            let packets = c.accepted_packets + c.dropped_packets;
            if packets > 0 {
                seen.push((b, packets, c.accepted_bytes + c.dropped_bytes));
            }
        }
        Ok(seen)
    }
}

/// The loaded (not necessarily attached) data plane.
pub struct Dataplane {
    ebpf: Ebpf,
    /// The control word, shared with the heartbeat thread (which refreshes the dead-man
    /// deadline in it).
    control: Deadman,
    vip_tables: [Array<MapData, VipSlot>; 2],
    vip_shadow: [Vec<VipSlot>; 2],
    /// The VIPs last set, and the mirror group's VIP with whether this node is its primary.
    vips: Vec<Vip>,
    mirror: Option<(IpAddr, bool)>,
    tables: [Array<MapData, BucketEntry>; 2],
    /// The tables' memory, mapped (written directly; `None` where mmap failed: then through
    /// the map update call, entry by entry).
    mapped: [Option<MappedTable>; 2],
    /// What each table holds, so that an update writes only the entries that change.
    shadow: [Vec<BucketEntry>; 2],
    counters: BucketCounterReader,
    stats: PerCpuArray<MapData, u64>,
    /// Members' heartbeat addresses (see `set_heartbeat_filter`).
    hb_peers: BpfHashMap<MapData, [u8; 16], u8>,
    links: Vec<PinnedLink>,
    /// Where each link is pinned.
    pins: Vec<PathBuf>,
    /// Attach mode in use ("driver" or "generic"), once attached.
    pub xdp_mode: Option<&'static str>,
}

impl Dataplane {
    /// Loads the object and its programs into the kernel (the verifier runs here).
    pub fn load() -> Result<Self, DataplaneError> {
        Self::load_with(None)
    }

    /// Loads the programs over the maps a previous farmd pinned in `maps_dir` (an in-place
    /// upgrade, same map layout): the tables, counters and control word go on as they are, and
    /// what this side keeps of them (which table is live, what each holds) is read back.
    pub fn adopt(maps_dir: &Path) -> Result<Self, DataplaneError> {
        for name in farm_common::MAPS {
            let path = maps_dir.join(name);
            if !path.exists() {
                // The loader would make a new, empty map: a node serving nothing.
                return Err(DataplaneError::Io {
                    what: format!("adopting map {name}"),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{} is not pinned", path.display()),
                    ),
                });
            }
        }
        let mut dp = Self::load_with(Some(maps_dir))?;
        let value = {
            let w = dp
                .control
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            w.map.get(&0, 0).map_err(map_err(MAP_CONTROL))?
        };
        dp.control
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .value = value;
        for t in 0..2 {
            for b in 0..BUCKETS {
                dp.shadow[t][b as usize] =
                    dp.tables[t].get(&b, 0).map_err(map_err(MAP_BUCKETS_0))?;
            }
            for s in 0..VIP_SLOTS {
                dp.vip_shadow[t][s as usize] =
                    dp.vip_tables[t].get(&s, 0).map_err(map_err(MAP_VIPS_0))?;
            }
        }
        Ok(dp)
    }

    /// Pins every map under `dir` by name, for the farmd that takes over (see `adopt`).
    pub fn pin_maps(&self, dir: &Path) -> Result<(), DataplaneError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| DataplaneError::Io {
                what: format!("creating {}", dir.display()),
                source,
            })?;
        let control = self
            .control
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let maps: [(&str, &MapData); 8] = [
            (MAP_CONTROL, control.map.map()),
            (MAP_VIPS_0, self.vip_tables[0].map()),
            (MAP_VIPS_1, self.vip_tables[1].map()),
            (MAP_BUCKETS_0, self.tables[0].map()),
            (MAP_BUCKETS_1, self.tables[1].map()),
            (MAP_BUCKET_COUNTERS, self.counters.0.map()),
            (MAP_STATS, self.stats.map()),
            (MAP_HB_PEERS, self.hb_peers.map()),
        ];
        for (name, map) in maps {
            let path = dir.join(name);
            let _ = std::fs::remove_file(&path);
            map.pin(&path)
                .map_err(|source| DataplaneError::Pin { path, source })?;
        }
        Ok(())
    }

    /// Moves the pinned links in `pin_dir` (a previous farmd's) to this side's programs, each
    /// in one `BPF_LINK_UPDATE`: the interface is never without a program, the link (and its
    /// id) stays, only the program behind it changes. Returns the XDP link's id.
    pub fn take_over_links(
        &mut self,
        pin_dir: &Path,
        xdp_mode: &'static str,
    ) -> Result<u32, DataplaneError> {
        use aya::programs::{tc::SchedClassifierLink, xdp::XdpLink};
        let open = |path: &Path| -> Result<FdLink, DataplaneError> {
            Ok(FdLink::from(PinnedLink::from_pin(path)?))
        };
        let xdp_path = pin_dir.join("xdp_link");
        let link = XdpLink::try_from(open(&xdp_path)?)?;
        let xdp = self.xdp_program();
        let id = xdp.attach_to_link(link).map_err(prog_err(PROG_XDP))?;
        // The program's own handle is closed; the pin (re-opened) is what this farmd keeps.
        drop(xdp.take_link(id).map_err(prog_err(PROG_XDP))?);
        let link_id = open(&xdp_path)?.info()?.id();
        self.links.push(PinnedLink::from_pin(&xdp_path)?);
        self.pins.push(xdp_path);
        for name in [PROG_EGRESS, PROG_INGRESS] {
            let path = pin_dir.join(format!("{name}_link"));
            if !path.exists() {
                // A kernel without tc links: attached by netlink, not pinned (see attach_tc).
                continue;
            }
            let link = SchedClassifierLink::try_from(open(&path)?)?;
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .expect("loaded in Dataplane::load");
            let id = prog.attach_to_link(link).map_err(prog_err(name))?;
            drop(prog.take_link(id).map_err(prog_err(name))?);
            self.links.push(PinnedLink::from_pin(&path)?);
            self.pins.push(path);
        }
        self.xdp_mode = Some(xdp_mode);
        Ok(link_id)
    }

    /// Moves this farmd's own pinned links back to its programs (an upgrade that failed after
    /// the new farmd may have moved them).
    pub fn relink(&mut self, pin_dir: &Path) -> Result<u32, DataplaneError> {
        let mode = self.xdp_mode.unwrap_or("generic");
        // Dropping a pinned link's handle leaves the pin, and the link, in place.
        self.links.clear();
        self.pins.clear();
        self.take_over_links(pin_dir, mode)
    }

    /// The pinned XDP link's id (what stays the same across an in-place upgrade).
    pub fn xdp_link_id(&self) -> Option<u32> {
        let path = self.pins.iter().find(|p| p.ends_with("xdp_link"))?;
        FdLink::from(PinnedLink::from_pin(path).ok()?)
            .info()
            .ok()
            .map(|i| i.id())
    }

    fn load_with(pinned: Option<&Path>) -> Result<Self, DataplaneError> {
        raise_memlock();
        let paths: Vec<(&str, PathBuf)> = pinned
            .map(|dir| {
                farm_common::MAPS
                    .iter()
                    .map(|n| (*n, dir.join(n)))
                    .collect()
            })
            .unwrap_or_default();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for name in [PROG_XDP, PROG_EMPTY, PROG_TX] {
            let p: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::Missing(name))?
                .try_into()
                .map_err(prog_err(name))?;
            p.load().map_err(prog_err(name))?;
        }
        for name in [PROG_EGRESS, PROG_INGRESS] {
            let p: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::Missing(name))?
                .try_into()
                .map_err(prog_err(name))?;
            p.load().map_err(prog_err(name))?;
        }

        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(DataplaneError::Missing(name));
        let control_map = Array::try_from(take(MAP_CONTROL)?).map_err(map_err(MAP_CONTROL))?;
        let v0 = Array::try_from(take(MAP_VIPS_0)?).map_err(map_err(MAP_VIPS_0))?;
        let v1 = Array::try_from(take(MAP_VIPS_1)?).map_err(map_err(MAP_VIPS_1))?;
        let t0 = Array::try_from(take(MAP_BUCKETS_0)?).map_err(map_err(MAP_BUCKETS_0))?;
        let t1 = Array::try_from(take(MAP_BUCKETS_1)?).map_err(map_err(MAP_BUCKETS_1))?;
        let mapped = [
            MappedTable::new(t0.map().fd()),
            MappedTable::new(t1.map().fd()),
        ];
        if mapped.iter().any(Option::is_none) {
            tracing::warn!(
                "cannot mmap the bucket tables (kernel older than 5.5?): updates go entry by \
                 entry, which makes a failover ~60 ms slower"
            );
        }
        let counters = PerCpuArray::try_from(take(MAP_BUCKET_COUNTERS)?)
            .map_err(map_err(MAP_BUCKET_COUNTERS))?;
        let stats = PerCpuArray::try_from(take(MAP_STATS)?).map_err(map_err(MAP_STATS))?;
        let hb_peers = BpfHashMap::try_from(take(MAP_HB_PEERS)?).map_err(map_err(MAP_HB_PEERS))?;
        let zero = vec![BucketEntry::default(); BUCKETS as usize];
        Ok(Self {
            ebpf,
            control: Deadman(std::sync::Arc::new(std::sync::Mutex::new(ControlWord {
                map: control_map,
                value: Control::default(),
            }))),
            vip_tables: [v0, v1],
            vip_shadow: [
                vec![VipSlot::default(); VIP_SLOTS as usize],
                vec![VipSlot::default(); VIP_SLOTS as usize],
            ],
            vips: Vec::new(),
            mirror: None,
            tables: [t0, t1],
            mapped,
            shadow: [zero.clone(), zero],
            counters: BucketCounterReader(std::sync::Arc::new(counters)),
            stats,
            hb_peers,
            links: Vec::new(),
            pins: Vec::new(),
            xdp_mode: None,
        })
    }

    /// The XDP program (for BPF_PROG_TEST_RUN in tests and benchmarks).
    pub fn xdp_program(&mut self) -> &mut Xdp {
        self.program(PROG_XDP)
    }

    /// The empty XDP program (XDP_PASS): the benchmark floor and the test switch's program.
    pub fn empty_program(&mut self) -> &mut Xdp {
        self.program(PROG_EMPTY)
    }

    /// The XDP_TX program (the benchmark's frame generator).
    pub fn tx_program(&mut self) -> &mut Xdp {
        self.program(PROG_TX)
    }

    fn program(&mut self, name: &str) -> &mut Xdp {
        self.ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in Dataplane::load")
    }

    /// Sets what the data plane needs besides buckets. The dead-man switch stays as it was.
    pub fn set_identity(
        &mut self,
        hash_key: farm_common::HashKey,
        if_mac: [u8; 6],
        cluster_mac: [u8; 6],
    ) -> Result<(), DataplaneError> {
        self.control.update(|c| {
            c.hash_key = hash_key.to_bytes();
            c.if_mac = if_mac;
            c.cluster_mac = cluster_mac;
        })
    }

    /// Sets `Control::flags` (`farm_common::control_flags`).
    pub fn set_control_flags(&mut self, flags: u8) -> Result<(), DataplaneError> {
        self.control.update(|c| c.flags = flags)
    }

    /// Drops datagrams to the heartbeat `port` (not for a VIP) from any address but `peers`,
    /// every member's heartbeat addresses, in the data plane: a flood from elsewhere never
    /// reaches farmd's heartbeat socket. The addresses go in before the port, so no genuine
    /// heartbeat is dropped on the way; port 0 turns the filter off.
    pub fn set_heartbeat_filter(
        &mut self,
        port: u16,
        peers: &[IpAddr],
    ) -> Result<(), DataplaneError> {
        let want: std::collections::BTreeSet<[u8; 16]> =
            peers.iter().map(|a| vip_key(*a).addr).collect();
        let stale: Vec<[u8; 16]> = self
            .hb_peers
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.contains(k))
            .collect();
        for k in &want {
            self.hb_peers
                .insert(k, 1, 0)
                .map_err(map_err(MAP_HB_PEERS))?;
        }
        self.control.update(|c| c.hb_port = port.to_be_bytes())?;
        for k in &stale {
            self.hb_peers.remove(k).map_err(map_err(MAP_HB_PEERS))?;
        }
        Ok(())
    }

    /// Replaces the VIP table: the idle table is filled (each VIP in a slot of its own) and then
    /// made live in one write, like the bucket tables.
    pub fn set_vips(&mut self, vips: &[Vip]) -> Result<(), DataplaneError> {
        self.vips = vips.to_vec();
        let keys: Vec<[u8; 16]> = vips.iter().map(|v| vip_key(v.address).addr).collect();
        let mult = vip_multiplier(&keys);
        let mut table = vec![VipSlot::default(); VIP_SLOTS as usize];
        for (i, v) in vips.iter().enumerate() {
            let slot = &mut table[vip_slot(&keys[i], mult) as usize];
            *slot = VipSlot {
                addr: keys[i],
                info: vip_info(i, v, self.mirror),
                used: 1,
                _reserved: [0; 7],
            };
        }
        let idle = (self.control().vip_table ^ 1) as usize;
        let name = if idle == 0 { MAP_VIPS_0 } else { MAP_VIPS_1 };
        for (s, slot) in table.iter().enumerate() {
            if self.vip_shadow[idle][s] != *slot {
                self.vip_tables[idle]
                    .set(s as u32, slot, 0)
                    .map_err(map_err(name))?;
                self.vip_shadow[idle][s] = *slot;
            }
        }
        self.control.update(|c| {
            c.vip_table = idle as u8;
            c.vip_mult = mult;
        })
    }

    /// Whether this node takes the whole of the mirror group's VIP (`primary`) or none of it.
    pub fn set_mirror(&mut self, vip: IpAddr, primary: bool) -> Result<(), DataplaneError> {
        if self.mirror == Some((vip, primary)) {
            return Ok(());
        }
        self.mirror = Some((vip, primary));
        let vips = std::mem::take(&mut self.vips);
        self.set_vips(&vips)
    }

    /// Makes `entries` the live bucket table: the idle table is brought up to date (only the
    /// entries that differ are written), then the program is switched to it in one write, so a
    /// packet sees either the old map or the new one, never a mix.
    pub fn set_buckets(&mut self, entries: &[BucketEntry]) -> Result<usize, DataplaneError> {
        self.set_buckets_and_masks(entries, 0, 0)
    }

    /// Writes the idle bucket table, then makes it live together with the handover masks in
    /// one write of the control word (a new table never meets an old move's masks).
    pub fn set_buckets_and_masks(
        &mut self,
        entries: &[BucketEntry],
        givers_ready: u64,
        givers_done: u64,
    ) -> Result<usize, DataplaneError> {
        assert_eq!(entries.len(), BUCKETS as usize);
        let idle = (self.control().active_table ^ 1) as usize;
        let name = if idle == 0 {
            MAP_BUCKETS_0
        } else {
            MAP_BUCKETS_1
        };
        let mut written = 0;
        for (b, e) in entries.iter().enumerate() {
            if self.shadow[idle][b] != *e {
                match &mut self.mapped[idle] {
                    Some(m) => m.set(b, *e),
                    None => self.tables[idle]
                        .set(b as u32, e, 0)
                        .map_err(map_err(name))?,
                }
                self.shadow[idle][b] = *e;
                written += 1;
            }
        }
        self.control.update(|c| {
            c.active_table = idle as u32;
            c.givers_ready = givers_ready;
            c.givers_done = givers_done;
        })?;
        Ok(written)
    }

    /// Updates the handover masks of the live table (one write; none when unchanged). Returns
    /// whether they changed.
    pub fn set_handover_masks(
        &mut self,
        givers_ready: u64,
        givers_done: u64,
    ) -> Result<bool, DataplaneError> {
        let c = self.control();
        if (c.givers_ready, c.givers_done) == (givers_ready, givers_done) {
            return Ok(false);
        }
        self.control.update(|c| {
            c.givers_ready = givers_ready;
            c.givers_done = givers_done;
        })?;
        Ok(true)
    }

    /// The live bucket table.
    pub fn buckets(&self) -> &[BucketEntry] {
        &self.shadow[self.control().active_table as usize]
    }

    /// Refreshes the dead-man deadline: the node serves for `timeout` from now unless refreshed.
    pub fn arm(&mut self, timeout: Duration) -> Result<(), DataplaneError> {
        self.control.arm(timeout)
    }

    /// Stops serving now (deadline in the past).
    pub fn disarm(&mut self) -> Result<(), DataplaneError> {
        self.control.disarm()
    }

    /// The control word as last written.
    pub fn control(&self) -> Control {
        self.control.get()
    }

    /// A handle on the dead-man deadline for another thread (the heartbeat thread refreshes
    /// it, so that nothing the main loop does can let it lapse while heartbeats flow).
    pub fn deadman(&self) -> Deadman {
        self.control.clone()
    }

    /// Attaches the XDP program (native mode first unless told otherwise) and the egress program,
    /// pinning both links under `pin_dir`.
    pub fn attach(
        &mut self,
        ifname: &str,
        mode: config::XdpMode,
        pin_dir: &Path,
    ) -> Result<(), DataplaneError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(pin_dir)
            .map_err(|source| DataplaneError::Io {
                what: format!("creating {}", pin_dir.display()),
                source,
            })?;
        private_dir(pin_dir)?;
        if let Some(parent) = pin_dir.parent() {
            private_dir(parent)?;
        }
        // Egress first: from the moment the XDP program answers ARP for the VIPs, the kernel's
        // own ARP from a VIP must already carry the cluster MAC.
        self.attach_tc(PROG_EGRESS, ifname, TcAttachType::Egress, pin_dir)?;

        let xdp = self.xdp_program();
        let attempts: &[(XdpMode, &'static str)] = match mode {
            config::XdpMode::Auto => &[(XdpMode::Driver, "driver"), (XdpMode::Skb, "generic")],
            config::XdpMode::Driver => &[(XdpMode::Driver, "driver")],
            config::XdpMode::Generic => &[(XdpMode::Skb, "generic")],
        };
        let mut last = None;
        let mut attached = None;
        for &(m, label) in attempts {
            match xdp.attach(ifname, m) {
                Ok(id) => {
                    attached = Some((id, label));
                    break;
                }
                Err(e) => {
                    if attempts.len() > 1 {
                        tracing::warn!(
                            "XDP {label} mode is not available on {ifname} ({e}); falling back \
                             to generic mode, which is slower"
                        );
                    }
                    last = Some(e);
                }
            }
        }
        let Some((id, label)) = attached else {
            return Err(prog_err(PROG_XDP)(last.expect("at least one attempt")));
        };
        let link = xdp.take_link(id).map_err(prog_err(PROG_XDP))?;
        let fd = FdLink::try_from(link)?;
        let path = pin_dir.join("xdp_link");
        self.links
            .push(fd.pin(&path).map_err(|source| DataplaneError::Pin {
                path: path.clone(),
                source,
            })?);
        self.pins.push(path);
        self.xdp_mode = Some(label);
        // In every mode: it sends back the ARP/NDP answers XDP passes up (VLAN tags in
        // metadata), and fixes the packet type of accepted frames where drivers keep a stale one.
        self.attach_tc(PROG_INGRESS, ifname, TcAttachType::Ingress, pin_dir)?;
        Ok(())
    }

    /// Attaches one of the tc programs and pins its link as `<pin_dir>/<name>_link`.
    fn attach_tc(
        &mut self,
        name: &'static str,
        ifname: &str,
        direction: TcAttachType,
        pin_dir: &Path,
    ) -> Result<(), DataplaneError> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in Dataplane::load");
        let id = match prog.attach(ifname, direction) {
            Ok(id) => id,
            Err(_) => {
                // Kernels without tcx need a clsact qdisc first.
                let _ = tc::qdisc_add_clsact(ifname);
                prog.attach(ifname, direction).map_err(prog_err(name))?
            }
        };
        let link = prog.take_link(id).map_err(prog_err(name))?;
        match FdLink::try_from(link) {
            Ok(fd) => {
                let path = pin_dir.join(format!("{name}_link"));
                self.links
                    .push(fd.pin(&path).map_err(|source| DataplaneError::Pin {
                        path: path.clone(),
                        source,
                    })?);
                self.pins.push(path);
            }
            Err(_) => tracing::warn!(
                "this kernel attaches tc programs without links: {name} will be detached if \
                 farmd dies"
            ),
        }
        Ok(())
    }

    /// Detaches both programs (removing their pins).
    pub fn detach(&mut self) -> Result<(), DataplaneError> {
        let mut first_err = None;
        for link in self.links.drain(..).rev() {
            // A pin already gone (bpffs unmounted under farmd) is no error: dropping the link
            // detaches the program all the same.
            if let Err(source) = link.unpin()
                && source.kind() != std::io::ErrorKind::NotFound
            {
                first_err.get_or_insert(DataplaneError::Io {
                    what: "unpinning a link".into(),
                    source,
                });
            }
        }
        self.xdp_mode = None;
        self.pins.clear();
        first_err.map_or(Ok(()), Err)
    }

    /// The kernel's id of the loaded XDP program (what `ip link` shows as `prog/xdp id N`).
    pub fn xdp_program_id(&mut self) -> Option<u32> {
        self.xdp_program().info().ok().map(|i| i.id())
    }

    /// The pins (of attached links) that are no longer on the bpf filesystem: someone removed
    /// them or unmounted it. The links still hold while farmd runs; a crash would lose them.
    pub fn missing_pins(&self) -> Vec<PathBuf> {
        self.pins.iter().filter(|p| !p.exists()).cloned().collect()
    }

    /// Counters of one bucket, summed over CPUs.
    pub fn bucket_counter(&self, b: u32) -> Result<BucketCounters, DataplaneError> {
        self.counters.bucket(b)
    }

    /// A reader of the per-bucket counters for another thread: reading all 65536 of them
    /// takes tens of milliseconds, which the main loop must not spend.
    pub fn counter_reader(&self) -> BucketCounterReader {
        self.counters.clone()
    }

    /// The data plane's event and error counters, by name, summed over CPUs.
    pub fn stats(&self) -> Result<BTreeMap<&'static str, u64>, DataplaneError> {
        let mut out = BTreeMap::new();
        for (i, name) in stat::NAMES.iter().enumerate() {
            if name.is_empty() {
                continue;
            }
            let v = self.stats.get(&(i as u32), 0).map_err(map_err(MAP_STATS))?;
            out.insert(*name, v.iter().sum());
        }
        Ok(out)
    }
}

/// Removes links a previous farmd left pinned in `pin_dir` (it was killed): this detaches its
/// programs. Returns how many were removed.
pub fn remove_stale_pins(pin_dir: &Path) -> Result<usize, DataplaneError> {
    let mut n = 0;
    for name in [
        "xdp_link".to_string(),
        format!("{PROG_EGRESS}_link"),
        format!("{PROG_INGRESS}_link"),
    ] {
        let path = pin_dir.join(&name);
        if path.exists() {
            let link = PinnedLink::from_pin(&path)?;
            link.unpin().map_err(|source| DataplaneError::Io {
                what: format!("removing {}", path.display()),
                source,
            })?;
            n += 1;
        }
    }
    Ok(n)
}

/// Where farmd pins its links, and how that was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bpffs {
    /// A bpf filesystem was there already.
    Found,
    /// None was there; farmd mounted one, in the mount namespace PID 1 uses (it outlives farmd).
    Mounted,
}

/// Makes sure `path` is a bpf filesystem whose pins outlive farmd. One is mounted there only
/// when farmd shares PID 1's mount namespace; in a mount namespace of its own (`ip netns exec`,
/// a systemd unit with `ProtectSystem=` and friends) a mount would vanish with farmd, taking the
/// pinned programs along, so farmd refuses and says how to run it instead.
pub fn ensure_bpffs(path: &Path) -> Result<Bpffs, DataplaneError> {
    if crate::mountns::fs_type(path) == Some(BPF_FS_MAGIC) {
        return Ok(Bpffs::Found);
    }
    if crate::mountns::in_init_mount_namespace() != Some(true) {
        return Err(DataplaneError::PrivateBpffs { path: path.into() });
    }
    std::fs::create_dir_all(path).map_err(|source| DataplaneError::Bpffs {
        path: path.into(),
        source,
    })?;
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
    // SAFETY: constant C strings and a valid target path.
    let rc = unsafe {
        // As systemd mounts it: only root may look inside.
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(DataplaneError::Bpffs {
            path: path.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(Bpffs::Mounted)
}

/// Refuses a pin directory someone else could replace farmd's links in: owned by another user
/// than root, or writable by group or others.
fn private_dir(dir: &Path) -> Result<(), DataplaneError> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::symlink_metadata(dir).map_err(|source| DataplaneError::Io {
        what: format!("reading {}", dir.display()),
        source,
    })?;
    if !m.is_dir()
        || !crate::trust::trusted_uid(m.uid())
        || crate::trust::others_may_write(m.mode())
    {
        return Err(DataplaneError::Io {
            what: format!(
                "using {} for pins (owned by uid {}, mode {:o}; it must be a directory only root \
                 writes)",
                dir.display(),
                m.uid(),
                m.mode() & 0o7777
            ),
            source: std::io::Error::from_raw_os_error(libc::EPERM),
        });
    }
    Ok(())
}

/// A multiplier that gives every VIP a slot of its own (deterministic: the first that works in
/// a fixed sequence of odd numbers). With at most 64 VIPs in 1024 slots a few tries suffice.
pub fn vip_multiplier(keys: &[[u8; 16]]) -> u32 {
    let mut mult: u32 = 0x9e37_79b1;
    loop {
        let mut seen = std::collections::HashSet::new();
        if keys.iter().all(|k| seen.insert(vip_slot(k, mult))) {
            return mult;
        }
        mult = mult.wrapping_add(0x6d2b_79f6) | 1;
    }
}

pub fn vip_key(a: IpAddr) -> VipKey {
    match a {
        IpAddr::V4(v4) => VipKey::v4(v4.octets()),
        IpAddr::V6(v6) => VipKey::v6(v6.octets()),
    }
}

fn vip_info(index: usize, v: &Vip, mirror: Option<(IpAddr, bool)>) -> VipInfo {
    let mut info = VipInfo {
        index: index as u8,
        nrules: v.rules.len() as u8,
        mirror: match mirror {
            Some((a, primary)) if a == v.address => {
                if primary {
                    farm_common::mirror::PRIMARY
                } else {
                    farm_common::mirror::NOT_PRIMARY
                }
            }
            _ => farm_common::mirror::FARM,
        },
        ..Default::default()
    };
    for (slot, r) in info.rules.iter_mut().zip(&v.rules) {
        *slot = PortRule::new(r.protocols, r.port_lo, r.port_hi, r.affinity);
    }
    info
}

fn raise_memlock() {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid rlimit. Kernels >= 5.11 account BPF memory to the cgroup and ignore this.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_multiplier_separates_every_vip() {
        // 64 VIPs from one /26 and 64 spread ones, IPv4 and IPv6.
        let mut sets: Vec<Vec<[u8; 16]>> = Vec::new();
        sets.push((0..64u8).map(|i| VipKey::v4([10, 0, 0, i]).addr).collect());
        sets.push(
            (0..64u16)
                .map(|i| {
                    let a: std::net::Ipv6Addr = format!("2001:db8::{i:x}").parse().unwrap();
                    VipKey::v6(a.octets()).addr
                })
                .collect(),
        );
        sets.push(
            (0..64u32)
                .map(|i| VipKey::v4((i.wrapping_mul(2654435761)).to_be_bytes()).addr)
                .collect(),
        );
        for keys in sets {
            let m = vip_multiplier(&keys);
            let slots: std::collections::HashSet<u32> =
                keys.iter().map(|k| vip_slot(k, m)).collect();
            assert_eq!(slots.len(), keys.len());
            assert!(slots.iter().all(|&s| s < VIP_SLOTS));
        }
    }
}
