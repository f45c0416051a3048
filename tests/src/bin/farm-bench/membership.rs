//! `membership`: what a change of the member list costs in bucket moves, for farm's current
//! assignment (0.2: rendezvous lists), farm 0.1's (exact ranges) and
//! Maglev's lookup table (Eisenbud et al., NSDI 2016: "~1/N" disruption), all computed in the
//! same run over the same member names.
//!
//! For each farm size N: a member added (N -> N+1) and the last one removed (N -> N-1). The
//! minimum is what the member added must receive (its share, all of it moving to it) or the
//! member removed had. Also the worst deviation of a member's share from an exact 1/N.

use anyhow::Result;
use farm_common::{BUCKETS, HashKey, siphash13};
use farm_daemon::assign::{self, Alg, Candidate};

const SEED: HashKey = HashKey {
    k0: 0x0123_4567_89ab_cdef,
    k1: 0xfedc_ba98_7654_3210,
};

fn members(n: usize) -> Vec<Candidate> {
    (0..n)
        .map(|i| Candidate {
            id: format!("web{}", i + 1),
            weight: 1,
            serving: true,
        })
        .collect()
}

/// Owner (member index) per bucket.
type Table = Vec<usize>;

/// A table for N members.
type TableOf = Box<dyn Fn(usize) -> Table>;

fn farm(alg: Alg, n: usize) -> Table {
    assign::assign_with(alg, &SEED, &members(n))
        .into_iter()
        .map(usize::from)
        .collect()
}

/// Maglev's table population (the paper's Algorithm 1) over `BUCKETS` entries: each backend's
/// preference is a permutation `(offset + j * skip) mod M`; backends take turns claiming their
/// next preferred empty entry. M must be coprime with every skip: with M = 65536 any odd skip
/// is (the paper uses a prime M; 65536 keeps the comparison on farm's table size).
fn maglev(n: usize) -> Table {
    let m = BUCKETS as u64;
    let ids = members(n);
    let perm: Vec<(u64, u64)> = ids
        .iter()
        .map(|c| {
            let mut name = [0u8; 16];
            let b = c.id.as_bytes();
            name[..b.len()].copy_from_slice(b);
            let offset = siphash13(&HashKey { k0: 1, k1: 2 }, &name) % m;
            let skip = (siphash13(&HashKey { k0: 3, k1: 4 }, &name) % (m / 2)) * 2 + 1;
            (offset, skip)
        })
        .collect();
    let mut table = vec![usize::MAX; m as usize];
    let mut next = vec![0u64; n];
    let mut filled = 0;
    'fill: loop {
        for i in 0..n {
            let (offset, skip) = perm[i];
            let mut c = (offset + next[i] * skip) % m;
            while table[c as usize] != usize::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            table[c as usize] = i;
            next[i] += 1;
            filled += 1;
            if filled == m as usize {
                break 'fill;
            }
        }
    }
    table
}

fn moved(a: &Table, b: &Table) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

fn count(t: &Table, who: usize) -> usize {
    t.iter().filter(|&&o| o == who).count()
}

fn worst_share(t: &Table, n: usize) -> f64 {
    let ideal = BUCKETS as f64 / n as f64;
    (0..n)
        .map(|i| (count(t, i) as f64 - ideal).abs() / ideal * 100.0)
        .fold(0.0, f64::max)
}

pub fn membership() -> Result<()> {
    println!(
        "buckets moved by a member list change ({BUCKETS} buckets, equal weights; minimum = what \
         the member added receives or the member removed had)"
    );
    println!(
        "{:>4}  {:<10} {:>10} {:>10} {:>8}   {:>10} {:>10} {:>8}   {:>10}",
        "N",
        "assignment",
        "add: moved",
        "minimum",
        "excess",
        "del: moved",
        "minimum",
        "excess",
        "worst share"
    );
    for n in [3usize, 4, 5, 8, 16, 32] {
        let rows: [(&str, TableOf); 3] = [
            ("farm 0.2", Box::new(|k| farm(Alg::Rendezvous, k))),
            ("farm 0.1", Box::new(|k| farm(Alg::Ranges, k))),
            ("Maglev", Box::new(maglev)),
        ];
        for (name, table) in rows {
            let (t, up, down) = (table(n), table(n + 1), table(n - 1));
            let add_min = count(&up, n);
            let del_min = count(&t, n - 1);
            let (add, del) = (moved(&t, &up), moved(&t, &down));
            println!(
                "{n:>4}  {name:<10} {add:>10} {add_min:>10} {:>7.1}%   {del:>10} {del_min:>10} \
                 {:>7.1}%   {:>9.2}%",
                (add as f64 - add_min as f64) / add_min as f64 * 100.0,
                (del as f64 - del_min as f64) / del_min as f64 * 100.0,
                worst_share(&t, n)
            );
        }
    }
    println!(
        "(farm 0.2 moves exactly the minimum by construction: its preference lists are \
         rendezvous orders, which a member added or removed changes only for its own buckets; \
         the price is shares as exact as 65536 random draws instead of +-1)"
    );
    Ok(())
}

/// How long a live member list change takes, on a real farm in network namespaces (root):
/// from the first `farmctl reload` until every member serves the new map with no move in
/// progress, for two members added (3 -> 5) and one removed after it stopped (5 -> 4).
pub fn convergence(trials: usize) -> Result<()> {
    use farm_tests::topology::{Spec, Topology};
    use std::time::{Duration, Instant};

    if !nix_is_root() {
        println!("(live convergence: needs root, skipped)");
        return Ok(());
    }
    let converged = |t: &Topology, nodes: &[usize], members: usize| {
        nodes.iter().all(|&i| {
            t.status(i).is_ok_and(|s| {
                s.members.len() == members
                    && s.handover.is_none()
                    && s.members.iter().all(|m| {
                        m.state == "serving" || !nodes.iter().any(|&j| t.nodes[j].name == m.id)
                    })
                    && nodes.iter().all(|&j| {
                        s.members
                            .iter()
                            .any(|m| m.id == t.nodes[j].name && m.state == "serving")
                    })
            })
        })
    };
    let wait = |t: &Topology, nodes: &[usize], members: usize, from: Instant| -> Result<Duration> {
        while !converged(t, nodes, members) {
            if from.elapsed() > Duration::from_secs(60) {
                anyhow::bail!("no convergence within 60 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(from.elapsed())
    };
    let mut add = Vec::new();
    let mut remove = Vec::new();
    for _ in 0..trials {
        let mut t = Topology::build(Spec {
            nodes: 5,
            client_addrs: 4,
            ..Spec::default()
        });
        t.set_members(&[0, 1, 2]);
        for i in 0..3 {
            t.start_farmd(i);
        }
        t.wait_converged(&[0, 1, 2], Duration::from_secs(20));
        t.set_members(&[0, 1, 2, 3, 4]);
        for i in 3..5 {
            let child = t.spawn_farmd(i, &t.nodes[i].config.clone());
            t.nodes[i].farmd = Some(child);
        }
        std::thread::sleep(Duration::from_secs(1));
        let from = Instant::now();
        for i in 0..3 {
            let o = t.farmctl(i, &["reload"]);
            anyhow::ensure!(o.status.success(), "reload failed");
        }
        add.push(wait(&t, &[0, 1, 2, 3, 4], 5, from)?);
        t.signal_farmd(4, libc::SIGTERM);
        t.wait_converged(&[0, 1, 2, 3], Duration::from_secs(30));
        t.set_members(&[0, 1, 2, 3]);
        let from = Instant::now();
        for i in 0..4 {
            let o = t.farmctl(i, &["reload"]);
            anyhow::ensure!(o.status.success(), "reload failed");
        }
        remove.push(wait(&t, &[0, 1, 2, 3], 4, from)?);
    }
    let show = |v: &mut Vec<Duration>| {
        v.sort();
        let ms: Vec<String> = v.iter().map(|d| format!("{}", d.as_millis())).collect();
        format!(
            "median {} ms (trials: {})",
            v[v.len() / 2].as_millis(),
            ms.join(", ")
        )
    };
    println!(
        "live change, from the first reload until every member serves the new map (loss window \
         400 ms; the added members join after one loss window with quorum, then take their \
         buckets by handover):"
    );
    println!("  3 -> 5 members: {}", show(&mut add));
    println!(
        "  5 -> 4 (the removed member already stopped): {}",
        show(&mut remove)
    );
    Ok(())
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
