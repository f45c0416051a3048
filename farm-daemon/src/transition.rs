//! Moving buckets between live members without breaking connections.
//!
//! Every node keeps two serving sets (bit i = member i, members sorted by id): the *settled* set,
//! whose bucket map every member served when the last change finished, and the *target* set,
//! who should serve now. A bucket whose settled owner is alive but is not its target owner is in
//! handover: the new owner marks it INCOMING (takes SYNs and its own connections), the previous
//! owner OUTGOING (keeps its established connections and non-TCP traffic), nobody else takes it.
//! A bucket whose settled owner is gone moves at once. Every node computes the same plan from
//! the same two sets.
//!
//! A move goes through three announced steps (heartbeat fields, sent at once when they change):
//! 1. *applied*: each member has written its table for the target. The previous owner's OUTGOING
//!    buckets still act as MINE and the new owner's INCOMING ones as NOT_MINE (control masks).
//! 2. *released*: once every member that takes its buckets has applied, the previous owner stops
//!    taking new connections in them (one control write) and says so; each new owner then takes
//!    SYNs (one control write). A SYN is never taken by two members, and waits for nobody
//!    longer than one message's latency.
//! 3. *handed over*: no connection of the previous owner is left in its outgoing buckets (after
//!    at least the UDP idle time), or the drain timeout passed; its buckets are then wholly the
//!    new owner's. When every previous owner has handed over, the target becomes the settled
//!    set.

use farm_common::{BUCKETS, BucketEntry, HashKey, NO_OWNER, bucket_state};

use crate::assign::{self, Alg, Candidate};

/// What a bucket map is computed from: who serves (bit i = member i, members sorted by id) and
/// with which weights (the digest of the member list and weights, `membership::config_digest`).
/// A weight change (`farmctl reload`) is a move between two views with the same serving set.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct View {
    pub serving: u64,
    pub weights: u64,
}

/// Members (id, weight) in id order.
pub type Members = [(String, u32)];

/// The serving set of a view, as a mask.
pub fn mask(candidates: &[Candidate]) -> u64 {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.serving)
        .fold(0, |m, (i, _)| m | (1 << i))
}

fn candidates_of(members: &[(String, u32)], mask: u64) -> Vec<Candidate> {
    members
        .iter()
        .enumerate()
        .map(|(i, (id, w))| Candidate {
            id: id.clone(),
            weight: *w,
            serving: mask & (1 << i) != 0,
        })
        .collect()
}

/// What this node's data plane should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub entries: Vec<BucketEntry>,
    /// Owner of each bucket in the target map.
    pub owners: Vec<u8>,
    /// Buckets this node hands over.
    pub outgoing: Vec<u32>,
    /// Members that hand buckets over (must announce they have).
    pub givers: u64,
    /// Members that take this node's outgoing buckets (it releases them once they all have
    /// applied the move).
    pub takers: u64,
}

/// The plan of node `me` for moving from `settled` to `target` (each a serving set and the
/// weights it is computed with), `alive` being the members heard
/// (a previous owner that is gone gives nothing over). Without `quorum` this node takes nothing.
///
/// The new owner's INCOMING buckets take SYNs only once their previous owner is ready (has
/// applied the move, so its OUTGOING buckets no longer take them), and become wholly the new
/// owner's once the previous owner has handed over: both switches are bits of the data plane's
/// control word (`givers_ready`, `givers_done`), not table rewrites, so each is one write made
/// as soon as the giver's heartbeat says so (no SYN is accepted twice, and none waits for a
/// table to be rewritten).
pub fn plan(
    seed: &HashKey,
    me: usize,
    settled: ((&Members, Alg), u64),
    target: ((&Members, Alg), u64),
    alive: u64,
    quorum: bool,
) -> Plan {
    let (((tm, talg), tmask), ((sm, salg), smask)) = (target, settled);
    let t = assign::assign_with(talg, seed, &candidates_of(tm, tmask));
    let s = if (sm, salg, smask) == (tm, talg, tmask) {
        t.clone()
    } else {
        assign::assign_with(salg, seed, &candidates_of(sm, smask))
    };
    let me8 = me as u8;
    let mut entries = Vec::with_capacity(BUCKETS as usize);
    let mut outgoing = Vec::new();
    let mut givers = 0u64;
    let mut takers = 0u64;
    for b in 0..BUCKETS as usize {
        let (from, to) = (s[b], t[b]);
        let handover = from != to && from != NO_OWNER && to != NO_OWNER && alive & (1 << from) != 0;
        let e = if !quorum {
            BucketEntry::owned_by(to, NO_OWNER)
        } else if handover {
            givers |= 1 << from;
            let state = if me8 == to {
                bucket_state::INCOMING
            } else if me8 == from {
                outgoing.push(b as u32);
                takers |= 1 << to;
                bucket_state::OUTGOING
            } else {
                bucket_state::NOT_MINE
            };
            BucketEntry {
                state,
                owner: to,
                prev_owner: from,
                flags: 0,
            }
        } else {
            BucketEntry::owned_by(to, me8)
        };
        entries.push(e);
    }
    Plan {
        entries,
        owners: t,
        outgoing,
        givers,
        takers,
    }
}

/// Whether the move is complete: every giver that is still alive has announced it handed over
/// for the target (`done`: the members that have).
pub fn complete(givers: u64, alive: u64, done: u64) -> bool {
    givers & alive & !done == 0
}

#[cfg(test)]
mod tests {
    // The move mechanics, on farm 0.1's exact shares (the assignments' own properties are
    // tested in `assign`).
    use super::*;

    const SEED: HashKey = HashKey { k0: 11, k1: 22 };

    fn members() -> Vec<(String, u32)> {
        ["a", "b", "c"].iter().map(|s| (s.to_string(), 1)).collect()
    }

    fn count(p: &Plan, state: u8) -> usize {
        p.entries.iter().filter(|e| e.state == state).count()
    }

    #[test]
    fn join_hands_over_the_joiners_share() {
        let all = 0b111;
        let (settled, target) = (0b011, 0b111);
        let joiner = plan(
            &SEED,
            2,
            ((&members()[..], Alg::Ranges), settled),
            ((&members()[..], Alg::Ranges), target),
            all,
            true,
        );
        let third = BUCKETS as usize / 3;
        assert!((count(&joiner, bucket_state::INCOMING) as i64 - third as i64).abs() <= 1);
        assert_eq!(count(&joiner, bucket_state::MINE), 0);
        assert_eq!(joiner.givers, 0b011);
        let a = plan(
            &SEED,
            0,
            ((&members()[..], Alg::Ranges), settled),
            ((&members()[..], Alg::Ranges), target),
            all,
            true,
        );
        let b = plan(
            &SEED,
            1,
            ((&members()[..], Alg::Ranges), settled),
            ((&members()[..], Alg::Ranges), target),
            all,
            true,
        );
        assert_eq!(
            a.outgoing.len() + b.outgoing.len(),
            count(&joiner, bucket_state::INCOMING),
            "what the joiner takes is what the others give"
        );
        // Same target owners everywhere.
        assert_eq!(a.owners, joiner.owners);
        assert!(!complete(a.givers, all, 0));
        assert!(!complete(a.givers, all, 0b001));
        assert!(complete(a.givers, all, 0b011));
    }

    #[test]
    fn a_lost_members_buckets_move_at_once() {
        let (settled, target, alive) = (0b111, 0b011, 0b011);
        let p = plan(
            &SEED,
            0,
            ((&members()[..], Alg::Ranges), settled),
            ((&members()[..], Alg::Ranges), target),
            alive,
            true,
        );
        assert_eq!(count(&p, bucket_state::INCOMING), 0);
        assert_eq!(count(&p, bucket_state::OUTGOING), 0);
        assert_eq!(p.givers, 0);
        assert!(complete(p.givers, alive, 0));
        assert!((count(&p, bucket_state::MINE) as i64 - BUCKETS as i64 / 2).abs() <= 1);
    }

    #[test]
    fn a_draining_member_gives_everything_it_has() {
        let (settled, target, alive) = (0b111, 0b011, 0b111);
        let c = plan(
            &SEED,
            2,
            ((&members()[..], Alg::Ranges), settled),
            ((&members()[..], Alg::Ranges), target),
            alive,
            true,
        );
        assert!((c.outgoing.len() as i64 - BUCKETS as i64 / 3).abs() <= 1);
        assert_eq!(c.givers, 0b100);
        assert!(!complete(c.givers, alive, 0b011));
        assert!(complete(c.givers, alive, 0b100));
    }

    #[test]
    fn a_weight_change_is_a_handover_between_the_same_members() {
        let all = 0b111;
        let mut heavier = members();
        heavier[2].1 = 2;
        let from = (members(), all);
        let to = (heavier, all);
        let plans: Vec<Plan> = (0..3)
            .map(|me| {
                plan(
                    &SEED,
                    me,
                    ((&from.0[..], Alg::Ranges), from.1),
                    ((&to.0[..], Alg::Ranges), to.1),
                    all,
                    true,
                )
            })
            .collect();
        // c (weight 2 of 4) grows from a third to half: it takes a sixth of the buckets from a
        // and b. The preference lists change shape, so a and b also swap some between them
        // (kept connections make that harmless); what is given is what is taken.
        let given: usize = plans.iter().map(|p| p.outgoing.len()).sum();
        let taken: usize = plans.iter().map(|p| count(p, bucket_state::INCOMING)).sum();
        assert_eq!(given, taken);
        let minimal = BUCKETS as usize / 2 - BUCKETS as usize / 3;
        let grew = count(&plans[2], bucket_state::INCOMING);
        assert!((grew as i64 - minimal as i64).abs() <= 2, "c took {grew}");
        assert!(given < 2 * minimal, "{given} moved for {minimal}");
        assert!(plans[2].outgoing.is_empty());
        assert_eq!(plans[0].givers, 0b011);
        assert_eq!(plans[0].owners, plans[2].owners);
        // Every bucket is MINE or handed over on exactly one member.
        for b in 0..BUCKETS as usize {
            let mine = plans
                .iter()
                .filter(|p| {
                    matches!(
                        p.entries[b].state,
                        bucket_state::MINE | bucket_state::OUTGOING
                    )
                })
                .count();
            assert_eq!(mine, 1, "bucket {b}");
        }
    }

    #[test]
    fn no_quorum_takes_nothing() {
        let p = plan(
            &SEED,
            0,
            ((&members()[..], Alg::Ranges), 0b111),
            ((&members()[..], Alg::Ranges), 0b111),
            0b111,
            false,
        );
        assert_eq!(count(&p, bucket_state::NOT_MINE), BUCKETS as usize);
    }

    #[test]
    fn settled_plan_is_the_plain_assignment() {
        let p = plan(
            &SEED,
            1,
            ((&members()[..], Alg::Ranges), 0b111),
            ((&members()[..], Alg::Ranges), 0b111),
            0b111,
            true,
        );
        assert_eq!(p.givers, 0);
        assert_eq!(
            count(&p, bucket_state::INCOMING) + count(&p, bucket_state::OUTGOING),
            0
        );
    }
}
