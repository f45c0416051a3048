//! Who is alive and who serves, as this node sees it: built from heartbeats, on the monotonic
//! clock only (a wall-clock jump changes nothing).
//!
//! A peer is alive while it has been heard on at least one heartbeat network within the loss
//! window (interval x loss threshold). It serves when it is alive and announces `active`. This
//! node serves when it is `active` and has quorum:
//! - three or more configured members: it sees a strict majority of them alive (itself included);
//! - two members: its peer is alive, or the witness answers;
//! - one member: always.
//!
//! A heartbeat counts only if it is fresh (see `heartbeat`): it echoes this node's current
//! incarnation and a sequence at most `echo_rounds` behind this node's, and its own
//! (incarnation, sequence) is newer than anything accepted from that sender on that network
//! while this farmd runs. Nothing is forgotten when a peer is lost: a replayed heartbeat of a
//! dead member never makes it look alive, whatever happened in between.
//!
//! Pure logic, no I/O: the daemon feeds it heartbeats and the time.

use std::time::{Duration, Instant};

use crate::{
    assign::Candidate,
    heartbeat::{Heartbeat, Reject, ReplayGuard, State},
    transition::View,
};

/// Instants as ages (microseconds before now) on the wire: an `Instant` means nothing in
/// another process.
mod ages {
    use std::time::{Duration, Instant};

    use serde::{Deserialize as _, Serialize as _};

    pub fn serialize<S: serde::Serializer>(v: &[Option<Instant>], s: S) -> Result<S::Ok, S::Error> {
        let now = Instant::now();
        v.iter()
            .map(|t| t.map(|t| now.saturating_duration_since(t).as_micros() as u64))
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<Option<Instant>>, D::Error> {
        let now = Instant::now();
        Ok(Vec::<Option<u64>>::deserialize(d)?
            .into_iter()
            .map(|a| a.map(|us| now.checked_sub(Duration::from_micros(us)).unwrap_or(now)))
            .collect())
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Peer {
    pub id: String,
    pub weight: u32,
    /// Last time heard, per heartbeat network (carried across an in-place upgrade as ages).
    #[serde(with = "ages")]
    pub last_heard: Vec<Option<Instant>>,
    /// What it last announced.
    pub state: Option<State>,
    pub incarnation: u64,
    /// The view of the map it has applied.
    pub applied: View,
    /// The digest of its member list and weights (`config_digest`).
    pub config_digest: u64,
    /// Its settled view and the targets it has released and handed over for (see
    /// `transition`).
    pub settled: View,
    pub handed_over: View,
    pub released: View,
    /// The recovery drill it runs, if any: (id, member index).
    pub drill: Option<(u32, u8)>,
    /// Its mirror group state, as last announced.
    pub mirror: crate::heartbeat::MirrorBeat,
    /// Per network: the newest (incarnation, sequence) accepted from it.
    guard: Vec<ReplayGuard>,
    /// Its newest (incarnation, sequence) authenticated, fresh or not: what this node echoes
    /// back to it (its challenge).
    pub heard: (u64, u64),
    /// Whether it counted as alive at the last `tick`.
    pub alive: bool,
    /// The newest heartbeat version heard from its current incarnation (0: not heard yet):
    /// what this node writes to it (see [`Membership::learn_version`]).
    pub version: u8,
    /// The incarnation `version` was heard from.
    version_of: u64,
    /// The members it saw leave by a planned stop (see [`Membership::departed`]).
    pub departed: u64,
}

impl Peer {
    /// A configured member not heard yet.
    fn new(id: &str, weight: u32, networks: usize) -> Self {
        Peer {
            id: id.to_string(),
            weight,
            last_heard: vec![None; networks],
            state: None,
            incarnation: 0,
            applied: View::default(),
            config_digest: 0,
            settled: View::default(),
            handed_over: View::default(),
            released: View::default(),
            drill: None,
            mirror: Default::default(),
            guard: vec![ReplayGuard::default(); networks],
            heard: (0, 0),
            alive: false,
            version: 0,
            version_of: 0,
            departed: 0,
        }
    }
}

/// A heartbeat taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The sender's index.
    pub index: usize,
    /// Whether it announced another move state (applied, settled, released or handed-over
    /// view, weights, drill) than its previous heartbeat.
    pub moved: bool,
    /// Whether its member list or weights (config digest) changed.
    pub digest_changed: bool,
    /// The (incarnation, sequence) accepted from it on that network before this one.
    pub previous: Option<(u64, u64)>,
}

/// How far behind this node's own sequence an echo may be: rounds (a round is one heartbeat
/// interval, or an immediate send) between this node's heartbeat and the peer's answer.
pub const DEFAULT_ECHO_ROUNDS: u64 = 64;

/// A change `tick` noticed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    PeerLost {
        id: String,
        silent_for: Duration,
    },
    /// It announced it was leaving (a planned stop): not a failure.
    PeerLeft {
        id: String,
    },
    PeerBack {
        id: String,
    },
    QuorumLost,
    QuorumRegained,
}

/// How late the heartbeat that ends a gap may be: half an interval. A peer is lost when the loss
/// threshold's worth of heartbeats in a row never arrived; the one that ends a shorter gap
/// (threshold - 1 lost, a silence of exactly the loss window) may be up to half an interval
/// late, whatever delayed its sender or the network. With 1/32 of the window (12.5 ms by
/// default), seven lost in a row and the eighth 13 ms late took a member out under 20 % random
/// loss on a busy CI machine.
pub fn lapse_margin(interval: Duration) -> Duration {
    interval / 2
}

/// Serializable: an in-place upgrade hands it to the new farmd whole (see `upgrade`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Membership {
    pub me: usize,
    pub peers: Vec<Peer>,
    pub my_state: State,
    pub loss_window: Duration,
    /// How late the heartbeat that ends a gap of one less than the loss threshold may be (see
    /// [`lapse_margin`]); `new` assumes the default 8 heartbeats per window until
    /// [`Membership::set_timers`] is given the interval.
    #[serde(default)]
    pub lapse_margin: Duration,
    networks: usize,
    has_witness: bool,
    quorum: bool,
    /// This node's own incarnation and newest sequence sent: the challenge peers must echo.
    pub incarnation: u64,
    pub seq: u64,
    /// See [`DEFAULT_ECHO_ROUNDS`].
    pub echo_rounds: u64,
}

impl Membership {
    /// `members`: (id, configured weight) in config order (sorted by id); `me` indexes it.
    pub fn new(
        members: &[(String, u32)],
        me: usize,
        networks: usize,
        loss_window: Duration,
        has_witness: bool,
    ) -> Self {
        let peers = members
            .iter()
            .map(|(id, w)| Peer::new(id, *w, networks))
            .collect();
        Self {
            me,
            peers,
            my_state: State::Joining,
            loss_window,
            lapse_margin: loss_window / 16,
            networks,
            has_witness,
            quorum: false,
            incarnation: 0,
            seq: 0,
            echo_rounds: DEFAULT_ECHO_ROUNDS,
        }
    }

    /// The member list changed live (`farmctl reload`): members that stay keep their index and
    /// everything known of them; members added after them start unheard; members removed from
    /// the end are forgotten (their heartbeats are refused from now on, as any non-member's).
    pub fn set_members(&mut self, members: &[(String, u32)]) {
        self.peers.truncate(members.len());
        for (i, (id, w)) in members.iter().enumerate() {
            match self.peers.get_mut(i) {
                Some(p) => {
                    debug_assert_eq!(&p.id, id, "members keep their index");
                    p.weight = *w;
                }
                None => self.peers.push(Peer::new(id, *w, self.networks)),
            }
        }
    }

    /// The cheap checks, made before a heartbeat is authenticated (so that a flood of
    /// replays costs no HMAC): a configured peer, sent on the network it arrived on, and newer
    /// than what was accepted from it there. Returns the sender's index.
    pub fn admit(&self, hb: &Heartbeat, net: usize) -> Result<usize, Reject> {
        let i = self
            .peers
            .iter()
            .position(|p| p.id == hb.id)
            .ok_or(Reject::UnknownSender)?;
        let p = &self.peers[i];
        if hb.incarnation == p.version_of && hb.version < p.version {
            return Err(Reject::Superseded);
        }
        if i == self.me {
            return Err(Reject::FromSelf);
        }
        if net >= self.networks || hb.network as usize != net {
            return Err(Reject::WrongNetwork);
        }
        if !self.peers[i].guard[net].fresh(hb.incarnation, hb.seq) {
            return Err(Reject::Replayed);
        }
        Ok(i)
    }

    /// Notes an authenticated heartbeat's numbering (fresh or not) as the challenge to echo
    /// back to its sender. Returns whether it is a new incarnation of the sender (answer it at
    /// once, so that a restarted peer is accepted without waiting for the next round).
    pub fn learn(&mut self, i: usize, incarnation: u64, seq: u64) -> bool {
        let p = &mut self.peers[i];
        let new = incarnation > p.heard.0;
        if (incarnation, seq) > p.heard {
            p.heard = (incarnation, seq);
        }
        new
    }

    /// Takes the version of an authenticated heartbeat from peer `i` (fresh, but maybe not
    /// answering this node's challenge yet: an older peer cannot answer a version it does not
    /// read): the newest version its current incarnation wrote. A new incarnation (a restart,
    /// maybe of another build) starts over. Returns the version when it changed.
    pub fn learn_version(&mut self, i: usize, incarnation: u64, version: u8) -> Option<u8> {
        let p = &mut self.peers[i];
        let v = if incarnation > p.version_of {
            version
        } else if incarnation == p.version_of {
            p.version.max(version)
        } else {
            return None;
        };
        p.version_of = incarnation;
        (v != p.version).then(|| {
            p.version = v;
            v
        })
    }

    /// Whether `echo` answers this node's current challenge.
    pub fn echo_fresh(&self, echo: (u64, u64)) -> bool {
        echo.0 == self.incarnation
            && echo.1 <= self.seq
            && echo.1.saturating_add(self.echo_rounds) >= self.seq
    }

    /// Takes in an authenticated heartbeat received on network `net`.
    pub fn receive(
        &mut self,
        hb: &Heartbeat,
        net: usize,
        now: Instant,
    ) -> Result<Received, Reject> {
        let i = self.admit(hb, net)?;
        self.receive_admitted(i, hb, net, now)
    }

    /// As `receive`, for a heartbeat `admit` already let in as sender `i`'s.
    pub fn receive_admitted(
        &mut self,
        i: usize,
        hb: &Heartbeat,
        net: usize,
        now: Instant,
    ) -> Result<Received, Reject> {
        if !self.echo_fresh(hb.echo) {
            return Err(Reject::Stale);
        }
        let p = &mut self.peers[i];
        let previous = p.guard[net].check(hb.incarnation, hb.seq)?;
        let digest_changed = p.config_digest != hb.config_digest;
        let moved = (p.applied, p.settled, p.handed_over, p.released, p.drill)
            != (
                hb.applied,
                hb.settled,
                hb.handed_over,
                hb.released,
                hb.drill,
            )
            || digest_changed;
        p.last_heard[net] = Some(now);
        p.state = Some(hb.state);
        p.incarnation = hb.incarnation;
        p.applied = hb.applied;
        p.config_digest = hb.config_digest;
        p.settled = hb.settled;
        p.handed_over = hb.handed_over;
        p.released = hb.released;
        p.drill = hb.drill;
        p.mirror = hb.mirror;
        p.departed = hb.departed;
        Ok(Received {
            index: i,
            moved,
            digest_changed,
            previous,
        })
    }

    /// The heartbeat timers (at start and on reload): the loss window, and what follows from it
    /// and the interval: the lapse margin, and how far behind an echo may be (at least four
    /// loss windows of rounds, see [`DEFAULT_ECHO_ROUNDS`]).
    pub fn set_timers(&mut self, interval: Duration, loss_window: Duration) {
        self.loss_window = loss_window;
        self.lapse_margin = lapse_margin(interval);
        let per_window = loss_window.as_micros() / interval.as_micros().max(1);
        self.echo_rounds = (per_window as u64 * 4).max(DEFAULT_ECHO_ROUNDS);
    }

    /// How long a peer may be silent and still be alive: the loss window plus [`lapse_margin`].
    pub fn lapse_after(&self) -> Duration {
        self.loss_window + self.lapse_margin
    }

    fn heard_within(&self, i: usize, now: Instant) -> bool {
        self.peers[i]
            .last_heard
            .iter()
            .flatten()
            .any(|&t| now.saturating_duration_since(t) <= self.lapse_after())
    }

    /// Whether network `net` carries heartbeats from peer `i` (heard within the loss window).
    pub fn network_alive(&self, i: usize, net: usize, now: Instant) -> bool {
        self.peers[i].last_heard[net]
            .is_some_and(|t| now.saturating_duration_since(t) <= self.lapse_after())
    }

    /// When the first peer alive now will be judged lost if nothing more is heard from it (one
    /// millisecond past its loss window, the timer's grain): the heartbeat thread judges then,
    /// rather than polling.
    pub fn next_lapse(&self) -> Option<Instant> {
        self.peers
            .iter()
            .enumerate()
            .filter(|(i, p)| *i != self.me && p.alive)
            .filter_map(|(_, p)| p.last_heard.iter().flatten().max().copied())
            .map(|t| t + self.lapse_after() + Duration::from_millis(1))
            .min()
    }

    /// Re-evaluates liveness and quorum; returns what changed.
    pub fn tick(&mut self, now: Instant, witness_reachable: bool) -> Vec<Event> {
        let mut events = Vec::new();
        for i in 0..self.peers.len() {
            if i == self.me {
                self.peers[i].alive = true;
                continue;
            }
            // A peer that announced it leaves is gone at once (its buckets move without
            // waiting for the loss window), and that is no failure.
            let leaving = self.peers[i].state == Some(State::Leaving);
            let alive = self.heard_within(i, now) && !leaving;
            let p = &mut self.peers[i];
            if p.alive && !alive {
                let last = p.last_heard.iter().flatten().max().copied();
                events.push(if leaving {
                    Event::PeerLeft { id: p.id.clone() }
                } else {
                    Event::PeerLost {
                        id: p.id.clone(),
                        silent_for: last
                            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t)),
                    }
                });
                if !leaving {
                    // Its replay guard is kept: a restarted peer has a larger incarnation.
                    p.state = None;
                }
            } else if !leaving && !p.alive && alive {
                events.push(Event::PeerBack { id: p.id.clone() });
            }
            p.alive = alive;
        }
        let quorum = self.compute_quorum(witness_reachable);
        if quorum != self.quorum {
            events.push(if quorum {
                Event::QuorumRegained
            } else {
                Event::QuorumLost
            });
            self.quorum = quorum;
        }
        events
    }

    fn compute_quorum(&self, witness_reachable: bool) -> bool {
        let alive = self.alive_mask(usize::MAX);
        self.quorum_of(alive, witness_reachable)
    }

    /// The members alive now (bit i = member i), but for member `except`.
    fn alive_mask(&self, except: usize) -> u64 {
        self.peers
            .iter()
            .enumerate()
            .filter(|(j, p)| *j != except && p.alive)
            .fold(0, |m, (j, _)| m | (1 << j))
    }

    /// The members that left by a planned stop and have not come back (bit i = member i):
    /// not alive, and the last thing this node heard from them was that they leave, or a
    /// member alive now saw them leave (so that a member started after they left knows too).
    /// They do not count for quorum until they rejoin, like corosync's `last_man_standing`:
    /// stopping members one by one down to the last keeps the service.
    ///
    /// Safe against a partition: a departed member is not alive on either side, so two sides
    /// that agree on who departed split the same smaller set (a strict majority of it exists
    /// on one side at most), and a side that missed a departure counts the larger set, which
    /// only makes its majority harder to reach.
    pub fn departed(&self) -> u64 {
        let reported = self
            .peers
            .iter()
            .enumerate()
            .filter(|(j, p)| *j != self.me && p.alive)
            .fold(0, |m, (_, p)| m | p.departed);
        self.peers
            .iter()
            .enumerate()
            .filter(|(j, p)| {
                *j != self.me
                    && !p.alive
                    && (p.state == Some(State::Leaving) || reported & (1 << j) != 0)
            })
            .fold(0, |m, (j, _)| m | (1 << j))
    }

    /// Whether the members alive now, without member `i`, would have quorum (what-if for
    /// `farmctl simulate-failure`). False when nobody would be left.
    pub fn quorum_without(&self, i: usize, witness_reachable: bool) -> bool {
        let alive = self.alive_mask(i);
        alive != 0 && self.quorum_of(alive, witness_reachable)
    }

    /// The quorum rule, for the members in `alive` (bit i = member i).
    ///
    /// A strict majority of the members that count: the configured ones but those that
    /// departed (see [`Membership::departed`]). Exactly half of them is enough when members
    /// departed (never in a farm at its configured size, whose rule stays as it was) and the
    /// half is the one with the witness or, without one, the one with the lowest-indexed member
    /// that counts (corosync's `auto_tie_breaker`): two members left of five, one of them cut
    /// off, keep serving on one side only.
    fn quorum_of(&self, alive: u64, witness_reachable: bool) -> bool {
        let configured = self.peers.len();
        let departed = self.departed() & !alive;
        let counted = configured - departed.count_ones() as usize;
        let up = alive.count_ones() as usize;
        match counted {
            0 | 1 => up > 0,
            // Without a witness a lone member of a two-member farm keeps serving (documented
            // split-brain case).
            2 if configured == 2 => up == 2 || !self.has_witness || witness_reachable,
            _ if up * 2 > counted => true,
            _ if up * 2 == counted && counted < configured => {
                if self.has_witness {
                    witness_reachable
                } else {
                    let counting = !departed & ((1u128 << configured) - 1) as u64;
                    alive & counting & counting.wrapping_neg() != 0
                }
            }
            _ => false,
        }
    }

    pub fn has_quorum(&self) -> bool {
        self.quorum
    }

    /// Takes the peers and quorum as judged elsewhere (the heartbeat thread); this node's own
    /// state stays as it is.
    pub fn absorb(&mut self, peers: Vec<Peer>, quorum: bool) {
        self.peers = peers;
        self.quorum = quorum;
    }

    /// The view the bucket assignment is computed from. This node counts as serving only with
    /// quorum; without quorum the daemon releases every bucket anyway.
    pub fn candidates(&self) -> Vec<Candidate> {
        self.peers
            .iter()
            .enumerate()
            .map(|(i, p)| Candidate {
                id: p.id.clone(),
                weight: p.weight,
                serving: if i == self.me {
                    self.my_state == State::Active && self.quorum
                } else {
                    p.alive && p.state == Some(State::Active)
                },
            })
            .collect()
    }

    /// A digest of the view (who serves), to compare with the peers'.
    pub fn view_digest(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for c in self.candidates() {
            for b in c.id.bytes().chain([c.serving as u8, 0xff]) {
                h ^= b as u64;
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }
}

/// A digest of the configuration every member must share (member ids and weights) and of the
/// assignment it is computed with (`assign::Alg::Rendezvous`), so that a member configured
/// differently, or running an earlier release, is noticed: the farm moves to a member list only
/// once every live member announces its digest (see `handover`).
pub fn config_digest(members: &[(String, u32)]) -> u64 {
    legacy_digest(members) ^ 0x5265_6e64_657a_766f
}

/// The digest farm 0.1 announced for a member list (ids and weights): its maps were computed
/// with `assign::Alg::Ranges`. farm 0.2 still knows it, to serve with 0.1 members during a
/// rolling upgrade.
pub fn legacy_digest(members: &[(String, u32)]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (id, w) in members {
        for b in id.bytes().chain(w.to_be_bytes()).chain([0xff]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<(String, u32)> {
        (0..n).map(|i| (format!("n{}", i + 1), 1)).collect()
    }

    fn hb(id: &str, seq: u64, state: State) -> Heartbeat {
        Heartbeat {
            version: crate::heartbeat::VERSION,
            departed: 0,
            id: id.into(),
            state,
            weight: 1,
            incarnation: 1,
            seq,
            applied: View::default(),
            config_digest: 0,
            network: 0,
            settled: View::default(),
            handed_over: View::default(),
            released: View::default(),
            drill: None,
            mirror: Default::default(),
            echo: (0, 0),
        }
    }

    const W: Duration = Duration::from_millis(400);

    /// A heartbeat that answers `m`'s current challenge.
    fn answering(m: &Membership, id: &str, incarnation: u64, seq: u64, net: u8) -> Heartbeat {
        let mut h = hb(id, seq, State::Active);
        h.incarnation = incarnation;
        h.network = net;
        h.echo = (m.incarnation, m.seq);
        h
    }

    #[test]
    fn the_next_lapse_is_when_the_first_live_peer_would_be_lost() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut m = Membership::new(&members(3), 0, 1, W, false);
        m.incarnation = 77;
        m.my_state = State::Active;
        assert_eq!(m.next_lapse(), None, "nobody alive yet");
        m.seq = 1;
        let h2 = answering(&m, "n2", 10, 1, 0);
        m.receive(&h2, 0, t0 + ms(100)).unwrap();
        let h3 = answering(&m, "n3", 11, 1, 0);
        m.receive(&h3, 0, t0 + ms(200)).unwrap();
        m.tick(t0 + ms(200), false);
        let lapse = m.next_lapse().expect("two peers alive");
        assert_eq!(lapse, t0 + ms(100) + W + W / 16 + ms(1));
        // Judged a moment before, n2 is alive; judged then, it is lost.
        assert!(m.tick(lapse - ms(2), false).is_empty());
        let ev = m.tick(lapse, false);
        assert!(
            ev.iter()
                .any(|e| matches!(e, Event::PeerLost { id, .. } if id == "n2")),
            "{ev:?}"
        );
        // Now n3 is the first.
        assert_eq!(m.next_lapse(), Some(t0 + ms(200) + W + W / 16 + ms(1)));
    }

    #[test]
    fn a_peer_is_lost_after_a_whole_threshold_of_heartbeats_in_a_row_not_after_one_less() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut m = Membership::new(&members(2), 0, 1, W, false);
        m.lapse_margin = ms(25);
        m.incarnation = 77;
        m.my_state = State::Active;
        m.seq = 1;
        m.receive(&answering(&m, "n2", 10, 1, 0), 0, t0).unwrap();
        m.tick(t0, false);
        assert!(m.peers[1].alive);
        // Seven lost (a silence of the whole window), the eighth 20 ms late: still alive,
        // judged at every millisecond up to its arrival.
        let late = t0 + W + ms(20);
        for t in (0..=420).map(|i| t0 + ms(i)) {
            assert!(m.tick(t, false).is_empty(), "at {:?}", t - t0);
        }
        m.receive(&answering(&m, "n2", 10, 9, 0), 0, late).unwrap();
        assert!(m.tick(late, false).is_empty());
        // Eight lost: the ninth would come a whole interval after the window; lost before.
        let lapse = m.next_lapse().expect("alive");
        assert_eq!(lapse, late + W + ms(25) + ms(1));
        assert!(lapse < late + W + ms(50));
        let ev = m.tick(lapse, false);
        assert!(
            ev.iter().any(|e| matches!(e, Event::PeerLost { .. })),
            "{ev:?}"
        );
    }

    #[test]
    fn a_lost_peers_captured_heartbeats_never_make_it_alive_again() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut m = Membership::new(&members(3), 0, 1, W, false);
        m.incarnation = 77;
        m.my_state = State::Active;
        let mut captured = Vec::new();
        for seq in 1..=5 {
            m.seq = seq;
            let h = answering(&m, "n2", 10, seq, 0);
            m.receive(&h, 0, t0 + ms(seq * 50)).unwrap();
            captured.push(h);
        }
        m.tick(t0 + ms(250), false);
        assert!(m.peers[1].alive);
        // n2 dies; it is lost after the loss window, and its captures replayed change nothing.
        let ev = m.tick(t0 + ms(250) + W + W / 16 + ms(1), false);
        assert!(matches!(ev[0], Event::PeerLost { .. }), "{ev:?}");
        for h in &captured {
            assert_eq!(m.admit(h, 0), Err(Reject::Replayed));
            assert_eq!(m.receive(h, 0, t0 + ms(900)), Err(Reject::Replayed));
        }
        assert!(m.tick(t0 + ms(900), false).is_empty(), "still lost");
        // This node restarts (a new incarnation, no memory): the captures answer the old
        // challenge and are refused.
        let mut fresh = Membership::new(&members(3), 0, 1, W, false);
        fresh.incarnation = 78;
        fresh.seq = 3;
        for h in &captured {
            assert_eq!(fresh.receive(h, 0, t0 + ms(1000)), Err(Reject::Stale));
        }
        fresh.tick(t0 + ms(1000), false);
        assert!(!fresh.peers[1].alive);
        // n2 restarts too: a larger incarnation answering the current challenge is back.
        let back = answering(&fresh, "n2", 11, 1, 0);
        assert!(
            fresh.learn(1, 11, 1),
            "a new incarnation is answered at once"
        );
        fresh.receive(&back, 0, t0 + ms(1000)).unwrap();
        assert!(
            fresh
                .tick(t0 + ms(1000), false)
                .contains(&Event::PeerBack { id: "n2".into() })
        );
    }

    #[test]
    fn an_echo_must_be_this_incarnations_and_recent() {
        let mut m = Membership::new(&members(2), 0, 1, W, false);
        m.incarnation = 5;
        m.seq = 1000;
        m.echo_rounds = 64;
        assert!(m.echo_fresh((5, 1000)));
        assert!(m.echo_fresh((5, 936)));
        assert!(!m.echo_fresh((5, 935)), "delayed past the window");
        assert!(!m.echo_fresh((5, 1001)), "a sequence not sent yet");
        assert!(!m.echo_fresh((4, 1000)), "another incarnation of this node");
        assert!(!m.echo_fresh((0, 0)), "not heard yet");
    }

    #[test]
    fn learning_a_challenge_only_moves_forward() {
        let mut m = Membership::new(&members(2), 0, 1, W, false);
        assert!(m.learn(1, 10, 4));
        assert!(!m.learn(1, 10, 5));
        assert!(!m.learn(1, 9, 100), "an old capture does not lower it");
        assert_eq!(m.peers[1].heard, (10, 5));
        assert!(m.learn(1, 11, 0));
        assert_eq!(m.peers[1].heard, (11, 0));
    }

    #[test]
    fn each_network_carries_its_own_copy_of_a_round() {
        let t0 = Instant::now();
        let mut m = Membership::new(&members(2), 0, 2, W, false);
        m.incarnation = 3;
        m.seq = 1;
        m.receive(&answering(&m, "n2", 9, 1, 0), 0, t0).unwrap();
        m.receive(&answering(&m, "n2", 9, 1, 1), 1, t0)
            .expect("the backup network's copy of the same round");
        assert!(m.network_alive(1, 1, t0));
        assert_eq!(
            m.receive(&answering(&m, "n2", 9, 1, 1), 1, t0),
            Err(Reject::Replayed)
        );
        assert_eq!(
            m.receive(&answering(&m, "n2", 9, 2, 0), 1, t0),
            Err(Reject::WrongNetwork),
            "sent on network 0, arrived on 1"
        );
    }

    #[test]
    fn a_peer_that_announces_it_leaves_is_gone_at_once_and_not_lost() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut m = Membership::new(&members(3), 0, 1, W, false);
        m.receive(&hb("n2", 1, State::Active), 0, t0).unwrap();
        m.receive(&hb("n3", 1, State::Active), 0, t0).unwrap();
        m.tick(t0, false);
        // n3 drains, then announces it leaves (twice, as farmd does).
        m.receive(&hb("n3", 2, State::Leaving), 0, t0 + ms(50))
            .unwrap();
        assert_eq!(
            m.tick(t0 + ms(50), false),
            vec![Event::PeerLeft { id: "n3".into() }],
            "gone at once, without waiting for the loss window"
        );
        m.receive(&hb("n3", 3, State::Leaving), 0, t0 + ms(100))
            .unwrap();
        m.receive(&hb("n2", 2, State::Active), 0, t0 + ms(100))
            .unwrap();
        assert_eq!(m.tick(t0 + ms(100), false), vec![], "not back, not lost");
        m.receive(&hb("n2", 3, State::Active), 0, t0 + W).unwrap();
        assert_eq!(
            m.tick(t0 + W + ms(200), false),
            vec![],
            "silence after leaving: no loss"
        );
        assert!(!m.peers[2].alive);
        // It restarts (a newer incarnation) and is back.
        let mut again = hb("n3", 1, State::Joining);
        again.incarnation = 2;
        m.receive(&again, 0, t0 + W + ms(300)).unwrap();
        assert_eq!(
            m.tick(t0 + W + ms(300), false),
            vec![Event::PeerBack { id: "n3".into() }]
        );
    }

    #[test]
    fn peers_come_and_go_with_heartbeats() {
        let t0 = Instant::now();
        let mut m = Membership::new(&members(3), 0, 2, W, false);
        m.my_state = State::Active;
        assert_eq!(m.tick(t0, false), vec![]);
        assert!(!m.has_quorum(), "alone among three: no quorum");
        m.receive(&hb("n2", 1, State::Active), 0, t0).unwrap();
        let ev = m.tick(t0, false);
        assert!(ev.contains(&Event::PeerBack { id: "n2".into() }));
        assert!(ev.contains(&Event::QuorumRegained));
        let serving: Vec<bool> = m.candidates().iter().map(|c| c.serving).collect();
        assert_eq!(serving, vec![true, true, false]);
        // Heard on the second network only: still alive.
        let mut second = hb("n2", 2, State::Active);
        second.network = 1;
        m.receive(&second, 1, t0 + W).unwrap();
        assert!(
            m.tick(t0 + W + Duration::from_millis(100), false)
                .is_empty()
        );
        assert!(m.network_alive(1, 1, t0 + W + Duration::from_millis(100)));
        assert!(!m.network_alive(1, 0, t0 + W + Duration::from_millis(100)));
        // Silent past the window: lost, quorum gone.
        let ev = m.tick(t0 + 2 * W + W / 16 + Duration::from_millis(1), false);
        assert!(matches!(ev[0], Event::PeerLost { .. }));
        assert!(ev.contains(&Event::QuorumLost));
        assert!(
            !m.candidates()[0].serving,
            "no quorum: this node does not serve"
        );
    }

    #[test]
    fn replays_self_and_strangers_are_refused() {
        let t0 = Instant::now();
        let mut m = Membership::new(&members(2), 0, 1, W, true);
        assert_eq!(
            m.receive(&hb("n1", 1, State::Active), 0, t0),
            Err(Reject::FromSelf)
        );
        assert_eq!(
            m.receive(&hb("x", 1, State::Active), 0, t0),
            Err(Reject::UnknownSender)
        );
        m.receive(&hb("n2", 5, State::Active), 0, t0).unwrap();
        assert_eq!(
            m.receive(&hb("n2", 5, State::Active), 0, t0),
            Err(Reject::Replayed)
        );
        assert_eq!(
            m.receive(&hb("n2", 4, State::Active), 0, t0),
            Err(Reject::Replayed)
        );
    }

    #[test]
    fn two_members_need_the_peer_or_the_witness() {
        let t0 = Instant::now();
        let mut m = Membership::new(&members(2), 0, 1, W, true);
        m.my_state = State::Active;
        m.tick(t0, false);
        assert!(!m.has_quorum(), "no peer, no witness");
        m.tick(t0, true);
        assert!(m.has_quorum(), "witness answers");
        m.receive(&hb("n2", 1, State::Active), 0, t0).unwrap();
        m.tick(t0, false);
        assert!(m.has_quorum(), "peer seen");
        // Without a configured witness, a lone member of two keeps serving (and says so in
        // the docs: a partition then makes both serve everything).
        let mut m = Membership::new(&members(2), 0, 1, W, false);
        m.tick(t0, false);
        assert!(m.has_quorum());
    }

    #[test]
    fn a_peer_that_is_not_active_does_not_serve() {
        let t0 = Instant::now();
        let mut m = Membership::new(&members(3), 0, 1, W, false);
        m.my_state = State::Active;
        m.receive(&hb("n2", 1, State::Joining), 0, t0).unwrap();
        m.receive(&hb("n3", 1, State::Draining), 0, t0).unwrap();
        m.tick(t0, false);
        assert!(
            m.has_quorum(),
            "alive members count for quorum whatever their state"
        );
        let serving: Vec<bool> = m.candidates().iter().map(|c| c.serving).collect();
        assert_eq!(serving, vec![true, false, false]);
    }

    #[test]
    fn view_digest_changes_with_the_view() {
        let t0 = Instant::now();
        let mut m = Membership::new(&members(3), 0, 1, W, false);
        m.my_state = State::Active;
        m.receive(&hb("n2", 1, State::Active), 0, t0).unwrap();
        m.tick(t0, false);
        let a = m.view_digest();
        m.receive(&hb("n3", 1, State::Active), 0, t0).unwrap();
        m.tick(t0, false);
        assert_ne!(a, m.view_digest());
        assert_ne!(config_digest(&members(3)), config_digest(&members(2)));
    }

    #[test]
    fn quorum_without_a_member_follows_the_quorum_rule() {
        let t0 = Instant::now();
        let mut m = Membership::new(&members(3), 0, 1, W, false);
        m.my_state = State::Active;
        m.receive(&hb("n2", 1, State::Active), 0, t0).unwrap();
        m.receive(&hb("n3", 1, State::Active), 0, t0).unwrap();
        m.tick(t0, false);
        assert!(m.quorum_without(1, false), "two of three left");
        let mut m = Membership::new(&members(2), 0, 1, W, true);
        m.receive(&hb("n2", 1, State::Active), 0, t0).unwrap();
        m.tick(t0, false);
        assert!(!m.quorum_without(1, false), "alone, witness unreachable");
        assert!(m.quorum_without(1, true), "alone, witness answers");
        let m = Membership::new(&members(1), 0, 1, W, false);
        assert!(!m.quorum_without(0, false), "nobody left");
    }

    /// Five members, `me` hears the others Active at `t`, then each in `order` announces it
    /// leaves in turn.
    fn five(me: usize) -> (Membership, Instant) {
        let t0 = Instant::now();
        let mut m = Membership::new(&members(5), me, 1, W, false);
        m.my_state = State::Active;
        for j in 0..5 {
            if j != me {
                m.receive(&hb(&format!("n{}", j + 1), 1, State::Active), 0, t0)
                    .unwrap();
            }
        }
        m.tick(t0, false);
        assert!(m.has_quorum());
        (m, t0)
    }

    #[test]
    fn members_that_leave_one_by_one_do_not_take_quorum_with_them() {
        let (mut m, t0) = five(0);
        let ms = Duration::from_millis;
        for (k, leaver) in ["n5", "n4", "n3", "n2"].into_iter().enumerate() {
            let t = t0 + ms(10 * (k as u64 + 1));
            m.receive(&hb(leaver, 2, State::Leaving), 0, t).unwrap();
            let ev = m.tick(t, false);
            assert_eq!(ev, vec![Event::PeerLeft { id: leaver.into() }]);
            assert!(m.has_quorum(), "after {leaver} left");
        }
        assert_eq!(m.departed(), 0b11110);
        // n2 comes back (a restart): it counts again, and two of two serve.
        m.receive(&hb("n2", 3, State::Joining), 0, t0 + ms(100))
            .unwrap();
        m.tick(t0 + ms(100), false);
        assert_eq!(m.departed(), 0b11100);
        assert!(m.has_quorum());
    }

    #[test]
    fn a_lost_member_still_counts_and_a_partition_serves_on_one_side() {
        // 2 + 3: the side of two loses quorum, the side of three keeps it.
        let (mut two, t0) = five(0);
        let (mut three, _) = five(2);
        let t = t0 + W + W / 16 + Duration::from_millis(10);
        for (m, heard) in [(&mut two, ["n2"].as_slice()), (&mut three, &["n4", "n5"])] {
            for id in heard {
                m.receive(&hb(id, 2, State::Active), 0, t).unwrap();
            }
            m.tick(t, false);
        }
        assert!(!two.has_quorum());
        assert!(three.has_quorum());
    }

    #[test]
    fn with_exactly_half_left_after_departures_the_lowest_member_decides() {
        let ms = Duration::from_millis;
        // n3, n4 and n5 left; n1 and n2 remain, then cannot hear each other.
        let mut sides = Vec::new();
        for me in [0, 1] {
            let (mut m, t0) = five(me);
            for id in ["n3", "n4", "n5"] {
                m.receive(&hb(id, 2, State::Leaving), 0, t0 + ms(10))
                    .unwrap();
            }
            m.tick(t0 + ms(10), false);
            assert!(m.has_quorum());
            m.tick(t0 + ms(10) + W * 2, false);
            sides.push(m.has_quorum());
        }
        assert_eq!(sides, vec![true, false], "only n1's side serves");
        // Without departures, half of a farm at its configured size is no quorum.
        let t0 = Instant::now();
        let mut m = Membership::new(&members(4), 0, 1, W, false);
        m.receive(&hb("n2", 1, State::Active), 0, t0).unwrap();
        m.tick(t0, false);
        assert!(!m.has_quorum());
    }

    #[test]
    fn a_member_started_after_others_left_learns_it_from_the_live_ones() {
        let t0 = Instant::now();
        // n1 restarts after n3, n4 and n5 left; n2 tells it so.
        let mut m = Membership::new(&members(5), 0, 1, W, false);
        let mut h = hb("n2", 1, State::Active);
        h.departed = 0b11100;
        m.receive(&h, 0, t0).unwrap();
        m.tick(t0, false);
        assert_eq!(m.departed(), 0b11100);
        assert!(m.has_quorum(), "two of the two that count");
        // A member it hears itself is not departed, whatever a peer says.
        m.receive(&hb("n3", 1, State::Joining), 0, t0).unwrap();
        m.tick(t0, false);
        assert_eq!(m.departed(), 0b11000);
        // Without that report, a restarted member sees two of five.
        let mut m = Membership::new(&members(5), 0, 1, W, false);
        m.receive(&hb("n2", 1, State::Active), 0, t0).unwrap();
        m.tick(t0, false);
        assert!(!m.has_quorum());
    }

    #[test]
    fn a_peer_is_answered_in_the_newest_version_its_incarnation_spoke() {
        let mut m = Membership::new(&members(2), 0, 1, W, false);
        assert_eq!(m.learn_version(1, 10, 5), Some(5), "an old build");
        assert_eq!(m.learn_version(1, 10, 5), None);
        // It restarts as a newer build: v6 from the new incarnation.
        assert_eq!(m.learn_version(1, 11, 6), Some(6));
        // It still answers this node's v5 heartbeats in v5 for a round: that does not lower
        // it (else both would stay at v5).
        assert_eq!(m.learn_version(1, 11, 5), None);
        assert_eq!(m.peers[1].version, 6);
        // A capture of its old incarnation changes nothing; a rollback (new incarnation,
        // older build) does.
        assert_eq!(m.learn_version(1, 10, 5), None);
        assert_eq!(m.learn_version(1, 12, 5), Some(5));
    }
}
