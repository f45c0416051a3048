//! The control protocol between farmctl and farmd: one JSON request line on a Unix socket
//! (mode 0600, root only), one JSON response line back.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Whois {
        clients: Vec<String>,
    },
    /// Hand this node's buckets to the others, keeping connections (see `handover`).
    Drain {
        /// Even when no other member serves (the VIPs then go unanswered).
        #[serde(default)]
        force: bool,
    },
    /// Take this node's share back after a drain.
    Resume,
    /// The health checks and their last results.
    Checks,
    /// The bucket map with this node's per-bucket counters.
    Buckets {
        /// One bucket in detail.
        #[serde(default)]
        bucket: Option<u32>,
    },
    /// Which buckets would move where if `member` failed now (nothing is changed).
    SimulateFailure {
        member: String,
    },
    /// The Prometheus text (used by the metrics endpoint).
    Metrics,
    /// Read the configuration file again and apply it (`dry_run`: only say what would change).
    Reload {
        #[serde(default)]
        dry_run: bool,
    },
    /// Start a recovery drill: `member` (default: chosen) acts as if it crashed; this node
    /// measures as a client how long its buckets go unanswered.
    Drill {
        #[serde(default)]
        member: Option<String>,
    },
    /// The drill in progress or the last one.
    DrillStatus,
    /// What the status page draws (JSON: status, bucket owners, recent events).
    Dashboard,
    /// The mirror group: roles, sync state, lag, resync progress.
    MirrorStatus,
    /// A planned role swap of the mirror group (no data loss).
    MirrorSwap,
    /// Make this member the mirror group's primary whatever its copy (last resort); refused
    /// unless `force` (farmd checks it, whatever client sends the request).
    MirrorPromote {
        #[serde(default)]
        force: bool,
    },
    /// Replace this farmd in place by `binary` (default: the file it was started from).
    Upgrade {
        #[serde(default)]
        binary: Option<std::path::PathBuf>,
    },
}

/// Something that happened, for the status page.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub at: f64,
    pub text: String,
}

/// What the status page draws.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dashboard {
    pub status: Status,
    /// The owner (member index; 255: nobody) of each bucket, base64.
    pub owners: String,
    /// Newest first.
    pub events: Vec<Event>,
}

/// What a reload changes (or would change, with `--diff`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReloadReport {
    pub file: String,
    /// Whether the change was applied (false for --diff, or when refused).
    pub applied: bool,
    /// Changes applied while running.
    pub changes: Vec<String>,
    /// Changes that need a restart of farmd; a reload with any of them is refused.
    pub restart_needed: Vec<String>,
    pub warnings: Vec<String>,
    pub vips_added: Vec<String>,
    pub vips_removed: Vec<String>,
    /// Buckets whose owner the new weights change (with the members serving now).
    pub buckets_moving: usize,
    /// Each member's buckets now and with the new weights.
    pub shares: Vec<ShareChange>,
    /// Live members that do not have these weights yet: the buckets move once they do.
    pub waiting_for: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShareChange {
    pub member: String,
    pub now: usize,
    pub after: usize,
}

/// Where a drill stands (in JSON, its lowercase name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrillStage {
    /// Probing until the probe client's answers are steady.
    Baseline,
    /// The drilled member acts as if crashed; waiting for the probe to be answered again.
    Crashed,
    /// Answered again: the drilled member rejoins.
    Restoring,
    Done,
    Failed,
}

impl DrillStage {
    pub fn as_str(self) -> &'static str {
        match self {
            DrillStage::Baseline => "baseline",
            DrillStage::Crashed => "crashed",
            DrillStage::Restoring => "restoring",
            DrillStage::Done => "done",
            DrillStage::Failed => "failed",
        }
    }
}

impl std::fmt::Display for DrillStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for DrillStage {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A recovery drill: its progress, then its result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillReport {
    pub id: u32,
    /// The member that acted as if it crashed.
    pub member: String,
    /// The probe client's address and the VIP it asked.
    pub probe: String,
    pub vip: String,
    pub phase: DrillStage,
    pub elapsed_ms: u64,
    pub probes_sent: u64,
    pub probes_answered: u64,
    /// How long the drilled member's buckets went unanswered, as the probe client saw it:
    /// from the last probe answered before the crash to the first answered after.
    pub rto_ms: Option<u64>,
    /// The recovery the farm's own timers allow (loss window), for comparison.
    pub expected_ms: u64,
    pub objective_ms: u64,
    pub passed: Option<bool>,
    pub error: Option<String>,
    pub finished: bool,
    /// When it finished, seconds since the Unix epoch.
    #[serde(default)]
    pub finished_at: Option<f64>,
}

impl DrillReport {
    /// The result in a line: `RTO 409 ms, objective 1000 ms: PASS` (or FAIL), `FAILED: why`;
    /// `None` while the drill runs.
    pub fn outcome(&self) -> Option<String> {
        if !self.finished {
            return None;
        }
        Some(match (&self.error, self.rto_ms) {
            (None, Some(ms)) => format!(
                "RTO {ms} ms, objective {} ms: {}",
                self.objective_ms,
                if self.passed == Some(true) {
                    "PASS"
                } else {
                    "FAIL"
                }
            ),
            (e, _) => format!("FAILED: {}", e.as_deref().unwrap_or("no measurement")),
        })
    }
}

/// The last failover this node took part in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverInfo {
    /// The member that was lost.
    pub member: String,
    /// From the last heartbeat heard from it until the new bucket map was live here.
    pub duration_ms: u64,
    pub ago_s: f64,
}

/// The bucket map as one node sees it. Every node sees every packet, so its counters cover all
/// members' traffic: accepted (its own buckets) plus dropped (the others').
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BucketReport {
    pub buckets_total: u32,
    pub members: Vec<MemberTraffic>,
    /// The busiest buckets (packets seen), most first.
    pub busiest: Vec<BucketInfo>,
    /// The bucket asked for.
    pub detail: Option<BucketInfo>,
    /// Owner (member index into `members`, or null) of every bucket.
    pub owners: Vec<Option<u8>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberTraffic {
    pub id: String,
    pub buckets: usize,
    /// Packets and bytes to its buckets, as this node saw them.
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BucketInfo {
    pub bucket: u32,
    pub owner: Option<String>,
    /// This node's handling: mine, not-mine, incoming, outgoing.
    pub state: String,
    pub accepted_packets: u64,
    pub accepted_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
}

/// Where a failed member's buckets would go.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Simulation {
    pub member: String,
    /// Buckets it owns now.
    pub buckets: usize,
    /// (member, buckets it would take).
    pub moves: Vec<(String, usize)>,
    /// Buckets of other members that would move (0 by design).
    pub others_moved: usize,
    /// Whether the rest would still have quorum.
    pub quorum_after: bool,
}

/// What became of a drain or resume request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The bucket move started.
    Started,
    /// Another move is in progress; this one starts when it completes.
    Queued,
    /// Nothing to do (already draining, drained or serving).
    Unchanged,
    /// A queued request was withdrawn.
    Cancelled,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Status(Box<Status>),
    Whois {
        entries: Vec<WhoisEntry>,
    },
    Planned {
        outcome: Outcome,
        message: String,
    },
    Buckets(Box<BucketReport>),
    Metrics {
        text: String,
    },
    Simulation(Simulation),
    Reload(Box<ReloadReport>),
    Dashboard {
        json: String,
    },
    Drill(Box<DrillReport>),
    Mirror(Box<crate::mirror::GroupStatus>),
    /// A mirror request was taken; what it does.
    MirrorDone {
        message: String,
    },
    Checks {
        healthy: bool,
        /// A return is held back by flap damping.
        damped: bool,
        checks: Vec<crate::checks::CheckStatus>,
    },
    /// A new farmd took over (in-place upgrade).
    Upgraded {
        message: String,
        from_pid: u32,
        pid: u32,
        xdp_link_id: u32,
        xdp_program_id: u32,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    /// farmd's version (empty from farm 0.1, which did not say).
    #[serde(default)]
    pub version: String,
    /// farmd's process id (it changes with an in-place upgrade).
    #[serde(default)]
    pub pid: u32,
    /// The farmd this one took over from by an in-place upgrade, if it did.
    #[serde(default)]
    pub took_over_from: Option<u32>,
    /// The kernel ids of the XDP link (kept across in-place upgrades) and of the program in
    /// it (new with each upgrade).
    #[serde(default)]
    pub xdp_link_id: u32,
    #[serde(default)]
    pub xdp_program_id: u32,
    pub interface: String,
    /// "driver" or "generic".
    pub xdp_mode: String,
    pub cluster_mac: String,
    pub mac_mode: String,
    pub deadman_timeout_ms: u64,
    /// Whether the data plane currently accepts VIP traffic (dead-man switch armed).
    pub serving: bool,
    pub uptime_s: f64,
    pub buckets_total: u32,
    /// Whether this node has quorum (sees enough members, or the witness) and may serve.
    pub quorum: bool,
    /// Members that left by a planned stop and do not count for quorum until they rejoin.
    #[serde(default)]
    pub departed: Vec<String>,
    /// A bucket move between live members in progress, if any.
    pub handover: Option<crate::handover::Progress>,
    /// A drain or resume of this node waiting for another move to complete.
    #[serde(default)]
    pub queued: Option<String>,
    /// farmd is stopping (draining first, up to handover.stop_drain_timeout_s).
    #[serde(default)]
    pub stopping: bool,
    /// Health checks that fail or have not passed yet.
    #[serde(default)]
    pub checks_failing: Vec<String>,
    /// The drill in progress or the last one.
    #[serde(default)]
    pub drill: Option<DrillReport>,
    /// The mirror group, when configured.
    #[serde(default)]
    pub mirror: Option<crate::mirror::GroupStatus>,
    /// Members this node saw fail, and the last such failover.
    #[serde(default)]
    pub failovers: u64,
    #[serde(default)]
    pub last_failover: Option<FailoverInfo>,
    /// Digest of this node's view; equal on every node when they agree.
    pub view_digest: String,
    pub heartbeat: HeartbeatStatus,
    pub members: Vec<MemberStatus>,
    pub vips: Vec<VipStatus>,
    pub traffic: Traffic,
    /// Data-plane event and parse-error counters.
    pub counters: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatStatus {
    pub interval_ms: u64,
    pub loss_threshold: u32,
    /// Per heartbeat network: how many peers are heard on it.
    pub networks: Vec<NetworkStatus>,
    pub counters: crate::cluster::Counters,
    pub witness: Option<WitnessStatus>,
    /// How late heartbeats were sent and processed (histograms since start).
    #[serde(default)]
    pub lateness: crate::lateness::Lateness,
    /// The heartbeat thread's scheduling as it turned out.
    #[serde(default)]
    pub scheduling: crate::cluster::SchedulingStatus,
    /// Set while the heartbeat thread holds this member silent because farmd's main loop
    /// stalled.
    #[serde(default)]
    pub main_loop_stalled: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkStatus {
    pub index: usize,
    pub peers_heard: usize,
    pub peers: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WitnessStatus {
    pub address: IpAddr,
    pub reachable: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: String,
    pub address: IpAddr,
    pub weight: u32,
    pub state: MemberState,
    pub buckets: usize,
    pub this_node: bool,
    /// The heartbeat version this node hears from it and writes to it (0: not heard).
    #[serde(default)]
    pub heartbeat_version: u8,
}

/// A member's state as a node sees it (in JSON, its kebab-case name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemberState {
    /// It serves its share.
    Serving,
    /// Started (or back without quorum for a while), not serving yet.
    Joining,
    /// Handing its buckets over.
    Draining,
    /// Drained: holds no bucket.
    Drained,
    /// Stopping (it announced it leaves).
    Leaving,
    /// Its health checks fail.
    Unhealthy,
    /// This node, active but without quorum: it serves nothing.
    NoQuorum,
    /// It was heard and went silent (a failure).
    Lost,
    /// It announced it was leaving, and went (a planned stop).
    Left,
    /// Never heard.
    Unknown,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Serving => "serving",
            MemberState::Joining => "joining",
            MemberState::Draining => "draining",
            MemberState::Drained => "drained",
            MemberState::Leaving => "leaving",
            MemberState::Unhealthy => "unhealthy",
            MemberState::NoQuorum => "no-quorum",
            MemberState::Lost => "lost",
            MemberState::Left => "left",
            MemberState::Unknown => "unknown",
        }
    }

    pub const ALL: [MemberState; 10] = [
        MemberState::Serving,
        MemberState::Joining,
        MemberState::Draining,
        MemberState::Drained,
        MemberState::Leaving,
        MemberState::Unhealthy,
        MemberState::NoQuorum,
        MemberState::Lost,
        MemberState::Left,
        MemberState::Unknown,
    ];
}

impl From<crate::heartbeat::State> for MemberState {
    fn from(s: crate::heartbeat::State) -> Self {
        use crate::heartbeat::State;
        match s {
            State::Joining => MemberState::Joining,
            State::Active => MemberState::Serving,
            State::Draining => MemberState::Draining,
            State::Leaving => MemberState::Leaving,
            State::Unhealthy => MemberState::Unhealthy,
        }
    }
}

impl std::fmt::Display for MemberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for MemberState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VipStatus {
    pub address: IpAddr,
    /// Human-readable rules, e.g. "tcp/80 client".
    pub rules: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Traffic {
    pub accepted_packets: u64,
    pub accepted_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub bucket: u32,
    pub owner: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoisEntry {
    /// The client as given.
    pub client: String,
    /// Where rules with `client` affinity send it (and fragments, ICMP echo, unmatched ports).
    pub by_client: Option<Placement>,
    /// Where rules with `connection` affinity send it (when a port was given).
    pub by_connection: Option<Placement>,
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "cannot connect to farmd at {path}: {source} (is farmd running? is this the socket in \
         its config's control.socket? are you root?)"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("talking to farmd: {0}")]
    Io(#[from] std::io::Error),
    #[error("farmd sent an answer farmctl does not understand: {0}")]
    Decode(#[from] serde_json::Error),
}

/// A client address as farmctl accepts it: `ADDR`, `ADDR:PORT` or `[V6ADDR]:PORT`.
pub fn parse_client(s: &str) -> Result<(IpAddr, Option<u16>), String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    match s.parse::<SocketAddr>() {
        Ok(sa) => Ok((sa.ip(), Some(sa.port()))),
        Err(_) => Err(format!(
            "{s:?} is not a client address: use ADDR, ADDR:PORT or [IPV6]:PORT"
        )),
    }
}

/// Sends one request and waits for the response (blocking; used by farmctl and the tests).
pub fn request(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let mut s = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    Ok(serde_json::from_str(&answer)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drill_stage_names_are_their_json_names() {
        use DrillStage::*;
        for s in [Baseline, Crashed, Restoring, Done, Failed] {
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::String(s.as_str().into())
            );
        }
    }

    #[test]
    fn member_state_names_are_their_json_names() {
        for s in MemberState::ALL {
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::String(s.as_str().into())
            );
            assert_eq!(s, s.as_str());
        }
    }

    #[test]
    fn client_forms() {
        assert_eq!(
            parse_client("10.0.0.1").unwrap(),
            ("10.0.0.1".parse().unwrap(), None)
        );
        assert_eq!(
            parse_client("10.0.0.1:4000").unwrap(),
            ("10.0.0.1".parse().unwrap(), Some(4000))
        );
        assert_eq!(parse_client("fd00::1").unwrap().1, None);
        assert_eq!(parse_client("[fd00::1]:80").unwrap().1, Some(80));
        assert!(parse_client("10.0.0.1:x").is_err());
    }

    #[test]
    fn requests_round_trip() {
        let r = Request::Whois {
            clients: vec!["10.0.0.1".into()],
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"cmd":"whois","clients":["10.0.0.1"]}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
    }
}
