//! The farm changes shape and version while it serves: members stopped one by one down to the
//! last keep the service (planned departures do not count against quorum) while a partition
//! still serves on one side only, and a rolling upgrade from the previous release (built from
//! its git tag) fails no request.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use farm_tests::{
    previous,
    topology::{Spec, TCP_PORT, Topology, UDP_PORT, node_addr4},
    traffic::{self, KeepAlives, NewConnections, UdpStream},
};

const HB_PORT: u16 = 7946;

/// Keep-alive and new-connection load on the VIP from the client's addresses.
fn load(t: &Topology) -> (KeepAlives, NewConnections) {
    t.web_load(30, 3, Duration::from_millis(5))
}

/// Stops the load and asserts that no request failed; returns a line for the log.
fn no_request_failed(keepalive: KeepAlives, fresh: NewConnections, what: &str) {
    let (requests, errors, reconnects) = keepalive.finish_all();
    let report = fresh.finish();
    eprintln!(
        "{what}: keep-alive {requests} requests, {errors} errors, {reconnects} clean \
         reconnects; new connections {} answered {:?}, {} failed {:?}, {} slow",
        report.answered, report.by_node, report.failed, report.errors, report.slow
    );
    assert_eq!(errors, 0, "{what}: keep-alive requests failed");
    assert_eq!(
        report.failed, 0,
        "{what}: new connections failed: {:?}",
        report.errors
    );
    assert!(requests > 200, "{what}: the keep-alive load ran");
    assert!(report.answered > 200, "{what}: the new-connection load ran");
}

/// Every client address gets one answer from the VIP, each from the node `t`'s node `from`
/// predicts; returns how many answered per node. With no other load running, also checks
/// that each connection was accepted exactly once.
fn every_client_answered_by_its_owner(t: &Topology, from: usize) -> Vec<(String, usize)> {
    answered_by_owners(t, from, true)
}

fn answered_by_owners(t: &Topology, from: usize, quiet: bool) -> Vec<(String, usize)> {
    let clients = t.clients4();
    let predicted = t.owners(from, &clients);
    let reqs: Vec<(IpAddr, std::net::SocketAddr)> =
        clients.iter().map(|&a| (a, t.vip4(TCP_PORT))).collect();
    let before = t.tcp_accepts();
    let answers = traffic::tcp_requests(&t.client, reqs, 4, Duration::from_secs(3));
    let mut by_node: Vec<(String, usize)> = Vec::new();
    for a in &answers {
        assert_eq!(a.node.as_ref(), predicted.get(&a.src), "{a:?}");
        let node = a.node.clone().expect("answered");
        match by_node.iter_mut().find(|(n, _)| *n == node) {
            Some(e) => e.1 += 1,
            None => by_node.push((node, 1)),
        }
    }
    if quiet {
        assert_eq!(
            (t.tcp_accepts() - before) as usize,
            clients.len(),
            "each client accepted exactly once"
        );
    }
    by_node
}

#[test]
fn members_stopped_one_by_one_down_to_the_last_keep_the_service() {
    let Some(mut t) = Topology::started(
        "members_stopped_one_by_one_down_to_the_last_keep_the_service",
        Spec {
            nodes: 5,
            client_addrs: 200,
            keepalive_requests: Some(50),
            ..Spec::default()
        },
    ) else {
        return;
    };
    let (keepalive, fresh) = load(&t);
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    for stop in (1..5).rev() {
        let name = t.nodes[stop].name.clone();
        let exit = t.signal_farmd(stop, libc::SIGTERM).expect("farmd running");
        assert!(exit.success(), "farmd on {name} exited with {exit}");
        let left: Vec<usize> = (0..stop).collect();
        t.wait_converged(&left, Duration::from_secs(20));
        for &i in &left {
            let s = t.status(i).expect("status");
            assert!(s.quorum, "{} lost quorum after {name} left", s.node);
            assert!(
                s.departed.contains(&name),
                "{} does not count {name} as departed: {:?}",
                s.node,
                s.departed
            );
        }
        eprintln!(
            "{name} stopped at {:.1} s; {} member(s) serve",
            started.elapsed().as_secs_f64(),
            left.len()
        );
    }
    no_request_failed(
        keepalive,
        fresh,
        "five members stopped one by one down to one",
    );
    let log = t.log(0);
    assert!(!log.contains("lost quorum"), "n1 lost quorum:\n{log}");
    // The last one serves every client.
    let by_node = every_client_answered_by_its_owner(&t, 0);
    assert_eq!(by_node, vec![("n1".to_string(), t.clients4().len())]);
    // A member that comes back counts again.
    t.start_farmd(1);
    t.wait_converged(&[0, 1], Duration::from_secs(20));
    let s = t.status(0).expect("status");
    assert!(!s.departed.contains(&"n2".to_string()), "{:?}", s.departed);
    assert_eq!(s.departed, vec!["n3", "n4", "n5"]);
}

#[test]
fn a_two_three_heartbeat_partition_serves_on_the_three_side_only() {
    let Some(t) = Topology::started(
        "a_two_three_heartbeat_partition_serves_on_the_three_side_only",
        Spec {
            nodes: 5,
            client_addrs: 200,
            ..Spec::default()
        },
    ) else {
        return;
    };
    // n1 and n2 stop hearing n3, n4 and n5 and the other way round; the data path stays.
    let far: Vec<String> = (2..5).map(|j| node_addr4(j).to_string()).collect();
    let far = far.join(", ");
    for i in 0..2 {
        t.nft(
            i,
            &format!(
                "table inet cut {{\n  chain in {{\n    type filter hook input priority 0;\n    \
                 ip saddr {{ {far} }} udp dport {HB_PORT} drop\n  }}\n  chain out {{\n    \
                 type filter hook output priority 0;\n    ip daddr {{ {far} }} udp dport \
                 {HB_PORT} drop\n  }}\n}}\n"
            ),
        );
    }
    t.wait_converged(&[2, 3, 4], Duration::from_secs(10));
    for i in 0..2 {
        let deadline = Instant::now() + Duration::from_secs(5);
        while t.status(i).expect("status").quorum {
            assert!(
                Instant::now() < deadline,
                "n{} kept quorum on the side of two",
                i + 1
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let s = t.status(i).expect("status");
        assert!(
            s.departed.is_empty(),
            "lost is not departed: {:?}",
            s.departed
        );
    }
    // Only the three serve, and each client is answered once, by its owner among them.
    std::thread::sleep(Duration::from_secs(1));
    let by_node = every_client_answered_by_its_owner(&t, 2);
    eprintln!("2+3 partition: answers by node {by_node:?}");
    assert!(
        by_node
            .iter()
            .all(|(n, _)| ["n3", "n4", "n5"].contains(&n.as_str())),
        "{by_node:?}"
    );
    assert_eq!(by_node.len(), 3, "{by_node:?}");
}

#[test]
fn rolling_upgrade_from_the_previous_release_fails_no_request() {
    if !farm_tests::require_root("rolling_upgrade_from_the_previous_release_fails_no_request") {
        return;
    }
    let (old_bins, tag) = match previous::build_previous() {
        Ok(b) => b,
        Err(e) => panic!("the previous release could not be built: {e}"),
    };
    let mut t = Topology::build(Spec {
        nodes: 3,
        client_addrs: 200,
        keepalive_requests: Some(50),
        ..Spec::default()
    });
    for n in &mut t.nodes {
        n.binary = Some(old_bins.join("farmd"));
    }
    t.start_all();
    let s = t.status(0).expect("status");
    assert_eq!(
        s.version, "",
        "farm 0.1 does not report a version: {tag} runs"
    );
    let before = t.owners(0, &t.clients4());
    let (keepalive, fresh) = load(&t);
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    for i in 0..3 {
        let name = t.nodes[i].name.clone();
        let exit = t.signal_farmd(i, libc::SIGTERM).expect("farmd running");
        assert!(exit.success(), "{tag} farmd on {name} exited with {exit}");
        t.nodes[i].binary = None;
        t.start_farmd(i);
        t.wait_converged(&[0, 1, 2], Duration::from_secs(30));
        // The upgraded member speaks v5 to the members still on the old release and v6 to
        // the upgraded ones.
        let s = t.status(i).expect("status");
        eprintln!(
            "{name}: {:?}",
            s.members
                .iter()
                .map(|m| (&m.id, m.heartbeat_version))
                .collect::<Vec<_>>()
        );
        assert_eq!(s.version, env!("CARGO_PKG_VERSION"));
        for m in s.members.iter().filter(|m| !m.this_node) {
            let j: usize = m.id[1..].parse::<usize>().expect("nN") - 1;
            let want = if j <= i { 6 } else { 5 };
            assert_eq!(m.heartbeat_version, want, "{name} speaks to {}", m.id);
        }
        // Until the last member runs this release, every member serves farm 0.1's map.
        if i < 2 {
            for j in 0..3 {
                assert_eq!(
                    t.owners(j, &t.clients4()),
                    before,
                    "n{} serves another map than {tag}'s while n3 runs {tag}",
                    j + 1
                );
            }
        }
        eprintln!(
            "{name} upgraded from {tag} at {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    // Every member runs this release: the farm moves to its map by handover, under the load.
    let clients = t.clients4();
    farm_tests::wait_until(
        "the move to this release's bucket map",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || (t.owners(0, &clients) != before).then_some(()),
    );
    t.wait_converged(&[0, 1, 2], Duration::from_secs(30));
    eprintln!(
        "moved to the new map and converged at {:.1} s",
        started.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(1));
    no_request_failed(
        keepalive,
        fresh,
        &format!("rolling upgrade of 3 members from {tag}"),
    );
    // Then the farm has moved, by handover, to this release's map (rendezvous first choices),
    // and every member agrees on it.
    let after = t.owners(0, &t.clients4());
    let moved = after
        .iter()
        .filter(|(c, o)| before.get(*c) != Some(*o))
        .count();
    eprintln!(
        "clients whose owner changed with the new assignment: {moved} of {}",
        after.len()
    );
    assert!(moved > 0, "the farm still serves {tag}'s map");
    for j in 1..3 {
        assert_eq!(t.owners(j, &t.clients4()), after);
    }
    for i in 0..3 {
        let s = t.status(i).expect("status");
        assert!(
            s.members.iter().all(|m| m.heartbeat_version == 6),
            "after the upgrade everyone speaks v6: {:?}",
            s.members
        );
        let c = &s.heartbeat.counters.rejected;
        eprintln!(
            "{}: older copies dropped {:?}, unreadable versions {:?}",
            s.node,
            c.get("superseded"),
            c.get("bad_version")
        );
    }
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `farmctl reload` on each of `nodes`; each must succeed.
fn reload_all(t: &Topology, nodes: &[usize]) -> Vec<String> {
    nodes
        .iter()
        .map(|&i| {
            let o = t.farmctl(i, &["reload"]);
            assert!(o.status.success(), "reload on n{}: {}", i + 1, text(&o));
            text(&o)
        })
        .collect()
}

/// Buckets whose owner differs, and the owners they went to.
fn moves(before: &[Option<String>], after: &[Option<String>]) -> (usize, Vec<String>) {
    let mut to: Vec<String> = Vec::new();
    let mut n = 0;
    for (a, b) in before.iter().zip(after) {
        if a != b {
            n += 1;
            let b = b.clone().unwrap_or_else(|| "(nobody)".into());
            if !to.contains(&b) {
                to.push(b);
            }
        }
    }
    to.sort();
    (n, to)
}

fn owned_by(owners: &[Option<String>], ids: &[&str]) -> usize {
    owners
        .iter()
        .filter(|o| o.as_deref().is_some_and(|o| ids.contains(&o)))
        .count()
}

#[test]
fn members_added_and_removed_live_under_load_move_only_their_buckets() {
    if !farm_tests::require_root(
        "members_added_and_removed_live_under_load_move_only_their_buckets",
    ) {
        return;
    }
    let mut t = Topology::build(Spec {
        nodes: 5,
        client_addrs: 200,
        keepalive_requests: Some(50),
        ..Spec::default()
    });
    t.set_members(&[0, 1, 2]);
    for i in 0..3 {
        t.start_farmd(i);
    }
    t.wait_converged(&[0, 1, 2], Duration::from_secs(20));
    let (keepalive, fresh) = load(&t);
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();

    // 3 -> 5: n4 and n5 start with the new list; until the others have it they refuse their
    // heartbeats and nothing moves.
    let three = t.bucket_owners(0);
    t.set_members(&[0, 1, 2, 3, 4]);
    for i in 3..5 {
        let child = t.spawn_farmd(i, &t.nodes[i].config.clone());
        t.nodes[i].farmd = Some(child);
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        t.bucket_owners(0),
        three,
        "moved before the others had the list"
    );
    let s = t.status(3).expect("status of n4");
    assert!(!s.quorum, "n4 hears nobody yet: {:?}", s.members);
    // Refused and counted: by the data plane (their addresses are no member's on n1's list),
    // else by farmd.
    let s = t.status(0).expect("status");
    let refused = s
        .counters
        .get("heartbeat_foreign_dropped")
        .copied()
        .unwrap_or(0)
        + s.heartbeat.counters.rejected["unknown_sender"];
    assert!(
        refused > 0,
        "n1 counts the heartbeats of members not in its list"
    );
    let out = reload_all(&t, &[0, 1, 2]);
    assert!(out[0].contains("member added: n4"), "{}", out[0]);
    t.wait_converged(&[0, 1, 2, 3, 4], Duration::from_secs(30));
    let five = t.bucket_owners(0);
    let (moved, to) = moves(&three, &five);
    let minimum = owned_by(&five, &["n4", "n5"]);
    eprintln!(
        "3 -> 5 at {:.1} s: {moved} buckets moved (minimum {minimum}, ideal {}), to {to:?}",
        started.elapsed().as_secs_f64(),
        65536 * 2 / 5
    );
    assert_eq!(
        to,
        vec!["n4", "n5"],
        "buckets moved between the old members"
    );
    assert!(
        moved as f64 <= minimum as f64 * 1.01,
        "{moved} vs {minimum}"
    );
    for i in 1..5 {
        assert_eq!(t.bucket_owners(i), five, "n{} serves another map", i + 1);
    }
    let by_node = answered_by_owners(&t, 0, false);
    assert_eq!(by_node.len(), 5, "{by_node:?}");

    // 5 -> 4: removing a running member is refused; once n5 stopped (its buckets go to the
    // others), removing it from the list moves nothing more.
    t.set_members(&[0, 1, 2, 3]);
    let o = t.farmctl(0, &["reload"]);
    assert!(
        !o.status.success(),
        "removing a running member: {}",
        text(&o)
    );
    assert!(text(&o).contains("n5 still runs"), "{}", text(&o));
    let exit = t.signal_farmd(4, libc::SIGTERM).expect("n5 runs");
    assert!(exit.success());
    t.wait_converged(&[0, 1, 2, 3], Duration::from_secs(30));
    let stopped = t.bucket_owners(0);
    let (moved, _) = moves(&five, &stopped);
    let minimum = owned_by(&five, &["n5"]);
    assert_eq!(moved, minimum, "only n5's buckets moved");
    let out = reload_all(&t, &[0, 1, 2, 3]);
    assert!(out[0].contains("member removed: n5"), "{}", out[0]);
    farm_tests::wait_until(
        "every member on the list of four",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            (0..4)
                .all(|i| t.status(i).is_ok_and(|s| s.members.len() == 4))
                .then_some(())
        },
    );
    t.wait_converged(&[0, 1, 2, 3], Duration::from_secs(30));
    let four = t.bucket_owners(0);
    assert_eq!(
        moves(&stopped, &four).0,
        0,
        "removing n5 from the list moved buckets"
    );
    eprintln!(
        "5 -> 4 at {:.1} s: {minimum} buckets moved (n5's), none by the removal itself",
        started.elapsed().as_secs_f64()
    );

    // The members added live stay after restarts (the config files carry them).
    for i in [3, 0] {
        let exit = t.signal_farmd(i, libc::SIGTERM).expect("running");
        assert!(exit.success());
        t.start_farmd(i);
        t.wait_converged(&[0, 1, 2, 3], Duration::from_secs(30));
    }
    assert_eq!(t.bucket_owners(1), four, "the same map after the restarts");
    answered_by_owners(&t, 1, false);
    std::thread::sleep(Duration::from_secs(1));
    no_request_failed(keepalive, fresh, "3 -> 5 -> 4 members live");
}

/// What a peer would log if it noticed another member go or come back, or buckets move.
const MEMBERSHIP_NEWS: [&str; 5] = [
    "member lost",
    "member left",
    "member heard again",
    "is moving buckets",
    "lost quorum",
];

#[test]
fn farmd_upgraded_in_place_twenty_times_loses_nothing() {
    let Some(mut t) = Topology::started(
        "farmd_upgraded_in_place_twenty_times_loses_nothing",
        Spec {
            nodes: 3,
            client_addrs: 120,
            ..Spec::default()
        },
    ) else {
        return;
    };
    // Two farmd files: this build's and a copy, taken in turn (each upgrade execs the other).
    let a = farm_tests::bin("farmd");
    let b = t.dir.join("farmd-b");
    std::fs::copy(&a, &b).expect("copy farmd");

    // A failed new binary leaves the old farmd serving, untouched.
    let before = t.status(0).expect("status");
    let o = t.upgrade_farmd(0, Some(std::path::Path::new("/bin/false")));
    assert!(!o.status.success(), "upgrade to /bin/false: {}", text(&o));
    eprintln!("upgrade to /bin/false: {}", text(&o).trim());
    let after = t.status(0).expect("status after a failed upgrade");
    assert_eq!(after.pid, before.pid, "the old farmd still answers");
    assert!(after.serving, "the old farmd still serves");
    assert_eq!(after.xdp_program_id, before.xdp_program_id);
    t.wait_converged(&[0, 1, 2], Duration::from_secs(10));

    let owners = t.bucket_owners(0);
    let failovers: Vec<u64> = (0..3)
        .map(|i| t.status(i).expect("status").failovers)
        .collect();
    let logs: Vec<usize> = (0..3).map(|i| t.log(i).len()).collect();
    // Heartbeats the peers counted lost (gaps in each member's sequence numbers).
    let hb_lost = |t: &Topology| -> u64 {
        (0..3)
            .map(|i| {
                let s = t.status(i).expect("status");
                s.heartbeat.counters.lost.values().flatten().sum::<u64>()
                    + s.heartbeat.counters.peers_lost
                    + s.heartbeat.counters.peers_left
            })
            .sum()
    };
    let hb_lost_before = hb_lost(&t);
    let links: Vec<u32> = (0..3)
        .map(|i| t.status(i).expect("status").xdp_link_id)
        .collect();
    assert!(links.iter().all(|&l| l != 0), "XDP link ids: {links:?}");

    // Long-lived connections (never closed by the server), new connections, and a
    // sequence-numbered UDP stream, every datagram answered or counted lost.
    let clients = t.clients4();
    let keepalive = KeepAlives::start(&t.client, &clients[..30], t.vip4(TCP_PORT));
    let fresh = NewConnections::start(
        &t.client,
        &clients[30..90],
        t.vip4(TCP_PORT),
        3,
        Duration::from_millis(5),
    );
    let udp = UdpStream::start(
        &t.client,
        &clients[90..],
        t.vip4(UDP_PORT),
        Duration::from_millis(2),
    );
    std::thread::sleep(Duration::from_secs(1));

    let started = Instant::now();
    let mut programs: Vec<u32> = (0..3)
        .map(|i| t.status(i).expect("status").xdp_program_id)
        .collect();
    for k in 0..20 {
        let i = k % 3;
        let binary = if (k / 3) % 2 == 0 { &b } else { &a };
        let old = t.farmd_pid(i).expect("farmd runs");
        let t0 = Instant::now();
        let o = t.upgrade_farmd(i, Some(binary));
        assert!(
            o.status.success(),
            "upgrade {k} of n{}: {}",
            i + 1,
            text(&o)
        );
        let s = t.status(i).expect("status after the upgrade");
        eprintln!(
            "upgrade {k:2} of n{}: {} ms, pid {old} -> {}, link {}, program {} -> {}",
            i + 1,
            t0.elapsed().as_millis(),
            s.pid,
            s.xdp_link_id,
            programs[i],
            s.xdp_program_id
        );
        assert_eq!(s.took_over_from, Some(old));
        assert!(s.serving, "n{} serves after the upgrade", i + 1);
        assert_eq!(s.xdp_link_id, links[i], "the XDP link is the same");
        assert_ne!(s.xdp_program_id, programs[i], "a new program in the link");
        programs[i] = s.xdp_program_id;
        std::thread::sleep(Duration::from_millis(300));
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));

    let udp = udp.finish();
    let (requests, errors, reconnects) = keepalive.finish_all();
    let report = fresh.finish();
    eprintln!(
        "20 upgrades in {:.1} s: UDP {} sent, {} answered, {} lost {:?}, {} answered twice, \
         by node {:?}; long-lived TCP {requests} requests, {errors} errors, {reconnects} \
         reconnects; new connections {} answered, {} failed {:?}",
        took.as_secs_f64(),
        udp.sent,
        udp.answered,
        udp.lost_total,
        udp.lost,
        udp.duplicated,
        udp.by_node,
        report.answered,
        report.failed,
        report.errors
    );
    assert!(udp.sent > 2000, "the UDP stream ran");
    assert_eq!(udp.lost_total, 0, "datagrams lost: {:?}", udp.lost);
    assert_eq!(udp.duplicated, 0, "datagrams answered twice");
    assert_eq!(udp.by_node.len(), 3, "every node answered its share");
    assert_eq!(errors, 0, "long-lived connections failed or were reset");
    assert_eq!(reconnects, 0, "long-lived connections were closed");
    assert_eq!(
        report.failed, 0,
        "new connections failed: {:?}",
        report.errors
    );
    assert!(requests > 500 && report.answered > 500, "the TCP load ran");

    // The peers saw nothing: no member lost, left or back, no bucket moved, no failover.
    for i in 0..3 {
        let log = t.log(i);
        let since = &log[logs[i].min(log.len())..];
        for news in MEMBERSHIP_NEWS {
            assert!(
                !since.contains(news),
                "n{} logged `{news}` during the upgrades:\n{since}",
                i + 1
            );
        }
        // Not even for a heartbeat: a map that moved buckets and moved them back (a new farmd
        // announcing itself joining, say) is a move too.
        for line in since.lines().filter(|l| l.contains("bucket map:")) {
            assert!(
                line.contains("takes over 0, hands over 0"),
                "n{} moved buckets during the upgrades: {line}\n{since}",
                i + 1
            );
        }
        assert_eq!(t.status(i).expect("status").failovers, failovers[i]);
        assert_eq!(t.bucket_owners(i), owners, "n{}'s map changed", i + 1);
    }
    assert_eq!(
        hb_lost(&t),
        hb_lost_before,
        "the peers counted heartbeats or members lost: the sequence was not handed over"
    );
    t.wait_converged(&[0, 1, 2], Duration::from_secs(10));
    // The farm still works as one: a stop drains and the others take over.
    let exit = t.signal_farmd(0, libc::SIGTERM).expect("n1 runs");
    assert!(exit.success(), "the upgraded farmd stops cleanly: {exit}");
    t.wait_converged(&[1, 2], Duration::from_secs(30));
}
