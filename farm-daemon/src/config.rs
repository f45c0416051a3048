//! The configuration file: TOML parsed into raw structs, then validated in one place into
//! [`Config`]. Every mistake is reported with the field it is in and what is allowed, all of
//! them at once, before anything on the host is touched.

use std::{
    collections::BTreeMap,
    collections::HashSet,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use farm_common::{MAX_MEMBERS, MAX_RULES, MAX_VIPS, affinity, proto_mask};
use serde::Deserialize;

/// One mistake in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `cluster.members[1].weight`.
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error(
        "{path} is {problem}: it holds commands farmd runs as root (hooks, checks, mirror \
         commands), so only root (or farmd's user) may change it: run `chown root {path}; \
         chmod go-w {path}`"
    )]
    Untrusted { path: PathBuf, problem: String },
    #[error("{path}: {} mistake(s):\n{}", .errors.len(), format_errors(.errors))]
    Invalid {
        path: PathBuf,
        errors: Vec<FieldError>,
    },
}

fn format_errors(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("  - {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// The file as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: RawNode,
    cluster: RawCluster,
    #[serde(default)]
    vip: Vec<RawVip>,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default)]
    dataplane: RawDataplane,
    #[serde(default)]
    heartbeat: RawHeartbeat,
    #[serde(default)]
    handover: RawHandover,
    #[serde(default)]
    check: Vec<RawCheck>,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    hook: Vec<RawHook>,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    drill: RawDrill,
    mirror: Option<RawMirror>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMirror {
    members: Vec<String>,
    vip: String,
    directory: PathBuf,
    backing: PathBuf,
    #[serde(default = "default_mirror_port")]
    port: u16,
    #[serde(default)]
    addresses: std::collections::BTreeMap<String, String>,
    #[serde(default = "default_failover_after_ms")]
    failover_after_ms: u64,
    preferred: Option<String>,
    #[serde(default = "default_failback")]
    failback: String,
    #[serde(default = "default_max_in_flight_mib")]
    max_in_flight_mib: usize,
    #[serde(default = "default_command_timeout_s")]
    command_timeout_s: u64,
    start_primary: String,
    stop_primary: String,
    #[serde(default)]
    start_secondary: Option<String>,
    #[serde(default)]
    stop_secondary: Option<String>,
    #[serde(default)]
    secret_file: Option<PathBuf>,
    #[serde(default)]
    allow_privileged_files: bool,
}

fn default_mirror_port() -> u16 {
    7948
}
fn default_failover_after_ms() -> u64 {
    3000
}
fn default_failback() -> String {
    "stay".into()
}
fn default_max_in_flight_mib() -> usize {
    256
}
fn default_command_timeout_s() -> u64 {
    120
}

/// What happens once the preferred node is back in sync after a failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Failback {
    /// The new primary keeps the role (no second interruption).
    Stay,
    /// The role returns to `preferred` by a planned swap once it is in sync.
    Preferred,
}

/// A mirror group (`[mirror]`): two members, one primary holding the whole VIP and the
/// application, its directory replicated synchronously to the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// Indices (in `members`) of the two members, in the order written.
    pub members: [usize; 2],
    pub vip: IpAddr,
    /// Where the application sees its data (mounted on the primary).
    pub directory: PathBuf,
    /// The local copy on each member (the data on the primary, the replica on the secondary).
    pub backing: PathBuf,
    /// Replication address of each member (by member index), with `port`.
    pub addresses: BTreeMap<usize, IpAddr>,
    pub port: u16,
    /// The primary silent this long: the secondary takes over.
    pub failover_after: Duration,
    /// Index (in `members`) of the preferred primary.
    pub preferred: usize,
    pub failback: Failback,
    pub max_in_flight_bytes: usize,
    pub command_timeout: Duration,
    pub start_primary: String,
    pub stop_primary: String,
    pub start_secondary: Option<String>,
    pub stop_secondary: Option<String>,
    /// The group's own key file (only its two members hold it); `None`: the cluster key, when
    /// the cluster is just these two members.
    pub secret_file: Option<PathBuf>,
    /// Whether the secondary makes device nodes and set-id files the primary asks for.
    pub allow_privileged_files: bool,
}

impl Mirror {
    /// The replication address of member `i`.
    pub fn address(&self, i: usize) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.addresses[&i], self.port)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDrill {
    rto_objective_ms: u64,
    probe_addresses: Vec<String>,
    timeout_s: u64,
}

impl Default for RawDrill {
    fn default() -> Self {
        Self {
            rto_objective_ms: 1000,
            probe_addresses: Vec::new(),
            timeout_s: 30,
        }
    }
}

/// The recovery drill (`farmctl drill`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drill {
    /// The recovery time the drill's measurement is compared with.
    pub rto_objective: Duration,
    /// Addresses no host uses, in the subnet of the farm interface: the drill's probe client
    /// takes one whose bucket the drilled member owns and another member than the drilling
    /// one takes over (a /27 or larger leaves plenty to choose from).
    pub probe_addresses: Vec<(std::net::Ipv4Addr, u8)>,
    /// How long the drill waits for the farm to answer again before it gives up.
    pub timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawMetrics {
    enabled: bool,
    listen: String,
    per_bucket: bool,
}

impl Default for RawMetrics {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: "127.0.0.1:9464".into(),
            per_bucket: false,
        }
    }
}

/// A command run when something happens (`[[hook]]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    event: String,
    command: Vec<String>,
    #[serde(default = "default_hook_timeout")]
    timeout_s: u64,
}

fn default_hook_timeout() -> u64 {
    10
}

/// Events a hook can be run on.
pub const HOOK_EVENTS: [&str; 8] = [
    "became-active",
    "drained",
    "unhealthy",
    "healthy",
    "lost-quorum",
    "peer-lost",
    "peer-left",
    "peer-back",
];

/// A command run on an event, with the event in its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub event: String,
    pub command: Vec<String>,
    pub timeout: Duration,
}

/// One health check of the local application (`[[check]]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    name: Option<String>,
    kind: String,
    /// tcp: "HOST:PORT".
    address: Option<String>,
    /// http: "http://..." or "https://...".
    url: Option<String>,
    #[serde(default = "default_expect_status")]
    expect_status: u16,
    body_contains: Option<String>,
    #[serde(default = "default_true")]
    tls_verify: bool,
    /// process: the process name (as in /proc/PID/comm).
    process: Option<String>,
    /// systemd: the unit.
    unit: Option<String>,
    /// command: program and arguments.
    command: Option<Vec<String>>,
    #[serde(default = "default_check_interval")]
    interval_ms: u64,
    timeout_ms: Option<u64>,
    #[serde(default = "default_rise")]
    rise: u32,
    #[serde(default = "default_fall")]
    fall: u32,
}

fn default_expect_status() -> u16 {
    200
}
fn default_true() -> bool {
    true
}
fn default_check_interval() -> u64 {
    1000
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHealth {
    max_moves_per_minute: u32,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self {
            max_moves_per_minute: 4,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHandover {
    drain_timeout_s: u64,
    udp_idle_ms: u64,
    stop_drain_timeout_s: u64,
}

impl Default for RawHandover {
    fn default() -> Self {
        Self {
            drain_timeout_s: 60,
            udp_idle_ms: 1000,
            stop_drain_timeout_s: 30,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHeartbeat {
    interval_ms: u64,
    loss_threshold: u32,
    port: u16,
    scheduling: String,
    priority: i32,
    lock_memory: bool,
}

impl Default for RawHeartbeat {
    fn default() -> Self {
        Self {
            interval_ms: 50,
            loss_threshold: 8,
            port: 7946,
            scheduling: "fifo".into(),
            priority: 10,
            lock_memory: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: String,
    interface: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    secret_file: PathBuf,
    #[serde(default = "default_mac_mode")]
    mac_mode: String,
    cluster_mac: Option<String>,
    #[serde(default = "default_deadman_ms")]
    deadman_timeout_ms: u64,
    witness: Option<String>,
    #[serde(default)]
    members: Vec<RawMember>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    id: String,
    address: String,
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default)]
    heartbeat_addresses: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    address: String,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    protocol: String,
    ports: RawPorts,
    #[serde(default = "default_affinity")]
    affinity: String,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawPorts {
    One(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawControl {
    socket: PathBuf,
}

impl Default for RawControl {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRuntime {
    state_dir: PathBuf,
    bpffs: PathBuf,
}

impl Default for RawRuntime {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/run/farm"),
            bpffs: PathBuf::from("/sys/fs/bpf"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDataplane {
    xdp_mode: String,
    announce_interval_s: u64,
    vip_device: String,
}

impl Default for RawDataplane {
    fn default() -> Self {
        Self {
            xdp_mode: "auto".into(),
            announce_interval_s: 60,
            vip_device: "lo".into(),
        }
    }
}

fn default_mac_mode() -> String {
    "unicast".into()
}
fn default_deadman_ms() -> u64 {
    300
}
fn default_weight() -> u32 {
    1
}
fn default_affinity() -> String {
    "client".into()
}

pub const DEFAULT_SOCKET: &str = "/run/farm/farmd.sock";

// ---------------------------------------------------------------------------------------------
// The validated configuration.

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MacMode {
    /// A locally administered unicast MAC that is never a source address: switches flood it.
    Unicast,
    /// A multicast MAC: switches flood it (or deliver it to the registered ports).
    Multicast,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode, generic mode as a fallback with a warning.
    Auto,
    Driver,
    Generic,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub address: IpAddr,
    pub weight: u32,
    /// The member's address on each heartbeat network: `address` first, then
    /// `heartbeat_addresses`.
    pub heartbeat_addrs: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub interval: Duration,
    pub loss_threshold: u32,
    pub port: u16,
    /// How the heartbeat thread is scheduled.
    pub scheduling: Scheduling,
}

/// The heartbeat thread's scheduling (see `cluster`): a real-time policy by default, so that
/// no ordinary process on a saturated host can delay heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduling {
    pub policy: Policy,
    /// 1..=99 for `fifo` and `rr`; unused for `other`.
    pub priority: i32,
    /// mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT): farmd's pages are never swapped out.
    pub lock_memory: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Fifo,
    RoundRobin,
    Other,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::Fifo => "fifo",
            Policy::RoundRobin => "rr",
            Policy::Other => "other",
        }
    }
}

impl Heartbeat {
    /// A peer not heard for this long is lost.
    pub fn loss_window(&self) -> Duration {
        self.interval * self.loss_threshold
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub protocols: u8,
    pub port_lo: u16,
    pub port_hi: u16,
    pub affinity: u8,
}

impl fmt::Display for Rule {
    /// e.g. `tcp/80 client`, `udp/5000-5100 connection`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.protocols {
            proto_mask::TCP => "tcp",
            proto_mask::UDP => "udp",
            _ => "tcp+udp",
        };
        let aff = if self.affinity == affinity::CONNECTION {
            "connection"
        } else {
            "client"
        };
        if self.port_lo == self.port_hi {
            write!(f, "{proto}/{} {aff}", self.port_lo)
        } else {
            write!(f, "{proto}/{}-{} {aff}", self.port_lo, self.port_hi)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vip {
    pub address: IpAddr,
    pub rules: Vec<Rule>,
}

/// What a health check probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A TCP connection can be opened.
    Tcp(std::net::SocketAddr),
    /// An HTTP(S) GET answers with `expect_status` (and a body containing `body_contains`).
    Http {
        url: String,
        expect_status: u16,
        body_contains: Option<String>,
        tls_verify: bool,
    },
    /// A process of this name runs.
    Process(String),
    /// `systemctl is-active` says the unit is active.
    Systemd(String),
    /// The command exits with status 0.
    Command(Vec<String>),
}

impl Probe {
    pub fn kind(&self) -> &'static str {
        match self {
            Probe::Tcp(_) => "tcp",
            Probe::Http { .. } => "http",
            Probe::Process(_) => "process",
            Probe::Systemd(_) => "systemd",
            Probe::Command(_) => "command",
        }
    }

    /// What it probes, for humans.
    pub fn target(&self) -> String {
        match self {
            Probe::Tcp(a) => a.to_string(),
            Probe::Http { url, .. } => url.clone(),
            Probe::Process(p) | Probe::Systemd(p) => p.clone(),
            Probe::Command(c) => c.join(" "),
        }
    }
}

/// A health check of the local application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passes that make a failing check pass, and failures that make a passing
    /// check fail.
    pub rise: u32,
    pub fall: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub node_id: String,
    pub interface: String,
    pub secret_file: PathBuf,
    pub mac_mode: MacMode,
    pub cluster_mac: Option<[u8; 6]>,
    pub deadman_timeout: Duration,
    /// Sorted by id, so that member indices are the same on every node whatever the order in
    /// each node's file.
    pub members: Vec<Member>,
    /// Index of this node in `members`.
    pub me: usize,
    pub vips: Vec<Vip>,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    pub xdp_mode: XdpMode,
    /// The device the VIPs are added to: never the farm interface, so that the kernel alone
    /// never answers ARP/NDP for a VIP there (the XDP program does, or nobody).
    pub vip_device: String,
    pub announce_interval: Duration,
    pub heartbeat: Heartbeat,
    /// A member handing buckets over to another live member waits at most this long for its
    /// connections in them to end.
    pub drain_timeout: Duration,
    /// UDP (and other non-TCP) traffic of a moving bucket stays with the previous owner at
    /// least this long.
    pub udp_idle: Duration,
    /// On SIGTERM a serving member first drains (hands its buckets over the connection-keeping
    /// way) for at most this long; zero leaves at once.
    pub stop_drain_timeout: Duration,
    /// Decides for a member of a two-member farm that has lost its peer.
    pub witness: Option<IpAddr>,
    /// Health checks of the local application; a failing one gives this member's buckets away.
    pub checks: Vec<Check>,
    /// At most this many bucket moves per minute caused by health checks (flap damping).
    pub max_health_moves_per_minute: u32,
    pub hooks: Vec<Hook>,
    /// Where the Prometheus metrics endpoint listens (`None`: off).
    pub metrics: Option<std::net::SocketAddr>,
    /// Export per-bucket series too (65536 of each).
    pub metrics_per_bucket: bool,
    pub drill: Drill,
    /// The mirror group, if this farm has one.
    pub mirror: Option<Mirror>,
    /// The file this configuration was read from (`farmctl reload` reads it again).
    pub source: PathBuf,
}

impl Config {
    /// Reads and validates a configuration file.
    /// Reads and validates the file; refuses one that someone other than root or farmd's user
    /// could have written (checked on the file read, not on the path beforehand).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        use std::{io::Read as _, os::unix::fs::MetadataExt as _};
        let read_err = |source| ConfigError::Read {
            path: path.into(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(read_err)?;
        let meta = f.metadata().map_err(read_err)?;
        let problem = if !meta.file_type().is_file() {
            Some("not a regular file".to_string())
        } else if !crate::trust::trusted_uid(meta.uid()) {
            Some(format!("owned by uid {}", meta.uid()))
        } else if crate::trust::others_may_write(meta.mode()) {
            Some(format!(
                "writable by group or others (mode {:o})",
                meta.mode() & 0o777
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(ConfigError::Untrusted {
                path: path.into(),
                problem,
            });
        }
        let mut text = String::new();
        f.read_to_string(&mut text).map_err(read_err)?;
        Self::parse(&text, path)
    }

    /// Parses and validates configuration text (`origin` names it in errors).
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: origin.into(),
            message: e.to_string(),
        })?;
        let mut cfg = validate(raw).map_err(|errors| ConfigError::Invalid {
            path: origin.into(),
            errors,
        })?;
        cfg.source = origin.into();
        Ok(cfg)
    }

    pub fn me(&self) -> &Member {
        &self.members[self.me]
    }
}

struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
}

fn validate(raw: RawConfig) -> Result<Config, Vec<FieldError>> {
    let mut e = Errors(Vec::new());

    // node
    if !valid_id(&raw.node.id) {
        e.push("node.id", ID_RULE);
    }
    if raw.node.interface.is_empty()
        || raw.node.interface.len() > 15
        || raw.node.interface.contains(['/', ' '])
    {
        e.push(
            "node.interface",
            format!(
                "{:?} is not an interface name (1 to 15 characters, no '/' or spaces), e.g. \"eth0\"",
                raw.node.interface
            ),
        );
    }

    // cluster
    let c = &raw.cluster;
    if c.secret_file.as_os_str().is_empty() || !c.secret_file.is_absolute() {
        e.push(
            "cluster.secret_file",
            "must be an absolute path to the cluster key file (create one with \
             `head -c 32 /dev/urandom > FILE; chmod 600 FILE`, the same file on every member)",
        );
    }
    let mac_mode = match c.mac_mode.as_str() {
        "unicast" => MacMode::Unicast,
        "multicast" => MacMode::Multicast,
        other => {
            e.push(
                "cluster.mac_mode",
                format!("{other:?} is not allowed: use \"unicast\" or \"multicast\""),
            );
            MacMode::Unicast
        }
    };
    let cluster_mac = match &c.cluster_mac {
        None => None,
        Some(text) => match parse_mac(text) {
            None => {
                e.push(
                    "cluster.cluster_mac",
                    format!("{text:?} is not a MAC address like \"02:fa:00:00:00:01\""),
                );
                None
            }
            Some(mac) => {
                let multicast = mac[0] & 1 == 1;
                match mac_mode {
                    MacMode::Unicast if multicast => e.push(
                        "cluster.cluster_mac",
                        format!(
                            "{text} is a multicast MAC but mac_mode is \"unicast\": clear the \
                             lowest bit of the first octet (e.g. 02:...) or set mac_mode = \"multicast\""
                        ),
                    ),
                    MacMode::Multicast if !multicast => e.push(
                        "cluster.cluster_mac",
                        format!(
                            "{text} is a unicast MAC but mac_mode is \"multicast\": set the lowest \
                             bit of the first octet (e.g. 03:...) or set mac_mode = \"unicast\""
                        ),
                    ),
                    _ => {}
                }
                if mac == [0xff; 6] || mac == [0; 6] {
                    e.push(
                        "cluster.cluster_mac",
                        "must not be the broadcast or the zero address",
                    );
                }
                Some(mac)
            }
        },
    };
    if !(50..=60_000).contains(&c.deadman_timeout_ms) {
        e.push(
            "cluster.deadman_timeout_ms",
            format!(
                "{} is out of range: allowed 50 to 60000 (milliseconds)",
                c.deadman_timeout_ms
            ),
        );
    }

    let mut members = Vec::new();
    if c.members.is_empty() {
        e.push(
            "cluster.members",
            "list at least one member ([[cluster.members]] with id and address), this node included",
        );
    }
    if c.members.len() > MAX_MEMBERS {
        e.push(
            "cluster.members",
            format!(
                "{} members listed; at most {MAX_MEMBERS} are allowed",
                c.members.len()
            ),
        );
    }
    let mut ids = HashSet::new();
    let mut addrs = HashSet::new();
    for (i, m) in c.members.iter().enumerate() {
        let f = format!("cluster.members[{i}]");
        if !valid_id(&m.id) {
            e.push(format!("{f}.id"), ID_RULE);
        } else if !ids.insert(m.id.clone()) {
            e.push(
                format!("{f}.id"),
                format!("{:?} is listed twice: member ids must be unique", m.id),
            );
        }
        let address = match m.address.parse::<IpAddr>() {
            Ok(a) if a.is_unspecified() || a.is_multicast() => {
                e.push(
                    format!("{f}.address"),
                    format!("{a} is not a unicast address"),
                );
                None
            }
            Ok(a) => {
                if !addrs.insert(a) {
                    e.push(format!("{f}.address"), format!("{a} is listed twice"));
                }
                Some(a)
            }
            Err(_) => {
                e.push(
                    format!("{f}.address"),
                    format!(
                        "{:?} is not an IP address (e.g. \"192.0.2.11\" or \"2001:db8::11\")",
                        m.address
                    ),
                );
                None
            }
        };
        if m.weight > 1000 {
            e.push(
                format!("{f}.weight"),
                format!("{} is out of range: allowed 0 (standby) to 1000", m.weight),
            );
        }
        let mut heartbeat_addrs: Vec<IpAddr> = address.into_iter().collect();
        for (k, a) in m.heartbeat_addresses.iter().enumerate() {
            match a.parse::<IpAddr>() {
                Ok(ip) if !ip.is_unspecified() && !ip.is_multicast() => {
                    if !addrs.insert(ip) {
                        e.push(
                            format!("{f}.heartbeat_addresses[{k}]"),
                            format!("{ip} is listed twice"),
                        );
                    }
                    heartbeat_addrs.push(ip);
                }
                _ => e.push(
                    format!("{f}.heartbeat_addresses[{k}]"),
                    format!("{a:?} is not a unicast IP address"),
                ),
            }
        }
        if let Some(address) = address {
            members.push(Member {
                id: m.id.clone(),
                address,
                weight: m.weight,
                heartbeat_addrs,
            });
        }
    }
    if let Some(first) = c.members.first()
        && let Some((i, m)) = c
            .members
            .iter()
            .enumerate()
            .find(|(_, m)| m.heartbeat_addresses.len() != first.heartbeat_addresses.len())
    {
        e.push(
            format!("cluster.members[{i}].heartbeat_addresses"),
            format!(
                "lists {} address(es) but cluster.members[0] lists {}: every member needs one \
                 address per heartbeat network",
                m.heartbeat_addresses.len(),
                first.heartbeat_addresses.len()
            ),
        );
    }
    members.sort_by(|a, b| a.id.cmp(&b.id));
    let me = members.iter().position(|m| m.id == raw.node.id);
    if me.is_none() && valid_id(&raw.node.id) && !c.members.is_empty() {
        e.push(
            "node.id",
            format!(
                "{:?} is not one of cluster.members (ids: {}): add this node to the member list",
                raw.node.id,
                c.members
                    .iter()
                    .map(|m| m.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    if !c.members.is_empty() && c.members.iter().all(|m| m.weight == 0) {
        e.push(
            "cluster.members",
            "every member has weight 0: at least one must take traffic (weight >= 1)",
        );
    }

    // VIPs
    let mut vips = Vec::new();
    if raw.vip.is_empty() {
        e.push(
            "vip",
            "no VIP configured: add a [[vip]] section with an address",
        );
    }
    if raw.vip.len() > MAX_VIPS as usize {
        e.push(
            "vip",
            format!("{} VIPs; at most {MAX_VIPS} are allowed", raw.vip.len()),
        );
    }
    let mut vip_addrs = HashSet::new();
    for (i, v) in raw.vip.iter().enumerate() {
        let f = format!("vip[{i}]");
        let address = match v.address.parse::<IpAddr>() {
            Ok(a)
                if a.is_unspecified()
                    || a.is_multicast()
                    || a.is_loopback()
                    || matches!(a, IpAddr::V4(v4) if v4.is_broadcast())
                    || matches!(a, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()) =>
            {
                e.push(
                    format!("{f}.address"),
                    format!("{a} cannot be a VIP: use a unicast, non-loopback address"),
                );
                None
            }
            Ok(a) => {
                if !vip_addrs.insert(a) {
                    e.push(format!("{f}.address"), format!("{a} is listed twice"));
                }
                if members.iter().any(|m| m.address == a) {
                    e.push(
                        format!("{f}.address"),
                        format!(
                            "{a} is a member's own address; a VIP must be an address of its own"
                        ),
                    );
                }
                Some(a)
            }
            Err(_) => {
                e.push(
                    format!("{f}.address"),
                    format!(
                        "{:?} is not an IP address (e.g. \"192.0.2.100\" or \"2001:db8::100\")",
                        v.address
                    ),
                );
                None
            }
        };
        if v.rules.len() > MAX_RULES {
            e.push(
                format!("{f}.rules"),
                format!("{} rules; at most {MAX_RULES} per VIP", v.rules.len()),
            );
        }
        let mut rules = Vec::new();
        for (j, r) in v.rules.iter().enumerate() {
            let rf = format!("{f}.rules[{j}]");
            let protocols = match r.protocol.as_str() {
                "tcp" => Some(proto_mask::TCP),
                "udp" => Some(proto_mask::UDP),
                "both" => Some(proto_mask::TCP | proto_mask::UDP),
                other => {
                    e.push(
                        format!("{rf}.protocol"),
                        format!("{other:?} is not allowed: use \"tcp\", \"udp\" or \"both\""),
                    );
                    None
                }
            };
            let ports = parse_ports(&r.ports);
            if ports.is_none() {
                e.push(
                    format!("{rf}.ports"),
                    format!(
                        "{} is not a port or range: use a number 1-65535 (80) or a range \
                         (\"8000-8100\")",
                        match &r.ports {
                            RawPorts::One(n) => n.to_string(),
                            RawPorts::Text(t) => format!("{t:?}"),
                        }
                    ),
                );
            }
            let aff = match r.affinity.as_str() {
                "client" => Some(affinity::CLIENT),
                "connection" => Some(affinity::CONNECTION),
                other => {
                    e.push(
                        format!("{rf}.affinity"),
                        format!(
                            "{other:?} is not allowed: use \"client\" (source address, the \
                             default) or \"connection\" (source address and port)"
                        ),
                    );
                    None
                }
            };
            if let (Some(protocols), Some((lo, hi)), Some(aff)) = (protocols, ports, aff) {
                if let Some(k) = rules.iter().position(|o: &Rule| {
                    o.protocols & protocols != 0 && lo <= o.port_hi && o.port_lo <= hi
                }) {
                    e.push(
                        format!("{rf}.ports"),
                        format!(
                            "overlaps {f}.rules[{k}] for the same protocol: each port may have \
                             one rule"
                        ),
                    );
                }
                rules.push(Rule {
                    protocols,
                    port_lo: lo,
                    port_hi: hi,
                    affinity: aff,
                });
            }
        }
        if let Some(address) = address {
            vips.push(Vip { address, rules });
        }
    }

    // control, runtime, dataplane
    if !raw.control.socket.is_absolute() {
        e.push("control.socket", "must be an absolute path");
    }
    if !raw.runtime.state_dir.is_absolute() {
        e.push("runtime.state_dir", "must be an absolute path");
    }
    if !raw.runtime.bpffs.is_absolute() {
        e.push(
            "runtime.bpffs",
            "must be an absolute path to a bpf filesystem (default /sys/fs/bpf)",
        );
    }
    let vip_device = &raw.dataplane.vip_device;
    if vip_device.is_empty() || vip_device.len() > 15 || vip_device.contains(['/', ' ']) {
        e.push(
            "dataplane.vip_device",
            format!(
                "{vip_device:?} is not an interface name (1 to 15 characters, no '/' or \
                 spaces); the default \"lo\" suits every host"
            ),
        );
    } else if *vip_device == raw.node.interface {
        e.push(
            "dataplane.vip_device",
            format!(
                "must not be the farm interface ({vip_device:?}): there the kernel would answer \
                 ARP/NDP for the VIPs with the node's own MAC whenever the XDP program is not \
                 running; use \"lo\" (the default) or a dummy device"
            ),
        );
    }
    let xdp_mode = match raw.dataplane.xdp_mode.as_str() {
        "auto" => XdpMode::Auto,
        "driver" => XdpMode::Driver,
        "generic" => XdpMode::Generic,
        other => {
            e.push(
                "dataplane.xdp_mode",
                format!("{other:?} is not allowed: use \"auto\", \"driver\" or \"generic\""),
            );
            XdpMode::Auto
        }
    };
    if raw.dataplane.announce_interval_s == 0 || raw.dataplane.announce_interval_s > 3600 {
        e.push(
            "dataplane.announce_interval_s",
            format!(
                "{} is out of range: allowed 1 to 3600 (seconds between gratuitous ARP/NA)",
                raw.dataplane.announce_interval_s
            ),
        );
    }

    let hb = &raw.heartbeat;
    if !(10..=10_000).contains(&hb.interval_ms) {
        e.push(
            "heartbeat.interval_ms",
            format!(
                "{} is out of range: allowed 10 to 10000 (milliseconds)",
                hb.interval_ms
            ),
        );
    }
    if !(2..=100).contains(&hb.loss_threshold) {
        e.push(
            "heartbeat.loss_threshold",
            format!(
                "{} is out of range: allowed 2 to 100 (missed heartbeats before a peer is lost)",
                hb.loss_threshold
            ),
        );
    }
    if hb.port == 0 {
        e.push("heartbeat.port", "must be a UDP port from 1 to 65535");
    }
    let policy = match hb.scheduling.as_str() {
        "fifo" => Policy::Fifo,
        "rr" => Policy::RoundRobin,
        "other" => Policy::Other,
        other => {
            e.push(
                "heartbeat.scheduling",
                format!(
                    "\"{other}\" is not a scheduling policy: use \"fifo\" (the default), \"rr\" \
                     or \"other\" (no real-time priority)"
                ),
            );
            Policy::Other
        }
    };
    if policy != Policy::Other && !(1..=99).contains(&hb.priority) {
        e.push(
            "heartbeat.priority",
            format!(
                "{} is out of range: real-time priorities go from 1 to 99 (default 10)",
                hb.priority
            ),
        );
    }
    let loss_window_ms = hb.interval_ms * hb.loss_threshold as u64;
    if raw.cluster.deadman_timeout_ms > loss_window_ms {
        e.push(
            "cluster.deadman_timeout_ms",
            format!(
                "{} ms is longer than the heartbeat loss window ({} ms = heartbeat.interval_ms x \
                 loss_threshold): a member whose farmd died would keep serving after its peers \
                 took its buckets; use at most {loss_window_ms}",
                raw.cluster.deadman_timeout_ms, loss_window_ms
            ),
        );
    }
    if !(1..=3600).contains(&raw.handover.drain_timeout_s) {
        e.push(
            "handover.drain_timeout_s",
            format!(
                "{} is out of range: allowed 1 to 3600 (seconds)",
                raw.handover.drain_timeout_s
            ),
        );
    }
    if raw.handover.stop_drain_timeout_s > 3600 {
        e.push(
            "handover.stop_drain_timeout_s",
            format!(
                "{} is out of range: allowed 0 (leave at once) to 3600 (seconds); keep it below \
                 the service manager's stop timeout (systemd TimeoutStopSec)",
                raw.handover.stop_drain_timeout_s
            ),
        );
    }
    if raw.handover.udp_idle_ms > 60_000 {
        e.push(
            "handover.udp_idle_ms",
            format!(
                "{} is out of range: allowed 0 to 60000 (milliseconds)",
                raw.handover.udp_idle_ms
            ),
        );
    }
    let checks = validate_checks(&raw.check, &mut e);
    let metrics = match raw.metrics.listen.parse::<std::net::SocketAddr>() {
        _ if !raw.metrics.enabled => None,
        Ok(a) => Some(a),
        Err(_) => {
            e.push(
                "metrics.listen",
                format!(
                    "{:?} is not ADDRESS:PORT; the default \"127.0.0.1:9464\" keeps the \
                     endpoint on this host",
                    raw.metrics.listen
                ),
            );
            None
        }
    };
    let mut hooks = Vec::new();
    for (i, h) in raw.hook.iter().enumerate() {
        let mut ok = true;
        if !HOOK_EVENTS.contains(&h.event.as_str()) {
            ok = false;
            e.push(
                format!("hook[{i}].event"),
                format!(
                    "{:?} is not an event: use one of {}",
                    h.event,
                    HOOK_EVENTS.join(", ")
                ),
            );
        }
        if h.command.is_empty() || h.command[0].is_empty() {
            ok = false;
            e.push(
                format!("hook[{i}].command"),
                "missing: the program and its arguments, e.g. [\"/usr/local/bin/notify\", \"farm\"]",
            );
        }
        if !(1..=300).contains(&h.timeout_s) {
            ok = false;
            e.push(
                format!("hook[{i}].timeout_s"),
                format!(
                    "{} is out of range: allowed 1 to 300 (seconds)",
                    h.timeout_s
                ),
            );
        }
        if ok {
            hooks.push(Hook {
                event: h.event.clone(),
                command: h.command.clone(),
                timeout: Duration::from_secs(h.timeout_s),
            });
        }
    }
    if raw.health.max_moves_per_minute < 2 {
        e.push(
            "health.max_moves_per_minute",
            format!(
                "{} is too small: a member that went unhealthy must be able to come back; use \
                 at least 2 (out and in)",
                raw.health.max_moves_per_minute
            ),
        );
    }
    let drill = validate_drill(&raw.drill, &mut e);
    let witness = match &raw.cluster.witness {
        None => None,
        Some(w) => match w.parse::<IpAddr>() {
            Ok(ip) if !ip.is_unspecified() && !ip.is_multicast() => Some(ip),
            _ => {
                e.push(
                    "cluster.witness",
                    format!("{w:?} is not a unicast IP address (a host both members can ping)"),
                );
                None
            }
        },
    };

    let mirror = raw
        .mirror
        .as_ref()
        .and_then(|m| validate_mirror(m, &members, &vips, hb, &mut e));

    if !e.0.is_empty() {
        return Err(e.0);
    }
    Ok(Config {
        node_id: raw.node.id,
        interface: raw.node.interface,
        secret_file: raw.cluster.secret_file,
        mac_mode,
        cluster_mac,
        deadman_timeout: Duration::from_millis(raw.cluster.deadman_timeout_ms),
        me: me.expect("checked above"),
        members,
        vips,
        socket: raw.control.socket,
        state_dir: raw.runtime.state_dir,
        bpffs: raw.runtime.bpffs,
        xdp_mode,
        vip_device: raw.dataplane.vip_device,
        announce_interval: Duration::from_secs(raw.dataplane.announce_interval_s),
        heartbeat: Heartbeat {
            interval: Duration::from_millis(hb.interval_ms),
            loss_threshold: hb.loss_threshold,
            port: hb.port,
            scheduling: Scheduling {
                policy,
                priority: hb.priority,
                lock_memory: hb.lock_memory,
            },
        },
        witness,
        drain_timeout: Duration::from_secs(raw.handover.drain_timeout_s),
        udp_idle: Duration::from_millis(raw.handover.udp_idle_ms),
        stop_drain_timeout: Duration::from_secs(raw.handover.stop_drain_timeout_s),
        checks,
        max_health_moves_per_minute: raw.health.max_moves_per_minute,
        hooks,
        metrics,
        metrics_per_bucket: raw.metrics.per_bucket,
        drill,
        mirror,
        source: PathBuf::new(),
    })
}

fn validate_mirror(
    m: &RawMirror,
    members: &[Member],
    vips: &[Vip],
    hb: &RawHeartbeat,
    e: &mut Errors,
) -> Option<Mirror> {
    let errors_before = e.0.len();
    let index = |id: &str| members.iter().position(|x| x.id == id);
    let mut idx = Vec::new();
    if m.members.len() != 2 {
        e.push(
            "mirror.members",
            format!(
                "{} listed: a mirror group has exactly two members, e.g. [\"n1\", \"n2\"]",
                m.members.len()
            ),
        );
    }
    for (i, id) in m.members.iter().enumerate() {
        match index(id) {
            Some(x) if !idx.contains(&x) => idx.push(x),
            Some(_) => e.push(
                format!("mirror.members[{i}]"),
                format!("{id:?} is listed twice"),
            ),
            None => e.push(
                format!("mirror.members[{i}]"),
                format!("{id:?} is not a cluster member (list it in [[cluster.members]])"),
            ),
        }
    }
    let vip = match m.vip.parse::<IpAddr>() {
        Ok(a) if vips.iter().any(|v| v.address == a) => Some(a),
        Ok(a) => {
            e.push(
                "mirror.vip",
                format!("{a} is not one of the [[vip]] addresses: add it as a [[vip]] (its port rules do not matter, the primary takes all of it)"),
            );
            None
        }
        Err(_) => {
            e.push("mirror.vip", format!("{:?} is not an IP address", m.vip));
            None
        }
    };
    for (field, p) in [
        ("mirror.directory", &m.directory),
        ("mirror.backing", &m.backing),
    ] {
        if !p.is_absolute() || p.components().count() < 2 {
            e.push(
                field,
                format!(
                    "{:?} must be an absolute path below / (e.g. \"/srv/data\")",
                    p.display()
                ),
            );
        }
    }
    if m.directory.starts_with(&m.backing) || m.backing.starts_with(&m.directory) {
        e.push(
            "mirror.backing",
            "must not be inside mirror.directory nor contain it: the backing copy lives beside \
             the directory the application sees (e.g. directory = \"/srv/data\", backing = \
             \"/var/lib/farm/data\")",
        );
    }
    if m.port == 0 || m.port == hb.port {
        e.push(
            "mirror.port",
            format!("{} cannot be used: pick a free TCP port other than heartbeat.port (7946 unless set)", m.port),
        );
    }
    let mut addresses = BTreeMap::new();
    for (id, a) in &m.addresses {
        let Some(i) = index(id).filter(|i| idx.contains(i)) else {
            e.push(
                format!("mirror.addresses.{id}"),
                format!("{id:?} is not a member of the mirror group"),
            );
            continue;
        };
        match a.parse::<IpAddr>() {
            Ok(ip) if !ip.is_unspecified() && !ip.is_multicast() => {
                addresses.insert(i, ip);
            }
            _ => e.push(
                format!("mirror.addresses.{id}"),
                format!("{a:?} is not a unicast IP address of that member"),
            ),
        }
    }
    for &i in &idx {
        addresses.entry(i).or_insert(members[i].address);
    }
    if !(200..=600_000).contains(&m.failover_after_ms) {
        e.push(
            "mirror.failover_after_ms",
            format!(
                "{} is out of range: allowed 200 to 600000 (milliseconds)",
                m.failover_after_ms
            ),
        );
    } else {
        let loss = hb.interval_ms * u64::from(hb.loss_threshold);
        if m.failover_after_ms < loss {
            e.push(
                "mirror.failover_after_ms",
                format!(
                    "{} is shorter than the heartbeat loss window ({loss} ms = heartbeat.interval_ms \
                     x loss_threshold): a primary cut off must lose its quorum and stop before the \
                     secondary takes over; use at least {loss}",
                    m.failover_after_ms
                ),
            );
        }
    }
    let preferred = match &m.preferred {
        None => idx.first().copied(),
        Some(id) => match index(id).filter(|i| idx.contains(i)) {
            Some(i) => Some(i),
            None => {
                e.push(
                    "mirror.preferred",
                    format!("{id:?} is not one of mirror.members"),
                );
                None
            }
        },
    };
    let failback = match m.failback.as_str() {
        "stay" => Failback::Stay,
        "preferred" => Failback::Preferred,
        other => {
            e.push(
                "mirror.failback",
                format!("{other:?} is not allowed: use \"stay\" or \"preferred\""),
            );
            Failback::Stay
        }
    };
    if !(1..=65_536).contains(&m.max_in_flight_mib) {
        e.push(
            "mirror.max_in_flight_mib",
            format!(
                "{} is out of range: allowed 1 to 65536 (MiB)",
                m.max_in_flight_mib
            ),
        );
    }
    if !(1..=3600).contains(&m.command_timeout_s) {
        e.push(
            "mirror.command_timeout_s",
            format!(
                "{} is out of range: allowed 1 to 3600 (seconds)",
                m.command_timeout_s
            ),
        );
    }
    for (field, c) in [
        ("mirror.start_primary", Some(&m.start_primary)),
        ("mirror.stop_primary", Some(&m.stop_primary)),
        ("mirror.start_secondary", m.start_secondary.as_ref()),
        ("mirror.stop_secondary", m.stop_secondary.as_ref()),
    ] {
        if c.is_some_and(|c| c.trim().is_empty()) {
            e.push(
                field,
                "is empty: give the shell command (run with sh -c), or leave the optional ones out",
            );
        }
    }
    match &m.secret_file {
        Some(p) if !p.is_absolute() => e.push(
            "mirror.secret_file",
            format!("{:?} must be an absolute path", p.display()),
        ),
        None if members.len() > 2 => e.push(
            "mirror.secret_file",
            format!(
                "is required when the cluster has members outside the mirror group ({} members): \
                 whoever holds the replication key can write the database's files, and every \
                 member holds the cluster key. Create a key for the group's two members only \
                 (`head -c 32 /dev/urandom > /etc/farm/mirror.key; chmod 600 \
                 /etc/farm/mirror.key`, copied to both) and set secret_file to it",
                members.len()
            ),
        ),
        _ => {}
    }
    if e.0.len() != errors_before {
        return None;
    }
    Some(Mirror {
        secret_file: m.secret_file.clone(),
        allow_privileged_files: m.allow_privileged_files,
        members: [idx[0], idx[1]],
        vip: vip?,
        directory: m.directory.clone(),
        backing: m.backing.clone(),
        addresses,
        port: m.port,
        failover_after: Duration::from_millis(m.failover_after_ms),
        preferred: preferred?,
        failback,
        max_in_flight_bytes: m.max_in_flight_mib << 20,
        command_timeout: Duration::from_secs(m.command_timeout_s),
        start_primary: m.start_primary.clone(),
        stop_primary: m.stop_primary.clone(),
        start_secondary: m.start_secondary.clone(),
        stop_secondary: m.stop_secondary.clone(),
    })
}

fn validate_drill(raw: &RawDrill, e: &mut Errors) -> Drill {
    if !(10..=600_000).contains(&raw.rto_objective_ms) {
        e.push(
            "drill.rto_objective_ms",
            format!(
                "{} is out of range: allowed 10 to 600000 (milliseconds)",
                raw.rto_objective_ms
            ),
        );
    }
    if !(1..=600).contains(&raw.timeout_s) {
        e.push(
            "drill.timeout_s",
            format!(
                "{} is out of range: allowed 1 to 600 (seconds)",
                raw.timeout_s
            ),
        );
    }
    let mut probes = Vec::new();
    for (i, a) in raw.probe_addresses.iter().enumerate() {
        let (addr, len) = a.split_once('/').unwrap_or((a, "32"));
        match (addr.parse::<std::net::Ipv4Addr>(), len.parse::<u8>()) {
            (Ok(ip), Ok(len)) if (16..=32).contains(&len) && !ip.is_unspecified() => {
                probes.push((ip, len))
            }
            _ => e.push(
                format!("drill.probe_addresses[{i}]"),
                format!(
                    "{a:?} is not an IPv4 address or block of /16 to /32 (e.g. \
                     \"192.0.2.224/27\"): addresses no host uses, in the subnet of the farm \
                     interface (IPv6 probes are not supported yet)"
                ),
            ),
        }
    }
    Drill {
        rto_objective: Duration::from_millis(raw.rto_objective_ms),
        probe_addresses: probes,
        timeout: Duration::from_secs(raw.timeout_s),
    }
}

/// Validates the `[[check]]` entries: each needs exactly the field its kind probes.
fn validate_checks(raw: &[RawCheck], e: &mut Errors) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for (i, c) in raw.iter().enumerate() {
        let at = |f: &str| format!("check[{i}].{f}");
        let needs = |e: &mut Errors, field: &str, what: &str| {
            e.push(
                at(field),
                format!("missing: a \"{}\" check needs {what}", c.kind),
            );
        };
        let probe = match c.kind.as_str() {
            "tcp" => match c.address.as_deref() {
                None => {
                    needs(
                        e,
                        "address",
                        "address = \"HOST:PORT\", e.g. \"127.0.0.1:80\"",
                    );
                    None
                }
                Some(a) => match a.parse::<std::net::SocketAddr>() {
                    Ok(sa) => Some(Probe::Tcp(sa)),
                    Err(_) => {
                        e.push(
                            at("address"),
                            format!("{a:?} is not ADDRESS:PORT, e.g. \"127.0.0.1:80\""),
                        );
                        None
                    }
                },
            },
            "http" => match c.url.as_deref() {
                None => {
                    needs(e, "url", "url = \"http://127.0.0.1/health\"");
                    None
                }
                Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                    e.push(
                        at("url"),
                        format!("{u:?} must start with http:// or https://"),
                    );
                    None
                }
                Some(u) => {
                    if !(100..=599).contains(&c.expect_status) {
                        e.push(
                            at("expect_status"),
                            format!(
                                "{} is not an HTTP status: allowed 100 to 599",
                                c.expect_status
                            ),
                        );
                    }
                    Some(Probe::Http {
                        url: u.to_string(),
                        expect_status: c.expect_status,
                        body_contains: c.body_contains.clone(),
                        tls_verify: c.tls_verify,
                    })
                }
            },
            "process" => match c.process.as_deref() {
                Some(p) if p.starts_with('/') => Some(Probe::Process(p.into())),
                Some(p) if !p.is_empty() && p.len() <= 15 && !p.contains('/') => {
                    Some(Probe::Process(p.into()))
                }
                Some(p) => {
                    e.push(
                        at("process"),
                        format!(
                            "{p:?}: the program's absolute path (e.g. \"/usr/sbin/nginx\": \
                             only a process running that file counts), or a process name as \
                             /proc/PID/comm shows it (1 to 15 characters, e.g. \"nginx\": any \
                             user's process of that name counts)"
                        ),
                    );
                    None
                }
                None => {
                    needs(e, "process", "process = \"nginx\"");
                    None
                }
            },
            "systemd" => match c.unit.as_deref() {
                Some(u) if !u.is_empty() => Some(Probe::Systemd(u.into())),
                _ => {
                    needs(e, "unit", "unit = \"nginx.service\"");
                    None
                }
            },
            "command" => match &c.command {
                Some(cmd) if !cmd.is_empty() && !cmd[0].is_empty() => {
                    Some(Probe::Command(cmd.clone()))
                }
                _ => {
                    needs(
                        e,
                        "command",
                        "command = [\"/usr/local/bin/check\", \"--quick\"] (exit 0 = healthy)",
                    );
                    None
                }
            },
            other => {
                e.push(
                    at("kind"),
                    format!(
                        "{other:?} is not a check kind: use \"tcp\", \"http\", \"process\", \
                         \"systemd\" or \"command\""
                    ),
                );
                None
            }
        };
        if !(100..=3_600_000).contains(&c.interval_ms) {
            e.push(
                at("interval_ms"),
                format!(
                    "{} is out of range: allowed 100 to 3600000 (milliseconds)",
                    c.interval_ms
                ),
            );
        }
        let timeout_ms = c.timeout_ms.unwrap_or((c.interval_ms * 4 / 5).max(50));
        if timeout_ms == 0 || timeout_ms > c.interval_ms {
            e.push(
                at("timeout_ms"),
                format!(
                    "{timeout_ms} must be at least 1 and at most interval_ms ({}): a check \
                     must end before the next one starts",
                    c.interval_ms
                ),
            );
        }
        for (field, v) in [("rise", c.rise), ("fall", c.fall)] {
            if !(1..=100).contains(&v) {
                e.push(at(field), format!("{v} is out of range: allowed 1 to 100"));
            }
        }
        let name = c
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-{}", c.kind, i + 1));
        if !valid_id(&name) {
            e.push(at("name"), format!("{name:?} {ID_RULE}"));
        }
        if !names.insert(name.clone()) {
            e.push(at("name"), format!("{name:?} is used by another check"));
        }
        if let Some(probe) = probe {
            checks.push(Check {
                name,
                probe,
                interval: Duration::from_millis(c.interval_ms),
                timeout: Duration::from_millis(timeout_ms),
                rise: c.rise,
                fall: c.fall,
            });
        }
    }
    checks
}

const ID_RULE: &str =
    "must be 1 to 63 characters from a-z, A-Z, 0-9, '-', '_' and '.', e.g. \"web1\"";

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return None;
        }
        mac[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

pub fn format_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

fn parse_ports(p: &RawPorts) -> Option<(u16, u16)> {
    let port = |n: i64| u16::try_from(n).ok().filter(|&n| n > 0);
    match p {
        RawPorts::One(n) => port(*n).map(|n| (n, n)),
        RawPorts::Text(t) => {
            let (lo, hi) = match t.split_once('-') {
                Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
                None => {
                    let n = t.trim().parse().ok()?;
                    (n, n)
                }
            };
            let (lo, hi) = (port(lo)?, port(hi)?);
            (lo <= hi).then_some((lo, hi))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
id = "web1"
interface = "eth0"

[cluster]
secret_file = "/etc/farm/cluster.key"

[[cluster.members]]
id = "web2"
address = "192.0.2.12"

[[cluster.members]]
id = "web1"
address = "192.0.2.11"
weight = 2

[[vip]]
address = "192.0.2.100"
rules = [ { protocol = "tcp", ports = 80 }, { protocol = "udp", ports = "5000-5100", affinity = "connection" } ]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    fn field_errors(text: &str) -> Vec<FieldError> {
        match parse(text) {
            Err(ConfigError::Invalid { errors, .. }) => errors,
            other => panic!("expected field errors, got {other:?}"),
        }
    }

    #[test]
    fn rules_read_as_written() {
        let r = |protocols, port_lo, port_hi, affinity| Rule {
            protocols,
            port_lo,
            port_hi,
            affinity,
        };
        assert_eq!(
            r(proto_mask::TCP, 80, 80, affinity::CLIENT).to_string(),
            "tcp/80 client"
        );
        assert_eq!(
            r(
                proto_mask::TCP | proto_mask::UDP,
                5000,
                5100,
                affinity::CONNECTION
            )
            .to_string(),
            "tcp+udp/5000-5100 connection"
        );
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.members[0].id, "web1", "members are sorted by id");
        assert_eq!(c.me, 0);
        assert_eq!(c.me().weight, 2);
        assert_eq!(c.members[1].weight, 1, "weight defaults to 1");
        assert_eq!(c.mac_mode, MacMode::Unicast);
        assert_eq!(c.deadman_timeout, Duration::from_millis(300));
        assert_eq!(c.heartbeat.loss_window(), Duration::from_millis(400));
        assert_eq!(c.members[0].heartbeat_addrs, vec![c.members[0].address]);
        assert_eq!(c.vips[0].rules[1].affinity, affinity::CONNECTION);
        assert_eq!(
            (c.vips[0].rules[1].port_lo, c.vips[0].rules[1].port_hi),
            (5000, 5100)
        );
        assert_eq!(c.socket, Path::new(DEFAULT_SOCKET));
    }

    #[test]
    fn mirror_group_mistakes_are_named_with_the_fix() {
        let vip = parse(GOOD).unwrap().vips[0].address;
        let ok = format!(
            "{GOOD}\n[mirror]\nmembers = [\"web1\", \"web2\"]\nvip = \"{vip}\"\n\
             directory = \"/srv/data\"\nbacking = \"/var/lib/farm/data\"\n\
             start_primary = \"systemctl start app\"\nstop_primary = \"systemctl stop app\"\n"
        );
        let c = parse(&ok).unwrap();
        let m = c.mirror.expect("mirror group");
        assert_eq!(m.preferred, m.members[0], "the first member is preferred");
        assert_eq!(m.failover_after, Duration::from_secs(3));
        assert_eq!(m.address(1).ip(), c.members[1].address);
        let bad = ok
            .replace("\"web2\"]", "\"web9\"]")
            .replace(&format!("vip = \"{vip}\""), "vip = \"198.51.100.1\"")
            .replace("/var/lib/farm/data", "/srv/data/copy")
            .replace(
                "stop_primary = \"systemctl stop app\"",
                "stop_primary = \" \"",
            )
            + "failover_after_ms = 100\nfailback = \"sometimes\"\n";
        let errors = field_errors(&bad);
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "mirror.members[1]",
            "mirror.vip",
            "mirror.backing",
            "mirror.stop_primary",
            "mirror.failover_after_ms",
            "mirror.failback",
        ] {
            assert!(fields.contains(&f), "{f} not named: {errors:#?}");
        }
        let vip_error = errors.iter().find(|e| e.field == "mirror.vip").unwrap();
        assert!(
            vip_error.message.contains("add it as a [[vip]]"),
            "{vip_error:?}"
        );
    }

    #[test]
    fn every_mistake_is_named() {
        let bad = GOOD
            .replace("id = \"web1\"\ninterface", "id = \"web 1\"\ninterface")
            .replace("weight = 2", "weight = 5000")
            .replace("ports = 80", "ports = 70000")
            .replace("affinity = \"connection\"", "affinity = \"sticky\"")
            .replace("192.0.2.12", "192.0.2.300");
        let errors = field_errors(&bad);
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "node.id",
            "cluster.members[1].weight",
            "vip[0].rules[0].ports",
            "vip[0].rules[1].affinity",
            "cluster.members[0].address",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
        // Messages say what is allowed.
        let weight = errors.iter().find(|e| e.field.ends_with("weight")).unwrap();
        assert!(weight.message.contains("0 (standby) to 1000"), "{weight}");
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        let bad = GOOD.replace("weight = 2", "wieght = 2");
        match parse(&bad) {
            Err(ConfigError::Syntax { message, .. }) => {
                assert!(message.contains("wieght"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn node_must_be_a_member() {
        let bad = GOOD.replace("id = \"web1\"\naddress", "id = \"web3\"\naddress");
        let errors = field_errors(&bad);
        assert!(
            errors
                .iter()
                .any(|e| e.field == "node.id" && e.message.contains("web2"))
        );
    }

    #[test]
    fn overlapping_rules_and_mac_mode_mismatch() {
        let bad = GOOD
            .replace(
                "{ protocol = \"udp\", ports = \"5000-5100\"",
                "{ protocol = \"both\", ports = \"79-81\"",
            )
            .replace(
                "secret_file = \"/etc/farm/cluster.key\"",
                "secret_file = \"/etc/farm/cluster.key\"\ncluster_mac = \"03:00:00:00:00:01\"",
            );
        let errors = field_errors(&bad);
        assert!(errors.iter().any(|e| e.field == "vip[0].rules[1].ports"));
        assert!(errors.iter().any(|e| e.field == "cluster.cluster_mac"));
    }

    #[test]
    fn ports_forms() {
        assert_eq!(parse_ports(&RawPorts::One(443)), Some((443, 443)));
        assert_eq!(
            parse_ports(&RawPorts::Text("1-65535".into())),
            Some((1, 65535))
        );
        assert_eq!(parse_ports(&RawPorts::Text("90-80".into())), None);
        assert_eq!(parse_ports(&RawPorts::One(0)), None);
        assert_eq!(parse_mac("02:fa:00:00:00:01"), Some([2, 0xfa, 0, 0, 0, 1]));
        assert_eq!(parse_mac("02:fa:00:00:00"), None);
    }

    #[test]
    fn heartbeat_settings_and_deadman_rule() {
        let bad = GOOD.replace(
            "secret_file = \"/etc/farm/cluster.key\"",
            "secret_file = \"/etc/farm/cluster.key\"\ndeadman_timeout_ms = 1000\nwitness = \"nowhere\"",
        ) + "\n[heartbeat]\ninterval_ms = 5\n";
        let errors = field_errors(&bad);
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"heartbeat.interval_ms"), "{fields:?}");
        assert!(fields.contains(&"cluster.witness"), "{fields:?}");
        let ok = GOOD.to_string() + "\n[heartbeat]\ninterval_ms = 100\nloss_threshold = 3\n";
        assert_eq!(
            parse(&ok).unwrap().heartbeat.loss_window(),
            Duration::from_millis(300)
        );
        let slow_deadman = GOOD.replace(
            "secret_file = \"/etc/farm/cluster.key\"",
            "secret_file = \"/etc/farm/cluster.key\"\ndeadman_timeout_ms = 500",
        );
        let errors = field_errors(&slow_deadman);
        assert!(
            errors
                .iter()
                .any(|e| e.field == "cluster.deadman_timeout_ms" && e.message.contains("400")),
            "{errors:?}"
        );
        let uneven = GOOD.replace(
            "address = \"192.0.2.12\"",
            "address = \"192.0.2.12\"\nheartbeat_addresses = [\"198.51.100.12\"]",
        );
        let errors = field_errors(&uneven);
        assert!(
            errors
                .iter()
                .any(|e| e.field.ends_with("heartbeat_addresses")),
            "{errors:?}"
        );
    }

    #[test]
    fn health_checks_are_validated_field_by_field() {
        let good = format!(
            "{GOOD}\n[[check]]\nname = \"nginx\"\nkind = \"http\"\nurl = \"http://127.0.0.1/health\"\n\
             interval_ms = 500\n\n[[check]]\nkind = \"process\"\nprocess = \"nginx\"\n"
        );
        let c = parse(&good).unwrap();
        assert_eq!(c.checks.len(), 2);
        assert_eq!(
            c.checks[0].timeout,
            Duration::from_millis(400),
            "4/5 of the interval"
        );
        assert_eq!((c.checks[0].rise, c.checks[0].fall), (2, 3));
        assert_eq!(c.checks[1].name, "process-2");
        assert_eq!(c.max_health_moves_per_minute, 4);
        let bad = format!(
            "{GOOD}\n[[check]]\nkind = \"http\"\nurl = \"ftp://x\"\n\n[[check]]\nkind = \"tcp\"\n\n\
             [[check]]\nkind = \"ping\"\n\n[[check]]\nkind = \"command\"\ncommand = [\"true\"]\n\
             interval_ms = 1000\ntimeout_ms = 2000\nrise = 0\n\n[health]\nmax_moves_per_minute = 1\n"
        );
        let fields: Vec<String> = field_errors(&bad).into_iter().map(|e| e.field).collect();
        for f in [
            "check[0].url",
            "check[1].address",
            "check[2].kind",
            "check[3].timeout_ms",
            "check[3].rise",
            "health.max_moves_per_minute",
        ] {
            assert!(
                fields.iter().any(|x| x == f),
                "{f} not reported: {fields:?}"
            );
        }
    }
}
