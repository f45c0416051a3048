//! Bucket assignment: which member owns which bucket, as a deterministic function of the member
//! list (ids, weights), which of them are serving, and the cluster seed. Every node computes the
//! same map from the same view, with no leader.
//!
//! # How
//!
//! Each bucket has a preference list over the configured members, and its owner is the first
//! member on that list that is serving. Because the lists do not depend on who is serving, a
//! member that stops serving loses exactly its own buckets and nobody else's move; a member that
//! comes back takes exactly those back (rendezvous hashing has this property too).
//!
//! Unlike rendezvous hashing, the lists are built so that shares are exact rather than random:
//! the buckets (in a seeded order) are split into one contiguous range per member, sized in
//! proportion to the weights (largest-remainder rounding); the range of each member is split the
//! same way among the remaining members for the second choice, and so on. With N equal members
//! every member owns BUCKETS/N buckets, +-1; when one leaves, its range is split evenly among the
//! others, again +-1 per range. (Rendezvous hashing over 65536 buckets is off by several percent
//! at N=32 and by 9% at N=64, see `anchors.md`; this is off by one bucket.)
//!
//! Weight 0 marks a standby: it comes after every weighted member on every list, so it owns
//! buckets only while no weighted member is serving.
//!
//! Changing the member list itself (adding a new id, changing a weight) reshapes the lists and
//! moves more buckets than strictly needed; the data plane's handover keeps connections alive
//! through such moves.

use farm_common::{BUCKETS, HashKey, MAX_MEMBERS, NO_OWNER, siphash13};

/// A member as the assignment sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub weight: u32,
    /// Whether the member is serving (alive, active, healthy).
    pub serving: bool,
}

/// Owner member index per bucket (`NO_OWNER` when no member is serving).
pub fn assign(seed: &HashKey, members: &[Candidate]) -> Vec<u8> {
    assert!(
        members.len() <= MAX_MEMBERS,
        "at most {MAX_MEMBERS} members"
    );
    let n = BUCKETS as usize;
    let mut owners = vec![NO_OWNER; n];
    if members.is_empty() {
        return owners;
    }
    let order_key = HashKey {
        k0: seed.k0 ^ 0x6173_7369_676e_2d6f,
        k1: seed.k1 ^ 0x7264_6572_2d76_3031,
    };
    // The seeded order of buckets.
    let mut order: Vec<(u64, u32)> = (0..BUCKETS)
        .map(|b| (siphash13(&order_key, &b.to_le_bytes()), b))
        .collect();
    order.sort_unstable();
    let order: Vec<u32> = order.into_iter().map(|(_, b)| b).collect();
    // A per-member hash of its id, so that tie-breaking follows ids, not list positions.
    let id_hash: Vec<u64> = members
        .iter()
        .map(|m| {
            let mut buf = [0u8; 64];
            let bytes = m.id.as_bytes();
            let len = bytes.len().min(63);
            buf[..len].copy_from_slice(&bytes[..len]);
            buf[63] = len as u8;
            siphash13(&order_key, &buf)
        })
        .collect();

    // Work list of (range start, range end, members already used on this range's lists).
    let mut work: Vec<(usize, usize, u64)> = vec![(0, n, 0)];
    while let Some((lo, hi, used)) = work.pop() {
        let remaining: Vec<usize> = (0..members.len())
            .filter(|&i| used & (1u64 << i) == 0)
            .collect();
        let weighted: Vec<usize> = remaining
            .iter()
            .copied()
            .filter(|&i| members[i].weight > 0)
            .collect();
        let (tier, weights): (Vec<usize>, Vec<u64>) = if !weighted.is_empty() {
            let w = weighted.iter().map(|&i| members[i].weight as u64).collect();
            (weighted, w)
        } else {
            let w = vec![1; remaining.len()];
            (remaining, w)
        };
        if tier.is_empty() {
            continue; // nobody left: NO_OWNER
        }
        // Order of the tier within this range: by hash of (range start, member id).
        let mut ranked: Vec<(u64, usize, u64)> = tier
            .iter()
            .zip(&weights)
            .map(|(&i, &w)| {
                let mut m = [0u8; 16];
                m[..8].copy_from_slice(&(lo as u64).to_le_bytes());
                m[8..].copy_from_slice(&id_hash[i].to_le_bytes());
                (siphash13(&order_key, &m), i, w)
            })
            .collect();
        ranked.sort_unstable();
        let sizes = apportion(hi - lo, &ranked.iter().map(|r| r.2).collect::<Vec<_>>());
        let mut start = lo;
        for ((_, i, _), size) in ranked.into_iter().zip(sizes) {
            let end = start + size;
            if size > 0 {
                if members[i].serving {
                    for &b in &order[start..end] {
                        owners[b as usize] = i as u8;
                    }
                } else {
                    work.push((start, end, used | (1u64 << i)));
                }
            }
            start = end;
        }
    }
    owners
}

/// Splits `n` into parts proportional to `weights` (largest remainder; ties to the earlier).
fn apportion(n: usize, weights: &[u64]) -> Vec<usize> {
    let total: u64 = weights.iter().sum();
    let n64 = n as u64;
    let mut sizes: Vec<usize> = weights
        .iter()
        .map(|&w| (n64 * w / total) as usize)
        .collect();
    let mut left = n - sizes.iter().sum::<usize>();
    let mut by_rem: Vec<(u64, usize)> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| (n64 * w % total, i))
        .collect();
    // Largest remainder first; among equals, the earlier position.
    by_rem.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in &by_rem {
        if left == 0 {
            break;
        }
        sizes[i] += 1;
        left -= 1;
    }
    sizes
}

/// Buckets owned per member index.
pub fn shares(owners: &[u8], members: usize) -> Vec<usize> {
    let mut s = vec![0; members];
    for &o in owners {
        if (o as usize) < members {
            s[o as usize] += 1;
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                id: format!("node{i}"),
                weight: 1,
                serving: true,
            })
            .collect()
    }

    const SEED: HashKey = HashKey {
        k0: 0x0123_4567_89ab_cdef,
        k1: 0xfedc_ba98_7654_3210,
    };

    #[test]
    fn equal_members_are_balanced_within_one_bucket() {
        for n in 1..=32 {
            let owners = assign(&SEED, &members(n));
            let s = shares(&owners, n);
            let (min, max) = (*s.iter().min().unwrap(), *s.iter().max().unwrap());
            assert!(max - min <= 1, "n={n}: {s:?}");
            assert!(owners.iter().all(|&o| (o as usize) < n));
        }
    }

    #[test]
    fn balance_stays_within_five_percent_after_failures() {
        for n in 2..=32usize {
            let mut m = members(n);
            let failed = n.min(3) - 1; // up to two failures
            for f in 0..failed {
                m[(f * 7 + 1) % n].serving = false;
            }
            let owners = assign(&SEED, &m);
            let s = shares(&owners, n);
            let serving: Vec<usize> = (0..n).filter(|&i| m[i].serving).collect();
            let avg = BUCKETS as f64 / serving.len() as f64;
            for &i in &serving {
                let dev = (s[i] as f64 - avg).abs() / avg;
                assert!(dev < 0.05, "n={n} member {i}: {} vs {avg}", s[i]);
            }
            for i in 0..n {
                if !m[i].serving {
                    assert_eq!(s[i], 0);
                }
            }
        }
    }

    #[test]
    fn only_the_removed_members_buckets_move() {
        for n in [2, 3, 5, 8, 17, 32] {
            let mut m = members(n);
            let before = assign(&SEED, &m);
            let victim = n / 2;
            m[victim].serving = false;
            let after = assign(&SEED, &m);
            for b in 0..BUCKETS as usize {
                if before[b] as usize != victim {
                    assert_eq!(before[b], after[b], "n={n} bucket {b} moved");
                } else {
                    assert_ne!(after[b] as usize, victim);
                }
            }
            // And a rejoin restores exactly the old map.
            m[victim].serving = true;
            assert_eq!(assign(&SEED, &m), before);
        }
    }

    #[test]
    fn weights_are_honoured() {
        let mut m = members(3);
        m[0].weight = 1;
        m[1].weight = 2;
        m[2].weight = 5;
        let s = shares(&assign(&SEED, &m), 3);
        let total = BUCKETS as f64;
        for (i, w) in [1.0, 2.0, 5.0].iter().enumerate() {
            let expect = total * w / 8.0;
            assert!((s[i] as f64 - expect).abs() <= 1.0, "{s:?}");
        }
    }

    #[test]
    fn standby_takes_over_only_when_all_weighted_are_gone() {
        let mut m = members(3);
        m[2].weight = 0;
        let s = shares(&assign(&SEED, &m), 3);
        assert_eq!(s[2], 0);
        m[0].serving = false;
        let s = shares(&assign(&SEED, &m), 3);
        assert_eq!(s, vec![0, BUCKETS as usize, 0]);
        m[1].serving = false;
        let s = shares(&assign(&SEED, &m), 3);
        assert_eq!(s, vec![0, 0, BUCKETS as usize]);
        m[2].serving = false;
        assert!(assign(&SEED, &m).iter().all(|&o| o == NO_OWNER));
    }

    #[test]
    fn same_view_same_map_whatever_the_member_order() {
        let m = members(7);
        let a = assign(&SEED, &m);
        // Another node lists members in another order; config sorts by id, and the map is
        // defined by ids, so the result (translated to ids) must match.
        let mut rev = m.clone();
        rev.reverse();
        let b = assign(&SEED, &rev);
        for bkt in 0..BUCKETS as usize {
            assert_eq!(m[a[bkt] as usize].id, rev[b[bkt] as usize].id);
        }
        // And another seed gives another map.
        let other = HashKey { k0: 1, k1: 2 };
        assert_ne!(assign(&other, &m), a);
    }
}
