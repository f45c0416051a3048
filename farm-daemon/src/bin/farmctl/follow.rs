//! `farmctl drain` and `resume`: following the move until it completes.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use farm_daemon::control::{self, Outcome, Request, Response};

use crate::{
    Args, Wait,
    render::{print_json, truncate},
};

/// Shows a drain or resume until it completes: a line per change of state (rewritten in place
/// on a terminal). Exit status 0 when done, 1 when the wait timed out, 2 when farmd went away.
pub fn follow(args: &Args, drain: bool, outcome: Outcome, message: &str, wait: Wait) -> ExitCode {
    use std::io::{IsTerminal as _, Write as _};
    let tty = std::io::stdout().is_terminal() && !args.json;
    if !args.json {
        println!("{message}");
    }
    let started = Instant::now();
    let report = |done: bool, last: &str| {
        if args.json {
            print_json(&serde_json::json!({
                "outcome": outcome,
                "message": message,
                "done": done,
                "elapsed_s": started.elapsed().as_secs_f64(),
                "last": last,
            }));
        }
    };
    if wait.no_wait || outcome == Outcome::Cancelled {
        report(false, "");
        return ExitCode::SUCCESS;
    }
    let mut last = String::new();
    loop {
        let status = match control::request(&args.socket, &Request::Status, Duration::from_secs(10))
        {
            Ok(Response::Status(s)) => s,
            Ok(other) => {
                eprintln!("farmctl: unexpected answer from farmd: {other:?}");
                return ExitCode::from(1);
            }
            Err(e) => {
                if tty {
                    println!();
                }
                eprintln!("farmctl: {e}");
                return ExitCode::from(2);
            }
        };
        let me = status.members.iter().find(|m| m.this_node);
        let state = me.map_or("?", |m| m.state.as_str());
        let held = me.map_or(0, |m| m.buckets);
        let done = if drain {
            state == "drained"
        } else {
            state == "serving" && status.handover.is_none() && status.queued.is_none()
        };
        let t = started.elapsed().as_secs_f64();
        let line = if done {
            format!(
                "{} after {t:.1} s: this node holds {held} bucket(s)",
                if drain { "drained" } else { "resumed" }
            )
        } else if let Some(q) = &status.queued {
            format!("queued: {q}")
        } else if let Some(h) = &status.handover {
            format!(
                "{state}: {} bucket(s) handing over, {} connection(s) left; waiting for [{}]",
                h.outgoing_buckets,
                h.connections_left,
                h.waiting_for.join(", ")
            )
        } else {
            format!("{state}: this node holds {held} bucket(s)")
        };
        if line != last {
            if tty {
                print!("\r\x1b[2K[{t:>5.1} s] {}", truncate(&line, 68));
                let _ = std::io::stdout().flush();
            } else if !args.json {
                println!("[{t:>5.1} s] {line}");
            }
            last = line;
        }
        if done {
            if tty {
                println!();
            }
            report(true, &last);
            return ExitCode::SUCCESS;
        }
        if started.elapsed() >= Duration::from_secs(wait.timeout) {
            if tty {
                println!();
            }
            eprintln!(
                "farmctl: still not {} after {} s; the move goes on (see farmctl status)",
                if drain { "drained" } else { "resumed" },
                wait.timeout
            );
            report(false, &last);
            return ExitCode::from(1);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
