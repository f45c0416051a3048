//! Mirror mode run by farmd on two real nodes (network namespaces on a bridge, the client host
//! as witness): a stateful service behind the mirror VIP loses no acknowledged record when its
//! primary's host dies, the old primary resyncs only what changed and a planned swap moves the
//! role back; a cut between the nodes with the witness on one side never yields two primaries;
//! PostgreSQL under pgbench keeps every committed transaction across a failover.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use farm_daemon::{
    control::{self, Request, Response},
    heartbeat::MirrorRole,
    mirror::GroupStatus,
};
use farm_mirror::tree;
use farm_tests::{
    attacker::{self, Attacker},
    bin, require_root,
    topology::{Spec, Topology, VIP4},
};

const APP_PORT: u16 = 9000;
const REPLICATION_PORT: u16 = 7949;
const FAILOVER_AFTER_MS: u64 = 1000;

/// The application a test runs on the primary.
enum App {
    Records,
    Postgres,
}

fn data_dir(t: &Topology, i: usize) -> PathBuf {
    t.dir.join(format!("n{}-data", i + 1))
}

fn backing_dir(t: &Topology, i: usize) -> PathBuf {
    t.dir.join(format!("n{}-backing", i + 1))
}

/// A topology running a mirror group. Dropping it kills everything that ran in the nodes'
/// namespaces (farmd, the application: a killed primary leaves PostgreSQL or the record service
/// behind otherwise) and unmounts the replicated directories.
struct Mirrored(Topology);

impl std::ops::Deref for Mirrored {
    type Target = Topology;
    fn deref(&self) -> &Topology {
        &self.0
    }
}

impl std::ops::DerefMut for Mirrored {
    fn deref_mut(&mut self) -> &mut Topology {
        &mut self.0
    }
}

impl Drop for Mirrored {
    fn drop(&mut self) {
        for i in 0..2 {
            kill_namespace(&self.0, i);
            if let Some(mut c) = self.0.nodes[i].farmd.take() {
                let _ = c.wait();
            }
        }
        // The application's processes may take a moment to go (PostgreSQL's children).
        let deadline = Instant::now() + Duration::from_secs(5);
        while (0..2).any(|i| kill_namespace(&self.0, i) > 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for i in 0..2 {
            farm_tests::mirror_tool::detach(&data_dir(&self.0, i));
        }
    }
}

/// SIGKILLs every process in node `i`'s network namespace; returns how many there were.
fn kill_namespace(t: &Topology, i: usize) -> usize {
    let ns = t.nodes[i].ns.inode();
    let mut killed = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let inode = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .ok();
        if inode == Some(ns) && pid != std::process::id() as i32 {
            // SAFETY: kill(2) of a process in the test's own namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed += 1;
        }
    }
    killed
}

/// Two nodes, the client host as witness, a `[mirror]` group running `app`. Not started.
fn pair(app: &App) -> Mirrored {
    let t = Topology::build(Spec {
        nodes: 2,
        client_addrs: 1,
        test_servers: false,
        ..Spec::default()
    });
    let witness = t.client_v4[0];
    for i in 0..2 {
        let (start, stop) = commands(&t, i, app);
        let cfg = std::fs::read_to_string(&t.nodes[i].config)
            .expect("config")
            .replace(
                "[cluster]\n",
                &format!("[cluster]\nwitness = \"{witness}\"\n"),
            );
        let mirror = format!(
            r#"
[mirror]
members = ["n1", "n2"]
vip = "{VIP4}"
directory = "{}"
backing = "{}"
port = {REPLICATION_PORT}
failover_after_ms = {FAILOVER_AFTER_MS}
command_timeout_s = 60
start_primary = '''{start}'''
stop_primary = '''{stop}'''
"#,
            data_dir(&t, i).display(),
            backing_dir(&t, i).display(),
        );
        std::fs::write(&t.nodes[i].config, cfg + &mirror).expect("config");
    }
    Mirrored(t)
}

/// A pair running the record service, started, n1 primary with its replica in sync.
fn records_pair_in_sync() -> Mirrored {
    let mut t = pair(&App::Records);
    t.start_farmd(0);
    t.start_farmd(1);
    primary_in_sync(&t, 0, Duration::from_secs(60));
    t
}

/// The start and stop commands of `app` on node `i`.
fn commands(t: &Topology, i: usize, app: &App) -> (String, String) {
    let n = i + 1;
    let dir = t.dir.display();
    let data = data_dir(t, i);
    let data = data.display();
    match app {
        App::Records => {
            let pid = format!("{dir}/n{n}-app.pid");
            (
                format!(
                    "{} --dir {data} --listen 0.0.0.0:{APP_PORT} --pidfile {pid} >> {dir}/n{n}-app.log 2>&1 &",
                    bin("farm-record-service").display()
                ),
                format!(
                    "p=$(cat {pid} 2>/dev/null) && kill $p && while kill -0 $p 2>/dev/null; do sleep 0.05; done; rm -f {pid}; true"
                ),
            )
        }
        App::Postgres => {
            // On a takeover the data comes from the other node: its postmaster.pid names a
            // process of that host, so it is removed (as HA agents for PostgreSQL do).
            let pg = pg_bin();
            let log = format!("{dir}/n{n}-pg.log");
            let sock = format!("{dir}/n{n}-pgsock");
            (
                format!(
                    "set -e; mkdir -p {sock}; chown postgres {sock}; touch {log}; chown postgres {log}; \
                     if [ ! -f {data}/pg/PG_VERSION ]; then \
                       mkdir -p {data}/pg; chown postgres {data}/pg; chmod 700 {data}/pg; \
                       runuser -u postgres -- {pg}/initdb -D {data}/pg -A trust >> {log} 2>&1; \
                       echo \"listen_addresses = '*'\" >> {data}/pg/postgresql.conf; \
                       echo 'host all all 0.0.0.0/0 trust' >> {data}/pg/pg_hba.conf; \
                     fi; \
                     rm -f {data}/pg/postmaster.pid; \
                     runuser -u postgres -- {pg}/pg_ctl -D {data}/pg -l {log} -o '-p 5432 -k {sock}' -w -t 120 start"
                ),
                format!(
                    "runuser -u postgres -- {pg}/pg_ctl -D {data}/pg -m fast -w -t 60 stop || true"
                ),
            )
        }
    }
}

fn pg_bin() -> String {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .expect("PostgreSQL is installed (cargo xtask setup installs it)")
        .display()
        .to_string()
}

fn mirror_status(t: &Topology, i: usize) -> Result<GroupStatus, String> {
    match control::request(
        &t.nodes[i].socket,
        &Request::MirrorStatus,
        Duration::from_secs(5),
    ) {
        Ok(Response::Mirror(m)) => Ok(*m),
        Ok(other) => Err(format!("{other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Waits (bounded) until `ok` holds for node `i`'s mirror status.
fn wait_mirror(
    t: &Topology,
    i: usize,
    within: Duration,
    what: &str,
    ok: impl Fn(&GroupStatus) -> bool,
) -> GroupStatus {
    let deadline = Instant::now() + within;
    loop {
        let s = mirror_status(t, i);
        if let Ok(s) = &s
            && ok(s)
        {
            return s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "n{}: {what} not within {within:?}; last status {s:#?}\nlog:\n{}",
            i + 1,
            tail(&t.log(i), 60)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn primary_in_sync(t: &Topology, i: usize, within: Duration) -> GroupStatus {
    wait_mirror(t, i, within, "primary with its replica in sync", |s| {
        s.role == MirrorRole::Primary
            && s.replication == Some(farm_daemon::mirror::Replication::InSync)
    })
}

/// Kills everything running in node `i`'s namespace (farmd, the application) with SIGKILL and
/// cuts its link to the switch: its host is gone.
fn kill_host(t: &Topology, i: usize) {
    t.switch
        .ip(&["link", "set", "dev", &t.nodes[i].name, "down"]);
    assert!(kill_namespace(t, i) > 0, "nothing ran on n{}", i + 1);
}

/// Brings node `i` back: link up, farmd started (it rejoins as secondary).
fn revive(t: &mut Topology, i: usize) {
    if let Some(mut c) = t.nodes[i].farmd.take() {
        let _ = c.wait();
    }
    t.switch.ip(&["link", "set", "dev", &t.nodes[i].name, "up"]);
    t.start_farmd(i);
}

/// A client of the record service through the VIP: sends 1, 2, 3... one at a time, resending
/// a number until it is acknowledged; keeps what was acknowledged and when.
struct Client {
    acked: Arc<Mutex<Vec<(u64, Instant)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    fn start(t: &Topology, first: u64) -> Self {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (acked.clone(), stop.clone());
        let thread = t.client.spawn(move || {
            let addr = SocketAddr::from((VIP4, APP_PORT));
            let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
            let mut n = first;
            while !s.load(Ordering::Relaxed) {
                if conn.is_none() {
                    match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                        Ok(c) => {
                            c.set_read_timeout(Some(Duration::from_secs(3))).ok();
                            let r = BufReader::new(c.try_clone().expect("clone"));
                            conn = Some((c, r));
                        }
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                    }
                }
                let (w, r) = conn.as_mut().expect("connected");
                let mut line = String::new();
                let ok = w.write_all(format!("{n}\n").as_bytes()).is_ok()
                    && r.read_line(&mut line).is_ok_and(|k| k > 0)
                    && line.trim() == format!("ok {n}");
                if ok {
                    a.lock().expect("acked").push((n, Instant::now()));
                    n += 1;
                } else {
                    conn = None;
                }
            }
        });
        Self {
            acked,
            stop,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.acked.lock().expect("acked").len()
    }

    /// Waits (bounded) until `n` more records are acknowledged.
    fn wait_more(&self, n: usize, within: Duration) {
        let target = self.count() + n;
        let deadline = Instant::now() + within;
        while self.count() < target {
            assert!(
                Instant::now() < deadline,
                "the service did not acknowledge {n} more records within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The longest time without an acknowledgement from before `t` until now: the outage a
    /// client saw around an event at `t` (acknowledgements in flight at `t` still count before
    /// it).
    fn outage_after(&self, t: Instant) -> Duration {
        let a = self.acked.lock().expect("acked");
        a.windows(2)
            .filter(|w| w[1].1 > t)
            .map(|w| w[1].1.duration_since(w[0].1))
            .max()
            .unwrap_or_default()
    }

    fn acked(&self) -> Vec<u64> {
        self.acked
            .lock()
            .expect("acked")
            .iter()
            .map(|x| x.0)
            .collect()
    }

    fn last(&self) -> u64 {
        self.acked.lock().expect("acked").last().map_or(0, |x| x.0)
    }

    fn stop(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.acked()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Acknowledged records missing from the records file in `dir`.
fn lost(acked: &[u64], dir: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(dir.join("records.log")).unwrap_or_default();
    let have: BTreeSet<u64> = text
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    acked
        .iter()
        .copied()
        .filter(|n| !have.contains(n))
        .collect()
}

fn random(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn the_primary_dies_ten_times_and_no_acknowledged_record_is_lost() {
    if !require_root("the_primary_dies_ten_times_and_no_acknowledged_record_is_lost") {
        return;
    }
    let mut t = pair(&App::Records);
    // Data that never changes: a resync after a failover must not send it again.
    const BALLAST: usize = 8 << 20;
    std::fs::create_dir_all(backing_dir(&t, 0)).expect("backing");
    std::fs::write(backing_dir(&t, 0).join("ballast"), vec![0x5a; BALLAST]).expect("ballast");
    t.start_farmd(0);
    t.start_farmd(1);
    let first = primary_in_sync(&t, 0, Duration::from_secs(60));
    let initial = first.last_resync.clone().expect("initial resync");
    eprintln!(
        "mirror: n1 primary, n2 in sync after the initial copy ({} bytes sent)",
        initial.bytes_sent
    );
    assert!(initial.bytes_sent >= BALLAST as u64);

    let client = Client::start(&t, 1);
    client.wait_more(20, Duration::from_secs(30));
    let mut seed = (std::process::id() as u64) << 1 | 1;
    let mut primary = 0;
    let mut lost_total = 0;
    for round in 1..=10 {
        let survivor = 1 - primary;
        // A random point of the workload.
        std::thread::sleep(Duration::from_millis(200 + random(&mut seed) % 1500));
        let at_kill = client.last();
        let killed = Instant::now();
        kill_host(&t, primary);
        wait_mirror(&t, survivor, Duration::from_secs(30), "takeover", |s| {
            s.role == MirrorRole::Primary
        });
        client.wait_more(5, Duration::from_secs(30));
        let rto = client.outage_after(killed);
        let missing = lost(&client.acked(), &data_dir(&t, survivor));
        lost_total += missing.len();
        eprintln!(
            "mirror round {round}: n{} killed after record {at_kill}; n{} took over, the client \
             saw no acknowledgement for {} ms (RTO); acknowledged records lost: {}",
            primary + 1,
            survivor + 1,
            rto.as_millis(),
            missing.len()
        );
        assert!(
            missing.is_empty(),
            "round {round}: acknowledged records missing on the new primary: {missing:?}"
        );
        // The old primary's host comes back and resyncs.
        revive(&mut t, primary);
        let s = primary_in_sync(&t, survivor, Duration::from_secs(60));
        let r = s.last_resync.expect("resync report");
        eprintln!(
            "mirror round {round}: n{} back in sync: {} bytes sent, {} bytes found equal, {:.2} s{}",
            primary + 1,
            r.bytes_sent,
            r.bytes_same,
            r.seconds,
            if r.full_check { " (full check)" } else { "" }
        );
        assert!(
            r.bytes_sent < BALLAST as u64,
            "round {round}: the resync sent {} bytes: more than what changed",
            r.bytes_sent
        );
        primary = survivor;
    }
    assert_eq!(lost_total, 0);

    // Quiet: the two copies are the same tree.
    let acked = client.stop();
    wait_mirror(&t, primary, Duration::from_secs(10), "no lag", |s| {
        s.lag_bytes == 0 && s.replication == Some(farm_daemon::mirror::Replication::InSync)
    });
    let (a, b) = (
        tree::digest(&backing_dir(&t, primary)).expect("primary copy"),
        tree::digest(&backing_dir(&t, 1 - primary)).expect("replica"),
    );
    let diff = tree::differences(&a, &b);
    assert!(diff.is_empty(), "the copies differ: {diff:#?}");
    let shown = t.farmctl(primary, &["mirror", "status"]);
    assert!(shown.status.success());
    eprintln!(
        "$ farmctl mirror status\n{}",
        String::from_utf8_lossy(&shown.stdout)
    );
    eprintln!(
        "mirror: after 10 failovers the copies are identical ({} entries, content checksums); \
         {} records acknowledged, 0 lost",
        a.len(),
        acked.len()
    );

    // A planned swap under load loses nothing.
    let client = Client::start(&t, acked.last().copied().unwrap_or(0) + 1);
    client.wait_more(20, Duration::from_secs(30));
    let other = 1 - primary;
    let out = t.farmctl(primary, &["mirror", "swap"]);
    assert!(
        out.status.success(),
        "swap refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let swapped = Instant::now();
    wait_mirror(&t, other, Duration::from_secs(60), "swap", |s| {
        s.role == MirrorRole::Primary
    });
    client.wait_more(20, Duration::from_secs(30));
    let swap_outage = client.outage_after(swapped);
    let acked_swap = client.stop();
    let missing = lost(&acked_swap, &data_dir(&t, other));
    eprintln!(
        "mirror: planned swap n{} -> n{}: {} ms without acknowledgement, {} acknowledged records \
         lost",
        primary + 1,
        other + 1,
        swap_outage.as_millis(),
        missing.len()
    );
    assert!(missing.is_empty(), "lost in the swap: {missing:?}");
    let s = primary_in_sync(&t, other, Duration::from_secs(60));
    assert_eq!(s.peer_role, MirrorRole::Secondary);
}

#[test]
fn a_cut_with_the_witness_on_the_secondary_side_never_makes_two_primaries() {
    if !require_root("a_cut_with_the_witness_on_the_secondary_side_never_makes_two_primaries") {
        return;
    }
    let t = records_pair_in_sync();
    let client = Client::start(&t, 1);
    client.wait_more(20, Duration::from_secs(30));
    // n1 (primary) loses n2 on every path and the witness; n2 keeps the witness.
    let (n2, witness) = (t.nodes[1].addr4, t.client_v4[0]);
    t.nft(
        0,
        &format!(
            "table inet cut {{\n  chain in {{\n    type filter hook input priority 0;\n    ip saddr {n2} drop\n\
             \x20   ip saddr {witness} icmp type echo-reply drop\n  }}\n  chain out {{\n    type filter hook \
             output priority 0;\n    ip daddr {n2} drop\n  }}\n}}\n"
        ),
    );
    let cut = Instant::now();
    let mut both = 0;
    let mut samples = 0;
    let mut n2_primary_at = None;
    while cut.elapsed() < Duration::from_secs(10) {
        let (a, b) = (mirror_status(&t, 0), mirror_status(&t, 1));
        if let (Ok(a), Ok(b)) = (&a, &b) {
            samples += 1;
            if a.role == MirrorRole::Primary && b.role == MirrorRole::Primary {
                both += 1;
            }
            if b.role == MirrorRole::Primary && n2_primary_at.is_none() {
                n2_primary_at = Some(cut.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (a, b) = (
        mirror_status(&t, 0).expect("n1"),
        mirror_status(&t, 1).expect("n2"),
    );
    eprintln!(
        "mirror split brain: {samples} samples of both members' roles over 10 s after the cut: \
         both primary in {both}; n2 primary {} ms after the cut; n1 now {:?}",
        n2_primary_at.map_or(0, |d| d.as_millis()),
        a.role
    );
    assert_eq!(both, 0, "two primaries at once");
    assert_eq!(
        b.role,
        MirrorRole::Primary,
        "n2 (with the witness) took over"
    );
    assert_ne!(a.role, MirrorRole::Primary, "n1 (without) stepped down");
    client.wait_more(10, Duration::from_secs(30));
    let acked = client.stop();
    let missing = lost(&acked, &data_dir(&t, 1));
    assert!(missing.is_empty(), "acknowledged records lost: {missing:?}");
    assert!(
        !t.dir.join("n1-app.pid").exists(),
        "n1 stopped its application"
    );
}

#[test]
fn postgresql_keeps_every_committed_transaction_across_a_failover() {
    if !require_root("postgresql_keeps_every_committed_transaction_across_a_failover") {
        return;
    }
    let mut t = pair(&App::Postgres);
    t.start_farmd(0);
    t.start_farmd(1);
    primary_in_sync(&t, 0, Duration::from_secs(180));
    let pg = pg_bin();
    let psql = |sql: &str| {
        t.client
            .command(Path::new(&format!("{pg}/psql")))
            .args(["-h", &VIP4.to_string(), "-U", "postgres", "-At", "-c", sql])
            .output()
            .expect("psql")
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = psql(
            "CREATE TABLE IF NOT EXISTS committed (client int, tx int, PRIMARY KEY (client, tx))",
        );
        if o.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "PostgreSQL did not answer: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // pgbench: every transaction inserts (its client, its number); the per-transaction log
    // says which transactions it saw committed.
    let script = t.dir.join("committed.sql");
    std::fs::write(
        &script,
        "\\set tx :tx + 1\nINSERT INTO committed (client, tx) VALUES (:client_id, :tx);\n",
    )
    .expect("script");
    let logs = t.dir.join("pgbench");
    std::fs::create_dir_all(&logs).expect("log dir");
    let mut bench = t
        .client
        .command(Path::new(&format!("{pg}/pgbench")))
        .current_dir(&logs)
        .args([
            "-h",
            &VIP4.to_string(),
            "-U",
            "postgres",
            "-n",
            "-c",
            "4",
            "-T",
            "60",
            "-D",
            "tx=0",
            "-l",
            "-f",
        ])
        .arg(&script)
        .arg("postgres")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pgbench");
    // Let it commit a while, then the primary's host dies.
    let deadline = Instant::now() + Duration::from_secs(60);
    let committed_lines = |dir: &Path| -> Vec<(u32, u64)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            for l in text.lines() {
                let f: Vec<&str> = l.split_whitespace().collect();
                // client_id transaction_no time ...; failed or skipped ones have no time.
                if f.len() >= 3
                    && f[2].parse::<u64>().is_ok()
                    && let (Ok(c), Ok(n)) = (f[0].parse::<u32>(), f[1].parse::<u64>())
                {
                    out.push((c, n));
                }
            }
        }
        out
    };
    // (pgbench writes its log when it ends: the table tells how far it got.)
    loop {
        let o = psql("SELECT count(*) FROM committed");
        let n: u64 = String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        if n >= 300 {
            break;
        }
        if let Ok(Some(status)) = bench.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = bench.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("pgbench ended ({status}) after {n} transactions: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "pgbench committed too little ({n}): {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let killed = Instant::now();
    kill_host(&t, 0);
    let out = bench.wait_with_output().expect("pgbench ends");
    let saw = committed_lines(&logs);
    wait_mirror(&t, 1, Duration::from_secs(60), "takeover", |s| {
        s.role == MirrorRole::Primary
    });
    // PostgreSQL recovers on n2; every transaction pgbench saw committed is in the table.
    let deadline = Instant::now() + Duration::from_secs(120);
    let rows = loop {
        let o = psql("SELECT client, tx FROM committed");
        if o.status.success() {
            break String::from_utf8_lossy(&o.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "PostgreSQL did not come back on n2: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            std::fs::read_to_string(t.dir.join("n2-pg.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let rto = killed.elapsed();
    let have: BTreeSet<(u32, u64)> = rows
        .lines()
        .filter_map(|l| {
            let (c, n) = l.split_once('|')?;
            Some((c.parse().ok()?, n.parse().ok()?))
        })
        .collect();
    // A client runs its transactions one after the other, the k-th inserting tx = k: the ones
    // it logged as committed are 1..=count.
    let mut per_client = std::collections::BTreeMap::<u32, u64>::new();
    for &(c, _) in &saw {
        *per_client.entry(c).or_default() += 1;
    }
    let missing: Vec<(u32, u64)> = per_client
        .iter()
        .flat_map(|(&c, &n)| (1..=n).map(move |k| (c, k)))
        .filter(|x| !have.contains(x))
        .collect();
    eprintln!(
        "mirror postgresql: pgbench saw {} transactions committed before n1 died ({}); n2 \
         answered again after {:.1} s; rows on n2: {}; committed transactions missing: {}",
        saw.len(),
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .find(|l| l.contains("aborted") || l.contains("error"))
            .unwrap_or("pgbench ended"),
        rto.as_secs_f64(),
        have.len(),
        missing.len()
    );
    assert!(!saw.is_empty());
    assert!(missing.is_empty(), "committed but missing: {missing:?}");
}

/// The attacker of the threat model (no key) records the primary's handshake and the whole
/// initial copy, then replays the handshake every 100 ms for a minute while the service writes.
#[test]
fn replayed_handshakes_break_nothing_and_the_session_is_unreadable() {
    if !require_root("replayed_handshakes_break_nothing_and_the_session_is_unreadable") {
        return;
    }
    let mut t = pair(&App::Records);
    let canary = b"FARM-CANARY-this-record-must-never-cross-the-wire-in-clear".repeat(100);
    std::fs::create_dir_all(backing_dir(&t, 0)).expect("backing");
    std::fs::write(backing_dir(&t, 0).join("secret-table"), &canary).expect("canary");
    let eve = Attacker::plug(&t);
    let (n1, n2) = (t.nodes[0].addr4, t.nodes[1].addr4);
    let frames = std::thread::scope(|s| {
        let rec = s.spawn(|| {
            eve.capture(Duration::from_secs(20), move |f| {
                attacker::tcp4(f).is_some_and(|x| {
                    (x.src, x.dst, x.dst_port) == (n1, n2, REPLICATION_PORT)
                        || (x.src, x.dst, x.src_port) == (n2, n1, REPLICATION_PORT)
                })
            })
        });
        t.start_farmd(0);
        t.start_farmd(1);
        primary_in_sync(&t, 0, Duration::from_secs(60));
        rec.join().expect("capture")
    });
    let segments: Vec<attacker::Tcp> = frames.iter().filter_map(|f| attacker::tcp4(f)).collect();
    let wire: Vec<u8> = segments.iter().flat_map(|s| s.payload.clone()).collect();
    assert!(wire.len() > canary.len(), "captured {} bytes", wire.len());
    assert!(
        !wire.windows(24).any(|w| w == &canary[..24]),
        "the replicated data crossed the wire in clear"
    );
    // The primary's side of its first connection: hello, then confirm.
    let first_port = segments
        .iter()
        .find(|s| s.src == n1 && !s.payload.is_empty())
        .expect("the primary sent something")
        .src_port;
    let sent: Vec<attacker::Tcp> = segments
        .into_iter()
        .filter(|s| s.src == n1 && s.src_port == first_port)
        .collect();
    let handshake = attacker::tcp_stream(&sent);
    assert!(handshake.len() >= 85 + 32, "{} bytes", handshake.len());
    let replay = handshake[..85 + 32].to_vec();

    let client = Client::start(&t, 1);
    client.wait_more(20, Duration::from_secs(30));
    let stop = Arc::new(AtomicBool::new(false));
    let target = SocketAddr::from((n2, REPLICATION_PORT));
    let replayer = {
        let stop = stop.clone();
        eve.ns.spawn(move || {
            let mut sent = 0u64;
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(90) {
                if let Ok(mut c) = TcpStream::connect_timeout(&target, Duration::from_millis(200))
                    && c.write_all(&replay).is_ok()
                {
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            sent
        })
    };
    let until = Instant::now() + Duration::from_secs(60);
    let mut not_in_sync = Vec::new();
    while Instant::now() < until {
        let s = mirror_status(&t, 0).expect("status");
        if s.replication != Some(farm_daemon::mirror::Replication::InSync) {
            not_in_sync.push(format!("{:?} {:?}", s.replication, s.replication_detail));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    stop.store(true, Ordering::Relaxed);
    let replays = replayer.join().expect("replayer");
    let acked = client.stop();
    let secondary = mirror_status(&t, 1).expect("status");
    eprintln!(
        "mirror under replay: {replays} replayed handshakes, {} refused by the secondary, {} \
         records acknowledged",
        secondary.handshakes_refused,
        acked.len()
    );
    assert!(replays >= 300, "replayed {replays}");
    assert!(
        not_in_sync.is_empty(),
        "the primary left sync under replay: {not_in_sync:?}"
    );
    assert!(secondary.handshakes_refused >= replays / 2);
    assert!(acked.len() > 100);
    let missing = lost(&acked, &backing_dir(&t, 1));
    assert!(
        missing.is_empty(),
        "acknowledged records missing on the secondary: {missing:?}"
    );
    assert!(
        !t.log(1).contains("replaces the previous one"),
        "{}",
        t.log(1)
    );
}

/// Whoever holds the group key can speak to the secondary as a primary would: it still cannot
/// plant a device node or a set-user-id file there.
#[test]
fn the_secondary_refuses_device_nodes_and_setuid_files() {
    if !require_root("the_secondary_refuses_device_nodes_and_setuid_files") {
        return;
    }
    let t = records_pair_in_sync();
    let key = farm_daemon::secret::Secret::load(&t.key_file())
        .expect("key")
        .mirror_key();
    let target = SocketAddr::from((t.nodes[1].addr4, REPLICATION_PORT));
    let rogue = |op: farm_mirror::wire::Op| {
        t.nodes[0].ns.run(move || {
            let c = TcpStream::connect(target).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(10))).ok();
            let (mut to, mut from) = farm_mirror::wire::connect(
                c.try_clone().expect("clone"),
                c.try_clone().expect("clone"),
                &key,
            )
            .expect("handshake with the group key");
            to.send(&farm_mirror::wire::Msg::Op(op)).expect("send");
            to.send(&farm_mirror::wire::Msg::Sync { barrier: 1 })
                .expect("send");
            to.flush().expect("flush");
            from.recv()
        })
    };
    let answers = [
        rogue(farm_mirror::wire::Op::Mknod {
            path: b"sda".to_vec(),
            mode: libc::S_IFBLK | 0o666,
            rdev: libc::makedev(8, 0),
        }),
        rogue(farm_mirror::wire::Op::Create {
            path: b"rootshell".to_vec(),
            mode: 0o4755,
        }),
    ];
    for a in &answers {
        assert!(
            matches!(a, Ok(farm_mirror::wire::Msg::Failed { message }) if message.contains("refused")),
            "{a:?}"
        );
    }
    let replica = backing_dir(&t, 1);
    assert!(!replica.join("sda").exists() && !replica.join("rootshell").exists());
    let s = mirror_status(&t, 1).expect("status");
    assert_eq!(s.ops_refused, 2, "{s:?}");
    let listing = t.farmctl(1, &["mirror", "status"]);
    assert!(
        String::from_utf8_lossy(&listing.stdout).contains("REFUSED 2 operations"),
        "{}",
        String::from_utf8_lossy(&listing.stdout)
    );
    // The real primary (its session was replaced by the rogue one) is back in sync.
    primary_in_sync(&t, 0, Duration::from_secs(60));
}
