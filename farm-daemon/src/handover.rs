//! The runtime of bucket moves (see `transition` for the rules): which plan this node applies,
//! whether it has handed over its outgoing buckets (no connection left in them, after at least
//! the UDP idle time, or the drain timeout), and when the whole move is complete.
//!
//! No I/O: the connections left in the outgoing buckets are counted elsewhere (`connections`,
//! on a thread of its own). `poll_count` says when a count is due; `handle_count` takes the
//! answer. Only a count asked for after the buckets were released (no new connection can
//! arrive in them any more) can end a move early.

use std::time::{Duration, Instant};

use farm_common::HashKey;

use crate::{
    assign::Alg,
    config::Vip,
    connections::{CountRequest, Counted},
    heartbeat::State,
    membership::{Membership, config_digest, legacy_digest},
    transition::{self, Members, Plan, View},
};

/// Where a move stands, for status.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub settled: Vec<String>,
    pub target: Vec<String>,
    /// Buckets this node hands over, and its connections still in them.
    pub outgoing_buckets: usize,
    pub connections_left: usize,
    /// Members whose hand-over is awaited.
    pub waiting_for: Vec<String>,
    pub elapsed_ms: u64,
}

/// (settled, target, alive, quorum)
type PlanKey = (View, View, u64, bool);

/// Where this node's bucket moves stand, as its heartbeats say (see `transition`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Announce {
    pub applied: View,
    pub settled: View,
    pub released: View,
    pub handed_over: View,
}

/// What the data plane should hold now: the plan's table and the handover masks of the
/// control word (see `farm_common::Control::effective_state`).
pub struct Step<'a> {
    pub plan: &'a Plan,
    /// Which plan this is: a new number whenever the plan is computed anew (so the caller
    /// knows an unchanged plan without comparing 65536 entries).
    pub plan_gen: u64,
    pub givers_ready: u64,
    pub givers_done: u64,
}

/// A member list this node knows: (digest, members and weights, the assignment it uses).
type KnownList = (u64, Vec<(String, u32)>, Alg);

pub struct Handover {
    /// The member lists (ids and weights) this node knows, by digest: its configuration's
    /// (`current`) and those of the views still in use; newest last.
    weight_sets: Vec<KnownList>,
    current: u64,
    me: usize,
    seed: HashKey,
    vips: Vec<Vip>,
    drain_timeout: Duration,
    udp_idle: Duration,
    /// The view of the settled map, and the target this node has handed over for.
    pub settled: View,
    pub handed_over: View,
    /// The target of the plan last returned (and applied by the daemon before it next sends a
    /// heartbeat).
    pub applied: View,
    /// The target for which this node's outgoing buckets take no new connections.
    pub released: View,
    /// Hand over without waiting for connections (the application does not answer anyway).
    pub immediate: bool,
    cached: Option<(PlanKey, Plan)>,
    /// Counts the plans computed (see `Step::plan_gen`).
    plan_gen: u64,
    started: Option<(View, Instant)>,
    /// When this node released its outgoing buckets for the current target.
    released_at: Option<Instant>,
    /// A count asked for and not yet answered (when it was asked).
    counting: Option<Instant>,
    /// When the last count was asked for.
    last_count: Option<Instant>,
    /// The last count for the current target: (connections, when it was asked for).
    connections: Option<(usize, Instant)>,
    progress: Option<Progress>,
    /// Whether this node served at the previous step.
    was_serving: bool,
}

impl Handover {
    pub fn new(
        members: Vec<(String, u32)>,
        me: usize,
        seed: HashKey,
        vips: Vec<Vip>,
        drain_timeout: Duration,
        udp_idle: Duration,
    ) -> Self {
        let mut h = Self {
            weight_sets: Vec::new(),
            current: 0,
            me,
            seed,
            vips,
            drain_timeout,
            udp_idle,
            settled: View::default(),
            handed_over: View::default(),
            applied: View::default(),
            released: View::default(),
            immediate: false,
            cached: None,
            plan_gen: 0,
            started: None,
            released_at: None,
            counting: None,
            last_count: None,
            connections: None,
            progress: None,
            was_serving: false,
        };
        h.set_members(members);
        h
    }

    /// The member list (with weights) of digest `weights` and the assignment it is computed
    /// with; this node's own for one it does not know (a peer's view from before this node
    /// started).
    fn members(&self, weights: u64) -> (&Members, Alg) {
        let found = self.weight_sets.iter().rev().find(|(d, ..)| *d == weights);
        let current = self
            .weight_sets
            .iter()
            .rev()
            .find(|(d, ..)| *d == self.current);
        let (_, m, alg) = found.or(current).expect("the current set is always kept");
        (m, *alg)
    }

    fn known(&self, weights: u64) -> bool {
        self.weight_sets.iter().any(|(d, ..)| *d == weights)
    }

    /// Whether `digest` is farm 0.1's for this node's member list (a member running 0.1).
    pub fn is_legacy_of_current(&self, digest: u64) -> bool {
        self.weight_sets.iter().any(|(d, m, alg)| {
            *d == digest && *alg == Alg::Ranges && m == self.members(self.current).0
        })
    }

    /// The assignment the map of a view with these weights is computed with.
    pub fn algorithm(&self, weights: u64) -> Alg {
        self.members(weights).1
    }

    /// This node's configured member list and weights (at start and on reload). The weights
    /// take effect once every live member has the same (see `step`).
    pub fn set_members(&mut self, members: Vec<(String, u32)>) {
        let digest = config_digest(&members);
        let legacy = legacy_digest(&members);
        self.current = digest;
        self.weight_sets
            .retain(|(d, ..)| *d != digest && *d != legacy);
        // The same list as farm 0.1 computed it: understood during a rolling upgrade.
        self.weight_sets
            .push((legacy, members.clone(), Alg::Ranges));
        self.weight_sets.push((digest, members, Alg::Rendezvous));
        self.prune();
    }

    /// Forgets the member lists no view uses any more (at most a few are ever kept).
    fn prune(&mut self) {
        let used = [
            self.current,
            self.settled.weights,
            self.applied.weights,
            self.released.weights,
            self.handed_over.weights,
        ];
        while self.weight_sets.len() > 6 {
            match self
                .weight_sets
                .iter()
                .position(|(d, ..)| !used.contains(d))
            {
                Some(i) => {
                    self.weight_sets.remove(i);
                }
                None => break,
            }
        }
    }

    pub fn set_vips(&mut self, vips: Vec<Vip>) {
        self.vips = vips;
    }

    pub fn set_timeouts(&mut self, drain_timeout: Duration, udp_idle: Duration) {
        self.drain_timeout = drain_timeout;
        self.udp_idle = udp_idle;
    }

    fn plan(&mut self, key: PlanKey) -> &Plan {
        if self.cached.as_ref().map(|(k, _)| *k) != Some(key) {
            let (settled, target, alive, quorum) = key;
            let p = transition::plan(
                &self.seed,
                self.me,
                (self.members(settled.weights), settled.serving),
                (self.members(target.weights), target.serving),
                alive,
                quorum,
            );
            self.cached = Some((key, p));
            self.plan_gen += 1;
        }
        &self.cached.as_ref().expect("just set").1
    }

    /// The plan for `key` and its number (`Step::plan_gen`).
    fn planned(&mut self, key: PlanKey) -> (&Plan, u64) {
        self.plan(key);
        let plan_gen = self.plan_gen;
        (&self.cached.as_ref().expect("just planned").1, plan_gen)
    }

    /// The ids of the members in `mask`.
    pub fn names(&self, mask: u64) -> Vec<String> {
        self.members(self.current)
            .0
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, (id, _))| id.clone())
            .collect()
    }

    /// A view for people: its members, and "(previous weights)" when its weights are not this
    /// node's configured ones.
    pub fn describe(&self, v: View) -> String {
        let names = self.names(v.serving).join(", ");
        if v.weights == self.current || v.weights == 0 {
            format!("[{names}]")
        } else {
            format!("[{names}] (previous weights)")
        }
    }

    /// Takes over a previous farmd's settled map (an in-place upgrade, at a quiet point: no
    /// move in progress, so applied = settled = released = handed over).
    pub fn resume(&mut self, view: View, serving: bool) {
        self.settled = view;
        self.applied = view;
        self.released = view;
        self.handed_over = view;
        self.was_serving = serving;
    }

    /// Whether nothing is in progress here: what an in-place upgrade needs (see `resume`).
    pub fn quiet(&self) -> bool {
        self.applied == self.settled
            && self.released == self.settled
            && self.handed_over == self.settled
            && self.started.is_none()
            && self.counting.is_none()
    }

    /// What this node announces in its heartbeats.
    pub fn announce(&self) -> Announce {
        Announce {
            applied: self.applied,
            settled: self.settled,
            released: self.released,
            handed_over: self.handed_over,
        }
    }

    fn settled_step(&mut self, key: PlanKey) -> Step<'_> {
        let (plan, plan_gen) = self.planned(key);
        Step {
            plan,
            plan_gen,
            givers_ready: 0,
            givers_done: 0,
        }
    }

    /// The weights the farm agrees on: this node's configured ones once every live member
    /// announces the same member list and weights, the settled map's until then (a reload
    /// that changes weights moves buckets only once every member has loaded it, so that no
    /// two members ever compute their maps with different weights).
    ///
    /// A change of the member list itself (members added or removed) takes effect only once
    /// *every* member of the new list is alive and announces it: a member added cannot hear
    /// the members that do not have the new list yet (they refuse its heartbeats), so "every
    /// live one" would not be enough.
    pub fn agreed_weights(&self, m: &Membership) -> u64 {
        let ids = |l: &Members| l.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>();
        // Weights alone: every live member. Another member list, or another assignment (the
        // move from farm 0.1's once every member runs 0.2): every member, so that a member
        // restarting (being upgraded) is not left out of a change it will then undo.
        let (settled, current) = (
            self.members(self.settled.weights),
            self.members(self.current),
        );
        let same_roster = self.known(self.settled.weights)
            && ids(settled.0) == ids(current.0)
            && settled.1 == current.1;
        let agreed = m.peers.iter().enumerate().all(|(i, p)| {
            i == self.me
                || (p.config_digest == self.current && p.alive)
                || (same_roster && !p.alive)
        });
        if agreed || !self.known(self.settled.weights) {
            self.current
        } else {
            self.settled.weights
        }
    }

    /// The live members whose bucket map (settled or applied view) is computed from a member
    /// list this node does not know: members that have not loaded this node's list yet, while
    /// this node was added to it. This node does not serve while there are any: it cannot
    /// compute the map they serve.
    pub fn foreign_views(&self, m: &Membership) -> Vec<String> {
        m.peers
            .iter()
            .enumerate()
            .filter(|(i, p)| {
                *i != self.me
                    && p.alive
                    && [p.settled.weights, p.applied.weights]
                        .iter()
                        .any(|&w| w != 0 && !self.known(w))
            })
            .map(|(_, p)| p.id.clone())
            .collect()
    }

    /// One step: returns what to apply now.
    pub fn step(&mut self, m: &Membership, now: Instant) -> Step<'_> {
        let candidates = m.candidates();
        // A change of weights, member list or assignment waits for this serving member's move
        // in progress to complete (a target changed under a move would move connections
        // twice). A member not serving follows the farm's settled map (below).
        let agreed = self.agreed_weights(m);
        let moving = self.was_serving
            && m.candidates()[self.me].serving
            && self.settled != self.applied
            && self.known(self.applied.weights);
        let target = View {
            serving: transition::mask(&candidates),
            weights: if moving && self.applied.weights != 0 {
                self.applied.weights
            } else {
                agreed
            },
        };
        let quorum = m.has_quorum();
        let alive = m
            .peers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.alive)
            .fold(0u64, |a, (i, _)| a | (1 << i));
        let serving = candidates[self.me].serving;
        if !serving || !self.was_serving {
            // Not serving, or serving from this step on (joined, or back from a partition):
            // take the farm's settled set from the members that serve, so that this node starts
            // from the map the others actually serve and takes its buckets over by handover.
            let mut votes: Vec<(View, usize)> = Vec::new();
            for (i, p) in m.peers.iter().enumerate() {
                if i != self.me && p.alive && p.state == Some(State::Active) {
                    match votes.iter_mut().find(|(s, _)| *s == p.settled) {
                        Some(v) => v.1 += 1,
                        None => votes.push((p.settled, 1)),
                    }
                }
            }
            self.settled = votes
                .iter()
                .max_by_key(|(s, n)| (*n, s.serving, s.weights))
                .map_or(target, |(s, _)| *s);
        }
        self.was_serving = serving;
        self.applied = target;
        // A failover: the move only removes members that are dead. A member that stops serving
        // loses only its own buckets (see `assign`), so no live member gives any: the move is
        // complete at once. Said here, the map is planned once (the new one) instead of twice
        // (the move, then the new one): a failover is live one planning sooner.
        let removed = self.settled.serving & !target.serving;
        if self.settled != target
            && self.settled.weights == target.weights
            && target.serving & !self.settled.serving == 0
            && removed & alive == 0
        {
            tracing::info!(
                "bucket move complete: serving {} (the members that left are gone)",
                self.describe(target)
            );
            self.settled = target;
        }
        if self.settled == target {
            self.handed_over = target;
            self.released = target;
            self.started = None;
            self.progress = None;
            return self.settled_step((target, target, alive, quorum));
        }
        let me = self.me;
        self.prune();
        let mask_of = |f: &dyn Fn(&crate::membership::Peer) -> bool| {
            m.peers
                .iter()
                .enumerate()
                .filter(|(i, p)| *i != me && f(p))
                .fold(0u64, |a, (i, _)| a | (1 << i))
        };
        // Members whose table is written for this target, and those that have released their
        // outgoing buckets for it.
        let prepared = mask_of(&|p| p.applied == target) | (1 << self.me);
        let settled = self.settled;
        let key = (settled, target, alive, quorum);
        let (outgoing, givers, takers) = {
            let p = self.plan(key);
            (p.outgoing.len(), p.givers, p.takers)
        };
        let started = match self.started {
            Some((t, at)) if t == target => at,
            _ => {
                self.started = Some((target, now));
                self.released_at = None;
                self.last_count = None;
                self.connections = None;
                now
            }
        };
        let elapsed = now.saturating_duration_since(started);
        if self.released != target
            && (takers & alive & !prepared == 0 || elapsed >= self.drain_timeout)
        {
            if outgoing > 0 {
                tracing::info!(
                    "released {outgoing} bucket(s) to [{}] after {} ms: new connections go there",
                    self.names(takers).join(", "),
                    elapsed.as_millis()
                );
            }
            self.released = target;
        }
        if self.released == target && self.released_at.is_none() {
            self.released_at = Some(now);
        }
        let ready = mask_of(&|p| p.released == target)
            | if self.released == target {
                1 << self.me
            } else {
                0
            };
        // None left, by a count asked for after the release.
        let none_left = matches!(
            (self.connections, self.released_at),
            (Some((0, asked)), Some(released)) if asked >= released
        );
        let done = self.released == target
            && (outgoing == 0
                || self.immediate
                || (elapsed >= self.udp_idle && none_left)
                || elapsed >= self.drain_timeout);
        if done && self.handed_over != target {
            if outgoing > 0 {
                tracing::info!(
                    "handed over {outgoing} bucket(s) after {} ms ({} connection(s) left)",
                    elapsed.as_millis(),
                    self.connections_left()
                );
            }
            self.handed_over = target;
        }
        let handed: Vec<View> = (0..m.peers.len())
            .map(|i| {
                if i == self.me {
                    self.handed_over
                } else {
                    m.peers[i].handed_over
                }
            })
            .collect();
        let done_mask =
            (0..m.peers.len()).fold(
                0u64,
                |a, i| {
                    if handed[i] == target { a | (1 << i) } else { a }
                },
            );
        if transition::complete(givers, alive, done_mask) {
            tracing::info!("bucket move complete: serving {}", self.describe(target));
            self.settled = target;
            self.started = None;
            self.progress = None;
            return self.settled_step((target, target, alive, quorum));
        }
        let waiting = givers & alive & !done_mask;
        self.progress = Some(Progress {
            settled: self.names(settled.serving),
            target: self.names(target.serving),
            outgoing_buckets: outgoing,
            connections_left: self.connections_left(),
            waiting_for: self.names(waiting),
            elapsed_ms: elapsed.as_millis() as u64,
        });
        let (plan, plan_gen) = self.planned(key);
        Step {
            plan,
            plan_gen,
            givers_ready: ready,
            givers_done: done_mask & givers,
        }
    }

    pub fn progress(&self) -> Option<Progress> {
        self.progress.clone()
    }

    /// The connections left in the outgoing buckets, as last counted (0 before a count).
    fn connections_left(&self) -> usize {
        self.connections.map_or(0, |(n, _)| n)
    }

    /// A count of the connections in this node's outgoing buckets, when one is due: while it
    /// hands buckets over and has not handed them over yet, every 250 ms, one at a time.
    pub fn poll_count(&mut self, now: Instant) -> Option<CountRequest> {
        let (target, _) = self.started?;
        // An answer lost (the accounting thread gone) is given up after 5 s.
        let in_flight = self
            .counting
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(5));
        if self.handed_over == target || self.immediate || in_flight {
            return None;
        }
        if self
            .last_count
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_millis(250))
        {
            return None;
        }
        let plan = &self.cached.as_ref()?.1;
        if self.cached.as_ref()?.0.1 != target || plan.outgoing.is_empty() {
            return None;
        }
        let buckets = plan.outgoing.clone();
        self.counting = Some(now);
        self.last_count = Some(now);
        Some(CountRequest {
            target,
            buckets,
            vips: self.vips.clone(),
            asked: now,
        })
    }

    /// A count's answer. Returns whether it can change the plan (the move may be over).
    pub fn handle_count(&mut self, c: Counted) -> bool {
        if self.counting == Some(c.asked) {
            self.counting = None;
        }
        match (self.started, c.connections) {
            (Some((target, _)), Some(n)) if target == c.target => {
                self.connections = Some((n, c.asked));
                n == 0
            }
            _ => false,
        }
    }
}
