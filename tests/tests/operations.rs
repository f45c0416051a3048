//! Operating a running farm: live reload (a weight change moves buckets without a failed
//! request, a broken file changes nothing) and the recovery drill (a member acts as crashed,
//! the probe client measures the RTO, the member comes back).

use std::time::{Duration, Instant};

use farm_daemon::control::{DrillReport, ReloadReport};
use farm_tests::{
    topology::{Spec, TCP_PORT, Topology},
    traffic::{KeepAlives, NewConnections, tcp_request},
};

/// A third VIP that a reload adds.
const NEW_VIP: &str = "10.201.0.101";

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn reload_moves_buckets_for_a_new_weight_without_a_failed_request() {
    let Some(mut t) = Topology::started(
        "reload_moves_buckets_for_a_new_weight_without_a_failed_request",
        Spec {
            nodes: 3,
            client_addrs: 200,
            keepalive_requests: Some(50),
            ..Spec::default()
        },
    ) else {
        return;
    };
    let clients = t.clients4();
    let before = t.owners(0, &clients);
    let held = KeepAlives::start(&t.client, &clients[..30], t.vip4(TCP_PORT));
    let fresh = NewConnections::start(
        &t.client,
        &clients[100..],
        t.vip4(TCP_PORT),
        2,
        Duration::from_millis(10),
    );
    std::thread::sleep(Duration::from_millis(500));

    // A broken file: refused with every field error, nothing changes.
    let good = std::fs::read_to_string(&t.nodes[0].config).expect("config");
    std::fs::write(
        &t.nodes[0].config,
        format!(
            "{good}\n[[check]]\nname = \"web\"\nkind = \"tcp\"\n\n[drill]\nrto_objective_ms = 0\n"
        ),
    )
    .expect("write config");
    let broken = t.farmctl(0, &["reload"]);
    let out = text(&broken);
    assert_eq!(broken.status.code(), Some(1), "{out}");
    assert!(
        out.contains("check[0].address") && out.contains("drill.rto_objective_ms"),
        "field errors named: {out}"
    );
    assert!(out.contains("nothing was changed"), "{out}");
    assert_eq!(t.owners(0, &clients), before, "nothing moved");
    // SIGHUP takes the same path: refused, logged with the field errors, nothing changes.
    let pid = t.nodes[0].farmd.as_ref().expect("farmd").id() as i32;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t.log(0).contains("reload refused") {
        assert!(Instant::now() < deadline, "SIGHUP: no refusal logged");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(t.log(0).contains("drill.rto_objective_ms"), "{}", t.log(0));
    assert!(t.status(0).is_ok(), "farmd runs on after a refused SIGHUP");
    assert_eq!(t.owners(0, &clients), before, "nothing moved");

    // n3 gets weight 2 (half the farm) and a VIP is added, in every member's file.
    t.spec.weights = vec![1, 1, 2];
    let vips = format!(
        "{}\n[[vip]]\naddress = \"{NEW_VIP}\"\nrules = [{{ protocol = \"tcp\", ports = {TCP_PORT} }}]\n",
        t.vip_section()
    );
    for i in 0..3 {
        std::fs::write(&t.nodes[i].config, t.config_for(i, &vips)).expect("write config");
    }
    let diff = t.farmctl(0, &["reload", "--diff", "--json"]);
    assert!(diff.status.success(), "{}", text(&diff));
    let d: ReloadReport = serde_json::from_slice(&diff.stdout).expect("reload report");
    assert!(!d.applied);
    assert!(
        d.changes.contains(&"weight of n3: 1 -> 2".to_string()),
        "{:?}",
        d.changes
    );
    assert_eq!(d.vips_added, vec![NEW_VIP.to_string()]);
    assert_eq!(d.waiting_for, vec!["n2".to_string(), "n3".to_string()]);
    let n3 = d.shares.iter().find(|s| s.member == "n3").expect("n3");
    // Rendezvous lists: within 3 % of an exact half; what moves is what n3 gains.
    assert!((n3.after as i64 - 32768).abs() <= 983, "{n3:?}");
    assert_eq!(
        d.buckets_moving,
        n3.after - n3.now,
        "only buckets that go to n3 move"
    );
    let human = text(&t.farmctl(0, &["reload", "--diff"]));
    assert!(
        human.contains("would change") && human.contains("AFTER"),
        "{human}"
    );
    assert_eq!(t.owners(0, &clients), before, "--diff moved nothing");

    // Reloaded one member after another: nothing moves until the last has the weights.
    let started = Instant::now();
    for i in 0..3 {
        let r = t.farmctl(i, &["reload"]);
        assert!(r.status.success(), "{}", text(&r));
        if i < 2 {
            std::thread::sleep(Duration::from_millis(700));
            assert_eq!(
                t.owners(0, &clients),
                before,
                "buckets moved before every member had the weights"
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = t.status(0).expect("status");
        let n3 = s.members.iter().find(|m| m.id == "n3").expect("n3");
        if (n3.buckets as i64 - 32768).abs() <= 983 && s.handover.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n3 never got half the buckets: {} (handover {:?})",
            n3.buckets,
            s.handover
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let moved_in = started.elapsed();
    let after = t.owners(0, &clients);
    let changed = clients.iter().filter(|c| before[c] != after[c]).count();
    assert!(changed > 20, "only {changed} of 200 clients changed member");
    // The added VIP answers.
    let vip: std::net::SocketAddr = format!("{NEW_VIP}:{TCP_PORT}").parse().expect("addr");
    let from = clients[0];
    let answer = t
        .client
        .run(move || tcp_request(from, vip, Duration::from_secs(3)));
    assert_eq!(
        answer.node.as_deref(),
        Some(after[&from].as_str()),
        "the VIP added by reload is answered by the client's member: {answer:?}"
    );

    let (requests, errors) = held.finish();
    let report = fresh.finish();
    eprintln!(
        "reload: weight of n3 1 -> 2 moved {} buckets ({changed} of 200 clients) {:.1} s after \
         the first reload; keep-alive {requests} requests, {errors} errors; new connections {} \
         answered, {} failed, {} stalled",
        d.buckets_moving,
        moved_in.as_secs_f64(),
        report.answered,
        report.failed,
        report.slow
    );
    assert_eq!(errors, 0, "keep-alive requests failed during the reload");
    assert_eq!(
        report.failed, 0,
        "new connections failed during the reload: {:?}",
        report.errors
    );
    assert!(requests > 100 && report.answered > 100);
}

#[test]
fn drill_measures_the_rto_of_a_crashed_member_and_brings_it_back() {
    let Some(t) = Topology::started(
        "drill_measures_the_rto_of_a_crashed_member_and_brings_it_back",
        Spec {
            nodes: 3,
            client_addrs: 50,
            extra_config: "\n[metrics]\nenabled = true\n\n[drill]\nprobe_addresses = \
                           [\"10.201.9.192/26\"]\nrto_objective_ms = 2000\n"
                .into(),
            ..Spec::default()
        },
    ) else {
        return;
    };
    let clients = t.clients4();
    let before = t.owners(0, &clients);

    // A member cannot drill itself, and scripts must say --yes.
    let own = t.farmctl(0, &["drill", "--member", "n1", "--yes"]);
    assert_eq!(own.status.code(), Some(1));
    assert!(text(&own).contains("run `farmctl drill --member n1` on another member"));
    let unconfirmed = t.farmctl(0, &["drill", "--member", "n2"]);
    assert_eq!(unconfirmed.status.code(), Some(1));
    assert!(text(&unconfirmed).contains("--yes"));

    let fresh = NewConnections::start(
        &t.client,
        &clients,
        t.vip4(TCP_PORT),
        1,
        Duration::from_millis(20),
    );
    let run = t.farmctl(0, &["drill", "--member", "n2", "--yes", "--json"]);
    let r: DrillReport = serde_json::from_slice(&run.stdout)
        .unwrap_or_else(|e| panic!("drill report ({e}): {}", text(&run)));
    eprintln!(
        "drill: RTO {:?} ms measured by the probe client {} (objective {} ms, timers allow ~{} \
         ms), {} probes, {} answered, {:.1} s in all",
        r.rto_ms,
        r.probe,
        r.objective_ms,
        r.expected_ms,
        r.probes_sent,
        r.probes_answered,
        r.elapsed_ms as f64 / 1000.0
    );
    assert!(run.status.success(), "{}", text(&run));
    assert_eq!(r.error, None);
    assert_eq!(r.passed, Some(true));
    // Consistent with the timers: at least most of the loss window (400 ms), and not much more
    // than it (generous: the machine may be busy).
    let rto = r.rto_ms.expect("rto");
    assert!(
        rto * 4 >= r.expected_ms * 3 && rto <= r.expected_ms + 1500,
        "RTO {rto} ms for a loss window of {} ms",
        r.expected_ms
    );
    assert!(t.log(1).contains("acting as if crashed"), "{}", t.log(1));
    assert!(t.log(1).contains("rejoining as a restarted member"));

    // n2 is back with its share; the drill stays in status and metrics.
    t.wait_converged(&[0, 1, 2], Duration::from_secs(20));
    assert_eq!(t.owners(0, &clients), before, "n2 has its buckets back");
    let status = text(&t.farmctl(0, &["status"]));
    assert!(
        status.contains(&format!("last drill: n2 crashed, RTO {rto} ms")),
        "{status}"
    );
    let m = t.metrics(0);
    assert_eq!(
        m.get("farm_drill_passed{member=\"n2\"}"),
        Some(&1.0),
        "{m:?}"
    );
    assert_eq!(
        m.get("farm_drill_rto_seconds{member=\"n2\"}"),
        Some(&(rto as f64 / 1000.0))
    );
    let report = fresh.finish();
    eprintln!(
        "drill: new connections during it {} answered {:?}, {} failed, {} stalled",
        report.answered, report.by_node, report.failed, report.slow
    );
    // The other members' clients were answered throughout.
    assert!(report.by_node.get("n1").is_some_and(|&n| n > 10));
}

/// Runs headless chromium inside node `i`'s namespace (where farmd's page listens on
/// 127.0.0.1:9464) with `args` and the page's address; returns stdout. Bounded in time.
fn chromium(t: &Topology, i: usize, args: &[&str]) -> String {
    let profile = t.dir.join(format!("chromium-{i}"));
    let mut child = std::process::Command::new("nsenter")
        .arg(format!("--net={}", t.nodes[i].ns.path()))
        .args([
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg("http://127.0.0.1:9464/")
        .env("HOME", &t.dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("chromium (cargo xtask setup installs it)");
    let mut out = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().expect("reader")
}

#[test]
fn status_page_draws_the_bucket_map_in_a_real_browser() {
    let Some(t) = Topology::started(
        "status_page_draws_the_bucket_map_in_a_real_browser",
        Spec {
            nodes: 3,
            client_addrs: 5,
            weights: vec![1, 2, 1],
            extra_config: "\n[metrics]\nenabled = true\n".into(),
            ..Spec::default()
        },
    ) else {
        return;
    };
    // A drain makes a recent event and a state worth drawing.
    let drained = t.farmctl(2, &["drain", "--timeout", "30"]);
    assert!(drained.status.success(), "{}", text(&drained));
    let status = t.status(0).expect("status");

    // The page as the browser built it, after its script ran: the grid it drew, read back
    // pixel by pixel, has exactly each member's bucket count in that member's colour.
    let dom = chromium(&t, 0, &["--dump-dom"]);
    let start = dom
        .find("<pre id=\"grid-check\"")
        .expect("grid check in the DOM");
    let pre = &dom[start..dom[start..].find("</pre>").expect("end") + start];
    assert!(pre.contains("data-ok=\"true\""), "grid mismatch: {pre}");
    let json = &pre[pre.find('>').expect("tag end") + 1..];
    let counts: std::collections::BTreeMap<String, usize> =
        serde_json::from_str(json).expect("grid counts");
    for m in &status.members {
        assert_eq!(counts[&m.id], m.buckets, "{}'s squares", m.id);
    }
    // Rendezvous lists: n2 (weight 2 of 3) within 3 % of two thirds.
    assert!(
        (counts["n2"] as i64 - 65536 * 2 / 3).abs() <= 1311,
        "n2 (weight 2 of 3) owns two thirds: {counts:?}"
    );
    assert_eq!(counts["n3"], 0, "drained n3 owns nothing");
    assert_eq!(counts.values().sum::<usize>(), 65536);
    assert!(dom.contains("farm · node n1 on eth0"), "title drawn");
    assert!(dom.contains(">drained<"), "n3's state in the members table");
    assert!(dom.contains("network 0"), "heartbeat networks listed");
    assert!(
        dom.contains("bucket map: serving [n1, n2]"),
        "recent events listed"
    );

    // A screenshot for people (and the note): target/tmp/status-page.png.
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &t,
        0,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,900",
        ],
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real image"
    );
    eprintln!("status page screenshot: {}", shot.display());
}
