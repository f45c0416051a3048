//! The daemon's side of an in-place upgrade (the protocol is `crate::upgrade`): the running
//! farmd hands over (`Daemon::hand_over`), the new one takes over (`Daemon::adopt`).

use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    os::unix::net::UnixStream as StdUnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use farm_common::MAP_LAYOUT;
use tokio::net::UnixListener;

use super::{Daemon, DaemonError, Undo, copy_listener, netns_id, node_config, pin_dir};
use crate::{
    cluster::{Cluster, Verdict},
    config::Config,
    control::Response,
    dataplane::Dataplane,
    hooks::Hooks,
    netlink::Netlink,
    node::Node,
    secret::Secret,
    upgrade::{self, Commit, Message, Offer, UpgradeError},
};

/// How long the new farmd may take to load its programs and say it is ready.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long it may take to take over once handed the state (the peers hear nothing meanwhile:
/// well inside a loss window in practice, a few milliseconds).
const DONE_WITHIN: Duration = Duration::from_secs(2);

impl From<UpgradeError> for DaemonError {
    fn from(e: UpgradeError) -> Self {
        DaemonError::Upgrade(e)
    }
}

/// A child that is killed and reaped unless told it took over.
struct NewFarmd(Option<std::process::Child>);

impl NewFarmd {
    fn took_over(mut self) {
        // Not waited for: it outlives this process (reparented).
        self.0.take();
    }
}

impl Drop for NewFarmd {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Daemon {
    /// `farmctl upgrade`: starts `binary` (default: the file farmd was started from) to take
    /// over, hands it everything, and returns once it serves (the caller then ends this
    /// process without touching the host). On any failure this farmd goes on serving, and the
    /// error says why.
    pub(super) fn hand_over(
        &mut self,
        binary: Option<PathBuf>,
        listener: &UnixListener,
    ) -> Result<(Response, u32), String> {
        let t0 = Instant::now();
        if self.mirror.is_some() {
            return Err(
                "an in-place upgrade of a mirror group member is not supported: \
                        restart it instead (the group fails over, or swap roles first)"
                    .into(),
            );
        }
        if self.drill.is_some() {
            return Err("a recovery drill is under way: upgrade once it is done".into());
        }
        // Refused early, before anything starts, when not at a quiet point.
        self.node.snapshot(Instant::now())?;
        let binary = binary.unwrap_or_else(|| self.exe.clone());
        if !binary.is_file() {
            return Err(format!("{} is not a file", binary.display()));
        }
        let maps_dir = upgrade::maps_dir(&self.pin_dir, MAP_LAYOUT);
        self.dp
            .pin_maps(&maps_dir)
            .map_err(|e| format!("pinning the maps for the new farmd: {e}"))?;
        let r = self.offer_and_commit(&binary, &maps_dir, listener, t0);
        // The new farmd holds the maps by then (or nobody needs the pins).
        let _ = std::fs::remove_dir_all(&maps_dir);
        r.map_err(|e| {
            format!(
                "{} did not take over: {e}; this farmd ({}) goes on serving",
                binary.display(),
                std::process::id()
            )
        })
    }

    fn offer_and_commit(
        &mut self,
        binary: &Path,
        maps_dir: &Path,
        listener: &UnixListener,
        t0: Instant,
    ) -> Result<(Response, u32), String> {
        let (ours, theirs) = StdUnixStream::pair().map_err(|e| e.to_string())?;
        upgrade::inheritable(theirs.as_raw_fd()).map_err(|e| e.to_string())?;
        let child = std::process::Command::new(binary)
            .args(std::env::args_os().skip(1))
            .env(upgrade::ENV_FD, theirs.as_raw_fd().to_string())
            // systemd's watchdog names this process; the new one becomes the unit's main
            // process (MAINPID, once it took over) and sends the keep-alives from then on.
            .env_remove("WATCHDOG_PID")
            .stdin(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("starting it: {e}"))?;
        drop(theirs);
        let child = NewFarmd(Some(child));
        let new_pid = child.0.as_ref().map_or(0, std::process::Child::id);
        tracing::info!(
            pid = new_pid,
            "upgrade: started {} to take over",
            binary.display()
        );

        let mut fds = vec![self._lock.as_raw_fd(), listener.as_raw_fd()];
        if let Some(m) = &self.metrics_copy {
            fds.push(m.as_raw_fd());
        }
        fds.extend(self.cluster.sockets().iter().map(|s| s.as_raw_fd()));
        let offer = Offer {
            protocol: upgrade::PROTOCOL,
            from_version: env!("CARGO_PKG_VERSION").into(),
            from_pid: std::process::id(),
            map_layout: MAP_LAYOUT,
            maps_dir: maps_dir.to_path_buf(),
            pin_dir: self.pin_dir.clone(),
            xdp_mode: self.dp.xdp_mode.unwrap_or("generic").into(),
            members: self
                .cfg
                .members
                .iter()
                .map(|m| (m.id.clone(), m.weight))
                .collect(),
            me: self.cfg.me,
            interface: self.cfg.interface.clone(),
            vips: self.cfg.vips.iter().map(|v| v.address).collect(),
            heartbeat_port: self.cfg.heartbeat.port,
            undo: serde_json::to_value(&self.undo).map_err(|e| e.to_string())?,
            lock_path: self.lock_path.clone(),
            metrics: self.metrics_copy.is_some(),
            heartbeat_sockets: self.cluster.sockets().len(),
            failovers: self.failovers,
        };
        let err = |e: UpgradeError| e.to_string();
        upgrade::send(&ours, &Message::Offer(Box::new(offer)), &fds).map_err(err)?;
        upgrade::expect(&ours, READY_WITHIN, "ready", |m| {
            matches!(m, Message::Ready { .. })
        })
        .map_err(err)?;
        let ready_ms = t0.elapsed().as_millis() as u64;

        // The quiet point: checked again (a peer may have started a move meanwhile).
        let node = self.node.snapshot(Instant::now())?;
        let (verdict, verdict_rx) = std::sync::mpsc::channel();
        let paused = Instant::now();
        let Some(membership) = self.cluster.pause(verdict_rx) else {
            return Err("the heartbeat thread did not pause".into());
        };
        let seq = membership.seq;
        let done = upgrade::send(
            &ours,
            &Message::Commit(Box::new(Commit { membership, node })),
            &[],
        )
        .and_then(|()| {
            upgrade::expect(&ours, DONE_WITHIN, "done", |m| {
                matches!(m, Message::Done { .. })
            })
        });
        match done {
            Ok((
                Message::Done {
                    pid,
                    xdp_program_id,
                    xdp_link_id,
                },
                _,
            )) => {
                let _ = verdict.send(Verdict::Exit);
                self.cluster.join_ended();
                child.took_over();
                let gap_ms = paused.elapsed().as_secs_f64() * 1000.0;
                let message = format!(
                    "farmd {pid} ({}) took over from {} in {:.0} ms (programs loaded in {ready_ms} \
                     ms, heartbeats paused {gap_ms:.1} ms): XDP link {xdp_link_id} kept, program \
                     {} -> {xdp_program_id}",
                    binary.display(),
                    std::process::id(),
                    t0.elapsed().as_secs_f64() * 1000.0,
                    self.xdp_ids.1,
                );
                tracing::info!("upgrade: {message}");
                Ok((
                    Response::Upgraded {
                        message,
                        from_pid: std::process::id(),
                        pid,
                        xdp_link_id,
                        xdp_program_id,
                    },
                    pid,
                ))
            }
            other => {
                let e = match other {
                    Err(e) => e.to_string(),
                    Ok((m, _)) => format!("unexpected answer {m:?}"),
                };
                // It may have moved links already: back to this farmd's programs, then the
                // heartbeats go on after any sequence number it may have used: it numbers one
                // round per interval, and it had at most DONE_WITHIN (and the time since the
                // pause) to send any (it is killed by now). The peers count the rounds skipped
                // as lost heartbeats.
                drop(child);
                if let Err(e) = self.dp.relink(&self.pin_dir) {
                    tracing::error!("upgrade: moving the links back to this farmd failed: {e}");
                }
                let interval = self.cfg.heartbeat.interval.max(Duration::from_millis(1));
                let rounds = paused.elapsed().as_millis() / interval.as_millis() + 2;
                let _ = verdict.send(Verdict::Resume {
                    seq_after: seq + rounds as u64,
                });
                Err(e)
            }
        }
    }

    /// Takes over from the farmd that started this one (see `upgrade`): everything it set up
    /// on the host stays, nothing is set up again. On failure the old farmd is told why and
    /// goes on serving.
    pub async fn adopt(
        cfg: Config,
        sock: StdUnixStream,
    ) -> Result<(Self, UnixListener), DaemonError> {
        match Self::adopt_inner(cfg, &sock).await {
            Ok(d) => Ok(d),
            Err(e) => {
                let _ = upgrade::send(
                    &sock,
                    &Message::Failed {
                        error: e.to_string(),
                    },
                    &[],
                );
                Err(e)
            }
        }
    }

    async fn adopt_inner(
        cfg: Config,
        sock: &StdUnixStream,
    ) -> Result<(Self, UnixListener), DaemonError> {
        let (m, fds) = upgrade::expect(sock, Duration::from_secs(10), "offer", |m| {
            matches!(m, Message::Offer(_))
        })?;
        let Message::Offer(offer) = m else {
            unreachable!("checked by expect")
        };
        if offer.protocol != upgrade::PROTOCOL {
            return Err(UpgradeError::Refused(format!(
                "farmd {} speaks upgrade protocol {}, this build {}",
                offer.from_pid,
                offer.protocol,
                upgrade::PROTOCOL
            ))
            .into());
        }
        check_same_config(&cfg, &offer)?;
        if cfg.mirror.is_some() {
            return Err(UpgradeError::Refused(
                "a mirror group member is not upgraded in place".into(),
            )
            .into());
        }
        upgrade::migrate(offer.map_layout, &offer.maps_dir)?;
        let want = 2 + usize::from(offer.metrics) + offer.heartbeat_sockets;
        if fds.len() != want {
            return Err(UpgradeError::Refused(format!(
                "{} descriptors handed over, {want} expected",
                fds.len()
            ))
            .into());
        }
        let mut fds = fds.into_iter();
        let mut next = || -> OwnedFd { fds.next().expect("counted above") };
        let lock = std::fs::File::from(next());
        let control = std::os::unix::net::UnixListener::from(next());
        control
            .set_nonblocking(true)
            .map_err(super::io("the control socket handed over"))?;
        let listener =
            UnixListener::from_std(control).map_err(super::io("the control socket handed over"))?;
        let metrics_listener = if offer.metrics {
            let l = std::net::TcpListener::from(next());
            l.set_nonblocking(true)
                .map_err(super::io("the metrics listener handed over"))?;
            Some(
                tokio::net::TcpListener::from_std(l)
                    .map_err(super::io("the metrics listener handed over"))?,
            )
        } else {
            None
        };
        let heartbeat: Vec<std::net::UdpSocket> = (0..offer.heartbeat_sockets)
            .map(|_| std::net::UdpSocket::from(next()))
            .collect();
        let metrics_copy = metrics_listener
            .as_ref()
            .map(copy_listener)
            .transpose()
            .map_err(super::io("copying the metrics listener"))?;

        let secret = Secret::load(&cfg.secret_file)?;
        let hash_key = secret.hash_key();
        let cluster_mac = cfg
            .cluster_mac
            .unwrap_or_else(|| secret.cluster_mac(cfg.mac_mode));
        let message_key = secret.message_key();
        drop(secret);
        let ns = netns_id()?;
        let pin_dir = pin_dir(&cfg, ns);
        if pin_dir != offer.pin_dir {
            return Err(UpgradeError::Refused(format!(
                "the links are pinned in {}, this farmd would look in {} (another bpffs or \
                 network namespace?)",
                offer.pin_dir.display(),
                pin_dir.display()
            ))
            .into());
        }
        let netlink = Netlink::connect()?;
        let link = netlink.link(&cfg.interface).await?;
        let vip_device = netlink.link(&cfg.vip_device).await?;
        let (counted_tx, counted) = tokio::sync::mpsc::unbounded_channel();
        let accounting = crate::connections::Accounting::start(hash_key, counted_tx)
            .map_err(super::io("starting the accounting thread"))?;
        let mut dp = Dataplane::adopt(&offer.maps_dir)?;
        let undo: Vec<Undo> = serde_json::from_value(offer.undo.clone())
            .map_err(|e| UpgradeError::Refused(format!("the host changes handed over: {e}")))?;
        upgrade::send(
            sock,
            &Message::Ready {
                pid: std::process::id(),
            },
            &[],
        )?;

        let (m, _) = upgrade::expect(sock, Duration::from_secs(30), "commit", |m| {
            matches!(m, Message::Commit(_))
        })?;
        let Message::Commit(commit) = m else {
            unreachable!("checked by expect")
        };
        let Commit { membership, node } = *commit;
        let node = Node::resume(
            node_config(&cfg, hash_key),
            &node,
            membership.clone(),
            Instant::now(),
        );
        let cluster = Cluster::adopt(&cfg, message_key, heartbeat, membership, node.outgoing())?;
        let mode = match offer.xdp_mode.as_str() {
            "driver" => "driver",
            _ => "generic",
        };
        let link_id = dp.take_over_links(&pin_dir, mode)?;
        let program_id = dp.xdp_program_id().unwrap_or(0);
        let (hooks, node_id) = (cfg.hooks.clone(), cfg.node_id.clone());
        let d = Daemon {
            hash_key,
            cluster_mac,
            link,
            dp,
            started: Instant::now(),
            netlink,
            undo,
            _lock: lock,
            lock_path: offer.lock_path.clone(),
            cfg,
            cluster,
            accounting,
            counted: Some(counted),
            node,
            leave: false,
            hooks: Hooks::new(hooks, node_id),
            metrics_listener,
            last_apply: Duration::ZERO,
            failovers: offer.failovers,
            last_failover: None,
            drill: None,
            last_drill: None,
            events: std::collections::VecDeque::new(),
            mirror: None,
            vip_index: vip_device.index,
            pins_missing: false,
            exe: std::env::current_exe().map_err(super::io("locating farmd's own binary"))?,
            pin_dir,
            metrics_copy,
            xdp_ids: (link_id, program_id),
            took_over_from: Some(offer.from_pid),
        };
        upgrade::send(
            sock,
            &Message::Done {
                pid: std::process::id(),
                xdp_program_id: program_id,
                xdp_link_id: link_id,
            },
            &[],
        )?;
        tracing::info!(
            "took over from farmd {} ({}): XDP link {link_id} now runs program {program_id}",
            offer.from_pid,
            offer.from_version
        );
        Ok((d, listener))
    }
}

/// The new farmd's configuration must be what the old one runs: a file edited but not
/// reloaded would change the farm under cover of an upgrade.
fn check_same_config(cfg: &Config, offer: &Offer) -> Result<(), UpgradeError> {
    let members: Vec<(String, u32)> = cfg
        .members
        .iter()
        .map(|m| (m.id.clone(), m.weight))
        .collect();
    let vips: Vec<std::net::IpAddr> = cfg.vips.iter().map(|v| v.address).collect();
    let differs = [
        (
            "cluster.members",
            members != offer.members || cfg.me != offer.me,
        ),
        ("interface", cfg.interface != offer.interface),
        ("vips", vips != offer.vips),
        ("heartbeat.port", cfg.heartbeat.port != offer.heartbeat_port),
    ];
    let what: Vec<&str> = differs
        .iter()
        .filter(|(_, d)| *d)
        .map(|(n, _)| *n)
        .collect();
    if what.is_empty() {
        return Ok(());
    }
    Err(UpgradeError::Refused(format!(
        "{} differ(s) between {} and what farmd {} runs: `farmctl reload` first, then upgrade",
        what.join(", "),
        cfg.source.display(),
        offer.from_pid
    )))
}
