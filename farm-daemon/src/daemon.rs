//! farmd's life: set the host up (in an order that never lets the kernel answer for a VIP with
//! its own MAC), serve, and undo every change in reverse order on SIGTERM/SIGINT or on a failed
//! start.

use std::{
    fs::File,
    net::IpAddr,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _, unix::fs::PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use farm_common::{BUCKETS, BucketKey, HashKey, bucket_of};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
};

use crate::{
    announce::{AnnounceError, Announcer},
    assign, checks,
    cluster::{Cluster, ClusterError},
    config::{Config, MacMode, format_mac},
    control::{
        DrillReport, DrillStage, HeartbeatStatus, MemberStatus, NetworkStatus, Placement,
        ReloadReport, Request, Response, ShareChange, Status, Traffic, VipStatus, WhoisEntry,
        WitnessStatus, parse_client,
    },
    dataplane::{self, Dataplane, DataplaneError},
    drill::{self, Probe, ProbeClient},
    heartbeat::State,
    hooks::Hooks,
    membership::config_digest,
    netlink::{LinkFacts, Netlink, NetlinkError},
    node::{Action, Node, NodeConfig, Planned},
    reload,
    secret::{Secret, SecretError},
    ticker::Ticker,
};

mod inplace;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Upgrade(crate::upgrade::UpgradeError),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Announce(#[from] AnnounceError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Ticker(#[from] crate::ticker::TickerError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "another farmd is already running on interface {interface} in this network namespace \
         (it holds {lock}); stop it first"
    )]
    AlreadyRunning { interface: String, lock: PathBuf },
    #[error(
        "another farmd answers on the control socket {0}; stop it or give this one another \
         control.socket"
    )]
    SocketInUse(PathBuf),
    #[error(
        "the control socket's directory {} is owned by uid {uid} or writable by others (mode \
         {mode:o}): someone else could replace the socket; use a directory only root writes \
         (control.socket, default /run/farm/farmd.sock)",
        dir.display()
    )]
    UnsafeSocketDir { dir: PathBuf, uid: u32, mode: u32 },
    #[error(
        "interface {interface} already has an XDP program (id {id}, {mode} mode) that farmd did \
         not attach; remove it (`ip link set dev {interface} xdp off`) or use another interface"
    )]
    ForeignXdp {
        interface: String,
        id: u32,
        mode: String,
    },
    #[error("interface {0} is down: bring it up first (`ip link set dev {0} up`)")]
    InterfaceDown(String),
    #[error("mirror group: {0}")]
    Mirror(#[from] crate::mirror::MirrorError),
    #[error(transparent)]
    Sysctl(#[from] crate::sysctl::SysctlError),
    #[error(
        "dataplane.vip_device {name:?}: {reason}; the VIPs go on it (the default \"lo\" always \
         exists)"
    )]
    VipDevice { name: String, reason: String },
    #[error(
        "the XDP program is no longer attached to {interface} ({how}): this member is silent on \
         the VIPs and leaves the farm so that its peers serve its clients; start farmd again to \
         rejoin (under systemd, Restart=on-failure does)"
    )]
    DataplaneLost { interface: String, how: String },
}

/// Control requests from client tasks to the main loop, each with where to send the answer.
type ControlQueue = tokio::sync::mpsc::Sender<(Request, tokio::sync::oneshot::Sender<Response>)>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// A change made to the host, and how to take it back.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum Undo {
    Socket(PathBuf),
    MacFilter(u32, [u8; 6]),
    Programs(PathBuf),
    Vip(u32, IpAddr),
    Sysctls(crate::sysctl::Sysctls),
}

/// The running daemon.
pub struct Daemon {
    cfg: Config,
    hash_key: HashKey,
    cluster_mac: [u8; 6],
    link: LinkFacts,
    dp: Dataplane,
    started: Instant,
    netlink: Netlink,
    undo: Vec<Undo>,
    _lock: File,
    lock_path: PathBuf,
    cluster: Cluster,
    /// Counts the connections left in buckets handed over (on its own thread).
    accounting: crate::connections::Accounting,
    counted: Option<tokio::sync::mpsc::UnboundedReceiver<crate::connections::Counted>>,
    /// This member's lifecycle rules (no I/O).
    node: Node,
    /// The node core asked to leave.
    leave: bool,
    hooks: Hooks,
    /// The metrics endpoint, bound at start (served once running).
    metrics_listener: Option<tokio::net::TcpListener>,
    /// How long the last bucket-map change took from planning to live.
    last_apply: Duration,
    failovers: u64,
    /// (member lost, from its last heartbeat to the new map live here, when).
    last_failover: Option<(String, Duration, Instant)>,
    /// The recovery drill this node runs, and the last one's result.
    drill: Option<DrillRun>,
    last_drill: Option<DrillReport>,
    /// Recent events for the status page, newest last.
    events: std::collections::VecDeque<crate::control::Event>,
    /// The mirror group this node is a member of, if any.
    mirror: Option<crate::mirror::Group>,
    /// The device the VIPs are on (`dataplane.vip_device`).
    vip_index: u32,
    /// Pins reported missing already (said once, not at every check).
    pins_missing: bool,
    /// The binary this farmd was started from (what `farmctl upgrade` runs by default: the
    /// file at that path now, typically a package's new version).
    exe: PathBuf,
    /// Where the links are pinned.
    pin_dir: PathBuf,
    /// A copy of the metrics listener, for an in-place upgrade to hand over.
    metrics_copy: Option<std::net::TcpListener>,
    /// The pinned XDP link's id and the program behind it (an in-place upgrade keeps the
    /// first and changes the second).
    xdp_ids: (u32, u32),
    /// The farmd this one took over from (an in-place upgrade), if any.
    took_over_from: Option<u32>,
}

/// How often farmd verifies that its XDP program is still attached.
const DATAPLANE_CHECK: Duration = Duration::from_millis(250);

/// Events the status page keeps.
const EVENTS_KEPT: usize = 100;

/// A drill this node runs (see `start_drill`).
struct DrillRun {
    report: DrillReport,
    victim: usize,
    started: Instant,
    probe: ProbeClient,
    probe_mac: [u8; 6],
    phase: DrillPhase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DrillPhase {
    /// Probing until the probe's answers are steady.
    Baseline,
    /// The victim acts as if crashed since then; waiting for the probe to be answered again.
    Crashed(Instant),
    /// The victim rejoins (since then); waiting until it serves again.
    Restoring(Instant),
}

/// What an applied reload asks of the main loop.
#[derive(Debug, Default, Clone, Copy)]
struct Reloaded {
    /// Heartbeat, liveness and dead-man timers are to be made again.
    timers: bool,
    /// The health checks are to be started again.
    checks: bool,
    /// VIPs were added: announce them (three times, a second apart).
    announce: bool,
}

/// (bucket, packets, bytes) of each bucket that saw traffic.
type BucketTraffic = Vec<(u32, u64, u64)>;

type Interval = tokio::time::Interval;

/// The main loop's fine tick, ten times per heartbeat interval, polled only while joining or in
/// a drill (`Node::wants_tick`). Heartbeats themselves, liveness and the dead-man switch are the
/// heartbeat thread's (see `cluster`); the lifecycle step once per interval rides on its
/// updates (see the loop).
fn fine_timer(cfg: &Config) -> Interval {
    let mut i = tokio::time::interval((cfg.heartbeat.interval / 10).max(Duration::from_millis(2)));
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

/// The identity of this network namespace, so that lock files and pins of farmds in different
/// namespaces (same interface name) do not collide.
fn netns_id() -> Result<u64, DaemonError> {
    Ok(std::fs::metadata("/proc/self/ns/net")
        .map_err(io("reading /proc/self/ns/net"))?
        .ino())
}

fn take_lock(path: &Path, interface: &str) -> Result<File, DaemonError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    // Never through a symlink (someone could point it at a file farmd would then truncate).
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io(format!("opening lock file {}", path.display())))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(DaemonError::AlreadyRunning {
            interface: interface.into(),
            lock: path.into(),
        });
    }
    let _ = f.set_len(0);
    let _ = std::io::Write::write_all(&mut &f, format!("{}\n", std::process::id()).as_bytes());
    Ok(f)
}

fn bind_socket(path: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        safe_parent(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::SocketInUse(path.into()));
        }
        std::fs::remove_file(path).map_err(io(format!("removing stale {}", path.display())))?;
    }
    // Created 0600 (no moment where others could connect), and made sure of afterwards.
    // SAFETY: umask has no memory-safety preconditions; nothing else creates files while
    // farmd sets up.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = bound.map_err(io(format!("binding {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("restricting {}", path.display())))?;
    Ok(l)
}

/// The longest control request accepted (a request is one JSON line of a few hundred bytes).
const MAX_REQUEST: u64 = 64 * 1024;

/// Refuses a directory for the control socket that someone else could replace it in: owned by
/// another user than farmd's, or writable by group or others without the sticky bit.
fn safe_parent(dir: &Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(dir).map_err(io(format!("reading {}", dir.display())))?;
    let shared = crate::trust::others_may_write(m.mode()) && m.mode() & 0o1000 == 0;
    if !crate::trust::trusted_uid(m.uid()) || shared {
        return Err(DaemonError::UnsafeSocketDir {
            dir: dir.into(),
            uid: m.uid(),
            mode: m.mode() & 0o7777,
        });
    }
    Ok(())
}

/// Whether a control client may give orders: root or farmd's own user (the socket is 0600;
/// this holds also where the file's mode was changed).
fn client_allowed(stream: &UnixStream) -> Result<(), String> {
    match stream.peer_cred() {
        Ok(c) if crate::trust::trusted_uid(c.uid()) => Ok(()),
        Ok(c) => Err(format!(
            "control requests are for root or farmd's user; this client runs as uid {}",
            c.uid()
        )),
        Err(e) => Err(format!("cannot tell who the client is: {e}")),
    }
}

/// The node core's settings from the configuration.
fn node_config(cfg: &Config, hash_key: HashKey) -> NodeConfig {
    NodeConfig {
        me: cfg.me,
        members: cfg
            .members
            .iter()
            .map(|m| (m.id.clone(), m.weight))
            .collect(),
        networks: cfg.me().heartbeat_addrs.len(),
        loss_window: cfg.heartbeat.loss_window(),
        has_witness: cfg.witness.is_some(),
        seed: hash_key,
        vips: cfg.vips.clone(),
        drain_timeout: cfg.drain_timeout,
        udp_idle: cfg.udp_idle,
        stop_drain_timeout: cfg.stop_drain_timeout,
        drill_timeout: cfg.drill.timeout,
        checks: cfg.checks.clone(),
        max_health_moves_per_minute: cfg.max_health_moves_per_minute,
    }
}

/// Where farmd pins its links: one directory per network namespace and interface.
fn pin_dir(cfg: &Config, ns: u64) -> PathBuf {
    cfg.bpffs
        .join("farm")
        .join(format!("{ns}-{}", cfg.interface))
}

/// A second descriptor of a listening socket (the first stays with its tokio listener).
fn copy_listener(l: &tokio::net::TcpListener) -> std::io::Result<std::net::TcpListener> {
    use std::os::fd::AsFd as _;
    Ok(std::net::TcpListener::from(l.as_fd().try_clone_to_owned()?))
}

/// How the serving loop ended.
enum Ended {
    /// Stopped (SIGTERM, SIGINT, or an error): the host is restored.
    Stopped,
    /// A new farmd took over (in-place upgrade): the host stays as it is, for it.
    HandedOver { pid: u32 },
}

impl Daemon {
    /// Sets the host up. On failure everything done so far is undone before returning.
    pub async fn start(cfg: Config) -> Result<(Self, UnixListener), DaemonError> {
        let secret = Secret::load(&cfg.secret_file)?;
        let hash_key = secret.hash_key();
        let cluster_mac = cfg
            .cluster_mac
            .unwrap_or_else(|| secret.cluster_mac(cfg.mac_mode));
        let message_key = secret.message_key();
        // A mirror group with a key of its own: only its two members hold it (see
        // `mirror.secret_file`); the others never read it.
        let group_key = cfg
            .mirror
            .as_ref()
            .filter(|m| m.members.contains(&cfg.me))
            .and_then(|m| m.secret_file.as_ref());
        let mirror_key = match group_key {
            Some(path) => Secret::load(path)?.mirror_key(),
            None => secret.mirror_key(),
        };
        drop(secret);

        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(io(format!("creating {}", cfg.state_dir.display())))?;
        let ns = netns_id()?;
        let lock_path = cfg
            .state_dir
            .join(format!("farmd-{ns}-{}.lock", cfg.interface));
        let lock = take_lock(&lock_path, &cfg.interface)?;
        // Heartbeat sockets next: an address that is not this host's fails here, before the
        // host is touched.
        let cluster = Cluster::bind(&cfg, message_key)?;
        let (counted_tx, counted) = tokio::sync::mpsc::unbounded_channel();
        let accounting = crate::connections::Accounting::start(hash_key, counted_tx)
            .map_err(io("starting the accounting thread"))?;
        let metrics_listener =
            match cfg.metrics {
                Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                    DaemonError::Io {
                        what: format!("binding the metrics endpoint {addr} (metrics.listen)"),
                        source: e,
                    }
                })?),
                None => None,
            };
        let metrics_copy = metrics_listener
            .as_ref()
            .map(copy_listener)
            .transpose()
            .map_err(io("copying the metrics listener"))?;
        let node = Node::new(node_config(&cfg, hash_key), Instant::now());

        let netlink = Netlink::connect()?;
        let link = netlink.link(&cfg.interface).await?;
        if !link.up {
            return Err(DaemonError::InterfaceDown(cfg.interface.clone()));
        }

        let pin_dir = pin_dir(&cfg, ns);
        if dataplane::ensure_bpffs(&cfg.bpffs)? == dataplane::Bpffs::Mounted {
            tracing::info!(
                "mounted a bpf filesystem at {} (there was none; it is the host's and outlives \
                 farmd)",
                cfg.bpffs.display()
            );
        }
        let vip_device = match netlink.link(&cfg.vip_device).await {
            Ok(l) if l.up => l,
            Ok(_) => {
                return Err(DaemonError::VipDevice {
                    name: cfg.vip_device.clone(),
                    reason: format!("is down (`ip link set dev {} up`)", cfg.vip_device),
                });
            }
            Err(NetlinkError::NoSuchInterface(_)) => {
                return Err(DaemonError::VipDevice {
                    name: cfg.vip_device.clone(),
                    reason: "does not exist".into(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        let stale = dataplane::remove_stale_pins(&pin_dir)?;
        if stale > 0 {
            tracing::warn!(
                "removed the XDP/egress programs a previous farmd left on {} (it did not exit \
                 cleanly)",
                cfg.interface
            );
        }
        let link = netlink.link(&cfg.interface).await?;
        if let Some((mode, id)) = &link.xdp {
            return Err(DaemonError::ForeignXdp {
                interface: cfg.interface.clone(),
                id: *id,
                mode: mode.clone(),
            });
        }

        let mut dp = Dataplane::load()?;
        dp.set_identity(hash_key, link.mac, cluster_mac)?;
        let heartbeat_sources: Vec<IpAddr> = cfg
            .members
            .iter()
            .flat_map(|m| m.heartbeat_addrs.iter().copied())
            .collect();
        dp.set_heartbeat_filter(cfg.heartbeat.port, &heartbeat_sources)?;
        dp.set_vips(&cfg.vips)?;
        if let Some(m) = &cfg.mirror {
            // Nobody's until this node is the group's primary.
            dp.set_mirror(m.vip, false)?;
        }

        let (hooks, node_id) = (cfg.hooks.clone(), cfg.node_id.clone());
        let mut d = Daemon {
            hash_key,
            cluster_mac,
            link,
            dp,
            started: Instant::now(),
            netlink,
            undo: Vec::new(),
            _lock: lock,
            lock_path,
            cfg,
            cluster,
            accounting,
            counted: Some(counted),
            node,
            leave: false,
            hooks: Hooks::new(hooks, node_id),
            metrics_listener,
            last_apply: Duration::ZERO,
            failovers: 0,
            last_failover: None,
            drill: None,
            last_drill: None,
            events: std::collections::VecDeque::new(),
            mirror: None,
            vip_index: vip_device.index,
            pins_missing: false,
            exe: std::env::current_exe().map_err(io("locating farmd's own binary"))?,
            pin_dir: pin_dir.clone(),
            metrics_copy,
            xdp_ids: (0, 0),
            took_over_from: None,
        };
        // Where the host's values of the fail-silent settings are kept (see `sysctl`).
        let sysctl_saved = d
            .cfg
            .state_dir
            .join(format!("sysctl-{ns}-{}.saved", d.cfg.interface));
        let result = match d.setup(&pin_dir, &sysctl_saved).await {
            Ok(listener) => d.start_mirror(mirror_key).map(|()| listener),
            Err(e) => Err(e),
        };
        match result {
            Ok(listener) => Ok((d, listener)),
            Err(e) => {
                tracing::error!("start failed: {e}; undoing what was set up");
                d.teardown().await;
                Err(e)
            }
        }
    }

    async fn setup(
        &mut self,
        pin_dir: &Path,
        sysctl_saved: &Path,
    ) -> Result<UnixListener, DaemonError> {
        let listener = bind_socket(&self.cfg.socket)?;
        self.undo.push(Undo::Socket(self.cfg.socket.clone()));

        // Joining: nothing is ours until this node has listened to the farm for a loss window.
        self.node.refresh(Instant::now());
        self.act();

        let index = self.link.index;
        match self.netlink.add_mac_filter(index, self.cluster_mac).await {
            Ok(()) => {}
            Err(e) if e.errno() == Some(libc::EEXIST) => tracing::warn!(
                "the cluster MAC was already in {}'s address filter (left by a farmd that did \
                 not exit cleanly?); farmd manages it from now on",
                self.cfg.interface
            ),
            Err(e) => return Err(e.into()),
        }
        self.undo.push(Undo::MacFilter(index, self.cluster_mac));

        // The kernel must never claim a VIP on the farm interface, whatever becomes of the XDP
        // program: set before any VIP is on the host.
        let sysctls = crate::sysctl::Sysctls::apply(
            Path::new("/proc/sys"),
            &self.cfg.interface,
            sysctl_saved,
        )?;
        self.undo.push(Undo::Sysctls(sysctls));

        // Pushed before attaching: a partial attach (egress only) is undone too.
        self.undo.push(Undo::Programs(pin_dir.to_path_buf()));
        self.dp
            .attach(&self.cfg.interface, self.cfg.xdp_mode, pin_dir)?;
        self.xdp_ids = (
            self.dp.xdp_link_id().unwrap_or(0),
            self.dp.xdp_program_id().unwrap_or(0),
        );

        // The data plane answers ARP/NDP for the VIPs from here on, so the addresses can go in,
        // on the VIP device (never the farm interface: see `sysctl`).
        let vip_index = self.vip_index;
        for vip in self.cfg.vips.clone() {
            match self.netlink.add_vip(vip_index, vip.address).await {
                Ok(()) => {}
                Err(e) if e.errno() == Some(libc::EEXIST) => {
                    tracing::warn!(
                        "VIP {} was already on {} (left by a farmd that did not exit cleanly?); \
                         farmd manages it from now on",
                        vip.address,
                        self.cfg.vip_device
                    );
                }
                Err(e) => return Err(e.into()),
            }
            self.undo.push(Undo::Vip(vip_index, vip.address));
        }

        self.dp.arm(self.cfg.deadman_timeout)?;
        Ok(listener)
    }

    /// Brings the data plane to this node's current plan (see `handover`): the table written
    /// only when it changed, the handover masks when they changed. Without quorum this node
    /// takes none. When what this node announces changed (a move applied or handed over), the
    /// peers are told at once rather than at the next heartbeat: each handover switch then
    /// costs one message's latency, not a heartbeat interval.
    /// Joins the mirror group, if this node is one of its members.
    fn start_mirror(&mut self, key: [u8; 32]) -> Result<(), DaemonError> {
        let Some(m) = self.cfg.mirror.clone() else {
            return Ok(());
        };
        if !m.members.contains(&self.cfg.me) {
            tracing::info!(
                "mirror group VIP {}: this node is not a member (the VIP is dropped here)",
                m.vip
            );
            return Ok(());
        }
        let ids: Vec<String> = self.cfg.members.iter().map(|x| x.id.clone()).collect();
        self.mirror = Some(crate::mirror::Group::start(
            m,
            self.cfg.me,
            &ids,
            &self.cfg.state_dir,
            key,
        )?);
        Ok(())
    }

    /// The mirror group's peer as the group sees it.
    fn mirror_view(&self) -> crate::mirror::PeerView {
        self.mirror.as_ref().map_or_else(Default::default, |g| {
            g.view(
                &self.node.membership.peers[g.peer_index()],
                std::time::Instant::now(),
            )
        })
    }

    /// Re-evaluates the mirror group, applies what it decided and announces its state.
    fn mirror_tick(&mut self) {
        let view = self.mirror_view();
        let quorum = self.node.membership.has_quorum();
        let healthy = self.node.health.healthy();
        let Some(g) = self.mirror.as_mut() else {
            return;
        };
        let effects = g.tick(std::time::Instant::now(), view, quorum, healthy);
        self.node.mirror = g.announced();
        self.mirror_effects(effects);
    }

    fn mirror_effects(&mut self, effects: Vec<crate::mirror::Effect>) {
        for e in effects {
            match e {
                crate::mirror::Effect::Vip(primary) => {
                    let vip = self.mirror.as_ref().map(|g| g.cfg.vip);
                    if let Some(vip) = vip
                        && let Err(e) = self.dp.set_mirror(vip, primary)
                    {
                        tracing::error!("mirror: setting the VIP {vip} in the data plane: {e}");
                    }
                }
                crate::mirror::Effect::Event(text) => self.event(text),
            }
        }
    }

    fn mirror_request(&mut self, req: &Request) -> Response {
        let view = self.mirror_view();
        let Some(g) = self.mirror.as_mut() else {
            return Response::Error {
                message: "this node is not a member of a mirror group (no [mirror] section \
                          naming it)"
                    .into(),
            };
        };
        match req {
            Request::MirrorStatus => Response::Mirror(Box::new(g.status(view))),
            Request::MirrorSwap => match g.request_swap(view) {
                Ok(message) => {
                    self.event(format!("mirror: {message}"));
                    Response::MirrorDone { message }
                }
                Err(message) => Response::Error { message },
            },
            Request::MirrorPromote { force: false } => Response::Error {
                message: "a forced promotion may lose data the old primary acknowledged: the \
                          request must say force (farmctl mirror promote --force)"
                    .into(),
            },
            Request::MirrorPromote { force: true } => {
                let mut effects = Vec::new();
                let r = g.force_promote(view, &mut effects);
                self.mirror_effects(effects);
                match r {
                    Ok(message) => Response::MirrorDone { message },
                    Err(message) => Response::Error { message },
                }
            }
            _ => Response::Error {
                message: "not a mirror request".into(),
            },
        }
    }

    /// Carries out what the node core decided (see `node::Action`), then publishes what this
    /// member announces.
    fn act(&mut self) {
        while let Some(a) = self.node.poll_action() {
            match a {
                Action::WriteBuckets {
                    entries,
                    ready,
                    done,
                    serving,
                    counts: (mine, incoming, outgoing),
                } => {
                    let t0 = Instant::now();
                    match self.dp.set_buckets_and_masks(&entries, ready, done) {
                        Ok(written) => {
                            self.last_apply = t0.elapsed();
                            tracing::info!(
                                written,
                                live_after_us = self.last_apply.as_micros() as u64,
                                "bucket map: serving [{}]; this node owns {mine}, takes over \
                                 {incoming}, hands over {outgoing}",
                                serving.join(", "),
                            );
                        }
                        Err(e) => tracing::error!("updating the bucket map failed: {e}"),
                    }
                }
                Action::SetMasks { ready, done } => {
                    if let Err(e) = self.dp.set_handover_masks(ready, done) {
                        tracing::error!("updating the handover masks failed: {e}");
                    }
                }
                Action::Announce { send_now } => {
                    self.cluster.publish(self.node.outgoing());
                    if send_now {
                        self.cluster.send_now();
                    }
                }
                Action::Count(req) => {
                    self.accounting.ask(req);
                }
                Action::Hook(e) => {
                    self.hooks.fire(&e);
                }
                Action::Event(text) => {
                    self.event(text);
                }
                Action::Failover { member, silent_for } => {
                    let took = silent_for + self.last_apply;
                    tracing::info!(
                        member = %member,
                        took_ms = took.as_millis() as u64,
                        "failover: from the member's last heartbeat to the new map live here"
                    );
                    self.failovers += 1;
                    self.last_failover = Some((member, took, Instant::now()));
                }
                Action::Crash { .. } => {
                    self.cluster.publish(self.node.outgoing());
                    if let Err(e) = self.dp.disarm() {
                        tracing::error!("drill: stopping the data plane: {e}");
                    }
                }
                Action::Rejoin { .. } => {
                    self.cluster.restart();
                    self.cluster.publish(self.node.outgoing());
                    if let Err(e) = self.dp.arm(self.cfg.deadman_timeout) {
                        tracing::error!("drill: re-arming the data plane: {e}");
                    }
                }
                Action::Leave => self.leave = true,
            }
        }
        self.cluster.publish(self.node.outgoing());
    }

    /// Undoes every host change, newest first. Errors are logged, and the rest still undone.
    async fn teardown(&mut self) {
        let _ = self.dp.disarm();
        while let Some(u) = self.undo.pop() {
            let r: Result<(), DaemonError> = match &u {
                Undo::Vip(index, addr) => self
                    .netlink
                    .del_vip(*index, *addr)
                    .await
                    .map_err(Into::into),
                Undo::Programs(pin_dir) => self.dp.detach().map_err(Into::into).and_then(|()| {
                    // The pin directory is ours alone; it is empty once the links are unpinned.
                    match std::fs::remove_dir(pin_dir) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            Err(DaemonError::Io {
                                what: format!("removing {}", pin_dir.display()),
                                source: e,
                            })
                        }
                        _ => {
                            // And the shared parent, if no other farmd uses it.
                            if let Some(parent) = pin_dir.parent() {
                                let _ = std::fs::remove_dir(parent);
                            }
                            Ok(())
                        }
                    }
                }),
                Undo::MacFilter(index, mac) => self
                    .netlink
                    .del_mac_filter(*index, *mac)
                    .await
                    .map_err(Into::into),
                Undo::Socket(path) => {
                    std::fs::remove_file(path).map_err(io(format!("removing {}", path.display())))
                }
                Undo::Sysctls(s) => s.restore().map_err(Into::into),
            };
            if let Err(e) = r {
                tracing::error!("while restoring the host ({u:?}): {e}");
            }
        }
        let _ = std::fs::remove_file(&self.lock_path);
    }

    /// Serves until SIGTERM or SIGINT, then restores the host.
    pub async fn run(mut self, listener: UnixListener) -> Result<(), DaemonError> {
        let mut term = signal(SignalKind::terminate()).map_err(io("installing SIGTERM handler"))?;
        let mut int = signal(SignalKind::interrupt()).map_err(io("installing SIGINT handler"))?;
        let mut hup = signal(SignalKind::hangup()).map_err(io("installing SIGHUP handler"))?;
        let announcer = Announcer::new(self.link.index)?;
        let mut liveness = fine_timer(&self.cfg);
        // The periodic work; on the kernel's clock (see `ticker`): an idle loop wakes for it
        // alone.
        let mut heartbeat = Ticker::new(self.cfg.heartbeat.interval)?;
        // When the periodic work (`handle_timeout`, the mirror group's tick) last ran.
        let mut timed_out = Instant::now();
        let mut updates = self
            .cluster
            .start(self.dp.deadman(), self.cfg.heartbeat.scheduling)?;
        let mut counted = self.counted.take().expect("run once");
        let (traffic_tx, mut traffic_rx) = tokio::sync::mpsc::unbounded_channel::<(
            Request,
            tokio::sync::oneshot::Sender<Response>,
            Result<BucketTraffic, String>,
        )>();
        let traffic_gate = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
        // Announce at once, twice more a second apart, then every announce_interval.
        let mut announce_at = tokio::time::Instant::now();
        let mut announced = 0u32;
        let (control_tx, mut control_rx) = tokio::sync::mpsc::channel(16);
        let mut check_results = checks::start(&self.cfg.checks);
        // Is the XDP program still attached, are its pins still there?
        let mut dataplane_check = Ticker::new(DATAPLANE_CHECK)?;
        if let Some(l) = self.metrics_listener.take() {
            if let Ok(a) = l.local_addr() {
                tracing::info!("metrics at http://{a}/metrics");
            }
            let tx = control_tx.clone();
            tokio::spawn(crate::metrics::serve(l, move |what| {
                let tx = tx.clone();
                async move {
                    let (reply, rx) = tokio::sync::oneshot::channel();
                    let req = match what {
                        crate::metrics::Render::Metrics => Request::Metrics,
                        crate::metrics::Render::State => Request::Dashboard,
                    };
                    tx.send((req, reply)).await.ok()?;
                    match rx.await.ok()? {
                        Response::Metrics { text } => Some(text),
                        Response::Dashboard { json } => Some(json),
                        _ => None,
                    }
                }
            }));
        }
        if !self.cfg.checks.is_empty() {
            tracing::info!(
                "{} health check(s); this member joins once they pass",
                self.cfg.checks.len()
            );
        }

        tracing::info!(
            "farmd serving: node {} on {} (XDP {} mode), cluster MAC {} ({}), {} VIP(s), owns {} \
             of {BUCKETS} buckets",
            self.cfg.node_id,
            self.cfg.interface,
            self.dp.xdp_mode.unwrap_or("?"),
            format_mac(&self.cluster_mac),
            match self.cfg.mac_mode {
                MacMode::Unicast => "unicast",
                MacMode::Multicast => "multicast",
            },
            self.cfg.vips.len(),
            assign::shares(self.node.owners(), self.cfg.members.len())[self.cfg.me],
        );

        // systemd (Type=notify): ready now; keep-alives from this loop, so a hung farmd is
        // restarted by WatchdogSec=.
        let mut service = crate::service::Service::new();
        service.ready(self.service_status());
        let watchdog_on = service.keepalive_every().is_some();
        let mut keepalive = tokio::time::interval(
            service
                .keepalive_every()
                .unwrap_or(Duration::from_secs(3600)),
        );
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        if let Some(pid) = self.took_over_from {
            self.event(format!("took over from farmd {pid} (in-place upgrade)"));
        }
        let result: Result<Ended, DaemonError> = loop {
            // Carry out what the node core decided in the previous turn; leave when it says so.
            self.act();
            if self.leave {
                break Ok(Ended::Stopped);
            }
            // The heartbeat thread's watchdog: this loop goes round at least every heartbeat
            // tick.
            self.cluster.stamp();
            tokio::select! {
                _ = term.recv() => {
                    service.stopping("SIGTERM: draining, then leaving the farm");
                    self.node.handle_stop("SIGTERM", Instant::now());
                }
                _ = int.recv() => {
                    service.stopping("SIGINT: draining, then leaving the farm");
                    self.node.handle_stop("SIGINT", Instant::now());
                }
                _ = keepalive.tick(), if watchdog_on => service.keepalive(),
                _ = hup.recv() => {
                    service.reloading();
                    // The same reload as `farmctl reload` (answered, and its effects applied,
                    // by the control arm below); nobody waits for the answer.
                    tracing::info!("SIGHUP: reloading {}", self.cfg.source.display());
                    let (reply, _) = tokio::sync::oneshot::channel();
                    if control_tx
                        .try_send((Request::Reload { dry_run: false }, reply))
                        .is_err()
                    {
                        tracing::warn!("SIGHUP: the control queue is full; reload not done");
                    }
                }
                _ = heartbeat.tick() => {
                    self.mirror_tick();
                    self.node.handle_timeout(Instant::now());
                    timed_out = Instant::now();
                }
                _ = dataplane_check.tick() => {
                    if let Err(e) = self.check_dataplane().await {
                        tracing::error!("{e}");
                        break Err(e);
                    }
                    // The status line (a pass over the bucket owners) only for a listener, and
                    // at this tick's pace rather than every liveness tick.
                    if service.active() {
                        service.status(self.service_status());
                    }
                }
                Some((i, outcome)) = check_results.recv() => {
                    self.node.handle_health(i, outcome, Instant::now());
                }
                _ = liveness.tick(), if self.node.wants_tick() || self.drill.is_some() => {
                    if self.drill.is_some() {
                        self.drill_tick().await;
                    }
                    self.node.handle_tick(Instant::now());
                }
                Some((req, reply, seen)) = traffic_rx.recv() => {
                    let _ = reply.send(self.handle_traffic(req, seen));
                }
                Some(c) = counted.recv() => {
                    // Connections left in the buckets handed over, counted off this loop.
                    self.node.handle_count(c, Instant::now());
                }
                Some(u) = updates.recv() => {
                    // A peer that applied or handed over a move, or a liveness change: the
                    // node core acts on it now.
                    let now = Instant::now();
                    self.node.handle_update(u, now);
                    // The heartbeat thread sends an update every interval while peers are
                    // heard: the periodic work rides on it (due from half an interval on) and
                    // the timer, reset, only fires when no update came. An idle main loop
                    // then wakes once per interval, not twice.
                    let interval = self.cfg.heartbeat.interval;
                    if now.duration_since(timed_out) >= interval / 2 {
                        self.mirror_tick();
                        self.node.handle_timeout(now);
                        timed_out = now;
                        if let Err(e) = heartbeat.reset_after(interval + interval / 2) {
                            tracing::error!("{e}");
                        }
                    }
                }
                _ = tokio::time::sleep_until(announce_at) => {
                    if let Err(e) = announcer.announce(
                        self.link.mac,
                        self.cluster_mac,
                        self.cfg.vips.iter().map(|v| v.address),
                    ) {
                        tracing::warn!("{e}");
                    }
                    announced += 1;
                    announce_at += if announced < 3 {
                        Duration::from_secs(1)
                    } else {
                        self.cfg.announce_interval
                    };
                }
                conn = listener.accept() => match conn {
                    Ok((stream, _)) => Self::serve_client(stream, control_tx.clone()),
                    Err(e) => tracing::warn!("control socket: {e}"),
                },
                Some((req, reply)) = control_rx.recv() => {
                    let response = match req {
                        Request::Reload { dry_run } => {
                            let (response, effects) = self.reload(dry_run).await;
                            if effects.timers {
                                liveness = fine_timer(&self.cfg);
                                if let Err(e) = heartbeat.set_period(self.cfg.heartbeat.interval) {
                                    tracing::error!("{e}");
                                }
                            }
                            if effects.checks {
                                check_results = checks::start(&self.cfg.checks);
                            }
                            if effects.announce {
                                (announce_at, announced) = (tokio::time::Instant::now(), 0);
                            }
                            if !dry_run {
                                service.ready(self.service_status());
                            }
                            response
                        }
                        Request::Drill { member } => self.start_drill(member).await,
                        Request::Upgrade { binary } => match self.hand_over(binary, &listener) {
                            Ok((response, pid)) => {
                                let _ = reply.send(response);
                                break Ok(Ended::HandedOver { pid });
                            }
                            Err(message) => {
                                tracing::warn!("upgrade: {message}");
                                Response::Error { message }
                            }
                        },
                        req @ (Request::Metrics | Request::Buckets { .. }) => {
                            // The counters are read off this loop, one reader at a time;
                            // the answer is rendered here when they arrive.
                            let (reader, tx) = (self.dp.counter_reader(), traffic_tx.clone());
                            let gate = traffic_gate.clone();
                            tokio::spawn(async move {
                                let Ok(_permit) = gate.acquire_owned().await else { return };
                                let seen = tokio::task::spawn_blocking(move || reader.all())
                                    .await
                                    .map_err(|e| e.to_string())
                                    .and_then(|r| r.map_err(|e| e.to_string()));
                                let _ = tx.send((req, reply, seen));
                            });
                            continue;
                        }
                        req => self.handle(req),
                    };
                    let _ = reply.send(response);
                }
            }
        };
        let result = match result {
            Ok(Ended::HandedOver { pid }) => {
                // The service manager follows the new process; the answer to farmctl is
                // written by its task, given the time to run. Nothing on the host is undone.
                service.main_pid(pid);
                tokio::time::sleep(Duration::from_millis(100)).await;
                tracing::info!("farmd {pid} serves now; this one exits, the host left as it is");
                return Ok(());
            }
            r => r.map(|_| ()),
        };
        if let Some(run) = self.drill.take() {
            drop(run.probe);
            let _ = self
                .netlink
                .del_mac_filter(self.link.index, run.probe_mac)
                .await;
        }
        // Tell the peers first, so they take this node's buckets at once rather than after the
        // loss window; twice, in case one is lost.
        self.node.leave();
        self.cluster.publish(self.node.outgoing());
        self.cluster.send_now();
        tokio::time::sleep(self.cfg.heartbeat.interval.min(Duration::from_millis(50))).await;
        self.cluster.send_now();
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.cluster.stop();
        if let Some(g) = self.mirror.take() {
            // The application stops and the directory is unmounted before the host is restored
            // (a primary flushes to its secondary first).
            let _ = tokio::task::spawn_blocking(move || g.shutdown()).await;
        }
        self.teardown().await;
        tracing::info!("farmd stopped; host restored");
        result
    }

    /// One line for `systemctl status`: this member's state, its share, who serves.
    fn service_status(&self) -> String {
        let shares = assign::shares(self.node.owners(), self.cfg.members.len());
        let serving = (0..self.cfg.members.len())
            .filter(|&i| self.node.member_state(i, &shares) == crate::control::MemberState::Serving)
            .count();
        format!(
            "{}: owns {} of {BUCKETS} buckets; {serving} of {} members serving",
            self.node.member_state(self.cfg.me, &shares),
            shares[self.cfg.me],
            self.cfg.members.len()
        )
    }

    /// Verifies that this node's XDP program is still the one attached to the farm interface
    /// (someone may have detached it: the node is then silent, see `sysctl`, and must leave so
    /// that its peers serve its clients), and says once when its pins are gone (a crash would
    /// then detach the programs: still silent, but no longer covered by the dead-man switch).
    async fn check_dataplane(&mut self) -> Result<(), DaemonError> {
        let ours = self.dp.xdp_program_id();
        let facts = match self.netlink.link(&self.cfg.interface).await {
            Ok(f) => f,
            Err(NetlinkError::NoSuchInterface(_)) => {
                return Err(DaemonError::DataplaneLost {
                    interface: self.cfg.interface.clone(),
                    how: "the interface is gone".into(),
                });
            }
            Err(e) => {
                tracing::warn!("checking the XDP program: {e}");
                return Ok(());
            }
        };
        match (facts.xdp, ours) {
            (Some((_, id)), Some(ours)) if id == ours => {}
            (None, _) => {
                return Err(DaemonError::DataplaneLost {
                    interface: self.cfg.interface.clone(),
                    how: "detached by someone else".into(),
                });
            }
            (Some((mode, id)), _) => {
                return Err(DaemonError::DataplaneLost {
                    interface: self.cfg.interface.clone(),
                    how: format!("replaced by program id {id} ({mode} mode)"),
                });
            }
        }
        let missing = self.dp.missing_pins();
        if !missing.is_empty() && !self.pins_missing {
            tracing::error!(
                "the pins of the XDP/tc links are gone ({}: removed, or the bpf filesystem \
                 unmounted); the programs still run while farmd does, but a crash now detaches \
                 them (the node stays silent, without the dead-man switch); restart farmd to pin \
                 them again",
                missing
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        self.pins_missing = !missing.is_empty();
        Ok(())
    }

    /// Reads one request from a control client and writes the answer, in its own task: a slow
    /// or silent client never holds up heartbeats. Only `handle` runs on the main loop.
    fn serve_client(stream: UnixStream, requests: ControlQueue) {
        tokio::spawn(async move {
            let allowed = client_allowed(&stream);
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            // One request line, of bounded size.
            let read = tokio::time::timeout(
                Duration::from_secs(2),
                BufReader::new(r.take(MAX_REQUEST)).read_line(&mut line),
            )
            .await;
            let response = match (read, allowed) {
                (_, Err(message)) => Response::Error { message },
                (Ok(Ok(_)), Ok(())) if !line.ends_with('\n') => Response::Error {
                    message: format!("bad request: longer than {MAX_REQUEST} bytes or unfinished"),
                },
                (Ok(Ok(_)), Ok(())) => match serde_json::from_str::<Request>(&line) {
                    Ok(req) => {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        if requests.send((req, tx)).await.is_err() {
                            return;
                        }
                        match rx.await {
                            Ok(r) => r,
                            Err(_) => return,
                        }
                    }
                    Err(e) => Response::Error {
                        message: format!("bad request: {e}"),
                    },
                },
                _ => return,
            };
            let mut out = serde_json::to_string(&response).unwrap_or_else(|e| {
                format!(r#"{{"result":"error","message":"encoding the answer: {e}"}}"#)
            });
            out.push('\n');
            let _ = tokio::time::timeout(Duration::from_secs(2), w.write_all(out.as_bytes())).await;
        });
    }

    /// Reads the configuration file again and applies what changed (`dry_run`: only says what
    /// would). An invalid file, or a change that needs a restart, changes nothing.
    async fn reload(&mut self, dry_run: bool) -> (Response, Reloaded) {
        let path = self.cfg.source.clone();
        let new = match Config::load(&path) {
            Ok(c) => c,
            Err(e) => {
                let message = format!("{e}\nnothing was changed: farmd runs on as before");
                if !dry_run {
                    tracing::error!("reload refused: {message}");
                }
                return (Response::Error { message }, Reloaded::default());
            }
        };
        let d = reload::diff(&self.cfg, &new);
        let mut report = ReloadReport {
            file: path.display().to_string(),
            applied: false,
            changes: d.live.clone(),
            restart_needed: d.restart.clone(),
            warnings: d.warnings.clone(),
            vips_added: d.vips_added.iter().map(ToString::to_string).collect(),
            vips_removed: d.vips_removed.iter().map(ToString::to_string).collect(),
            ..Default::default()
        };
        let members: Vec<(String, u32)> = new
            .members
            .iter()
            .map(|m| (m.id.clone(), m.weight))
            .collect();
        let digest = config_digest(&members);
        if d.weights_changed && d.restart.is_empty() {
            let mut candidates = self.node.membership.candidates();
            for (c, (_, w)) in candidates.iter_mut().zip(&members) {
                c.weight = *w;
            }
            let after = assign::assign(&self.hash_key, &candidates);
            report.buckets_moving = after
                .iter()
                .zip(self.node.owners())
                .filter(|(a, b)| a != b)
                .count();
            let n = members.len();
            let (now, later) = (
                assign::shares(self.node.owners(), n),
                assign::shares(&after, n),
            );
            report.shares = members
                .iter()
                .enumerate()
                .map(|(i, (id, _))| ShareChange {
                    member: id.clone(),
                    now: now[i],
                    after: later[i],
                })
                .collect();
            let m = &self.node.membership;
            report.waiting_for = m
                .peers
                .iter()
                .enumerate()
                .filter(|(i, p)| *i != m.me && p.alive && p.config_digest != digest)
                .map(|(_, p)| p.id.clone())
                .collect();
        }
        let roster_changed = !d.members_added.is_empty() || !d.members_removed.is_empty();
        if roster_changed && d.restart.is_empty() {
            // A member is removed only once it left: while it runs it serves its buckets,
            // which the others would take over as well.
            let m = &self.node.membership;
            let running: Vec<String> = d
                .members_removed
                .iter()
                .filter(|id| m.peers.iter().any(|p| &p.id == *id && p.alive))
                .cloned()
                .collect();
            if !running.is_empty() {
                let message = format!(
                    "reload refused: {} still runs; stop farmd there first (systemctl stop                      farmd, or farmctl drain then stop), then reload; nothing was changed",
                    running.join(", ")
                );
                if !dry_run {
                    tracing::error!("{message}");
                }
                return (Response::Error { message }, Reloaded::default());
            }
            // The new list takes effect once every member of it runs and has it.
            report.waiting_for = members
                .iter()
                .enumerate()
                .filter(|(i, (id, _))| {
                    *i != self.cfg.me
                        && !m
                            .peers
                            .get(*i)
                            .is_some_and(|p| p.alive && p.config_digest == digest && &p.id == id)
                })
                .map(|(_, (id, _))| id.clone())
                .collect();
        }
        if !dry_run && !d.restart.is_empty() {
            tracing::error!(
                "reload refused, these changes need a restart of farmd: {}; nothing was changed",
                d.restart.join("; ")
            );
        } else if !dry_run && d.is_empty() {
            tracing::info!("reload: nothing changed");
        }
        if dry_run || !d.restart.is_empty() || d.is_empty() {
            return (Response::Reload(Box::new(report)), Reloaded::default());
        }

        // VIPs: a removed one leaves the host first (then no member's kernel answers for it
        // from here), the table changes in one switch, an added one comes in after it (the
        // data plane already filters and answers ARP for it).
        let index = self.vip_index;
        for addr in &d.vips_removed {
            if let Err(e) = self.netlink.del_vip(index, *addr).await {
                tracing::error!("reload: removing VIP {addr}: {e}");
            }
            self.undo
                .retain(|u| !matches!(u, Undo::Vip(_, a) if a == addr));
        }
        if d.vips_changed {
            if let Err(e) = self.dp.set_vips(&new.vips) {
                // Only the removals happened; the VIPs that stay are served as before.
                return (
                    Response::Error {
                        message: format!(
                            "reload: writing the VIP table failed ({e}); VIPs removed: [{}], \
                             nothing else changed",
                            report.vips_removed.join(", ")
                        ),
                    },
                    Reloaded::default(),
                );
            }
            self.node.handover.set_vips(new.vips.clone());
        }
        for addr in &d.vips_added {
            match self.netlink.add_vip(index, *addr).await {
                Ok(()) => {}
                Err(e) if e.errno() == Some(libc::EEXIST) => {}
                Err(e) => {
                    tracing::error!("reload: adding VIP {addr}: {e}");
                    report
                        .warnings
                        .push(format!("adding VIP {addr} failed: {e}"));
                    continue;
                }
            }
            self.undo.push(Undo::Vip(index, *addr));
        }
        if roster_changed {
            // Heartbeats to and from the new list at once; the bucket map follows once every
            // member of the new list has it (see `handover`).
            self.cluster.set_members(&new);
            let sources: Vec<IpAddr> = new
                .members
                .iter()
                .flat_map(|m| m.heartbeat_addrs.iter().copied())
                .collect();
            if let Err(e) = self.dp.set_heartbeat_filter(new.heartbeat.port, &sources) {
                tracing::error!("reload: updating the data plane's heartbeat filter: {e}");
            }
            tracing::info!(
                added = ?d.members_added,
                removed = ?d.members_removed,
                "member list changed: the bucket map follows once every member of the new list \
                 runs and has it"
            );
        }
        if d.weights_changed || roster_changed {
            // With a new list the heartbeat thread took the weights already (`set_members`).
            if !roster_changed {
                self.cluster
                    .set_weights(members.iter().map(|(_, w)| *w).collect());
            }
            self.node.set_members(members);
        }
        if d.checks_changed {
            self.node
                .health
                .reconfigure(&new.checks, new.max_health_moves_per_minute);
        }
        if d.hooks_changed {
            self.hooks = Hooks::new(new.hooks.clone(), new.node_id.clone());
        }
        self.cluster.set_timers(
            new.heartbeat.interval,
            new.heartbeat.loss_window(),
            new.deadman_timeout,
        );
        self.node
            .handover
            .set_timeouts(new.drain_timeout, new.udp_idle);
        let effects = Reloaded {
            timers: d.timers_changed,
            checks: d.checks_changed,
            announce: !d.vips_added.is_empty(),
        };
        self.cfg = new;
        report.applied = true;
        self.event(format!("reloaded: {}", report.changes.join("; ")));
        tracing::info!("reloaded {}: {}", report.file, report.changes.join("; "));
        for w in &report.warnings {
            tracing::warn!("reload: {w}");
        }
        if d.weights_changed {
            if report.waiting_for.is_empty() {
                tracing::info!(
                    "new weights: {} bucket(s) move, keeping connections",
                    report.buckets_moving
                );
            } else {
                tracing::info!(
                    "new weights: {} bucket(s) move once [{}] have them (farmctl reload there)",
                    report.buckets_moving,
                    report.waiting_for.join(", ")
                );
            }
        }
        self.node.refresh(Instant::now());
        self.act();
        (Response::Reload(Box::new(report)), effects)
    }

    /// Records an event for the status page.
    fn event(&mut self, text: impl Into<String>) {
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(crate::control::Event {
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            text: text.into(),
        });
    }

    /// What the status page draws, as JSON.
    fn dashboard(&self) -> Result<String, DaemonError> {
        use base64::Engine as _;
        let owners = if self.node.owners().is_empty() {
            vec![farm_common::NO_OWNER; BUCKETS as usize]
        } else {
            self.node.owners().to_vec()
        };
        let d = crate::control::Dashboard {
            status: self.status()?,
            owners: base64::engine::general_purpose::STANDARD.encode(&owners),
            events: self.events.iter().rev().cloned().collect(),
        };
        Ok(serde_json::to_string(&d).expect("serializable"))
    }

    /// The drill in progress, or the last one.
    fn drill_report(&self) -> Option<DrillReport> {
        match &self.drill {
            Some(run) => Some(run.report.clone()),
            None => self.last_drill.clone(),
        }
    }

    /// Starts a recovery drill: `member` (by default the first other serving member) acts as
    /// if it crashed, while this node's probe client, a client of the farm on the wire,
    /// measures how long the buckets of its probe address go unanswered.
    async fn start_drill(&mut self, member: Option<String>) -> Response {
        let error = |message: String| Response::Error { message };
        if let Some(run) = &self.drill {
            return error(format!(
                "a drill of {} is already running (farmctl drill --status)",
                run.report.member
            ));
        }
        if self.node.crashed() {
            return error("this member is playing crashed in a peer's drill".into());
        }
        if !self.node.quorum() || self.node.membership.my_state != State::Active {
            return error("this member does not serve (no quorum, or not active)".into());
        }
        if let Some(why) = self.node.describe_move() {
            return error(format!(
                "{why}: run the drill once the farm is settled (one change at a time)"
            ));
        }
        let drill_cfg = self.cfg.drill.clone();
        if drill_cfg.probe_addresses.is_empty() {
            return error(format!(
                "drill.probe_addresses is not set: the drill's probe client needs a few \
                 addresses no host uses, in the subnet of {} (e.g. probe_addresses = \
                 [\"192.0.2.224/27\"])",
                self.cfg.interface
            ));
        }
        let Some(vip) = self.cfg.vips.iter().find_map(|v| match v.address {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }) else {
            return error("the drill probes an IPv4 VIP and this farm has none".into());
        };
        let me = self.cfg.me;
        let candidates = self.node.membership.candidates();
        let victim = match &member {
            Some(id) => match self.cfg.members.iter().position(|m| &m.id == id) {
                Some(i) => i,
                None => return error(format!("{id:?} is not a member")),
            },
            None => match (0..candidates.len()).find(|&i| i != me && candidates[i].serving) {
                Some(i) => i,
                None => return error("no other member serves: nothing to drill".into()),
            },
        };
        let name = self.cfg.members[victim].id.clone();
        if victim == me {
            return error(format!(
                "{name} is this member: its probe client's requests never come back to it \
                 through the switch; run `farmctl drill --member {name}` on another member"
            ));
        }
        if !candidates[victim].serving {
            return error(format!("{name} does not serve: nothing to drill"));
        }
        if !(0..candidates.len()).any(|i| i != me && i != victim && candidates[i].serving) {
            return error(format!(
                "without {name} only this member serves, and it cannot be a client of itself \
                 through the switch: a drill needs a third serving member (measure a \
                 two-member farm from a client host, e.g. with `cargo xtask bench failover`)"
            ));
        }
        let witness = self.cluster.witness_reachable().unwrap_or(false);
        if !self.node.membership.quorum_without(victim, witness) {
            return error(format!(
                "without {name} the farm would lose quorum and stop serving: not drilled"
            ));
        }
        let taken: Vec<IpAddr> = self
            .cfg
            .members
            .iter()
            .flat_map(|m| m.heartbeat_addrs.iter().copied())
            .chain(self.cfg.vips.iter().map(|v| v.address))
            .collect();
        // The probe's bucket must be the victim's now and another member's than this one once
        // the victim is gone: this member never receives its own probes through the switch.
        let mut without = candidates.clone();
        without[victim].serving = false;
        let alg = self
            .node
            .handover
            .algorithm(self.node.handover.applied.weights);
        let successors = assign::assign_with(alg, &self.hash_key, &without);
        let Some(addr) = drill::candidates(&drill_cfg.probe_addresses)
            .take(1 << 16)
            .find(|a| {
                let b = bucket_of(&self.hash_key, BucketKey::V4(a.octets())) as usize;
                !taken.contains(&IpAddr::V4(*a))
                    && self.node.owners().get(b) == Some(&(victim as u8))
                    && successors[b] as usize != me
            })
        else {
            return error(format!(
                "no address of drill.probe_addresses is in a bucket of {name} that another \
                 member than this one takes over: give a larger block (a /27 has 30 addresses)"
            ));
        };
        let o = addr.octets();
        let mac = [0x02, 0xfa, 0xd1, o[1], o[2], o[3]];
        let index = self.link.index;
        match self.netlink.add_mac_filter(index, mac).await {
            Ok(()) => {}
            Err(e) if e.errno() == Some(libc::EEXIST) => {}
            Err(e) => return error(format!("adding the probe client's MAC: {e}")),
        }
        let ident = (std::process::id() as u16) ^ 0x5a5a;
        let probe = Probe {
            ifindex: index,
            mac,
            addr,
            vip,
            cluster_mac: self.cluster_mac,
            ident,
            members: self
                .cfg
                .members
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != me)
                .flat_map(|(_, m)| m.heartbeat_addrs.iter())
                .filter_map(|a| match a {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                })
                .collect(),
        };
        let client = match ProbeClient::start(probe, &self.cfg.interface) {
            Ok(c) => c,
            Err(e) => {
                let _ = self.netlink.del_mac_filter(index, mac).await;
                return error(e.to_string());
            }
        };
        let id = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos() ^ d.as_secs() as u32))
        .max(1);
        let report = DrillReport {
            id,
            member: name.clone(),
            probe: addr.to_string(),
            vip: vip.to_string(),
            phase: DrillStage::Baseline,
            elapsed_ms: 0,
            probes_sent: 0,
            probes_answered: 0,
            rto_ms: None,
            expected_ms: (self.cfg.heartbeat.loss_window()
                + crate::membership::lapse_margin(self.cfg.heartbeat.interval))
            .as_millis() as u64,
            objective_ms: drill_cfg.rto_objective.as_millis() as u64,
            passed: None,
            error: None,
            finished: false,
            finished_at: None,
        };
        tracing::info!(
            "drill {id}: {name} is to act as if crashed; probe client {addr} ({}) asks {vip}",
            format_mac(&mac)
        );
        self.event(format!(
            "drill {id} started: {name} is to act as if crashed"
        ));
        self.drill = Some(DrillRun {
            report: report.clone(),
            victim,
            started: Instant::now(),
            probe: client,
            probe_mac: mac,
            phase: DrillPhase::Baseline,
        });
        Response::Drill(Box::new(report))
    }

    /// Moves the running drill on (every liveness tick).
    async fn drill_tick(&mut self) {
        let loss_window = self.cfg.heartbeat.loss_window();
        let timeout = self.cfg.drill.timeout;
        let back = {
            let Some(run) = self.drill.as_ref() else {
                return;
            };
            let m = &self.node.membership;
            let p = &m.peers[run.victim];
            p.alive && p.state == Some(State::Active)
        };
        let settled = self.node.current_move().is_none();
        let Some(run) = self.drill.as_mut() else {
            return;
        };
        let now = Instant::now();
        let grace = Duration::from_millis(50);
        // What this tick needs of the probe log, read under its lock (every 5 ms: no copy).
        let phase = run.phase;
        let (sent, answered, arp_answered, steady, outage) = run.probe.with(|l| {
            (
                l.sent.len() as u64,
                l.answered_count(),
                l.arp_answered,
                l.steady(20, now, grace),
                match phase {
                    DrillPhase::Crashed(at) => l.outage(at, now, grace),
                    _ => None,
                },
            )
        });
        run.report.elapsed_ms = now.duration_since(run.started).as_millis() as u64;
        run.report.probes_sent = sent;
        run.report.probes_answered = answered;
        let mut failed: Option<String> = None;
        let mut done = false;
        match run.phase {
            DrillPhase::Baseline => {
                if steady {
                    run.phase = DrillPhase::Crashed(now);
                    run.report.phase = DrillStage::Crashed;
                    self.node.drill_order = Some((run.report.id, run.victim as u8));
                    self.cluster.publish(self.node.outgoing());
                    self.cluster.send_now();
                    tracing::info!(
                        "drill {}: {} acts as if crashed from now",
                        run.report.id,
                        run.report.member
                    );
                } else if now.duration_since(run.started) > Duration::from_secs(3) {
                    failed = Some(format!(
                        "the probe client got no steady answer from {} before the crash ({} of \
                         {} probes answered, {} ARP requests answered): check that \
                         drill.probe_addresses are unused addresses in the subnet of {}",
                        run.report.vip,
                        run.report.probes_answered,
                        run.report.probes_sent,
                        arp_answered,
                        self.cfg.interface
                    ));
                    done = true;
                }
            }
            DrillPhase::Crashed(at) => {
                if let Some(outage) = outage {
                    let ms = outage.as_millis() as u64;
                    run.report.rto_ms = Some(ms);
                    run.report.passed = Some(ms <= run.report.objective_ms);
                    run.report.phase = DrillStage::Restoring;
                    run.phase = DrillPhase::Restoring(now);
                    self.node.drill_order = None;
                    self.cluster.publish(self.node.outgoing());
                    self.cluster.send_now();
                    tracing::info!(
                        "drill {}: answered again after {ms} ms; {} rejoins",
                        run.report.id,
                        run.report.member
                    );
                } else if now.duration_since(at) > timeout {
                    self.node.drill_order = None;
                    run.report.passed = Some(false);
                    failed = Some(format!(
                        "no answer to the probe client for {} s after the crash (drill.timeout_s)",
                        timeout.as_secs()
                    ));
                    done = true;
                }
            }
            DrillPhase::Restoring(at) => {
                // Back once it serves again and its buckets have been handed back.
                if back && settled && now.duration_since(at) > loss_window {
                    done = true;
                } else if now.duration_since(at) > timeout + loss_window {
                    failed = Some(format!(
                        "{} did not serve again within {} s; it rejoins by itself",
                        run.report.member,
                        timeout.as_secs()
                    ));
                    done = true;
                }
            }
        }
        if !done {
            return;
        }
        let mut run = self.drill.take().expect("checked above");
        self.node.drill_order = None;
        drop(run.probe);
        if let Err(e) = self
            .netlink
            .del_mac_filter(self.link.index, run.probe_mac)
            .await
        {
            tracing::warn!("drill: removing the probe client's MAC: {e}");
        }
        let r = &mut run.report;
        r.finished = true;
        r.finished_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs_f64());
        r.phase = if failed.is_some() {
            DrillStage::Failed
        } else {
            DrillStage::Done
        };
        r.error = failed;
        let text = format!(
            "drill {}: {}",
            r.id,
            r.outcome().expect("finished just above")
        );
        if r.error.is_none() {
            tracing::info!("{text}");
        } else {
            tracing::warn!("{text}");
        }
        self.event(text);
        self.last_drill = Some(run.report);
    }

    /// Answers a request that needs the per-bucket counters (`metrics`, `buckets`), read
    /// beforehand off the main loop (65536 per-CPU values take tens of milliseconds).
    fn handle_traffic(&self, req: Request, seen: Result<BucketTraffic, String>) -> Response {
        let error = |message: String| Response::Error { message };
        let seen = match seen {
            Ok(s) => s,
            Err(e) => return error(e),
        };
        match req {
            Request::Buckets { bucket } => match self.buckets(bucket, seen) {
                Ok(r) => Response::Buckets(Box::new(r)),
                Err(e) => error(e.to_string()),
            },
            Request::Metrics => match self.metrics_text(seen) {
                Ok(text) => Response::Metrics { text },
                Err(e) => error(e.to_string()),
            },
            _ => error("not a traffic request".into()),
        }
    }

    /// Answers one control request.
    pub fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Drain { force } => {
                self.node
                    .handle_command(Planned::Drain, force, Instant::now())
            }
            Request::Resume => self
                .node
                .handle_command(Planned::Resume, false, Instant::now()),
            // Answered by the main loop, which ends when it succeeds.
            Request::Upgrade { .. } => Response::Error {
                message: "an upgrade is handled by farmd's main loop".into(),
            },
            req @ (Request::Buckets { .. } | Request::Metrics) => {
                let seen = self.dp.counter_reader().all().map_err(|e| e.to_string());
                self.handle_traffic(req, seen)
            }
            Request::SimulateFailure { member } => self.simulate_failure(&member),
            Request::Checks => Response::Checks {
                healthy: self.node.health.healthy(),
                damped: self.node.health.damped(),
                checks: self.node.health.status(std::time::Instant::now()),
            },
            Request::Status => match self.status() {
                Ok(s) => Response::Status(Box::new(s)),
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            },
            Request::Whois { clients } => Response::Whois {
                entries: clients.iter().map(|c| self.whois(c)).collect(),
            },
            Request::MirrorStatus | Request::MirrorSwap | Request::MirrorPromote { .. } => {
                self.mirror_request(&req)
            }
            Request::Dashboard => match self.dashboard() {
                Ok(json) => Response::Dashboard { json },
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            },
            Request::DrillStatus => match self.drill_report() {
                Some(r) => Response::Drill(Box::new(r)),
                None => Response::Error {
                    message: "no drill has run since farmd started".into(),
                },
            },
            // Answered by the main loop (they change timers, tasks and the host there).
            Request::Reload { .. } | Request::Drill { .. } => Response::Error {
                message: "internal: answered by the main loop".into(),
            },
        }
    }

    fn bucket_info(&self, b: u32) -> Result<crate::control::BucketInfo, DaemonError> {
        let c = self.dp.bucket_counter(b)?;
        let e = self
            .node
            .applied()
            .get(b as usize)
            .copied()
            .unwrap_or_default();
        Ok(crate::control::BucketInfo {
            bucket: b,
            owner: self.owner_name(b),
            state: match self.dp.control().effective_state(&e) {
                farm_common::bucket_state::MINE => "mine",
                farm_common::bucket_state::INCOMING => "incoming",
                farm_common::bucket_state::OUTGOING => "outgoing",
                _ => "not-mine",
            }
            .into(),
            accepted_packets: c.accepted_packets,
            accepted_bytes: c.accepted_bytes,
            dropped_packets: c.dropped_packets,
            dropped_bytes: c.dropped_bytes,
        })
    }

    /// Traffic per member (its current buckets) and per bucket that saw any, from this node's
    /// per-bucket counters: every member sees every packet, so they cover the whole farm.
    fn traffic(&self, seen: &BucketTraffic) -> Vec<crate::control::MemberTraffic> {
        let mut members: Vec<crate::control::MemberTraffic> = self
            .cfg
            .members
            .iter()
            .map(|m| crate::control::MemberTraffic {
                id: m.id.clone(),
                buckets: 0,
                packets: 0,
                bytes: 0,
            })
            .collect();
        for &o in self.node.owners() {
            if let Some(m) = members.get_mut(o as usize) {
                m.buckets += 1;
            }
        }
        for &(b, packets, bytes) in seen {
            if let Some(m) = self
                .node
                .owners()
                .get(b as usize)
                .and_then(|&o| members.get_mut(o as usize))
            {
                m.packets += packets;
                m.bytes += bytes;
            }
        }
        members
    }

    fn buckets(
        &self,
        detail: Option<u32>,
        mut seen: BucketTraffic,
    ) -> Result<crate::control::BucketReport, DaemonError> {
        let n = self.cfg.members.len();
        let members = self.traffic(&seen);
        seen.sort_unstable_by_key(|&(b, packets, _)| std::cmp::Reverse((packets, b)));
        let busiest = seen
            .iter()
            .take(10)
            .map(|&(b, _, _)| self.bucket_info(b))
            .collect::<Result<_, _>>()?;
        Ok(crate::control::BucketReport {
            buckets_total: BUCKETS,
            members,
            busiest,
            detail: match detail {
                Some(b) if b < BUCKETS => Some(self.bucket_info(b)?),
                _ => None,
            },
            owners: self
                .node
                .owners()
                .iter()
                .map(|&o| ((o as usize) < n).then_some(o))
                .collect(),
        })
    }

    /// Every series of the metrics endpoint.
    fn metrics_text(&self, per_bucket: BucketTraffic) -> Result<String, DaemonError> {
        let mut t = crate::metrics::Text::default();
        let me = self.cfg.node_id.as_str();
        let shares = assign::shares(self.node.owners(), self.cfg.members.len());
        t.family("farm_up", "gauge", "1 while farmd runs.")
            .sample("farm_up", &[("node", me)], 1.0);
        t.family(
            "farm_quorum",
            "gauge",
            "1 while this member has quorum (sees a majority, or the witness).",
        )
        .sample("farm_quorum", &[], self.node.quorum() as u8 as f64);
        t.family(
            "farm_member_state",
            "gauge",
            "Each member's state as this member sees it (1 for the current state).",
        );
        for (i, m) in self.cfg.members.iter().enumerate() {
            let st = self.node.member_state(i, &shares);
            t.sample(
                "farm_member_state",
                &[("member", &m.id), ("state", st.as_str())],
                1.0,
            );
        }
        t.family("farm_buckets_owned", "gauge", "Buckets each member owns.");
        for (i, m) in self.cfg.members.iter().enumerate() {
            t.sample("farm_buckets_owned", &[("member", &m.id)], shares[i] as f64);
        }
        let traffic = self.traffic(&per_bucket);
        t.family(
            "farm_member_packets_total",
            "counter",
            "Packets to each member's current buckets, as this member saw them.",
        );
        for m in &traffic {
            t.sample(
                "farm_member_packets_total",
                &[("member", &m.id)],
                m.packets as f64,
            );
        }
        t.family(
            "farm_member_bytes_total",
            "counter",
            "Bytes to each member's current buckets, as this member saw them.",
        );
        for m in &traffic {
            t.sample(
                "farm_member_bytes_total",
                &[("member", &m.id)],
                m.bytes as f64,
            );
        }
        if self.cfg.metrics_per_bucket {
            t.family(
                "farm_bucket_packets_total",
                "counter",
                "Packets per bucket (buckets that saw any), as this member saw them.",
            );
            for (b, p, _) in &per_bucket {
                t.sample(
                    "farm_bucket_packets_total",
                    &[("bucket", &b.to_string())],
                    *p as f64,
                );
            }
            t.family("farm_bucket_bytes_total", "counter", "Bytes per bucket.");
            for (b, _, y) in &per_bucket {
                t.sample(
                    "farm_bucket_bytes_total",
                    &[("bucket", &b.to_string())],
                    *y as f64,
                );
            }
        }
        let stats = self.dp.stats()?;
        t.family(
            "farm_xdp_total",
            "counter",
            "XDP data-plane counters (accepted/dropped packets and bytes, ARP/NDP answered, \
             parse errors by kind).",
        );
        for (k, v) in &stats {
            t.sample("farm_xdp_total", &[("counter", k)], *v as f64);
        }
        let lateness = self.cluster.lateness();
        t.family(
            "farm_heartbeat_lateness_seconds",
            "histogram",
            "How late heartbeats were: from the due time to the send (direction=send), from \
             the arrival on the socket to the processing (direction=receive).",
        );
        for (dir, h) in [("send", &lateness.send), ("receive", &lateness.receive)] {
            for (bound, n) in h.cumulative() {
                let le = if bound.is_infinite() {
                    "+Inf".to_string()
                } else {
                    bound.to_string()
                };
                t.sample(
                    "farm_heartbeat_lateness_seconds_bucket",
                    &[("direction", dir), ("le", &le)],
                    n as f64,
                );
            }
            t.sample(
                "farm_heartbeat_lateness_seconds_sum",
                &[("direction", dir)],
                h.sum_us as f64 / 1e6,
            );
            t.sample(
                "farm_heartbeat_lateness_seconds_count",
                &[("direction", dir)],
                h.count as f64,
            );
        }
        let sched = self.cluster.scheduling();
        t.family(
            "farm_heartbeat_realtime",
            "gauge",
            "1 while the heartbeat thread runs with a real-time scheduling policy.",
        )
        .sample(
            "farm_heartbeat_realtime",
            &[("policy", &sched.policy)],
            (sched.policy != "other") as u8 as f64,
        );
        let c = &self.cluster.counters();
        let nets = self.cfg.me().heartbeat_addrs.len();
        for (name, kind, help, counts) in [
            (
                "farm_heartbeats_sent_total",
                "counter",
                "Heartbeats sent, per peer and heartbeat network.",
                &c.sent,
            ),
            (
                "farm_heartbeats_received_total",
                "counter",
                "Authenticated heartbeats received, per peer and heartbeat network.",
                &c.received,
            ),
            (
                "farm_heartbeats_lost_total",
                "counter",
                "Heartbeats a peer sent that never arrived, per peer and heartbeat network.",
                &c.lost,
            ),
            (
                "farm_heartbeats_longest_gap",
                "gauge",
                "The most heartbeats lost in a row, per peer and heartbeat network (a peer is \
                 lost when loss_threshold of them in a row never arrive on any network).",
                &c.longest_gap,
            ),
        ] {
            t.family(name, kind, help);
            for (peer, v) in counts.iter().filter(|(peer, _)| *peer != me) {
                for (net, n) in v.iter().enumerate().take(nets) {
                    t.sample(
                        name,
                        &[("peer", peer), ("network", &net.to_string())],
                        *n as f64,
                    );
                }
            }
        }
        t.family(
            "farm_heartbeats_rejected_total",
            "counter",
            "Datagrams on the heartbeat port that were dropped, by reason.",
        );
        for (reason, n) in &c.rejected {
            t.sample(
                "farm_heartbeats_rejected_total",
                &[("reason", reason)],
                *n as f64,
            );
        }
        t.family(
            "farm_failovers_total",
            "counter",
            "Members this member saw fail (not heard for the loss window).",
        )
        .sample("farm_failovers_total", &[], self.failovers as f64);
        t.family(
            "farm_peers_left_total",
            "counter",
            "Members this member saw leave by a planned stop (not failures).",
        )
        .sample("farm_peers_left_total", &[], c.peers_left as f64);
        if let Some((m, d, _)) = &self.last_failover {
            t.family(
                "farm_last_failover_seconds",
                "gauge",
                "The last failover: from the lost member's last heartbeat to the new map live.",
            )
            .sample(
                "farm_last_failover_seconds",
                &[("member", m)],
                d.as_secs_f64(),
            );
        }
        if let Some(d) = &self.last_drill {
            let labels = [("member", d.member.as_str())];
            if let Some(ms) = d.rto_ms {
                t.family(
                    "farm_drill_rto_seconds",
                    "gauge",
                    "The last recovery drill: how long the crashed member's buckets went \
                     unanswered, measured by the probe client.",
                )
                .sample("farm_drill_rto_seconds", &labels, ms as f64 / 1000.0);
            }
            t.family(
                "farm_drill_objective_seconds",
                "gauge",
                "drill.rto_objective_ms of the last drill.",
            )
            .sample(
                "farm_drill_objective_seconds",
                &labels,
                d.objective_ms as f64 / 1000.0,
            );
            t.family(
                "farm_drill_passed",
                "gauge",
                "1 when the last drill measured an RTO within its objective, 0 when it missed \
                 it or failed.",
            )
            .sample(
                "farm_drill_passed",
                &labels,
                (d.error.is_none() && d.passed == Some(true)) as u8 as f64,
            );
            if let Some(at) = d.finished_at {
                t.family(
                    "farm_drill_timestamp_seconds",
                    "gauge",
                    "When the last drill finished (Unix time).",
                )
                .sample("farm_drill_timestamp_seconds", &labels, at);
            }
        }
        if let Some(g) = &self.mirror {
            let m = g.status(self.mirror_view());
            let labels = [("role", m.role.name())];
            t.family(
                "farm_mirror_role",
                "gauge",
                "1, labelled with this member's mirror role (secondary, primary, stopping).",
            )
            .sample("farm_mirror_role", &labels, 1.0);
            t.family(
                "farm_mirror_generation",
                "gauge",
                "The data generation of this member's copy (it grows at each failover).",
            )
            .sample("farm_mirror_generation", &[], m.generation as f64);
            t.family(
                "farm_mirror_eligible",
                "gauge",
                "1 while this member's copy may become the live data by itself (complete and \
                 not older than the peer's).",
            )
            .sample("farm_mirror_eligible", &[], m.eligible as u8 as f64);
            if let Some(r) = &m.replication {
                t.family(
                    "farm_mirror_in_sync",
                    "gauge",
                    "1 while the primary's replica is in sync (fsync covers both members).",
                )
                .sample(
                    "farm_mirror_in_sync",
                    &[],
                    (*r == crate::mirror::Replication::InSync) as u8 as f64,
                );
                t.family(
                    "farm_mirror_lag_bytes",
                    "gauge",
                    "File data shipped but not yet durable on the secondary.",
                )
                .sample("farm_mirror_lag_bytes", &[], m.lag_bytes as f64);
                t.family(
                    "farm_mirror_lag_seconds",
                    "gauge",
                    "Age of the oldest change not yet durable on the secondary.",
                )
                .sample("farm_mirror_lag_seconds", &[], m.lag_ms as f64 / 1000.0);
                t.family(
                    "farm_mirror_sent_bytes_total",
                    "counter",
                    "File data sent to the secondary (live changes and resyncs).",
                )
                .sample("farm_mirror_sent_bytes_total", &[], m.bytes_sent as f64);
            }
        }
        let now = std::time::Instant::now();
        t.family(
            "farm_check_passing",
            "gauge",
            "1 while a health check passes (after rise/fall).",
        );
        let checks = self.node.health.status(now);
        for ch in &checks {
            t.sample(
                "farm_check_passing",
                &[("check", &ch.name)],
                (ch.state == crate::checks::CheckState::Passing) as u8 as f64,
            );
        }
        t.family(
            "farm_healthy",
            "gauge",
            "1 while every health check passes.",
        )
        .sample("farm_healthy", &[], self.node.health.healthy() as u8 as f64);
        t.family(
            "farm_handover_connections_left",
            "gauge",
            "Connections this member still holds in buckets it hands over.",
        )
        .sample(
            "farm_handover_connections_left",
            &[],
            self.node
                .handover
                .progress()
                .map_or(0, |p| p.connections_left) as f64,
        );
        Ok(t.finish())
    }

    fn simulate_failure(&self, member: &str) -> Response {
        let Some(i) = self.cfg.members.iter().position(|m| m.id == member) else {
            return Response::Error {
                message: format!(
                    "{member:?} is not a member; members: {}",
                    self.cfg
                        .members
                        .iter()
                        .map(|m| m.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
        };
        let mut candidates = self.node.membership.candidates();
        candidates[i].serving = false;
        let alg = self
            .node
            .handover
            .algorithm(self.node.handover.applied.weights);
        let after = assign::assign_with(alg, &self.hash_key, &candidates);
        let mut moves = vec![0usize; self.cfg.members.len()];
        let (mut buckets, mut others_moved) = (0, 0);
        for (&now, &then) in self.node.owners().iter().zip(&after) {
            if now as usize == i {
                buckets += 1;
                if let Some(m) = moves.get_mut(then as usize) {
                    *m += 1;
                }
            } else if now != then {
                others_moved += 1;
            }
        }
        let quorum_after = self
            .node
            .membership
            .quorum_without(i, self.cluster.witness_reachable().unwrap_or(false));
        Response::Simulation(crate::control::Simulation {
            member: member.into(),
            buckets,
            moves: self
                .cfg
                .members
                .iter()
                .zip(moves)
                .filter(|(_, c)| *c > 0)
                .map(|(m, c)| (m.id.clone(), c))
                .collect(),
            others_moved,
            quorum_after,
        })
    }

    fn owner_name(&self, bucket: u32) -> Option<String> {
        self.cfg
            .members
            .get(*self.node.owners().get(bucket as usize)? as usize)
            .map(|m| m.id.clone())
    }

    fn whois(&self, client: &str) -> WhoisEntry {
        let (ip, port) = match parse_client(client) {
            Ok(x) => x,
            Err(e) => {
                return WhoisEntry {
                    client: client.into(),
                    by_client: None,
                    by_connection: None,
                    error: Some(e),
                };
            }
        };
        let place = |k: BucketKey| {
            let bucket = bucket_of(&self.hash_key, k);
            Placement {
                bucket,
                owner: self.owner_name(bucket),
            }
        };
        let (by_client, by_connection) = match ip {
            IpAddr::V4(a) => (
                place(BucketKey::V4(a.octets())),
                port.map(|p| place(BucketKey::V4Port(a.octets(), p.to_be_bytes()))),
            ),
            IpAddr::V6(a) => (
                place(BucketKey::V6(a.octets())),
                port.map(|p| place(BucketKey::V6Port(a.octets(), p.to_be_bytes()))),
            ),
        };
        WhoisEntry {
            client: client.into(),
            by_client: Some(by_client),
            by_connection,
            error: None,
        }
    }

    fn heartbeat_status(&self) -> HeartbeatStatus {
        let m = &self.node.membership;
        let now = std::time::Instant::now();
        let nets = self.cfg.me().heartbeat_addrs.len();
        HeartbeatStatus {
            interval_ms: self.cfg.heartbeat.interval.as_millis() as u64,
            loss_threshold: self.cfg.heartbeat.loss_threshold,
            networks: (0..nets)
                .map(|net| NetworkStatus {
                    index: net,
                    peers_heard: (0..m.peers.len())
                        .filter(|&i| i != m.me && m.network_alive(i, net, now))
                        .count(),
                    peers: m.peers.len() - 1,
                })
                .collect(),
            counters: self.cluster.counters(),
            witness: self.cluster.witness_addr().map(|address| WitnessStatus {
                address,
                reachable: self.cluster.witness_reachable().unwrap_or(false),
            }),
            lateness: self.cluster.lateness(),
            scheduling: self.cluster.scheduling(),
            main_loop_stalled: self.cluster.stalled(),
        }
    }

    fn status(&self) -> Result<Status, DaemonError> {
        let shares = assign::shares(self.node.owners(), self.cfg.members.len());
        let members = self
            .cfg
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| MemberStatus {
                id: m.id.clone(),
                address: m.address,
                weight: m.weight,
                state: self.node.member_state(i, &shares),
                buckets: shares[i],
                this_node: i == self.cfg.me,
                heartbeat_version: if i == self.cfg.me {
                    crate::heartbeat::VERSION
                } else {
                    self.node.membership.peers[i].version
                },
            })
            .collect();
        let vips = self
            .cfg
            .vips
            .iter()
            .map(|v| VipStatus {
                address: v.address,
                rules: v.rules.iter().map(ToString::to_string).collect(),
            })
            .collect();
        let stats = self.dp.stats()?;
        let traffic = Traffic {
            accepted_packets: stats["accepted_packets"],
            accepted_bytes: stats["accepted_bytes"],
            dropped_packets: stats["dropped_packets"],
            dropped_bytes: stats["dropped_bytes"],
        };
        let counters = stats
            .into_iter()
            .filter(|(k, _)| !k.starts_with("accepted_") && !k.starts_with("dropped_"))
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let ctl = self.dp.control();
        let departed = self.node.membership.departed();
        Ok(Status {
            node: self.cfg.node_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            took_over_from: self.took_over_from,
            xdp_link_id: self.xdp_ids.0,
            xdp_program_id: self.xdp_ids.1,
            departed: self
                .cfg
                .members
                .iter()
                .enumerate()
                .filter(|(i, _)| departed & (1 << i) != 0)
                .map(|(_, m)| m.id.clone())
                .collect(),
            interface: self.cfg.interface.clone(),
            xdp_mode: self.dp.xdp_mode.unwrap_or("detached").into(),
            cluster_mac: format_mac(&self.cluster_mac),
            mac_mode: match self.cfg.mac_mode {
                MacMode::Unicast => "unicast".into(),
                MacMode::Multicast => "multicast".into(),
            },
            deadman_timeout_ms: self.cfg.deadman_timeout.as_millis() as u64,
            serving: ctl.deadline_ns != 0 && ctl.deadline_ns >= dataplane::coarse_now_ns(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            buckets_total: BUCKETS,
            quorum: self.node.quorum(),
            handover: self.node.handover.progress(),
            drill: self.drill_report(),
            mirror: self.mirror.as_ref().map(|g| g.status(self.mirror_view())),
            queued: self.node.queued().map(|p| match self.node.describe_move() {
                Some(why) => format!("{} (waits: {why})", p.name()),
                None => p.name().into(),
            }),
            stopping: self.node.stopping(),
            checks_failing: self.node.health.failing(),
            failovers: self.failovers,
            last_failover: self.last_failover.as_ref().map(|(m, d, at)| {
                crate::control::FailoverInfo {
                    member: m.clone(),
                    duration_ms: d.as_millis() as u64,
                    ago_s: at.elapsed().as_secs_f64(),
                }
            }),
            view_digest: format!("{:016x}", self.node.membership.view_digest()),
            heartbeat: self.heartbeat_status(),
            members,
            vips,
            traffic,
            counters,
        })
    }
}
