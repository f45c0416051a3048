//! `farm-bench mirror`: what synchronous replication costs, against the same backing directory
//! without it, in the same run: fsync latency (append 4 KiB + fdatasync, p50/p99), streaming
//! write throughput (1 MiB writes, one fsync at the end), and resync speed (a full copy to an
//! empty replica, a checksum pass over an equal one, a pass after 1 % of the blocks changed).
//! The replica lives in a second network namespace across a veth pair and a bridge; the round
//! trip between the two is measured too, for the goal "fsync at most 2x local plus one round
//! trip".

use std::{
    io::{Read as _, Write as _},
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use farm_tests::{
    mirror_tool::{self, MirrorProc},
    topology::{Spec, Topology},
};

const PORT: u16 = 7950;

fn spawn(t: &Topology, i: usize, args: &[String], log: &Path) -> Result<MirrorProc> {
    mirror_tool::spawn(t, i, args, log).context("farm-mirror")
}

/// Starts the primary and waits until its log says the replica is in sync and the mount
/// serves; returns it and the resync line's (data bytes sent, bytes found equal, seconds).
fn start_primary(
    t: &Topology,
    backing: &Path,
    mount: &Path,
    log: &Path,
) -> Result<(MirrorProc, (u64, u64, f64))> {
    let p = spawn(
        t,
        0,
        &[
            "primary".into(),
            "--backing".into(),
            backing.display().to_string(),
            "--mount".into(),
            mount.display().to_string(),
            "--secondary".into(),
            format!("{}:{PORT}", t.nodes[1].addr4),
        ],
        log,
    )?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if mirror_tool::mounted(mount)
            && let Some(l) = text.lines().find(|l| l.contains(" in sync at generation"))
        {
            return Ok((p, resync_figures(l)?));
        }
        if Instant::now() > deadline {
            bail!("the primary did not come up:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// "... N pass(es), B bytes of file data sent, E bytes found equal, O operations, T s".
fn resync_figures(line: &str) -> Result<(u64, u64, f64)> {
    let num = |before: &str| -> Option<f64> {
        let i = line.find(before)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    Ok((
        num(" bytes of file data sent").context("bytes sent")? as u64,
        num(" bytes found equal").context("bytes equal")? as u64,
        line.rsplit(", ")
            .next()
            .and_then(|t| t.trim().trim_end_matches(" s").parse().ok())
            .context("seconds")?,
    ))
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// `n` x (append 4 KiB, fdatasync) in `dir`: p50 and p99.
fn fsync_latency(dir: &Path, n: usize) -> Result<(Duration, Duration)> {
    let path = dir.join("fsync-bench");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)?;
    let block = vec![0x42u8; 4096];
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f.write_all_at(&block, (i * 4096) as u64)?;
        f.sync_data()?;
        samples.push(t.elapsed());
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok((
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99),
    ))
}

/// Writes `mib` MiB in 1 MiB writes and fsyncs once: MB/s (10^6 bytes).
fn write_throughput(dir: &Path, mib: usize) -> Result<f64> {
    let path = dir.join("stream-bench");
    let mut f = std::fs::File::create(&path)?;
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 7 + 13) as u8).collect();
    let t = Instant::now();
    for _ in 0..mib {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    let secs = t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok((mib << 20) as f64 / secs / 1e6)
}

/// Median TCP round trip between the two namespaces (1-byte ping-pong).
fn round_trip(t: &Topology) -> Result<Duration> {
    let addr = std::net::SocketAddr::from((t.nodes[1].addr4, PORT + 1));
    let server = t.nodes[1].ns.spawn(move || -> std::io::Result<()> {
        let l = std::net::TcpListener::bind(addr)?;
        let (mut c, _) = l.accept()?;
        c.set_nodelay(true)?;
        let mut b = [0u8; 1];
        while c.read_exact(&mut b).is_ok() {
            c.write_all(&b)?;
        }
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(200));
    let samples = t.nodes[0]
        .ns
        .run(move || -> std::io::Result<Vec<Duration>> {
            let mut c = std::net::TcpStream::connect(addr)?;
            c.set_nodelay(true)?;
            let mut b = [0u8; 1];
            let mut v = Vec::new();
            for _ in 0..2000 {
                let t = Instant::now();
                c.write_all(&b)?;
                c.read_exact(&mut b)?;
                v.push(t.elapsed());
            }
            Ok(v)
        })?;
    let _ = server.join();
    let mut s = samples;
    Ok(percentile(&mut s, 0.5))
}

fn us(d: Duration) -> String {
    format!("{:.0} us", d.as_secs_f64() * 1e6)
}

/// Fills `dir` with `files` x `mib` MiB of data that does not compress or dedupe.
fn fill(dir: &Path, files: usize, mib: usize) -> Result<u64> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut total = 0;
    for i in 0..files {
        let mut f = std::fs::File::create(dir.join(format!("data-{i}")))?;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for b in buf.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                b.copy_from_slice(&state.to_le_bytes()[..b.len()]);
            }
            f.write_all(&buf)?;
            total += buf.len() as u64;
        }
        f.sync_all()?;
    }
    Ok(total)
}

pub fn mirror(args: &[String]) -> Result<()> {
    let mib = super::flag(args, "--mib", 256)? as usize;
    let fsyncs = super::flag(args, "--fsyncs", 2000)? as usize;
    let t = Topology::build(Spec {
        nodes: 2,
        client_addrs: 1,
        test_servers: false,
        ..Spec::default()
    });
    let dir = |n: &str| -> Result<PathBuf> {
        let p = t.dir.join(n);
        std::fs::create_dir_all(&p)?;
        Ok(p)
    };
    let (backing, replica, mount, local) = (
        dir("backing")?,
        dir("replica")?,
        dir("mount")?,
        dir("local")?,
    );
    let fs = String::from_utf8_lossy(
        &std::process::Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(&backing)
            .output()?
            .stdout,
    )
    .trim()
    .to_string();
    eprintln!(
        "mirror benchmark: backing, replica and the local comparison on one {fs} filesystem; \
         replication over veth + bridge between two network namespaces"
    );
    let rtt = round_trip(&t)?;
    eprintln!("round trip between the nodes (TCP, p50): {}", us(rtt));

    // Resync: a full copy to an empty replica.
    let data = fill(&backing, 4, mib / 4)?;
    let secondary = spawn(
        &t,
        1,
        &[
            "secondary".into(),
            "--replica".into(),
            replica.display().to_string(),
            "--listen".into(),
            format!("{}:{PORT}", t.nodes[1].addr4),
        ],
        &t.dir.join("secondary.log"),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let (primary, (sent, _, secs)) =
        start_primary(&t, &backing, &mount, &t.dir.join("primary-1.log"))?;
    let full = (sent, secs);

    // Latency and throughput: local first, then through the mirror.
    let (l50, l99) = fsync_latency(&local, fsyncs)?;
    let (m50, m99) = fsync_latency(&mount, fsyncs)?;
    let lw = write_throughput(&local, mib)?;
    let mw = write_throughput(&mount, mib)?;
    drop(primary);

    // Resync of an equal replica (every file compared by checksum), then after 1 % of the
    // blocks changed (as a primary that went on alone would have them).
    let (p2, (sent_eq, same_eq, secs_eq)) =
        start_primary(&t, &backing, &mount, &t.dir.join("primary-2.log"))?;
    drop(p2);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(backing.join("data-0"))?;
    let blocks = (data / 4) / (64 << 10);
    let changed = (blocks * 4 / 100).max(1);
    for k in 0..changed {
        f.write_all_at(b"changed", (k * 25 * (64 << 10)) % (data / 4))?;
    }
    f.sync_all()?;
    let (p3, (sent_chg, same_chg, secs_chg)) =
        start_primary(&t, &backing, &mount, &t.dir.join("primary-3.log"))?;
    drop(p3);
    drop(secondary);

    let mbs = |b: u64, s: f64| if s > 0.0 { b as f64 / s / 1e6 } else { 0.0 };
    println!();
    println!("mirror mode: synchronous replication against the same directory without it");
    println!("{:<34} {:>14} {:>14}", "", "local", "mirror");
    println!(
        "{:<34} {:>14} {:>14}",
        format!("fsync p50 ({fsyncs} x 4 KiB + fdatasync)"),
        us(l50),
        us(m50)
    );
    println!("{:<34} {:>14} {:>14}", "fsync p99", us(l99), us(m99));
    println!(
        "{:<34} {:>11.0} MB/s {:>9.0} MB/s",
        format!("streaming write ({mib} MiB + fsync)"),
        lw,
        mw
    );
    println!();
    let goal_latency = l50 * 2 + rtt;
    println!(
        "goal fsync p50 <= 2 x local + round trip = {}: {} ({})",
        us(goal_latency),
        if m50 <= goal_latency {
            "met"
        } else {
            "NOT met"
        },
        us(m50)
    );
    println!(
        "goal streaming write >= local / 2 = {:.0} MB/s: {} ({mw:.0} MB/s)",
        lw / 2.0,
        if mw >= lw / 2.0 { "met" } else { "NOT met" }
    );
    println!();
    println!("resync ({} MiB in 4 files):", data >> 20);
    println!(
        "  full copy to an empty replica:   {:>8.1} s, {:>6.0} MB/s sent",
        full.1,
        mbs(full.0, full.1)
    );
    println!(
        "  equal replica, checksum pass:    {:>8.1} s, {:>6.0} MB/s compared, {} bytes sent",
        secs_eq,
        mbs(same_eq, secs_eq),
        sent_eq
    );
    println!(
        "  {changed} of {} blocks changed:     {:>8.1} s, {:>6.0} MB/s compared, {} bytes sent",
        blocks * 4,
        secs_chg,
        mbs(same_chg + sent_chg, secs_chg),
        sent_chg
    );
    Ok(())
}
