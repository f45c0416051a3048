//! The runtime of bucket moves (see `transition` for the rules): which plan this node applies,
//! whether it has handed over its outgoing buckets (no connection left in them, after at least
//! the UDP idle time, or the drain timeout), and when the whole move is complete.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use farm_common::{BUCKETS, BucketKey, HashKey, affinity, bucket_of, proto_mask};

use crate::{
    config::Vip,
    heartbeat::State,
    membership::{Membership, config_digest},
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    pub givers_ready: u64,
    pub givers_done: u64,
}

pub struct Handover {
    /// The member lists (ids and weights) this node knows, by digest: its configuration's
    /// (`current`) and those of the views still in use; newest last.
    weight_sets: Vec<(u64, Vec<(String, u32)>)>,
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
    started: Option<(View, Instant)>,
    last_scan: Option<Instant>,
    connections_left: usize,
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
        let current = config_digest(&members);
        Self {
            weight_sets: vec![(current, members)],
            current,
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
            started: None,
            last_scan: None,
            connections_left: 0,
            progress: None,
            was_serving: false,
        }
    }

    /// The member list (with weights) of digest `weights`; this node's own for one it does not
    /// know (a peer's view from before this node started).
    fn members(&self, weights: u64) -> &Members {
        let found = self.weight_sets.iter().rev().find(|(d, _)| *d == weights);
        let current = self
            .weight_sets
            .iter()
            .rev()
            .find(|(d, _)| *d == self.current);
        &found.or(current).expect("the current set is always kept").1
    }

    fn known(&self, weights: u64) -> bool {
        self.weight_sets.iter().any(|(d, _)| *d == weights)
    }

    /// This node's configured member list and weights (at start and on reload). The weights
    /// take effect once every live member has the same (see `step`).
    pub fn set_members(&mut self, members: Vec<(String, u32)>) {
        let digest = config_digest(&members);
        self.current = digest;
        self.weight_sets.retain(|(d, _)| *d != digest);
        self.weight_sets.push((digest, members));
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
        while self.weight_sets.len() > 4 {
            match self.weight_sets.iter().position(|(d, _)| !used.contains(d)) {
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
        }
        &self.cached.as_ref().expect("just set").1
    }

    /// The ids of the members in `mask`.
    pub fn names(&self, mask: u64) -> Vec<String> {
        self.members(self.current)
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
        Step {
            plan: self.plan(key),
            givers_ready: 0,
            givers_done: 0,
        }
    }

    /// The weights the farm agrees on: this node's configured ones once every live member
    /// announces the same member list and weights, the settled map's until then (a reload
    /// that changes weights moves buckets only once every member has loaded it, so that no
    /// two members ever compute their maps with different weights).
    pub fn agreed_weights(&self, m: &Membership) -> u64 {
        let agreed = m
            .peers
            .iter()
            .enumerate()
            .all(|(i, p)| i == self.me || !p.alive || p.config_digest == self.current);
        if agreed || !self.known(self.settled.weights) {
            self.current
        } else {
            self.settled.weights
        }
    }

    /// One step: returns what to apply now.
    pub fn step(&mut self, m: &Membership, now: Instant) -> Step<'_> {
        let candidates = m.candidates();
        let target = View {
            serving: transition::mask(&candidates),
            weights: self.agreed_weights(m),
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
                self.last_scan = None;
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
        let ready = mask_of(&|p| p.released == target)
            | if self.released == target {
                1 << self.me
            } else {
                0
            };
        if outgoing == 0 {
            self.connections_left = 0;
        } else if self
            .last_scan
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_millis(250))
        {
            let buckets = self.plan(key).outgoing.clone();
            self.connections_left = self.connections_in(&buckets);
            self.last_scan = Some(now);
        }
        let done = self.released == target
            && (outgoing == 0
                || self.immediate
                || (elapsed >= self.udp_idle && self.connections_left == 0)
                || elapsed >= self.drain_timeout);
        if done && self.handed_over != target {
            if outgoing > 0 {
                tracing::info!(
                    "handed over {outgoing} bucket(s) after {} ms ({} connection(s) left)",
                    elapsed.as_millis(),
                    self.connections_left
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
            connections_left: self.connections_left,
            waiting_for: self.names(waiting),
            elapsed_ms: elapsed.as_millis() as u64,
        });
        Step {
            plan: self.plan(key),
            givers_ready: ready,
            givers_done: done_mask & givers,
        }
    }

    pub fn progress(&self) -> Option<Progress> {
        self.progress.clone()
    }

    /// This node's TCP connections to a VIP whose bucket is in `buckets`.
    fn connections_in(&self, buckets: &[u32]) -> usize {
        let mut set = vec![false; BUCKETS as usize];
        for &b in buckets {
            set[b as usize] = true;
        }
        let mut n = 0;
        for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
            let Ok(text) = std::fs::read_to_string(path) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 4 {
                    continue;
                }
                // Listening, time-wait and closed sockets hold no connection to keep.
                if matches!(f[3], "0A" | "06" | "07") {
                    continue;
                }
                let (Some((local, lport)), Some((remote, rport))) =
                    (parse_addr(f[1], v6), parse_addr(f[2], v6))
                else {
                    continue;
                };
                let Some(vip) = self.vips.iter().find(|v| v.address == local) else {
                    continue;
                };
                let conn = vip.rules.iter().any(|r| {
                    r.protocols & proto_mask::TCP != 0
                        && (r.port_lo..=r.port_hi).contains(&lport)
                        && r.affinity == affinity::CONNECTION
                });
                let key = match (remote, conn) {
                    (IpAddr::V4(a), false) => BucketKey::V4(a.octets()),
                    (IpAddr::V4(a), true) => BucketKey::V4Port(a.octets(), rport.to_be_bytes()),
                    (IpAddr::V6(a), false) => BucketKey::V6(a.octets()),
                    (IpAddr::V6(a), true) => BucketKey::V6Port(a.octets(), rport.to_be_bytes()),
                };
                if set[bucket_of(&self.seed, key) as usize] {
                    n += 1;
                }
            }
        }
        n
    }
}

/// `0100007F:0050` (IPv4, words in host order) or 32 hex digits (IPv6) and a port.
fn parse_addr(s: &str, v6: bool) -> Option<(IpAddr, u16)> {
    let (a, p) = s.split_once(':')?;
    let port = u16::from_str_radix(p, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(a.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    let ip = if v6 {
        let mut o = [0u8; 16];
        for i in 0..4 {
            o[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
        }
        let v6 = Ipv6Addr::from(o);
        // IPv4 connections on a dual-stack socket.
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    } else {
        IpAddr::V4(Ipv4Addr::from(word(0)?))
    };
    Some((ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_addresses() {
        assert_eq!(
            parse_addr("0100007F:0050", false),
            Some(("127.0.0.1".parse().unwrap(), 80))
        );
        // ::ffff:10.0.0.1 port 8080, as /proc/net/tcp6 prints it on little-endian hosts.
        assert_eq!(
            parse_addr("0000000000000000FFFF00000100000A:1F90", true),
            Some(("10.0.0.1".parse().unwrap(), 8080))
        );
        assert_eq!(parse_addr("zz:1", false), None);
    }
}
