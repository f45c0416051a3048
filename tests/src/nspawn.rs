//! A real systemd, booted in `systemd-nspawn` from the host's own file system (see
//! `../shared/reference/systemd.md`), inside one of the test's network namespaces: units run
//! there exactly as on a host, with systemd's sandboxing, readiness and watchdog, so the
//! shipped unit file is tested under the real thing.
//!
//! The container's root is a tmpfs (`--volatile=yes`; /usr is the host's, read-only); files are
//! put in through `/proc/<leader>/root`. Services the host image would start and that have no
//! place in a test (nginx, keepalived, PostgreSQL's cluster, waiting for the network) are
//! masked. The container is stopped (SIGTERM to systemd-nspawn, SIGKILL after 15 s) on drop.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// Units masked in every test container.
const MASKED: &[&str] = &[
    "systemd-networkd-wait-online.service",
    "nginx.service",
    "keepalived.service",
    "postgresql.service",
    "nftables.service",
];

pub struct Container {
    pub name: String,
    nspawn: Child,
    /// The container's PID 1 (its systemd), as the host sees it.
    pub leader: u32,
    pub log: PathBuf,
}

impl Container {
    /// Boots systemd in `ns` (the container shares that network namespace), with the host's
    /// bpf filesystem and `/dev/fuse` bound in, and waits (bounded) until it has booted.
    pub fn boot(ns: &Netns, dir: &Path) -> Self {
        let name = format!("{}-sd", ns.name);
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("nspawn log");
        let mut cmd = Command::new("systemd-nspawn");
        cmd.env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            // /proc/sys/net writable, as on a host: farmd sets arp_ignore and friends.
            .env("SYSTEMD_NSPAWN_API_VFS_WRITABLE", "network")
            .args(["-D", "/", "--volatile=yes", "--register=no", "--keep-unit"])
            .arg(format!("--machine={name}"))
            .arg(format!("--network-namespace-path={}", ns.path()))
            .arg("--capability=all")
            // nspawn's seccomp filter refuses bpf(2) and openat2(2) unless told: a host has
            // no such filter.
            .arg("--system-call-filter=bpf perf_event_open openat2")
            // The host's bpffs, as systemd mounts one on every host at boot.
            .arg("--bind=/sys/fs/bpf")
            .arg("--bind=/dev/fuse")
            .args(["-b", "--console=pipe"]);
        for unit in MASKED {
            cmd.arg(format!("--bind-ro=/dev/null:/etc/systemd/system/{unit}"));
        }
        let nspawn = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("systemd-nspawn (cargo xtask setup installs systemd-container)");
        let mut c = Self {
            name,
            leader: 0,
            nspawn,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if c.leader == 0 {
                c.leader = child_of(c.nspawn.id()).unwrap_or(0);
            }
            if c.leader != 0 {
                let state = c.systemctl(&["is-system-running"]);
                let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
                if state == "running" || state == "degraded" {
                    return c;
                }
            }
            if let Ok(Some(st)) = c.nspawn.try_wait() {
                panic!("systemd-nspawn exited ({st}): {}", c.console());
            }
            assert!(
                Instant::now() < deadline,
                "systemd did not boot within 60 s: {}",
                c.console()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// What the container printed on its console.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A path inside the container, as the host reaches it.
    pub fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root/{}",
            self.leader,
            inside.trim_start_matches('/')
        ))
    }

    /// Writes a file inside the container (parents created) with `mode`.
    pub fn write(&self, inside: &str, contents: &[u8], mode: u32) {
        use std::os::unix::fs::PermissionsExt as _;
        let p = self.path(inside);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir in container");
        std::fs::write(&p, contents).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// Runs a command inside the container (all its namespaces).
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg("-t")
            .arg(self.leader.to_string())
            .arg("-a")
            .arg(program)
            .args(args)
            .output()
            .expect("nsenter")
    }

    pub fn systemctl(&self, args: &[&str]) -> Output {
        self.run("systemctl", args)
    }

    /// `systemctl ARGS`, panicking with the unit's status and journal if it fails.
    pub fn systemctl_ok(&self, args: &[&str], unit: &str) {
        let out = self.systemctl(args);
        assert!(
            out.status.success(),
            "systemctl {}: {}{}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.journal(unit)
        );
    }

    /// A unit property (`systemctl show -p NAME --value`).
    pub fn property(&self, unit: &str, name: &str) -> String {
        let out = self.systemctl(&["show", unit, "-p", name, "--value"]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The unit's journal.
    pub fn journal(&self, unit: &str) -> String {
        let out = self.run("journalctl", &["-u", unit, "--no-pager", "-o", "cat"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The unit's main process as the host sees it (0: none).
    pub fn main_pid(&self, unit: &str) -> u32 {
        // nspawn gives the container a PID namespace of its own: translate systemd's pid.
        let inner: u32 = self.property(unit, "MainPID").parse().unwrap_or(0);
        if inner == 0 {
            return 0;
        }
        host_pid(self.leader, inner).unwrap_or(0)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// The first child of `pid`.
fn child_of(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// The host pid of the process that is `inner` in the PID namespace of `leader`.
fn host_pid(leader: u32, inner: u32) -> Option<u32> {
    let ns = std::fs::read_link(format!("/proc/{leader}/ns/pid")).ok()?;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok() != Some(ns.clone()) {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let nspid = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .and_then(|v| v.split_whitespace().last()?.parse::<u32>().ok());
        if nspid == Some(inner) {
            return Some(pid);
        }
    }
    None
}
