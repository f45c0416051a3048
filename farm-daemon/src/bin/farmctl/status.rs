//! `farmctl status`, `buckets`, `simulate-failure`, `checks`, `whois`: their human output.

use farm_daemon::control::{self, Status, WhoisEntry};

use crate::{
    mirror::print_mirror,
    render::{bytes, truncate},
};

pub fn print_status(s: &Status) {
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
    if !s.departed.is_empty() {
        println!(
            "left by a planned stop, not counted for quorum until they rejoin: {}",
            s.departed.join(", ")
        );
    }
    let older: Vec<String> = s
        .members
        .iter()
        .filter(|m| {
            m.heartbeat_version != 0 && m.heartbeat_version < farm_daemon::heartbeat::VERSION
        })
        .map(|m| format!("{} (v{})", m.id, m.heartbeat_version))
        .collect();
    if !older.is_empty() {
        println!(
            "farm {}; members speaking an older heartbeat version (upgrade in progress): {}",
            s.version,
            older.join(", ")
        );
    }
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
    if let Some(q) = &s.queued {
        println!("queued: {q}");
    }
    if s.stopping {
        println!("STOPPING: handing buckets over before leaving");
    }
    if let Some(d) = &s.drill {
        let result = d
            .outcome()
            .unwrap_or_else(|| format!("running ({})", d.phase));
        println!(
            "last drill: {} crashed, {}",
            d.member,
            truncate(&result, 56)
        );
    }
    if let Some(f) = &s.last_failover {
        println!(
            "last failover: {} lost {:.0} s ago, its buckets served here {} ms after its last \
             heartbeat ({} in all)",
            f.member, f.ago_s, f.duration_ms, s.failovers
        );
    }
    if !s.checks_failing.is_empty() {
        println!(
            "health checks not passing: {} (farmctl checks)",
            s.checks_failing.join(", ")
        );
    }
    let nets: Vec<String> = hb
        .networks
        .iter()
        .map(|n| format!("net{} {}/{} peers heard", n.index, n.peers_heard, n.peers))
        .collect();
    println!("heartbeat networks: {}", nets.join(", "));
    let (send, recv) = (&hb.lateness.send, &hb.lateness.receive);
    println!(
        "heartbeat lateness p99/max: send {:.1}/{:.1} ms, receive {:.1}/{:.1} ms  (thread: {}{}{})",
        send.quantile_us(0.99) as f64 / 1e3,
        send.max_us as f64 / 1e3,
        recv.quantile_us(0.99) as f64 / 1e3,
        recv.max_us as f64 / 1e3,
        if hb.scheduling.policy == "other" || hb.scheduling.policy.is_empty() {
            "normal priority".to_string()
        } else {
            format!("{} {}", hb.scheduling.policy, hb.scheduling.priority)
        },
        if hb.scheduling.memory_locked {
            ", memory locked"
        } else {
            ""
        },
        if hb.main_loop_stalled {
            "; MAIN LOOP STALLED: this member is silent"
        } else {
            ""
        }
    );
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
        bytes(t.accepted_bytes),
        t.dropped_packets,
        bytes(t.dropped_bytes)
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
    if let Some(m) = &s.mirror {
        println!();
        print_mirror(m);
    }
}

pub fn print_buckets(b: &control::BucketReport) {
    println!(
        "{:<20} {:>8} {:>6} {:>14} {:>12}",
        "MEMBER", "BUCKETS", "SHARE", "PACKETS SEEN", "BYTES"
    );
    for m in &b.members {
        println!(
            "{:<20} {:>8} {:>5.1}% {:>14} {:>12}",
            truncate(&m.id, 20),
            m.buckets,
            100.0 * m.buckets as f64 / b.buckets_total as f64,
            m.packets,
            bytes(m.bytes)
        );
    }
    let info = |i: &control::BucketInfo| {
        format!(
            "{:>6} {:<16} {:<9} {:>10} {:>10} {:>12}",
            i.bucket,
            truncate(i.owner.as_deref().unwrap_or("(nobody)"), 16),
            i.state,
            i.accepted_packets,
            i.dropped_packets,
            bytes(i.accepted_bytes + i.dropped_bytes)
        )
    };
    let header = format!(
        "{:>6} {:<16} {:<9} {:>10} {:>10} {:>12}",
        "BUCKET", "OWNER", "HERE", "ACCEPTED", "DROPPED", "BYTES"
    );
    if let Some(d) = &b.detail {
        println!();
        println!("{header}");
        println!("{}", info(d));
    }
    if !b.busiest.is_empty() {
        println!();
        println!("busiest buckets (packets seen by this node):");
        println!("{header}");
        for i in &b.busiest {
            println!("{}", info(i));
        }
    }
}

pub fn print_simulation(s: &control::Simulation) {
    if s.buckets == 0 {
        println!("{} owns no bucket now: nothing would move", s.member);
        return;
    }
    let moves: Vec<String> = s.moves.iter().map(|(m, n)| format!("{n} to {m}")).collect();
    println!(
        "if {} failed now, its {} bucket(s) would move: {}",
        s.member,
        s.buckets,
        if moves.is_empty() {
            "to nobody (no other member serves: its clients go unanswered)".to_string()
        } else {
            moves.join(", ")
        }
    );
    println!(
        "buckets of other members that would move: {}; the rest would {}",
        s.others_moved,
        if s.quorum_after {
            "keep quorum and serve"
        } else {
            "LOSE QUORUM and stop serving"
        }
    );
}

pub fn print_checks(healthy: bool, damped: bool, checks: &[farm_daemon::checks::CheckStatus]) {
    if checks.is_empty() {
        println!("no health checks configured ([[check]] in the config): always healthy");
        return;
    }
    println!(
        "{}{}",
        if healthy { "healthy" } else { "UNHEALTHY" },
        if damped {
            " (checks pass, but flap damping holds this node out for now)"
        } else {
            ""
        }
    );
    println!();
    println!(
        "{:<16} {:<8} {:<8} {:>7} {:>9}  LAST RESULT",
        "CHECK", "KIND", "STATE", "STREAK", "AGE"
    );
    for c in checks {
        let state = serde_json::to_value(c.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let last = c
            .last
            .as_ref()
            .map_or("(none yet)".to_string(), |o| o.detail.clone());
        let age = c
            .last_age_ms
            .map_or("-".to_string(), |ms| format!("{:.1} s", ms as f64 / 1000.0));
        println!(
            "{:<16} {:<8} {:<8} {:>7} {:>9}  {}",
            truncate(&c.name, 16),
            c.kind,
            state,
            c.streak,
            age,
            truncate(&last, 26)
        );
        println!(
            "{:<16} {} (every {} ms, rise {}, fall {})",
            "",
            truncate(&c.target, 40),
            c.interval_ms,
            c.rise,
            c.fall
        );
    }
}

pub fn print_whois(entries: &[WhoisEntry]) {
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
