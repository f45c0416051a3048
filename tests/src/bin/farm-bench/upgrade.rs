//! `upgrade`: what the peers see of an in-place upgrade (`farmctl upgrade`): the longest gap in
//! the upgraded member's heartbeat stream as captured on a peer's interface, its heartbeats the
//! peers counted lost (sequence gaps), members declared lost, buckets moved; beside the same
//! member restarted (`SIGTERM`, then a new farmd: what a package upgrade without in-place
//! support does) in the same run.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use farm_tests::{
    probe::{UdpTap, longest_gap},
    topology::{Spec, Topology},
};

/// farmd's default heartbeat port (the topology's configs keep it).
const HB_PORT: u16 = 7946;

fn lost_from(t: &Topology, peer: usize, of: &str) -> Result<u64> {
    let s = t.status(peer).map_err(anyhow::Error::msg)?;
    Ok(s.heartbeat
        .counters
        .lost
        .get(of)
        .map_or(0, |v| v.iter().sum()))
}

fn peers_lost(t: &Topology) -> Result<u64> {
    let mut n = 0;
    for i in 1..t.nodes.len() {
        let s = t.status(i).map_err(anyhow::Error::msg)?;
        n += s.heartbeat.counters.peers_lost + s.heartbeat.counters.peers_left;
    }
    Ok(n)
}

fn moved(a: &[Option<String>], b: &[Option<String>]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

pub fn upgrade(trials: usize) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("(in-place upgrade: needs root, skipped)");
        return Ok(());
    }
    let mut t = Topology::build(Spec {
        nodes: 3,
        client_addrs: 4,
        ..Spec::default()
    });
    t.start_all();
    let s = t.status(0).map_err(anyhow::Error::msg)?;
    let (interval, threshold) = (s.heartbeat.interval_ms, s.heartbeat.loss_threshold);
    let a = farm_tests::bin("farmd");
    let b = t.dir.join("farmd-b");
    std::fs::copy(&a, &b).context("copy farmd")?;
    let n1 = t.nodes[0].addr4.into();
    let tap = UdpTap::start(&t.nodes[1].ns, "eth0", n1, HB_PORT);
    std::thread::sleep(Duration::from_secs(2));
    let quiet = (Instant::now() - Duration::from_secs(2), Instant::now());

    let owners = t.bucket_owners(1);
    let (lost0, peers0) = (lost_from(&t, 1, "n1")?, peers_lost(&t)?);
    let mut windows = Vec::new();
    let mut took = Vec::new();
    for k in 0..trials {
        let binary = if k % 2 == 0 { &b } else { &a };
        let t0 = Instant::now();
        let o = t.upgrade_farmd(0, Some(binary));
        ensure!(
            o.status.success(),
            "upgrade {k}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        took.push(t0.elapsed());
        windows.push((t0, Instant::now()));
        std::thread::sleep(Duration::from_millis(700));
    }
    let upgraded_owners = t.bucket_owners(1);
    let (lost1, peers1) = (lost_from(&t, 1, "n1")?, peers_lost(&t)?);

    // The same member restarted, for comparison.
    std::thread::sleep(Duration::from_secs(1));
    let r0 = Instant::now();
    t.signal_farmd(0, libc::SIGTERM);
    t.start_farmd(0);
    t.wait_converged(&[0, 1, 2], Duration::from_secs(30));
    let restart_took = r0.elapsed();
    let r1 = Instant::now();
    let peers2 = peers_lost(&t)?;
    std::thread::sleep(Duration::from_millis(500));
    let arrivals = tap.finish();

    let normal = longest_gap(&arrivals, quiet.0, quiet.1);
    let mut gaps: Vec<Duration> = windows
        .iter()
        .map(|&(from, to)| longest_gap(&arrivals, from, to + Duration::from_millis(300)))
        .collect();
    gaps.sort();
    took.sort();
    let restart_gap = longest_gap(&arrivals, r0, r1);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "in-place upgrade of n1 ({trials} trials, debug or release as built; heartbeat every \
         {interval} ms, a member is lost after {threshold} missed = {} ms), as n2 saw n1's \
         heartbeats on its eth0:",
        interval * threshold as u64
    );
    println!("  longest gap while nothing happens: {:.0} ms", ms(normal));
    println!(
        "  farmctl upgrade: longest gap median {:.0} ms, max {:.0} ms (each: {}); command took \
         median {:.0} ms; heartbeats counted lost by n2: {}; members lost or left (n2, n3): {}; \
         buckets moved: {}",
        ms(gaps[gaps.len() / 2]),
        ms(gaps[gaps.len() - 1]),
        gaps.iter()
            .map(|g| format!("{:.0}", ms(*g)))
            .collect::<Vec<_>>()
            .join(", "),
        ms(took[took.len() / 2]),
        lost1 - lost0,
        peers1 - peers0,
        moved(&owners, &upgraded_owners),
    );
    println!(
        "  restart (SIGTERM, new farmd, until the farm converged again): longest gap {:.0} ms, \
         {:.0} ms in all; members left (n2, n3): {} (the restarted member's buckets move away \
         and back)",
        ms(restart_gap),
        ms(restart_took),
        peers2 - peers1
    );
    Ok(())
}
