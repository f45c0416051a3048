//! `farmctl drill`: confirmation, progress while it runs, the result.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use farm_daemon::control::{self, Request, Response};

use crate::{
    Args,
    render::{confirm, print_json, truncate},
};

/// Asks before a drill (see `confirm`).
pub fn confirm_drill(member: Option<&str>) -> bool {
    let who = member.unwrap_or("another member");
    confirm(
        &format!(
            "The drill makes {who} act as if it crashed: its clients get no answer until the farm \
             takes over, and their connections break. Go on?"
        ),
        &format!(
            "a drill makes {who} act as if it crashed (its clients' connections break); add \
             --yes to run it from a script"
        ),
    )
}

pub fn drill_line(r: &control::DrillReport) -> String {
    let rto = r
        .rto_ms
        .map_or(String::new(), |ms| format!("; unanswered for {ms} ms"));
    format!(
        "{}: {} of {} probes answered{rto}",
        r.phase, r.probes_answered, r.probes_sent
    )
}

pub fn print_drill(r: &control::DrillReport) {
    println!(
        "drill {} of {}: probe client {} -> VIP {}",
        r.id, r.member, r.probe, r.vip
    );
    if !r.finished {
        println!(
            "  in progress, {:.1} s: {}",
            r.elapsed_ms as f64 / 1000.0,
            drill_line(r)
        );
        return;
    }
    match r.rto_ms {
        Some(ms) => println!(
            "  RTO {ms} ms measured by the probe client (objective {} ms, the farm's timers \
             allow ~{} ms): {}",
            r.objective_ms,
            r.expected_ms,
            if r.passed == Some(true) {
                "PASS"
            } else {
                "FAIL"
            }
        ),
        None => println!("  no RTO measured"),
    }
    println!(
        "  {} probes, {} answered, {:.1} s in all",
        r.probes_sent,
        r.probes_answered,
        r.elapsed_ms as f64 / 1000.0
    );
    if let Some(e) = &r.error {
        println!("  FAILED: {e}");
    }
}

/// Shows a drill until it is over (progress rewritten in place on a terminal).
pub fn follow_drill(args: &Args, started: &control::DrillReport) -> ExitCode {
    use std::io::{IsTerminal as _, Write as _};
    let tty = std::io::stdout().is_terminal() && !args.json;
    if !args.json {
        println!(
            "drill {}: {} acts as if crashed once the probe client {} gets steady answers \
             from {}",
            started.id, started.member, started.probe, started.vip
        );
    }
    let t0 = Instant::now();
    let mut last = String::new();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let r = match control::request(&args.socket, &Request::DrillStatus, Duration::from_secs(10))
        {
            Ok(Response::Drill(r)) if r.id == started.id => r,
            Ok(other) => {
                eprintln!("farmctl: unexpected answer from farmd: {other:?}");
                return ExitCode::from(1);
            }
            Err(e) => {
                eprintln!("farmctl: {e}");
                return ExitCode::from(2);
            }
        };
        if r.finished {
            if tty {
                println!();
            }
            if args.json {
                print_json(&r);
            } else {
                print_drill(&r);
            }
            return if r.error.is_none() && r.passed == Some(true) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            };
        }
        let line = drill_line(&r);
        if line != last && !args.json {
            let t = t0.elapsed().as_secs_f64();
            if tty {
                print!("\r\x1b[2K[{t:>5.1} s] {}", truncate(&line, 68));
                let _ = std::io::stdout().flush();
            } else if r.phase != last_phase(&last) {
                println!("[{t:>5.1} s] {line}");
            }
        }
        last = line;
    }
}

/// The phase a progress line starts with.
pub fn last_phase(line: &str) -> &str {
    line.split(':').next().unwrap_or("")
}
