//! Every example in config/ parses and validates, and says what it claims to.

use std::path::PathBuf;

use farm_daemon::config::{Config, MacMode};

fn example(name: &str) -> Config {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../config")
        .join(name);
    Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_example_validates() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("config/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 5, "expected the examples in config/, found {n}");
}

#[test]
fn examples_say_what_they_claim() {
    let r = example("reference.toml");
    assert_eq!(r.members.len(), 2);
    assert_eq!(r.deadman_timeout.as_millis(), 300);
    assert_eq!(
        r.checks.len(),
        2,
        "reference shows an http and a process check"
    );
    let w = example("web-farm.toml");
    assert_eq!(w.members.len(), 3);
    assert_eq!(w.checks[0].probe.kind(), "http");
    assert_eq!(w.vips.len(), 2);
    assert!(w.vips[1].address.is_ipv6());
    let u = example("udp-api.toml");
    assert_eq!(u.mac_mode, MacMode::Multicast);
    assert_eq!(
        u.vips[0].rules[0].affinity,
        farm_common::affinity::CONNECTION
    );
    let m = example("mirror-postgresql.toml");
    let group = m.mirror.as_ref().expect("a [mirror] group");
    assert_eq!(group.members, [0, 1]);
    assert_eq!(group.vip, m.vips[0].address);
    assert_eq!(group.failback, farm_daemon::config::Failback::Preferred);
    assert_eq!(group.address(1).to_string(), "10.99.0.2:7948");
    assert!(
        m.witness.is_some(),
        "a two-member mirror group needs its witness"
    );
    let t = example("two-node-witness.toml");
    assert_eq!(t.members.len(), 2);
    assert!(t.witness.is_some());
    assert!(
        t.members.iter().all(|m| m.heartbeat_addrs.len() == 2),
        "two heartbeat networks"
    );
    assert_eq!(t.drain_timeout.as_secs(), 20);
    assert_eq!(t.stop_drain_timeout.as_secs(), 15);
    let g = example("weighted.toml");
    let weights: Vec<u32> = g.members.iter().map(|m| m.weight).collect();
    assert_eq!(
        weights,
        vec![2, 1, 1, 0],
        "sorted by id: big, small1, small2, standby"
    );
}

/// The systemd unit starts farmd the documented way and gives SIGTERM's drain time to finish.
#[test]
fn systemd_unit_fits_farmd() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/farmd.service");
    let unit = std::fs::read_to_string(&path).expect("config/farmd.service");
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key}= missing in farmd.service"))
            .to_string()
    };
    assert!(value("ExecStart").ends_with("farmd --config /etc/farm/farm.toml"));
    assert!(value("ExecStartPre").contains("farmd --check-config /etc/farm/farm.toml"));
    let stop: u64 = value("TimeoutStopSec").parse().expect("seconds");
    let reference = example("reference.toml");
    assert!(
        stop > reference.stop_drain_timeout.as_secs() + 5,
        "TimeoutStopSec {stop} must exceed handover.stop_drain_timeout_s"
    );
    for cap in [
        "CAP_BPF",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_SYS_ADMIN",
        "CAP_SYS_NICE",
        "CAP_IPC_LOCK",
    ] {
        assert!(value("CapabilityBoundingSet").contains(cap), "{cap}");
    }
    // The heartbeat thread's real-time policy (heartbeat.scheduling, on by default).
    assert_eq!(value("RestrictRealtime"), "no");
    assert_eq!(
        reference.heartbeat.scheduling.policy,
        farm_daemon::config::Policy::Fifo
    );
    assert!(value("ReadWritePaths").contains("/sys/fs/bpf"));
    // Reload is SIGHUP; the drill's probe client is a packet socket.
    assert_eq!(value("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert!(value("RestrictAddressFamilies").contains("AF_PACKET"));
    // farmd notifies readiness and sends watchdog keep-alives (sd_notify); /proc/sys stays
    // writable (the fail-silent sysctls).
    assert_eq!(value("Type"), "notify");
    assert!(value("WatchdogSec").parse::<u64>().expect("seconds") >= 10);
    assert!(!unit.contains("ProtectKernelTunables=yes"));
}

#[test]
fn mirror_drop_in_fits_the_mirror_example() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/farmd-mirror.conf");
    let conf = std::fs::read_to_string(&path).expect("config/farmd-mirror.conf");
    let values = |key: &str| -> Vec<String> {
        conf.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(values("BindPaths"), ["/dev/fuse"]);
    assert_eq!(values("DeviceAllow"), ["/dev/fuse rw"]);
    assert_eq!(values("RestrictNamespaces"), ["mnt"]);
    assert!(values("CapabilityBoundingSet")[0].contains("CAP_SYS_CHROOT"));
    let mut rw: Vec<String> = values("ReadWritePaths")
        .join(" ")
        .split_whitespace()
        .map(|w| w.trim_start_matches('-').to_string())
        .collect();
    rw.extend(
        values("StateDirectory")
            .iter()
            .map(|d| format!("/var/lib/{d}")),
    );
    let m = example("mirror-postgresql.toml")
        .mirror
        .expect("mirror group");
    for p in [&m.backing, m.directory.parent().expect("parent")] {
        assert!(
            rw.iter().any(|w| p.starts_with(w)),
            "{} not writable under the drop-in ({rw:?})",
            p.display()
        );
    }
}
