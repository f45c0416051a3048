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

/// Installs farmd, node `i`'s configuration, the cluster key and the unit in the container.
fn install(t: &Topology, c: &Container, i: usize) {
    let farmd = std::fs::read(bin("farmd")).expect("farmd binary");
    c.write("/opt/farm/farmd", &farmd, 0o755);
    let farmctl = std::fs::read(bin("farmctl")).expect("farmctl binary");
    c.write("/opt/farm/farmctl", &farmctl, 0o755);
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
    let unit = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/farmd.service"
    ))
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

/// Sends `signal` to the unit's farmd (on node n2): the survivors serve its clients, systemd
/// starts a new farmd, which rejoins and serves them again.
fn fails_and_comes_back(t: &Topology, c: &Container, clients: &[IpAddr], signal: i32, what: &str) {
    let old = c.main_pid(UNIT);
    assert!(old > 0);
    // SAFETY: signalling a process the test started (through systemd).
    unsafe { libc::kill(old as i32, signal) };
    t.wait_served_without("n2", clients, Duration::from_secs(10));
    wait_until(
        &format!("systemd starts a new farmd after the {what} one"),
        Duration::from_secs(40),
        Duration::from_millis(200),
        || {
            let pid = c.main_pid(UNIT);
            (pid != 0 && pid != old && c.property(UNIT, "ActiveState") == "active").then_some(())
        },
    );
    t.wait_converged(&[0, 1, 2], Duration::from_secs(30));
    for a in t.ask_vip4(clients) {
        assert_eq!(
            a.node.as_deref(),
            Some("n2"),
            "after the {what} one's restart: {a:?}"
        );
    }
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
    for a in t.ask_vip4(&clients) {
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

    // farmctl upgrade: a new farmd takes over in place; systemd follows it as the unit's main
    // process (MAINPID) and its watchdog keep-alives are accepted (WatchdogSec=3: a farmd
    // that systemd did not hear would be aborted within seconds). Nothing fails meanwhile.
    let ka = traffic::KeepAlives::start(&t.client, &clients[..5], t.vip4(TCP_PORT));
    let restarts: u32 = c.property(UNIT, "NRestarts").parse().expect("NRestarts");
    let before = c.main_pid(UNIT);
    std::thread::sleep(Duration::from_millis(300));
    let out = c.run("/opt/farm/farmctl", &["upgrade"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "farmctl upgrade under systemd: {said}"
    );
    eprintln!("farmctl upgrade under systemd: {}", said.trim());
    wait_until(
        "systemd follows the new farmd as the main process",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || (c.main_pid(UNIT) != before).then_some(()),
    );
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(c.property(UNIT, "ActiveState"), "active");
    assert_eq!(
        c.property(UNIT, "NRestarts").parse::<u32>().expect("n"),
        restarts,
        "systemd restarted the upgraded farmd:\n{}",
        c.journal(UNIT)
    );
    let s = t.status(1).expect("status after the upgrade");
    assert!(s.took_over_from.is_some() && s.serving, "{s:?}");
    let (answered, errors) = ka.finish();
    assert!(answered > 50, "{answered}");
    assert_eq!(
        errors, 0,
        "keep-alive requests failed across farmctl upgrade"
    );
    t.wait_converged(&[0, 1, 2], Duration::from_secs(10));

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
    let journal = c.journal(UNIT);
    assert_eq!(
        errors, 0,
        "keep-alive requests failed across systemctl restart:\n{journal}"
    );
    assert!(journal.contains("host restored"), "{journal}");

    // The watchdog: a frozen farmd is aborted and restarted; its peers serve its clients
    // meanwhile.
    let restarts: u32 = c.property(UNIT, "NRestarts").parse().expect("NRestarts");
    fails_and_comes_back(&t, &c, &clients, libc::SIGSTOP, "frozen (watchdog)");
    let journal = c.journal(UNIT);
    assert!(journal.contains("Watchdog timeout"), "{journal}");
    assert!(c.property(UNIT, "NRestarts").parse::<u32>().expect("n") > restarts);

    // A crash: Restart=on-failure brings it back. Until systemd starts it again (RestartSec=2),
    // the dead-man switch keeps the node silent and the survivors serve its clients.
    fails_and_comes_back(&t, &c, &clients, libc::SIGKILL, "killed");

    // stop: drains (the survivors take its clients without a failed request) and restores the
    // host.
    c.systemctl_ok(&["stop", UNIT], UNIT);
    assert_eq!(c.property(UNIT, "ActiveState"), "inactive");
    for a in t.ask_vip4(&clients) {
        assert!(a.node.as_deref().is_some_and(|n| n != "n2"), "{a:?}");
    }
    let lo = t.nodes[1].ns.ip_out(&["addr", "show", "dev", "lo"]);
    assert!(!lo.contains(&VIP4.to_string()), "VIP left on lo: {lo}");
    let link = t.nodes[1].ns.ip_out(&["link", "show", "dev", "eth0"]);
    assert!(!link.contains("prog/xdp"), "{link}");
}

const APP_PORT: u16 = 9000;

/// Node `i` of a mirror pair under systemd: farmd (the shipped unit, `drop_in` for mirror mode
/// if given) and the record service as a unit of its own, started by `start_primary` through
/// `systemctl`.
fn install_mirror(t: &Topology, c: &Container, i: usize, mirror_drop_in: bool) {
    install(t, c, i);
    let witness = t.client_v4[0];
    let cfg = std::fs::read_to_string(c.path("/etc/farm/farm.toml")).expect("config");
    let cfg = cfg.replace(
        "[cluster]\n",
        &format!("[cluster]\nwitness = \"{witness}\"\n"),
    ) + &format!(
        r#"
[mirror]
members = ["n1", "n2"]
vip = "{VIP4}"
directory = "/var/lib/records/data"
backing = "/var/lib/farm/mirror/records"
port = 7949
failover_after_ms = 1000
command_timeout_s = 60
start_primary = "systemctl start records.service"
stop_primary = "systemctl stop records.service"
"#
    );
    c.write("/etc/farm/farm.toml", cfg.as_bytes(), 0o644);
    std::fs::create_dir_all(c.path("/var/lib/records/data")).expect("application directory");
    let service = std::fs::read(bin("farm-record-service")).expect("farm-record-service");
    c.write("/opt/farm/farm-record-service", &service, 0o755);
    // The application in a unit of its own, sandboxed too: it sees the host's mounts.
    c.write(
        "/etc/systemd/system/records.service",
        format!(
            "[Service]\n\
             ExecStart=/opt/farm/farm-record-service --dir /var/lib/records/data --listen \
             0.0.0.0:{APP_PORT}\n\
             ProtectSystem=strict\n\
             ReadWritePaths=/var/lib/records\n\
             PrivateTmp=yes\n"
        )
        .as_bytes(),
        0o644,
    );
    if mirror_drop_in {
        let conf = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/farmd-mirror.conf"
        ))
        .expect("config/farmd-mirror.conf");
        c.write(
            "/etc/systemd/system/farmd.service.d/mirror.conf",
            &conf,
            0o644,
        );
    }
    c.systemctl_ok(&["daemon-reload"], UNIT);
}

fn mirror_status(t: &Topology, i: usize) -> Option<farm_daemon::mirror::GroupStatus> {
    use farm_daemon::control::{Request, Response, request};
    match request(
        &t.nodes[i].socket,
        &Request::MirrorStatus,
        Duration::from_secs(5),
    ) {
        Ok(Response::Mirror(m)) => Some(*m),
        _ => None,
    }
}

/// Sends records 1..=n to the record service through the VIP, one at a time; returns those
/// acknowledged.
fn write_records(t: &Topology, n: u64) -> Vec<u64> {
    t.client.run(move || {
        use std::io::{BufRead as _, Write as _};
        let addr = std::net::SocketAddr::from((VIP4, APP_PORT));
        let c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .expect("connect to the record service through the VIP");
        c.set_read_timeout(Some(Duration::from_secs(3))).ok();
        let mut r = std::io::BufReader::new(c.try_clone().expect("clone"));
        let mut w = c;
        let mut acked = Vec::new();
        for k in 1..=n {
            let mut line = String::new();
            if w.write_all(format!("{k}\n").as_bytes()).is_err()
                || r.read_line(&mut line).is_err()
                || line.trim() != format!("ok {k}")
            {
                break;
            }
            acked.push(k);
        }
        acked
    })
}

#[test]
fn mirror_group_under_a_real_systemd() {
    if !require_root("mirror_group_under_a_real_systemd") {
        return;
    }
    let mut t = Topology::build(Spec {
        nodes: 2,
        client_addrs: 1,
        test_servers: false,
        ..Spec::default()
    });
    let c1 = Container::boot(&t.nodes[0].ns, &t.dir);
    let c2 = Container::boot(&t.nodes[1].ns, &t.dir);

    // The shipped unit alone hides /dev/fuse and forbids joining the host's mount namespace:
    // farmd refuses to start the group, and says what to install.
    install_mirror(&t, &c1, 0, false);
    let out = c1.systemctl(&["start", UNIT]);
    assert!(
        !out.status.success(),
        "farmd started a mirror group it cannot serve"
    );
    let journal = c1.journal(UNIT);
    assert!(journal.contains("config/farmd-mirror.conf"), "{journal}");
    c1.systemctl(&["stop", UNIT]);
    c1.systemctl(&["reset-failed", UNIT]);

    // With the drop-in: both members run, one becomes primary and starts the application
    // through systemctl, in its own unit, on the replicated directory.
    install_mirror(&t, &c1, 0, true);
    install_mirror(&t, &c2, 1, true);
    t.nodes[0].socket = c1.path("/run/farm/farmd.sock");
    t.nodes[1].socket = c2.path("/run/farm/farmd.sock");
    c1.systemctl_ok(&["start", UNIT], UNIT);
    c2.systemctl_ok(&["start", UNIT], UNIT);
    let deadline = Instant::now() + Duration::from_secs(60);
    let primary = loop {
        if let Some(i) = (0..2).find(|&i| {
            mirror_status(&t, i).is_some_and(|s| {
                s.role == farm_daemon::heartbeat::MirrorRole::Primary
                    && s.replication == Some(farm_daemon::mirror::Replication::InSync)
            })
        }) {
            break i;
        }
        assert!(
            Instant::now() < deadline,
            "no primary in sync with its secondary within 60 s: {:#?} {:#?}\nn1:\n{}\nn2:\n{}",
            mirror_status(&t, 0),
            mirror_status(&t, 1),
            c1.journal(UNIT),
            c2.journal(UNIT)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let (cp, cs) = if primary == 0 { (&c1, &c2) } else { (&c2, &c1) };
    wait_until(
        "the record service runs on the primary",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || (cp.property("records.service", "ActiveState") == "active").then_some(()),
    );

    let acked = write_records(&t, 200);
    assert_eq!(acked.len(), 200, "records acknowledged");
    // Written through the application's view of the directory: the mount, as its unit sees it
    // (and as the host's PID 1 does)...
    let mounts = std::fs::read_to_string(cp.path("/proc/1/mountinfo")).expect("mountinfo");
    assert!(
        mounts
            .lines()
            .any(|l| l.contains(" /var/lib/records/data ") && l.contains("farm-mirror")),
        "the replicated directory is not mounted in the host's mount namespace:\n{mounts}"
    );
    // ...so every acknowledged record is on the secondary.
    let replica = std::fs::read_to_string(cs.path("/var/lib/farm/mirror/records/records.log"))
        .expect("the secondary's copy");
    let have: std::collections::BTreeSet<u64> = replica
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let missing: Vec<u64> = acked
        .iter()
        .filter(|k| !have.contains(k))
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged records missing on the secondary: {missing:?}"
    );
    c1.systemctl_ok(&["stop", UNIT], UNIT);
    c2.systemctl_ok(&["stop", UNIT], UNIT);
}
