//! farm-bench: benchmarks that print figures (run through `cargo xtask bench ...`).
//!
//! `dataplane`: ns/packet of the XDP program from BPF_PROG_TEST_RUN with repeat, per path,
//! next to the empty XDP program measured in the same run (the floor).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use farm_common::{BUCKETS, BucketEntry, BucketKey, HashKey, affinity, bucket_of, proto_mask};
use farm_daemon::{
    config::{Rule, Vip},
    dataplane::Dataplane,
};
use farm_tests::frames::*;

const KEY: HashKey = HashKey {
    k0: 0x0123_4567_89ab_cdef,
    k1: 0x0fed_cba9_8765_4321,
};
const VIP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("dataplane") => dataplane(&args[1..]),
        _ => bail!("usage: farm-bench dataplane [--repeat N] [--rounds N]"),
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

fn mine(k: BucketKey) -> bool {
    bucket_of(&KEY, k).is_multiple_of(2)
}

fn client4(want_mine: bool) -> Ipv4Addr {
    (1..=250u8)
        .map(|i| Ipv4Addr::new(203, 0, 113, i))
        .find(|a| mine(BucketKey::V4(a.octets())) == want_mine)
        .expect("address")
}

fn client6(want_mine: bool) -> Ipv6Addr {
    (1..=250u16)
        .map(|i| Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, i))
        .find(|a| mine(BucketKey::V6(a.octets())) == want_mine)
        .expect("address")
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
    let mut dp = Dataplane::load()?;
    dp.set_identity(KEY, IF_MAC, CLUSTER_MAC)?;
    let rules = vec![Rule {
        protocols: proto_mask::TCP,
        port_lo: 80,
        port_hi: 80,
        affinity: affinity::CLIENT,
    }];
    dp.set_vips(&[
        Vip {
            address: IpAddr::V4(VIP4),
            rules: rules.clone(),
        },
        Vip {
            address: IpAddr::V6(VIP6),
            rules,
        },
    ])?;
    let entries: Vec<BucketEntry> = (0..BUCKETS)
        .map(|b| BucketEntry::owned_by(if b % 2 == 0 { 0 } else { 1 }, 0))
        .collect();
    dp.set_buckets(&entries)?;
    dp.arm(Duration::from_secs(3600))?;

    let (m4, t4, t6, m6) = (client4(true), client4(false), client6(false), client6(true));
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
    Ok(())
}
