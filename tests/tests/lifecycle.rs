//! farmd's life on a host: a killed daemon stops its node from serving (dead-man switch), a
//! stopped one leaves the host as it found it, a second one on the same interface refuses to
//! start, and a broken configuration touches nothing.

use std::time::{Duration, Instant};

use farm_tests::{
    bin, require_root,
    topology::{Spec, TCP_PORT, Topology, VIP4, VIP6},
    traffic,
};

/// What farmd may change on a node, as text to compare before and after.
fn host_state(t: &Topology, i: usize) -> String {
    let ns = &t.nodes[i].ns;
    let addrs = ns.ip_out(&["-br", "addr", "show", "dev", "eth0"]);
    // The VIPs' device (dataplane.vip_device, lo by default).
    let lo = ns.ip_out(&["-br", "addr", "show", "dev", "lo"]);
    let sysctls = farm_tests::fail_silent_sysctls(ns);
    let link = ns.ip_out(&["-d", "link", "show", "dev", "eth0"]);
    // Only what farmd touches: addresses, XDP, promiscuity, and the filter entries.
    let link: Vec<&str> = link
        .split_whitespace()
        .filter(|w| {
            w.starts_with("prog/xdp") || w.starts_with("xdp") || w.starts_with("promiscuity")
        })
        .collect();
    let filter = std::process::Command::new("bridge")
        .args(["-n", &ns.name, "fdb", "show", "dev", "eth0"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    format!("addrs: {addrs}\nlo: {lo}\nsysctls: {sysctls:?}\nlink: {link:?}\nfilter: {filter}")
}

/// Runs `farmd ARGS PATH` in node `i`'s namespace: its exit code and stderr.
fn farmd_in(
    t: &Topology,
    i: usize,
    args: &[&str],
    path: &std::path::Path,
) -> (Option<i32>, String) {
    let out = t.nodes[i]
        .ns
        .command(&bin("farmd"))
        .args(args)
        .arg(path)
        .output()
        .expect("run farmd");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn killed_daemon_stops_serving_and_peers_take_over() {
    let Some(mut t) = Topology::started(
        "killed_daemon_stops_serving_and_peers_take_over",
        Spec {
            nodes: 3,
            client_addrs: 300,
            ..Spec::default()
        },
    ) else {
        return;
    };
    let (mut victim_clients, other_clients) = t.clients_of("n2", 20);
    victim_clients.truncate(20);
    assert!(victim_clients.len() >= 10 && other_clients.len() >= 10);
    for a in t.ask_vip4(&[victim_clients.clone(), other_clients.clone()].concat()) {
        assert!(a.node.is_some(), "before the kill: {a:?}");
    }

    let killed_at = Instant::now();
    t.signal_farmd(1, libc::SIGKILL);
    // The programs stay attached (pinned) with nobody refreshing the dead-man deadline.
    let link = t.nodes[1].ns.ip_out(&["link", "show", "dev", "eth0"]);
    assert!(
        link.contains("prog/xdp"),
        "XDP program must survive its daemon: {link}"
    );
    // Probe n2's clients for 3 s. n2's server still runs: had its data plane kept accepting,
    // it would answer.
    let mut probes = Vec::new();
    let mut k = 0;
    while killed_at.elapsed() < Duration::from_secs(3) {
        let src = victim_clients[k % victim_clients.len()];
        k += 1;
        let sent = killed_at.elapsed();
        let a = t.client.run({
            let dst = t.vip4(TCP_PORT);
            move || traffic::tcp_request(src, dst, Duration::from_millis(150))
        });
        probes.push((sent, a.node));
    }
    let deadman = Duration::from_millis(t.spec.deadman_ms);
    let late_n2: Vec<_> = probes
        .iter()
        .filter(|(sent, node)| {
            *sent > deadman + Duration::from_millis(150) && node.as_deref() == Some("n2")
        })
        .collect();
    assert!(
        late_n2.is_empty(),
        "n2 answered after its dead-man timeout: {late_n2:?}"
    );
    let recovered = probes
        .iter()
        .find(|(_, node)| node.as_deref().is_some_and(|n| n != "n2"))
        .map(|(sent, _)| *sent)
        .expect("the survivors never took over n2's clients");
    assert!(
        recovered < Duration::from_secs(2),
        "takeover after {recovered:?}"
    );
    let after: Vec<_> = probes
        .iter()
        .filter(|(sent, node)| *sent > recovered + Duration::from_millis(300) && node.is_none())
        .collect();
    assert!(
        after.is_empty(),
        "requests failed after the takeover: {after:?}"
    );
    eprintln!(
        "SIGKILL of n2's farmd: its clients answered by the survivors from {:.0} ms on \
         (dead-man {} ms, loss window 400 ms)",
        recovered.as_secs_f64() * 1000.0,
        deadman.as_millis()
    );
    for a in t.ask_vip4(&other_clients) {
        assert!(a.node.is_some() && a.node.as_deref() != Some("n2"), "{a:?}");
    }

    // A restarted farmd takes over the stale programs, rejoins and gets its clients back.
    t.start_farmd(1);
    assert!(t.log(1).contains("did not exit cleanly"), "{}", t.log(1));
    t.wait_converged(&[0, 1, 2], Duration::from_secs(10));
    for a in t.ask_vip4(&victim_clients) {
        assert_eq!(a.node.as_deref(), Some("n2"), "{a:?}");
    }
}

#[test]
fn sigterm_restores_the_host() {
    if !require_root("sigterm_restores_the_host") {
        return;
    }
    let mut t = Topology::build(Spec {
        nodes: 2,
        client_addrs: 4,
        ..Spec::default()
    });
    let before: Vec<String> = (0..2).map(|i| host_state(&t, i)).collect();
    t.start_all();
    let during = host_state(&t, 0);
    assert!(
        during.contains(&VIP4.to_string()) && during.contains(&VIP6.to_string()),
        "{during}"
    );
    // The VIPs are on lo, never on the farm interface, which answers ARP only for its own
    // addresses while farmd runs.
    let eth0 = t.nodes[0]
        .ns
        .ip_out(&["-br", "addr", "show", "dev", "eth0"]);
    assert!(!eth0.contains(&VIP4.to_string()), "{eth0}");
    assert!(
        during.contains("ipv4.arp_ignore=1") && during.contains("ipv4.arp_announce=2"),
        "{during}"
    );
    assert!(during.contains("prog/xdp"), "{during}");
    let mac = t.status(0).expect("status").cluster_mac;
    assert!(during.contains(&mac), "cluster MAC in the filter: {during}");
    assert!(t.pin_dir(0).exists());

    for (i, before) in before.iter().enumerate() {
        let st = t.signal_farmd(i, libc::SIGTERM).expect("was running");
        assert!(st.success(), "farmd exit status {st}: {}", t.log(i));
        assert_eq!(&host_state(&t, i), before, "host {i} not restored");
        assert!(
            !t.pin_dir(i).exists(),
            "pins left in {}",
            t.pin_dir(i).display()
        );
        assert!(!t.nodes[i].socket.exists(), "control socket left behind");
        assert!(t.log(i).contains("host restored"), "{}", t.log(i));
    }
    // SIGINT does the same.
    t.start_farmd(0);
    let st = t.signal_farmd(0, libc::SIGINT).expect("was running");
    assert!(st.success());
    assert_eq!(host_state(&t, 0), before[0]);
}

#[test]
fn second_daemon_on_the_same_interface_refuses() {
    if !require_root("second_daemon_on_the_same_interface_refuses") {
        return;
    }
    let mut t = Topology::build(Spec {
        nodes: 1,
        client_addrs: 2,
        ..Spec::default()
    });
    t.start_farmd(0);
    let before = host_state(&t, 0);
    // Same config except the control socket.
    let cfg = std::fs::read_to_string(&t.nodes[0].config)
        .expect("config")
        .replace("n1.sock", "n1-second.sock");
    let path = t.dir.join("second.toml");
    std::fs::write(&path, cfg).expect("write");
    let (code, err) = farmd_in(&t, 0, &["--config"], &path);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("another farmd is already running on interface eth0"),
        "{err}"
    );
    assert_eq!(
        host_state(&t, 0),
        before,
        "the refused farmd changed the host"
    );
    // The first one still serves.
    assert!(t.status(0).expect("status").serving);
}

#[test]
fn invalid_config_names_every_field_and_touches_nothing() {
    if !require_root("invalid_config_names_every_field_and_touches_nothing") {
        return;
    }
    let t = Topology::build(Spec {
        nodes: 1,
        client_addrs: 2,
        ..Spec::default()
    });
    let before = host_state(&t, 0);
    let good = std::fs::read_to_string(&t.nodes[0].config).expect("config");
    let bad = good
        .replace("mac_mode = \"unicast\"", "mac_mode = \"broadcast\"")
        .replace("weight = 1", "weight = -1")
        .replace(
            &format!("address = \"{VIP4}\""),
            "address = \"10.201.0.300\"",
        )
        .replace(
            "ports = 8080, affinity = \"connection\"",
            "ports = \"9000-8000\", affinity = \"connection\"",
        );
    let path = t.dir.join("bad.toml");
    // weight = -1 is a type error caught by the parser; test the field errors separately.
    std::fs::write(&path, bad.replace("weight = -1", "weight = 1")).expect("write");
    for args in [vec!["--config"], vec!["--check-config"]] {
        let (code, err) = farmd_in(&t, 0, &args, &path);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        for field in [
            "cluster.mac_mode",
            "vip[0].address",
            "vip[0].rules[1].ports",
        ] {
            assert!(
                err.contains(field),
                "{args:?}: {field} not named in:\n{err}"
            );
        }
        assert!(
            err.contains("\"unicast\" or \"multicast\""),
            "says what is allowed: {err}"
        );
        assert_eq!(host_state(&t, 0), before, "{args:?} touched the host");
    }
    // A type error names the field too.
    std::fs::write(&path, good.replace("weight = 1", "weight = -1")).expect("write");
    let (code, err) = farmd_in(&t, 0, &["--check-config"], &path);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("weight"), "{err}");
    // A key file others can read is refused, before anything is touched.
    std::fs::write(&path, &good).expect("write");
    let key = t.key_file();
    let keep = std::fs::metadata(&key).expect("key").permissions();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    let (code, err) = farmd_in(&t, 0, &["--config"], &path);
    std::fs::set_permissions(&key, keep).expect("chmod back");
    assert_ne!(code, Some(0));
    assert!(err.contains("chmod 600"), "{err}");
    assert_eq!(host_state(&t, 0), before);
    // And the good config passes --check-config.
    let (code, err) = farmd_in(&t, 0, &["--check-config"], &t.nodes[0].config);
    assert_eq!(code, Some(0), "{err}");
}
