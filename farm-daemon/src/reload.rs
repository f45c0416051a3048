//! What a reload changes: the differences between the running configuration and the file read
//! again, split into what farmd applies while running and what needs a restart. Pure: the
//! daemon applies the result (see `Daemon::reload`).

use std::net::IpAddr;

use crate::config::{Config, Vip, format_mac};

/// The differences between two configurations.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Diff {
    /// Changes applied while running, for people ("field: old -> new").
    pub live: Vec<String>,
    /// Changes that need a restart of farmd (the reload is refused while there are any).
    pub restart: Vec<String>,
    /// Warnings about changes that are applied but may disturb clients.
    pub warnings: Vec<String>,
    pub vips_added: Vec<IpAddr>,
    pub vips_removed: Vec<IpAddr>,
    /// Whether the VIP table (addresses or rules) changes.
    pub vips_changed: bool,
    pub weights_changed: bool,
    /// Members added to or removed from the list (ids); applied live when every member that
    /// stays keeps its place in the id order (its index), see `diff`.
    pub members_added: Vec<String>,
    pub members_removed: Vec<String>,
    pub checks_changed: bool,
    pub hooks_changed: bool,
    /// Heartbeat interval, loss threshold or dead-man timeout: the daemon's timers change.
    pub timers_changed: bool,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.live.is_empty() && self.restart.is_empty()
    }
}

fn ms(d: std::time::Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn rules(v: &Vip) -> String {
    v.rules
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What changes from `old` (running) to `new` (the file now).
pub fn diff(old: &Config, new: &Config) -> Diff {
    let mut d = Diff::default();
    let mut restart = |field: &str, from: String, to: String| {
        d.restart.push(format!("{field}: {from} -> {to}"));
    };
    if old.node_id != new.node_id {
        restart("node.id", old.node_id.clone(), new.node_id.clone());
    }
    if old.interface != new.interface {
        restart(
            "node.interface",
            old.interface.clone(),
            new.interface.clone(),
        );
    }
    if old.secret_file != new.secret_file {
        restart(
            "cluster.secret_file",
            old.secret_file.display().to_string(),
            new.secret_file.display().to_string(),
        );
    }
    if old.mac_mode != new.mac_mode || old.cluster_mac != new.cluster_mac {
        let mac = |c: &Config| {
            c.cluster_mac
                .map_or(format!("{:?} (derived)", c.mac_mode), |m| format_mac(&m))
        };
        restart("cluster.mac_mode/cluster_mac", mac(old), mac(new));
    }
    // Members: a member's index (its place in the id order) names it in every bucket map and
    // heartbeat, so a live change keeps the index of every member that stays: members are
    // added after the others in id order, and removed from the end. Other changes of the list
    // need a restart of every farmd (one at a time).
    let ids = |c: &Config| -> Vec<String> { c.members.iter().map(|m| m.id.clone()).collect() };
    let (old_ids, new_ids) = (ids(old), ids(new));
    let kept = old_ids.len().min(new_ids.len());
    if old_ids[..kept] != new_ids[..kept] {
        restart(
            "cluster.members",
            old_ids.join(", "),
            format!(
                "{} (live, members can be added only after the others in id order and removed                  only from the end of it, so that every member that stays keeps its index;                  this change needs every farmd restarted with the new list, one at a time)",
                new_ids.join(", ")
            ),
        );
    } else {
        d.members_added = new_ids[kept..].to_vec();
        d.members_removed = old_ids[kept..].to_vec();
        for id in &d.members_added {
            d.live.push(format!("member added: {id}"));
        }
        for id in &d.members_removed {
            d.live.push(format!("member removed: {id}"));
        }
        // (A list without this node does not load: config says so.)
        for (a, b) in old.members.iter().zip(&new.members) {
            if a.heartbeat_addrs != b.heartbeat_addrs {
                let list = |m: &crate::config::Member| {
                    m.heartbeat_addrs
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                restart(
                    &format!("cluster.members[{}] addresses", a.id),
                    list(a),
                    list(b),
                );
            }
            if a.weight != b.weight {
                d.weights_changed = true;
                d.live
                    .push(format!("weight of {}: {} -> {}", a.id, a.weight, b.weight));
            }
        }
    }
    if old.heartbeat.port != new.heartbeat.port {
        restart(
            "heartbeat.port",
            old.heartbeat.port.to_string(),
            new.heartbeat.port.to_string(),
        );
    }
    if old.heartbeat.scheduling != new.heartbeat.scheduling {
        let s = |c: &Config| {
            let s = c.heartbeat.scheduling;
            format!(
                "{} priority {}{}",
                s.policy.name(),
                s.priority,
                if s.lock_memory { ", memory locked" } else { "" }
            )
        };
        restart("heartbeat.scheduling/priority/lock_memory", s(old), s(new));
    }
    if old.witness != new.witness {
        let w = |c: &Config| c.witness.map_or("none".into(), |w| w.to_string());
        restart("cluster.witness", w(old), w(new));
    }
    if old.socket != new.socket {
        restart(
            "control.socket",
            old.socket.display().to_string(),
            new.socket.display().to_string(),
        );
    }
    if old.state_dir != new.state_dir || old.bpffs != new.bpffs {
        restart(
            "runtime.state_dir/bpffs",
            format!("{} {}", old.state_dir.display(), old.bpffs.display()),
            format!("{} {}", new.state_dir.display(), new.bpffs.display()),
        );
    }
    if old.xdp_mode != new.xdp_mode {
        restart(
            "dataplane.xdp_mode",
            format!("{:?}", old.xdp_mode),
            format!("{:?}", new.xdp_mode),
        );
    }
    if old.vip_device != new.vip_device {
        restart(
            "dataplane.vip_device",
            old.vip_device.clone(),
            new.vip_device.clone(),
        );
    }
    if old.metrics != new.metrics {
        let m = |c: &Config| c.metrics.map_or("off".into(), |a| a.to_string());
        restart("metrics.enabled/listen", m(old), m(new));
    }
    if old.mirror != new.mirror {
        let m = |c: &Config| {
            c.mirror.as_ref().map_or("none".into(), |m| {
                format!("{} on {}", m.directory.display(), m.vip)
            })
        };
        restart("mirror", m(old), m(new));
    }

    // VIPs and their rules.
    for v in &new.vips {
        match old.vips.iter().find(|o| o.address == v.address) {
            None => {
                d.vips_added.push(v.address);
                d.live
                    .push(format!("VIP {} added ({})", v.address, rules(v)));
            }
            Some(o) if o.rules != v.rules => {
                d.live.push(format!(
                    "VIP {} rules: {} -> {}",
                    v.address,
                    rules(o),
                    rules(v)
                ));
                let affinity_changed = o.rules.iter().any(|r| {
                    v.rules.iter().any(|n| {
                        n.protocols & r.protocols != 0
                            && n.port_lo <= r.port_hi
                            && r.port_lo <= n.port_hi
                            && n.affinity != r.affinity
                    })
                });
                if affinity_changed {
                    d.warnings.push(format!(
                        "VIP {}: the affinity of a port changes, which puts most clients in \
                         another bucket: their established connections on those ports may \
                         break (drain-free changes keep the affinity)",
                        v.address
                    ));
                }
            }
            Some(_) => {}
        }
    }
    for o in &old.vips {
        if !new.vips.iter().any(|v| v.address == o.address) {
            d.vips_removed.push(o.address);
            d.live.push(format!(
                "VIP {} removed: its clients get no answer from this member",
                o.address
            ));
        }
    }
    d.vips_changed = old.vips != new.vips;

    if old.checks != new.checks {
        d.checks_changed = true;
        let names = |c: &Config| {
            c.checks
                .iter()
                .map(|c| c.name.clone())
                .collect::<Vec<_>>()
                .join(", ")
        };
        d.live.push(format!(
            "checks: [{}] -> [{}] (unchanged checks keep their state)",
            names(old),
            names(new)
        ));
    }
    if old.max_health_moves_per_minute != new.max_health_moves_per_minute {
        d.checks_changed = true;
        d.live.push(format!(
            "health.max_moves_per_minute: {} -> {}",
            old.max_health_moves_per_minute, new.max_health_moves_per_minute
        ));
    }
    if old.hooks != new.hooks {
        d.hooks_changed = true;
        d.live
            .push(format!("hooks: {} -> {}", old.hooks.len(), new.hooks.len()));
    }
    let mut timer = |field: &str, a: String, b: String, t: bool| {
        if a != b {
            d.live.push(format!("{field}: {a} -> {b}"));
            d.timers_changed |= t;
        }
    };
    timer(
        "heartbeat.interval_ms",
        ms(old.heartbeat.interval),
        ms(new.heartbeat.interval),
        true,
    );
    timer(
        "heartbeat.loss_threshold",
        old.heartbeat.loss_threshold.to_string(),
        new.heartbeat.loss_threshold.to_string(),
        true,
    );
    timer(
        "cluster.deadman_timeout_ms",
        ms(old.deadman_timeout),
        ms(new.deadman_timeout),
        true,
    );
    timer(
        "dataplane.announce_interval_s",
        ms(old.announce_interval),
        ms(new.announce_interval),
        false,
    );
    timer(
        "handover.drain_timeout_s",
        ms(old.drain_timeout),
        ms(new.drain_timeout),
        false,
    );
    timer(
        "handover.udp_idle_ms",
        ms(old.udp_idle),
        ms(new.udp_idle),
        false,
    );
    timer(
        "handover.stop_drain_timeout_s",
        ms(old.stop_drain_timeout),
        ms(new.stop_drain_timeout),
        false,
    );
    timer(
        "metrics.per_bucket",
        old.metrics_per_bucket.to_string(),
        new.metrics_per_bucket.to_string(),
        false,
    );
    if old.drill != new.drill {
        d.live.push("drill settings".into());
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[node]
id = "n1"
interface = "eth0"

[cluster]
secret_file = "/etc/farm/key"
members = [
  { id = "n1", address = "192.0.2.1" },
  { id = "n2", address = "192.0.2.2" },
  { id = "n3", address = "192.0.2.3" },
]

[[vip]]
address = "192.0.2.100"
rules = [{ protocol = "tcp", ports = 80 }]
"#;

    fn cfg(text: &str) -> Config {
        Config::parse(text, std::path::Path::new("test.toml")).expect("valid")
    }

    #[test]
    fn nothing_changed_is_an_empty_diff() {
        assert!(diff(&cfg(BASE), &cfg(BASE)).is_empty());
    }

    #[test]
    fn weights_vips_and_timers_are_live_changes() {
        let new = BASE
            .replace(
                r#"{ id = "n3", address = "192.0.2.3" }"#,
                r#"{ id = "n3", address = "192.0.2.3", weight = 2 }"#,
            )
            .replace("ports = 80 }", "ports = 80, affinity = \"connection\" }")
            + "\n[[vip]]\naddress = \"192.0.2.101\"\nrules = [{ protocol = \"udp\", ports = 53 }]\n\
               [heartbeat]\ninterval_ms = 100\n";
        let d = diff(&cfg(BASE), &cfg(&new));
        assert!(d.restart.is_empty(), "{:?}", d.restart);
        assert!(d.weights_changed && d.vips_changed && d.timers_changed);
        assert_eq!(d.vips_added, vec!["192.0.2.101".parse::<IpAddr>().unwrap()]);
        assert!(
            d.live.contains(&"weight of n3: 1 -> 2".to_string()),
            "{:?}",
            d.live
        );
        assert!(
            d.live
                .iter()
                .any(|l| l.contains("heartbeat.interval_ms: 50 ms -> 100 ms")),
            "{:?}",
            d.live
        );
        assert_eq!(
            d.warnings.len(),
            1,
            "affinity change warned: {:?}",
            d.warnings
        );
        assert!(!d.checks_changed && !d.hooks_changed);
    }

    #[test]
    fn identity_changes_need_a_restart() {
        // Removing n2 would give n3 another index: not live.
        let new = BASE
            .replace("eth0", "eth1")
            .replace(r#"{ id = "n2", address = "192.0.2.2" },"#, "");
        let d = diff(&cfg(BASE), &cfg(&new));
        assert_eq!(d.restart.len(), 2, "{:?}", d.restart);
        assert!(d.restart[0].starts_with("node.interface: eth0 -> eth1"));
        assert!(d.restart[1].starts_with("cluster.members: n1, n2, n3 -> n1, n3"));
        assert!(d.restart[1].contains("keeps its index"), "{}", d.restart[1]);
    }

    #[test]
    fn members_added_after_the_others_or_removed_from_the_end_are_live() {
        let removed = BASE.replace(r#"{ id = "n3", address = "192.0.2.3" },"#, "");
        let d = diff(&cfg(BASE), &cfg(&removed));
        assert!(d.restart.is_empty(), "{:?}", d.restart);
        assert_eq!(d.members_removed, vec!["n3"]);
        assert_eq!(d.live, vec!["member removed: n3"]);
        let d = diff(&cfg(&removed), &cfg(BASE));
        assert!(d.restart.is_empty(), "{:?}", d.restart);
        assert_eq!(d.members_added, vec!["n3"]);
    }
}
