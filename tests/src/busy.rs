//! Conditions of a busy host, for the system tests and benchmarks: thousands of TIME_WAIT
//! sockets in a node's network namespace (as a web server that closes connections holds), and
//! every core saturated by ordinary processes at normal priority.
//!
//! Everything here stops by itself when dropped, and every loop is bounded in time.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// TCP sockets in TIME_WAIT in the calling thread's network namespace (/proc/net/sockstat).
pub fn time_wait_here() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/sockstat").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("TCP: "))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.iter()
                .position(|&k| k == "tw")
                .and_then(|i| f.get(i + 1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// TCP sockets in TIME_WAIT in `ns`.
pub fn time_wait(ns: &Netns) -> u64 {
    ns.run(time_wait_here)
}

/// Keeps at least `target` TIME_WAIT sockets in a namespace: a server on loopback that closes
/// each connection first (the closing side holds the TIME_WAIT, 60 s on Linux), and a client
/// that tops the count up every second.
pub struct TimeWaits {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TimeWaits {
    /// Starts the filler in `ns` and returns once `target` sockets are in TIME_WAIT (bounded:
    /// panics after 60 s).
    pub fn start(ns: &Netns, target: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let s = stop.clone();
        let thread = ns.spawn(move || {
            // Four listeners: the TIME_WAIT 4-tuples of one would use up the ephemeral ports.
            let listeners: Vec<TcpListener> = (0..4)
                .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind loopback"))
                .collect();
            let addrs: Vec<SocketAddr> = listeners
                .iter()
                .map(|l| l.local_addr().expect("addr"))
                .collect();
            for l in &listeners {
                l.set_nonblocking(true).expect("nonblocking");
            }
            let mut ready = Some(ready_tx);
            let mut k = 0usize;
            while !s.load(Ordering::Relaxed) {
                let have = time_wait_here();
                if have >= target {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
                let burst = (target - have + 500).min(4000);
                for _ in 0..burst {
                    let a = addrs[k % addrs.len()];
                    k += 1;
                    let Ok(c) = TcpStream::connect_timeout(&a, Duration::from_secs(1)) else {
                        continue;
                    };
                    // The server's side closes first: it holds the TIME_WAIT.
                    let deadline = Instant::now() + Duration::from_secs(1);
                    let l = &listeners[(k - 1) % listeners.len()];
                    loop {
                        match l.accept() {
                            Ok((srv, _)) => {
                                drop(srv);
                                break;
                            }
                            Err(_) if Instant::now() < deadline => std::thread::yield_now(),
                            Err(_) => break,
                        }
                    }
                    let mut b = [0u8; 1];
                    let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
                    let _ = std::io::Read::read(&mut &c, &mut b);
                    drop(c);
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("TIME_WAIT sockets did not reach the target within 60 s");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TimeWaits {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Busy loops at normal priority (plain `sh` processes spinning), killed when dropped.
pub struct Spinners {
    children: Vec<Child>,
}

impl Spinners {
    /// `per_ns` spinners in each of `namespaces`.
    pub fn start(namespaces: &[&Netns], per_ns: usize) -> Self {
        let mut children = Vec::new();
        for ns in namespaces {
            for _ in 0..per_ns {
                let c = ns
                    .command(std::path::Path::new("/bin/sh"))
                    .args(["-c", "while :; do :; done"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn a spinner");
                children.push(c);
            }
        }
        Self { children }
    }

    pub fn count(&self) -> usize {
        self.children.len()
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// CPU seconds (user + system) a process has used so far, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: indices 11 and 12 after the ")".
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}
