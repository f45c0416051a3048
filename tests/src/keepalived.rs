//! keepalived (Debian's package, VRRPv3) on a test topology's nodes, serving the same VIP with
//! the same servers: the peer farm is measured against in the benchmarks.

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::topology::{Topology, VIP4};

/// One keepalived per node, all BACKUP with `nopreempt` and descending priorities, so that the
/// VIP moves only when its master fails (as operators run it to avoid a second move on return).
pub struct Keepalived {
    dir: PathBuf,
    advert: Duration,
    procs: Vec<Option<Child>>,
}

impl Keepalived {
    /// Writes the configurations and starts keepalived on every node of `t`; waits (bounded)
    /// until exactly one node holds the VIP.
    pub fn start(t: &Topology, advert: Duration) -> Self {
        let dir = t.dir.join("keepalived");
        std::fs::create_dir_all(&dir).expect("keepalived dir");
        let mut k = Self {
            dir,
            advert,
            procs: (0..t.nodes.len()).map(|_| None).collect(),
        };
        for i in 0..t.nodes.len() {
            k.start_node(t, i);
        }
        k.wait_one_master(t, Duration::from_secs(20));
        k
    }

    fn config(&self, i: usize) -> String {
        format!(
            "global_defs {{\n  vrrp_version 3\n  router_id n{}\n}}\n\
             vrrp_instance farm {{\n  state BACKUP\n  nopreempt\n  interface eth0\n  \
             virtual_router_id 51\n  priority {}\n  advert_int {}\n  \
             virtual_ipaddress {{\n    {VIP4}/32 dev eth0\n  }}\n}}\n",
            i + 1,
            200 - 10 * i,
            self.advert.as_secs_f64()
        )
    }

    /// Starts keepalived on node `i` (in the foreground, logging to its file).
    pub fn start_node(&mut self, t: &Topology, i: usize) {
        let conf = self.dir.join(format!("n{}.conf", i + 1));
        std::fs::write(&conf, self.config(i)).expect("keepalived config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("n{}.log", i + 1)))
            .expect("log");
        let child = t.nodes[i]
            .ns
            .command(std::path::Path::new("keepalived"))
            .args(["--dont-fork", "--log-console", "--no-syslog", "--vrrp"])
            .arg("--use-file")
            .arg(&conf)
            .arg("--pid")
            .arg(self.dir.join(format!("n{}.pid", i + 1)))
            .arg("--vrrp_pid")
            .arg(self.dir.join(format!("n{}.vrrp.pid", i + 1)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("keepalived (cargo xtask bench installs it)");
        self.procs[i] = Some(child);
    }

    /// Stops keepalived on node `i` with SIGTERM (it sends a priority-0 advert: a backup takes
    /// over at once) and waits for it.
    pub fn stop_node(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i].take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
            // Its VRRP child, if it outlived it.
            if let Ok(pid) = std::fs::read_to_string(self.dir.join(format!("n{}.vrrp.pid", i + 1)))
                && let Ok(pid) = pid.trim().parse::<i32>()
            {
                // SAFETY: kill(2); the pid is keepalived's VRRP child started by this harness.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }

    /// The nodes whose eth0 holds the VIP.
    pub fn masters(&self, t: &Topology) -> Vec<usize> {
        (0..t.nodes.len())
            .filter(|&i| {
                t.nodes[i]
                    .ns
                    .ip_out(&["-4", "addr", "show", "dev", "eth0"])
                    .contains(&format!("{VIP4}/32"))
            })
            .collect()
    }

    /// Waits (bounded) until exactly one node holds the VIP, and it has for three adverts.
    pub fn wait_one_master(&self, t: &Topology, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        let mut stable: Option<(usize, Instant)> = None;
        loop {
            let m = self.masters(t);
            match (m.as_slice(), stable) {
                ([one], Some((s, since))) if *one == s => {
                    if since.elapsed() >= 3 * self.advert + Duration::from_millis(200) {
                        return s;
                    }
                }
                ([one], _) => stable = Some((*one, Instant::now())),
                _ => stable = None,
            }
            assert!(
                Instant::now() < deadline,
                "keepalived: no single master within {within:?} (masters {m:?}); logs in {}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        // SIGTERM, so that keepalived stops its VRRP child process too (SIGKILL would leave it
        // running).
        for i in 0..self.procs.len() {
            self.stop_node(i);
        }
    }
}
