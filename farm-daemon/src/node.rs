//! The node core: this member's lifecycle rules, with no I/O (no tokio, aya, netlink or
//! sockets). It is handed what happened and the time: the heartbeat thread's judgement of the
//! peers (`handle_update`), health-check results (`handle_health`), the lifecycle tick
//! (`handle_timeout`, once per heartbeat interval) and the fine tick (`handle_tick`), operator
//! requests (`handle_command`), a stop signal (`handle_stop`), connection counts
//! (`handle_count`). It answers with [`Action`]s the host shell carries out (`poll_action`):
//! write this bucket table, set these masks, announce, count these buckets, run this hook.
//!
//! The rules it holds:
//! - **joining**: a starting member (and one that regained quorum) serves only after it has
//!   heard the farm for one loss window with quorum, and only when no bucket move is in
//!   progress (one planned change at a time);
//! - **planned changes**: a drain or resume starts at once, or queues behind the move in
//!   progress; asking again says it is queued; the opposite request withdraws the queued one;
//!   the last serving member refuses to drain unless forced;
//! - **stop**: SIGTERM drains first (within `stop_drain_timeout`) when others serve, then
//!   leaves; a second signal leaves at once; so does a stop when nobody else serves;
//! - **health**: failing checks give the buckets away (keeping connections while the
//!   application still answers), passing checks take them back through the same queue;
//! - **quorum**: losing it releases every bucket and returns to joining;
//! - **drills**: a peer's drill order naming this member makes it act as if crashed (silent,
//!   dead-man switch lapsed) until the order ends, then it rejoins as a restarted member;
//! - **hooks**: what changed (members lost, left and back, quorum, this member's own state)
//!   becomes hook events, each once.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use farm_common::{BucketEntry, HashKey, bucket_state};

use crate::{
    checks::{Change, Health, Outcome as CheckOutcome},
    config::{Check, Vip},
    connections::{CountRequest, Counted},
    control::{MemberState, Outcome, Response},
    handover::Handover,
    heartbeat::{MirrorBeat, State},
    hooks,
    membership::{Event, Membership, Peer},
    transition::View,
};

/// A planned change of this member's own state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planned {
    Drain,
    Resume,
}

impl Planned {
    pub fn name(self) -> &'static str {
        match self {
            Planned::Drain => "drain",
            Planned::Resume => "resume",
        }
    }
}

/// A bucket move: who is moving (a peer's index, or `None` for this node), from which view to
/// which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub by: Option<usize>,
    pub from: View,
    pub to: View,
}

/// What the heartbeat thread judged (see `cluster`).
#[derive(Debug, Clone)]
pub struct PeerUpdate {
    pub peers: Vec<Peer>,
    pub quorum: bool,
    pub events: Vec<Event>,
    /// A peer announced another move state, state, member list or drill: act at once.
    pub urgent: bool,
}

/// What the host shell is to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write this bucket table and make it live with these handover masks.
    WriteBuckets {
        entries: Vec<BucketEntry>,
        ready: u64,
        done: u64,
        /// For the log: the serving members, and this member's mine/incoming/outgoing counts.
        serving: Vec<String>,
        counts: (usize, usize, usize),
    },
    /// Set the handover masks of the live table (unchanged ones are not written).
    SetMasks { ready: u64, done: u64 },
    /// Publish what this member announces (`Node::outgoing`); `send_now`: send a round at once
    /// (what is announced changed: peers act on it a message's latency later).
    Announce { send_now: bool },
    /// Count the live connections in these buckets (answer with `handle_count`).
    Count(CountRequest),
    /// Run the notify hooks for this event.
    Hook(hooks::Event),
    /// Record this for the status page's event list.
    Event(String),
    /// A member was lost (a failure): not heard for `silent_for`.
    Failover {
        member: String,
        silent_for: Duration,
    },
    /// Act as if crashed in a peer's drill: stop heartbeats, let the dead-man switch lapse.
    Crash { drill: u32, by: String },
    /// The drill is over: rejoin as a restarted member (new incarnation, dead-man armed).
    Rejoin { drill: u32, by: String },
    /// Leave now (announce `leaving`, undo the host changes).
    Leave,
}

/// What the node needs to know of the configuration.
/// The node core's state as an in-place upgrade carries it (see `Node::snapshot`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeSnapshot {
    /// The settled map's view (a quiet point: nothing else in progress).
    pub view: View,
    pub serving: bool,
    pub quorum: bool,
    pub config_digest: u64,
    pub health: crate::checks::HealthSnapshot,
    pub last_state: Option<MemberState>,
    pub joined_age_ms: u64,
    /// What this member announces (active, or draining): the heartbeat thread's copy of the membership
    /// does not track it, and a new farmd announcing `joining` for a heartbeat would make its
    /// peers take its buckets for a moment. Absent from older builds' snapshots.
    #[serde(default)]
    pub my_state: Option<State>,
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub me: usize,
    /// (id, weight) of every member, in config order.
    pub members: Vec<(String, u32)>,
    pub networks: usize,
    pub loss_window: Duration,
    pub has_witness: bool,
    pub seed: HashKey,
    pub vips: Vec<Vip>,
    pub drain_timeout: Duration,
    pub udp_idle: Duration,
    pub stop_drain_timeout: Duration,
    pub drill_timeout: Duration,
    pub checks: Vec<Check>,
    pub max_health_moves_per_minute: u32,
}

/// A peer's drill order this member obeys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Crashed {
    drill: u32,
    by: usize,
    since: Instant,
}

/// The node core (see the module docs).
pub struct Node {
    pub membership: Membership,
    pub handover: Handover,
    pub health: Health,
    /// The digest of this node's member list and weights (changes on reload).
    pub config_digest: u64,
    /// The drill this node runs, announced in its heartbeats: (id, member index).
    pub drill_order: Option<(u32, u8)>,
    /// This node's mirror group state, announced in every heartbeat.
    pub mirror: MirrorBeat,
    me: usize,
    names: Vec<String>,
    stop_drain_timeout: Duration,
    drill_timeout: Duration,
    quorum: bool,
    applied: Vec<BucketEntry>,
    /// `Step::plan_gen` of the plan `applied` is (0: none yet; plans count from 1).
    applied_gen: u64,
    owners: Vec<u8>,
    queued: Option<Planned>,
    stopping: Option<Instant>,
    last_state: Option<MemberState>,
    joined_at: Instant,
    join_deferred: bool,
    crashed: Option<Crashed>,
    crashed_in: Option<u32>,
    pending: Vec<Event>,
    actions: VecDeque<Action>,
}

impl Node {
    pub fn new(cfg: NodeConfig, now: Instant) -> Self {
        let digest = crate::membership::config_digest(&cfg.members);
        Self {
            membership: Membership::new(
                &cfg.members,
                cfg.me,
                cfg.networks,
                cfg.loss_window,
                cfg.has_witness,
            ),
            handover: Handover::new(
                cfg.members.clone(),
                cfg.me,
                cfg.seed,
                cfg.vips,
                cfg.drain_timeout,
                cfg.udp_idle,
            ),
            health: Health::new(&cfg.checks, cfg.max_health_moves_per_minute),
            config_digest: digest,
            drill_order: None,
            mirror: MirrorBeat::default(),
            me: cfg.me,
            names: cfg.members.iter().map(|(id, _)| id.clone()).collect(),
            stop_drain_timeout: cfg.stop_drain_timeout,
            drill_timeout: cfg.drill_timeout,
            quorum: false,
            applied: Vec::new(),
            applied_gen: 0,
            owners: Vec::new(),
            queued: None,
            stopping: None,
            last_state: None,
            joined_at: now,
            join_deferred: false,
            crashed: None,
            crashed_in: None,
            pending: Vec::new(),
            actions: VecDeque::new(),
        }
    }

    /// What an in-place upgrade hands the new farmd (with the heartbeat thread's membership),
    /// or why not now: only at a quiet point (no bucket move anywhere, nothing queued, no
    /// stop, drill or mirror role under way), where the state is the settled map alone.
    pub fn snapshot(&self, now: Instant) -> Result<NodeSnapshot, String> {
        if let Some(m) = self.describe_move() {
            return Err(format!("{m}: upgrade once it completes"));
        }
        if !self.handover.quiet() {
            return Err("a bucket move is completing here: upgrade once it did".into());
        }
        if self.queued.is_some() {
            return Err("a planned change is queued: upgrade once it is done".into());
        }
        if self.stopping.is_some() || self.membership.my_state == State::Leaving {
            return Err("this member is stopping".into());
        }
        if self.crashed.is_some() || self.drill_order.is_some() {
            return Err("a recovery drill is under way: upgrade once it is done".into());
        }
        Ok(NodeSnapshot {
            view: self.handover.settled,
            serving: self.membership.candidates()[self.me].serving,
            quorum: self.quorum,
            config_digest: self.config_digest,
            health: self.health.snapshot(),
            last_state: self.last_state,
            joined_age_ms: now.saturating_duration_since(self.joined_at).as_millis() as u64,
            my_state: Some(self.membership.my_state),
        })
    }

    /// A node core that goes on where a previous farmd's left off (an in-place upgrade):
    /// `membership` is what its heartbeat thread handed over (incarnation, sequence, replay
    /// guards, every peer's last state), `s` the rest. Nothing moves: the same settled map,
    /// the same state, the same health.
    pub fn resume(cfg: NodeConfig, s: &NodeSnapshot, membership: Membership, now: Instant) -> Self {
        let mut n = Self::new(cfg, now);
        n.membership = membership;
        if let Some(state) = s.my_state {
            n.membership.my_state = state;
        }
        n.handover.resume(s.view, s.serving);
        n.health.resume(&s.health);
        n.quorum = s.quorum;
        n.last_state = s.last_state;
        n.joined_at = now
            .checked_sub(Duration::from_millis(s.joined_age_ms))
            .unwrap_or(now);
        n
    }

    /// The next thing to do, oldest first.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn push(&mut self, a: Action) {
        self.actions.push_back(a);
    }

    fn event(&mut self, text: impl Into<String>) {
        self.push(Action::Event(text.into()));
    }

    // ---- what the shell asks -----------------------------------------------------------

    pub fn me(&self) -> usize {
        self.me
    }

    /// Whether this node may serve (quorum), as last applied.
    pub fn quorum(&self) -> bool {
        self.quorum
    }

    /// Bucket owners (member index, or `NO_OWNER`) of the applied map.
    pub fn owners(&self) -> &[u8] {
        &self.owners
    }

    /// The bucket entries last handed to the data plane.
    pub fn applied(&self) -> &[BucketEntry] {
        &self.applied
    }

    /// The queued planned change, if any.
    pub fn queued(&self) -> Option<Planned> {
        self.queued
    }

    /// Whether a stop that drains first is under way.
    pub fn stopping(&self) -> bool {
        self.stopping.is_some()
    }

    /// Whether this member plays crashed in a peer's drill.
    pub fn crashed(&self) -> bool {
        self.crashed.is_some()
    }

    /// What this member announces in its heartbeats now.
    pub fn outgoing(&self) -> crate::cluster::Outgoing {
        crate::cluster::Outgoing {
            state: self.membership.my_state,
            announce: self.handover.announce(),
            config_digest: self.config_digest,
            drill: self.drill_order,
            mirror: self.mirror,
            silent: self.crashed.is_some(),
        }
    }

    /// A bucket move in progress anywhere in this node's view; `None` when every member that
    /// is heard serves its settled map.
    pub fn current_move(&self) -> Option<Move> {
        let h = &self.handover;
        if h.settled != h.applied {
            return Some(Move {
                by: None,
                from: h.settled,
                to: h.applied,
            });
        }
        let m = &self.membership;
        m.peers
            .iter()
            .enumerate()
            .find(|(i, p)| *i != m.me && p.alive && p.state.is_some() && p.settled != p.applied)
            .map(|(i, p)| Move {
                by: Some(i),
                from: p.settled,
                to: p.applied,
            })
    }

    /// The move in progress, for people; `None` when there is none.
    pub fn describe_move(&self) -> Option<String> {
        let mv = self.current_move()?;
        let (from, to) = (
            self.handover.describe(mv.from),
            self.handover.describe(mv.to),
        );
        Some(match mv.by {
            None => format!("buckets are moving from {from} to {to}"),
            Some(i) => format!(
                "member {} is moving buckets from {from} to {to}",
                self.names[i]
            ),
        })
    }

    /// Whether a joining member may become active now: no bucket move in progress (one planned
    /// change at a time) and the application healthy.
    pub fn may_join(&self) -> bool {
        self.health.healthy()
            && self.current_move().is_none()
            && self.handover.foreign_views(&self.membership).is_empty()
    }

    /// Whether a member other than this one serves.
    pub fn others_serve(&self) -> bool {
        let me = self.me;
        self.membership
            .candidates()
            .iter()
            .enumerate()
            .any(|(i, c)| i != me && c.serving)
    }

    /// Whether this node is draining and holds no bucket any more.
    pub fn drained(&self) -> bool {
        self.membership.my_state == State::Draining
            && self.handover.settled == self.handover.applied
            && !self.owners.iter().any(|&o| o as usize == self.me)
    }

    /// Member `i`'s state as this node sees it (`shares`: buckets per member).
    pub fn member_state(&self, i: usize, shares: &[usize]) -> MemberState {
        let m = &self.membership;
        if i == m.me {
            return match m.my_state {
                State::Active if self.quorum => MemberState::Serving,
                State::Active => MemberState::NoQuorum,
                State::Draining if self.drained() => MemberState::Drained,
                s => MemberState::from(s),
            };
        }
        let p = &m.peers[i];
        if !p.alive {
            return if p.state == Some(State::Leaving) {
                MemberState::Left
            } else if p.last_heard.iter().any(Option::is_some) {
                MemberState::Lost
            } else {
                MemberState::Unknown
            };
        }
        match p.state {
            Some(State::Active) => MemberState::Serving,
            Some(State::Draining) if shares.get(i) == Some(&0) && p.settled == p.applied => {
                MemberState::Drained
            }
            Some(s) => MemberState::from(s),
            None => MemberState::Unknown,
        }
    }

    // ---- what happened ---------------------------------------------------------------

    /// The heartbeat thread's judgement of the peers.
    pub fn handle_update(&mut self, u: PeerUpdate, now: Instant) {
        let weights: Vec<u32> = self.membership.peers.iter().map(|p| p.weight).collect();
        let digests: Vec<u64> = self
            .membership
            .peers
            .iter()
            .map(|p| p.config_digest)
            .collect();
        self.membership.absorb(u.peers, u.quorum);
        if self.membership.peers.len() != self.names.len() {
            // Judged before the heartbeat thread took a reload's member list in: the same
            // members, the new ones not heard yet.
            let members: Vec<(String, u32)> = self
                .names
                .iter()
                .cloned()
                .zip(weights.iter().copied().chain(std::iter::repeat(1)))
                .collect();
            self.membership.set_members(&members);
        }
        for (p, w) in self.membership.peers.iter_mut().zip(weights) {
            p.weight = w;
        }
        for (p, old) in self.membership.peers.iter().zip(digests) {
            if p.config_digest != old
                && p.config_digest != self.config_digest
                && self.handover.is_legacy_of_current(p.config_digest)
                && p.alive
            {
                tracing::info!(
                    member = %p.id,
                    "member runs farm 0.1 (same member list): the farm serves farm 0.1's bucket \
                     map until every member runs this release, then moves to the new one"
                );
            } else if p.config_digest != old && p.config_digest != self.config_digest && p.alive {
                tracing::warn!(
                    member = %p.id,
                    "member runs with another member list or weights than this node: a weight \
                     change waits until every member has it (farmctl reload there)"
                );
            }
        }
        let changed = u.urgent || !u.events.is_empty();
        for e in &u.events {
            match e {
                Event::PeerLost { id, silent_for } => tracing::warn!(
                    member = %id,
                    silent_ms = silent_for.as_millis() as u64,
                    "member lost: not heard on any heartbeat network; its buckets move to the \
                     others"
                ),
                Event::PeerLeft { id } => tracing::info!(
                    member = %id,
                    "member left (planned stop); its buckets move to the others"
                ),
                Event::PeerBack { id } => tracing::info!(member = %id, "member heard again"),
                Event::QuorumLost => {
                    if self.membership.my_state == State::Active {
                        self.membership.my_state = State::Joining;
                    }
                    tracing::error!(
                        "lost quorum: this node sees too few members (or cannot reach the \
                         witness); releasing every bucket"
                    );
                }
                Event::QuorumRegained => {
                    // Its view is as incomplete as a starting node's (it may hear some members
                    // before others): it serves again only after a loss window with quorum, or
                    // it would take buckets of members it has simply not heard yet.
                    self.joined_at = now;
                    tracing::info!("quorum: listening for one loss window, then serving");
                }
            }
        }
        self.pending.extend(u.events);
        if changed {
            self.obey_drill(now);
            self.step(now);
        }
    }

    /// The lifecycle tick, once per heartbeat interval: health damping, joining, a queued
    /// change, the bucket map, and whether a draining stop may leave.
    pub fn handle_timeout(&mut self, now: Instant) {
        // A return held back by flap damping happens once the minute allows it.
        if let Some(change) = self.health.evaluate(now) {
            self.on_health(change);
        }
        self.join(now);
        self.start_queued();
        self.step(now);
        if self.stop_due(now) {
            self.push(Action::Leave);
        }
    }

    /// Whether `handle_tick` has anything to do: joining (the loss window's wait), or acting
    /// out a drill. The shell ticks only then: an idle member's main loop sleeps between
    /// heartbeat intervals.
    pub fn wants_tick(&self) -> bool {
        self.crashed.is_some() || self.membership.my_state == State::Joining
    }

    /// The fine tick (ten times per heartbeat interval): joining, a drill order's end.
    pub fn handle_tick(&mut self, now: Instant) {
        if self.crashed.is_some() {
            self.obey_drill(now);
        }
        if self.join(now) {
            self.step(now);
        }
    }

    /// A health check's result.
    pub fn handle_health(&mut self, check: usize, outcome: CheckOutcome, now: Instant) {
        if let Some(change) = self.health.record(check, outcome, now) {
            self.on_health(change);
            self.step(now);
        }
    }

    /// A connection count asked for by `Action::Count`.
    pub fn handle_count(&mut self, c: Counted, now: Instant) {
        if self.handover.handle_count(c) {
            self.step(now);
        }
    }

    /// An operator's drain or resume.
    pub fn handle_command(&mut self, p: Planned, force: bool, now: Instant) -> Response {
        let r = self.plan_change(p, force);
        // A drain or resume that started shows in the next heartbeat at once.
        if matches!(
            r,
            Response::Planned {
                outcome: Outcome::Started,
                ..
            }
        ) {
            self.step(now);
        }
        r
    }

    /// A stop signal: drain first (up to `stop_drain_timeout`) when others serve. Pushes
    /// `Action::Leave` when this member is to leave at once.
    pub fn handle_stop(&mut self, signal: &str, now: Instant) {
        if self.stopping.is_some() {
            tracing::info!("{signal} again: leaving at once");
            self.push(Action::Leave);
            return;
        }
        let timeout = self.stop_drain_timeout;
        let state = self.membership.my_state;
        if timeout.is_zero()
            || !matches!(state, State::Active | State::Draining)
            || !self.membership.has_quorum()
            || !self.others_serve()
            || self.drained()
        {
            tracing::info!("{signal}: stopping");
            self.push(Action::Leave);
            return;
        }
        tracing::info!(
            "{signal}: draining for at most {} s before leaving (send it again to leave at once)",
            timeout.as_secs()
        );
        if state == State::Active {
            self.queued = None;
            // One planned change at a time still holds: it queues behind a move in progress
            // (within the same bound).
            let _ = self.plan_change(Planned::Drain, true);
        }
        self.stopping = Some(now + timeout);
        self.step(now);
    }

    /// The member list or weights changed by a reload (members that stay keep their index).
    pub fn set_members(&mut self, members: Vec<(String, u32)>) {
        self.membership.set_members(&members);
        self.names = members.iter().map(|(id, _)| id.clone()).collect();
        self.config_digest = crate::membership::config_digest(&members);
        self.handover.set_members(members);
    }

    /// Leaving now: announce it.
    pub fn leave(&mut self) {
        self.drill_order = None;
        self.crashed = None;
        self.membership.my_state = State::Leaving;
    }

    /// Recomputes the bucket map now (after a reload, or at start).
    pub fn refresh(&mut self, now: Instant) {
        if let Some(change) = self.health.evaluate(now) {
            self.on_health(change);
        }
        self.step(now);
    }

    /// The drill this node runs changed what it announces: send it at once.
    pub fn announce_now(&mut self) {
        self.push(Action::Announce { send_now: true });
    }

    // ---- the rules ---------------------------------------------------------------------

    /// A joining node becomes active after one loss window with quorum, when `may_join`.
    /// Returns whether its state changed.
    fn join(&mut self, now: Instant) -> bool {
        if self.membership.my_state == State::Joining
            && self.membership.has_quorum()
            && now.saturating_duration_since(self.joined_at) >= self.membership.loss_window
        {
            if self.may_join() {
                self.membership.my_state = State::Active;
                self.join_deferred = false;
                tracing::info!(
                    "joined: heard the farm for one loss window with quorum, now active"
                );
                return true;
            } else if !self.join_deferred {
                self.join_deferred = true;
                let foreign = self.handover.foreign_views(&self.membership);
                if foreign.is_empty() {
                    tracing::info!("joining waits for the bucket move in progress to complete");
                } else {
                    tracing::info!(
                        members = ?foreign,
                        "joining waits: these members serve a map of another member list (a \
                         member added live joins once every member has the new list: farmctl \
                         reload there)"
                    );
                }
            }
        }
        false
    }

    /// Brings the data plane to this node's current plan (see `handover`): the table written
    /// only when it changed, the masks always (the shell writes them only when they changed).
    /// Without quorum this node takes none. When what this node announces changed (a move
    /// applied or handed over), the peers are told at once.
    fn step(&mut self, now: Instant) {
        let announced = self.handover.announce();
        let step = self.handover.step(&self.membership, now);
        self.quorum = self.membership.has_quorum();
        let (ready, done) = (step.givers_ready, step.givers_done);
        // The same plan as last time (most steps): no 65536-entry comparison.
        if step.plan_gen == self.applied_gen || step.plan.entries == self.applied {
            self.applied_gen = step.plan_gen;
            self.push(Action::SetMasks { ready, done });
        } else {
            let plan = step.plan;
            self.applied_gen = step.plan_gen;
            self.applied.clone_from(&plan.entries);
            self.owners.clone_from(&plan.owners);
            let count = |st: u8| self.applied.iter().filter(|e| e.state == st).count();
            let counts = (
                count(bucket_state::MINE),
                count(bucket_state::INCOMING),
                count(bucket_state::OUTGOING),
            );
            let serving: Vec<String> = self
                .membership
                .candidates()
                .into_iter()
                .filter(|c| c.serving)
                .map(|c| c.id)
                .collect();
            self.event(format!(
                "bucket map: serving [{}]; this node owns {}, takes over {}, hands over {}",
                serving.join(", "),
                counts.0,
                counts.1,
                counts.2
            ));
            let entries = self.applied.clone();
            self.push(Action::WriteBuckets {
                entries,
                ready,
                done,
                serving,
                counts,
            });
        }
        if let Some(req) = self.handover.poll_count(now) {
            self.push(Action::Count(req));
        }
        let send_now = self.handover.announce() != announced;
        self.push(Action::Announce { send_now });
        self.notify();
    }

    /// Hook events for what changed since the last step.
    fn notify(&mut self) {
        let me = self.names[self.me].clone();
        for e in std::mem::take(&mut self.pending) {
            let event = match e {
                Event::PeerLost { id, silent_for } => {
                    self.push(Action::Failover {
                        member: id.clone(),
                        silent_for,
                    });
                    hooks::Event {
                        name: "peer-lost",
                        member: id,
                        detail: format!("not heard for {} ms", silent_for.as_millis()),
                    }
                }
                Event::PeerLeft { id } => hooks::Event {
                    name: "peer-left",
                    member: id,
                    detail: "announced it was leaving (planned stop)".into(),
                },
                Event::PeerBack { id } => hooks::Event {
                    name: "peer-back",
                    member: id,
                    detail: String::new(),
                },
                Event::QuorumLost => hooks::Event {
                    name: "lost-quorum",
                    member: me.clone(),
                    detail: "this member releases every bucket".into(),
                },
                Event::QuorumRegained => {
                    self.event("quorum regained");
                    continue;
                }
            };
            self.event(
                format!("{} {} {}", event.name, event.member, event.detail)
                    .trim_end()
                    .to_string(),
            );
            self.push(Action::Hook(event));
        }
        let state = self.member_state(self.me, &[]);
        if self.last_state != Some(state) {
            let was = self.last_state.map_or("", MemberState::as_str);
            let name = match state {
                MemberState::Serving => Some("became-active"),
                MemberState::Drained => Some("drained"),
                MemberState::Unhealthy => Some("unhealthy"),
                _ => None,
            };
            self.event(format!("{me}: {was} -> {}", state.as_str()));
            if let Some(name) = name {
                self.push(Action::Hook(hooks::Event {
                    name,
                    member: me,
                    detail: format!("was {was}"),
                }));
            }
            self.last_state = Some(state);
        }
    }

    /// The application's health changed.
    fn on_health(&mut self, change: Change) {
        let state = self.membership.my_state;
        match change {
            Change::Unhealthy { answered, why } => {
                if matches!(state, State::Active | State::Joining) {
                    self.membership.my_state = State::Unhealthy;
                    self.queued = None;
                    self.handover.immediate = !answered;
                    tracing::warn!(
                        "unhealthy ({why}): giving this member's buckets away {}",
                        if answered {
                            "keeping its connections (the application still answers)"
                        } else {
                            "at once (the application does not answer)"
                        }
                    );
                } else {
                    tracing::warn!("unhealthy ({why}); this member is {state:?} and stays so");
                }
            }
            Change::Healthy => {
                self.push(Action::Hook(hooks::Event {
                    name: "healthy",
                    member: self.names[self.me].clone(),
                    detail: String::new(),
                }));
                if state == State::Unhealthy {
                    tracing::info!("healthy again: taking this member's share back");
                    if let Response::Planned { message, .. } =
                        self.plan_change(Planned::Resume, false)
                    {
                        tracing::info!("{message}");
                    }
                }
            }
        }
    }

    /// Starts a drain or resume now.
    fn apply(&mut self, p: Planned) {
        self.event(format!("{} started", p.name()));
        let m = &mut self.membership;
        match p {
            Planned::Drain => {
                m.my_state = State::Draining;
                tracing::info!(
                    "draining: handing this node's buckets to the others (connections are kept \
                     until they end, within the drain timeout)"
                );
            }
            Planned::Resume => {
                self.handover.immediate = false;
                // Back to joining when quorum went meanwhile: it serves again after a loss
                // window with quorum, as a starting node does.
                m.my_state = if m.has_quorum() {
                    State::Active
                } else {
                    State::Joining
                };
                tracing::info!("resuming: taking this node's share back");
            }
        }
    }

    /// Starts a queued drain or resume once no other move is in progress.
    fn start_queued(&mut self) {
        if let Some(p) = self.queued
            && self.current_move().is_none()
        {
            self.queued = None;
            self.apply(p);
        }
    }

    /// A drain or resume request: at once, or queued behind the move in progress.
    fn plan_change(&mut self, p: Planned, force: bool) -> Response {
        let state = self.membership.my_state;
        let planned = |outcome, message: String| Response::Planned { outcome, message };
        if state == State::Leaving || self.stopping.is_some() {
            return Response::Error {
                message: "farmd is stopping".into(),
            };
        }
        if self.queued == Some(p) {
            return planned(Outcome::Queued, format!("a {} is already queued", p.name()));
        }
        if let Some(q) = self.queued.take() {
            // The opposite request withdraws the queued one.
            return planned(
                Outcome::Cancelled,
                format!("the queued {} is withdrawn; nothing changes", q.name()),
            );
        }
        match (p, state) {
            (Planned::Drain, State::Draining) => {
                return planned(
                    Outcome::Unchanged,
                    if self.drained() {
                        "already drained".into()
                    } else {
                        "already draining".into()
                    },
                );
            }
            (Planned::Drain, State::Joining | State::Unhealthy) => {
                // It holds nothing: it simply stays out.
                self.apply(p);
                return planned(
                    Outcome::Started,
                    "this node serves nothing yet; it stays out until `farmctl resume`".into(),
                );
            }
            (Planned::Drain, _) if !force && !self.others_serve() => {
                return Response::Error {
                    message: "no other member serves: draining this node would leave the VIPs \
                              unanswered; use --force to drain anyway"
                        .into(),
                };
            }
            (Planned::Resume, State::Active | State::Joining) => {
                return planned(Outcome::Unchanged, "not drained: nothing to resume".into());
            }
            (Planned::Resume, _) if !self.health.healthy() => {
                return Response::Error {
                    message: format!(
                        "the health checks fail ({}): this member comes back by itself when \
                         they pass (see farmctl checks)",
                        self.health.failing().join(", ")
                    ),
                };
            }
            _ => {}
        }
        // Undoing this node's own drain before it completed moves nothing back: at once.
        let own_drain = {
            let h = &self.handover;
            p == Planned::Resume
                && h.settled.weights == h.applied.weights
                && h.settled.serving ^ h.applied.serving == 1 << self.me
        };
        match self.describe_move() {
            Some(why) if !own_drain => {
                self.queued = Some(p);
                tracing::info!("{} queued: {why}", p.name());
                planned(
                    Outcome::Queued,
                    format!(
                        "queued: {why}; the {} starts when that completes (one planned change \
                         at a time)",
                        p.name()
                    ),
                )
            }
            _ => {
                self.apply(p);
                planned(Outcome::Started, format!("{} started", p.name()))
            }
        }
    }

    /// Whether a stop that drains first may leave now.
    fn stop_due(&self, now: Instant) -> bool {
        match self.stopping {
            None => false,
            Some(_) if self.drained() => {
                tracing::info!("drained: stopping");
                true
            }
            Some(by) if now >= by => {
                tracing::warn!(
                    "stop drain timeout ({} s) passed: leaving with buckets still held",
                    self.stop_drain_timeout.as_secs()
                );
                true
            }
            Some(_) => {
                !self.others_serve() && {
                    tracing::warn!("no other member serves any more: stopping without a drain");
                    true
                }
            }
        }
    }

    /// Obeys a peer's drill that names this node (acts as if crashed: no heartbeats, dead-man
    /// switch lapsed, so the data plane takes no VIP traffic and answers no ARP), and comes
    /// back as a restarted member once the drill no longer names it.
    fn obey_drill(&mut self, now: Instant) {
        let m = &self.membership;
        let me = m.me as u8;
        let order = m.peers.iter().enumerate().find_map(|(i, p)| match p.drill {
            Some((id, target)) if p.alive && target == me => Some((id, i)),
            _ => None,
        });
        match (self.crashed, order) {
            (None, Some((drill, by))) if self.crashed_in != Some(drill) => {
                self.crashed = Some(Crashed {
                    drill,
                    by,
                    since: now,
                });
                self.crashed_in = Some(drill);
                let by = self.names[by].clone();
                tracing::warn!(
                    drill,
                    by = %by,
                    "drill: acting as if crashed (no heartbeats, no VIP traffic) until the drill \
                     ends"
                );
                self.push(Action::Crash { drill, by });
            }
            (Some(c), order)
                if order.map(|o| o.0) != Some(c.drill)
                    || now.saturating_duration_since(c.since)
                        > self.drill_timeout * 2 + Duration::from_secs(5) =>
            {
                self.crashed = None;
                self.membership.my_state = State::Joining;
                self.joined_at = now;
                let by = self.names[c.by].clone();
                tracing::info!(
                    drill = c.drill,
                    by = %by,
                    "drill is over: rejoining as a restarted member"
                );
                self.push(Action::Rejoin { drill: c.drill, by });
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{handover::Announce, heartbeat::Heartbeat, membership::Membership};

    const W: Duration = Duration::from_millis(400);

    fn config(n: usize, me: usize) -> NodeConfig {
        NodeConfig {
            me,
            members: (0..n).map(|i| (format!("n{}", i + 1), 1)).collect(),
            networks: 1,
            loss_window: W,
            has_witness: false,
            seed: HashKey::from_bytes(&[3; 16]),
            vips: Vec::new(),
            drain_timeout: Duration::from_secs(60),
            udp_idle: Duration::from_millis(1000),
            stop_drain_timeout: Duration::from_secs(30),
            drill_timeout: Duration::from_secs(10),
            checks: Vec::new(),
            max_health_moves_per_minute: 4,
        }
    }

    /// The peers as a heartbeat thread would judge them: a `Membership` fed heartbeats.
    struct Farm {
        judge: Membership,
        seq: u64,
    }

    impl Farm {
        fn new(n: usize, me: usize) -> Self {
            let c = config(n, me);
            Self {
                judge: Membership::new(&c.members, me, 1, W, false),
                seq: 0,
            }
        }

        /// Peer `i` announces `state` and the views of `a`.
        fn hear(
            &mut self,
            i: usize,
            state: State,
            a: Announce,
            drill: Option<(u32, u8)>,
            at: Instant,
        ) {
            self.seq += 1;
            let hb = Heartbeat {
                version: crate::heartbeat::VERSION,
                departed: 0,
                id: format!("n{}", i + 1),
                state,
                weight: 1,
                incarnation: 1,
                seq: self.seq,
                applied: a.applied,
                config_digest: 0,
                network: 0,
                settled: a.settled,
                handed_over: a.handed_over,
                released: a.released,
                drill,
                mirror: Default::default(),
                echo: (0, 0),
            };
            self.judge.receive(&hb, 0, at).expect("accepted");
        }

        fn update(&mut self, at: Instant) -> PeerUpdate {
            let events = self.judge.tick(at, false);
            PeerUpdate {
                peers: self.judge.peers.clone(),
                quorum: self.judge.has_quorum(),
                urgent: true,
                events,
            }
        }
    }

    fn drain_actions(n: &mut Node) -> Vec<Action> {
        std::iter::from_fn(|| n.poll_action()).collect()
    }

    fn hooks_of(actions: &[Action]) -> Vec<&'static str> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Hook(e) => Some(e.name),
                _ => None,
            })
            .collect()
    }

    fn settled_on(v: View) -> Announce {
        Announce {
            applied: v,
            settled: v,
            released: v,
            handed_over: v,
        }
    }

    /// A three-member farm where every member serves the settled map of all three, as node 0
    /// sees it after joining (the others hand it its buckets).
    fn serving_farm(t0: Instant) -> (Node, Farm, Announce) {
        let mut node = Node::new(config(3, 0), t0);
        let mut farm = Farm::new(3, 0);
        let weights = node.config_digest;
        let two = settled_on(View {
            serving: 0b110,
            weights,
        });
        let all = View {
            serving: 0b111,
            weights,
        };
        for i in 1..3 {
            farm.hear(i, State::Active, two, None, t0);
        }
        node.handle_update(farm.update(t0), t0);
        // One loss window later it joins: a move from the two to all three.
        let t1 = t0 + W;
        for i in 1..3 {
            farm.hear(i, State::Active, two, None, t1);
        }
        node.handle_update(farm.update(t1), t1);
        node.handle_timeout(t1);
        assert_eq!(node.membership.my_state, State::Active);
        assert_eq!(node.handover.applied, all);
        // The others prepare, release and hand over; the move completes.
        let t2 = t1 + Duration::from_millis(50);
        let giving = Announce {
            applied: all,
            settled: two.settled,
            released: all,
            handed_over: all,
        };
        for i in 1..3 {
            farm.hear(i, State::Active, giving, None, t2);
        }
        node.handle_update(farm.update(t2), t2);
        node.handle_timeout(t2);
        assert_eq!(node.handover.settled, all, "the move completed");
        let settled = settled_on(all);
        for i in 1..3 {
            farm.hear(i, State::Active, settled, None, t2);
        }
        node.handle_update(farm.update(t2), t2);
        assert!(node.current_move().is_none());
        (node, farm, settled)
    }

    /// A farm of one, serving.
    fn alone(t0: Instant) -> Node {
        let mut node = Node::new(config(1, 0), t0);
        let mut farm = Farm::new(1, 0);
        node.handle_update(farm.update(t0), t0);
        node.handle_timeout(t0 + W);
        assert_eq!(node.membership.my_state, State::Active);
        node
    }

    #[test]
    fn a_starting_member_joins_after_one_loss_window_with_quorum() {
        let t0 = Instant::now();
        let mut node = Node::new(config(3, 0), t0);
        let mut farm = Farm::new(3, 0);
        node.handle_timeout(t0);
        assert_eq!(node.membership.my_state, State::Joining, "no quorum yet");
        farm.hear(1, State::Active, Announce::default(), None, t0);
        node.handle_update(farm.update(t0), t0);
        node.handle_timeout(t0 + W / 2);
        assert_eq!(
            node.membership.my_state,
            State::Joining,
            "half a loss window"
        );
        farm.hear(1, State::Active, Announce::default(), None, t0 + W);
        node.handle_update(farm.update(t0 + W), t0 + W);
        node.handle_timeout(t0 + W);
        assert_eq!(node.membership.my_state, State::Active);
        let a = drain_actions(&mut node);
        assert!(hooks_of(&a).contains(&"became-active"), "{a:?}");
        assert!(
            a.iter().any(|a| matches!(a, Action::WriteBuckets { .. })),
            "a bucket table is written"
        );
    }

    #[test]
    fn one_planned_change_at_a_time_queues_and_the_opposite_withdraws() {
        let t0 = Instant::now();
        let (mut node, mut farm, settled) = serving_farm(t0);
        let t = t0 + W * 2;
        // Member n2 is moving buckets (it drains): a drain here queues.
        let moving = Announce {
            applied: View {
                serving: 0b101,
                weights: settled.applied.weights,
            },
            ..settled
        };
        farm.hear(1, State::Draining, moving, None, t);
        farm.hear(2, State::Active, settled, None, t);
        node.handle_update(farm.update(t), t);
        let r = node.handle_command(Planned::Drain, false, t);
        assert!(
            matches!(r, Response::Planned { outcome: Outcome::Queued, ref message } if message.contains("n2")),
            "{r:?}"
        );
        assert_eq!(node.queued(), Some(Planned::Drain));
        // Asking again: already queued.
        assert!(matches!(
            node.handle_command(Planned::Drain, false, t),
            Response::Planned {
                outcome: Outcome::Queued,
                ..
            }
        ));
        // The opposite withdraws it; nothing changes.
        assert!(matches!(
            node.handle_command(Planned::Resume, false, t),
            Response::Planned {
                outcome: Outcome::Cancelled,
                ..
            }
        ));
        assert_eq!(node.queued(), None);
        assert_eq!(node.membership.my_state, State::Active);
        // Queued again, it starts once the other move completed.
        node.handle_command(Planned::Drain, false, t);
        let done = Announce {
            applied: moving.applied,
            settled: moving.applied,
            released: moving.applied,
            handed_over: moving.applied,
        };
        let t2 = t + Duration::from_millis(50);
        farm.hear(1, State::Draining, done, None, t2);
        farm.hear(2, State::Active, done, None, t2);
        node.handle_update(farm.update(t2), t2);
        node.handle_timeout(t2);
        assert_eq!(node.queued(), None);
        assert_eq!(node.membership.my_state, State::Draining);
    }

    #[test]
    fn the_last_serving_member_refuses_to_drain_unless_forced() {
        let t0 = Instant::now();
        let mut node = alone(t0);
        assert!(matches!(
            node.handle_command(Planned::Drain, false, t0 + W),
            Response::Error { .. }
        ));
        assert!(matches!(
            node.handle_command(Planned::Drain, true, t0 + W),
            Response::Planned {
                outcome: Outcome::Started,
                ..
            }
        ));
    }

    #[test]
    fn a_stop_drains_first_and_leaves_at_the_deadline_or_a_second_signal() {
        let t0 = Instant::now();
        let (mut node, mut farm, settled) = serving_farm(t0);
        drain_actions(&mut node);
        let t = t0 + W * 2;
        node.handle_stop("SIGTERM", t);
        assert!(node.stopping());
        assert_eq!(node.membership.my_state, State::Draining);
        assert!(!drain_actions(&mut node).contains(&Action::Leave));
        // Others keep serving; the drain has not completed: no leave before the deadline.
        farm.hear(1, State::Active, settled, None, t + Duration::from_secs(29));
        farm.hear(2, State::Active, settled, None, t + Duration::from_secs(29));
        node.handle_update(
            farm.update(t + Duration::from_secs(29)),
            t + Duration::from_secs(29),
        );
        node.handle_timeout(t + Duration::from_secs(29));
        assert!(!drain_actions(&mut node).contains(&Action::Leave));
        farm.hear(1, State::Active, settled, None, t + Duration::from_secs(30));
        farm.hear(2, State::Active, settled, None, t + Duration::from_secs(30));
        node.handle_update(
            farm.update(t + Duration::from_secs(30)),
            t + Duration::from_secs(30),
        );
        node.handle_timeout(t + Duration::from_secs(30));
        assert!(
            drain_actions(&mut node).contains(&Action::Leave),
            "deadline"
        );
        // A second signal leaves at once.
        node.handle_stop("SIGTERM", t + Duration::from_secs(30));
        assert_eq!(drain_actions(&mut node), vec![Action::Leave]);
    }

    #[test]
    fn a_stop_with_nobody_else_serving_leaves_at_once() {
        let t0 = Instant::now();
        let mut node = alone(t0);
        drain_actions(&mut node);
        node.handle_stop("SIGTERM", t0 + W);
        assert!(drain_actions(&mut node).contains(&Action::Leave));
        assert!(!node.stopping());
    }

    #[test]
    fn a_drilled_member_plays_crashed_until_the_order_ends_then_rejoins() {
        let t0 = Instant::now();
        let (mut node, mut farm, settled) = serving_farm(t0);
        drain_actions(&mut node);
        let t = t0 + W * 2;
        // n2 orders drill 7 naming this member (index 0).
        farm.hear(1, State::Active, settled, Some((7, 0)), t);
        node.handle_update(farm.update(t), t);
        let a = drain_actions(&mut node);
        assert!(
            a.contains(&Action::Crash {
                drill: 7,
                by: "n2".into()
            }),
            "{a:?}"
        );
        assert!(node.crashed() && node.outgoing().silent);
        // Still ordered: stays crashed.
        node.handle_tick(t + Duration::from_millis(100));
        assert!(node.crashed());
        // The order ends: rejoin as a restarted member, joining.
        let t2 = t + Duration::from_secs(1);
        farm.hear(1, State::Active, settled, None, t2);
        node.handle_update(farm.update(t2), t2);
        let a = drain_actions(&mut node);
        assert!(a.contains(&Action::Rejoin {
            drill: 7,
            by: "n2".into()
        }));
        assert!(!node.crashed() && !node.outgoing().silent);
        assert_eq!(node.membership.my_state, State::Joining);
        // The same order announced again is not obeyed twice.
        farm.hear(1, State::Active, settled, Some((7, 0)), t2 + W);
        node.handle_update(farm.update(t2 + W), t2 + W);
        assert!(!node.crashed());
    }

    #[test]
    fn a_lost_member_s_buckets_are_taken_at_once_without_a_move() {
        let t0 = Instant::now();
        let (mut node, mut farm, settled) = serving_farm(t0);
        drain_actions(&mut node);
        // n2 keeps sending, n3 goes silent: lost after the loss window.
        let t = t0 + W * 2;
        farm.hear(1, State::Active, settled, None, t);
        node.handle_update(farm.update(t), t);
        let t2 = t + W / 2;
        farm.hear(1, State::Active, settled, None, t2);
        node.handle_update(farm.update(t2 + W / 2 + Duration::from_millis(10)), t2);
        let a = drain_actions(&mut node);
        assert_eq!(hooks_of(&a), vec!["peer-lost"]);
        let entries = a
            .iter()
            .find_map(|a| match a {
                Action::WriteBuckets { entries, .. } => Some(entries.clone()),
                _ => None,
            })
            .expect("a new table at once");
        assert!(
            entries
                .iter()
                .all(|e| e.state == bucket_state::MINE || e.state == bucket_state::NOT_MINE),
            "no bucket in handover"
        );
        assert_eq!(node.handover.settled.serving, 0b011);
        assert!(node.current_move().is_none());
        assert!(node.quorum());
    }

    #[test]
    fn peers_lost_and_left_are_different_hooks_and_only_a_loss_is_a_failover() {
        let t0 = Instant::now();
        let (mut node, mut farm, settled) = serving_farm(t0);
        drain_actions(&mut node);
        let t = t0 + W * 2;
        farm.hear(1, State::Leaving, settled, None, t);
        farm.hear(2, State::Active, settled, None, t);
        node.handle_update(farm.update(t), t);
        let a = drain_actions(&mut node);
        assert_eq!(hooks_of(&a), vec!["peer-left"]);
        assert!(!a.iter().any(|a| matches!(a, Action::Failover { .. })));
        // n3 goes silent: lost, a failover. n2 left by a planned stop and does not count: of
        // the two that do, this member is the lower one and keeps quorum (see `membership`).
        let t2 = t + W + W / 16 + Duration::from_millis(10);
        node.handle_update(farm.update(t2), t2);
        let a = drain_actions(&mut node);
        assert_eq!(hooks_of(&a), vec!["peer-lost"]);
        assert!(
            a.iter()
                .any(|a| matches!(a, Action::Failover { member, .. } if member == "n3"))
        );
        assert_eq!(node.membership.my_state, State::Active, "serves on");
        assert!(node.quorum());
    }

    #[test]
    fn a_member_resumed_by_an_in_place_upgrade_announces_what_it_announced() {
        let t0 = Instant::now();
        let (node, mut farm, settled) = serving_farm(t0);
        let t = t0 + W * 3;
        let snapshot = node.snapshot(t).expect("a quiet point");
        // The heartbeat thread's copy of the membership does not track this member's state.
        let thread_copy = farm.judge.clone();
        assert_eq!(thread_copy.my_state, State::Joining);
        let mut resumed = Node::resume(config(3, 0), &snapshot, thread_copy, t);
        assert_eq!(
            resumed.outgoing().state,
            State::Active,
            "the first heartbeat of the new farmd says active"
        );
        for i in 1..3 {
            farm.hear(i, State::Active, settled, None, t);
        }
        resumed.handle_update(farm.update(t), t);
        resumed.handle_timeout(t);
        assert_eq!(resumed.membership.my_state, State::Active);
        assert_eq!(resumed.handover.settled, node.handover.settled);
        assert!(resumed.current_move().is_none(), "no bucket moves");
    }
}
