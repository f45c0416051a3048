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
}

/// The load of the rolling restarts: 30 keep-alive clients (servers close a connection after 50
/// requests, as NGINX after keepalive_requests) and 3 threads of new connections.
fn load(t: &Topology) -> (KeepAlives, NewConnections) {
    let clients = t.clients4();
    (
        KeepAlives::start(&t.client, &clients[..30], t.vip4(TCP_PORT)),
        NewConnections::start(
            &t.client,
            &clients[30..],
            t.vip4(TCP_PORT),
            3,
            Duration::from_millis(5),
        ),
    )
}

fn finish(name: &str, started: Instant, l: (KeepAlives, NewConnections)) -> Rolling {
    std::thread::sleep(Duration::from_secs(1));
    let (requests, errors) = l.0.finish();
    let n = l.1.finish();
    Rolling {
        name: name.into(),
        seconds: started.elapsed().as_secs_f64(),
        keepalive_requests: requests,
        keepalive_errors: errors,
        new_answered: n.answered,
        new_failed: n.failed,
        stalled: n.slow,
    }
}

fn spec() -> Spec {
    Spec {
        nodes: 3,
        client_addrs: 200,
        keepalive_requests: Some(50),
        ..Spec::default()
    }
}

fn farm_rolling() -> Result<Rolling> {
    let mut t = Topology::build(spec());
    t.start_all();
    let l = load(&t);
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    for i in 0..3 {
        let o = t.farmctl(i, &["drain", "--timeout", "60"]);
        if !o.status.success() {
            bail!("farmctl drain: {}", String::from_utf8_lossy(&o.stderr));
        }
        t.signal_farmd(i, libc::SIGTERM);
        t.start_farmd(i);
        t.wait_converged(&[0, 1, 2], Duration::from_secs(60));
        eprintln!("  farm: {} drained, restarted, rejoined", t.nodes[i].name);
    }
    Ok(finish("farm (drain, restart farmd, rejoin)", started, l))
}

fn keepalived_rolling(advert: Duration) -> Result<Rolling> {
    let t = Topology::build(spec());
    let mut ka = Keepalived::start(&t, advert);
    let l = load(&t);
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    for i in 0..3 {
        ka.stop_node(i);
        std::thread::sleep(Duration::from_millis(500));
        ka.start_node(&t, i);
        ka.wait_one_master(&t, Duration::from_secs(30));
        eprintln!("  keepalived: {} restarted", t.nodes[i].name);
    }
    Ok(finish(
        &format!("keepalived (restart, advert {} ms)", advert.as_millis()),
        started,
        l,
    ))
}

pub fn rolling() -> Result<()> {
    println!(
        "rolling restart of 3 nodes under load: 30 keep-alive clients (a request every 20 ms; \
         servers close a connection cleanly after 50 requests) and 3 threads of new connections"
    );
    let rows = vec![
        farm_rolling()?,
        keepalived_rolling(Duration::from_secs(1))?,
        keepalived_rolling(Duration::from_millis(100))?,
    ];
    println!();
    println!(
        "{:<40} {:>6} {:>10} {:>7} {:>10} {:>7} {:>8}",
        "", "s", "keep-alive", "failed", "new conns", "failed", "stalled"
    );
    for r in &rows {
        println!(
            "{:<40} {:>6.1} {:>10} {:>7} {:>10} {:>7} {:>8}",
            r.name,
            r.seconds,
            r.keepalive_requests,
            r.keepalive_errors,
            r.new_answered,
            r.new_failed,
            r.stalled
        );
    }
    println!(
        "(failed: requests or connections that failed or were reset; stalled: connections \
         whose SYN went unanswered once and was retransmitted a second later)"
    );
    Ok(())
}
