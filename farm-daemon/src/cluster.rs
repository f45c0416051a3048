//! The heartbeat runtime: sockets on each heartbeat network, sending, receiving (authenticated,
//! counted per reason), and the membership they feed.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{net::UdpSocket, sync::mpsc, time::Instant};

use crate::{
    config::Config,
    handover::Announce,
    heartbeat::{self, Heartbeat, Reject, State},
    membership::{Event, Membership, config_digest},
    witness::{Witness, WitnessError},
};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "cannot bind the heartbeat socket {addr} (network {net}): {source}; is {ip} an address \
         of this host? (cluster.members: this node's address / heartbeat_addresses)",
        ip = addr.ip()
    )]
    Bind {
        addr: SocketAddr,
        net: usize,
        source: std::io::Error,
    },
    #[error(transparent)]
    Witness(#[from] WitnessError),
}

/// A datagram received on heartbeat network `net`.
pub struct Datagram {
    pub net: usize,
    pub bytes: Vec<u8>,
}

/// Heartbeat traffic counters.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Per peer id, per network: sent and accepted.
    pub sent: BTreeMap<String, Vec<u64>>,
    pub received: BTreeMap<String, Vec<u64>>,
    /// Per peer id, per network: heartbeats the peer sent that never arrived on that network
    /// (gaps in its sequence numbers; a silent peer sends nothing and loses nothing).
    #[serde(default)]
    pub lost: BTreeMap<String, Vec<u64>>,
    /// Rejected datagrams by reason.
    pub rejected: BTreeMap<String, u64>,
    /// Peers declared lost.
    pub peers_lost: u64,
}

pub struct Cluster {
    pub membership: Membership,
    key: [u8; 32],
    incarnation: u64,
    seq: u64,
    /// The digest of this node's member list and weights (changes on reload).
    pub config_digest: u64,
    sockets: Vec<Arc<UdpSocket>>,
    /// Per peer, per network: where its heartbeats go.
    peer_addrs: Vec<Vec<SocketAddr>>,
    witness: Option<Witness>,
    witness_window: Duration,
    joined_at: Instant,
    join_deferred: bool,
    pub counters: Counters,
    /// Membership events since the daemon last took them (for notify hooks).
    pub events: Vec<Event>,
    /// The recovery drill this node runs, announced in its heartbeats: (id, member index).
    pub drill: Option<(u32, u8)>,
    /// This node's mirror group state, announced in every heartbeat.
    pub mirror: crate::heartbeat::MirrorBeat,
    /// Sends nothing (this node plays a crashed member in a peer's drill).
    pub silent: bool,
    /// Per peer, per network: the (incarnation, sequence) last accepted (for the lost count).
    last_seq: Vec<Vec<Option<(u64, u64)>>>,
}

impl Cluster {
    /// Binds the heartbeat sockets (before anything on the host is changed) and starts the
    /// receivers, which feed the returned channel.
    pub async fn bind(
        cfg: &Config,
        key: [u8; 32],
    ) -> Result<(Self, mpsc::Receiver<Datagram>), ClusterError> {
        let me = cfg.me();
        let networks = me.heartbeat_addrs.len();
        let (tx, rx) = mpsc::channel(1024);
        let mut sockets = Vec::new();
        for (net, ip) in me.heartbeat_addrs.iter().enumerate() {
            let addr = SocketAddr::new(*ip, cfg.heartbeat.port);
            let s = UdpSocket::bind(addr)
                .await
                .map_err(|source| ClusterError::Bind { addr, net, source })?;
            let s = Arc::new(s);
            let (rs, tx) = (s.clone(), tx.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                while let Ok((n, _)) = rs.recv_from(&mut buf).await {
                    let d = Datagram {
                        net,
                        bytes: buf[..n].to_vec(),
                    };
                    if tx.send(d).await.is_err() {
                        break;
                    }
                }
            });
            sockets.push(s);
        }
        let members: Vec<(String, u32)> = cfg
            .members
            .iter()
            .map(|m| (m.id.clone(), m.weight))
            .collect();
        let peer_addrs = cfg
            .members
            .iter()
            .map(|m| {
                m.heartbeat_addrs
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, cfg.heartbeat.port))
                    .collect()
            })
            .collect();
        let loss_window = cfg.heartbeat.loss_window();
        let witness = match cfg.witness {
            Some(w) => Some(Witness::start(
                w,
                cfg.heartbeat.interval.max(Duration::from_millis(100)),
            )?),
            None => None,
        };
        let mut counters = Counters::default();
        for m in &cfg.members {
            counters.sent.insert(m.id.clone(), vec![0; networks]);
            counters.received.insert(m.id.clone(), vec![0; networks]);
            counters.lost.insert(m.id.clone(), vec![0; networks]);
        }
        for r in Reject::ALL {
            counters.rejected.insert(r.name().into(), 0);
        }
        Ok((
            Self {
                membership: Membership::new(
                    &members,
                    cfg.me,
                    networks,
                    loss_window,
                    cfg.witness.is_some(),
                ),
                key,
                incarnation: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64),
                seq: 0,
                config_digest: config_digest(&members),
                sockets,
                peer_addrs,
                witness,
                witness_window: loss_window.max(Duration::from_millis(500)),
                joined_at: Instant::now(),
                join_deferred: false,
                counters,
                events: Vec::new(),
                drill: None,
                mirror: Default::default(),
                silent: false,
                last_seq: vec![vec![None; networks]; cfg.members.len()],
            },
            rx,
        ))
    }

    /// Sends one heartbeat to every peer on every network, announcing where this node's bucket
    /// moves stand.
    pub fn send(&mut self, a: Announce) {
        if self.silent {
            return;
        }
        self.seq += 1;
        let me = self.membership.me;
        for (net, sock) in self.sockets.iter().enumerate() {
            let hb = Heartbeat {
                id: self.membership.peers[me].id.clone(),
                state: self.membership.my_state,
                weight: self.membership.peers[me].weight as u16,
                incarnation: self.incarnation,
                seq: self.seq,
                applied: a.applied,
                config_digest: self.config_digest,
                network: net as u8,
                settled: a.settled,
                handed_over: a.handed_over,
                released: a.released,
                drill: self.drill,
                mirror: self.mirror,
            };
            let bytes = heartbeat::encode(&self.key, &hb);
            for (i, addrs) in self.peer_addrs.iter().enumerate() {
                if i == me {
                    continue;
                }
                // A full socket buffer loses one heartbeat, which the loss threshold absorbs.
                if sock.try_send_to(&bytes, addrs[net]).is_ok()
                    && let Some(c) = self.counters.sent.get_mut(&self.membership.peers[i].id)
                {
                    c[net] += 1;
                }
            }
        }
    }

    /// Takes in one received datagram. Returns whether it came from a live peer that announced
    /// another move state than before (see `membership::Received`).
    pub fn receive(&mut self, d: &Datagram, now: Instant) -> bool {
        let result = heartbeat::decode(&self.key, &d.bytes).and_then(|hb| {
            self.membership
                .receive(&hb, d.net, now.into_std())
                .map(|r| (r, hb))
        });
        match result {
            Ok((r, hb)) => {
                let i = r.index;
                let id = &self.membership.peers[i].id;
                if let Some(c) = self.counters.received.get_mut(id) {
                    c[d.net] += 1;
                }
                // The sender numbers each round of heartbeats (one per network) in turn: a gap
                // on this network is heartbeats lost on it.
                let last = &mut self.last_seq[i][d.net];
                if let Some((inc, seq)) = *last
                    && inc == hb.incarnation
                    && hb.seq > seq + 1
                    && let Some(c) = self.counters.lost.get_mut(id)
                {
                    c[d.net] += hb.seq - seq - 1;
                }
                *last = Some((hb.incarnation, hb.seq));
                if r.digest_changed && hb.config_digest != self.config_digest {
                    tracing::warn!(
                        "member {} runs with another member list or weights than this node: a \
                         weight change waits until every member has it (farmctl reload there)",
                        hb.id
                    );
                }
                self.membership.peers[i].alive && r.moved
            }
            Err(r) => {
                *self.counters.rejected.entry(r.name().into()).or_default() += 1;
                tracing::debug!("heartbeat rejected on network {}: {r}", d.net);
                false
            }
        }
    }

    /// Re-evaluates membership (and logs what changed). A joining node becomes active after
    /// one loss window with quorum, and only when `may_join` (no other bucket move is in
    /// progress: one planned change at a time). Returns whether anything changed.
    pub fn tick(&mut self, now: Instant, may_join: bool) -> bool {
        let state = self.membership.my_state;
        if self.membership.my_state == State::Joining
            && self.membership.has_quorum()
            && now.duration_since(self.joined_at) >= self.membership.loss_window
        {
            if may_join {
                self.membership.my_state = State::Active;
                self.join_deferred = false;
                tracing::info!(
                    "joined: heard the farm for one loss window with quorum, now active"
                );
            } else if !self.join_deferred {
                self.join_deferred = true;
                tracing::info!("joining waits for the bucket move in progress to complete");
            }
        }
        let witness = self
            .witness
            .as_ref()
            .is_some_and(|w| w.reachable(self.witness_window));
        let events = self.membership.tick(now.into_std(), witness);
        let changed = !events.is_empty() || state != self.membership.my_state;
        self.events.extend(events.iter().cloned());
        for e in events {
            match e {
                Event::PeerLost { id, silent_for } => {
                    self.counters.peers_lost += 1;
                    tracing::warn!(
                        "member {id} lost: not heard for {} ms on any heartbeat network; its \
                         buckets move to the others",
                        silent_for.as_millis()
                    );
                }
                Event::PeerBack { id } => tracing::info!("member {id} heard again"),
                Event::QuorumLost => {
                    if self.membership.my_state == State::Active {
                        self.membership.my_state = State::Joining;
                    }
                    tracing::error!(
                        "lost quorum: this node sees too few members{}; releasing every bucket",
                        if self.witness.is_some() {
                            " and cannot reach the witness"
                        } else {
                            ""
                        }
                    )
                }
                Event::QuorumRegained => {
                    // Its view is as incomplete as a starting node's (it may hear some members
                    // before others): it serves again only after a loss window with quorum, or
                    // it would take buckets of members it has simply not heard yet.
                    self.joined_at = now;
                    tracing::info!("quorum: listening for one loss window, then serving");
                }
            }
        }
        changed
    }

    /// A reload's heartbeat timers: a peer is lost after `loss_window` from now on.
    pub fn set_loss_window(&mut self, loss_window: Duration) {
        self.membership.loss_window = loss_window;
        self.witness_window = loss_window.max(Duration::from_millis(500));
    }

    /// Starts over as a restarted farmd would (after playing a crashed member in a drill): a
    /// new incarnation, joining, serving only after a loss window.
    pub fn restart(&mut self) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        self.incarnation = now.max(self.incarnation + 1);
        self.seq = 0;
        self.silent = false;
        self.membership.my_state = State::Joining;
        self.joined_at = Instant::now();
    }

    /// Announces that this node leaves (peers take its buckets at once).
    pub fn leave(&mut self, a: Announce) {
        self.membership.my_state = State::Leaving;
        self.send(a);
    }

    pub fn witness_addr(&self) -> Option<IpAddr> {
        self.witness.as_ref().map(|w| w.addr)
    }

    pub fn witness_reachable(&self) -> Option<bool> {
        self.witness
            .as_ref()
            .map(|w| w.reachable(self.witness_window))
    }
}
