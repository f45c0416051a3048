//! `farmctl mirror status`: the mirror group as people read it.

use crate::render::bytes;

pub fn print_mirror(m: &farm_daemon::mirror::GroupStatus) {
    println!("mirror group: VIP {} -> {}", m.vip, m.directory);
    println!(
        "  {:<12} {:<10} copy: generation {}, {}{}",
        m.node,
        m.role.name(),
        m.generation,
        if m.complete { "complete" } else { "INCOMPLETE" },
        if m.eligible {
            ""
        } else {
            " (not eligible to become primary by itself)"
        }
    );
    println!(
        "  {:<12} {:<10} {}",
        m.peer,
        if m.peer_alive {
            m.peer_role.name()
        } else {
            "unreachable"
        },
        if m.seen > m.generation {
            format!("announced generation {}", m.seen)
        } else {
            String::new()
        }
    );
    if let Some(r) = &m.replication {
        let detail = m
            .replication_detail
            .as_ref()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default();
        println!("replication to {}: {r}{detail}", m.peer);
        println!(
            "  lag {} (oldest {} ms), queued {}, {} sent, {} syncs acknowledged{}",
            bytes(m.lag_bytes),
            m.lag_ms,
            bytes(m.queued_bytes),
            bytes(m.bytes_sent),
            m.syncs_acknowledged,
            if m.recorded_paths > 0 {
                format!(", {} path(s) in the change record", m.recorded_paths)
            } else {
                String::new()
            }
        );
    }
    if let Some(r) = &m.resync {
        println!(
            "  resync pass {}: {}/{} entries, {} sent, {} equal, {}/s{}",
            r.pass,
            r.entries_done,
            r.entries_total,
            bytes(r.bytes_sent),
            bytes(r.bytes_same),
            bytes(r.bytes_per_second as u64),
            if r.full_check {
                " (every file compared by checksum)"
            } else {
                ""
            }
        );
    }
    if let Some(r) = &m.last_resync {
        println!(
            "  last resync: {} sent, {} found equal, {:.1} s, {}/s{}",
            bytes(r.bytes_sent),
            bytes(r.bytes_same),
            r.seconds,
            bytes(r.bytes_per_second as u64),
            if r.full_check {
                " (every file compared by checksum)"
            } else {
                " (change record)"
            }
        );
    }
    if let Some(p) = &m.primary_connected {
        println!(
            "replica: primary {p} connected{}, {} operations ({}) applied",
            if m.resyncing { ", RESYNCING" } else { "" },
            m.ops_applied,
            bytes(m.bytes_applied)
        );
    }
    if m.ops_refused > 0 {
        println!(
            "replica: REFUSED {} operations of the primary (device nodes or set-id files; see \
             the log and mirror.allow_privileged_files)",
            m.ops_refused
        );
    }
    if m.handshakes_refused > 0 {
        println!(
            "replica: {} connections refused at the handshake (another key, a replayed hello, \
             too many at once)",
            m.handshakes_refused
        );
    }
    if let Some(w) = &m.waiting {
        println!("waiting: {w}");
    }
    if let Some(t) = &m.last_takeover {
        println!("last takeover: {t}");
    }
}
