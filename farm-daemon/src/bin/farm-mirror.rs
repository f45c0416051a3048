//! farm-mirror: the replication side of mirror mode.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use farm_daemon::secret::Secret;
use farm_mirror::{
    fs::MirrorFs,
    link::{Link, Options},
    replica::{self, Replica},
};

/// farm-mirror - synchronous replication of a directory from the primary to the secondary,
/// by hand.
///
/// The secondary keeps a replica directory up to date with what the primary's application
/// writes, and makes it durable before the primary's fsync returns. Sessions are authenticated
/// with the farm's cluster key. farmd runs the same replication itself for a `[mirror]` group
/// (roles, failover, resync); this tool is for trying it out and for measurements.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Exit status: 0 stopped, 1 runtime error, 2 bad arguments or key file."
)]
struct Args {
    /// The cluster key file (cluster.secret_file in farmd's configuration).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,

    /// Log filter: error, warn, info (default), debug, trace.
    #[arg(long, env = "FARM_LOG", default_value = "info")]
    log: String,

    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand, Debug)]
enum Role {
    /// Serve the application a replicated directory at MOUNT (FUSE) whose data lives in
    /// BACKING: first copies BACKING to the secondary's replica, then ships every change;
    /// fsync, fdatasync and O_SYNC/O_DSYNC writes return once the secondary has the data too.
    /// SIGTERM or SIGINT unmounts (stop the application first).
    Primary {
        /// The local directory that holds the data.
        #[arg(long, value_name = "DIR")]
        backing: PathBuf,
        /// Where the application sees the replicated directory (an empty directory).
        #[arg(long, value_name = "DIR")]
        mount: PathBuf,
        /// The secondary's farm-mirror (its --listen address).
        #[arg(long, value_name = "ADDR:PORT")]
        secondary: SocketAddr,
        /// Past this much data waiting for the secondary, the replica is declared out of sync
        /// (degraded) instead of slowing the application down further.
        #[arg(long, value_name = "MIB", default_value_t = 256)]
        max_in_flight_mib: usize,
    },
    /// Receive the primary's changes into REPLICA (an existing directory) and acknowledge its
    /// syncs once durable. One primary at a time; it reconnects after a network failure.
    Secondary {
        /// The replica directory.
        #[arg(long, value_name = "DIR")]
        replica: PathBuf,
        /// Where to listen for the primary (the mirror network address of this node).
        #[arg(long, value_name = "ADDR:PORT")]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let key = match Secret::load(&args.key) {
        Ok(s) => s.mirror_key(),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match args.role {
        Role::Secondary { replica, listen } => secondary(&replica, listen, &key),
        Role::Primary {
            backing,
            mount,
            secondary,
            max_in_flight_mib,
        } => primary(&backing, &mount, secondary, max_in_flight_mib, &key),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn primary(
    backing: &std::path::Path,
    mount: &std::path::Path,
    peer: SocketAddr,
    max_in_flight_mib: usize,
    key: &[u8; 32],
) -> anyhow::Result<()> {
    // SIGTERM and SIGINT are taken by sigwait below, in this thread only: block them before
    // any thread starts (threads inherit the mask).
    // SAFETY: plain signal-mask calls on a local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let backing = backing
        .canonicalize()
        .with_context(|| format!("backing directory {}", backing.display()))?;
    let link = Link::start(
        peer,
        key,
        &backing,
        Options {
            max_queued_bytes: max_in_flight_mib << 20,
            auto_degrade: true,
            generation: 0,
            record_base: None,
        },
    );
    // The replica is brought in sync before the application is let in.
    while !link.wait_in_sync(std::time::Duration::from_secs(10)) {
        let st = link.status();
        tracing::info!(
            "waiting for the secondary {peer} to be in sync ({}{})",
            st.state.name(),
            st.resync_error
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    let fs = MirrorFs::new(&backing, link);
    let options = [
        fuser::MountOption::FSName("farm-mirror".into()),
        fuser::MountOption::AllowOther,
        fuser::MountOption::DefaultPermissions,
    ];
    let session = fuser::spawn_mount2(fs, mount, &options)
        .with_context(|| format!("mounting {}", mount.display()))?;
    tracing::info!(
        "primary: {} served at {}, replicated to {peer}",
        backing.display(),
        mount.display()
    );
    let mut sig: libc::c_int = 0;
    // SAFETY: waits for one of the blocked signals.
    unsafe { libc::sigwait(&set, &mut sig) };
    tracing::info!("signal {sig}: unmounting {}", mount.display());
    drop(session);
    Ok(())
}

fn secondary(dir: &std::path::Path, listen: SocketAddr, key: &[u8; 32]) -> anyhow::Result<()> {
    let r = Replica::open(dir)?;
    replica::serve(listen, r, key).context("serving the primary")
}
