//! farmctl: asks a running farmd what it is doing.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use farm_daemon::control::{self, Request, Response, Status, WhoisEntry};

/// farmctl - the command-line client of farmd.
///
/// Talks to the farmd on this host over its control socket (root only).
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Exit status: 0 success, 1 farmd answered with an error, \
2 farmd could not be reached."
)]
struct Args {
    /// farmd's control socket (control.socket in its config).
    #[arg(long, global = true, env = "FARM_SOCKET", default_value = farm_daemon::config::DEFAULT_SOCKET)]
    socket: PathBuf,

    /// Print JSON instead of text (for scripts).
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Members, buckets per member, VIPs and counters of this node.
    Status,
    /// Which bucket a client falls in and which member serves it.
    ///
    /// ADDR gives the placement for rules with `client` affinity; ADDR:PORT (the client's
    /// source port; [IPV6]:PORT for IPv6) adds the placement for `connection` affinity.
    Whois {
        #[arg(value_name = "ADDR[:PORT]", required = true)]
        clients: Vec<String>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let req = match &args.command {
        Command::Status => Request::Status,
        Command::Whois { clients } => Request::Whois {
            clients: clients.clone(),
        },
    };
    let resp = match control::request(&args.socket, &req, Duration::from_secs(10)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("farmctl: {e}");
            return ExitCode::from(2);
        }
    };
    if args.json {
        match &resp {
            Response::Status(s) => print_json(s),
            Response::Whois { entries } => print_json(entries),
            Response::Error { .. } => print_json(&resp),
        }
    } else {
        match &resp {
            Response::Status(s) => print_status(s),
            Response::Whois { entries } => print_whois(entries),
            Response::Error { .. } => {}
        }
    }
    match resp {
        Response::Error { message } => {
            eprintln!("farmctl: farmd says: {message}");
            ExitCode::from(1)
        }
        Response::Whois { entries } if entries.iter().any(|e| e.error.is_some()) => {
            ExitCode::from(1)
        }
        _ => ExitCode::SUCCESS,
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn print_status(s: &Status) {
    println!(
        "node {}  interface {}  XDP {} mode  {}",
        s.node,
        s.interface,
        s.xdp_mode,
        if s.serving {
            "SERVING"
        } else {
            "NOT SERVING (dead-man switch expired)"
        }
    );
    println!(
        "cluster MAC {} ({})  dead-man {} ms  up {:.0} s",
        s.cluster_mac, s.mac_mode, s.deadman_timeout_ms, s.uptime_s
    );
    let hb = &s.heartbeat;
    println!(
        "quorum {}  view {}  heartbeat {} ms, lost after {} missed",
        if s.quorum {
            "yes"
        } else {
            "NO (serving nothing)"
        },
        s.view_digest,
        hb.interval_ms,
        hb.loss_threshold
    );
    if let Some(h) = &s.handover {
        println!(
            "moving buckets: [{}] -> [{}], {} ms; handing over {} bucket(s), {} connection(s) \
             left; waiting for [{}]",
            h.settled.join(", "),
            h.target.join(", "),
            h.elapsed_ms,
            h.outgoing_buckets,
            h.connections_left,
            h.waiting_for.join(", ")
        );
    }
    let nets: Vec<String> = hb
        .networks
        .iter()
        .map(|n| format!("net{} {}/{} peers heard", n.index, n.peers_heard, n.peers))
        .collect();
    println!("heartbeat networks: {}", nets.join(", "));
    if let Some(w) = &hb.witness {
        println!(
            "witness {} {}",
            w.address,
            if w.reachable {
                "reachable"
            } else {
                "NOT reachable"
            }
        );
    }
    let rejected: Vec<String> = hb
        .counters
        .rejected
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    if !rejected.is_empty() {
        println!("heartbeats rejected: {}", rejected.join(" "));
    }
    println!();
    println!(
        "{:<20} {:<24} {:>6} {:<9} {:>8} {:>6}",
        "MEMBER", "ADDRESS", "WEIGHT", "STATE", "BUCKETS", "SHARE"
    );
    for m in &s.members {
        let name = if m.this_node {
            format!("{} *", m.id)
        } else {
            m.id.clone()
        };
        println!(
            "{:<20} {:<24} {:>6} {:<9} {:>8} {:>5.1}%",
            truncate(&name, 20),
            truncate(&m.address.to_string(), 24),
            m.weight,
            m.state,
            m.buckets,
            100.0 * m.buckets as f64 / s.buckets_total as f64
        );
    }
    println!();
    for v in &s.vips {
        println!("VIP {}", v.address);
        let mut line = String::from("   ");
        for r in &v.rules {
            if line.len() + r.len() + 2 > 78 {
                println!("{line}");
                line = String::from("   ");
            }
            line.push(' ');
            line.push_str(r);
        }
        if v.rules.is_empty() {
            line.push_str(" (no port rules: every packet by client address)");
        }
        println!("{line}");
    }
    println!();
    let t = &s.traffic;
    println!(
        "accepted {} packets ({})   dropped (other members') {} packets ({})",
        t.accepted_packets,
        human_bytes(t.accepted_bytes),
        t.dropped_packets,
        human_bytes(t.dropped_bytes)
    );
    let nonzero: Vec<String> = s
        .counters
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !nonzero.is_empty() {
        let mut line = String::from("counters:");
        for c in nonzero {
            if line.len() + c.len() + 1 > 78 {
                println!("{line}");
                line = String::from("         ");
            }
            line.push(' ');
            line.push_str(&c);
        }
        println!("{line}");
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('~');
        t
    }
}

fn print_whois(entries: &[WhoisEntry]) {
    for e in entries {
        if let Some(err) = &e.error {
            println!("{}: {err}", e.client);
            continue;
        }
        let fmt = |p: &control::Placement| {
            format!(
                "bucket {:>5} -> {}",
                p.bucket,
                p.owner.as_deref().unwrap_or("(nobody)")
            )
        };
        if let Some(c) = &e.by_client {
            println!("{:<28} client affinity:     {}", e.client, fmt(c));
        }
        if let Some(c) = &e.by_connection {
            println!("{:<28} connection affinity: {}", "", fmt(c));
        }
    }
}
