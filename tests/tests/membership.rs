//! Heartbeats and membership on real farms: forged and replayed heartbeats change nothing, a
//! node cut off from heartbeats stops serving while the others serve everything, a two-node
//! farm's witness decides, heavy heartbeat loss causes no failover, a node whose link is cut is
//! replaced within the loss window while the survivors' connections see no error, and when it
//! comes back it takes its share over without breaking a connection.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use farm_daemon::{
    heartbeat::{self, Heartbeat, State},
    secret::Secret,
};
use farm_tests::{
    require_root,
    topology::{Spec, TCP_PORT, Topology},
    traffic,
};

const HB_PORT: u16 = 7946;

/// One connection from every client address; asserts each is answered by its predicted owner
/// and accepted exactly once.
fn every_client_answered_once(t: &Topology, predicted: &BTreeMap<IpAddr, String>) {
    let before = t.tcp_accepts();
    let reqs: Vec<(IpAddr, SocketAddr)> =
        predicted.keys().map(|&a| (a, t.vip4(TCP_PORT))).collect();
    let n = reqs.len();
    let answers = traffic::tcp_requests(&t.client, reqs, 4, Duration::from_secs(3));
    for a in &answers {
        assert_eq!(a.node.as_ref(), predicted.get(&a.src), "{a:?}");
    }
    assert_eq!(
        (t.tcp_accepts() - before) as usize,
        n,
        "a connection was accepted twice"
    );
}

#[test]
fn forged_replayed_and_random_heartbeats_change_nothing() {
    let Some(t) = Topology::started(
        "forged_replayed_and_random_heartbeats_change_nothing",
        Spec {
            nodes: 3,
            client_addrs: 50,
            ..Spec::default()
        },
    ) else {
        return;
    };
    let before = t.status(0).expect("status");
    // Control clients that connect and never send anything must not hold up n1's heartbeats.
    let silent: Vec<std::os::unix::net::UnixStream> = (0..5)
        .map(|_| std::os::unix::net::UnixStream::connect(&t.nodes[0].socket).expect("connect"))
        .collect();
    let real_key = Secret::load(&t.key_file()).expect("key").message_key();
    let target = SocketAddr::new(IpAddr::V4(t.nodes[0].addr4), HB_PORT);
    let leave = |key: &[u8; 32], incarnation: u64, seq: u64| {
        heartbeat::encode(
            key,
            &Heartbeat {
                version: heartbeat::VERSION,
                departed: 0,
                id: "n2".into(),
                state: State::Leaving,
                weight: 1,
                incarnation,
                seq,
                applied: Default::default(),
                config_digest: 0,
                network: 0,
                settled: Default::default(),
                handed_over: Default::default(),
                released: Default::default(),
                drill: None,
                mirror: Default::default(),
                echo: (0, 0),
            },
        )
    };
    let sent = t.client.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("udp");
        let mut n = 0u64;
        // Forged: "n2 is leaving", signed with the wrong key.
        for seq in 0..50 {
            s.send_to(&leave(&[0x42; 32], u64::MAX, seq), target)
                .expect("send");
            n += 1;
        }
        // Replayed: correctly signed, but older than n2's real incarnation (a capture from an
        // earlier run of n2 looks exactly like this).
        for seq in 0..50 {
            s.send_to(&leave(&real_key, 1, seq), target).expect("send");
            n += 1;
        }
        // Random bytes and truncated messages.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for len in [0usize, 3, 10, 47, 60, 64, 80, 127, 128, 500, 1400] {
            for _ in 0..10 {
                let b: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                s.send_to(&b, target).expect("send");
                n += 1;
            }
        }
        let valid = leave(&real_key, 1, 0);
        s.send_to(&valid[..30], target).expect("send");
        n + 1
    });
    std::thread::sleep(Duration::from_millis(2500));
    drop(silent);
    let after = t.status(0).expect("status");
    for i in [1, 2] {
        let s = t.status(i).expect("status");
        assert_eq!(s.heartbeat.counters.peers_lost, 0, "{} lost a peer", s.node);
    }
    // Sent from the client's address, which is no member's: dropped by XDP before the kernel
    // queued any for farmd (tests/attacker.rs sends them from members' addresses, to reach the
    // checks farmd makes).
    let dropped =
        after.counters["heartbeat_foreign_dropped"] - before.counters["heartbeat_foreign_dropped"];
    let rejected: u64 = after.heartbeat.counters.rejected.values().sum::<u64>()
        - before.heartbeat.counters.rejected.values().sum::<u64>();
    assert!(
        dropped >= sent - 10,
        "XDP dropped {dropped} of {sent}, farmd rejected {rejected}: {:?}",
        after.heartbeat.counters.rejected
    );
    // Nothing moved: everyone still serving, same shares, nobody lost.
    assert_eq!(after.heartbeat.counters.peers_lost, 0);
    for (m, b) in after.members.iter().zip(&before.members) {
        assert_eq!(m.state, "serving", "{m:?}");
        assert_eq!(m.buckets, b.buckets);
    }
    t.wait_converged(&[0, 1, 2], Duration::from_secs(2));
}

#[test]
fn heartbeat_partition_isolated_node_stops_the_others_serve_everything() {
    let Some(t) = Topology::started(
        "heartbeat_partition_isolated_node_stops_the_others_serve_everything",
        Spec {
            nodes: 3,
            client_addrs: 300,
            ..Spec::default()
        },
    ) else {
        return;
    };
    // n3 loses its heartbeats, in and out; its data path stays intact.
    t.nft(
        2,
        &format!(
            "table inet cut {{\n  chain in {{\n    type filter hook input priority 0;\n    udp dport {HB_PORT} drop\n  }}\n\
             \x20 chain out {{\n    type filter hook output priority 0;\n    udp dport {HB_PORT} drop\n  }}\n}}\n"
        ),
    );
    t.wait_converged(&[0, 1], Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.status(2).expect("status").quorum {
        assert!(
            Instant::now() < deadline,
            "the isolated node kept its quorum"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let s3 = t.status(2).expect("status");
    assert!(
        s3.members.iter().all(|m| m.this_node || m.state == "lost"),
        "{:?}",
        s3.members
    );
    let predicted = t.owners(0, &t.clients4());
    assert!(
        predicted.values().all(|o| o != "n3"),
        "n3 still owns clients"
    );
    // Every client is answered exactly once, by n1 or n2.
    every_client_answered_once(&t, &predicted);
}

#[test]
fn two_nodes_the_side_without_the_witness_releases() {
    if !require_root("two_nodes_the_side_without_the_witness_releases") {
        return;
    }
    let mut t = Topology::build(Spec {
        nodes: 2,
        client_addrs: 200,
        ..Spec::default()
    });
    // The witness: the client host (it answers pings).
    let witness = t.client_v4[0];
    t.set_witness(witness);
    t.start_all();
    // n1 loses both its peer's heartbeats and the witness; n2 only loses n1.
    t.nft(
        0,
        &format!(
            "table inet cut {{\n  chain in {{\n    type filter hook input priority 0;\n    udp dport {HB_PORT} drop\n\
             \x20   ip saddr {witness} icmp type echo-reply drop\n  }}\n  chain out {{\n    type filter hook \
             output priority 0;\n    udp dport {HB_PORT} drop\n  }}\n}}\n"
        ),
    );
    t.wait_converged(&[1], Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.status(0).expect("status").quorum {
        assert!(
            Instant::now() < deadline,
            "n1 kept serving without peer or witness"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let s2 = t.status(1).expect("status");
    assert!(s2.quorum, "n2 reaches the witness");
    assert_eq!(
        s2.heartbeat.witness.as_ref().map(|w| w.reachable),
        Some(true)
    );
    let predicted = t.owners(1, &t.clients4());
    assert!(predicted.values().all(|o| o == "n2"));
    every_client_answered_once(&t, &predicted);
}

#[test]
fn twenty_percent_heartbeat_loss_for_a_minute_causes_no_failover() {
    let Some(t) = Topology::started(
        "twenty_percent_heartbeat_loss_for_a_minute_causes_no_failover",
        Spec {
            nodes: 3,
            client_addrs: 10,
            ..Spec::default()
        },
    ) else {
        return;
    };
    let before: Vec<_> = (0..3).map(|i| t.status(i).expect("status")).collect();
    for i in 0..3 {
        t.nft(
            i,
            &format!(
                "table inet loss {{\n  chain in {{\n    type filter hook input priority 0;\n\
                 \x20   udp dport {HB_PORT} numgen random mod 5 == 0 counter drop\n  }}\n}}\n"
            ),
        );
    }
    let received_before: u64 = before[0]
        .heartbeat
        .counters
        .received
        .values()
        .flatten()
        .sum();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(60));
    // A peer is lost when loss_threshold (8) heartbeats in a row never arrive: at 20 % random
    // loss that happens to one of the six directions about once an hour (1.5 % of runs), and
    // then the failover is the right one. Anything less must change nothing.
    const THRESHOLD: u64 = 8;
    let statuses: Vec<_> = (0..3).map(|i| t.status(i).expect("status")).collect();
    let longest: Vec<u64> = statuses
        .iter()
        .map(|s| {
            s.heartbeat
                .counters
                .longest_gap
                .iter()
                .filter(|(peer, _)| **peer != s.node)
                .flat_map(|(_, v)| v.iter().copied())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let whole_window_lost = longest.iter().any(|&l| l >= THRESHOLD);
    for ((s, before), longest) in statuses.iter().zip(&before).zip(&longest) {
        let received: u64 = s.heartbeat.counters.received.values().flatten().sum();
        let sent: u64 = s.heartbeat.counters.sent.values().flatten().sum();
        eprintln!(
            "{}: heartbeats sent {sent}, accepted {received}, at most {longest} in a row lost, \
             peers declared lost {}",
            s.node, s.heartbeat.counters.peers_lost
        );
        if *longest >= THRESHOLD {
            continue;
        }
        assert_eq!(
            s.heartbeat.counters.peers_lost, 0,
            "{}: a peer was declared lost with at most {longest} heartbeats in a row lost",
            s.node
        );
        if whole_window_lost {
            // Another member really lost a window's worth: its failover moved buckets.
            continue;
        }
        for (m, b) in s.members.iter().zip(&before.members) {
            assert_eq!(m.state, "serving", "{}: {m:?}", s.node);
            assert_eq!(m.buckets, b.buckets, "{}: buckets moved", s.node);
        }
    }
    // Runs of three and more are all but certain in a minute at 20 % (about eight a minute per
    // direction): farmd measured them (metrics: farm_heartbeats_longest_gap).
    assert!(
        longest[0] >= 3,
        "n1's longest run of lost heartbeats: {}",
        longest[0]
    );
    // The loss really happened: n1 accepted about 80% of what two peers at 20 Hz sent.
    let s = t.status(0).expect("status");
    let received: u64 = s
        .heartbeat
        .counters
        .received
        .values()
        .flatten()
        .sum::<u64>()
        - received_before;
    let offered = 2.0 * 20.0 * started.elapsed().as_secs_f64();
    let share = received as f64 / offered;
    eprintln!(
        "n1 accepted {received} of ~{offered:.0} heartbeats ({:.0}%)",
        share * 100.0
    );
    assert!(
        (0.7..0.9).contains(&share),
        "loss not applied as configured: {share:.2}"
    );
    // And farmd counted it: the gaps in each peer's sequence numbers (metrics:
    // farm_heartbeats_lost_total).
    let lost: u64 = s.heartbeat.counters.lost.values().flatten().sum();
    let received_all: u64 = s.heartbeat.counters.received.values().flatten().sum();
    let lost_share = lost as f64 / (lost + received_all) as f64;
    eprintln!(
        "n1 counted {lost} heartbeats lost ({:.0}%)",
        lost_share * 100.0
    );
    assert!(
        (0.1..0.3).contains(&lost_share),
        "lost heartbeats counted: {lost} of {}",
        lost + received_all
    );
}

#[test]
fn link_cut_failover_under_load_survivors_see_no_error() {
    let Some(t) = Topology::started(
        "link_cut_failover_under_load_survivors_see_no_error",
        Spec {
            nodes: 3,
            client_addrs: 300,
            ..Spec::default()
        },
    ) else {
        return;
    };
    let (victims, survivors) = t.clients_of("n2", 8);

    // Long keep-alive connections held by the survivors: a request every 20 ms on each.
    let keepalive = traffic::KeepAlives::start(&t.client, &survivors, t.vip4(TCP_PORT));
    std::thread::sleep(Duration::from_millis(500));

    // Cut n2's link at the switch.
    let cut_at = Instant::now();
    t.switch.ip(&["link", "set", "n2", "down"]);
    let mut recovered = None;
    let mut k = 0;
    while cut_at.elapsed() < Duration::from_secs(5) {
        let src = victims[k % victims.len()];
        k += 1;
        let a = t.client.run({
            let dst = t.vip4(TCP_PORT);
            move || traffic::tcp_request(src, dst, Duration::from_millis(100))
        });
        if a.node.is_some() {
            recovered = Some(cut_at.elapsed());
            break;
        }
    }
    let recovered = recovered.expect("n2's clients were never taken over");
    std::thread::sleep(Duration::from_millis(500));
    let (requests, errors) = keepalive.finish();
    eprintln!(
        "link cut: n2's clients served again after {:.0} ms; {requests} keep-alive requests on \
         the survivors, {errors} errors",
        recovered.as_secs_f64() * 1000.0,
    );
    assert!(recovered < Duration::from_secs(2), "{recovered:?}");
    assert!(requests > 100);
    assert_eq!(errors, 0, "survivors' connections saw errors");
    // All of n2's clients are now served by n1 or n3, as the survivors predict.
    let now = t.owners(0, &t.clients4());
    assert!(now.values().all(|o| o != "n2"));
    every_client_answered_once(&t, &now);
}

#[test]
fn cut_node_comes_back_without_breaking_a_connection() {
    let Some(t) = Topology::started(
        "cut_node_comes_back_without_breaking_a_connection",
        Spec {
            nodes: 3,
            client_addrs: 300,
            ..Spec::default()
        },
    ) else {
        return;
    };
    let before = t.owners(0, &t.clients4());
    let (victims, others) = t.clients_of("n2", 4);

    // n2 is cut off; n1 and n3 take its clients.
    t.switch.ip(&["link", "set", "n2", "down"]);
    t.wait_converged(&[0, 2], Duration::from_secs(10));

    // Long connections opened during the outage: n2's clients are now held by n1 and n3.
    let held: Vec<IpAddr> = victims.iter().take(6).chain(&others).copied().collect();
    let keepalive = traffic::KeepAlives::start(&t.client, &held, t.vip4(TCP_PORT));
    std::thread::sleep(Duration::from_millis(500));

    // n2 comes back: it takes its buckets over by handover.
    t.switch.ip(&["link", "set", "n2", "up"]);
    // Wait until both previous owners hand over; then n2, seeing them ready, takes the
    // buckets over within a few heartbeats. (Before that, n1 and n3 still own them: new
    // connections go there, never to two members.)
    let deadline = Instant::now() + Duration::from_secs(10);
    let progress = loop {
        let (s1, s3) = (t.status(0).expect("status"), t.status(2).expect("status"));
        if let (Some(h), Some(_)) = (s1.handover, s3.handover) {
            break h;
        }
        assert!(
            Instant::now() < deadline,
            "n2 never rejoined: {:?}",
            s1.members
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(300));
    // While n1 still holds connections of n2's clients, new connections go to n2.
    let fresh: Vec<(IpAddr, SocketAddr)> = victims
        .iter()
        .skip(6)
        .take(20)
        .map(|&a| (a, t.vip4(TCP_PORT)))
        .collect();
    let answers = traffic::tcp_requests(&t.client, fresh, 2, Duration::from_secs(3));
    for a in &answers {
        assert_eq!(
            a.node.as_deref(),
            Some("n2"),
            "new connection during the handover: {a:?}"
        );
    }
    let during = t.status(0).expect("status").handover;
    std::thread::sleep(Duration::from_millis(1000));
    let (requests, errors) = keepalive.finish();
    eprintln!(
        "rejoin: handover {progress:?}; while held: {during:?}; {requests} keep-alive requests, \
         {errors} errors"
    );
    assert!(requests > 100);
    assert_eq!(errors, 0, "a connection broke during the rejoin");
    let during = during.expect("the handover was still waiting for n1's connections");
    assert!(
        during.connections_left > 0 || during.waiting_for.iter().any(|m| m == "n3"),
        "{during:?}"
    );
    // With the long connections closed the move completes and n2 has its share back.
    t.wait_converged(&[0, 1, 2], Duration::from_secs(15));
    let after = t.owners(0, &t.clients4());
    assert_eq!(after, before, "n2 got exactly its old share back");
    every_client_answered_once(&t, &after);
}

/// `farmctl buckets` accounts for every bucket and sees every member's traffic;
/// `farmctl simulate-failure` predicts exactly where a member's buckets go when it fails; the
/// metrics endpoint has the key series, and they move.
#[test]
fn simulate_failure_predicts_the_real_failover() {
    let Some(t) = Topology::started(
        "simulate_failure_predicts_the_real_failover",
        Spec {
            nodes: 3,
            client_addrs: 60,
            extra_config: "\n[metrics]\nenabled = true\n".into(),
            ..Spec::default()
        },
    ) else {
        return;
    };
    let reqs: Vec<(IpAddr, SocketAddr)> = t
        .clients4()
        .iter()
        .map(|&a| (a, t.vip4(TCP_PORT)))
        .collect();
    for a in traffic::tcp_requests(&t.client, reqs, 2, Duration::from_secs(3)) {
        assert!(a.node.is_some(), "{a:?}");
    }
    let json = |i: usize, args: &[&str]| -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let o = t.farmctl(i, &all);
        assert!(o.status.success(), "farmctl {args:?}: {o:?}");
        serde_json::from_slice(&o.stdout).expect("farmctl --json")
    };
    let b = json(0, &["buckets", "--bucket", "7"]);
    let members = b["members"].as_array().expect("members");
    let total: u64 = members.iter().map(|m| m["buckets"].as_u64().unwrap()).sum();
    assert_eq!(total, 65536);
    assert!(
        members.iter().all(|m| m["packets"].as_u64().unwrap() > 0),
        "n1 sees every member's traffic: {members:?}"
    );
    assert_eq!(b["owners"].as_array().unwrap().len(), 65536);
    assert_eq!(b["detail"]["bucket"], 7);
    let m0 = t.metrics(0);
    for key in [
        "farm_up{node=\"n1\"}",
        "farm_quorum",
        "farm_member_state{member=\"n2\",state=\"serving\"}",
        "farm_failovers_total",
        "farm_healthy",
    ] {
        assert!(m0.contains_key(key), "{key} missing: {m0:#?}");
    }
    assert_eq!(
        m0["farm_buckets_owned{member=\"n2\"}"],
        members[1]["buckets"].as_u64().unwrap() as f64
    );
    assert!(m0["farm_member_packets_total{member=\"n3\"}"] > 0.0);
    assert!(m0["farm_xdp_total{counter=\"accepted_packets\"}"] > 0.0);
    let hb = "farm_heartbeats_received_total{peer=\"n3\",network=\"0\"}";
    assert!(m0[hb] > 0.0);
    assert_eq!(m0["farm_failovers_total"], 0.0);

    let sim = json(0, &["simulate-failure", "n2"]);
    let n2_buckets = members[1]["buckets"].as_u64().unwrap();
    assert_eq!(sim["buckets"].as_u64(), Some(n2_buckets));
    assert_eq!(sim["others_moved"], 0);
    assert_eq!(sim["quorum_after"], true);
    let predicted: BTreeMap<String, u64> = sim["moves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m[0].as_str().unwrap().to_string(), m[1].as_u64().unwrap()))
        .collect();
    assert_eq!(predicted.values().sum::<u64>(), n2_buckets);

    // Now n2 really fails: its buckets go exactly where the simulation said.
    let before: Vec<Option<u64>> = b["owners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64())
        .collect();
    t.switch.ip(&["link", "set", "n2", "down"]);
    t.wait_converged(&[0, 2], Duration::from_secs(10));
    let after = json(0, &["buckets"]);
    let mut moved: BTreeMap<String, u64> = BTreeMap::new();
    for (was, now) in before.iter().zip(after["owners"].as_array().unwrap()) {
        if *was == Some(1) {
            let id = format!("n{}", now.as_u64().unwrap() + 1);
            *moved.entry(id).or_default() += 1;
        } else {
            assert_eq!(*was, now.as_u64(), "a bucket of n1 or n3 moved");
        }
    }
    assert_eq!(moved, predicted);
    // The metrics moved with it.
    let m1 = t.metrics(0);
    assert_eq!(m1["farm_buckets_owned{member=\"n2\"}"], 0.0);
    assert_eq!(m1["farm_failovers_total"], 1.0);
    let took = m1["farm_last_failover_seconds{member=\"n2\"}"];
    assert!((0.3..3.0).contains(&took), "failover took {took} s");
    assert!(m1[hb] > m0[hb], "heartbeats from n3 keep coming");
    assert!(m1.contains_key("farm_member_state{member=\"n2\",state=\"lost\"}"));
    let status = t.status(0).expect("status");
    assert_eq!(status.last_failover.expect("last failover").member, "n2");
    // The simulation of a member that owns nothing now says so.
    let o = t.farmctl(0, &["simulate-failure", "n2"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("owns no bucket"));
    let o = t.farmctl(0, &["simulate-failure", "nope"]);
    assert_eq!(o.status.code(), Some(1));
}
