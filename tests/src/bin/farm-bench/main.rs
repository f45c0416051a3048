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
        _ => bail!(
            "usage: farm-bench dataplane [--repeat N] [--rounds N] | failover [--trials N] | \
             rolling | mirror [--mib N] [--fsyncs N] | membership [--trials N] | upgrade \
             [--trials N]"
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

/// Median ns/packet over `rounds` runs of `repeat` iterations.
fn measure(prog: &Xdp, frame: &[u8], repeat: u32, rounds: u32) -> Result<(f64, u32)> {
    let mut samples = Vec::new();
    let mut ret = 0;
    for _ in 0..rounds {
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..TestRunOptions::new()
            })
            .context("BPF_PROG_TEST_RUN")?;
        // The kernel reports the mean duration of one run.
        samples.push(r.duration.as_nanos() as f64);
        ret = r.return_value;
    }
    samples.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    Ok((samples[samples.len() / 2], ret))
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
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("accept   (IPv4 TCP to VIP, my bucket)", v4(m4, VIP4)),
        ("drop     (IPv4 TCP to VIP, other's bucket)", v4(t4, VIP4)),
        (
            "accept6  (IPv6 TCP to VIP, my bucket)",
            eth(
                CLUSTER_MAC,
                CLIENT_MAC,
                0x86dd,
                &ipv6(m6, VIP6, 6, &[], &syn),
            ),
        ),
        (
            "drop6    (IPv6 TCP to VIP, other's bucket)",
            eth(
                CLUSTER_MAC,
                CLIENT_MAC,
                0x86dd,
                &ipv6(t6, VIP6, 6, &[], &syn),
            ),
        ),
        (
            "non-VIP  (IPv4 TCP to another address)",
            v4(m4, Ipv4Addr::new(192, 0, 2, 11)),
        ),
        // The answering path rewrites the frame into a reply, and BPF_PROG_TEST_RUN repeats on
        // the rewritten frame; so the ARP figure is the request a peer answers: parse, VIP
        // lookups, hash, bucket lookup (the reply adds a handful of stores).
        (
            "arp      (request for VIP, peer's client)",
            eth(
                [0xff; 6],
                CLIENT_MAC,
                0x0806,
                &arp(1, CLIENT_MAC, t4, [0; 6], VIP4),
            ),
        ),
    ];

    println!(
        "farm data plane: BPF_PROG_TEST_RUN, {repeat} repeats x {rounds} rounds, median ns/packet"
    );
    println!(
        "kernel {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    println!();
    let (floor, _) = measure(dp.empty_program(), &cases[0].1, repeat, rounds)?;
    println!(
        "{:<46} {:>8.1} ns   1.00x  (floor)",
        "empty XDP program (XDP_PASS)", floor
    );
    for (name, frame) in &cases {
        let (ns, ret) = measure(dp.xdp_program(), frame, repeat, rounds)?;
        println!(
            "{name:<46} {ns:>8.1} ns   {:.2}x  {}",
            ns / floor,
            verdict_name(ret)
        );
    }
    println!();
    println!("goal: accept/drop paths at most 1.5x the empty program");
    drop(dp);

    let packets = flag(args, "--packets", 20_000_000)?;
    kernel_comparison(packets)
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

fn kernel_comparison(packets: u32) -> Result<()> {
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
        dp.xdp_program().attach("dut0", XdpMode::Driver)?;
        Ok(dp)
    })?;
    let b = bucket_of(&KEY, BucketKey::V6(src.octets()));
    let before = farm.bucket_counter(b)?.dropped_packets;
    let frame2 = frame.clone();
    let took = gen_ns.run(move || generate(&frame2, gen_ifindex, packets))?;
    std::thread::sleep(Duration::from_millis(200));
    let farm_drops = farm.bucket_counter(b)?.dropped_packets - before;
    drop(farm);
    let farm_rate = farm_drops as f64 / took.as_secs_f64();

    // nftables: the same job at the netdev ingress hook (before any other netfilter hook). The
    // jhash seed decides whether this one source is dropped: try seeds until it is.
    let mut loaded = false;
    for seed in 1..=16u32 {
        let rules = format!(
            "flush ruleset netdev\ntable netdev farmbench {{\n  chain in {{\n    type filter hook \
             ingress device \"dut0\" priority 0;\n    ip6 daddr {VIP6} jhash ip6 saddr mod 3 seed \
             {seed} != 0 counter drop\n    counter\n  }}\n}}\n"
        );
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
        let frame2 = frame.clone();
        gen_ns.run(move || generate(&frame2, gen_ifindex, 1000))?;
        std::thread::sleep(Duration::from_millis(100));
        if nft_drops(&dut)? > 0 {
            loaded = true;
            break;
        }
    }
    if !loaded {
        bail!("no jhash seed in 1..=16 drops the generated source");
    }
    let before = nft_drops(&dut)?;
    let frame2 = frame.clone();
    let took_nft = gen_ns.run(move || generate(&frame2, gen_ifindex, packets))?;
    std::thread::sleep(Duration::from_millis(200));
    let nft = nft_drops(&dut)? - before;
    let nft_rate = nft as f64 / took_nft.as_secs_f64();

    println!(
        "  farm XDP filter          {:>8.2} Mpps dropped ({farm_drops} of {packets} in {took:.2?})",
        farm_rate / 1e6
    );
    println!(
        "  nftables jhash mod 3     {:>8.2} Mpps dropped ({nft} of {packets} in {took_nft:.2?})",
        nft_rate / 1e6
    );
    println!("  ratio farm / nftables    {:>8.2}x", farm_rate / nft_rate);
    println!("  (generator and receiver share the machine's 2 cores; the rates include sending)");
    Ok(())
}
