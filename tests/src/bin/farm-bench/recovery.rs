//! Recovery benchmarks against keepalived in the same run and the same namespace topology:
//!
//! `failover`: a node's link is cut at the switch; how long until a client whose traffic that
//! node served completes a new connection, and which share of all clients saw any error.
//! `rolling`: every node restarted in turn under load; how many requests failed.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use farm_tests::{
    busy::{self, TimeWaits},
    keepalived::Keepalived,
    topology::{Spec, TCP_PORT, Topology},
    traffic::{self, KeepAlives, NewConnections},
};

/// Clients whose connections are watched in a failover trial.
const WATCHED: usize = 12;

/// One failover trial as the clients saw it.
struct Trial {
    /// Cut until the probe client (one the failed node served) completed a new connection.
    recovery: Duration,
    /// Watched clients that saw at least one failed connection.
    affected: usize,
    watched: usize,
}

/// A client that opens connection after connection (20 ms connect timeout) and notes whether
/// any failed.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<bool>,
}

impl Prober {
    fn start(t: &Topology, src: IpAddr, pause: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let dst = t.vip4(TCP_PORT);
        let thread = t.client.spawn(move || {
            let mut failed = false;
            while !s.load(Ordering::Relaxed) {
                failed |= traffic::tcp_request(src, dst, Duration::from_millis(20))
                    .node
                    .is_none();
                std::thread::sleep(pause);
            }
            failed
        });
        Self { stop, thread }
    }

    fn finish(self) -> bool {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("prober")
    }
}

/// Cuts `victim`'s link at the switch, waits until `probe` (a client it served) completes a
/// new connection, then restores the link. `watched`: clients to count errors on.
fn trial(t: &Topology, victim: usize, probe: IpAddr, watched: &[IpAddr]) -> Result<Trial> {
    let watchers: Vec<Prober> = watched
        .iter()
        .map(|&a| Prober::start(t, a, Duration::from_millis(10)))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let port = t.nodes[victim].name.clone();
    let cut = Instant::now();
    t.switch.ip(&["link", "set", &port, "down"]);
    let dst = t.vip4(TCP_PORT);
    // The probe: back-to-back attempts until one completes.
    let recovered = t.client.run(move || {
        while cut.elapsed() < Duration::from_secs(15) {
            if traffic::tcp_request(probe, dst, Duration::from_millis(20))
                .node
                .is_some()
            {
                return Some(cut.elapsed());
            }
        }
        None
    });
    std::thread::sleep(Duration::from_millis(500));
    let affected = watchers
        .into_iter()
        .map(Prober::finish)
        .filter(|failed| *failed)
        .count();
    t.switch.ip(&["link", "set", &port, "up"]);
    let Some(recovery) = recovered else {
        bail!("{port}'s clients were not served again within 15 s");
    };
    Ok(Trial {
        recovery,
        affected,
        watched: watched.len(),
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Summary {
    name: String,
    p50: Duration,
    p99: Duration,
    max: Duration,
    affected: f64,
    trials: usize,
}

fn summarize(name: &str, trials: &[Trial]) -> Summary {
    let mut r: Vec<Duration> = trials.iter().map(|t| t.recovery).collect();
    r.sort();
    let affected: usize = trials.iter().map(|t| t.affected).sum();
    let watched: usize = trials.iter().map(|t| t.watched).sum();
    Summary {
        name: name.into(),
        p50: percentile(&r, 0.5),
        p99: percentile(&r, 0.99),
        max: *r.last().expect("trials"),
        affected: affected as f64 / watched.max(1) as f64,
        trials: trials.len(),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn farm_failover(label: &str, extra: &str, trials: usize) -> Result<Summary> {
    let mut t = Topology::build(Spec {
        nodes: 3,
        client_addrs: 120,
        extra_config: extra.into(),
        ..Spec::default()
    });
    t.start_all();
    let all: Vec<usize> = (0..3).collect();
    let mut results = Vec::new();
    for k in 0..trials {
        let victim = k % 3;
        let name = t.nodes[victim].name.clone();
        let (mine, others) = t.clients_of(&name, WATCHED);
        // Watched: a third from the victim (its share), the rest from the others.
        let mut watched: Vec<IpAddr> = mine.iter().skip(1).take(WATCHED / 3).copied().collect();
        watched.extend(others.iter().take(WATCHED - watched.len()));
        let r = trial(&t, victim, mine[0], &watched)?;
        eprintln!(
            "  farm {label} trial {:>2}: {name} cut, served again after {:>4} ms, {}/{} clients \
             saw an error",
            k + 1,
            ms(r.recovery),
            r.affected,
            r.watched
        );
        results.push(r);
        t.wait_converged(&all, Duration::from_secs(30));
    }
    Ok(summarize(&format!("farm, {label}"), &results))
}

fn keepalived_failover(label: &str, advert: Duration, trials: usize) -> Result<Summary> {
    let t = Topology::build(Spec {
        nodes: 3,
        client_addrs: WATCHED + 1,
        ..Spec::default()
    });
    let ka = Keepalived::start(&t, advert);
    let clients = t.clients4();
    let mut results = Vec::new();
    for k in 0..trials {
        let master = ka.wait_one_master(&t, Duration::from_secs(30));
        let r = trial(&t, master, clients[0], &clients[1..=WATCHED])?;
        eprintln!(
            "  keepalived {label} trial {:>2}: {} (master) cut, served again after {:>4} ms, \
             {}/{} clients saw an error",
            k + 1,
            t.nodes[master].name,
            ms(r.recovery),
            r.affected,
            r.watched
        );
        results.push(r);
    }
    ka.wait_one_master(&t, Duration::from_secs(30));
    Ok(summarize(&format!("keepalived, {label}"), &results))
}

fn print_table(title: &str, rows: &[Summary]) {
    println!();
    println!("{title}");
    println!(
        "{:<44} {:>6} {:>7} {:>7} {:>7} {:>9}",
        "", "trials", "p50 ms", "p99 ms", "max ms", "affected"
    );
    for r in rows {
        println!(
            "{:<44} {:>6} {:>7} {:>7} {:>7} {:>8.0}%",
            r.name,
            r.trials,
            ms(r.p50),
            ms(r.p99),
            ms(r.max),
            100.0 * r.affected
        );
    }
}

pub fn failover(trials: usize) -> Result<()> {
    println!(
        "failover: a node's link cut at the switch; time until a client it served completes a \
         new TCP connection (attempts every 20 ms), and the share of {WATCHED} watched clients \
         (a third of them the failed node's, for farm) that saw any failed connection. \
         3 nodes, {trials} trials each."
    );
    let rows = vec![
        farm_failover("defaults (heartbeat 50 ms x 8)", "", trials)?,
        keepalived_failover("defaults (advert_int 1 s)", Duration::from_secs(1), trials)?,
        farm_failover(
            "heartbeat 100 ms x 3 (as VRRP)",
            "\n[heartbeat]\ninterval_ms = 100\nloss_threshold = 3\n",
            trials,
        )?,
        keepalived_failover("advert_int 100 ms", Duration::from_millis(100), trials)?,
    ];
    print_table("failover (link cut)", &rows);
    Ok(())
}

/// Failed requests of a rolling restart under load.
struct Rolling {
    name: String,
    seconds: f64,
    keepalive_requests: u64,
    keepalive_errors: u64,
    new_answered: u64,
    new_failed: u64,
    stalled: u64,
    /// farmd CPU seconds per restart step (all members together), for farm rows.
    cpu_per_step: Option<f64>,
    /// The worst member's p99 heartbeat lateness, send and receive (ms), for farm rows.
    lateness_p99: Option<(f64, f64)>,
    /// Members declared lost by a running member (false failovers), for farm rows.
    false_losses: Option<usize>,
}

/// The rolling restart's conditions: a quiet lab (3 nodes, 3 threads of new connections) or a
/// busy web farm (5 nodes, weights 1,1,2,1,1, ~600+ new connections/s from 370 addresses and
/// more than 10k TIME_WAIT sockets on every member).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    Quiet,
    Busy,
}

impl Load {
    fn nodes(self) -> usize {
        match self {
            Load::Quiet => 3,
            Load::Busy => 5,
        }
    }

    fn spec(self) -> Spec {
        match self {
            Load::Quiet => Spec {
                nodes: 3,
                client_addrs: 200,
                keepalive_requests: Some(50),
                ..Spec::default()
            },
            Load::Busy => Spec {
                nodes: 5,
                client_addrs: 400,
                weights: vec![1, 1, 2, 1, 1],
                keepalive_requests: Some(50),
                ..Spec::default()
            },
        }
    }

    /// 30 keep-alive clients (servers close a connection after 50 requests, as NGINX after
    /// keepalive_requests) and threads of new connections; busy: TIME_WAIT fillers too.
    fn start(self, t: &Topology) -> (KeepAlives, NewConnections, Vec<TimeWaits>) {
        let clients = t.clients4();
        let fillers = match self {
            Load::Quiet => Vec::new(),
            Load::Busy => t
                .nodes
                .iter()
                .map(|n| TimeWaits::start(&n.ns, 10_500))
                .collect(),
        };
        let (threads, pause) = match self {
            Load::Quiet => (3, Duration::from_millis(5)),
            Load::Busy => (16, Duration::from_millis(12)),
        };
        (
            KeepAlives::start(&t.client, &clients[..30], t.vip4(TCP_PORT)),
            NewConnections::start(&t.client, &clients[30..], t.vip4(TCP_PORT), threads, pause),
            fillers,
        )
    }
}

fn finish(
    name: &str,
    started: Instant,
    l: (KeepAlives, NewConnections, Vec<TimeWaits>),
) -> Rolling {
    std::thread::sleep(Duration::from_secs(1));
    let (requests, errors) = l.0.finish();
    let n = l.1.finish();
    drop(l.2);
    Rolling {
        name: name.into(),
        seconds: started.elapsed().as_secs_f64(),
        keepalive_requests: requests,
        keepalive_errors: errors,
        new_answered: n.answered,
        new_failed: n.failed,
        stalled: n.slow,
        cpu_per_step: None,
        lateness_p99: None,
        false_losses: None,
    }
}

fn farmd_pid(t: &Topology, i: usize) -> Option<u32> {
    t.nodes[i].farmd.as_ref().map(|c| c.id())
}

fn farm_rolling(load: Load) -> Result<Rolling> {
    let mut t = Topology::build(load.spec());
    t.start_all();
    let all: Vec<usize> = (0..load.nodes()).collect();
    let l = load.start(&t);
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let mut cpu = 0.0;
    let mut lateness = (0.0f64, 0.0f64);
    for i in all.clone() {
        // CPU of every farmd during this step: read at its start, before the restarted one
        // exits, and at its end.
        let at_start: Vec<f64> = all
            .iter()
            .map(|&j| farmd_pid(&t, j).map_or(0.0, busy::cpu_seconds))
            .collect();
        if load == Load::Quiet {
            let o = t.farmctl(i, &["drain", "--timeout", "60"]);
            if !o.status.success() {
                bail!("farmctl drain: {}", String::from_utf8_lossy(&o.stderr));
            }
        }
        if let Ok(s) = t.status(i) {
            let h = &s.heartbeat.lateness;
            lateness.0 = lateness.0.max(h.send.quantile_us(0.99) as f64 / 1e3);
            lateness.1 = lateness.1.max(h.receive.quantile_us(0.99) as f64 / 1e3);
        }
        let leaving = farmd_pid(&t, i).map_or(0.0, busy::cpu_seconds);
        // Busy: SIGTERM alone (it drains first), as systemctl restart does.
        t.signal_farmd(i, libc::SIGTERM);
        t.start_farmd(i);
        t.wait_converged(&all, Duration::from_secs(60));
        for &j in &all {
            let now = farmd_pid(&t, j).map_or(0.0, busy::cpu_seconds);
            cpu += if j == i {
                (leaving - at_start[j]) + now
            } else {
                now - at_start[j]
            };
        }
        eprintln!("  farm: {} restarted, rejoined", t.nodes[i].name);
    }
    for &i in &all {
        if let Ok(s) = t.status(i) {
            let h = &s.heartbeat.lateness;
            lateness.0 = lateness.0.max(h.send.quantile_us(0.99) as f64 / 1e3);
            lateness.1 = lateness.1.max(h.receive.quantile_us(0.99) as f64 / 1e3);
        }
    }
    let false_losses = all
        .iter()
        .map(|&i| t.log(i).matches("member lost").count())
        .sum();
    let name = match load {
        Load::Quiet => "farm (drain, restart farmd, rejoin)",
        Load::Busy => "farm, busy (systemctl-like restart)",
    };
    let mut r = finish(name, started, l);
    r.cpu_per_step = Some(cpu / load.nodes() as f64);
    r.lateness_p99 = Some(lateness);
    r.false_losses = Some(false_losses);
    Ok(r)
}

fn keepalived_rolling(load: Load, advert: Duration) -> Result<Rolling> {
    let t = Topology::build(load.spec());
    let mut ka = Keepalived::start(&t, advert);
    let l = load.start(&t);
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    for i in 0..load.nodes() {
        ka.stop_node(i);
        std::thread::sleep(Duration::from_millis(500));
        ka.start_node(&t, i);
        ka.wait_one_master(&t, Duration::from_secs(30));
        eprintln!("  keepalived: {} restarted", t.nodes[i].name);
    }
    let busy = if load == Load::Busy { ", busy" } else { "" };
    Ok(finish(
        &format!(
            "keepalived{busy} (restart, advert {} ms)",
            advert.as_millis()
        ),
        started,
        l,
    ))
}

pub fn rolling() -> Result<()> {
    println!(
        "rolling restart under load: 30 keep-alive clients (a request every 20 ms; servers \
         close a connection cleanly after 50 requests) and new connections. Quiet: 3 nodes, 3 \
         threads of new connections. Busy: 5 nodes (weights 1,1,2,1,1), 16 threads of new \
         connections from 370 addresses, more than 10k TIME_WAIT sockets on every member"
    );
    let rows = vec![
        farm_rolling(Load::Quiet)?,
        keepalived_rolling(Load::Quiet, Duration::from_secs(1))?,
        keepalived_rolling(Load::Quiet, Duration::from_millis(100))?,
        farm_rolling(Load::Busy)?,
        keepalived_rolling(Load::Busy, Duration::from_millis(100))?,
    ];
    println!();
    println!(
        "{:<40} {:>6} {:>10} {:>7} {:>10} {:>7} {:>8} {:>8} {:>12} {:>5}",
        "",
        "s",
        "keep-alive",
        "failed",
        "new conns",
        "failed",
        "stalled",
        "cpu/step",
        "hb p99 ms",
        "lost"
    );
    for r in &rows {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        println!(
            "{:<40} {:>6.1} {:>10} {:>7} {:>10} {:>7} {:>8} {:>8} {:>12} {:>5}",
            r.name,
            r.seconds,
            r.keepalive_requests,
            r.keepalive_errors,
            r.new_answered,
            r.new_failed,
            r.stalled,
            opt(r.cpu_per_step.map(|c| format!("{c:.2} s"))),
            opt(r.lateness_p99.map(|(s, v)| format!("{s:.1}/{v:.1}"))),
            opt(r.false_losses.map(|n| n.to_string())),
        );
    }
    println!(
        "(failed: requests or connections that failed or were reset; stalled: connections \
         whose SYN went unanswered once and was retransmitted a second later; cpu/step: CPU \
         seconds of all farmds per restart step; hb p99: the worst member's heartbeat lateness \
         p99, send/receive; lost: members declared lost by a running member)"
    );
    Ok(())
}
