//! farm-demo: a three-node farm on this machine, in network namespaces (`cargo xtask demo`).
//!
//! Builds a switch, three nodes running farmd and a small TCP service, and a client with 200
//! addresses; shows `farmctl status`, spreads 600 connections over the farm, kills one node's
//! daemon and measures how fast that node stops answering (dead-man switch), restarts it, and
//! removes everything on exit (also on Ctrl-C).

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

    title("Killing farmd on n2 (SIGKILL): its XDP program stays, its dead-man switch fires");
    let n2_clients: Vec<IpAddr> = {
        let names: Vec<String> = sources.iter().map(|a| a.to_string()).collect();
        t.whois(0, &names)
            .into_iter()
            .filter(|w| w.by_client.as_ref().and_then(|p| p.owner.as_deref()) == Some("n2"))
            .filter_map(|w| w.client.parse().ok())
            .collect()
    };
    let probe = n2_clients[0];
    let killed = Instant::now();
    t.signal_farmd(1, libc::SIGKILL);
    let stopped = loop {
        let sent = killed.elapsed();
        let a = t.client.run({
            let dst = t.vip4(TCP_PORT);
            move || traffic::tcp_request(probe, dst, Duration::from_millis(100))
        });
        if a.node.is_none() {
            break sent;
        }
        if killed.elapsed() > Duration::from_secs(5) {
            bail!("n2 kept serving without its daemon");
        }
    };
    println!(
        "  n2 stopped accepting {:.0} ms after its daemon died (dead-man timeout 300 ms)",
        stopped.as_secs_f64() * 1000.0
    );
    for (node, n) in spread(t, &sources, 1) {
        println!("  {node}: {n} connections");
    }
    println!(
        "  (static membership: n2's {} clients wait for it; failover to n1/n3 comes with the \
         heartbeat membership)",
        n2_clients.len()
    );
    check_interrupt()?;

    title("Restarting farmd on n2");
    t.start_farmd(1);
    for (node, n) in spread(t, &sources, 1) {
        println!("  {node}: {n} connections");
    }
    Ok(())
}
