//! farm-bench: benchmarks that print figures (run through `cargo xtask bench ...`).
//!
//! `failover` and `rolling`: recovery against keepalived (see `recovery`).
//!
//! `membership`: buckets moved by a member list change, farm 0.2 / farm 0.1 / Maglev (see
//! `membership`).
//!
//! `upgrade`: an in-place upgrade's gap in the heartbeat stream as a peer saw it, beside a
//! restart (see `upgrade`).
//!
//! `mirror`: mirror mode's fsync latency, write throughput and resync speed against the same
//! directory without replication (see `mirror`).
//!
//! `dataplane`: ns/packet of the XDP program from BPF_PROG_TEST_RUN with repeat, per path,
//! next to the empty XDP program measured in the same run (the floor); then the drop rate of
//! the XDP filter against the kernel's own tool for the job, an nftables `jhash ... mod 3` rule
//! at the earliest netfilter hook (netdev ingress), with real frames sent into a veth by
//! BPF_PROG_TEST_RUN in live-frames mode (what xdp-trafficgen does; Debian's xdp-trafficgen
//! 1.3.1 cannot load on kernel 6.18).

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode};
use farm_common::{BUCKETS, BucketEntry, BucketKey, affinity, bucket_of, proto_mask};
use farm_daemon::{
    config::{Rule, Vip},
    dataplane::Dataplane,
};
use farm_tests::{
    fixture::{self, KEY, VIP4, VIP6, client6},
    frames::*,
    netns::Netns,
};

mod member;
mod membership;
mod mirror;
mod recovery;
mod upgrade;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("dataplane") => dataplane(&args[1..]),
        Some("failover") => recovery::failover(flag(&args[1..], "--trials", 20)? as usize),
        Some("rolling") => recovery::rolling(),
        Some("mirror") => mirror::mirror(&args[1..]),
        Some("membership") => membership::membership()
            .and_then(|()| membership::convergence(flag(&args[1..], "--trials", 3)? as usize)),
        Some("upgrade") => upgrade::upgrade(flag(&args[1..], "--trials", 10)? as usize),
        Some("member") => member::member(&args[1..]),
        _ => bail!(
            "usage: farm-bench dataplane [--repeat N] [--rounds N] [--packets N] [--trials N] | \
             failover [--trials N] | rolling | mirror [--mib N] [--fsyncs N] | membership \
             [--trials N] | upgrade [--trials N] | member [--seconds N] [--rates PPS,PPS]"
        ),
    }
}

fn flag(args: &[String], name: &str, default: u32) -> Result<u32> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .context("missing value")?
            .parse()
            .with_context(|| format!("{name} takes a number")),
        None => Ok(default),
    }
}

/// One BPF_PROG_TEST_RUN of `repeat` runs: the kernel's mean ns per run, and the verdict.
fn run_once(prog: &Xdp, frame: &[u8], repeat: u32) -> Result<(f64, u32)> {
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::new()
        })
        .context("BPF_PROG_TEST_RUN")?;
    Ok((r.duration.as_nanos() as f64, r.return_value))
}

/// Median, min and max of samples.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// The machine, as a benchmark's reader needs it: CPU model, cores, kernel.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cores} cores available, kernel {}", kernel.trim())
}

fn verdict_name(v: u32) -> &'static str {
    match v {
        1 => "DROP",
        2 => "PASS",
        3 => "TX",
        _ => "?",
    }
}

fn dataplane(args: &[String]) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the data-plane benchmark loads eBPF programs: run it as root");
    }
    let repeat = flag(args, "--repeat", 1_000_000)?;
    let rounds = flag(args, "--rounds", 7)?;
    let mut dp = fixture::dataplane();

    let (m4, t4) = (fixture::client4(true), fixture::client4(false));
    let (m6, t6) = (client6(true), client6(false));
    let syn = tcp(40000, 80);
    let v4 = |src: Ipv4Addr, dst: Ipv4Addr| {
        eth(
            CLUSTER_MAC,
            CLIENT_MAC,
            0x0800,
            &V4::new(src, dst, 6).build(&syn),
        )
    };
    let frames: Vec<(&str, Vec<u8>)> = vec![
        ("accept   IPv4 TCP to VIP, my bucket", v4(m4, VIP4)),
        ("drop     IPv4 TCP to VIP, other's bucket", v4(t4, VIP4)),
        (
            "accept6  IPv6 TCP to VIP, my bucket",
            eth(
                CLUSTER_MAC,
                CLIENT_MAC,
                0x86dd,
                &ipv6(m6, VIP6, 6, &[], &syn),
            ),
        ),
        (
            "drop6    IPv6 TCP to VIP, other's bucket",
            eth(
                CLUSTER_MAC,
                CLIENT_MAC,
                0x86dd,
                &ipv6(t6, VIP6, 6, &[], &syn),
            ),
        ),
        (
            "non-VIP  IPv4 TCP to another address",
            v4(m4, Ipv4Addr::new(192, 0, 2, 11)),
        ),
        // The answering path rewrites the frame into a reply, and BPF_PROG_TEST_RUN repeats on
        // the rewritten frame; so the ARP figure is the request a peer answers: parse, VIP
        // lookups, hash, bucket lookup (the reply adds a handful of stores).
        (
            "arp      request for VIP, peer's client",
            eth(
                [0xff; 6],
                CLIENT_MAC,
                0x0806,
                &arp(1, CLIENT_MAC, t4, [0; 6], VIP4),
            ),
        ),
    ];
    // Every packet of a run is the same frame: with the per-CPU bucket cache, all but the first
    // find their bucket there (a connection's or a client's later packets); with the cache
    // off, each is hashed (every packet from a new client: a SYN flood from spoofed sources).
    let mut cases: Vec<(String, Vec<u8>, u8)> = Vec::new();
    for (name, frame) in &frames {
        let hashed = !name.starts_with("non-VIP");
        let label = if hashed { ", cached" } else { "" };
        cases.push((format!("{name}{label}"), frame.clone(), 0));
    }
    for (name, frame) in &frames {
        if !name.starts_with("non-VIP") {
            cases.push((
                format!("{name}, hashed"),
                frame.clone(),
                farm_common::control_flags::NO_BUCKET_CACHE,
            ));
        }
    }

    println!(
        "farm data plane: BPF_PROG_TEST_RUN, {repeat} repeats x {rounds} rounds; each round runs \
         the empty program and every case in turn, and each case is divided by that round's floor"
    );
    println!("machine: {}", machine());
    if let Ok(info) = dp.xdp_program().info() {
        println!(
            "farm_xdp: {} instructions after the verifier's rewrites, {} bytes of machine code",
            info.size_translated().unwrap_or(0) / 8,
            info.size_jitted()
        );
    }
    println!();
    // Interleaved: a machine that slows down for a while slows the floor and the case alike.
    let mut floor = Vec::new();
    let mut per_case: Vec<(Vec<f64>, Vec<f64>, u32)> =
        cases.iter().map(|_| (Vec::new(), Vec::new(), 0)).collect();
    for _ in 0..rounds.max(1) {
        let (f, _) = run_once(dp.empty_program(), &cases[0].1, repeat)?;
        floor.push(f);
        for (i, (_, frame, flags)) in cases.iter().enumerate() {
            dp.set_control_flags(*flags)?;
            let (ns, ret) = run_once(dp.xdp_program(), frame, repeat)?;
            per_case[i].0.push(ns);
            per_case[i].1.push(ns / f.max(1.0));
            per_case[i].2 = ret;
        }
    }
    println!(
        "{:<52} {:>8} {:>11}   {:>6} {:>13}",
        "path", "median", "min-max ns", "ratio", "ratio min-max"
    );
    let (f, lo, hi) = spread(floor);
    println!(
        "{:<52} {f:>6.1} ns {:>11}   {:>5.2}x {:>13}  (floor)",
        "empty XDP program (XDP_PASS)",
        format!("{lo:.0}-{hi:.0}"),
        1.0,
        "-"
    );
    for ((name, _, _), (ns, ratios, ret)) in cases.iter().zip(per_case) {
        let (m, lo, hi) = spread(ns);
        let (r, rlo, rhi) = spread(ratios);
        println!(
            "{name:<52} {m:>6.1} ns {:>11}   {r:>5.2}x {:>13}  {}",
            format!("{lo:.0}-{hi:.0}"),
            format!("{rlo:.2}-{rhi:.2}x"),
            verdict_name(ret)
        );
    }
    println!();
    println!("goal: accept and drop paths, IPv4 and IPv6, at most 2.0x the empty program");
    drop(dp);

    let packets = flag(args, "--packets", 20_000_000)?;
    let trials = flag(args, "--trials", 3)?;
    if trials == 0 {
        return Ok(());
    }
    kernel_comparison(packets, trials)
}

fn have(tool: &str) -> bool {
    std::process::Command::new("which")
        .arg(tool)
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Sends `packets` copies of `frame` out of interface `ifindex` (of the calling thread's
/// namespace) as fast as the kernel can, with the XDP_TX program in live-frames mode.
fn generate(frame: &[u8], ifindex: u32, packets: u32) -> Result<Duration> {
    let mut dp = Dataplane::load()?;
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    // (the kernel wants data = 0 and data_end = the frame's length).
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let started = std::time::Instant::now();
    let mut left = packets;
    while left > 0 {
        let n = left.min(5_000_000);
        dp.tx_program()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx),
                repeat: n,
                attrs: TestRunAttrs::new().xdp_live_frames(64),
                ..TestRunOptions::new()
            })
            .context("BPF_PROG_TEST_RUN in live-frames mode")?;
        left -= n;
    }
    Ok(started.elapsed())
}

fn nft_drops(dut: &Netns) -> Result<u64> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", dut.path()))
        .args(["nft", "list", "chain", "netdev", "farmbench", "in"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("drop"))
        .context("nft drop rule")?;
    let n = line
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .context("nft counter")?;
    Ok(n.parse()?)
}

fn kernel_comparison(packets: u32, trials: u32) -> Result<()> {
    println!();
    println!(
        "drop rate against the kernel's alternative ({packets} frames each, generated into a veth)"
    );
    if !have("nft") || !have("ethtool") {
        println!(
            "  skipped: needs nft and ethtool (cargo xtask bench installs nftables and ethtool)"
        );
        return Ok(());
    }
    farm_tests::netns::remove_stale();
    let stem = farm_tests::netns::unique_stem();
    let gen_ns = Netns::new(format!("{stem}-gen"));
    let dut = Netns::new(format!("{stem}-dut"));
    gen_ns.ip(&[
        "link", "add", "name", "gen0", "type", "veth", "peer", "name", "dut0", "netns", &dut.name,
    ]);
    gen_ns.ip(&["link", "set", "gen0", "up"]);
    dut.ip(&["link", "set", "dut0", "up"]);
    dut.ip(&[
        "addr",
        "add",
        &format!("{VIP6}/128"),
        "dev",
        "dut0",
        "nodad",
    ]);
    // GRO gives the veth a NAPI instance, so it receives XDP_TX frames without an XDP program of
    // its own: the nftables path pays for no XDP program at all.
    let st = std::process::Command::new("nsenter")
        .arg(format!("--net={}", dut.path()))
        .args(["ethtool", "-K", "dut0", "gro", "on"])
        .stdout(std::process::Stdio::null())
        .status()?;
    if !st.success() {
        bail!("ethtool -K dut0 gro on failed");
    }
    let dut_mac: [u8; 6] = {
        let out = dut.ip_out(&["-br", "link", "show", "dut0"]);
        let mac = out.split_whitespace().nth(2).context("mac")?;
        farm_daemon::config::parse_mac(mac).context("mac")?
    };
    let src = client6(false);
    let frame = eth(
        dut_mac,
        CLIENT_MAC,
        0x86dd,
        &ipv6(src, VIP6, 17, &[], &udp(40000, 5000, &[0; 18])),
    );
    let gen_ifindex = gen_ns.run(|| {
        // SAFETY: valid C string.
        unsafe { libc::if_nametoindex(c"gen0".as_ptr()) }
    });

    // farm: XDP filter on dut0, the frame's bucket belongs to another member.
    let b = bucket_of(&KEY, BucketKey::V6(src.octets()));
    let farm_trial = |flags: u8| -> Result<(u64, Duration)> {
        let farm = dut.run(move || -> Result<Dataplane> {
            let mut dp = Dataplane::load()?;
            dp.set_identity(KEY, dut_mac, CLUSTER_MAC)?;
            dp.set_vips(&[Vip {
                address: IpAddr::V6(VIP6),
                rules: vec![Rule {
                    protocols: proto_mask::UDP,
                    port_lo: 5000,
                    port_hi: 5000,
                    affinity: affinity::CLIENT,
                }],
            }])?;
            dp.set_buckets(&vec![BucketEntry::owned_by(1, 0); BUCKETS as usize])?;
            dp.arm(Duration::from_secs(3600))?;
            dp.set_control_flags(flags)?;
            dp.xdp_program().attach("dut0", XdpMode::Driver)?;
            Ok(dp)
        })?;
        let before = farm.bucket_counter(b)?.dropped_packets;
        let frame2 = frame.clone();
        let took = gen_ns.run(move || generate(&frame2, gen_ifindex, packets))?;
        std::thread::sleep(Duration::from_millis(200));
        let drops = farm.bucket_counter(b)?.dropped_packets - before;
        // Dropping it detaches the program: the nftables trials run without XDP.
        drop(farm);
        Ok((drops, took))
    };

    // nftables: the same job at the netdev ingress hook (before any other netfilter hook). The
    // jhash seed decides whether this one source is dropped: found once, on the first trial.
    let nft = |rules: &str| -> Result<()> {
        let mut nft_cmd = std::process::Command::new("nsenter")
            .arg(format!("--net={}", dut.path()))
            .args(["nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()?;
        {
            use std::io::Write as _;
            nft_cmd
                .stdin
                .take()
                .context("stdin")?
                .write_all(rules.as_bytes())?;
        }
        if !nft_cmd.wait()?.success() {
            bail!("nft failed to load:\n{rules}");
        }
        Ok(())
    };
    let ruleset = |seed: u32| {
        format!(
            "flush ruleset netdev\ntable netdev farmbench {{\n  chain in {{\n    type filter hook \
             ingress device \"dut0\" priority 0;\n    ip6 daddr {VIP6} jhash ip6 saddr mod 3 seed \
             {seed} != 0 counter drop\n    counter\n  }}\n}}\n"
        )
    };
    let mut seed = None;
    for s in 1..=16u32 {
        nft(&ruleset(s))?;
        let frame2 = frame.clone();
        gen_ns.run(move || generate(&frame2, gen_ifindex, 1000))?;
        std::thread::sleep(Duration::from_millis(100));
        if nft_drops(&dut)? > 0 {
            seed = Some(s);
            break;
        }
    }
    let Some(seed) = seed else {
        bail!("no jhash seed in 1..=16 drops the generated source");
    };
    nft("flush ruleset netdev\n")?;
    let nft_trial = || -> Result<(u64, Duration)> {
        nft(&ruleset(seed))?;
        let before = nft_drops(&dut)?;
        let frame2 = frame.clone();
        let took = gen_ns.run(move || generate(&frame2, gen_ifindex, packets))?;
        std::thread::sleep(Duration::from_millis(200));
        let drops = nft_drops(&dut)? - before;
        nft("flush ruleset netdev\n")?;
        Ok((drops, took))
    };

    // Alternating trials: a slow spell of the machine hits both sides. The generator repeats one
    // frame: farm finds its bucket in the per-CPU cache after the first; "hashed" turns the
    // cache off, as for a flood from a new source address in every packet.
    let mut rates: [Vec<f64>; 3] = Default::default();
    let mut ratios: [Vec<f64>; 2] = Default::default();
    for t in 1..=trials {
        let (fd, ft) = farm_trial(0)?;
        let (hd, ht) = farm_trial(farm_common::control_flags::NO_BUCKET_CACHE)?;
        let (nd, nt) = nft_trial()?;
        let rate = |d: u64, t: Duration| d as f64 / t.as_secs_f64() / 1e6;
        let (fr, hr, nr) = (rate(fd, ft), rate(hd, ht), rate(nd, nt));
        println!(
            "  trial {t}: farm {fr:.2} Mpps ({fd} of {packets} dropped in {ft:.2?}), hashed \
             {hr:.2} Mpps ({hd} in {ht:.2?}), nftables {nr:.2} Mpps ({nd} in {nt:.2?}): {:.2}x, \
             hashed {:.2}x",
            fr / nr,
            hr / nr
        );
        for (v, x) in rates.iter_mut().zip([fr, hr, nr]) {
            v.push(x);
        }
        ratios[0].push(fr / nr);
        ratios[1].push(hr / nr);
    }
    let [farm_rates, hashed_rates, nft_rates] = rates;
    let [farm_ratios, hashed_ratios] = ratios;
    for (name, v) in [
        ("farm XDP filter", farm_rates),
        ("farm, every packet hashed", hashed_rates),
        ("nftables jhash mod 3", nft_rates),
    ] {
        let (m, lo, hi) = spread(v);
        println!("  {name:<27} {m:>6.2} Mpps dropped (median; {lo:.2}-{hi:.2})");
    }
    for (name, v) in [
        ("farm / nftables", farm_ratios),
        ("hashed / nftables", hashed_ratios),
    ] {
        let (m, lo, hi) = spread(v);
        println!(
            "  ratio {name:<21} {m:>6.2}x (median; {lo:.2}-{hi:.2}x; goal: at least 3x in every \
             trial)"
        );
    }
    println!("  (generator and receiver share the machine's cores; the rates include sending)");
    Ok(())
}
