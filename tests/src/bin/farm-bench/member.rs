//! `member`: what a member costs its host. farmd's memory and CPU at rest in a farm of five at
//! the default heartbeat interval (50 ms), then under VIP traffic at given rates: farmd's CPU
//! (which never touches VIP packets) and the CPU the XDP program spends on each member (which
//! sees every VIP packet: the cluster MAC is flooded), from the kernel's BPF run-time
//! statistics.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use farm_tests::topology::{Spec, Topology, UDP_PORT};

/// What /proc says about one process.
#[derive(Clone, Debug)]
struct Sample {
    /// Time on a CPU of all its threads (`/proc/<pid>/task/*/schedstat`, nanoseconds).
    cpu: Duration,
    /// Voluntary context switches (the thread slept and was woken) per thread name.
    wakes: std::collections::BTreeMap<String, u64>,
    /// Resident set now and at its peak, KiB.
    rss_kib: u64,
    hwm_kib: u64,
}

fn sample(pid: u32) -> Result<Sample> {
    let mut cpu = Duration::ZERO;
    let mut wakes = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = task?.path();
        // A thread that ended meanwhile is skipped.
        let (Ok(sched), Ok(status), Ok(comm)) = (
            std::fs::read_to_string(dir.join("schedstat")),
            std::fs::read_to_string(dir.join("status")),
            std::fs::read_to_string(dir.join("comm")),
        ) else {
            continue;
        };
        let ns: u64 = sched
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .context("schedstat")?;
        cpu += Duration::from_nanos(ns);
        let switches: u64 = status
            .lines()
            .find(|l| l.starts_with("voluntary_ctxt_switches:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        *wakes.entry(comm.trim().to_string()).or_insert(0) += switches;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Sample {
        cpu,
        wakes,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// The XDP programs of the members (named `farm_xdp`): total run time and runs, while the
/// kernel's BPF statistics are on.
fn xdp_stats() -> (Duration, u64, usize) {
    let mut t = Duration::ZERO;
    let (mut n, mut progs) = (0, 0);
    for p in aya::programs::loaded_programs().flatten() {
        if p.name_as_str() == Some("farm_xdp") {
            t += p.run_time();
            n += p.run_count();
            progs += 1;
        }
    }
    (t, n, progs)
}

/// Turns the kernel's BPF run-time statistics on for its life (`kernel.bpf_stats_enabled`),
/// and back to what they were.
struct BpfStats(String);

impl BpfStats {
    fn on() -> Result<Self> {
        const P: &str = "/proc/sys/kernel/bpf_stats_enabled";
        let was = std::fs::read_to_string(P).context(P)?;
        std::fs::write(P, "1").context(P)?;
        Ok(Self(was.trim().to_string()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", &self.0);
    }
}

/// Sends UDP datagrams to `dst` at `pps` from every source address in turn, each from a few
/// source ports (flows that repeat, as real clients' do), until stopped. Returns the count
/// sent.
fn send_at(sources: Vec<IpAddr>, dst: SocketAddr, pps: u64, stop: Arc<AtomicBool>) -> u64 {
    let sockets: Vec<UdpSocket> = sources
        .iter()
        .flat_map(|a| (0..4).map(move |_| UdpSocket::bind(SocketAddr::new(*a, 0))))
        .filter_map(Result::ok)
        .collect();
    for s in &sockets {
        let _ = s.set_nonblocking(true);
    }
    if sockets.is_empty() {
        return 0;
    }
    let payload = [0u8; 64];
    let start = Instant::now();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // Paced by the clock: as many as the rate allows by now, then a short sleep.
        let due = (start.elapsed().as_secs_f64() * pps as f64) as u64;
        while sent < due {
            let s = &sockets[sent as usize % sockets.len()];
            let _ = s.send_to(&payload, dst);
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    sent
}

struct Window {
    /// farmd CPU per member, as a share of one core.
    farmd: Vec<f64>,
    /// Wake-ups per second per thread name, per member.
    wakes: Vec<std::collections::BTreeMap<String, f64>>,
    /// XDP run time per packet and share of a core per member; packets per second seen.
    xdp_ns: f64,
    xdp_core: f64,
    pps_seen: f64,
}

fn measure(pids: &[u32], secs: u64) -> Result<Window> {
    let before: Vec<Sample> = pids.iter().map(|p| sample(*p)).collect::<Result<_>>()?;
    let (rt0, n0, progs) = xdp_stats();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let took = t0.elapsed().as_secs_f64();
    let (rt1, n1, _) = xdp_stats();
    let after: Vec<Sample> = pids.iter().map(|p| sample(*p)).collect::<Result<_>>()?;
    let farmd = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.cpu.saturating_sub(b.cpu).as_secs_f64() / took)
        .collect();
    let wakes = before
        .iter()
        .zip(&after)
        .map(|(b, a)| {
            a.wakes
                .iter()
                .map(|(name, n)| {
                    let was = b.wakes.get(name).copied().unwrap_or(0);
                    (name.clone(), n.saturating_sub(was) as f64 / took)
                })
                .collect()
        })
        .collect();
    let runs = (n1 - n0) as f64;
    let run_time = (rt1 - rt0).as_secs_f64();
    let members = progs.max(1) as f64;
    Ok(Window {
        farmd,
        wakes,
        xdp_ns: if runs > 0.0 {
            run_time * 1e9 / runs
        } else {
            0.0
        },
        xdp_core: run_time / took / members,
        pps_seen: runs / took / members,
    })
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

pub fn member(args: &[String]) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the member benchmark builds a farm in network namespaces: run it as root");
    }
    let secs = u64::from(super::flag(args, "--seconds", 20)?);
    let rates: Vec<u64> = match args.iter().position(|a| a == "--rates") {
        Some(i) => args
            .get(i + 1)
            .context("--rates takes a list: 10000,50000")?
            .split(',')
            .map(|r| r.trim().parse().context("--rates takes numbers"))
            .collect::<Result<_>>()?,
        None => vec![10_000, 50_000],
    };
    let members = 5;
    println!(
        "the cost of a member: a farm of {members} in network namespaces, farmd as built \
         (release under `cargo xtask bench`), default heartbeats; {secs} s windows"
    );
    println!("machine: {}", super::machine());
    let mut t = Topology::build(Spec {
        nodes: members,
        client_addrs: 32,
        ..Spec::default()
    });
    t.start_all();
    let all: Vec<usize> = (0..members).collect();
    t.wait_converged(&all, Duration::from_secs(30));
    let s = t.status(0).map_err(anyhow::Error::msg)?;
    println!(
        "heartbeat every {} ms to {} peers",
        s.heartbeat.interval_ms,
        members - 1
    );
    let pids: Vec<u32> = all
        .iter()
        .map(|i| t.farmd_pid(*i).context("farmd runs"))
        .collect::<Result<_>>()?;
    // Settle: the first seconds load programs and exchange the first views.
    std::thread::sleep(Duration::from_secs(3));
    let _stats = BpfStats::on()?;

    let idle = measure(&pids, secs)?;
    let mem: Vec<Sample> = pids.iter().map(|p| sample(*p)).collect::<Result<_>>()?;
    let rss: Vec<f64> = mem.iter().map(|m| m.rss_kib as f64 / 1024.0).collect();
    let hwm: Vec<f64> = mem.iter().map(|m| m.hwm_kib as f64 / 1024.0).collect();
    println!();
    println!(
        "at rest: farmd RSS median {:.1} MiB, max {:.1} MiB (peak since start: max {:.1} MiB); \
         goal under 20 MiB",
        median(&rss),
        max(&rss),
        max(&hwm)
    );
    println!(
        "at rest: farmd CPU median {:.2} % of a core, max {:.2} % ({}); goal under 1 %",
        median(&idle.farmd) * 100.0,
        max(&idle.farmd) * 100.0,
        idle.farmd
            .iter()
            .map(|c| format!("{:.2}", c * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut names: Vec<&String> = idle.wakes.iter().flat_map(|w| w.keys()).collect();
    names.sort();
    names.dedup();
    let per_thread: Vec<String> = names
        .iter()
        .map(|n| {
            let v: Vec<f64> = idle
                .wakes
                .iter()
                .map(|w| w.get(*n).copied().unwrap_or(0.0))
                .collect();
            format!("{n} {:.0}", median(&v))
        })
        .collect();
    println!(
        "at rest: wake-ups a second per thread (voluntary context switches, median): {}",
        per_thread.join(", ")
    );

    println!();
    println!(
        "under VIP traffic (UDP to the IPv4 VIP from {} client addresses x 4 ports; every member \
         sees every packet, and the one owning its bucket takes it):",
        t.client_v4.len()
    );
    println!(
        "{:>10} {:>10}   {:>15} {:>15} {:>17}   {:>13}",
        "sent pps", "seen pps", "XDP ns/packet", "XDP % of core", "per 10k pps", "farmd % core"
    );
    for &pps in &rates {
        let stop = Arc::new(AtomicBool::new(false));
        let (sources, dst) = (t.clients4(), t.vip4(UDP_PORT));
        let st = stop.clone();
        let sender = t.client.spawn(move || send_at(sources, dst, pps, st));
        std::thread::sleep(Duration::from_secs(1));
        let w = measure(&pids, secs)?;
        stop.store(true, Ordering::Relaxed);
        let sent = sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))?;
        let sent_pps = sent as f64 / (secs + 1) as f64;
        println!(
            "{sent_pps:>10.0} {:>10.0}   {:>15.0} {:>15.3} {:>16.3}%   {:>13.2}",
            w.pps_seen,
            w.xdp_ns,
            w.xdp_core * 100.0,
            if w.pps_seen > 0.0 {
                w.xdp_core * 100.0 * 10_000.0 / w.pps_seen
            } else {
                0.0
            },
            median(&w.farmd) * 100.0
        );
    }
    println!();
    println!(
        "(XDP figures from the kernel's BPF statistics, which add their own clock reads to each \
         run; farmd's from /proc/<pid>/task/*/schedstat, all its threads: with veth, the \
         receiving side of the heartbeats a member sends runs in its send call and counts as \
         its time)"
    );
    Ok(())
}
