//! farmctl: asks a running farmd what it is doing. One module per verb's renderer; this file
//! holds the command line and sends the request.

mod drill;
mod follow;
mod mirror;
mod reload;
mod render;
mod status;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use farm_daemon::control::{self, Request, Response};

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
    /// Replace the running farmd by a new binary, in place, unnoticed by the farm.
    ///
    /// The new farmd (BINARY, default: the file farmd was started from, e.g. the version a
    /// package upgrade just installed) takes over the XDP and tc links (one BPF_LINK_UPDATE
    /// each: never a moment without a program), the maps, the heartbeat identity and sequence,
    /// and the sockets; peers see no restart, no bucket moves, no loss; connections go on.
    /// Refused while a bucket move, drill or stop is under way (retry when it completed), for
    /// a mirror group member, or when the configuration file was edited and not reloaded. If
    /// the new binary fails to start or take over, the running farmd goes on serving and the
    /// error says why (exit status 1). Under systemd the service follows the new process.
    Upgrade {
        /// The farmd binary to run instead of the running one.
        #[arg(long, value_name = "BINARY")]
        binary: Option<PathBuf>,
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
        Command::Upgrade { binary } => (
            Request::Upgrade {
                // farmd runs it: a relative path means the one here.
                binary: binary
                    .as_ref()
                    .map(|b| std::path::absolute(b).unwrap_or_else(|_| b.clone())),
            },
            None,
        ),
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
                && !render::confirm(
                    "Make this member the mirror group's primary whatever its copy?",
                    "a forced promotion may lose acknowledged data; add --yes to run it from a \
                     script",
                )
            {
                return ExitCode::from(1);
            }
            (Request::MirrorPromote { force: true }, None)
        }
        Command::Drill { status: true, .. } => (Request::DrillStatus, None),
        Command::Drill { member, yes, .. } => {
            if !yes && !drill::confirm_drill(member.as_deref()) {
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
    // An upgrade waits for the new farmd to load its programs (the verifier) and take over.
    let within = if matches!(req, Request::Upgrade { .. }) {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(10)
    };
    let resp = match control::request(&args.socket, &req, within) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("farmctl: {e}");
            return ExitCode::from(2);
        }
    };
    if let (Response::Planned { outcome, message }, Some(wait)) = (&resp, wait) {
        let drain = matches!(req, Request::Drain { .. });
        return follow::follow(&args, drain, *outcome, message, wait);
    }
    if let (Response::Drill(r), Request::Drill { .. }) = (&resp, &req) {
        return drill::follow_drill(&args, r);
    }
    if args.json {
        match &resp {
            Response::Reload(r) => render::print_json(r),
            Response::Drill(r) => render::print_json(r),
            Response::Status(s) => render::print_json(s),
            Response::Whois { entries } => render::print_json(entries),
            Response::Buckets(b) => render::print_json(b),
            Response::Metrics { text } => print!("{text}"),
            Response::Dashboard { json } => println!("{json}"),
            Response::Simulation(sim) => render::print_json(sim),
            Response::Mirror(m) => render::print_json(m),
            Response::Planned { .. }
            | Response::Upgraded { .. }
            | Response::Checks { .. }
            | Response::Error { .. }
            | Response::MirrorDone { .. } => render::print_json(&resp),
        }
    } else {
        match &resp {
            Response::Status(s) => status::print_status(s),
            Response::Whois { entries } => status::print_whois(entries),
            Response::Planned { message, .. } => println!("{message}"),
            Response::Buckets(b) => status::print_buckets(b),
            Response::Metrics { text } => print!("{text}"),
            Response::Dashboard { json } => println!("{json}"),
            Response::Simulation(sim) => status::print_simulation(sim),
            Response::Checks {
                healthy,
                damped,
                checks,
            } => status::print_checks(*healthy, *damped, checks),
            Response::Reload(r) => {
                reload::print_reload(r, matches!(req, Request::Reload { dry_run: true }))
            }
            Response::Drill(r) => drill::print_drill(r),
            Response::Mirror(m) => mirror::print_mirror(m),
            Response::MirrorDone { message } | Response::Upgraded { message, .. } => {
                println!("{message}")
            }
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
