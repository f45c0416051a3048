//! Mirror mode in farmd: which member of a two-member mirror group is primary (holds the whole
//! VIP, serves the replicated directory and runs the application), failover, planned swaps,
//! failback, and the rules that keep a single primary and never promote a stale copy.
//!
//! Each member announces its role, whether its copy is complete, its data generation and the
//! highest generation it has seen its peer announce (heartbeat `MirrorBeat`). The decision is a
//! pure function of what this member knows (`decide`), re-evaluated every heartbeat tick:
//!
//! - A **secondary** takes over when the primary has been silent for `failover_after`, this
//!   member has quorum (peer or witness) and its copy is *eligible*: complete, and of a
//!   generation at least as new as any the peer announced. It starts a new generation (the
//!   peer's copy lacks what is written from now on). When both are up and neither is primary
//!   (start, after a swap), the better claim takes the role: eligible first, then newer
//!   generation, then the one the other yields to, then the preferred member, then the lower
//!   member index; two complete copies of one generation need no new generation.
//! - A **primary** steps down when it loses quorum (it cannot know whether the other side takes
//!   over). When its replication breaks while the peer is alive, it starts a new generation,
//!   announces it and goes on alone only once the peer has recorded that generation (its copy is
//!   then known stale and cannot take over by itself): until then fsync waits, so nothing is
//!   acknowledged that the peer lacks. When the peer is gone (silent past `failover_after`) and
//!   this member has quorum, it goes on alone at once, with a new generation.
//! - A primary whose health checks fail, an operator's `farmctl mirror swap`, or the failback
//!   policy hand the role over: stop the application, flush everything to the secondary, unmount,
//!   become secondary yielding to the peer; the peer promotes without a new generation.
//! - Two primaries (a healed partition where both sides had the witness): the older generation
//!   (then the less preferred) steps down at once, loudly.
//!
//! Role changes run on a thread of their own (the application's commands may take a while);
//! the main loop keeps sending heartbeats meanwhile.

use std::{
    net::IpAddr,
    path::Path,
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use farm_mirror::{
    fs::MirrorFs,
    link::{Link, LinkStatus, Options, State as LinkState},
    replica::{Replica, Server, ServerStatus},
    state::{Facts, StateFile},
};

use crate::{
    config::{Failback, Mirror as MirrorConfig},
    heartbeat::{MirrorBeat, MirrorRole},
};

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error(transparent)]
    State(#[from] farm_mirror::state::StateError),
    #[error("preparing {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "mirror mode needs /dev/fuse ({0}); under systemd PrivateDevices=yes hides it: install \
         config/farmd-mirror.conf as /etc/systemd/system/farmd.service.d/mirror.conf (it binds \
         /dev/fuse in and allows it)"
    )]
    Fuse(std::io::Error),
    #[error(transparent)]
    Namespace(#[from] crate::mountns::MountNsError),
}

/// What this member knows when deciding.
#[derive(Debug, Clone)]
pub struct Situation {
    pub role: MirrorRole,
    /// A role change is running.
    pub changing: bool,
    pub facts: Facts,
    pub quorum: bool,
    /// The peer was heard within `failover_after`.
    pub peer_alive: bool,
    pub peer: MirrorBeat,
    /// Since farmd started.
    pub uptime: Duration,
    pub failover_after: Duration,
    /// The primary's link to its secondary.
    pub link: Option<LinkState>,
    /// How long the link has been in sync.
    pub in_sync_for: Duration,
    /// This member's health checks pass (or none are configured).
    pub healthy: bool,
    pub me_preferred: bool,
    /// This member's index is lower than the peer's.
    pub me_lower: bool,
    pub failback: Failback,
    /// A new generation announced, waiting for the peer to record it before going on alone.
    pub pending: Option<u64>,
    /// An operator asked for a swap here, or the peer asks for one.
    pub swap_requested: bool,
    /// This member yields the primary role to its peer (after a swap).
    pub yielding: bool,
}

/// What to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Nothing,
    /// Waiting for something, said in status.
    Wait(String),
    /// Become primary; `new_generation`: the peer's copy will lack what is written from now on.
    Promote {
        new_generation: bool,
        why: String,
    },
    /// Stop being primary; `yield_to_peer`: the peer is in sync and takes over (a swap).
    Demote {
        yield_to_peer: bool,
        why: String,
    },
    /// Replication broke with the peer alive: start a new generation and announce it.
    NewGeneration {
        why: String,
    },
    /// Go on alone at this (already announced) generation.
    GoAlone {
        generation: u64,
        why: String,
    },
}

/// How long a primary stays in sync before failing back to the preferred member.
pub const FAILBACK_AFTER: Duration = Duration::from_secs(5);

fn peer_eligible(p: &MirrorBeat) -> bool {
    p.has(MirrorBeat::COMPLETE) && p.generation >= p.seen
}

/// The mirror rules (see the module documentation). Pure.
pub fn decide(s: &Situation) -> Decision {
    if s.changing {
        return Decision::Nothing;
    }
    let peer_primary =
        s.peer_alive && matches!(s.peer.role, MirrorRole::Primary | MirrorRole::Stopping);
    match s.role {
        MirrorRole::Secondary | MirrorRole::None => {
            if peer_primary {
                return Decision::Nothing;
            }
            let eligible = s.facts.eligible();
            if !s.peer_alive {
                if s.uptime < s.failover_after {
                    return Decision::Wait("waiting for the peer".into());
                }
                if !eligible {
                    return Decision::Wait(not_eligible(&s.facts));
                }
                if !s.quorum {
                    return Decision::Wait(
                        "the peer is silent and this member has no quorum (witness unreachable)"
                            .into(),
                    );
                }
                return Decision::Promote {
                    new_generation: true,
                    why: format!(
                        "the primary has been silent for {} ms",
                        s.failover_after.as_millis()
                    ),
                };
            }
            // Both up, neither primary: the better claim takes the role.
            if !eligible {
                return Decision::Wait(not_eligible(&s.facts));
            }
            let same_copy = peer_eligible(&s.peer) && s.peer.generation == s.facts.generation;
            let mine = (
                true,
                s.facts.generation,
                s.peer.has(MirrorBeat::YIELDS),
                !s.yielding,
                s.me_preferred,
                s.me_lower,
            );
            let theirs = (
                peer_eligible(&s.peer),
                s.peer.generation,
                s.yielding,
                !s.peer.has(MirrorBeat::YIELDS),
                !s.me_preferred,
                !s.me_lower,
            );
            if mine <= theirs {
                return Decision::Wait("the peer takes the primary role".into());
            }
            if !s.quorum {
                return Decision::Wait("no quorum".into());
            }
            Decision::Promote {
                new_generation: !same_copy,
                why: if s.peer.has(MirrorBeat::YIELDS) {
                    "the primary handed the role over".into()
                } else {
                    "no primary: this member's copy has the better claim".into()
                },
            }
        }
        MirrorRole::Primary => {
            if peer_primary && s.peer.role == MirrorRole::Primary {
                let mine = (s.facts.generation, s.me_preferred, s.me_lower);
                let theirs = (s.peer.generation, !s.me_preferred, !s.me_lower);
                if mine < theirs {
                    return Decision::Demote {
                        yield_to_peer: false,
                        why: format!(
                            "SPLIT BRAIN: the peer is primary too (generation {} against {}); \
                             this member steps down, what only it acknowledged since is lost",
                            s.peer.generation, s.facts.generation
                        ),
                    };
                }
                return Decision::Wait(
                    "SPLIT BRAIN: the peer is primary too and steps down".into(),
                );
            }
            if !s.quorum {
                return Decision::Demote {
                    yield_to_peer: false,
                    why: "no quorum (the peer is silent and the witness unreachable)".into(),
                };
            }
            let link = s.link.clone();
            let broken = matches!(link, Some(LinkState::Broken(_)));
            let stalled = !s.peer_alive && link == Some(LinkState::InSync);
            if broken || stalled {
                if !s.peer_alive {
                    return Decision::GoAlone {
                        generation: s.facts.generation.max(s.facts.seen) + 1,
                        why: format!(
                            "the secondary has been silent for {} ms",
                            s.failover_after.as_millis()
                        ),
                    };
                }
                return match s.pending {
                    None => Decision::NewGeneration {
                        why: match &link {
                            Some(LinkState::Broken(why)) => why.clone(),
                            _ => "replication stalled".into(),
                        },
                    },
                    Some(g) if s.peer.seen >= g => Decision::GoAlone {
                        generation: g,
                        why: "the secondary has recorded that its copy is out of date".into(),
                    },
                    Some(g) => Decision::Wait(format!(
                        "replication broken: waiting for the secondary to record generation {g} \
                         (fsync waits meanwhile)"
                    )),
                };
            }
            let peer_ready = s.peer_alive
                && s.peer.role == MirrorRole::Secondary
                && link == Some(LinkState::InSync);
            if peer_ready && !s.healthy {
                return Decision::Demote {
                    yield_to_peer: true,
                    why: "the application's health checks fail".into(),
                };
            }
            if peer_ready && s.swap_requested {
                return Decision::Demote {
                    yield_to_peer: true,
                    why: "swap requested".into(),
                };
            }
            if peer_ready
                && s.failback == Failback::Preferred
                && !s.me_preferred
                && s.in_sync_for >= FAILBACK_AFTER
            {
                return Decision::Demote {
                    yield_to_peer: true,
                    why: "failback: the preferred member is in sync".into(),
                };
            }
            if !s.healthy {
                return Decision::Wait(
                    "the application's health checks fail, and the secondary is not in sync to \
                     take over"
                        .into(),
                );
            }
            Decision::Nothing
        }
        MirrorRole::Stopping => Decision::Nothing,
    }
}

fn not_eligible(f: &Facts) -> String {
    if !f.synced {
        "this member's copy is incomplete (a resync did not finish): it cannot become primary by \
         itself (farmctl mirror promote --force)"
            .into()
    } else {
        format!(
            "this member's copy is of generation {} but the peer announced generation {}: it \
             cannot become primary by itself (farmctl mirror promote --force)",
            f.generation, f.seen
        )
    }
}

/// Where a role change ended.
enum Outcome {
    Primary {
        link: Link,
        session: fuser::BackgroundSession,
        command_ok: bool,
        took: Duration,
    },
    Secondary {
        server: Option<Server>,
        took: Duration,
    },
}

enum Role {
    Secondary(Option<Server>),
    Primary {
        link: Link,
        session: fuser::BackgroundSession,
    },
    Changing(MirrorRole, mpsc::Receiver<Outcome>),
}

/// The peer as this member last heard it: its announcement, and whether it is alive for the
/// group (heard within `failover_after`).
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerView {
    pub beat: MirrorBeat,
    pub alive: bool,
}

/// Something the daemon must do or show after a tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Take the whole VIP (true) or none of it.
    Vip(bool),
    Event(String),
}

/// The group as seen from this member.
pub struct Group {
    pub cfg: MirrorConfig,
    me: usize,
    peer: usize,
    peer_id: String,
    node: String,
    key: [u8; 32],
    /// farmd's runtime, on which the role change threads run the application's commands.
    rt: tokio::runtime::Handle,
    facts: Arc<StateFile>,
    role: Role,
    started: Instant,
    pending: Option<u64>,
    yielding: Option<Instant>,
    swap_requested: bool,
    in_sync_since: Option<Instant>,
    /// The health checks have passed since this member became primary: only then does a
    /// failing check hand the role over (the application is still starting before).
    healthy_as_primary: bool,
    /// What this member announces (set by `tick`).
    announced: MirrorBeat,
    /// The last decision that waits, for status.
    pub waiting: Option<String>,
    /// When the last promotion started (for the takeover time), and how long it took.
    pub last_takeover: Option<(String, Duration)>,
}

/// Status of the group (farmctl mirror status).
/// The primary's replication link, as status shows it (in JSON: "in sync", "broken",
/// "degraded", "resyncing", "stopped").
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Replication {
    #[serde(rename = "in sync")]
    InSync,
    #[serde(rename = "broken")]
    Broken,
    #[serde(rename = "degraded")]
    Degraded,
    #[serde(rename = "resyncing")]
    Resyncing,
    #[serde(rename = "stopped")]
    Stopped,
}

impl Replication {
    pub fn of(s: &farm_mirror::link::State) -> Self {
        use farm_mirror::link::State;
        match s {
            State::InSync => Replication::InSync,
            State::Broken(_) => Replication::Broken,
            State::Degraded(_) => Replication::Degraded,
            State::Resyncing => Replication::Resyncing,
            State::Stopped => Replication::Stopped,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Replication::InSync => "in sync",
            Replication::Broken => "broken",
            Replication::Degraded => "degraded",
            Replication::Resyncing => "resyncing",
            Replication::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GroupStatus {
    pub node: String,
    pub peer: String,
    pub role: MirrorRole,
    pub peer_role: MirrorRole,
    pub peer_alive: bool,
    pub generation: u64,
    pub complete: bool,
    pub seen: u64,
    pub eligible: bool,
    pub vip: IpAddr,
    pub directory: String,
    /// Primary: the replication link's state.
    pub replication: Option<Replication>,
    pub replication_detail: Option<String>,
    pub lag_bytes: u64,
    pub lag_ms: u64,
    pub queued_bytes: u64,
    pub bytes_sent: u64,
    pub syncs_acknowledged: u64,
    pub recorded_paths: u64,
    pub resync: Option<ResyncStatus>,
    pub last_resync: Option<ResyncStatus>,
    /// Secondary: the replication server.
    pub primary_connected: Option<String>,
    pub resyncing: bool,
    pub ops_applied: u64,
    pub bytes_applied: u64,
    /// Secondary: the primary's operations refused (device nodes, set-id files).
    #[serde(default)]
    pub ops_refused: u64,
    /// Secondary: connections that did not become a session (failed or replayed handshakes,
    /// too many at once).
    #[serde(default)]
    pub handshakes_refused: u64,
    pub waiting: Option<String>,
    pub last_takeover: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ResyncStatus {
    pub full_check: bool,
    pub pass: u32,
    pub entries_done: u64,
    pub entries_total: u64,
    pub bytes_sent: u64,
    pub bytes_same: u64,
    pub seconds: f64,
    pub bytes_per_second: f64,
}

impl ResyncStatus {
    /// A resync's progress after `took`.
    fn of(p: &farm_mirror::resync::Progress, took: Duration) -> Self {
        let seconds = took.as_secs_f64();
        Self {
            full_check: p.full_check,
            pass: p.pass,
            entries_done: p.entries_done,
            entries_total: p.entries_total,
            bytes_sent: p.bytes_sent,
            bytes_same: p.bytes_same,
            seconds,
            bytes_per_second: if seconds > 0.0 {
                (p.bytes_sent + p.bytes_same) as f64 / seconds
            } else {
                0.0
            },
        }
    }
}

impl Group {
    /// Opens the state file and starts as secondary (listening for the peer).
    pub fn start(
        cfg: MirrorConfig,
        me: usize,
        members: &[String],
        state_dir: &Path,
        key: [u8; 32],
    ) -> Result<Self, MirrorError> {
        let peer = if cfg.members[0] == me {
            cfg.members[1]
        } else {
            cfg.members[0]
        };
        // The replicated directory is mounted where the application sees it (see `mountns`):
        // refused now, not at the first promotion, when that cannot be done.
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .map_err(MirrorError::Fuse)?;
        // A killed primary leaves its FUSE mount behind (its directory then fails with ENOTCONN).
        let dir = cfg.directory.clone();
        crate::mountns::in_host_namespace(move || detach(&dir))?;
        for d in [&cfg.backing, &cfg.directory] {
            std::fs::create_dir_all(d).map_err(|source| MirrorError::Dir {
                path: d.display().to_string(),
                source,
            })?;
        }
        std::fs::create_dir_all(state_dir).map_err(|source| MirrorError::Dir {
            path: state_dir.display().to_string(),
            source,
        })?;
        let facts = StateFile::open(
            &state_dir.join("mirror.state"),
            Facts {
                generation: 0,
                // A new pair: the preferred member's data is the initial copy.
                synced: cfg.preferred == me,
                seen: 0,
            },
        )?;
        let f = facts.get();
        tracing::info!(
            "mirror group: {} with {}, VIP {}, {} (copy in {}); this member's copy: generation \
             {}, {}",
            members[me],
            members[peer],
            cfg.vip,
            cfg.directory.display(),
            cfg.backing.display(),
            f.generation,
            if f.eligible() {
                "eligible to become primary"
            } else {
                "NOT eligible to become primary by itself"
            }
        );
        let mut g = Self {
            me,
            peer,
            peer_id: members[peer].clone(),
            node: members[me].clone(),
            key,
            rt: tokio::runtime::Handle::current(),
            facts: Arc::new(facts),
            role: Role::Secondary(None),
            started: Instant::now(),
            pending: None,
            yielding: None,
            swap_requested: false,
            in_sync_since: None,
            healthy_as_primary: false,
            announced: MirrorBeat::default(),
            waiting: None,
            last_takeover: None,
            cfg,
        };
        g.role = Role::Secondary(g.serve());
        g.announced = g.beat(PeerView::default(), false);
        Ok(g)
    }

    fn serve(&self) -> Option<Server> {
        let replica = match Replica::open(&self.cfg.backing) {
            Ok(r) => r.allow_privileged(self.cfg.allow_privileged_files),
            Err(e) => {
                tracing::error!("cannot open the replica: {e}");
                return None;
            }
        };
        match Server::start(
            self.cfg.address(self.me),
            replica,
            self.facts.clone(),
            &self.key,
        ) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!("cannot serve the replica: {e}");
                None
            }
        }
    }

    pub fn role(&self) -> MirrorRole {
        match &self.role {
            Role::Secondary(_) => MirrorRole::Secondary,
            Role::Primary { .. } => MirrorRole::Primary,
            Role::Changing(to, _) => *to,
        }
    }

    pub fn is_primary(&self) -> bool {
        matches!(self.role, Role::Primary { .. })
    }

    fn link(&self) -> Option<&Link> {
        match &self.role {
            Role::Primary { link, .. } => Some(link),
            _ => None,
        }
    }

    /// The member index of the peer.
    pub fn peer_index(&self) -> usize {
        self.peer
    }

    /// The peer as the group sees it, from its membership entry.
    pub fn view(&self, p: &crate::membership::Peer, now: Instant) -> PeerView {
        let heard = p.last_heard.iter().flatten().max();
        PeerView {
            beat: p.mirror,
            alive: heard
                .is_some_and(|&t| now.saturating_duration_since(t) <= self.cfg.failover_after),
        }
    }

    /// What this member announces in its heartbeats, as of the last tick.
    pub fn announced(&self) -> MirrorBeat {
        self.announced
    }

    /// What this member announces, `replica_in_sync`: as primary, its link is in sync.
    fn beat(&self, peer: PeerView, replica_in_sync: bool) -> MirrorBeat {
        let f = self.facts.get();
        let mut flags = 0;
        if f.synced {
            flags |= MirrorBeat::COMPLETE;
        }
        if replica_in_sync {
            flags |= MirrorBeat::REPLICA_IN_SYNC;
        }
        if self.yielding.is_some() {
            flags |= MirrorBeat::YIELDS;
        }
        if self.swap_requested
            && !self.is_primary()
            && peer.alive
            && peer.beat.role == MirrorRole::Primary
        {
            flags |= MirrorBeat::WANTS_SWAP;
        }
        MirrorBeat {
            role: self.role(),
            flags,
            generation: f.generation,
            seen: f.seen,
        }
    }

    /// Re-evaluates the group, and what it announces.
    pub fn tick(
        &mut self,
        now: Instant,
        view: PeerView,
        quorum: bool,
        healthy: bool,
    ) -> Vec<Effect> {
        let _span = tracing::info_span!("mirror", vip = %self.cfg.vip).entered();
        let mut effects = Vec::new();
        let PeerView {
            beat: peer,
            alive: peer_alive,
        } = view;
        // What the peer announced is remembered durably.
        if peer_alive
            && peer.generation > self.facts.get().seen
            && let Err(e) = self.facts.update(|f| f.seen = peer.generation)
        {
            tracing::error!("{e}");
        }
        // A role change that ended.
        if let Role::Changing(_, rx) = &self.role {
            match rx.try_recv() {
                Ok(outcome) => self.finish(outcome, &mut effects),
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => {
                    tracing::error!("a role change ended without a result; secondary");
                    self.role = Role::Secondary(self.serve());
                }
            }
        }
        if self.yielding.is_some_and(|t| {
            peer.role == MirrorRole::Primary || t.elapsed() > Duration::from_secs(30)
        }) {
            self.yielding = None;
        }
        if self.swap_requested
            && (peer.role != MirrorRole::Primary || !peer_alive)
            && !self.is_primary()
        {
            // A swap asked for on the secondary ends when the peer is no longer primary.
            self.swap_requested = false;
        }
        if self.is_primary() && healthy {
            self.healthy_as_primary = true;
        }
        let link_status = self.link().map(Link::status);
        let mut replica_in_sync = link_status
            .as_ref()
            .is_some_and(|st| st.state == LinkState::InSync);
        if replica_in_sync {
            self.in_sync_since.get_or_insert(now);
        } else {
            self.in_sync_since = None;
        }
        if !matches!(
            link_status.as_ref().map(|s| &s.state),
            Some(LinkState::Broken(_))
        ) {
            self.pending = None;
        }
        let s = Situation {
            role: self.role(),
            changing: matches!(self.role, Role::Changing(..)),
            facts: self.facts.get(),
            quorum,
            peer_alive,
            peer,
            uptime: now.saturating_duration_since(self.started),
            failover_after: self.cfg.failover_after,
            link: link_status.map(|s| s.state),
            in_sync_for: self
                .in_sync_since
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t)),
            healthy: healthy || !self.healthy_as_primary,
            me_preferred: self.cfg.preferred == self.me,
            me_lower: self.me < self.peer,
            failback: self.cfg.failback,
            pending: self.pending,
            swap_requested: self.swap_requested || peer.has(MirrorBeat::WANTS_SWAP),
            yielding: self.yielding.is_some(),
        };
        let d = decide(&s);
        self.waiting = match &d {
            Decision::Wait(w) => Some(w.clone()),
            _ => None,
        };
        match d {
            Decision::Nothing | Decision::Wait(_) => {}
            Decision::Promote {
                new_generation,
                why,
            } => self.promote(new_generation, &why, &mut effects),
            Decision::Demote { yield_to_peer, why } => {
                self.demote(yield_to_peer, &why, &mut effects)
            }
            Decision::NewGeneration { why } => {
                let f = self.facts.get();
                let g = f.generation.max(f.seen) + 1;
                match self.facts.update(|f| f.generation = g) {
                    Ok(_) => {
                        tracing::warn!(
                            "replication broken ({why}); generation {g} announced, \
                             fsync waits until {} has recorded it",
                            self.peer_id
                        );
                        self.pending = Some(g);
                    }
                    Err(e) => tracing::error!("{e}"),
                }
            }
            Decision::GoAlone { generation, why } => {
                if let Err(e) = self.facts.update(|f| f.generation = generation) {
                    tracing::error!("{e}");
                } else {
                    if let Some(l) = self.link() {
                        l.degrade(&why, generation);
                    }
                    replica_in_sync = false;
                    self.pending = None;
                    effects.push(Effect::Event(format!(
                        "mirror: primary {} goes on alone at generation {generation} ({why}); \
                         the group is DEGRADED until {} is back in sync",
                        self.node, self.peer_id
                    )));
                }
            }
        }
        // A member that stopped being primary this tick has no replica any more.
        self.announced = self.beat(view, replica_in_sync && self.is_primary());
        effects
    }

    fn promote(&mut self, new_generation: bool, why: &str, effects: &mut Vec<Effect>) {
        let Role::Secondary(server) = std::mem::replace(&mut self.role, Role::Secondary(None))
        else {
            return;
        };
        let before = self.facts.get();
        let generation = if new_generation {
            before.generation.max(before.seen) + 1
        } else {
            before.generation
        };
        if let Err(e) = self.facts.update(|f| {
            f.generation = generation;
            f.synced = true;
        }) {
            tracing::error!("cannot record the promotion, staying secondary: {e}");
            self.role = Role::Secondary(server);
            return;
        }
        let msg = format!(
            "mirror: {} becomes primary ({why}); generation {generation}",
            self.node
        );
        tracing::warn!("{msg}");
        effects.push(Effect::Event(msg));
        let (tx, rx) = mpsc::channel();
        let cfg = self.cfg.clone();
        let peer_addr = cfg.address(self.peer);
        let key = self.key;
        let node = self.node.clone();
        let rt = self.rt.clone();
        let record_base = Some(before.generation);
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("mirror-promote".into())
            .spawn(move || {
                let _span = span.entered();
                let started = Instant::now();
                stop_secondary(&rt, &cfg, &node, server);
                let link = Link::start(
                    peer_addr,
                    &key,
                    &cfg.backing,
                    Options {
                        max_queued_bytes: cfg.max_in_flight_bytes,
                        auto_degrade: false,
                        generation,
                        record_base,
                    },
                );
                let session = loop {
                    match mount(&cfg, link.clone()) {
                        Ok(s) => break s,
                        Err(e) => {
                            tracing::error!("mounting {}: {e}; retrying", cfg.directory.display());
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                };
                let command_ok = run(&rt, &cfg, &node, "start_primary", &cfg.start_primary);
                let _ = tx.send(Outcome::Primary {
                    link,
                    session,
                    command_ok,
                    took: started.elapsed(),
                });
            })
            .expect("spawning a thread");
        self.role = Role::Changing(MirrorRole::Primary, rx);
    }

    fn demote(&mut self, yield_to_peer: bool, why: &str, effects: &mut Vec<Effect>) {
        let Role::Primary { link, session } =
            std::mem::replace(&mut self.role, Role::Secondary(None))
        else {
            return;
        };
        effects.push(Effect::Vip(false));
        let msg = format!(
            "mirror: {} stops being primary ({why}){}",
            self.node,
            if yield_to_peer {
                format!("; {} takes over", self.peer_id)
            } else {
                String::new()
            }
        );
        tracing::warn!("{msg}");
        effects.push(Effect::Event(msg));
        if yield_to_peer {
            self.yielding = Some(Instant::now());
        }
        self.swap_requested = false;
        let (tx, rx) = mpsc::channel();
        let cfg = self.cfg.clone();
        let node = self.node.clone();
        let rt = self.rt.clone();
        let facts = self.facts.clone();
        let key = self.key;
        let me = self.me;
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("mirror-demote".into())
            .spawn(move || {
                let _span = span.entered();
                let started = Instant::now();
                stop_primary(&rt, &cfg, &node, link, session, yield_to_peer);
                let server = Replica::open(&cfg.backing)
                    .map_err(|e| e.to_string())
                    .and_then(|r| {
                        let r = r.allow_privileged(cfg.allow_privileged_files);
                        Server::start(cfg.address(me), r, facts, &key).map_err(|e| e.to_string())
                    })
                    .map_err(|e| tracing::error!("cannot serve the replica: {e}"))
                    .ok();
                if let Some(c) = &cfg.start_secondary {
                    run(&rt, &cfg, &node, "start_secondary", c);
                }
                let _ = tx.send(Outcome::Secondary {
                    server,
                    took: started.elapsed(),
                });
            })
            .expect("spawning a thread");
        self.role = Role::Changing(MirrorRole::Stopping, rx);
    }

    fn finish(&mut self, outcome: Outcome, effects: &mut Vec<Effect>) {
        match outcome {
            Outcome::Primary {
                link,
                session,
                command_ok,
                took,
            } => {
                effects.push(Effect::Vip(true));
                let msg = format!(
                    "mirror: {} is primary: {} mounted, start_primary {} ({} ms)",
                    self.node,
                    self.cfg.directory.display(),
                    if command_ok { "succeeded" } else { "FAILED" },
                    took.as_millis()
                );
                tracing::warn!("{msg}");
                effects.push(Effect::Event(msg));
                self.last_takeover = Some((self.node.clone(), took));
                self.healthy_as_primary = false;
                self.role = Role::Primary { link, session };
            }
            Outcome::Secondary { server, took } => {
                let msg = format!(
                    "mirror: {} is secondary ({} ms)",
                    self.node,
                    took.as_millis()
                );
                tracing::warn!("{msg}");
                effects.push(Effect::Event(msg));
                self.role = Role::Secondary(server);
            }
        }
    }

    /// `farmctl mirror swap`.
    pub fn request_swap(&mut self, view: PeerView) -> Result<String, String> {
        let _span = tracing::info_span!("mirror", vip = %self.cfg.vip).entered();
        let peer = &view.beat;
        if !view.alive {
            return Err(format!(
                "{} is not reachable: nothing to swap with",
                self.peer_id
            ));
        }
        match (self.role(), peer.role) {
            (MirrorRole::Primary, MirrorRole::Secondary) => {
                if self
                    .link()
                    .is_none_or(|l| l.status().state != LinkState::InSync)
                {
                    return Err(format!(
                        "{}'s replica is not in sync: a swap now would lose data (wait for the \
                         resync, see farmctl mirror status)",
                        self.peer_id
                    ));
                }
                self.swap_requested = true;
                Ok(format!(
                    "swap started: {} stops the application, flushes to {} and hands the role over",
                    self.node, self.peer_id
                ))
            }
            (MirrorRole::Secondary, MirrorRole::Primary) => {
                if !peer.has(MirrorBeat::REPLICA_IN_SYNC) {
                    return Err(format!(
                        "this member's replica is not in sync with {}: a swap now would lose \
                         data (wait for the resync)",
                        self.peer_id
                    ));
                }
                self.swap_requested = true;
                Ok(format!("swap asked of the primary {}", self.peer_id))
            }
            (mine, theirs) => Err(format!(
                "no swap while this member is {mine:?} and {} is {theirs:?}",
                self.peer_id
            )),
        }
    }

    /// `farmctl mirror promote --force`: this member becomes primary whatever its copy.
    pub fn force_promote(
        &mut self,
        view: PeerView,
        effects: &mut Vec<Effect>,
    ) -> Result<String, String> {
        let _span = tracing::info_span!("mirror", vip = %self.cfg.vip).entered();
        if view.alive && matches!(view.beat.role, MirrorRole::Primary | MirrorRole::Stopping) {
            return Err(format!(
                "{} is primary and reachable: forcing would make two primaries (use farmctl \
                 mirror swap)",
                self.peer_id
            ));
        }
        if !matches!(self.role, Role::Secondary(_)) {
            return Err(format!("this member is {:?} already", self.role()));
        }
        let f = self.facts.get();
        let warning = if f.eligible() {
            "this member's copy was eligible anyway: nothing acknowledged is lost".to_string()
        } else if !f.synced {
            "WARNING: this member's copy is INCOMPLETE (a resync did not finish): files may be \
             missing or partly old, and everything the old primary acknowledged that is not here \
             is lost"
                .to_string()
        } else {
            format!(
                "WARNING: this member's copy is of generation {} but {} announced generation {}: \
                 everything acknowledged there since is LOST when {} rejoins (its copy is \
                 resynced from this one)",
                f.generation, self.peer_id, f.seen, self.peer_id
            )
        };
        tracing::warn!("forced promotion: {warning}");
        self.promote(true, "forced by the operator", effects);
        Ok(warning)
    }

    pub fn status(&self, view: PeerView) -> GroupStatus {
        let (peer, peer_alive) = (&view.beat, view.alive);
        let f = self.facts.get();
        let link: Option<LinkStatus> = self.link().map(Link::status);
        let server: Option<ServerStatus> = match &self.role {
            Role::Secondary(Some(s)) => Some(s.status()),
            _ => None,
        };
        GroupStatus {
            node: self.node.clone(),
            peer: self.peer_id.clone(),
            role: self.role(),
            peer_role: if peer_alive {
                peer.role
            } else {
                MirrorRole::None
            },
            peer_alive,
            generation: f.generation,
            complete: f.synced,
            seen: f.seen,
            eligible: f.eligible(),
            vip: self.cfg.vip,
            directory: self.cfg.directory.display().to_string(),
            replication: link.as_ref().map(|l| Replication::of(&l.state)),
            replication_detail: link.as_ref().and_then(|l| match &l.state {
                LinkState::Broken(w) | LinkState::Degraded(w) => Some(w.clone()),
                _ => l.resync_error.clone(),
            }),
            lag_bytes: link.as_ref().map_or(0, |l| l.lag_bytes as u64),
            lag_ms: link.as_ref().map_or(0, |l| l.lag.as_millis() as u64),
            queued_bytes: link.as_ref().map_or(0, |l| l.queued_bytes as u64),
            bytes_sent: link.as_ref().map_or(0, |l| l.bytes_sent),
            syncs_acknowledged: link.as_ref().map_or(0, |l| l.syncs_acknowledged),
            recorded_paths: link.as_ref().map_or(0, |l| l.recorded as u64),
            resync: link
                .as_ref()
                .and_then(|l| l.resync.as_ref())
                .map(|p| ResyncStatus::of(p, p.started.map_or(Duration::ZERO, |t| t.elapsed()))),
            last_resync: link
                .as_ref()
                .and_then(|l| l.last_resync.as_ref())
                .map(|r| ResyncStatus::of(&r.progress, r.took)),
            primary_connected: server.as_ref().and_then(|s| s.primary.clone()),
            resyncing: server.as_ref().is_some_and(|s| s.resyncing),
            ops_applied: server.as_ref().map_or(0, |s| s.ops_applied),
            bytes_applied: server.as_ref().map_or(0, |s| s.bytes_applied),
            ops_refused: server.as_ref().map_or(0, |s| s.ops_refused),
            handshakes_refused: server.as_ref().map_or(0, |s| s.handshakes_refused),
            waiting: self.waiting.clone(),
            last_takeover: self
                .last_takeover
                .as_ref()
                .map(|(n, d)| format!("{n} took over in {} ms", d.as_millis())),
        }
    }

    /// farmd stops: the application stops and the directory is unmounted (a primary flushes to
    /// its secondary first).
    pub fn shutdown(mut self) {
        let _span = tracing::info_span!("mirror", vip = %self.cfg.vip).entered();
        // Wait for a role change in progress (bounded by its commands' timeouts).
        if let Role::Changing(_, rx) = &self.role {
            let wait = self.cfg.command_timeout * 2 + Duration::from_secs(15);
            if let Ok(o) = rx.recv_timeout(wait) {
                let mut e = Vec::new();
                self.finish(o, &mut e);
            }
        }
        match std::mem::replace(&mut self.role, Role::Secondary(None)) {
            Role::Primary { link, session } => {
                stop_primary(&self.rt, &self.cfg, &self.node, link, session, true);
            }
            Role::Secondary(server) => stop_secondary(&self.rt, &self.cfg, &self.node, server),
            Role::Changing(..) => {}
        }
    }
}

/// Ends the primary role: the application stops and the directory is unmounted. `flush`: a
/// handover (or farmd stopping), so the application's last writes and syncs still reach the
/// secondary and then everything is flushed to it; otherwise the role is lost and nothing more
/// may be acknowledged: syncs waiting for the secondary fail first (EIO), so the application
/// is not stuck in them while it is stopped.
fn stop_primary(
    rt: &tokio::runtime::Handle,
    cfg: &MirrorConfig,
    node: &str,
    link: Link,
    session: fuser::BackgroundSession,
    flush: bool,
) {
    if flush {
        run(rt, cfg, node, "stop_primary", &cfg.stop_primary);
        if !link.stop(Duration::from_secs(10)) {
            tracing::warn!("the secondary did not confirm the last changes");
        }
    } else {
        link.stop(Duration::ZERO);
        run(rt, cfg, node, "stop_primary", &cfg.stop_primary);
    }
    unmount(&cfg.directory, session);
}

/// Ends the secondary role: the replica server stops, then `stop_secondary` if configured.
fn stop_secondary(
    rt: &tokio::runtime::Handle,
    cfg: &MirrorConfig,
    node: &str,
    server: Option<Server>,
) {
    if let Some(s) = server {
        s.stop();
    }
    if let Some(c) = &cfg.stop_secondary {
        run(rt, cfg, node, "stop_secondary", c);
    }
}

/// Mounts the replicated directory over the backing copy, in the host's mount namespace (where
/// the application sees it), and verifies that farmd's own view (where `start_primary` runs)
/// shows the same mount. Only then may the application be started.
fn mount(cfg: &MirrorConfig, link: Link) -> std::io::Result<fuser::BackgroundSession> {
    use crate::mountns::{FUSE_SUPER_MAGIC, fs_identity, in_host_namespace};
    let (dir, backing) = (cfg.directory.clone(), cfg.backing.clone());
    let (session, host_view) = in_host_namespace(move || {
        detach(&dir);
        let fs = MirrorFs::new(&backing, link);
        let options = [
            fuser::MountOption::FSName("farm-mirror".into()),
            // The application's data: no set-id programs, no device nodes honoured there.
            fuser::MountOption::NoSuid,
            fuser::MountOption::NoDev,
            fuser::MountOption::AllowOther,
            fuser::MountOption::DefaultPermissions,
        ];
        fuser::spawn_mount2(fs, &dir, &options).map(|s| (s, fs_identity(&dir)))
    })
    .map_err(std::io::Error::other)??;
    let own_view = fs_identity(&cfg.directory);
    if host_view.is_none_or(|(t, _)| t != FUSE_SUPER_MAGIC) || own_view != host_view {
        unmount(&cfg.directory, session);
        return Err(std::io::Error::other(format!(
            "the replicated directory is mounted, but not seen the same from the host's mount \
             namespace ({host_view:?}) and from farmd's ({own_view:?}): the application would \
             write to the directory underneath, unreplicated; not starting it (is mount \
             propagation into farmd's namespace off?)"
        )));
    }
    Ok(session)
}

/// Lazily unmounts whatever is mounted at `dir` (a leftover of a killed primary).
pub fn detach(dir: &Path) {
    if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) {
        // SAFETY: valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Ends the FUSE session: its connection is aborted first (a process still holding files there
/// gets errors, never a write into what is now the replica), then the mount goes; in the host's
/// mount namespace, where it was made.
fn unmount(dir: &Path, session: fuser::BackgroundSession) {
    let dir = dir.to_path_buf();
    if let Err(e) = crate::mountns::in_host_namespace(move || unmount_here(&dir, session)) {
        tracing::error!("unmounting the replicated directory: {e}");
    }
}

fn unmount_here(dir: &Path, session: fuser::BackgroundSession) {
    use std::os::unix::fs::MetadataExt as _;
    if let Ok(m) = std::fs::metadata(dir) {
        let minor = libc::minor(m.dev());
        let conns = Path::new("/sys/fs/fuse/connections");
        if !conns.join(minor.to_string()).exists() {
            let src = std::ffi::CString::new("fusectl").expect("static");
            let target = std::ffi::CString::new("/sys/fs/fuse/connections").expect("static");
            // SAFETY: valid C strings; mounting the FUSE control filesystem where it belongs.
            unsafe {
                libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    src.as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
        }
        let _ = std::fs::write(conns.join(minor.to_string()).join("abort"), "1");
    }
    detach(dir);
    drop(session);
}

/// Runs one of the application's commands (`what`: start_primary, ...) with sh -c, bounded by
/// `command_timeout` (see `checks::run_bounded`), on the daemon's runtime from the calling role
/// change thread. Output goes to farmd's log. Returns whether it exited with status 0.
fn run(
    rt: &tokio::runtime::Handle,
    cfg: &MirrorConfig,
    node: &str,
    what: &str,
    command: &str,
) -> bool {
    tracing::info!("running {what}: {command}");
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .env("FARM_MIRROR_ROLE_COMMAND", what)
        .env("FARM_MIRROR_DIRECTORY", &cfg.directory)
        .env("FARM_MIRROR_VIP", cfg.vip.to_string())
        .env("FARM_NODE", node);
    match rt.block_on(crate::checks::run_bounded(cmd, what, cfg.command_timeout)) {
        Ok(status) if status.success() => {
            tracing::info!("{what} done in {} ms", started.elapsed().as_millis());
            true
        }
        Ok(status) => {
            tracing::error!("{what} failed: {status}");
            false
        }
        Err(e) => {
            tracing::error!("{e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Situation {
        Situation {
            role: MirrorRole::Secondary,
            changing: false,
            facts: Facts {
                generation: 3,
                synced: true,
                seen: 3,
            },
            quorum: true,
            peer_alive: true,
            peer: MirrorBeat {
                role: MirrorRole::Primary,
                flags: MirrorBeat::COMPLETE | MirrorBeat::REPLICA_IN_SYNC,
                generation: 3,
                seen: 3,
            },
            uptime: Duration::from_secs(60),
            failover_after: Duration::from_secs(1),
            link: None,
            in_sync_for: Duration::ZERO,
            healthy: true,
            me_preferred: false,
            me_lower: false,
            failback: Failback::Stay,
            pending: None,
            swap_requested: false,
            yielding: false,
        }
    }

    /// A primary whose secondary is alive and in sync.
    fn primary_in_sync() -> Situation {
        let mut p = base();
        p.role = MirrorRole::Primary;
        p.peer.role = MirrorRole::Secondary;
        p.link = Some(LinkState::InSync);
        p
    }

    #[test]
    fn a_secondary_takes_over_only_when_the_primary_is_gone_and_its_copy_is_eligible() {
        let s = base();
        assert_eq!(decide(&s), Decision::Nothing, "primary alive");
        let gone = Situation {
            peer_alive: false,
            ..base()
        };
        assert!(matches!(
            decide(&gone),
            Decision::Promote {
                new_generation: true,
                ..
            }
        ));
        let no_quorum = Situation {
            quorum: false,
            ..gone.clone()
        };
        assert!(matches!(decide(&no_quorum), Decision::Wait(_)));
        let stale = Situation {
            facts: Facts {
                generation: 3,
                synced: true,
                seen: 4,
            },
            ..gone.clone()
        };
        assert!(matches!(decide(&stale), Decision::Wait(w) if w.contains("generation 3")));
        let incomplete = Situation {
            facts: Facts {
                synced: false,
                ..gone.facts
            },
            ..gone.clone()
        };
        assert!(matches!(decide(&incomplete), Decision::Wait(w) if w.contains("incomplete")));
        let just_started = Situation {
            uptime: Duration::from_millis(200),
            ..gone
        };
        assert!(matches!(decide(&just_started), Decision::Wait(_)));
    }

    #[test]
    fn with_both_up_and_no_primary_one_claim_wins_on_both_sides() {
        let mut a = base();
        a.peer.role = MirrorRole::Secondary;
        a.me_preferred = true;
        a.me_lower = true;
        // The peer sees the mirror image.
        let mut b = a.clone();
        b.me_preferred = false;
        b.me_lower = false;
        let (da, db) = (decide(&a), decide(&b));
        assert!(
            matches!(
                da,
                Decision::Promote {
                    new_generation: false,
                    ..
                }
            ),
            "{da:?}"
        );
        assert!(matches!(db, Decision::Wait(_)), "{db:?}");
        // A newer generation beats preference.
        let mut newer = b.clone();
        newer.facts.generation = 4;
        newer.facts.seen = 4;
        assert!(matches!(
            decide(&newer),
            Decision::Promote {
                new_generation: true,
                ..
            }
        ));
        // The member the old primary yields to takes the role even if not preferred.
        let mut yielded = b.clone();
        yielded.peer.flags |= MirrorBeat::YIELDS;
        assert!(matches!(decide(&yielded), Decision::Promote { .. }));
        let mut yielding = a;
        yielding.yielding = true;
        assert!(matches!(decide(&yielding), Decision::Wait(_)));
    }

    #[test]
    fn a_primary_without_quorum_steps_down_and_a_broken_link_waits_for_the_peer() {
        let p = primary_in_sync();
        assert_eq!(decide(&p), Decision::Nothing);
        let cut = Situation {
            quorum: false,
            peer_alive: false,
            ..p.clone()
        };
        assert!(matches!(
            decide(&cut),
            Decision::Demote {
                yield_to_peer: false,
                ..
            }
        ));
        // Replication broken, peer alive: a new generation first, alone only once the peer has
        // recorded it.
        let broken = Situation {
            link: Some(LinkState::Broken("reset".into())),
            ..p.clone()
        };
        assert!(matches!(decide(&broken), Decision::NewGeneration { .. }));
        let announced = Situation {
            pending: Some(4),
            ..broken.clone()
        };
        assert!(matches!(decide(&announced), Decision::Wait(_)));
        let mut recorded = announced.clone();
        recorded.peer.seen = 4;
        assert_eq!(
            decide(&recorded),
            Decision::GoAlone {
                generation: 4,
                why: "the secondary has recorded that its copy is out of date".into()
            }
        );
        // The secondary gone while the session hangs: alone at once, new generation.
        let silent = Situation {
            peer_alive: false,
            ..p.clone()
        };
        assert!(matches!(
            decide(&silent),
            Decision::GoAlone { generation: 4, .. }
        ));
    }

    #[test]
    fn health_swap_and_failback_hand_the_role_over_only_to_a_replica_in_sync() {
        let p = primary_in_sync();
        let sick = Situation {
            healthy: false,
            ..p.clone()
        };
        assert!(matches!(
            decide(&sick),
            Decision::Demote {
                yield_to_peer: true,
                ..
            }
        ));
        let sick_alone = Situation {
            link: Some(LinkState::Resyncing),
            ..sick
        };
        assert!(matches!(decide(&sick_alone), Decision::Wait(_)));
        let swap = Situation {
            swap_requested: true,
            ..p.clone()
        };
        assert!(matches!(decide(&swap), Decision::Demote { .. }));
        let failback = Situation {
            failback: Failback::Preferred,
            in_sync_for: FAILBACK_AFTER,
            ..p.clone()
        };
        assert!(matches!(decide(&failback), Decision::Demote { .. }));
        let preferred_itself = Situation {
            me_preferred: true,
            ..failback
        };
        assert_eq!(decide(&preferred_itself), Decision::Nothing);
    }

    #[test]
    fn of_two_primaries_the_older_generation_steps_down() {
        let mut p = base();
        p.role = MirrorRole::Primary;
        p.peer.role = MirrorRole::Primary;
        p.peer.generation = 5;
        p.link = Some(LinkState::Degraded("alone".into()));
        assert!(matches!(
            decide(&p),
            Decision::Demote {
                yield_to_peer: false,
                ..
            }
        ));
        p.facts.generation = 6;
        assert!(matches!(decide(&p), Decision::Wait(_)));
    }
}
