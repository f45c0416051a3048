//! farmd: shares a virtual IP between the members of a farm; each member answers its share of
//! the clients, chosen by an XDP filter.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use farm_daemon::{config::Config, daemon::Daemon, secret::Secret};

/// farmd - the farm daemon: shares virtual IPs (VIPs) between servers on one LAN with no load
/// balancer in front. Every member receives every frame sent to a VIP; an XDP program on each
/// member keeps only the clients whose hash bucket this member owns.
///
/// Run as root (XDP, addresses, raw sockets). Stop with SIGTERM or SIGINT: a serving member
/// first hands its buckets to the others (keeping connections, at most
/// handover.stop_drain_timeout_s), then farmd removes its VIPs, programs and MAC filter entry
/// and leaves the host as it found it. SIGHUP re-reads the configuration file and applies what
/// can change while running (as `farmctl reload`); an invalid file changes nothing.
///
/// Where to run it: under systemd with config/farmd.service (Type=notify, watchdog; mirror-group
/// members add config/farmd-mirror.conf), or in a network namespace with `nsenter
/// --net=/run/netns/NAME farmd ...`. `ip netns exec` gives farmd a fresh /sys without a bpf
/// filesystem: farmd refuses unless runtime.bpffs names one mounted in the host. Wherever it
/// runs, a member whose XDP program is gone never answers for the VIPs (they live on
/// dataplane.vip_device, lo by default, never on the farm interface).
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Exit status: 0 stopped cleanly, 1 runtime error, 2 invalid configuration.\n\
Example: farmd --config /etc/farm/farm.toml\n         farmd --check-config /etc/farm/farm.toml"
)]
struct Args {
    /// Configuration file (TOML); see config/reference.toml.
    #[arg(
        long,
        short,
        value_name = "FILE",
        required_unless_present = "check_config"
    )]
    config: Option<PathBuf>,

    /// Validate FILE (and the cluster key it names) and exit; touches nothing on the host.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,

    /// Log filter: error, warn, info (default), debug, trace, or a tracing directive.
    #[arg(long, env = "FARM_LOG", default_value = "info")]
    log: String,
}

fn main() -> std::process::ExitCode {
    // First, before any thread: the upgrade socket's variable is not inherited further.
    let takeover = farm_daemon::upgrade::from_env();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(format!(
            "netlink_packet_route=error,{}",
            args.log
        )))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();

    if let Some(path) = &args.check_config {
        return match check(path) {
            Ok(summary) => {
                println!("{summary}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {}", report(&e));
                std::process::ExitCode::from(2)
            }
        };
    }
    let path = args.config.expect("clap requires --config");
    let cfg = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    raise_descriptor_limit();
    let takeover = match takeover.transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match run(cfg, takeover) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit of open files towards the hard one, to at most 65536 (systemd and
/// most shells start services at 1024; commands farmd runs inherit it, and some of them walk
/// every possible descriptor): farmd's sockets, maps and health checks must not run out
/// because a client holds connections open.
fn raise_descriptor_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let want = |l: &libc::rlimit| l.rlim_max.min(65536);
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < want(&l) {
            let before = l.rlim_cur;
            l.rlim_cur = want(&l);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) == 0 {
                tracing::debug!("open files: limit raised from {before} to {}", l.rlim_cur);
            }
        }
    }
}

/// The error and its causes, each cause once: most of farm's errors already name their cause
/// in their message, and printing the chain as well would say it twice.
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn check(path: &std::path::Path) -> anyhow::Result<String> {
    let cfg = Config::load(path)?;
    Secret::load(&cfg.secret_file)?;
    Ok(format!(
        "{}: OK (node {} on {}, {} member(s), {} VIP(s))",
        path.display(),
        cfg.node_id,
        cfg.interface,
        cfg.members.len(),
        cfg.vips.len()
    ))
}

fn run(cfg: Config, takeover: Option<std::os::unix::net::UnixStream>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let (daemon, listener) = match takeover {
            // Started by `farmctl upgrade` to take over from the running farmd.
            Some(sock) => Daemon::adopt(cfg, sock)
                .await
                .context("taking over from the running farmd (it goes on serving)")?,
            None => Daemon::start(cfg).await?,
        };
        daemon.run(listener).await?;
        Ok(())
    })
}
