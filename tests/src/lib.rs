//! farm's system-test harness: a switch (a Linux bridge in its own network namespace), node and
//! client hosts as network namespaces joined to it by veth pairs, real `farmd` processes, small
//! TCP/UDP servers that answer with their node's name, and clients with hundreds of source
//! addresses.
//!
//! Everything created gets a name unique to the test run (the process id is part of it), is
//! removed on drop (also while a test panics), and namespaces left by runs that were killed are
//! removed by the next run. Every wait is bounded.

pub mod attacker;
pub mod bpf;
pub mod busy;
pub mod fixture;
pub mod frames;
pub mod keepalived;
pub mod mirror_tool;
pub mod netns;
pub mod nspawn;
pub mod previous;
pub mod probe;
pub mod topology;
pub mod traffic;

use std::path::PathBuf;

/// Path of one of the workspace's binaries (`farmd`, `farmctl`), built in the same profile as
/// the running executable: next to it (a binary) or one level up (a test in `deps/`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("executable has a directory");
    let candidates = [dir.join(name), dir.parent().unwrap_or(dir).join(name)];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{name} is missing next to {}: build the workspace first (`cargo build`; \
                 `cargo xtask test` does it)",
                exe.display()
            )
        })
}

/// Waits until `ready` gives a value, trying every `every` for at most `within`; panics with
/// `what` (and how long it waited) otherwise. Every wait of the system tests is bounded.
pub fn wait_until<T>(
    what: &str,
    within: std::time::Duration,
    every: std::time::Duration,
    mut ready: impl FnMut() -> Option<T>,
) -> T {
    let started = std::time::Instant::now();
    loop {
        if let Some(v) = ready() {
            return v;
        }
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(every);
    }
}

/// Whether this process may run the system tests (root). When it may not: in CI (`CI` set) this
/// panics, since a CI run must never skip them; elsewhere it prints a loud warning and the
/// caller returns.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: system tests need root, and CI must not skip them");
    }
    eprintln!();
    eprintln!("################################################################################");
    eprintln!("## SKIPPED {test}: system tests need root (network namespaces, XDP).");
    eprintln!("## Run them with `sudo -E cargo xtask test` or as root.");
    eprintln!("################################################################################");
    eprintln!();
    false
}

/// The kernel settings farmd keeps on a node's farm interface (eth0) so that the kernel alone
/// never claims a VIP there, as `key=value` (see farm-daemon's `sysctl` module).
pub fn fail_silent_sysctls(ns: &netns::Netns) -> Vec<String> {
    ns.run(|| {
        [
            "ipv4/conf/eth0/arp_ignore",
            "ipv4/conf/eth0/arp_announce",
            "ipv4/conf/eth0/drop_unicast_in_l2_multicast",
            "ipv6/conf/eth0/drop_unicast_in_l2_multicast",
        ]
        .iter()
        .map(|k| {
            let v = std::fs::read_to_string(format!("/proc/sys/net/{k}")).unwrap_or_default();
            let name = k.rsplit('/').next().unwrap_or(k);
            let family = &k[..4];
            format!("{family}.{name}={}", v.trim())
        })
        .collect()
    })
}
