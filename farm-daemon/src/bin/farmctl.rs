//! farmctl: asks a running farmd what it is doing.

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use farm_daemon::control::{self, Outcome, Request, Response, Status, WhoisEntry};

/// farmctl - the command-line client of farmd.
///
/// Talks to the farmd on this host over its control socket (root only).
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Exit status: 0 success, 1 farmd answered with an error (a drain/resume did not \
complete within --timeout, a reload was refused, a drill failed or missed its objective, \
checks fail), 2 farmd could not be reached."
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
    /// Hand this node's buckets to the other members without breaking connections.
    ///
    /// New connections go to the new owners at once; this node keeps serving the connections
    /// it holds until they end (or handover.drain_timeout_s passes, which cuts the rest). Shows
    /// progress until the node holds no bucket. Only one planned change runs at a time in the
    /// farm: a drain requested while another move is in progress is queued. Refused when no
    /// other member serves, unless --force. The drain lasts until `farmctl resume` or a
    /// restart of farmd.
    Drain {
        /// Drain even if no other member serves (the VIPs then go unanswered).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Take this node's share back after a drain (the same connection-keeping way).
    Resume {
        #[command(flatten)]
        wait: Wait,
    },
    /// The health checks of this node: state, streak, last result.
    ///
    /// A check passes after `rise` passes in a row and fails after `fall` failures in a row;
    /// the node is healthy while every check passes. Exit status 1 when it is not.
    Checks,
    /// The bucket map: buckets and traffic per member, the busiest buckets.
    ///
    /// Every member sees every packet, so this node's counters cover the whole farm's traffic
    /// (its own buckets accepted, the others' dropped). --json adds the owner of every bucket.
    Buckets {
        /// Show this bucket in detail (see `farmctl whois` for a client's bucket).
        #[arg(long, value_name = "N")]
        bucket: Option<u32>,
    },
    /// Which buckets would move where if MEMBER failed now. Changes nothing.
    SimulateFailure {
        #[arg(value_name = "MEMBER")]
        member: String,
    },
    /// Read farmd's configuration file again and apply it (as SIGHUP does).
    ///
    /// VIPs and their port rules, weights, checks, hooks and timers change without dropping
    /// established connections: a weight change moves buckets the connection-keeping way, once
    /// every live member has loaded the same weights (reload each member; the move waits for
    /// the last). An invalid file changes nothing and the field errors are printed; a change
    /// that needs a restart (node id, interface, member list or addresses, key, MAC, ports,
    /// socket, metrics listener) is refused as a whole.
    Reload {
        /// Only show what would change (buckets that would move, VIPs added or removed).
        #[arg(long)]
        diff: bool,
    },
    /// Recovery drill: make a member act as if it crashed and measure the RTO as a client.
    ///
    /// MEMBER (default: the first other serving member) stops sending heartbeats and its data
    /// plane stops taking traffic, as if its host died (connections it holds break, as in a
    /// real crash). This node plays a client from one of drill.probe_addresses whose bucket
    /// MEMBER owns, pinging a VIP every 5 ms through the switch, and measures how long that
    /// bucket went unanswered. Then MEMBER rejoins and takes its buckets back the
    /// connection-keeping way. Prints the measured RTO against drill.rto_objective_ms; exit
    /// status 1 when it missed the objective or the drill failed. The result stays in `status`
    /// and the metrics.
    Drill {
        /// The member to crash (not this one).
        #[arg(long, value_name = "MEMBER")]
        member: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
        /// Show the drill in progress or the last result instead of starting one.
        #[arg(long, conflicts_with_all = ["member", "yes"])]
        status: bool,
    },
    /// The mirror group (mirror mode): roles, sync state, swaps, forced promotion.
    #[command(subcommand)]
    Mirror(MirrorCommand),
}

#[derive(Subcommand, Debug)]
enum MirrorCommand {
    /// Roles of both members, whether the replica is in sync, replication lag (bytes not yet
    /// durable on the secondary, age of the oldest), resync progress and speed, data
    /// generations, and what the group waits for.
    Status,
    /// Planned role swap, no data loss: the primary stops the application, flushes every change
    /// to the secondary and unmounts; the secondary then mounts its replica, starts the
    /// application and takes the VIP. Refused unless the secondary is in sync. Run on either
    /// member.
    Swap,
    /// Last resort: make THIS member primary whatever the state of its copy (an incomplete
    /// copy, or one older than the peer's). What the old primary acknowledged that this copy
    /// lacks is lost for good once the old primary rejoins (it is resynced from this one).
    /// Refused while the peer is primary and reachable.
    Promote {
        /// Required: the promotion may lose acknowledged data.
        #[arg(long)]
        force: bool,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
    },
}

#[derive(clap::Args, Debug, Clone, Copy)]
struct Wait {
    /// Return once farmd has taken the request instead of waiting for the move to complete.
    #[arg(long)]
    no_wait: bool,
    /// Stop waiting (exit status 1) after this many seconds; the move itself goes on.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    timeout: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (req, wait) = match &args.command {
        Command::Status => (Request::Status, None),
        Command::Whois { clients } => (
            Request::Whois {
                clients: clients.clone(),
            },
            None,
        ),
        Command::Drain { force, wait } => (Request::Drain { force: *force }, Some(*wait)),
        Command::Resume { wait } => (Request::Resume, Some(*wait)),
        Command::Checks => (Request::Checks, None),
        Command::Buckets { bucket } => (Request::Buckets { bucket: *bucket }, None),
        Command::SimulateFailure { member } => (
            Request::SimulateFailure {
                member: member.clone(),
            },
            None,
        ),
        Command::Reload { diff } => (Request::Reload { dry_run: *diff }, None),
        Command::Mirror(MirrorCommand::Status) => (Request::MirrorStatus, None),
        Command::Mirror(MirrorCommand::Swap) => (Request::MirrorSwap, None),
        Command::Mirror(MirrorCommand::Promote { force, yes }) => {
            if !force {
                eprintln!(
                    "farmctl: a forced promotion may lose data the old primary acknowledged; \
                     it needs --force (see farmctl mirror status first)"
                );
                return ExitCode::from(1);
            }
            if !yes
                && !confirm(
                    "Make this member the mirror group's primary whatever its copy?",
                    "a forced promotion may lose acknowledged data; add --yes to run it from a \
                     script",
                )
            {
                return ExitCode::from(1);
            }
            (Request::MirrorPromote, None)
        }
        Command::Drill { status: true, .. } => (Request::DrillStatus, None),
        Command::Drill { member, yes, .. } => {
            if !yes && !confirm_drill(member.as_deref()) {
                return ExitCode::from(1);
            }
            (
                Request::Drill {
                    member: member.clone(),
                },
                None,
            )
        }
    };
    let resp = match control::request(&args.socket, &req, Duration::from_secs(10)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("farmctl: {e}");
            return ExitCode::from(2);
        }
    };
    if let (Response::Planned { outcome, message }, Some(wait)) = (&resp, wait) {
        let drain = matches!(req, Request::Drain { .. });
        return follow(&args, drain, *outcome, message, wait);
    }
    if let (Response::Drill(r), Request::Drill { .. }) = (&resp, &req) {
        return follow_drill(&args, r);
    }
    if args.json {
        match &resp {
            Response::Reload(r) => print_json(r),
            Response::Drill(r) => print_json(r),
            Response::Status(s) => print_json(s),
            Response::Whois { entries } => print_json(entries),
            Response::Buckets(b) => print_json(b),
            Response::Metrics { text } => print!("{text}"),
            Response::Dashboard { json } => println!("{json}"),
            Response::Simulation(sim) => print_json(sim),
            Response::Mirror(m) => print_json(m),
            Response::Planned { .. }
            | Response::Checks { .. }
            | Response::Error { .. }
            | Response::MirrorDone { .. } => print_json(&resp),
        }
    } else {
        match &resp {
            Response::Status(s) => print_status(s),
            Response::Whois { entries } => print_whois(entries),
            Response::Planned { message, .. } => println!("{message}"),
            Response::Buckets(b) => print_buckets(b),
            Response::Metrics { text } => print!("{text}"),
            Response::Dashboard { json } => println!("{json}"),
            Response::Simulation(sim) => print_simulation(sim),
            Response::Checks {
                healthy,
                damped,
                checks,
            } => print_checks(*healthy, *damped, checks),
            Response::Reload(r) => {
                print_reload(r, matches!(req, Request::Reload { dry_run: true }))
            }
            Response::Drill(r) => print_drill(r),
            Response::Mirror(m) => print_mirror(m),
            Response::MirrorDone { message } => println!("{message}"),
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
        Response::Checks { healthy: false, .. } => ExitCode::from(1),
        Response::Reload(r) if !r.restart_needed.is_empty() => ExitCode::from(1),
        Response::Drill(r) if r.finished && (r.error.is_some() || r.passed != Some(true)) => {
            ExitCode::from(1)
        }
        _ => ExitCode::SUCCESS,
    }
}

/// Asks before a drill (see `confirm`).
fn confirm_drill(member: Option<&str>) -> bool {
    let who = member.unwrap_or("another member");
    confirm(
        &format!(
            "The drill makes {who} act as if it crashed: its clients get no answer until the farm \
             takes over, and their connections break. Go on?"
        ),
        &format!(
            "a drill makes {who} act as if it crashed (its clients' connections break); add \
             --yes to run it from a script"
        ),
    )
}

/// Asks `question` on a terminal; without one, refuses with `without_terminal` (scripts pass
/// --yes).
fn confirm(question: &str, without_terminal: &str) -> bool {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    if !std::io::stdin().is_terminal() {
        eprintln!("farmctl: {without_terminal}");
        return false;
    }
    print!("{question} [y/N] ");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    matches!(line.trim(), "y" | "Y" | "yes")
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn print_mirror(m: &farm_daemon::mirror::GroupStatus) {
    println!("mirror group: VIP {} -> {}", m.vip, m.directory);
    println!(
        "  {:<12} {:<10} copy: generation {}, {}{}",
        m.node,
        m.role.name(),
        m.generation,
        if m.complete { "complete" } else { "INCOMPLETE" },
        if m.eligible {
            ""
        } else {
            " (not eligible to become primary by itself)"
        }
    );
    println!(
        "  {:<12} {:<10} {}",
        m.peer,
        if m.peer_alive {
            m.peer_role.name()
        } else {
            "unreachable"
        },
        if m.seen > m.generation {
            format!("announced generation {}", m.seen)
        } else {
            String::new()
        }
    );
    if let Some(r) = &m.replication {
        let detail = m
            .replication_detail
            .as_ref()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default();
        println!("replication to {}: {r}{detail}", m.peer);
        println!(
            "  lag {} (oldest {} ms), queued {}, {} sent, {} syncs acknowledged{}",
            bytes(m.lag_bytes),
            m.lag_ms,
            bytes(m.queued_bytes),
            bytes(m.bytes_sent),
            m.syncs_acknowledged,
            if m.recorded_paths > 0 {
                format!(", {} path(s) in the change record", m.recorded_paths)
            } else {
                String::new()
            }
        );
    }
    if let Some(r) = &m.resync {
        println!(
            "  resync pass {}: {}/{} entries, {} sent, {} equal, {}/s{}",
            r.pass,
            r.entries_done,
            r.entries_total,
            bytes(r.bytes_sent),
            bytes(r.bytes_same),
            bytes(r.bytes_per_second as u64),
            if r.full_check {
                " (every file compared by checksum)"
            } else {
                ""
            }
        );
    }
    if let Some(r) = &m.last_resync {
        println!(
            "  last resync: {} sent, {} found equal, {:.1} s, {}/s{}",
            bytes(r.bytes_sent),
            bytes(r.bytes_same),
            r.seconds,
            bytes(r.bytes_per_second as u64),
            if r.full_check {
                " (every file compared by checksum)"
            } else {
                " (change record)"
            }
        );
    }
    if let Some(p) = &m.primary_connected {
        println!(
            "replica: primary {p} connected{}, {} operations ({}) applied",
            if m.resyncing { ", RESYNCING" } else { "" },
            m.ops_applied,
            bytes(m.bytes_applied)
        );
    }
    if let Some(w) = &m.waiting {
        println!("waiting: {w}");
    }
    if let Some(t) = &m.last_takeover {
        println!("last takeover: {t}");
    }
}

fn print_reload(r: &control::ReloadReport, dry_run: bool) {
    let verdict = if !r.restart_needed.is_empty() {
        "REFUSED, nothing was changed: these changes need a restart of farmd"
    } else if r.changes.is_empty() {
        "nothing to change"
    } else if dry_run {
        "would change (nothing changed yet; `farmctl reload` applies it)"
    } else {
        "applied"
    };
    println!("{}: {verdict}", r.file);
    for c in &r.restart_needed {
        println!("  restart needed: {c}");
    }
    if !r.restart_needed.is_empty() && !r.changes.is_empty() {
        println!("  and, applied live after the restart:");
    }
    for c in &r.changes {
        println!("  {c}");
    }
    for w in &r.warnings {
        println!("  warning: {w}");
    }
    if r.shares.is_empty() {
        return;
    }
    let when = if r.waiting_for.is_empty() {
        "now".to_string()
    } else {
        format!(
            "once [{}] have the same weights (farmctl reload there)",
            r.waiting_for.join(", ")
        )
    };
    println!(
        "buckets: {} of the serving members' change owner, keeping connections, {when}",
        r.buckets_moving
    );
    println!("  {:<20} {:>8} {:>8}", "MEMBER", "NOW", "AFTER");
    for s in &r.shares {
        println!(
            "  {:<20} {:>8} {:>8}",
            truncate(&s.member, 20),
            s.now,
            s.after
        );
    }
}

fn drill_line(r: &control::DrillReport) -> String {
    let rto = r
        .rto_ms
        .map_or(String::new(), |ms| format!("; unanswered for {ms} ms"));
    format!(
        "{}: {} of {} probes answered{rto}",
        r.phase, r.probes_answered, r.probes_sent
    )
}

fn print_drill(r: &control::DrillReport) {
    println!(
        "drill {} of {}: probe client {} -> VIP {}",
        r.id, r.member, r.probe, r.vip
    );
    if !r.finished {
        println!(
            "  in progress, {:.1} s: {}",
            r.elapsed_ms as f64 / 1000.0,
            drill_line(r)
        );
        return;
    }
    match r.rto_ms {
        Some(ms) => println!(
            "  RTO {ms} ms measured by the probe client (objective {} ms, the farm's timers \
             allow ~{} ms): {}",
            r.objective_ms,
            r.expected_ms,
            if r.passed == Some(true) {
                "PASS"
            } else {
                "FAIL"
            }
        ),
        None => println!("  no RTO measured"),
    }
    println!(
        "  {} probes, {} answered, {:.1} s in all",
        r.probes_sent,
        r.probes_answered,
        r.elapsed_ms as f64 / 1000.0
    );
    if let Some(e) = &r.error {
        println!("  FAILED: {e}");
    }
}

/// Shows a drill until it is over (progress rewritten in place on a terminal).
fn follow_drill(args: &Args, started: &control::DrillReport) -> ExitCode {
    use std::io::{IsTerminal as _, Write as _};
    let tty = std::io::stdout().is_terminal() && !args.json;
    if !args.json {
        println!(
            "drill {}: {} acts as if crashed once the probe client {} gets steady answers \
             from {}",
            started.id, started.member, started.probe, started.vip
        );
    }
    let t0 = Instant::now();
    let mut last = String::new();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let r = match control::request(&args.socket, &Request::DrillStatus, Duration::from_secs(10))
        {
            Ok(Response::Drill(r)) if r.id == started.id => r,
            Ok(other) => {
                eprintln!("farmctl: unexpected answer from farmd: {other:?}");
                return ExitCode::from(1);
            }
            Err(e) => {
                eprintln!("farmctl: {e}");
                return ExitCode::from(2);
            }
        };
        if r.finished {
            if tty {
                println!();
            }
            if args.json {
                print_json(&r);
            } else {
                print_drill(&r);
            }
            return if r.error.is_none() && r.passed == Some(true) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            };
        }
        let line = drill_line(&r);
        if line != last && !args.json {
            let t = t0.elapsed().as_secs_f64();
            if tty {
                print!("\r\x1b[2K[{t:>5.1} s] {}", truncate(&line, 68));
                let _ = std::io::stdout().flush();
            } else if r.phase != last_phase(&last) {
                println!("[{t:>5.1} s] {line}");
            }
        }
        last = line;
    }
}

/// The phase a progress line starts with.
fn last_phase(line: &str) -> &str {
    line.split(':').next().unwrap_or("")
}

/// Shows a drain or resume until it completes: a line per change of state (rewritten in place
/// on a terminal). Exit status 0 when done, 1 when the wait timed out, 2 when farmd went away.
fn follow(args: &Args, drain: bool, outcome: Outcome, message: &str, wait: Wait) -> ExitCode {
    use std::io::{IsTerminal as _, Write as _};
    let tty = std::io::stdout().is_terminal() && !args.json;
    if !args.json {
        println!("{message}");
    }
    let started = Instant::now();
    let report = |done: bool, last: &str| {
        if args.json {
            print_json(&serde_json::json!({
                "outcome": outcome,
                "message": message,
                "done": done,
                "elapsed_s": started.elapsed().as_secs_f64(),
                "last": last,
            }));
        }
    };
    if wait.no_wait || outcome == Outcome::Cancelled {
        report(false, "");
        return ExitCode::SUCCESS;
    }
    let mut last = String::new();
    loop {
        let status = match control::request(&args.socket, &Request::Status, Duration::from_secs(10))
        {
            Ok(Response::Status(s)) => s,
            Ok(other) => {
                eprintln!("farmctl: unexpected answer from farmd: {other:?}");
                return ExitCode::from(1);
            }
            Err(e) => {
                if tty {
                    println!();
                }
                eprintln!("farmctl: {e}");
                return ExitCode::from(2);
            }
        };
        let me = status.members.iter().find(|m| m.this_node);
        let state = me.map_or("?", |m| m.state.as_str());
        let held = me.map_or(0, |m| m.buckets);
        let done = if drain {
            state == "drained"
        } else {
            state == "serving" && status.handover.is_none() && status.queued.is_none()
        };
        let t = started.elapsed().as_secs_f64();
        let line = if done {
            format!(
                "{} after {t:.1} s: this node holds {held} bucket(s)",
                if drain { "drained" } else { "resumed" }
            )
        } else if let Some(q) = &status.queued {
            format!("queued: {q}")
        } else if let Some(h) = &status.handover {
            format!(
                "{state}: {} bucket(s) handing over, {} connection(s) left; waiting for [{}]",
                h.outgoing_buckets,
                h.connections_left,
                h.waiting_for.join(", ")
            )
        } else {
            format!("{state}: this node holds {held} bucket(s)")
        };
        if line != last {
            if tty {
                print!("\r\x1b[2K[{t:>5.1} s] {}", truncate(&line, 68));
                let _ = std::io::stdout().flush();
            } else if !args.json {
                println!("[{t:>5.1} s] {line}");
            }
            last = line;
        }
        if done {
            if tty {
                println!();
            }
            report(true, &last);
            return ExitCode::SUCCESS;
        }
        if started.elapsed() >= Duration::from_secs(wait.timeout) {
            if tty {
                println!();
            }
            eprintln!(
                "farmctl: still not {} after {} s; the move goes on (see farmctl status)",
                if drain { "drained" } else { "resumed" },
                wait.timeout
            );
            report(false, &last);
            return ExitCode::from(1);
        }
        std::thread::sleep(Duration::from_millis(200));
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
    if let Some(m) = &s.mirror {
        println!();
        print_mirror(m);
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

fn print_buckets(b: &control::BucketReport) {
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
            human_bytes(m.bytes)
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
            human_bytes(i.accepted_bytes + i.dropped_bytes)
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

fn print_simulation(s: &control::Simulation) {
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

fn print_checks(healthy: bool, damped: bool, checks: &[farm_daemon::checks::CheckStatus]) {
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
