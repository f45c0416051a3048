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

/// A farm of three members serving, and an attacker that sees every frame.
fn three_members_and_an_attacker(test: &str) -> Option<(Topology, Attacker)> {
    let t = Topology::started(
        test,
        Spec {
            nodes: 3,
            client_addrs: 60,
            ..Spec::default()
        },
    )?;
    let eve = Attacker::plug(&t);
    Some((t, eve))
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
    let Some((mut t, eve)) = three_members_and_an_attacker(
        "a_killed_member_whose_heartbeats_are_replayed_is_taken_over",
    ) else {
        return;
    };
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

#[test]
fn spoofed_witness_replies_do_not_give_a_cut_off_member_quorum() {
    if !farm_tests::require_root("spoofed_witness_replies_do_not_give_a_cut_off_member_quorum") {
        return;
    }
    let mut t = Topology::build(Spec {
        nodes: 2,
        client_addrs: 20,
        ..Spec::default()
    });
    let witness = t.client_v4[0];
    t.set_witness(witness);
    t.start_all();
    t.wait_converged(&[0, 1], Duration::from_secs(20));
    // n1 is cut off: from n2's heartbeats and from the witness (its pings never leave).
    t.nft(
        0,
        &format!(
            "table inet cut {{\n  chain in {{\n    type filter hook input priority 0;\n    udp dport {HB_PORT} drop\n\
             \x20 }}\n  chain out {{\n    type filter hook output priority 0;\n    udp dport {HB_PORT} drop\n\
             \x20   ip daddr {witness} icmp type echo-request drop\n  }}\n}}\n"
        ),
    );
    farm_tests::wait_until(
        "n1 gives up its quorum",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || (!t.status(0).expect("status").quorum).then_some(()),
    );
    // The attacker, on the switch but not on n1's path, sprays echo replies "from the
    // witness": every identifier (farmd's pid among them), many sequence numbers.
    let eve = Attacker::plug_blind(&t);
    let eth = (eve.mac(), t.node_mac(0));
    let n1 = t.nodes[0].addr4;
    let mut spray = Vec::with_capacity(1 << 16);
    for ident in 0..=u16::MAX {
        let seq = ident.wrapping_mul(7919);
        spray.push(attacker::echo_reply4(
            eth,
            witness,
            n1,
            ident,
            seq,
            b"farm-witness0123456789abcdef",
        ));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let sender = eve.send_loop(spray, 40_000, Duration::from_secs(8), stop);
    let started = std::time::Instant::now();
    let mut quorum_seen = 0;
    while started.elapsed() < Duration::from_secs(8) {
        let s = t.status(0).expect("status");
        if s.quorum || s.heartbeat.witness.as_ref().is_some_and(|w| w.reachable) {
            quorum_seen += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let sent = sender.join().expect("sender");
    eprintln!("sprayed {sent} spoofed witness replies at n1");
    assert!(sent > 100_000, "sprayed {sent}");
    assert_eq!(
        quorum_seen, 0,
        "a spoofed reply gave the cut-off n1 the witness"
    );
    // n2 serves everything; n1 nothing.
    let predicted = t.owners(1, &t.clients4());
    assert!(predicted.values().all(|o| o == "n2"), "{predicted:?}");
    for a in t.ask_vip4(&t.clients4()) {
        assert_eq!(a.node.as_deref(), Some("n2"), "{a:?}");
    }
}

#[test]
fn two_thousand_idle_connections_to_the_metrics_port_move_no_bucket() {
    let Some(t) = Topology::started(
        "two_thousand_idle_connections_to_the_metrics_port_move_no_bucket",
        Spec {
            nodes: 3,
            client_addrs: 60,
            extra_config: "\n[metrics]\nenabled = true\nlisten = \"0.0.0.0:9464\"\n\n\
                           [[check]]\nname = \"web\"\nkind = \"tcp\"\naddress = \"127.0.0.1:80\"\n\
                           interval_ms = 200\nrise = 2\nfall = 2\n"
                .into(),
            ..Spec::default()
        },
    ) else {
        return;
    };
    // As systemd starts services: 1024 open files at most.
    let pid = t.nodes[0].farmd.as_ref().expect("farmd").id();
    let out = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=1024:1024"])
        .output()
        .expect("prlimit");
    assert!(out.status.success(), "{out:?}");
    let clients = t.clients4();
    let before = t.owners(0, &clients);
    let lost_before = t.status(0).expect("status").heartbeat.counters.peers_lost;
    let eve = Attacker::plug_blind(&t);
    let target = std::net::SocketAddr::from((t.nodes[0].addr4, 9464));
    let stop = Arc::new(AtomicBool::new(false));
    let holder = {
        let stop = stop.clone();
        eve.ns.spawn(move || {
            let mut conns: Vec<Option<std::net::TcpStream>> = (0..2000).map(|_| None).collect();
            let (mut opened, mut most_open) = (0u64, 0usize);
            let mut buf = [0u8; 1];
            while !stop.load(Ordering::Relaxed) {
                for c in conns.iter_mut() {
                    let alive = c.as_ref().is_some_and(|s| {
                        matches!(s.peek(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                    });
                    if !alive {
                        *c = std::net::TcpStream::connect_timeout(
                            &target,
                            Duration::from_millis(20),
                        )
                        .ok();
                        if let Some(s) = c {
                            s.set_nonblocking(true).ok();
                            opened += 1;
                        }
                    }
                }
                most_open = most_open.max(conns.iter().flatten().count());
                std::thread::sleep(Duration::from_millis(100));
            }
            (opened, most_open)
        })
    };
    let started = std::time::Instant::now();
    let mut problems = Vec::new();
    while started.elapsed() < Duration::from_secs(20) {
        let s = t.status(0).expect("status");
        if s.members.iter().any(|m| m.state != MemberState::Serving) {
            problems.push(format!("{:?}", s.members));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::Relaxed);
    let (opened, most_open) = holder.join().expect("holder");
    eprintln!(
        "metrics flood: {opened} connections opened, up to {most_open} open at once, against a \
         farmd limited to 1024 open files"
    );
    assert!(opened >= 2000, "{opened}");
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(t.owners(0, &clients), before, "buckets moved");
    let s = t.status(0).expect("status");
    assert_eq!(s.heartbeat.counters.peers_lost, lost_before);
    assert!(s.checks_failing.is_empty(), "{:?}", s.checks_failing);
    assert!(
        t.metrics(0)
            .contains_key("farm_buckets_owned{member=\"n1\"}")
    );
}

#[test]
fn a_minute_of_heartbeat_port_flood_declares_no_member_lost() {
    let Some((t, eve)) =
        three_members_and_an_attacker("a_minute_of_heartbeat_port_flood_declares_no_member_lost")
    else {
        return;
    };
    let n1 = t.nodes[0].addr4;
    // Real heartbeats to n1, captured: replayed as sent (the members' MACs and addresses).
    let replays = eve.capture(Duration::from_secs(2), move |f| {
        attacker::udp(f).is_some_and(|u| u.dst == IpAddr::V4(n1) && u.dst_port == HB_PORT)
    });
    assert!(replays.len() >= 20, "captured {}", replays.len());
    // Replayed from the attacker's port with its own MAC (the IP packets as captured): a
    // switch that learned a member's MAC on the attacker's port would cut that member off, an
    // attack on the switch (port security stops it), not on farm.
    eve.stop_flooding(&t);
    let (eve_mac, n1_mac) = (eve.mac(), t.node_mac(0));
    let replays: Vec<Vec<u8>> = replays
        .into_iter()
        .map(|mut f| {
            f[6..12].copy_from_slice(&eve_mac);
            f
        })
        .collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut junk = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let mut flood = Vec::new();
    for (k, r) in replays.iter().enumerate() {
        flood.push(r.clone());
        // Junk from the attacker's own address, and junk "from" a member.
        let src = if k % 2 == 0 {
            attacker::ATTACKER_ADDR4
        } else {
            t.nodes[1 + k % 2].addr4
        };
        let payload = junk(60 + k % 200);
        flood.push(attacker::udp4_frame(
            (eve_mac, n1_mac),
            (src, HB_PORT),
            (n1, HB_PORT),
            &payload,
        ));
        // A well-formed header with a new sequence number but no key: costs an HMAC.
        let mut forged = r[42..].to_vec();
        if forged.len() > 24 {
            forged[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
        }
        flood.push(attacker::udp4_frame(
            (eve_mac, n1_mac),
            (t.nodes[1].addr4, HB_PORT),
            (n1, HB_PORT),
            &forged,
        ));
    }
    let before: Vec<_> = (0..3).map(|i| t.status(i).expect("status")).collect();
    let farmd = t.nodes[0].farmd.as_ref().expect("farmd").id();
    let cpu_before = farm_tests::busy::cpu_seconds(farmd);
    let stop = Arc::new(AtomicBool::new(false));
    // Two senders of 50,000 a second each (sendmmsg), so that one busy core does not slow the
    // attack down.
    let senders = [
        eve.send_loop(flood.clone(), 50_000, Duration::from_secs(60), stop.clone()),
        eve.send_loop(flood, 50_000, Duration::from_secs(60), stop),
    ];
    let mut quorum_lost = 0;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        for i in 0..3 {
            if !t.status(i).expect("status").quorum {
                quorum_lost += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let sent: u64 = senders.into_iter().map(|s| s.join().expect("sender")).sum();
    let after: Vec<_> = (0..3).map(|i| t.status(i).expect("status")).collect();
    let cpu = farm_tests::busy::cpu_seconds(farmd) - cpu_before;
    let rejected: u64 = after[0].heartbeat.counters.rejected.values().sum::<u64>()
        - before[0].heartbeat.counters.rejected.values().sum::<u64>();
    let xdp = after[0].counters["heartbeat_foreign_dropped"]
        - before[0].counters["heartbeat_foreign_dropped"];
    eprintln!(
        "flood: {sent} datagrams in 60 s ({}/s) at n1: {xdp} dropped by XDP, {rejected} \
         rejected by farmd ({:?}); n1's farmd used {:.1} s of CPU ({:.0}% of a core)",
        sent / 60,
        after[0].heartbeat.counters.rejected,
        cpu,
        cpu / 60.0 * 100.0
    );
    assert!(sent >= 60 * 90_000, "sent only {sent}");
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            a.heartbeat.counters.peers_lost, b.heartbeat.counters.peers_lost,
            "{} declared a member lost",
            a.node
        );
    }
    assert_eq!(quorum_lost, 0);
    assert!(xdp >= sent / 10, "XDP dropped {xdp} of {sent}");
    assert!(rejected >= sent / 2, "farmd rejected {rejected} of {sent}");
}
