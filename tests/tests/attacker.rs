//! An attacker on the LAN without the cluster key (see README, "Threat model"): a host on the
//! farm's switch that sees every frame (the switch floods like a hub), captures, replays frames
//! exactly as the members sent them, spoofs addresses and floods. Each test asserts what users
//! care about: which member answers, whether a dead member is taken over, whether a living one
//! is kept.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use farm_daemon::control::MemberState;
use farm_tests::{
    attacker::{self, Attacker},
    topology::{Spec, Topology},
};

const HB_PORT: u16 = 7946;

/// Heartbeat frames sent by `from` (captured on the wire).
fn heartbeats_from(from: IpAddr) -> impl Fn(&[u8]) -> bool + Send + 'static {
    move |f| attacker::udp(f).is_some_and(|u| u.src == from && u.dst_port == HB_PORT)
}

fn member_state(t: &Topology, at: usize, member: &str) -> MemberState {
    let s = t.status(at).expect("status");
    s.members
        .iter()
        .find(|m| m.id == member)
        .map(|m| m.state)
        .expect("member in status")
}

fn rejected(t: &Topology, at: usize, reasons: &[&str]) -> u64 {
    let s = t.status(at).expect("status");
    reasons
        .iter()
        .map(|r| s.heartbeat.counters.rejected.get(*r).copied().unwrap_or(0))
        .sum()
}

#[test]
fn a_killed_member_whose_heartbeats_are_replayed_is_taken_over() {
    let Some(mut t) = Topology::started(
        "a_killed_member_whose_heartbeats_are_replayed_is_taken_over",
        Spec {
            nodes: 3,
            client_addrs: 60,
            ..Spec::default()
        },
    ) else {
        return;
    };
    let eve = Attacker::plug(&t);
    let (victims, _) = t.clients_of("n3", 0);
    assert!(!victims.is_empty());
    // Two seconds of n3's heartbeats to n1 and n2, as sent.
    let captured = eve.capture(
        Duration::from_secs(2),
        heartbeats_from(IpAddr::V4(t.nodes[2].addr4)),
    );
    assert!(captured.len() >= 20, "captured {}", captured.len());

    t.signal_farmd(2, libc::SIGKILL);
    let stop = Arc::new(AtomicBool::new(false));
    let replay = eve.send_loop(captured, 400, Duration::from_secs(90), stop.clone());

    // Replayed all along, n3 is still declared lost and its clients are served by the others.
    t.wait_served_without("n3", &victims, Duration::from_secs(10));
    for at in [0, 1] {
        assert_eq!(member_state(&t, at, "n3"), MemberState::Lost);
        assert!(
            rejected(&t, at, &["replayed", "stale"]) >= 20,
            "{:?}",
            t.status(at).expect("status").heartbeat.counters.rejected
        );
    }

    // A member that restarts has no memory of n3's sequence: the replays answer its previous
    // incarnation's challenge and are refused all the same.
    t.signal_farmd(0, libc::SIGTERM);
    t.start_farmd(0);
    t.wait_serving(0, Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(2));
    let seen = member_state(&t, 0, "n3");
    assert!(
        matches!(seen, MemberState::Lost | MemberState::Unknown),
        "the restarted n1 takes the dead n3 for {seen:?}"
    );
    assert!(
        rejected(&t, 0, &["stale", "replayed"]) >= 20,
        "{:?}",
        t.status(0).expect("status").heartbeat.counters.rejected
    );
    for a in t.ask_vip4(&victims) {
        assert!(
            matches!(a.node.as_deref(), Some("n1" | "n2")),
            "a client of the dead n3 was not served by the others: {a:?}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let sent = replay.join().expect("replay thread");
    eprintln!("replayed {sent} captured heartbeats of n3");
    assert!(sent > 1000);
}

#[test]
fn replayed_drill_orders_do_nothing() {
    let Some(t) = Topology::started(
        "replayed_drill_orders_do_nothing",
        Spec {
            nodes: 3,
            client_addrs: 60,
            extra_config: "\n[drill]\nprobe_addresses = [\"10.201.9.192/26\"]\n".into(),
            ..Spec::default()
        },
    ) else {
        return;
    };
    let eve = Attacker::plug(&t);
    // n1 drills n2 while the attacker records n1's heartbeats (they carry the order).
    let n1 = IpAddr::V4(t.nodes[0].addr4);
    let recording = {
        let keep = heartbeats_from(n1);
        let e = &eve;
        std::thread::scope(|s| {
            let rec = s.spawn(|| e.capture(Duration::from_secs(8), keep));
            let run = t.farmctl(0, &["drill", "--member", "n2", "--yes", "--json"]);
            assert!(
                run.status.success(),
                "{}",
                String::from_utf8_lossy(&run.stderr)
            );
            rec.join().expect("capture")
        })
    };
    assert!(t.log(1).contains("acting as if crashed"), "{}", t.log(1));
    t.wait_converged(&[0, 1, 2], Duration::from_secs(20));
    let crashed_before = t.log(1).matches("acting as if crashed").count();
    let (clients, _) = t.clients_of("n2", 0);
    assert!(!clients.is_empty());
    let lost_before: Vec<u64> = (0..3)
        .map(|at| t.status(at).expect("status").heartbeat.counters.peers_lost)
        .collect();

    // The recorded orders, replayed for 10 s, make nobody play dead.
    let stop = Arc::new(AtomicBool::new(false));
    let replay = eve.send_loop(recording, 400, Duration::from_secs(10), stop);
    std::thread::sleep(Duration::from_secs(3));
    for a in t.ask_vip4(&clients) {
        assert_eq!(a.node.as_deref(), Some("n2"), "{a:?}");
    }
    let sent = replay.join().expect("replay");
    assert!(sent > 1000, "replayed {sent}");
    assert_eq!(
        t.log(1).matches("acting as if crashed").count(),
        crashed_before,
        "a replayed drill order was obeyed"
    );
    assert_eq!(member_state(&t, 0, "n2"), MemberState::Serving);
    assert!(rejected(&t, 1, &["replayed", "stale"]) >= 1000);
    for (at, before) in lost_before.into_iter().enumerate() {
        assert_eq!(
            t.status(at).expect("status").heartbeat.counters.peers_lost,
            before,
            "a member was declared lost during the replay"
        );
    }
}
