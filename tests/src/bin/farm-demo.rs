//! farm-demo: a three-node farm on this machine, in network namespaces (`cargo xtask demo`).
//!
//! Builds a switch, three nodes running farmd and a small TCP service, and a client with 200
//! addresses; shows `farmctl status`, spreads 600 connections over the farm, kills one node's
//! daemon and measures how long its clients went unanswered until the others took them over,
//! restarts it, and removes everything on exit (also on Ctrl-C).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use farm_tests::{
    bin,
    topology::{Spec, TCP_PORT, Topology},
    traffic,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}

fn title(s: &str) {
    println!("\n=== {s}");
}

fn main() -> Result<()> {
    // SAFETY: geteuid has no preconditions; the handler only stores to an atomic.
    unsafe {
        if libc::geteuid() != 0 {
            bail!("the demo builds network namespaces and attaches XDP programs: run it as root");
        }
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    title("Building a switch, three nodes (n1-n3) and a client with 200 addresses");
    let mut t = Topology::build(Spec {
        nodes: 3,
        client_addrs: 200,
        deadman_ms: 300,
        ..Spec::default()
    });
    let result = run(&mut t);
    title("Cleaning up (namespaces, programs, processes)");
    drop(t);
    println!("done");
    result
}

fn farmctl(t: &Topology, i: usize, args: &[&str]) {
    let out = Command::new(bin("farmctl"))
        .arg("--socket")
        .arg(&t.nodes[i].socket)
        .args(args)
        .output();
    match out {
        Ok(o) => print!("{}", String::from_utf8_lossy(&o.stdout)),
        Err(e) => println!("farmctl: {e}"),
    }
}

fn spread(t: &Topology, sources: &[IpAddr], per_source: usize) -> BTreeMap<String, usize> {
    let reqs: Vec<(IpAddr, SocketAddr)> = (0..sources.len() * per_source)
        .map(|k| (sources[k % sources.len()], t.vip4(TCP_PORT)))
        .collect();
    let mut per_node = BTreeMap::new();
    for a in traffic::tcp_requests(&t.client, reqs, 4, Duration::from_millis(800)) {
        *per_node
            .entry(a.node.unwrap_or_else(|| "(no answer)".into()))
            .or_insert(0) += 1;
    }
    per_node
}

fn run(t: &mut Topology) -> Result<()> {
    title("Starting farmd on every node");
    t.start_all();
    check_interrupt()?;
    println!("$ farmctl status   (on n1)");
    farmctl(t, 0, &["status"]);

    title("600 TCP connections to the VIP 10.201.0.100:80 from 200 client addresses");
    let sources: Vec<IpAddr> = t.client_v4.iter().map(|&a| IpAddr::V4(a)).collect();
    for (node, n) in spread(t, &sources, 3) {
        println!("  {node}: {n} connections");
    }
    println!("$ farmctl whois 10.201.4.1 10.201.4.2:40000");
    farmctl(t, 0, &["whois", "10.201.4.1", "10.201.4.2:40000"]);
    check_interrupt()?;

    title("Killing farmd on n2 (SIGKILL): n2 stops by its dead-man switch, n1 and n3 take over");
    let n2_clients: Vec<IpAddr> = {
        let names: Vec<String> = sources.iter().map(|a| a.to_string()).collect();
        t.whois(0, &names)
            .into_iter()
            .filter(|w| w.by_client.as_ref().and_then(|p| p.owner.as_deref()) == Some("n2"))
            .filter_map(|w| w.client.parse().ok())
            .collect()
    };
    let killed = Instant::now();
    t.signal_farmd(1, libc::SIGKILL);
    // A client of n2 opens a new connection every few ms until someone answers.
    let mut k = 0;
    let recovered = loop {
        let probe = n2_clients[k % n2_clients.len()];
        k += 1;
        let a = t.client.run({
            let dst = t.vip4(TCP_PORT);
            move || traffic::tcp_request(probe, dst, Duration::from_millis(50))
        });
        if a.node.as_deref().is_some_and(|n| n != "n2") {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(10) {
            bail!("nobody took over n2's clients");
        }
    };
    println!(
        "  measured RTO: n2's clients were answered again {:.0} ms after its daemon died",
        recovered.as_secs_f64() * 1000.0
    );
    println!("  (detection: heartbeats every 50 ms, lost after 8 missed = 400 ms)");
    std::thread::sleep(Duration::from_millis(300));
    for (node, n) in spread(t, &sources, 1) {
        println!("  {node}: {n} connections");
    }
    println!("$ farmctl status   (on n1)");
    farmctl(t, 0, &["status"]);
    check_interrupt()?;

    title("Restarting farmd on n2: it rejoins and gets its share back");
    t.start_farmd(1);
    t.wait_converged(&[0, 1, 2], Duration::from_secs(10));
    for (node, n) in spread(t, &sources, 1) {
        println!("  {node}: {n} connections");
    }
    Ok(())
}
