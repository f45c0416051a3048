//! A member whose XDP program is gone is silent on the VIPs, and its peers serve its clients:
//! for each way the program can vanish (farmd killed and its pins removed, the program detached
//! while farmd runs, the bpf filesystem unmounted and then farmd killed), and for the way
//! operators start daemons in a namespace (`ip netns exec`), which either is refused with a
//! clear message or keeps the crash guarantee.
//!
//! "Silent" is checked on the wire: a raw ARP request and a neighbour solicitation for the VIPs
//! get exactly one answer, with the cluster MAC (never a node's own MAC: the kernel of the
//! member without its program must not answer), and TCP clients of the member are answered
//! once, by a survivor, while the member's own server accepts nothing.

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use farm_tests::{
    bin,
    bpf::{BpffsMount, detach_pinned_link},
    probe, require_root,
    topology::{Spec, Topology, VIP4, VIP6},
    wait_until,
};

fn spec() -> Spec {
    Spec {
        nodes: 3,
        client_addrs: 120,
        ..Spec::default()
    }
}

fn xdp_attached(t: &Topology, i: usize) -> bool {
    t.nodes[i]
        .ns
        .ip_out(&["link", "show", "dev", "eth0"])
        .contains("prog/xdp")
}

/// Waits (bounded) until every client of `victim` is answered by a survivor, then checks that
/// the victim is silent on the wire and that nothing is answered twice.
fn assert_silent_and_taken_over(
    t: &Topology,
    victim: usize,
    victim_clients: &[IpAddr],
    cluster_mac: [u8; 6],
) {
    let name = t.nodes[victim].name.clone();
    t.wait_served_without(&name, victim_clients, Duration::from_secs(10));

    let accepted_before = t.node_accepts(victim);
    let answers = t.ask_vip4(victim_clients);
    for a in &answers {
        assert!(
            a.node.as_deref().is_some_and(|n| n != name),
            "after the takeover: {a:?}"
        );
    }
    assert_eq!(
        t.node_accepts(victim),
        accepted_before,
        "{name}'s server accepted connections without its XDP program"
    );

    let victim_mac = t.node_mac(victim);
    for (k, src) in victim_clients.iter().take(6).enumerate() {
        let IpAddr::V4(src) = *src else { continue };
        let got = probe::arp(
            &t.client,
            "eth0",
            src,
            VIP4,
            None,
            Duration::from_millis(400),
        );
        assert_eq!(
            got.len(),
            1,
            "ARP for {VIP4} from {src}: exactly one answer expected: {got:?}"
        );
        assert_eq!(got[0].lladdr, Some(cluster_mac), "{got:?}");
        assert!(
            got.iter()
                .all(|a| a.eth_src != victim_mac && a.lladdr != Some(victim_mac)),
            "{name} answered ARP: {got:?}"
        );
        let src6 = t.client_v6[k];
        let got = probe::neighbour_solicitation(
            &t.client,
            "eth0",
            src6,
            VIP6,
            None,
            Duration::from_millis(400),
        );
        assert!(
            got.len() == 1 && got[0].lladdr == Some(cluster_mac),
            "NS for {VIP6} from {src6}: exactly one answer with the cluster MAC expected: {got:?}"
        );
        assert!(
            got.iter().all(|a| a.eth_src != victim_mac),
            "{name} answered NS: {got:?}"
        );
    }
}

/// The clients `victim` serves (at least 10), after checking every client is answered.
fn victims_clients(t: &Topology, victim: usize) -> Vec<IpAddr> {
    let (mine, others) = t.clients_of(&t.nodes[victim].name, 20);
    assert!(mine.len() >= 10 && others.len() >= 10, "{mine:?}");
    for a in t.ask_vip4(&[mine.clone(), others].concat()) {
        assert!(a.node.is_some(), "before: {a:?}");
    }
    mine
}

#[test]
fn killed_farmd_with_its_pins_removed_is_silent() {
    let Some(mut t) = Topology::started("killed_farmd_with_its_pins_removed_is_silent", spec())
    else {
        return;
    };
    let mac = t.cluster_mac();
    let clients = victims_clients(&t, 1);
    t.signal_farmd(1, libc::SIGKILL);
    // Without its pins nothing holds the programs: the kernel detaches them.
    for e in std::fs::read_dir(t.pin_dir(1)).expect("pin dir") {
        std::fs::remove_file(e.expect("entry").path()).expect("remove pin");
    }
    wait_until(
        "the XDP program goes with its pins",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || (!xdp_attached(&t, 1)).then_some(()),
    );
    // The VIPs stay on the host, as a crash leaves them.
    assert!(
        t.nodes[1]
            .ns
            .ip_out(&["addr", "show", "dev", "lo"])
            .contains(&VIP4.to_string())
    );
    assert_silent_and_taken_over(&t, 1, &clients, mac);
}

#[test]
fn detached_program_makes_farmd_leave_and_the_node_silent() {
    let Some(mut t) = Topology::started(
        "detached_program_makes_farmd_leave_and_the_node_silent",
        spec(),
    ) else {
        return;
    };
    let mac = t.cluster_mac();
    let clients = victims_clients(&t, 1);

    // `ip link set dev eth0 xdp off` cannot take a program attached through a link away: the
    // kernel refuses, and the member serves on.
    let out = std::process::Command::new("ip")
        .args([
            "-n",
            &t.nodes[1].ns.name,
            "link",
            "set",
            "dev",
            "eth0",
            "xdp",
            "off",
        ])
        .output()
        .expect("ip");
    assert!(
        !out.status.success() && xdp_attached(&t, 1),
        "ip link set xdp off: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Can't replace active BPF XDP link"),
        "{out:?}"
    );
    for a in t.ask_vip4(&clients) {
        assert_eq!(a.node.as_deref(), Some("n2"), "{a:?}");
    }

    // Detaching the link itself (as `bpftool link detach` does) takes it away: farmd notices,
    // leaves the farm and exits with an error (systemd's Restart=on-failure starts it again).
    detach_pinned_link(&t.pin_dir(1).join("xdp_link")).expect("BPF_LINK_DETACH");
    assert!(!xdp_attached(&t, 1));
    let child = t.nodes[1].farmd.as_mut().expect("running");
    let status = wait_until(
        "farmd exits when its program is detached",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || child.try_wait().ok().flatten(),
    );
    t.nodes[1].farmd = None;
    assert_eq!(status.code(), Some(1), "{}", t.log(1));
    let log = t.log(1);
    assert!(
        log.contains("no longer attached to eth0 (detached by someone else)"),
        "{log}"
    );
    assert!(log.contains("host restored"), "{log}");
    assert_silent_and_taken_over(&t, 1, &clients, mac);
    // The survivors saw it leave, not fail.
    let n1 = t.log(0);
    assert!(n1.contains("member left"), "{n1}");

    // Started again, it rejoins and serves its clients.
    t.start_farmd(1);
    t.wait_converged(&[0, 1, 2], Duration::from_secs(15));
    for a in t.ask_vip4(&clients) {
        assert_eq!(a.node.as_deref(), Some("n2"), "{a:?}");
    }
}

/// Node 1's configuration with its pins on `bpffs`.
fn pin_on(t: &Topology, bpffs: &Path) -> String {
    std::fs::read_to_string(&t.nodes[1].config)
        .expect("config")
        .replace(
            "[runtime]\n",
            &format!("[runtime]\nbpffs = \"{}\"\n", bpffs.display()),
        )
}

#[test]
fn unmounted_bpffs_then_crash_leaves_the_node_silent() {
    if !require_root("unmounted_bpffs_then_crash_leaves_the_node_silent") {
        return;
    }
    let mut t = Topology::build(spec());
    let mut bpffs = BpffsMount::new(t.dir.join("bpffs"));
    std::fs::write(&t.nodes[1].config, pin_on(&t, &bpffs.path)).expect("config");
    t.start_all();
    let mac = t.cluster_mac();
    let clients = victims_clients(&t, 1);

    bpffs.unmount();
    // farmd still holds its links (the member serves on) and says that a crash would now
    // detach them.
    wait_until(
        "farmd notices its pins are gone",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || {
            t.log(1)
                .contains("pins of the XDP/tc links are gone")
                .then_some(())
        },
    );
    for a in t.ask_vip4(&clients) {
        assert_eq!(a.node.as_deref(), Some("n2"), "{a:?}");
    }
    t.signal_farmd(1, libc::SIGKILL);
    wait_until(
        "the program goes with farmd (nothing else holds it)",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || (!xdp_attached(&t, 1)).then_some(()),
    );
    assert_silent_and_taken_over(&t, 1, &clients, mac);
}

#[test]
fn ip_netns_exec_is_refused_or_keeps_the_crash_guarantee() {
    if !require_root("ip_netns_exec_is_refused_or_keeps_the_crash_guarantee") {
        return;
    }
    let mut t = Topology::build(spec());
    t.start_farmd(0);
    t.start_farmd(2);
    let ns = t.nodes[1].ns.name.clone();
    let before = t.nodes[1].ns.ip_out(&["addr", "show", "dev", "lo"]);

    // `ip netns exec` gives farmd a fresh /sys, with no bpf filesystem: pins made there would
    // die with farmd. Refused, with the way out, and nothing on the host touched.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(bin("farmd"))
        .arg("--config")
        .arg(&t.nodes[1].config)
        .output()
        .expect("ip netns exec farmd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("ip netns exec") && err.contains("nsenter --net=/run/netns/"),
        "{err}"
    );
    assert!(!xdp_attached(&t, 1));
    assert_eq!(t.nodes[1].ns.ip_out(&["addr", "show", "dev", "lo"]), before);

    // With a bpf filesystem the namespace inherits from the host (runtime.bpffs), it runs, and
    // the pins outlive it: killed, its node stops serving by the dead-man switch, silently.
    let bpffs = BpffsMount::new(t.dir.join("bpffs"));
    let cfg = t.dir.join("n2-netns-exec.toml");
    std::fs::write(&cfg, pin_on(&t, &bpffs.path)).expect("config");
    let log = std::fs::File::create(&t.nodes[1].log).expect("log");
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(bin("farmd"))
        .arg("--config")
        .arg(&cfg)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn");
    t.nodes[1].farmd = Some(child);
    t.wait_serving(1, Duration::from_secs(30));
    t.wait_converged(&[0, 1, 2], Duration::from_secs(20));
    let mac = t.cluster_mac();
    let clients = victims_clients(&t, 1);
    let killed = Instant::now();
    t.signal_farmd(1, libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        xdp_attached(&t, 1),
        "the pinned program should outlive farmd ({:?} after the kill)",
        killed.elapsed()
    );
    assert_silent_and_taken_over(&t, 1, &clients, mac);
    drop(bpffs);
}
