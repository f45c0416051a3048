//! `farmctl reload [--diff]`: what changed, what would move, what needs a restart.

use farm_daemon::control;

use crate::render::truncate;

pub fn print_reload(r: &control::ReloadReport, dry_run: bool) {
    let verdict = if !r.restart_needed.is_empty() {
        "REFUSED, nothing was changed: these changes need a restart of farmd"
    } else if r.changes.is_empty() {
        "nothing to change"
    } else if dry_run {
        "would change (nothing changed yet; `farmctl reload` applies it)"
    } else {
        "applied"
    };
    println!("{}: {verdict}", r.file);
    for c in &r.restart_needed {
        println!("  restart needed: {c}");
    }
    if !r.restart_needed.is_empty() && !r.changes.is_empty() {
        println!("  and, applied live after the restart:");
    }
    for c in &r.changes {
        println!("  {c}");
    }
    for w in &r.warnings {
        println!("  warning: {w}");
    }
    if r.shares.is_empty() {
        return;
    }
    let when = if r.waiting_for.is_empty() {
        "now".to_string()
    } else {
        format!(
            "once [{}] have the same weights (farmctl reload there)",
            r.waiting_for.join(", ")
        )
    };
    println!(
        "buckets: {} of the serving members' change owner, keeping connections, {when}",
        r.buckets_moving
    );
    println!("  {:<20} {:>8} {:>8}", "MEMBER", "NOW", "AFTER");
    for s in &r.shares {
        println!(
            "  {:<20} {:>8} {:>8}",
            truncate(&s.member, 20),
            s.now,
            s.after
        );
    }
}
