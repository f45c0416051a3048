//! The heartbeat runtime. Heartbeats never wait for anything else farmd does: sending,
//! receiving, authenticating and judging liveness run on a thread of their own
//! (`farm-heartbeat`, a single-threaded tokio runtime), scheduled with a real-time policy
//! (`heartbeat.scheduling`, `fifo` priority 10 by default) with farmd's memory locked, and that
//! thread also refreshes the dead-man deadline. Nothing on it scans, blocks on the main loop or
//! logs per datagram.
//!
//! The main loop holds a [`Cluster`]: it publishes what this member announces (its state, where
//! its bucket moves stand, a drill order, the mirror group's state) and takes in [`Update`]s
//! (the peers as the thread last judged them, quorum, and what changed). Liveness is judged on
//! each datagram's arrival time (the kernel's receive timestamp), so even a late judgement is a
//! right one.
//!
//! Keeping the true positives: the main loop stamps a watchdog as it goes round; when it has
//! made no progress for [`stall_limit`] (farmd hung while its heartbeat thread runs), the thread
//! goes silent and lets the dead-man switch lapse, so the peers take this member's buckets as
//! they would a crashed one's. A farmd stopped as a whole (SIGSTOP) sends nothing anyway.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    io::Interest,
    net::UdpSocket,
    sync::mpsc::{self, UnboundedReceiver, UnboundedSender},
};

use crate::{
    config::{Config, Policy, Scheduling},
    dataplane::Deadman,
    handover::Announce,
    heartbeat::{self, Heartbeat, MirrorBeat, Reject, State},
    lateness::{Histogram, Lateness},
    membership::{Event, Membership, config_digest},
    ticker::Ticker,
    witness::{Witness, WitnessError},
};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "cannot bind the heartbeat socket {addr} (network {net}): {source}; is {ip} an address \
         of this host? (cluster.members: this node's address / heartbeat_addresses)",
        ip = addr.ip()
    )]
    Bind {
        addr: SocketAddr,
        net: usize,
        source: std::io::Error,
    },
    #[error(transparent)]
    Witness(#[from] WitnessError),
    #[error("the heartbeat thread's timers: {0}")]
    Ticker(#[from] crate::ticker::TickerError),
    #[error("cannot start the heartbeat thread: {0}")]
    Thread(std::io::Error),
    #[error("taking over the heartbeat sockets: {0}")]
    Handover(String),
}

/// Heartbeat traffic counters.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Per peer id, per network: sent and accepted.
    pub sent: BTreeMap<String, Vec<u64>>,
    pub received: BTreeMap<String, Vec<u64>>,
    /// Per peer id, per network: heartbeats the peer sent that never arrived on that network
    /// (gaps in its sequence numbers; a silent peer sends nothing and loses nothing).
    #[serde(default)]
    pub lost: BTreeMap<String, Vec<u64>>,
    /// Per peer id, per network: the most heartbeats lost in a row (a peer is declared lost
    /// when a whole loss window's worth, `loss_threshold`, never arrives on any network).
    #[serde(default)]
    pub longest_gap: BTreeMap<String, Vec<u64>>,
    /// Rejected datagrams by reason.
    pub rejected: BTreeMap<String, u64>,
    /// Peers declared lost (silent for the loss window; planned departures are not counted).
    pub peers_lost: u64,
    /// Peers that announced they were leaving (a planned stop).
    #[serde(default)]
    pub peers_left: u64,
}

/// How the heartbeat thread runs, as it turned out (a policy the host refuses is reported,
/// and the thread runs on at normal priority).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SchedulingStatus {
    /// `fifo`, `rr` or `other`: the policy in force.
    pub policy: String,
    pub priority: i32,
    pub memory_locked: bool,
    /// What the host refused, if anything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// What this member announces in its heartbeats, as the main loop last published it (see
/// `node::Node::outgoing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing {
    pub state: State,
    pub announce: Announce,
    pub config_digest: u64,
    pub drill: Option<(u32, u8)>,
    pub mirror: MirrorBeat,
    /// Sends nothing and lets the dead-man switch lapse (a member playing crashed in a drill).
    pub silent: bool,
}

/// Shared between the main loop and the heartbeat thread; every lock is held for a copy.
struct Shared {
    outgoing: Mutex<Outgoing>,
    counters: Mutex<Counters>,
    lateness: Mutex<Lateness>,
    scheduling: Mutex<SchedulingStatus>,
    /// Milliseconds since `base` at which the main loop last went round (the watchdog).
    main_beat: AtomicU64,
    base: Instant,
    /// Set while the thread holds this member silent because the main loop stalled.
    stalled: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Orders from the main loop to the heartbeat thread.
enum Command {
    /// Send a round now (what is announced changed: peers act on it a message's latency later,
    /// not a heartbeat interval).
    SendNow,
    /// Start over as a restarted farmd (a new incarnation).
    Restart,
    /// New timers after a reload.
    Timers {
        interval: Duration,
        loss_window: Duration,
        deadman_timeout: Duration,
    },
    /// Weights changed by a reload.
    Weights(Vec<u32>),
    /// The member list changed by a reload: (id, weight) and heartbeat addresses per member.
    Members(Vec<(String, u32)>, Vec<Vec<SocketAddr>>),
    Stop,
    /// An in-place upgrade: hand the membership over (sequence included) and send nothing
    /// until told whether the new farmd took over (the thread ends, without a `leaving`) or
    /// not (it goes on).
    Pause {
        snapshot: std::sync::mpsc::Sender<Membership>,
        verdict: std::sync::mpsc::Receiver<Verdict>,
    },
}

/// What becomes of a paused heartbeat thread (see `Cluster::pause`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The new farmd took over: end without a word.
    Exit,
    /// It did not: go on, numbering after whatever the new one may have sent.
    Resume { seq_after: u64 },
}

/// What the heartbeat thread hands the main loop.
pub type Update = crate::node::PeerUpdate;

/// How long the main loop may make no progress before the heartbeat thread takes this member
/// out (silent, dead-man switch lapsed): a hung farmd must not look alive for long. Generous
/// (30 s, as service watchdogs go): a member whose main loop is merely slow on a saturated host
/// (planning a map, a slow netlink answer) must not be taken out, since that is exactly the
/// false failover the heartbeat thread exists to prevent.
pub fn stall_limit(loss_window: Duration) -> Duration {
    (loss_window * 20).max(Duration::from_secs(30))
}

/// The main loop's side of the heartbeat runtime: an I/O handle (the rules that use what the
/// thread judges are the node core's, `node`).
pub struct Cluster {
    shared: Arc<Shared>,
    commands: UnboundedSender<Command>,
    /// Until `start`: the thread's state, and its end of the command channel.
    io: Option<(Io, UnboundedReceiver<Command>)>,
    thread: Option<std::thread::JoinHandle<()>>,
    witness: Option<Arc<Witness>>,
    witness_window: Duration,
    /// Copies of the heartbeat sockets, for an in-place upgrade to hand over.
    socket_copies: Vec<std::net::UdpSocket>,
}

/// The heartbeat thread's state.
struct Io {
    membership: Membership,
    key: [u8; 32],
    /// Where the incarnation is kept.
    state_dir: PathBuf,
    sockets: Vec<std::net::UdpSocket>,
    /// Per peer, per network: where its heartbeats go.
    peer_addrs: Vec<Vec<SocketAddr>>,
    /// A peer's new incarnation was heard: answer its challenge with a round at once.
    answer_now: bool,
    witness: Option<Arc<Witness>>,
    witness_window: Duration,
    interval: Duration,
    deadman_timeout: Duration,
    shared: Arc<Shared>,
    /// The thread's own copies: it never waits for a lock the main loop holds (a main thread
    /// preempted while holding one would otherwise hold heartbeats up: priority inversion).
    /// What it announces is refreshed with `try_lock`; counters and lateness are published the
    /// same way.
    out: Outgoing,
    counters: Counters,
    lateness: Lateness,
}

/// Where a member's last incarnation is kept.
fn incarnation_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join(format!("incarnation-{id}"))
}

/// A new incarnation, larger than every earlier one of this member: one more than the last
/// (kept in the state directory, written and synced before the first heartbeat) and never
/// below the wall clock in nanoseconds (the floor when the state directory is new: a reboot
/// empties `/run`). So a clock that once ran ahead cannot make an old capture look newer, and
/// peers never need to forget a sender's replay guard.
fn new_incarnation(state_dir: &Path, id: &str, at_least: u64) -> u64 {
    let path = incarnation_path(state_dir, id);
    let last = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let clock = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let next = clock.max(last.saturating_add(1)).max(at_least);
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(state_dir)?;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, format!("{next}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    if let Err(e) = write() {
        tracing::warn!(
            "cannot keep the heartbeat incarnation in {}: {e}; using the wall clock alone (a \
             clock set back makes peers refuse this member until they restart)",
            path.display()
        );
    }
    next
}

impl Cluster {
    /// Binds the heartbeat sockets (before anything on the host is changed); the thread starts
    /// with `start`.
    pub fn bind(cfg: &Config, key: [u8; 32]) -> Result<Self, ClusterError> {
        let me = cfg.me();
        let mut sockets = Vec::new();
        for (net, ip) in me.heartbeat_addrs.iter().enumerate() {
            let addr = SocketAddr::new(*ip, cfg.heartbeat.port);
            let bind_err = |source| ClusterError::Bind { addr, net, source };
            let s = std::net::UdpSocket::bind(addr).map_err(bind_err)?;
            s.set_nonblocking(true).map_err(bind_err)?;
            if let Err(e) = crate::packet::enable_rx_timestamps(&s) {
                tracing::warn!(
                    "heartbeat socket {addr}: no receive timestamps ({e}); lateness is measured \
                     from when the thread reads a datagram"
                );
            }
            sockets.push(s);
        }
        Self::with_sockets(cfg, key, sockets, None, None)
    }

    /// Takes over a previous farmd's heartbeat sockets and membership (an in-place upgrade):
    /// the same incarnation, the sequence going on, the peers as it last judged them.
    pub fn adopt(
        cfg: &Config,
        key: [u8; 32],
        sockets: Vec<std::net::UdpSocket>,
        membership: Membership,
        out: Outgoing,
    ) -> Result<Self, ClusterError> {
        let expected = cfg.me().heartbeat_addrs.len();
        if sockets.len() != expected {
            return Err(ClusterError::Handover(format!(
                "{} heartbeat socket(s) handed over, the configuration has {expected} networks",
                sockets.len()
            )));
        }
        for (net, s) in sockets.iter().enumerate() {
            let want = SocketAddr::new(cfg.me().heartbeat_addrs[net], cfg.heartbeat.port);
            match s.local_addr() {
                Ok(a) if a == want => {}
                other => {
                    return Err(ClusterError::Handover(format!(
                        "heartbeat socket {net} is bound to {other:?}, not {want}"
                    )));
                }
            }
            s.set_nonblocking(true)
                .map_err(|e| ClusterError::Handover(e.to_string()))?;
        }
        if membership.peers.len() != cfg.members.len() || membership.me != cfg.me {
            return Err(ClusterError::Handover(
                "the member list handed over is not this configuration's".into(),
            ));
        }
        // The first round goes out with what the node core announces, never as joining.
        Self::with_sockets(cfg, key, sockets, Some(membership), Some(out))
    }

    fn with_sockets(
        cfg: &Config,
        key: [u8; 32],
        sockets: Vec<std::net::UdpSocket>,
        adopted: Option<Membership>,
        out: Option<Outgoing>,
    ) -> Result<Self, ClusterError> {
        let me = cfg.me();
        let networks = me.heartbeat_addrs.len();
        let socket_copies = sockets
            .iter()
            .map(std::net::UdpSocket::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClusterError::Handover(format!("copying a heartbeat socket: {e}")))?;
        let members: Vec<(String, u32)> = cfg
            .members
            .iter()
            .map(|m| (m.id.clone(), m.weight))
            .collect();
        let peer_addrs = peer_addrs(cfg);
        let loss_window = cfg.heartbeat.loss_window();
        let witness = match cfg.witness {
            Some(w) => Some(Arc::new(Witness::start(
                w,
                cfg.heartbeat.interval.max(Duration::from_millis(100)),
            )?)),
            None => None,
        };
        let witness_window = loss_window.max(Duration::from_millis(500));
        let mut counters = Counters::default();
        for m in &cfg.members {
            counters.sent.insert(m.id.clone(), vec![0; networks]);
            counters.received.insert(m.id.clone(), vec![0; networks]);
            counters.lost.insert(m.id.clone(), vec![0; networks]);
            counters.longest_gap.insert(m.id.clone(), vec![0; networks]);
        }
        for r in Reject::ALL {
            counters.rejected.insert(r.name().into(), 0);
        }
        let digest = config_digest(&members);
        let state_dir = cfg.state_dir.clone();
        let mut membership = match adopted {
            Some(m) => m,
            None => {
                let mut m = Membership::new(
                    &members,
                    cfg.me,
                    networks,
                    loss_window,
                    cfg.witness.is_some(),
                );
                m.incarnation = new_incarnation(&state_dir, &me.id, 0);
                m
            }
        };
        membership.set_timers(cfg.heartbeat.interval, loss_window);
        let shared = Arc::new(Shared {
            outgoing: Mutex::new(out.unwrap_or(Outgoing {
                state: State::Joining,
                announce: Announce::default(),
                config_digest: digest,
                drill: None,
                mirror: MirrorBeat::default(),
                silent: false,
            })),
            counters: Mutex::new(counters),
            lateness: Mutex::new(Lateness::default()),
            scheduling: Mutex::new(SchedulingStatus::default()),
            main_beat: AtomicU64::new(0),
            base: Instant::now(),
            stalled: AtomicBool::new(false),
        });
        let (commands, command_rx) = mpsc::unbounded_channel();
        let io = Io {
            membership,
            key,
            state_dir,
            sockets,
            peer_addrs,
            answer_now: false,
            witness: witness.clone(),
            witness_window,
            interval: cfg.heartbeat.interval,
            deadman_timeout: cfg.deadman_timeout,
            out: *lock(&shared.outgoing),
            counters: lock(&shared.counters).clone(),
            lateness: Lateness::default(),
            shared: shared.clone(),
        };
        Ok(Self {
            shared,
            commands,
            io: Some((io, command_rx)),
            thread: None,
            witness,
            witness_window,
            socket_copies,
        })
    }

    /// The heartbeat sockets, for an in-place upgrade to hand over.
    pub fn sockets(&self) -> &[std::net::UdpSocket] {
        &self.socket_copies
    }

    /// Pauses the heartbeat thread for an in-place upgrade: it hands its membership over
    /// (`None`: it did not answer within a second) and sends nothing until `verdict` says.
    pub fn pause(&self, verdict: std::sync::mpsc::Receiver<Verdict>) -> Option<Membership> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.commands
            .send(Command::Pause {
                snapshot: tx,
                verdict,
            })
            .ok()?;
        rx.recv_timeout(Duration::from_secs(1)).ok()
    }

    /// After the new farmd took over: the thread has ended (told so by its verdict).
    pub fn join_ended(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Starts the heartbeat thread: from now on it sends, receives, judges liveness and keeps
    /// `deadman` armed. Returns the channel of its updates.
    pub fn start(
        &mut self,
        deadman: Deadman,
        scheduling: Scheduling,
    ) -> Result<UnboundedReceiver<Update>, ClusterError> {
        let (io, commands) = self.io.take().expect("started once");
        let (tx, rx) = mpsc::unbounded_channel();
        self.stamp();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClusterError::Thread)?;
        // The send tick and the liveness judgement's timer, on the kernel's clock (see
        // `ticker`); the first send at once, so the peers hear this member as it starts.
        let (send, live) = {
            let _in_rt = rt.enter();
            let mut t = Ticker::new(io.interval)?;
            t.reset_after(Duration::ZERO)?;
            (t, Ticker::new(io.interval * 2)?)
        };
        let thread = std::thread::Builder::new()
            .name("farm-heartbeat".into())
            .spawn(move || {
                let status = apply_scheduling(scheduling);
                *lock(&io.shared.scheduling) = status;
                rt.block_on(io.run(commands, tx, deadman, send, live));
            })
            .map_err(ClusterError::Thread)?;
        self.thread = Some(thread);
        let s = self.scheduling();
        for p in &s.problems {
            tracing::warn!("heartbeat thread: {p}");
        }
        Ok(rx)
    }

    /// The heartbeat thread's scheduling, as it turned out (waits briefly for the thread to
    /// have set it).
    pub fn scheduling(&self) -> SchedulingStatus {
        for _ in 0..100 {
            let s = lock(&self.shared.scheduling).clone();
            if !s.policy.is_empty() || self.thread.is_none() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        lock(&self.shared.scheduling).clone()
    }

    /// Tells the watchdog that the main loop makes progress.
    pub fn stamp(&self) {
        let ms = self.shared.base.elapsed().as_millis() as u64;
        self.shared.main_beat.store(ms, Ordering::Relaxed);
    }

    /// Publishes what this member announces; the heartbeat thread sends it on its own timer.
    pub fn publish(&self, o: Outgoing) {
        *lock(&self.shared.outgoing) = o;
    }

    /// Sends a round at once (what is announced changed).
    pub fn send_now(&self) {
        let _ = self.commands.send(Command::SendNow);
    }

    /// A reload's heartbeat timers.
    pub fn set_timers(&mut self, interval: Duration, loss_window: Duration, deadman: Duration) {
        self.witness_window = loss_window.max(Duration::from_millis(500));
        let _ = self.commands.send(Command::Timers {
            interval,
            loss_window,
            deadman_timeout: deadman,
        });
    }

    /// A reload's weights (in member order).
    pub fn set_weights(&self, weights: Vec<u32>) {
        let _ = self.commands.send(Command::Weights(weights));
    }

    /// Starts over as a restarted farmd would (after playing a crashed member in a drill): a
    /// new incarnation and sequence.
    /// The member list changed live (see `Membership::set_members`).
    pub fn set_members(&self, cfg: &Config) {
        let members = cfg
            .members
            .iter()
            .map(|m| (m.id.clone(), m.weight))
            .collect();
        let _ = self
            .commands
            .send(Command::Members(members, peer_addrs(cfg)));
    }

    pub fn restart(&self) {
        let _ = self.commands.send(Command::Restart);
    }

    /// Stops the heartbeat thread (after announcing `leaving`).
    pub fn stop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn counters(&self) -> Counters {
        lock(&self.shared.counters).clone()
    }

    pub fn lateness(&self) -> Lateness {
        lock(&self.shared.lateness).clone()
    }

    /// Whether the heartbeat thread holds this member silent because the main loop stalled.
    pub fn stalled(&self) -> bool {
        self.shared.stalled.load(Ordering::Relaxed)
    }

    pub fn witness_addr(&self) -> Option<IpAddr> {
        self.witness.as_ref().map(|w| w.addr)
    }

    pub fn witness_reachable(&self) -> Option<bool> {
        self.witness
            .as_ref()
            .map(|w| w.reachable(self.witness_window))
    }
}

/// Sets the calling thread's scheduling policy and locks the process's memory, as configured;
/// what the host refuses is reported, not fatal (a container may forbid real-time
/// scheduling: heartbeats then run at normal priority, which status and the log say).
fn apply_scheduling(s: Scheduling) -> SchedulingStatus {
    let mut status = SchedulingStatus {
        policy: Policy::Other.name().into(),
        priority: 0,
        memory_locked: false,
        problems: Vec::new(),
    };
    if s.lock_memory {
        // MCL_ONFAULT: pages are locked as they are touched, so locking does not inflate the
        // resident size with every mapping's untouched pages.
        // SAFETY: mlockall has no memory-safety preconditions.
        let r = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
        if r == 0 {
            status.memory_locked = true;
        } else {
            status.problems.push(format!(
                "cannot lock memory ({}); heartbeats may wait for pages swapped out (needs \
                 CAP_IPC_LOCK or LimitMEMLOCK=infinity; heartbeat.lock_memory = false silences \
                 this)",
                std::io::Error::last_os_error()
            ));
        }
    }
    let policy = match s.policy {
        Policy::Fifo => Some(libc::SCHED_FIFO),
        Policy::RoundRobin => Some(libc::SCHED_RR),
        Policy::Other => None,
    };
    if let Some(p) = policy {
        let param = libc::sched_param {
            sched_priority: s.priority,
        };
        // SAFETY: pid 0 is the calling thread; param is a valid sched_param.
        let r = unsafe { libc::sched_setscheduler(0, p | libc::SCHED_RESET_ON_FORK, &param) };
        if r == 0 {
            status.policy = s.policy.name().into();
            status.priority = s.priority;
        } else {
            status.problems.push(format!(
                "cannot use the real-time policy {} priority {} ({}); heartbeats run at normal \
                 priority and a saturated host can delay them (needs CAP_SYS_NICE, and under \
                 systemd RestrictRealtime=no; heartbeat.scheduling = \"other\" silences this)",
                s.policy.name(),
                s.priority,
                std::io::Error::last_os_error()
            ));
        }
    }
    status
}

/// A datagram as the socket reader hands it to the thread's loop.
struct Received {
    net: usize,
    /// The datagram's source.
    from: SocketAddr,
    bytes: Vec<u8>,
    /// When it arrived (the kernel's timestamp, on the monotonic clock).
    arrived: Instant,
}

impl Received {
    /// Reads one datagram from heartbeat network `net`'s socket without blocking.
    fn read(sock: &UdpSocket, net: usize, buf: &mut [u8]) -> std::io::Result<Self> {
        let (n, from, waited) = crate::packet::recv_timestamped(&sock.as_raw_fd(), buf)?;
        let now = Instant::now();
        Ok(Self {
            net,
            from,
            bytes: buf[..n].to_vec(),
            arrived: now.checked_sub(waited).unwrap_or(now),
        })
    }
}

fn interval_timer(period: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval(period);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

impl Io {
    async fn run(
        mut self,
        mut commands: UnboundedReceiver<Command>,
        updates: UnboundedSender<Update>,
        deadman: Deadman,
        mut send: Ticker,
        mut live: Ticker,
    ) {
        let (tx, mut datagrams) = mpsc::channel::<Received>(1024);
        let mut readers = Vec::new();
        for (net, s) in std::mem::take(&mut self.sockets).into_iter().enumerate() {
            let s = match UdpSocket::from_std(s) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(network = net, "heartbeat socket: {e}");
                    continue;
                }
            };
            let s = Arc::new(s);
            let (rs, tx) = (s.clone(), tx.clone());
            readers.push(s);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                loop {
                    let r = rs
                        .async_io(Interest::READABLE, || Received::read(&rs, net, &mut buf))
                        .await;
                    let Ok(d) = r else {
                        continue;
                    };
                    if tx.send(d).await.is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        // Liveness is judged when the first peer alive would lapse, and at least once per
        // heartbeat interval (a peer heard again, the witness, the published statistics): not
        // on a fast poll, which woke this thread 200 times a second on an idle farm.
        // The send tick also judges (in the same wake-up), and refreshes the dead-man switch
        // when it comes often enough: an idle farmd's heartbeat thread wakes for its sends and
        // its peers' heartbeats only.
        // Both on the kernel's clock (see `ticker`): a tokio timer pushed later at every
        // judgement stays in its first slot of the timer wheel and woke the thread there, ~13
        // times a second at rest.
        let next_judgement = |io: &Self, live: &mut Ticker| {
            let now = Instant::now();
            let cap = io.interval * 2;
            let after = io
                .membership
                .next_lapse()
                .map_or(cap, |t| t.saturating_duration_since(now).min(cap));
            if let Err(e) = live.reset_after(after) {
                tracing::error!("liveness timer: {e}");
            }
        };
        next_judgement(&self, &mut live);
        let arm_period = |d: Duration| (d / 5).max(Duration::from_millis(10));
        let mut arm = interval_timer(arm_period(self.deadman_timeout));
        let mut pending: Vec<Event> = Vec::new();
        // Heartbeats taken in that the main loop has not been sent yet.
        let mut refresh = false;
        // A judgement is due once this turn's event is handled.
        let mut judge_now = false;
        let started = Instant::now();
        let mut buf = vec![0u8; 2048];
        loop {
            tokio::select! {
                due = send.tick() => {
                    let late = due.elapsed();
                    self.lateness.send.record(late);
                    self.send_round(&readers);
                    if self.interval <= arm_period(self.deadman_timeout) {
                        self.arm(&deadman);
                    }
                    // Judged in this same wake-up (below): a timer reset to now would be
                    // rounded up to the timer wheel's next millisecond, a second wake-up per
                    // send.
                    judge_now = true;
                }
                _ = arm.tick(), if self.interval > arm_period(self.deadman_timeout) => {
                    self.arm(&deadman);
                }
                Some(d) = datagrams.recv() => {
                    if let Some(urgent) = self.take_in(&d, started) {
                        // A peer that announced it leaves is out at once: judge now.
                        pending.extend(self.judge());
                        if urgent || !pending.is_empty() {
                            let events = std::mem::take(&mut pending);
                            let _ = updates.send(self.update(events, true));
                            refresh = false;
                        } else {
                            // Nothing the main loop acts on: the peers' latest heartbeats go
                            // with the next judgement (within one interval), not one wake-up
                            // of the main loop per datagram.
                            refresh = true;
                        }
                    }
                }
                _ = live.tick() => judge_now = true,
                cmd = commands.recv() => match cmd {
                    Some(Command::SendNow) => self.send_round(&readers),
                    Some(Command::Restart) => {
                        let m = &mut self.membership;
                        let id = &m.peers[m.me].id;
                        m.incarnation = new_incarnation(&self.state_dir, id, m.incarnation + 1);
                        m.seq = 0;
                    }
                    Some(Command::Timers { interval, loss_window, deadman_timeout }) => {
                        if interval != self.interval {
                            self.interval = interval;
                            if let Err(e) = send
                                .set_period(interval)
                                .and_then(|()| live.set_period(interval * 2))
                            {
                                tracing::error!("heartbeat interval {interval:?}: {e}");
                            }
                        }
                        if deadman_timeout != self.deadman_timeout {
                            self.deadman_timeout = deadman_timeout;
                            arm = interval_timer(arm_period(deadman_timeout));
                        }
                        self.membership.set_timers(interval, loss_window);
                        self.witness_window = loss_window.max(Duration::from_millis(500));
                        next_judgement(&self, &mut live);
                    }
                    Some(Command::Weights(w)) => {
                        for (p, w) in self.membership.peers.iter_mut().zip(w) {
                            p.weight = w;
                        }
                    }
                    Some(Command::Members(members, addrs)) => {
                        self.membership.set_members(&members);
                        self.peer_addrs = addrs;
                        let nets = readers.len();
                        let c = &mut self.counters;
                        for map in [
                            &mut c.sent,
                            &mut c.received,
                            &mut c.lost,
                            &mut c.longest_gap,
                        ] {
                            map.retain(|id, _| members.iter().any(|(m, _)| m == id));
                            for (id, _) in &members {
                                map.entry(id.clone()).or_insert_with(|| vec![0; nets]);
                            }
                        }
                        // The new members hear from this one at once.
                        self.answer_now = true;
                    }
                    Some(Command::Pause { snapshot, verdict }) => {
                    // What was read already is taken in; what waits in the sockets is the
                    // new farmd's to read.
                    while let Ok(d) = datagrams.try_recv() {
                        self.take_in(&d, started);
                    }
                    if snapshot.send(self.membership.clone()).is_err() {
                        continue;
                    }
                    // Nothing runs on this thread meanwhile: no heartbeat goes out with a
                    // sequence the new farmd may use too.
                    match verdict.recv_timeout(Duration::from_secs(30)) {
                        Ok(Verdict::Exit) => break,
                        Ok(Verdict::Resume { seq_after }) => {
                            let m = &mut self.membership;
                            m.seq = m.seq.max(seq_after);
                            tracing::info!("heartbeats resume (the upgrade did not happen)");
                            self.send_round(&readers);
                        }
                        Err(_) => {
                            let m = &mut self.membership;
                            m.seq += 100_000;
                            tracing::warn!("paused for an upgrade with no verdict: heartbeats resume");
                            self.send_round(&readers);
                        }
                    }
                }
                Some(Command::Stop) | None => break,
                },
            }
            if std::mem::take(&mut self.answer_now) {
                self.send_round(&readers);
            }
            if std::mem::take(&mut judge_now) {
                // Judge only after reading everything that arrived: a datagram waiting in the
                // channel or in a socket is a peer heard, whatever delayed this thread.
                let mut taken = false;
                let mut urgent = false;
                while let Ok(d) = datagrams.try_recv() {
                    if let Some(u) = self.take_in(&d, started) {
                        taken = true;
                        urgent |= u;
                    }
                }
                for (net, sock) in readers.iter().enumerate() {
                    while let Ok(d) = Received::read(sock, net, &mut buf) {
                        if let Some(u) = self.take_in(&d, started) {
                            taken = true;
                            urgent |= u;
                        }
                    }
                }
                pending.extend(self.judge());
                self.publish_stats();
                if !pending.is_empty() || taken || refresh {
                    refresh = false;
                    let events = std::mem::take(&mut pending);
                    let urgent = urgent || !events.is_empty();
                    let _ = updates.send(self.update(events, urgent));
                }
                next_judgement(&self, &mut live);
            }
        }
    }

    /// What the main loop last published (its copy when the lock is busy).
    fn outgoing(&mut self) -> Outgoing {
        if let Ok(o) = self.shared.outgoing.try_lock() {
            self.out = *o;
        }
        self.out
    }

    /// Publishes counters and lateness for status and metrics, unless the lock is busy.
    fn publish_stats(&self) {
        if let Ok(mut c) = self.shared.counters.try_lock() {
            c.clone_from(&self.counters);
        }
        if let Ok(mut l) = self.shared.lateness.try_lock() {
            l.clone_from(&self.lateness);
        }
    }

    /// Takes in one datagram: its lateness (datagrams queued while farmd was still setting the
    /// host up are judged at their arrival time but are not the thread's lateness), then the
    /// heartbeat (see `receive`).
    /// Refreshes the dead-man switch, unless this member is silent (held, or its main loop
    /// stalled). A busy lock (the main loop writes the tables) is skipped: the next refresh
    /// comes within a fifth of the timeout.
    fn arm(&mut self, deadman: &Deadman) {
        let out = self.outgoing();
        if !out.silent
            && !self.main_stalled()
            && let Some(Err(e)) = deadman.try_arm(self.deadman_timeout)
        {
            tracing::error!("refreshing the dead-man switch failed: {e}");
        }
    }

    fn take_in(&mut self, d: &Received, started: Instant) -> Option<bool> {
        if d.arrived >= started {
            self.lateness.receive.record(d.arrived.elapsed());
        }
        self.receive(d)
    }

    /// Whether the main loop has made no progress for the stall limit; logs the transitions.
    fn main_stalled(&self) -> bool {
        let now = self.shared.base.elapsed().as_millis() as u64;
        let beat = self.shared.main_beat.load(Ordering::Relaxed);
        let limit = stall_limit(self.membership.loss_window).as_millis() as u64;
        let stalled = now.saturating_sub(beat) > limit;
        let was = self.shared.stalled.swap(stalled, Ordering::Relaxed);
        if stalled && !was {
            tracing::error!(
                stalled_ms = now.saturating_sub(beat),
                "farmd's main loop makes no progress: going silent and letting the dead-man \
                 switch lapse, so that the peers take this member's buckets"
            );
        } else if was && !stalled {
            tracing::warn!("farmd's main loop goes on again: heartbeats resume");
        }
        stalled
    }

    fn update(&self, events: Vec<Event>, urgent: bool) -> Update {
        Update {
            peers: self.membership.peers.clone(),
            quorum: self.membership.has_quorum(),
            events,
            urgent,
        }
    }

    fn judge(&mut self) -> Vec<Event> {
        let witness = self
            .witness
            .as_ref()
            .is_some_and(|w| w.reachable(self.witness_window));
        let events = self.membership.tick(Instant::now(), witness);
        if !events.is_empty() {
            let c = &mut self.counters;
            for e in &events {
                match e {
                    Event::PeerLost { .. } => c.peers_lost += 1,
                    Event::PeerLeft { .. } => c.peers_left += 1,
                    _ => {}
                }
            }
        }
        events
    }

    /// Sends one heartbeat to every peer on every network.
    fn send_round(&mut self, sockets: &[Arc<UdpSocket>]) {
        let out = self.outgoing();
        if out.silent || self.main_stalled() {
            return;
        }
        self.membership.seq += 1;
        let me = self.membership.me;
        let mut sent = vec![vec![0u64; sockets.len()]; self.peer_addrs.len()];
        let mut hb = Heartbeat {
            version: heartbeat::VERSION,
            departed: self.membership.departed(),
            id: self.membership.peers[me].id.clone(),
            state: out.state,
            weight: self.membership.peers[me].weight as u16,
            incarnation: self.membership.incarnation,
            seq: self.membership.seq,
            applied: out.announce.applied,
            config_digest: out.config_digest,
            network: 0,
            settled: out.announce.settled,
            handed_over: out.announce.handed_over,
            released: out.announce.released,
            drill: out.drill,
            mirror: out.mirror,
            echo: (0, 0),
        };
        for (net, sock) in sockets.iter().enumerate() {
            hb.network = net as u8;
            for (i, addrs) in self.peer_addrs.iter().enumerate() {
                if i == me {
                    continue;
                }
                // Each peer gets its own challenge answered, in the newest version; a peer
                // whose current incarnation wrote only an older version (an earlier release
                // in a rolling upgrade) gets a copy in that version too, after it. Always
                // writing the newest means two upgraded members find each other whatever they
                // heard first; the newer reader drops the older copy (`Superseded`).
                let peer = &self.membership.peers[i];
                hb.echo = peer.heard;
                let older = (peer.version != 0 && peer.version < heartbeat::VERSION)
                    .then_some(peer.version.max(heartbeat::OLDEST));
                let mut any = false;
                for version in std::iter::once(heartbeat::VERSION).chain(older) {
                    hb.version = version;
                    let bytes = heartbeat::encode(&self.key, &hb);
                    // A full socket buffer loses one heartbeat, which the loss threshold
                    // absorbs.
                    any |= sock.try_send_to(&bytes, addrs[net]).is_ok();
                }
                sent[i][net] += u64::from(any);
            }
        }
        let c = &mut self.counters;
        for (i, per_net) in sent.iter().enumerate() {
            if let Some(v) = c.sent.get_mut(&self.membership.peers[i].id) {
                for (a, n) in v.iter_mut().zip(per_net) {
                    *a += n;
                }
            }
        }
    }

    /// Takes in one received datagram. `None` when rejected; else whether the main loop should
    /// act at once (the peer announced another move state, state, member list or drill).
    ///
    /// The cheap checks come first, so that a flood costs little: the format, a configured
    /// sender on the network it arrived on, its configured source address, not older than
    /// what was accepted (a replay); only then the HMAC, then the challenge's answer.
    fn receive(&mut self, d: &Received) -> Option<bool> {
        let result = heartbeat::parse(&d.bytes)
            .and_then(|hb| {
                let i = self.membership.admit(&hb, d.net)?;
                // Only from the address its heartbeats are sent to on that network.
                if self.peer_addrs[i].get(d.net).map(SocketAddr::ip) != Some(d.from.ip()) {
                    return Err(Reject::WrongSource);
                }
                heartbeat::authenticate(&self.key, &d.bytes)?;
                Ok((i, hb))
            })
            .and_then(|(i, hb)| {
                if self.membership.learn(i, hb.incarnation, hb.seq) {
                    self.answer_now = true;
                }
                // Answered in its version from now on, also when this one does not answer
                // this node's challenge yet: an older peer does not read the newer version,
                // so it could never answer it.
                let was = self.membership.peers[i].version;
                if let Some(now) = self.membership.learn_version(i, hb.incarnation, hb.version) {
                    if was != 0 {
                        tracing::info!(
                            member = %hb.id,
                            from = was,
                            to = now,
                            "member speaks another heartbeat version now: answering in it"
                        );
                    }
                    self.answer_now = true;
                }
                let before = self.membership.peers[i].state;
                self.membership
                    .receive_admitted(i, &hb, d.net, d.arrived)
                    .map(|r| (r, hb, before))
            });
        let c = &mut self.counters;
        match result {
            Ok((r, hb, before)) => {
                let i = r.index;
                let id = &self.membership.peers[i].id;
                if let Some(v) = c.received.get_mut(id) {
                    v[d.net] += 1;
                }
                // The sender numbers each round of heartbeats (one per network) in turn: a gap
                // on this network is heartbeats lost on it.
                if let Some((inc, seq)) = r.previous
                    && inc == hb.incarnation
                    && hb.seq > seq + 1
                {
                    let gap = hb.seq - seq - 1;
                    if let Some(v) = c.lost.get_mut(id) {
                        v[d.net] += gap;
                    }
                    if let Some(v) = c.longest_gap.get_mut(id) {
                        v[d.net] = v[d.net].max(gap);
                    }
                }
                let state_changed = before != Some(hb.state);
                Some(r.moved || r.digest_changed || state_changed)
            }
            Err(r) => {
                *c.rejected.entry(r.name().into()).or_default() += 1;
                None
            }
        }
    }
}

/// Where each member's heartbeats go, per network.
fn peer_addrs(cfg: &Config) -> Vec<Vec<SocketAddr>> {
    cfg.members
        .iter()
        .map(|m| {
            m.heartbeat_addrs
                .iter()
                .map(|ip| SocketAddr::new(*ip, cfg.heartbeat.port))
                .collect()
        })
        .collect()
}

/// p99 of a lateness histogram in milliseconds, for people.
pub fn p99_ms(h: &Histogram) -> f64 {
    h.quantile_us(0.99) as f64 / 1000.0
}
