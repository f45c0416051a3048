//! farm-mirror: the replication side of mirror mode.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use farm_daemon::secret::Secret;
use farm_mirror::replica::{self, Replica};

/// farm-mirror - synchronous replication of a directory from the primary to the secondary.
///
/// The secondary keeps a replica directory up to date with what the primary's application
/// writes, and makes it durable before the primary's fsync returns. Sessions are authenticated
/// with the farm's cluster key.
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn secondary(dir: &std::path::Path, listen: SocketAddr, key: &[u8; 32]) -> anyhow::Result<()> {
    let r = Replica::open(dir)?;
    replica::serve(listen, &r, key).context("serving the primary")
}
