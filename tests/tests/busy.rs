//! The control plane under the conditions operators bring: a rolling restart of five members at
//! a web-like connection rate with thousands of TIME_WAIT sockets on every member, every core
//! saturated by ordinary processes, a farmd really frozen (SIGSTOP), and planned stops that
//! must not look like failures.

use std::time::{Duration, Instant};

use farm_tests::{
    busy::{Spinners, TimeWaits, time_wait},
    require_root,
    topology::{Spec, TCP_PORT, Topology},
    wait_until,
};

/// Log lines in which a member declared another lost (a failure), or lost quorum.
fn false_alarms(t: &Topology, nodes: &[usize]) -> Vec<String> {
    nodes
        .iter()
        .flat_map(|&i| {
            let name = t.nodes[i].name.clone();
            t.log(i)
                .lines()
                .filter(|l| l.contains("member lost") || l.contains("lost quorum"))
                .map(|l| format!("{name}: {l}"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Node `i`'s heartbeat lateness, for people: p99 and max, send and receive, in ms.
fn lateness(t: &Topology, i: usize) -> String {
    let s = t.status(i).expect("status");
    let l = &s.heartbeat.lateness;
    let ms = |us: u64| us as f64 / 1e3;
    format!(
        "{} send {:.1}/{:.1} ms, receive {:.1}/{:.1} ms",
        t.nodes[i].name,
        ms(l.send.quantile_us(0.99)),
        ms(l.send.max_us),
        ms(l.receive.quantile_us(0.99)),
        ms(l.receive.max_us)
    )
}

#[test]
fn rolling_restart_of_five_at_600_new_connections_per_second_fails_nothing() {
    let Some(mut t) = Topology::started(
        "rolling_restart_of_five_at_600_new_connections_per_second_fails_nothing",
        Spec {
            nodes: 5,
            client_addrs: 400,
            weights: vec![1, 1, 2, 1, 1],
            keepalive_requests: Some(50),
            ..Spec::default()
        },
    ) else {
        return;
    };
    let all: Vec<usize> = (0..5).collect();
    // Thousands of TIME_WAIT sockets on every member, kept there during the whole run.
    let fillers: Vec<TimeWaits> = t
        .nodes
        .iter()
        .map(|n| TimeWaits::start(&n.ns, 10_500))
        .collect();
    for n in &t.nodes {
        let tw = time_wait(&n.ns);
        assert!(tw >= 10_000, "{}: {tw} TIME_WAIT sockets", n.name);
    }
    let before = t.owners(0, &t.clients4());
    let (keepalive, fresh) = t.web_load(30, 16, Duration::from_millis(12));
    std::thread::sleep(Duration::from_secs(2));

    let started = Instant::now();
    let mut tw_min = u64::MAX;
    for i in 0..5 {
        let name = t.nodes[i].name.clone();
        for n in &t.nodes {
            tw_min = tw_min.min(time_wait(&n.ns));
        }
        let exit = t.signal_farmd(i, libc::SIGTERM).expect("farmd running");
        assert!(exit.success(), "farmd on {name} exited with {exit}");
        t.start_farmd(i);
        t.wait_converged(&all, Duration::from_secs(60));
        eprintln!(
            "{name} restarted and rejoined at {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let (requests, errors, reconnects) = keepalive.finish_all();
    let report = fresh.finish();
    let rate = report.answered as f64 / (took.as_secs_f64() + 3.0);
    let lateness: Vec<String> = all.iter().map(|&i| lateness(&t, i)).collect();
    eprintln!(
        "rolling restart of 5 members in {:.1} s, TIME_WAIT per member >= {tw_min}: keep-alive \
         {requests} requests, {errors} errors, {reconnects} clean reconnects; new connections \
         {} answered ({rate:.0}/s) {:?}, {} failed {:?}, {} slow; heartbeat lateness p99/max \
         (since each start): {}",
        took.as_secs_f64(),
        report.answered,
        report.by_node,
        report.failed,
        report.errors,
        report.slow,
        lateness.join(", ")
    );
    drop(fillers);
    assert_eq!(errors, 0, "keep-alive requests failed or were reset");
    assert_eq!(
        report.failed, 0,
        "new connections failed: {:?}",
        report.errors
    );
    assert!(tw_min >= 10_000, "TIME_WAIT per member fell to {tw_min}");
    assert!(
        rate >= 600.0,
        "the load did not reach 600 new connections/s ({rate:.0}/s)"
    );
    assert!(
        requests > 1000 && reconnects > 30,
        "the keep-alive load ran"
    );
    let alarms = false_alarms(&t, &all);
    assert!(
        alarms.is_empty(),
        "a running member was declared lost or quorum was lost:\n{}",
        alarms.join("\n")
    );
    // Planned stops: every member saw the four others leave, none failed.
    for i in all.iter().copied() {
        let s = t.status(i).expect("status");
        assert_eq!(s.failovers, 0, "{}: failovers counted", t.nodes[i].name);
    }
    // A SYN that arrives between the previous owner's release and the new owner's takeover
    // is retransmitted by the client a second later (no request fails; see the README's
    // known limits). A few per thousand at most; many would mean a takeover waits for
    // something.
    assert!(
        report.slow * 1000 <= report.answered,
        "{} of {} connections stalled a second: {:#?}",
        report.slow,
        report.answered,
        report.slow_samples
    );
    assert_eq!(
        t.owners(0, &t.clients4()),
        before,
        "every member has its share back"
    );
}

#[test]
fn a_saturated_host_is_not_a_dead_host() {
    let Some(t) = Topology::started(
        "a_saturated_host_is_not_a_dead_host",
        Spec {
            nodes: 5,
            client_addrs: 200,
            ..Spec::default()
        },
    ) else {
        return;
    };
    let all: Vec<usize> = (0..5).collect();
    let (keepalive, fresh) = t.web_load(20, 4, Duration::from_millis(10));
    // Every core of every member busy: as many spinners per member as the machine has cores,
    // ordinary processes at normal priority.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let namespaces: Vec<&farm_tests::netns::Netns> = t.nodes.iter().map(|n| &n.ns).collect();
    let spinners = Spinners::start(&namespaces, cores);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_secs(5));
        let alarms = false_alarms(&t, &all);
        assert!(
            alarms.is_empty(),
            "with {} spinners on {cores} cores, after {:.0} s:\n{}",
            spinners.count(),
            started.elapsed().as_secs_f64(),
            alarms.join("\n")
        );
    }
    let n = spinners.count();
    drop(spinners);
    let (requests, errors, _) = keepalive.finish_all();
    let report = fresh.finish();
    let lateness: Vec<String> = all.iter().map(|&i| lateness(&t, i)).collect();
    eprintln!(
        "60 s with {n} spinners on {cores} cores: keep-alive {requests} requests, {errors} \
         errors; new connections {} answered, {} failed; heartbeat lateness p99/max: {}",
        report.answered,
        report.failed,
        lateness.join(", ")
    );
    let alarms = false_alarms(&t, &all);
    assert!(alarms.is_empty(), "{}", alarms.join("\n"));
    for &i in &all {
        let s = t.status(i).expect("status");
        assert!(s.quorum, "{} lost quorum", t.nodes[i].name);
        assert_eq!(s.failovers, 0, "{}: failovers counted", t.nodes[i].name);
        assert_eq!(
            s.heartbeat.counters.peers_lost, 0,
            "{}: peers declared lost",
            t.nodes[i].name
        );
    }
    assert!(requests > 100, "the keep-alive load ran");
    t.wait_converged(&all, Duration::from_secs(10));
}

#[test]
fn a_frozen_farmd_is_declared_lost_within_the_loss_window() {
    let Some(t) = Topology::started(
        "a_frozen_farmd_is_declared_lost_within_the_loss_window",
        Spec {
            nodes: 3,
            client_addrs: 60,
            ..Spec::default()
        },
    ) else {
        return;
    };
    let (n2_clients, _) = t.clients_of("n2", 0);
    assert!(!n2_clients.is_empty());
    let pid = t.nodes[1].farmd.as_ref().expect("n2 runs").id() as i32;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let stopped = Instant::now();
    let loss_window = Duration::from_millis(400);
    let noticed = wait_until(
        "n1 takes the buckets of the frozen n2",
        Duration::from_secs(10),
        Duration::from_millis(5),
        || {
            let s = t.status(0).expect("n1 status");
            s.members
                .iter()
                .any(|m| m.id == "n2" && m.state != "serving")
                .then(|| stopped.elapsed())
        },
    );
    eprintln!(
        "n2 frozen by SIGSTOP: n1 took its buckets after {} ms",
        noticed.as_millis()
    );
    // Generous bound: the loss window plus a second of a noisy machine.
    assert!(
        noticed <= loss_window + Duration::from_secs(1),
        "declared lost after {noticed:?}"
    );
    assert!(t.log(0).contains("member lost"), "n1 logs the loss");
    // Its clients are served by the others meanwhile.
    let reqs: Vec<_> = n2_clients
        .iter()
        .take(10)
        .map(|&a| (a, t.vip4(TCP_PORT)))
        .collect();
    for a in farm_tests::traffic::tcp_requests(&t.client, reqs, 2, Duration::from_secs(3)) {
        assert!(
            matches!(a.node.as_deref(), Some("n1" | "n3")),
            "a client of the frozen n2: {a:?}"
        );
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    t.wait_converged(&[0, 1, 2], Duration::from_secs(30));
}

#[test]
fn a_planned_stop_is_peer_left_not_a_failover() {
    if !require_root("a_planned_stop_is_peer_left_not_a_failover") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("farm-hooks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("hook dir");
    let events = dir.join("events");
    let extra = format!(
        "\n[metrics]\nenabled = true\n\n[[hook]]\nevent = \"peer-lost\"\ncommand = [\"/bin/sh\", \
         \"-c\", \"echo $FARM_NODE $FARM_EVENT $FARM_MEMBER >> {0}\"]\n\n[[hook]]\nevent = \
         \"peer-left\"\ncommand = [\"/bin/sh\", \"-c\", \"echo $FARM_NODE $FARM_EVENT \
         $FARM_MEMBER >> {0}\"]\n",
        events.display()
    );
    let mut t = Topology::build(Spec {
        nodes: 3,
        client_addrs: 60,
        extra_config: extra,
        ..Spec::default()
    });
    t.start_all();
    let exit = t.signal_farmd(2, libc::SIGTERM).expect("n3 runs");
    assert!(exit.success());
    t.wait_converged(&[0, 1], Duration::from_secs(15));
    // Well past the loss window: a silent member would have been declared lost by now.
    std::thread::sleep(Duration::from_secs(1));
    let text = wait_until(
        "both survivors run a hook",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || {
            let text = std::fs::read_to_string(&events).unwrap_or_default();
            (text.lines().count() >= 2).then_some(text)
        },
    );
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    assert_eq!(
        lines,
        ["n1 peer-left n3", "n2 peer-left n3"],
        "hooks run: {text:?}"
    );
    for i in 0..2 {
        let m = t.metrics(i);
        assert_eq!(m.get("farm_failovers_total"), Some(&0.0), "{m:?}");
        assert_eq!(m.get("farm_peers_left_total"), Some(&1.0));
        let s = t.status(i).expect("status");
        assert_eq!(s.failovers, 0);
        assert_eq!(s.heartbeat.counters.peers_lost, 0);
        assert!(s.last_failover.is_none(), "{:?}", s.last_failover);
        assert!(t.log(i).contains("member left"), "{}", t.log(i));
        assert!(!t.log(i).contains("member lost"), "{}", t.log(i));
    }
    // And a member that dies is still a failure: peer-lost.
    let _ = std::fs::write(&events, "");
    t.signal_farmd(1, libc::SIGKILL);
    wait_until(
        "the peer-lost hook for the killed n2",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            std::fs::read_to_string(&events)
                .unwrap_or_default()
                .contains("n1 peer-lost n2")
                .then_some(())
        },
    );
    assert_eq!(t.status(0).expect("status").failovers, 1);
    let _ = std::fs::remove_dir_all(&dir);
}
