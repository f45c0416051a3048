//! Health checks on a real farm: a member whose HTTP check fails gives its buckets away within
//! the check's fall time (keeping connections while the application still answers, at once
//! when it does not) and takes them back after rise, while no request to the others fails.

use std::time::Duration;

use farm_tests::{
    require_root,
    topology::{Spec, TCP_PORT, Topology},
    traffic::{Health, HealthEndpoint, KeepAlives, NewConnections},
};

const HEALTH_PORT: u16 = 8081;

#[test]
fn failing_http_check_moves_buckets_away_and_back_without_a_failed_request() {
    if !require_root("failing_http_check_moves_buckets_away_and_back_without_a_failed_request") {
        return;
    }
    let events = std::env::temp_dir().join(format!("farm-hook-events-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&events);
    std::fs::create_dir_all(&events).expect("events dir");
    let hook = |event: &str| {
        format!(
            "\n[[hook]]\nevent = \"{event}\"\ncommand = [\"sh\", \"-c\", \"echo $FARM_EVENT $FARM_MEMBER >> {}/$FARM_NODE\"]\n",
            events.display()
        )
    };
    let mut t = Topology::build(Spec {
        nodes: 3,
        client_addrs: 200,
        extra_config: format!(
            "\n[[check]]\nname = \"web\"\nkind = \"http\"\nurl = \"http://127.0.0.1:{HEALTH_PORT}/health\"\n\
             body_contains = \"ok\"\ninterval_ms = 200\nrise = 2\nfall = 2\n{}{}{}",
            hook("became-active"),
            hook("unhealthy"),
            hook("healthy")
        ),
        // Servers end keep-alive connections after 50 requests, as NGINX does: a member coming
        // back gets its buckets as soon as the connections in them have turned over.
        keepalive_requests: Some(50),
        ..Spec::default()
    });
    let endpoints: Vec<HealthEndpoint> = t
        .nodes
        .iter()
        .map(|n| HealthEndpoint::start(&n.ns, HEALTH_PORT))
        .collect();
    t.start_all();
    let before = t.owners(0, &t.clients4());
    let (n1_clients, _) = t.clients_of("n1", 0);
    let clients = t.clients4();

    // Load: keep-alive connections of n1's clients (n1 stays healthy throughout), new
    // connections from every client.
    let held = KeepAlives::start(&t.client, &n1_clients[..10], t.vip4(TCP_PORT));
    let fresh = NewConnections::start(
        &t.client,
        &clients[100..],
        t.vip4(TCP_PORT),
        2,
        Duration::from_millis(10),
    );
    std::thread::sleep(Duration::from_millis(500));

    // n2's application answers 503: after fall (2 x 200 ms) it is unhealthy and hands its
    // buckets over keeping connections.
    endpoints[1].set(Health::Unavailable);
    let out = t.wait_own_state(1, "unhealthy", true, Duration::from_secs(10));
    let checks = t.farmctl(1, &["checks"]);
    assert_eq!(
        checks.status.code(),
        Some(1),
        "farmctl checks exits 1 when unhealthy"
    );
    let text = String::from_utf8_lossy(&checks.stdout).to_string();
    assert!(
        text.contains("UNHEALTHY") && text.contains("HTTP 503"),
        "{text}"
    );
    let now = t.owners(0, &clients);
    assert!(now.values().all(|o| o != "n2"), "n2 owns nothing");
    // Its clients are answered by n1 and n3 now.
    std::thread::sleep(Duration::from_millis(300));
    let accepts = t.node_accepts(1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        t.node_accepts(1),
        accepts,
        "n2 took a connection while unhealthy"
    );

    // Passing again: back after rise, through a connection-keeping handover.
    endpoints[1].set(Health::Ok);
    t.wait_converged(&[0, 1, 2], Duration::from_secs(15));
    assert_eq!(t.owners(0, &clients), before, "n2 has its share back");
    let first = fresh.finish();
    assert_eq!(
        first.failed, 0,
        "new connections failed while n2 left and came back: {:?}",
        first.errors
    );
    let fresh = NewConnections::start(
        &t.client,
        &clients[100..],
        t.vip4(TCP_PORT),
        2,
        Duration::from_millis(10),
    );

    // n3's application is gone (connections refused): it gives its buckets away at once.
    endpoints[2].set(Health::Down);
    let gone = t.wait_own_state(2, "unhealthy", true, Duration::from_secs(10));
    assert!(
        t.log(2)
            .contains("at once (the application does not answer)")
    );
    endpoints[2].set(Health::Ok);
    t.wait_converged(&[0, 1, 2], Duration::from_secs(15));

    let (requests, errors) = held.finish();
    let report = fresh.finish();
    eprintln!(
        "health: n2 out {:.0} ms after its check started failing (fall 2 x 200 ms, handover \
         keeping connections), n3 out {:.0} ms after its application stopped answering; \
         keep-alive {requests} requests, {errors} errors; new connections while n2 left and \
         came back: {} answered {:?}, {} failed, {} stalled; while n3 did: {} answered, {} \
         failed",
        out.as_secs_f64() * 1000.0,
        gone.as_secs_f64() * 1000.0,
        first.answered,
        first.by_node,
        first.failed,
        first.slow,
        report.answered,
        report.failed
    );
    // The notify hooks ran on n2 with the event in their environment.
    std::thread::sleep(Duration::from_millis(300));
    let n2_events = std::fs::read_to_string(events.join("n2")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&events);
    // Hooks run in the background, so two fired together may finish in either order.
    let mut seen: Vec<&str> = n2_events.lines().collect();
    seen.sort_unstable();
    assert_eq!(
        seen,
        [
            "became-active n2",
            "became-active n2",
            "healthy n2",
            "healthy n2",
            "unhealthy n2",
        ],
        "hook events on n2: {n2_events}"
    );
    assert_eq!(errors, 0, "connections held by n1 saw errors");
    assert!(requests > 100);
    assert!(first.answered > 100 && report.answered > 100);
    assert!(
        first.by_node.get("n2").is_some_and(|&n| n > 0),
        "n2 answered before and after"
    );
}
