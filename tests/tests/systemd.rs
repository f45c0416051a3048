//! The shipped unit (`config/farmd.service`) under a real systemd, booted in `systemd-nspawn`
//! inside one member's network namespace: start (Type=notify: `systemctl start` returns once
//! farmd serves), status, reload (SIGHUP), restart (keeps connections: SIGTERM drains), the
//! watchdog (a frozen farmd is aborted and restarted), a crash (Restart=on-failure; the node is
//! silent meanwhile), stop (drains and restores the host). Only the paths differ from the
//! shipped unit (a drop-in points at the binary and configuration the test built), and the
//! watchdog is shortened so that the test does not wait 30 s.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use farm_tests::{
    bin,
    nspawn::Container,
    require_root,
    topology::{Spec, TCP_PORT, Topology, VIP4},
    traffic, wait_until,
};

const UNIT: &str = "farmd.service";

fn requests(t: &Topology, sources: &[IpAddr]) -> Vec<traffic::TcpAnswer> {
    let reqs = sources.iter().map(|&s| (s, t.vip4(TCP_PORT))).collect();
    traffic::tcp_requests(&t.client, reqs, 4, Duration::from_millis(700))
}

/// Installs farmd, node `i`'s configuration, the cluster key and the unit in the container.
fn install(t: &Topology, c: &Container, i: usize) {
    let farmd = std::fs::read(bin("farmd")).expect("farmd binary");
    c.write("/opt/farm/farmd", &farmd, 0o755);
    let key = std::fs::read(t.key_file()).expect("key");
    c.write("/etc/farm/cluster.key", &key, 0o600);
    // Node i's test configuration with the unit's paths: key in /etc/farm, control socket and
    // state in /run/farm (the defaults; the unit's RuntimeDirectory).
    let cfg = t.config_for(i, &t.vip_section());
    let cfg = cfg.split("\n[control]\n").next().expect("config").replace(
        &format!("secret_file = \"{}\"", t.key_file().display()),
        "secret_file = \"/etc/farm/cluster.key\"",
    );
    c.write("/etc/farm/farm.toml", cfg.as_bytes(), 0o644);
    let unit = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/farmd.service"))
        .expect("config/farmd.service");
    c.write("/etc/systemd/system/farmd.service", &unit, 0o644);
    c.write(
        "/etc/systemd/system/farmd.service.d/test.conf",
        b"[Service]\n\
          ExecStartPre=\n\
          ExecStartPre=/opt/farm/farmd --check-config /etc/farm/farm.toml\n\
          ExecStart=\n\
          ExecStart=/opt/farm/farmd --config /etc/farm/farm.toml\n\
          WatchdogSec=3\n\
          TimeoutAbortSec=3\n",
        0o644,
    );
    c.systemctl_ok(&["daemon-reload"], UNIT);
}

#[test]
fn unit_lifecycle_under_a_real_systemd() {
    if !require_root("unit_lifecycle_under_a_real_systemd") {
        return;
    }
    let mut t = Topology::build(Spec {
        nodes: 3,
        client_addrs: 120,
        // As NGINX's keepalive_requests: connections end, so buckets handed back to a
        // restarted member are free within seconds (connection-keeping handover).
        keepalive_requests: Some(100),
        ..Spec::default()
    });
    t.start_farmd(0);
    t.start_farmd(2);
    let c = Container::boot(&t.nodes[1].ns, &t.dir);
    install(&t, &c, 1);
    // The harness talks to this farmd through the container's /run.
    t.nodes[1].socket = c.path("/run/farm/farmd.sock");

    // Type=notify: `systemctl start` returns when farmd is ready, i.e. serving.
    let started = Instant::now();
    c.systemctl_ok(&["start", UNIT], UNIT);
    eprintln!("systemctl start returned after {:?}", started.elapsed());
    assert_eq!(c.property(UNIT, "ActiveState"), "active");
    assert!(t.status(1).expect("status over the socket").serving);
    t.wait_converged(&[0, 1, 2], Duration::from_secs(20));
    let status = c.property(UNIT, "StatusText");
    assert!(status.contains("of 65536 buckets"), "{status}");
    let out = c.systemctl(&["status", UNIT, "--no-pager"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Status: \""), "{text}");

    let (clients, others) = t.clients_of("n2", 20);
    assert!(clients.len() >= 10);
    for a in requests(&t, &clients) {
        assert_eq!(a.node.as_deref(), Some("n2"), "{a:?}");
    }

    // reload: SIGHUP, the file re-read, nothing dropped.
    c.systemctl_ok(&["reload", UNIT], UNIT);
    wait_until(
        "farmd logs the reload",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || c.journal(UNIT).contains("SIGHUP: reloading").then_some(()),
    );
    assert_eq!(c.property(UNIT, "ActiveState"), "active");

    // restart keeps connections: keep-alive clients of every member, through the restart.
    let ka = traffic::KeepAlives::start(
        &t.client,
        &[clients[..5].to_vec(), others[..5].to_vec()].concat(),
        t.vip4(TCP_PORT),
    );
    std::thread::sleep(Duration::from_millis(500));
    c.systemctl_ok(&["restart", UNIT], UNIT);
    t.wait_converged(&[0, 1, 2], Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let (answered, errors) = ka.finish();
    assert!(answered > 100, "{answered}");
    assert_eq!(errors, 0, "keep-alive requests failed across systemctl restart");
    let journal = c.journal(UNIT);
    assert!(journal.contains("host restored"), "{journal}");

    // The watchdog: a frozen farmd is aborted and restarted; its peers serve its clients
    // meanwhile.
    let restarts: u32 = c.property(UNIT, "NRestarts").parse().expect("NRestarts");
    let frozen = c.main_pid(UNIT);
    assert!(frozen > 0);
    // SAFETY: signalling a process the test started (through systemd).
    unsafe { libc::kill(frozen as i32, libc::SIGSTOP) };
    wait_until(
        "the survivors serve the frozen member's clients",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            requests(&t, &clients)
                .iter()
                .all(|a| a.node.as_deref().is_some_and(|n| n != "n2"))
                .then_some(())
        },
    );
    wait_until(
        "systemd restarts the frozen farmd (watchdog)",
        Duration::from_secs(40),
        Duration::from_millis(200),
        || {
            let pid = c.main_pid(UNIT);
            (pid != 0 && pid != frozen && c.property(UNIT, "ActiveState") == "active")
                .then_some(())
        },
    );
    let journal = c.journal(UNIT);
    assert!(journal.contains("Watchdog timeout"), "{journal}");
    assert!(c.property(UNIT, "NRestarts").parse::<u32>().expect("n") > restarts);
    t.wait_converged(&[0, 1, 2], Duration::from_secs(30));
    for a in requests(&t, &clients) {
        assert_eq!(a.node.as_deref(), Some("n2"), "after the watchdog restart: {a:?}");
    }

    // A crash: Restart=on-failure brings it back; the survivors serve meanwhile.
    let crashed = c.main_pid(UNIT);
    // SAFETY: as above.
    unsafe { libc::kill(crashed as i32, libc::SIGKILL) };
    wait_until(
        "systemd restarts the killed farmd",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let pid = c.main_pid(UNIT);
            (pid != 0 && pid != crashed && c.property(UNIT, "ActiveState") == "active")
                .then_some(())
        },
    );
    t.wait_converged(&[0, 1, 2], Duration::from_secs(30));
    for a in requests(&t, &clients) {
        assert_eq!(a.node.as_deref(), Some("n2"), "after the crash restart: {a:?}");
    }

    // stop: drains (the survivors take its clients without a failed request) and restores the
    // host.
    c.systemctl_ok(&["stop", UNIT], UNIT);
    assert_eq!(c.property(UNIT, "ActiveState"), "inactive");
    for a in requests(&t, &clients) {
        assert!(a.node.as_deref().is_some_and(|n| n != "n2"), "{a:?}");
    }
    let lo = t.nodes[1].ns.ip_out(&["addr", "show", "dev", "lo"]);
    assert!(!lo.contains(&VIP4.to_string()), "VIP left on lo: {lo}");
    let link = t.nodes[1].ns.ip_out(&["link", "show", "dev", "eth0"]);
    assert!(!link.contains("prog/xdp"), "{link}");
}
