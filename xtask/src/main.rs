//! Developer tasks: `cargo xtask setup | test | demo | bench dataplane|failover|rolling|mirror|membership|upgrade|member`.
//!
//! xtask itself needs nothing but the stable toolchain, so that `cargo xtask setup` works on a
//! machine that cannot build the eBPF program yet.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

/// bpf-linker version known to work with this toolchain (see shared/reference/toolchain.md).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The LLVM major version inside the nightly toolchain's libLLVM.
const LLVM_FEATURE: &str = "llvm-22";

#[derive(Parser)]
#[command(about = "farm developer tasks")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks to build the eBPF program and run the tests
    /// (idempotent; fast when everything is there).
    Setup,
    /// Build everything, then run all tests: unit tests, XDP packet fixtures and the system
    /// tests (network namespaces; need root).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// A three-node web farm (NGINX, installed if missing) in network namespaces on this
    /// machine: status, traffic, a node killed and the measured RTO, its return, a recovery
    /// drill, then everything cleaned up.
    Demo,
    /// Benchmarks that print figures.
    Bench {
        /// dataplane: ns/packet and drop rate against nftables; failover: link-cut recovery
        /// against keepalived (--trials N); rolling: failed requests of a rolling restart
        /// against keepalived; mirror: mirror mode's fsync latency, write throughput and
        /// resync speed against the same directory without replication (--mib N, --fsyncs N);
        /// membership: buckets moved when a member is added or removed, against farm 0.1's
        /// assignment and Maglev's table; upgrade: the heartbeat gap peers see during
        /// `farmctl upgrade` (--trials N), beside a restart; member: what a member costs (farmd
        /// memory and CPU at rest in a farm of 5, XDP and farmd CPU per 10k VIP packets/s;
        /// --seconds N, --rates PPS,PPS).
        #[arg(value_parser = ["dataplane", "failover", "rolling", "mirror", "membership", "upgrade", "member"])]
        what: String,
        /// Extra arguments for the benchmark.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let r = match args.task {
        Task::Setup => setup(),
        Task::Test { args } => test(&args),
        Task::Demo => ensure_tools(&[("nginx", "nginx-light"), ("nsenter", "util-linux")])
            .and_then(|()| run_bin("farm-demo", &[])),
        Task::Bench { what, args } => {
            let mut all = vec![what];
            all.extend(args);
            // The comparisons need their peers: the kernel's own filter (nftables, ethtool) and
            // keepalived.
            ensure_tools(&[
                ("nft", "nftables"),
                ("ethtool", "ethtool"),
                ("keepalived", "keepalived"),
            ])
            .and_then(|()| run_bin("farm-bench", &all))
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn status(cmd: &mut Command) -> Result<()> {
    let s = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !s.success() {
        bail!("{cmd:?} failed ({s})");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let o = cmd.stderr(Stdio::null()).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn step(n: usize, total: usize, what: &str) {
    eprintln!("[{n}/{total}] {what}");
}

fn setup() -> Result<()> {
    let started = Instant::now();
    let total = 5;

    step(1, total, "nightly Rust toolchain (builds the eBPF program)");
    if output(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])).is_none() {
        eprintln!("      installing nightly ...");
        status(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    } else {
        eprintln!("      present");
    }

    step(2, total, "rust-src for nightly (-Z build-std=core)");
    let sysroot =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
            .context("asking nightly rustc for its sysroot")?;
    if Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/core")
        .exists()
    {
        eprintln!("      present");
    } else {
        eprintln!("      installing ...");
        status(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    step(
        3,
        total,
        &format!("bpf-linker {BPF_LINKER_VERSION} against the toolchain's LLVM"),
    );
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if have.contains(BPF_LINKER_VERSION) {
        eprintln!("      present ({have})");
    } else {
        install_bpf_linker(&sysroot)?;
    }

    step(
        4,
        total,
        "system tools for the tests (ip, bridge, nsenter, nft, ethtool, chromium for the status \
         page, systemd-nspawn to test the unit under a real systemd)",
    );
    ensure_tools(&[
        ("systemd-nspawn", "systemd-container"),
        ("ip", "iproute2"),
        ("bridge", "iproute2"),
        ("nsenter", "util-linux"),
        ("nft", "nftables"),
        ("ethtool", "ethtool"),
        ("chromium", "chromium"),
    ])?;

    step(
        5,
        total,
        &format!(
            "mirror mode: PostgreSQL (failover test), fsx {FSX_VERSION} (filesystem conformance)"
        ),
    );
    let has_pg = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().any(|e| e.path().join("bin/pgbench").exists()))
        .unwrap_or(false);
    if has_pg {
        eprintln!("      PostgreSQL present");
    } else {
        apt_install(&["postgresql"])?;
    }
    let fsx = tools_dir()?.join("bin/fsx");
    let have = output(Command::new(&fsx).arg("--version")).unwrap_or_default();
    if have.contains(FSX_VERSION) {
        eprintln!("      fsx present ({have})");
    } else {
        eprintln!(
            "      building fsx {FSX_VERSION} into {}",
            tools_dir()?.display()
        );
        status(
            cargo()
                .args(["install", "fsx", "--locked", "--version", FSX_VERSION])
                .arg("--root")
                .arg(tools_dir()?),
        )?;
    }

    eprintln!("setup done in {:.0?}", started.elapsed());
    Ok(())
}

/// Builds bpf-linker against the libLLVM that ships inside the nightly toolchain (no system
/// LLVM is needed). Its rpath points at the prefix directory, which therefore must outlive the
/// build: it lives under the user's data directory, not /tmp.
fn install_bpf_linker(sysroot: &str) -> Result<()> {
    let home = std::env::var("HOME").context("HOME is not set")?;
    let prefix = PathBuf::from(home).join(".local/share/farm/llvm");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let mut versioned = None;
    for entry in std::fs::read_dir(Path::new(sysroot).join("lib"))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("libLLVM") {
            let link = lib.join(&name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(entry.path(), &link)
                .with_context(|| format!("linking {}", link.display()))?;
            if name.starts_with("libLLVM.so.") {
                versioned = Some(name);
            }
        }
    }
    let versioned = versioned.context("no libLLVM.so.* in the nightly toolchain")?;
    let plain = lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&plain);
    std::os::unix::fs::symlink(&versioned, &plain)?;
    eprintln!(
        "      building bpf-linker (takes a few minutes; LLVM from {})",
        prefix.display()
    );
    status(
        cargo()
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", LLVM_FEATURE])
            .env("LLVM_PREFIX", &prefix),
    )
}

/// fsx (the File System eXerciser, Rust rewrite) runs on the replicated directory in the
/// mirror tests; the tests look for it here.
const FSX_VERSION: &str = "0.3.2";

fn tools_dir() -> Result<PathBuf> {
    let home = std::env::var("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".local/share/farm/tools"))
}

/// Installs the Debian packages of the tools (command, package) that are not on PATH.
fn ensure_tools(tools: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(tool, _)| output(Command::new("which").arg(tool)).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        eprintln!("      present");
        return Ok(());
    }
    apt_install(&missing)
}

/// Installs Debian packages. Their services (nginx, keepalived) are not started: the demo and
/// the benchmarks run their own instances in network namespaces, and nothing is left running
/// on the host (a policy-rc.d that refuses every start is in place during the install, unless
/// the machine has its own).
fn apt_install(pkgs: &[&str]) -> Result<()> {
    eprintln!("      installing {} with apt-get ...", pkgs.join(" "));
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists()
        && std::fs::write(
            policy,
            "#!/bin/sh\n# farm xtask: no service starts during install\nexit 101\n",
        )
        .and_then(|()| {
            std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        })
        .is_ok();
    let r = status(
        Command::new("apt-get")
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .and_then(|()| {
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(pkgs)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    });
    if ours {
        let _ = std::fs::remove_file(policy);
    }
    r
}

fn test(extra: &[String]) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc_geteuid() } == 0;
    if !root {
        eprintln!("xtask: not root: the system tests will say SKIPPED loudly (CI runs as root).");
    }
    eprintln!("xtask: building the workspace (farmd, farmctl, the eBPF program, the tests)");
    status(cargo().args(["build", "--workspace", "--all-targets"]))?;
    eprintln!("xtask: running all tests");
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--no-fail-fast"]);
    if !extra.is_empty() {
        cmd.arg("--").args(extra);
    }
    status(&mut cmd)
}

fn run_bin(bin: &str, args: &[String]) -> Result<()> {
    // farmd and farmctl are binaries of another package: build them in the same profile.
    status(cargo().args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "farm-daemon",
        "--bins",
    ]))?;
    status(
        cargo()
            .args([
                "run",
                "--quiet",
                "--release",
                "-p",
                "farm-tests",
                "--bin",
                bin,
                "--",
            ])
            .args(args),
    )
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
