//! A farm on one machine: switch, nodes running farmd and servers, a client with many addresses.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use farm_daemon::{
    control::{self, Request, Response, Status, WhoisEntry},
    dataplane::Dataplane,
};

use crate::{
    bin,
    netns::{self, Netns},
    traffic::{self, Server, TcpAnswer},
};

pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 100);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 0x100);
/// TCP port with `client` affinity.
pub const TCP_PORT: u16 = 80;
/// TCP port with `connection` affinity.
pub const TCP_CONN_PORT: u16 = 8080;
/// UDP port with `client` affinity.
pub const UDP_PORT: u16 = 53;

/// What to build.
#[derive(Debug, Clone)]
pub struct Spec {
    pub nodes: usize,
    /// Client source addresses per family.
    pub client_addrs: usize,
    pub mac_mode: &'static str,
    pub deadman_ms: u64,
    /// Weight of each node (defaults to 1).
    pub weights: Vec<u32>,
    /// The cluster key; random when `None`.
    pub secret: Option<[u8; 32]>,
    /// The servers close each TCP connection cleanly after this many requests (as NGINX's
    /// `keepalive_requests`); `None` keeps connections as long as clients hold them.
    pub keepalive_requests: Option<u64>,
    /// Extra configuration appended to every node's config (e.g. a `[handover]` section).
    pub extra_config: String,
    /// Start the test servers (TCP 80 and 8080, UDP 53, answering with the node's name) on
    /// every node; off when the caller runs its own (the demo runs NGINX).
    pub test_servers: bool,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            nodes: 3,
            client_addrs: 16,
            mac_mode: "unicast",
            deadman_ms: 300,
            weights: Vec::new(),
            secret: None,
            keepalive_requests: None,
            extra_config: String::new(),
            test_servers: true,
        }
    }
}

pub struct Node {
    /// `n1`, `n2`, ...
    pub name: String,
    pub ns: Netns,
    pub addr4: Ipv4Addr,
    pub addr6: Ipv6Addr,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub farmd: Option<Child>,
    pub server: Option<Server>,
    /// The farmd binary this node runs (another build's, for upgrades); this build's when
    /// `None`.
    pub binary: Option<PathBuf>,
    /// The pid of a farmd that took over from `farmd` by an in-place upgrade: it was the old
    /// farmd's child and is this process's now (a child subreaper, see `Topology::build`).
    pub adopted: Option<u32>,
}

pub struct Topology {
    pub stem: String,
    pub dir: PathBuf,
    pub spec: Spec,
    // Field order is drop order: processes and servers before namespaces.
    pub nodes: Vec<Node>,
    pub client: Netns,
    pub client_v4: Vec<Ipv4Addr>,
    pub client_v6: Vec<Ipv6Addr>,
    switch_xdp: Option<Dataplane>,
    pub switch: Netns,
    /// The nodes listed as members in the configs (all when `None`).
    pub members: Option<Vec<usize>>,
    /// Held for the topology's life, dropped last: the system tests of one test binary take
    /// turns, so that their timings are not those of six farms sharing two cores.
    _serial: std::sync::MutexGuard<'static, ()>,
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn node_addr4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, 0, 11 + i as u8)
}
pub fn node_addr6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 0x11 + i as u16)
}
pub fn client_addr4(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, 4 + (k / 250) as u8, 1 + (k % 250) as u8)
}
pub fn client_addr6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 4, 1 + k as u16)
}

impl Topology {
    /// Builds switch, nodes and client, and starts the servers (not farmd).
    pub fn build(spec: Spec) -> Self {
        // A test that panicked while holding the lock poisons it; the next one may still run.
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        netns::remove_stale();
        let stem = netns::unique_stem();
        let dir = std::env::temp_dir().join(format!("farm-test-{stem}"));
        std::fs::create_dir_all(&dir).expect("test dir");
        let key = dir.join("cluster.key");
        let secret = spec.secret.unwrap_or_else(|| {
            let mut s = [0u8; 32];
            getrandom(&mut s);
            s
        });
        std::fs::write(&key, secret).expect("key");
        set_mode(&key, 0o600);

        let switch = Netns::new(format!("{stem}-sw"));
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        let client = Netns::new(format!("{stem}-c1"));
        plug(&switch, &client, "c1");

        let mut nodes = Vec::new();
        for i in 0..spec.nodes {
            let name = format!("n{}", i + 1);
            let ns = Netns::new(format!("{stem}-{name}"));
            plug(&switch, &ns, &name);
            let (addr4, addr6) = (node_addr4(i), node_addr6(i));
            ns.ip(&["addr", "add", &format!("{addr4}/16"), "dev", "eth0"]);
            ns.ip(&[
                "addr",
                "add",
                &format!("{addr6}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            nodes.push(Node {
                config: dir.join(format!("{name}.toml")),
                socket: dir.join(format!("{name}.sock")),
                log: dir.join(format!("{name}.log")),
                name,
                ns,
                addr4,
                addr6,
                farmd: None,
                binary: None,
                adopted: None,
                server: None,
            });
        }

        let client_v4: Vec<Ipv4Addr> = (0..spec.client_addrs).map(client_addr4).collect();
        let client_v6: Vec<Ipv6Addr> = (0..spec.client_addrs).map(client_addr6).collect();
        let mut lines = Vec::new();
        for a in &client_v4 {
            lines.push(format!("addr add {a}/16 dev eth0"));
        }
        for a in &client_v6 {
            lines.push(format!("addr add {a}/64 dev eth0 nodad"));
        }
        client.ip_batch(&lines);

        // XDP_TX frames of a node's native-mode program are only received by the switch port if
        // that veth has an XDP program too: give every switch port an XDP_PASS program.
        let ports: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
        let switch_xdp = switch.run(move || {
            let mut dp = Dataplane::load().expect("load eBPF object for the switch");
            for p in &ports {
                dp.empty_program()
                    .attach(p, aya::programs::XdpMode::Driver)
                    .expect("XDP_PASS on switch port");
            }
            dp
        });

        let mut t = Self {
            stem,
            dir,
            spec,
            nodes,
            client,
            client_v4,
            client_v6,
            switch_xdp: Some(switch_xdp),
            switch,
            members: None,
            _serial: serial,
        };
        for i in 0..t.nodes.len() {
            std::fs::write(&t.nodes[i].config, t.config_for(i, &t.vip_section()))
                .expect("write config");
            if !t.spec.test_servers {
                continue;
            }
            let name = t.nodes[i].name.clone();
            t.nodes[i].server = Some(Server::start_with(
                &t.nodes[i].ns,
                &name,
                &[TCP_PORT, TCP_CONN_PORT],
                &[UDP_PORT],
                t.spec.keepalive_requests,
            ));
        }
        t
    }

    /// Makes `witness` the witness in every member's config (before farmd starts).
    pub fn set_witness(&self, witness: Ipv4Addr) {
        for n in &self.nodes {
            let cfg = std::fs::read_to_string(&n.config).expect("config").replace(
                "[cluster]\n",
                &format!("[cluster]\nwitness = \"{witness}\"\n"),
            );
            std::fs::write(&n.config, cfg).expect("config");
        }
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.join("cluster.key")
    }

    /// The `[[vip]]` sections every node gets.
    pub fn vip_section(&self) -> String {
        format!(
            r#"
[[vip]]
address = "{VIP4}"
rules = [
  {{ protocol = "tcp", ports = {TCP_PORT} }},
  {{ protocol = "tcp", ports = {TCP_CONN_PORT}, affinity = "connection" }},
  {{ protocol = "udp", ports = {UDP_PORT} }},
]

[[vip]]
address = "{VIP6}"
rules = [
  {{ protocol = "tcp", ports = {TCP_PORT} }},
  {{ protocol = "tcp", ports = {TCP_CONN_PORT}, affinity = "connection" }},
  {{ protocol = "udp", ports = {UDP_PORT} }},
]
"#
        )
    }

    /// The full configuration of node `i` with the given VIP sections.
    pub fn config_for(&self, i: usize, vips: &str) -> String {
        let n = &self.nodes[i];
        let mut s = format!(
            r#"[node]
id = "{}"
interface = "eth0"

[cluster]
secret_file = "{}"
mac_mode = "{}"
deadman_timeout_ms = {}
"#,
            n.name,
            self.key_file().display(),
            self.spec.mac_mode,
            self.spec.deadman_ms
        );
        for (j, m) in self.nodes.iter().enumerate() {
            if self.members.as_ref().is_some_and(|l| !l.contains(&j)) {
                continue;
            }
            let w = self.spec.weights.get(j).copied().unwrap_or(1);
            let _ = write!(
                s,
                "\n[[cluster.members]]\nid = \"{}\"\naddress = \"{}\"\nweight = {w}\n",
                m.name, m.addr4
            );
        }
        s.push_str(vips);
        s.push_str(&self.spec.extra_config);
        let _ = write!(
            s,
            "\n[control]\nsocket = \"{}\"\n\n[runtime]\nstate_dir = \"{}\"\n",
            n.socket.display(),
            self.dir.join(format!("{}-state", n.name)).display()
        );
        s
    }

    /// Web-like load on the IPv4 VIP: keep-alive connections from the first `keepalive` client
    /// addresses, new connections from the rest (`threads` threads, `pause` between
    /// connections).
    pub fn web_load(
        &self,
        keepalive: usize,
        threads: usize,
        pause: Duration,
    ) -> (crate::traffic::KeepAlives, crate::traffic::NewConnections) {
        let clients = self.clients4();
        let vip = self.vip4(TCP_PORT);
        (
            crate::traffic::KeepAlives::start(&self.client, &clients[..keepalive], vip),
            crate::traffic::NewConnections::start(
                &self.client,
                &clients[keepalive..],
                vip,
                threads,
                pause,
            ),
        )
    }

    /// Lists only `members` in every node's config (rewritten now; a running farmd reads it on
    /// `farmctl reload`).
    pub fn set_members(&mut self, members: &[usize]) {
        self.members = Some(members.to_vec());
        for i in 0..self.nodes.len() {
            std::fs::write(
                &self.nodes[i].config,
                self.config_for(i, &self.vip_section()),
            )
            .expect("write config");
        }
    }

    /// The owner (member id) of every bucket, as node `i` serves them.
    pub fn bucket_owners(&self, i: usize) -> Vec<Option<String>> {
        match control::request(
            &self.nodes[i].socket,
            &Request::Buckets { bucket: None },
            Duration::from_secs(5),
        ) {
            Ok(Response::Buckets(r)) => r
                .owners
                .iter()
                .map(|o| o.map(|k| r.members[k as usize].id.clone()))
                .collect(),
            other => panic!("buckets of {}: {other:?}", self.nodes[i].name),
        }
    }

    /// The opening of most system tests: root checked (see `require_root`: `None` when the
    /// test is to be skipped), the topology built, every farmd started and the farm converged.
    pub fn started(test: &str, spec: Spec) -> Option<Self> {
        if !crate::require_root(test) {
            return None;
        }
        let mut t = Self::build(spec);
        t.start_all();
        Some(t)
    }

    /// Starts farmd on node `i` and waits until it serves.
    pub fn start_farmd(&mut self, i: usize) {
        let child = self.spawn_farmd(i, &self.nodes[i].config.clone());
        self.nodes[i].farmd = Some(child);
        self.wait_serving(i, Duration::from_secs(30));
    }

    /// Starts farmd everywhere and waits until the farm has converged.
    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start_farmd(i);
        }
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.wait_converged(&all, Duration::from_secs(20));
    }

    /// Waits (bounded) until every node in `nodes` sees exactly those nodes serving, with the
    /// same view.
    pub fn wait_converged(&self, nodes: &[usize], within: Duration) {
        let deadline = Instant::now() + within;
        let want: Vec<String> = nodes.iter().map(|&i| self.nodes[i].name.clone()).collect();
        loop {
            let statuses: Vec<Result<Status, String>> =
                nodes.iter().map(|&i| self.status(i)).collect();
            let converged = statuses.iter().all(|s| {
                s.as_ref().is_ok_and(|s| {
                    let serving: Vec<String> = s
                        .members
                        .iter()
                        .filter(|m| m.state == "serving")
                        .map(|m| m.id.clone())
                        .collect();
                    serving == want && s.handover.is_none()
                })
            }) && statuses
                .iter()
                .filter_map(|s| s.as_ref().ok().map(|s| s.view_digest.clone()))
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                == 1;
            if converged {
                return;
            }
            if Instant::now() > deadline {
                let summary: Vec<String> = statuses
                    .iter()
                    .map(|s| match s {
                        Ok(s) => format!(
                            "{}: {:?}",
                            s.node,
                            s.members
                                .iter()
                                .map(|m| (&m.id, &m.state))
                                .collect::<Vec<_>>()
                        ),
                        Err(e) => e.clone(),
                    })
                    .collect();
                panic!("farm did not converge on {want:?} within {within:?}: {summary:#?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Spawns farmd on node `i` with `config` (output appended to the node's log).
    pub fn spawn_farmd(&self, i: usize, config: &Path) -> Child {
        let n = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .expect("log file");
        let farmd = n.binary.clone().unwrap_or_else(|| bin("farmd"));
        n.ns.command(&farmd)
            .arg("--config")
            .arg(config)
            .arg("--log")
            .arg("info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn farmd")
    }

    /// Waits (bounded) until node `i`'s farmd reports that it serves.
    pub fn wait_serving(&mut self, i: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(child) = self.nodes[i].farmd.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "farmd on {} exited ({status}) before serving:\n{}",
                    self.nodes[i].name,
                    self.log(i)
                );
            }
            if let Ok(s) = self.status(i)
                && s.serving
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "farmd on {} did not serve within {within:?}:\n{}",
                self.nodes[i].name,
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    pub fn status(&self, i: usize) -> Result<Status, String> {
        match control::request(
            &self.nodes[i].socket,
            &Request::Status,
            Duration::from_secs(5),
        ) {
            Ok(Response::Status(s)) => Ok(*s),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Node `i`'s entry for itself in its status.
    pub fn own_member(&self, i: usize) -> farm_daemon::control::MemberStatus {
        self.status(i)
            .expect("status")
            .members
            .into_iter()
            .find(|m| m.this_node)
            .expect("this node in status")
    }

    /// Waits (bounded) until node `i` reports `state` for itself and, with `owns_nothing`,
    /// holds no bucket; returns how long it took.
    pub fn wait_own_state(
        &self,
        i: usize,
        state: &str,
        owns_nothing: bool,
        within: Duration,
    ) -> Duration {
        let start = Instant::now();
        loop {
            let s = self.status(i).expect("status");
            let me = s.members.iter().find(|m| m.this_node).expect("this node");
            if me.state == state && (!owns_nothing || me.buckets == 0) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "{} is {} with {} buckets, not {state} within {within:?}; handover {:?}, \
                 queued {:?}, checks failing {:?}",
                self.nodes[i].name,
                me.state,
                me.buckets,
                s.handover,
                s.queued,
                s.checks_failing
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `farmctl whois --json` on node `i`, for many clients at once.
    pub fn whois(&self, i: usize, clients: &[String]) -> Vec<WhoisEntry> {
        let mut args = vec!["--json", "whois"];
        args.extend(clients.iter().map(String::as_str));
        let out = self.farmctl(i, &args);
        assert!(
            out.status.success(),
            "farmctl whois failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("farmctl whois --json output")
    }

    /// Owner of each client (client affinity) as `farmctl whois` on node `from` predicts it.
    pub fn owners(
        &self,
        from: usize,
        clients: &[IpAddr],
    ) -> std::collections::BTreeMap<IpAddr, String> {
        let names: Vec<String> = clients.iter().map(|c| c.to_string()).collect();
        self.whois(from, &names)
            .into_iter()
            .map(|w| {
                let owner = w
                    .by_client
                    .and_then(|p| p.owner)
                    .unwrap_or_else(|| panic!("no owner for {}", w.client));
                (w.client.parse().expect("client address"), owner)
            })
            .collect()
    }

    /// The client's IPv4 addresses that node `node` serves, and (at most `others`) that it does
    /// not, per `farmctl whois` on node 0.
    pub fn clients_of(&self, node: &str, others: usize) -> (Vec<IpAddr>, Vec<IpAddr>) {
        let owners = self.owners(0, &self.clients4());
        let mine = owners
            .iter()
            .filter(|(_, o)| *o == node)
            .map(|(a, _)| *a)
            .collect();
        let rest = owners
            .iter()
            .filter(|(_, o)| *o != node)
            .map(|(a, _)| *a)
            .take(others)
            .collect();
        (mine, rest)
    }

    /// One request from each of `sources` to the IPv4 VIP's TCP port (4 at a time, 700 ms
    /// each): who answered.
    pub fn ask_vip4(&self, sources: &[IpAddr]) -> Vec<TcpAnswer> {
        let reqs = sources.iter().map(|&s| (s, self.vip4(TCP_PORT))).collect();
        traffic::tcp_requests(&self.client, reqs, 4, Duration::from_millis(700))
    }

    /// Waits (bounded) until every one of `clients` is answered by a node other than `node`:
    /// the others have taken over what `node` served.
    pub fn wait_served_without(&self, node: &str, clients: &[IpAddr], within: Duration) {
        crate::wait_until(
            &format!("the others serve {node}'s clients"),
            within,
            Duration::from_millis(50),
            || {
                self.ask_vip4(clients)
                    .iter()
                    .all(|a| a.node.as_deref().is_some_and(|n| n != node))
                    .then_some(())
            },
        );
    }

    /// The client's IPv4 addresses, as `IpAddr`.
    pub fn clients4(&self) -> Vec<IpAddr> {
        self.client_v4.iter().map(|&a| IpAddr::V4(a)).collect()
    }

    /// TCP connections the nodes' servers have accepted so far.
    pub fn tcp_accepts(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| {
                n.server.as_ref().map_or(0, |s| {
                    s.tcp_accepts.load(std::sync::atomic::Ordering::Relaxed)
                })
            })
            .sum()
    }

    /// Sends a signal to node `i`'s farmd; for SIGTERM/SIGINT waits (bounded) for it to exit
    /// and returns its exit status.
    pub fn signal_farmd(&mut self, i: usize, sig: i32) -> Option<std::process::ExitStatus> {
        if self.nodes[i].farmd.is_none()
            && let Some(pid) = self.nodes[i].adopted
        {
            // SAFETY: kill(2) on a process this one reaps.
            unsafe { libc::kill(pid as i32, sig) };
            if sig == libc::SIGKILL || sig == libc::SIGTERM || sig == libc::SIGINT {
                let st = reap(pid, Duration::from_secs(15)).unwrap_or_else(|| {
                    panic!(
                        "farmd on {} did not exit after signal {sig}",
                        self.nodes[i].name
                    )
                });
                self.nodes[i].adopted = None;
                return Some(st);
            }
            return None;
        }
        let child = self.nodes[i].farmd.as_mut()?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.nodes[i].farmd = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                panic!(
                    "farmd on {} did not exit after signal {sig}",
                    self.nodes[i].name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The farmd process of node `i`: the one started here, or the one that took over from it.
    pub fn farmd_pid(&self, i: usize) -> Option<u32> {
        self.nodes[i]
            .farmd
            .as_ref()
            .map(|c| c.id())
            .or(self.nodes[i].adopted)
    }

    /// `farmctl upgrade [--binary B]` on node `i`: on success, waits (bounded) until the old
    /// farmd has exited and tracks the new one; returns farmctl's output either way.
    pub fn upgrade_farmd(&mut self, i: usize, binary: Option<&Path>) -> std::process::Output {
        let old = self.farmd_pid(i).expect("farmd runs");
        let mut args = vec!["upgrade".to_string()];
        if let Some(b) = binary {
            args.push("--binary".into());
            args.push(b.display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // The new farmd is the old farmd's child: once that one exits, it must be ours (to
        // signal, reap and clean up), not init's. Only for tests that upgrade: a subreaper also
        // inherits every other orphan (an application a mirror hook started with `&`), and a
        // killed orphan left unreaped would look alive to the hooks' `kill -0` loops.
        // SAFETY: prctl with an integer argument.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let out = self.farmctl(i, &args);
        if !out.status.success() {
            return out;
        }
        let status = match self.nodes[i].farmd.as_mut() {
            Some(child) => {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    if let Ok(Some(st)) = child.try_wait() {
                        break st;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "the old farmd ({old}) on {} did not exit after the upgrade",
                        self.nodes[i].name
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            None => reap(old, Duration::from_secs(10)).unwrap_or_else(|| {
                panic!(
                    "the old farmd ({old}) on {} did not exit after the upgrade",
                    self.nodes[i].name
                )
            }),
        };
        assert!(status.success(), "the old farmd exited with {status}");
        self.nodes[i].farmd = None;
        let new = self
            .status(i)
            .unwrap_or_else(|e| panic!("status after the upgrade: {e}"))
            .pid;
        assert_ne!(new, old, "the same farmd answers after the upgrade");
        self.nodes[i].adopted = Some(new);
        out
    }

    /// Runs `farmctl --socket <node i's socket> ARGS...` and returns its output.
    pub fn farmctl(&self, i: usize, args: &[&str]) -> std::process::Output {
        std::process::Command::new(bin("farmctl"))
            .arg("--socket")
            .arg(&self.nodes[i].socket)
            .args(args)
            .output()
            .expect("farmctl")
    }

    /// Accepted TCP connections of node `i`'s server so far.
    pub fn node_accepts(&self, i: usize) -> u64 {
        self.nodes[i].server.as_ref().map_or(0, |s| {
            s.tcp_accepts.load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    /// Node `i`'s own MAC on eth0.
    pub fn node_mac(&self, i: usize) -> [u8; 6] {
        let out = self.nodes[i]
            .ns
            .ip_out(&["-br", "link", "show", "dev", "eth0"]);
        let mac = out
            .split_whitespace()
            .find(|w| w.len() == 17 && w.matches(':').count() == 5)
            .unwrap_or_else(|| panic!("no MAC in {out}"));
        parse_mac(mac)
    }

    /// The farm's cluster MAC, as node 0 reports it.
    pub fn cluster_mac(&self) -> [u8; 6] {
        parse_mac(&self.status(0).expect("status").cluster_mac)
    }

    /// The bpffs directory where node `i`'s farmd pins its links.
    pub fn pin_dir(&self, i: usize) -> PathBuf {
        PathBuf::from("/sys/fs/bpf/farm").join(format!("{}-eth0", self.nodes[i].ns.inode()))
    }

    /// Loads an nftables ruleset (text for `nft -f -`) in node `i`'s namespace.
    pub fn nft(&self, i: usize, rules: &str) {
        use std::io::Write as _;
        let mut c = std::process::Command::new("nsenter")
            .arg(format!("--net={}", self.nodes[i].ns.path()))
            .args(["nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft (cargo xtask setup installs nftables)");
        c.stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("write rules");
        assert!(c.wait().expect("nft").success(), "nft rejected:\n{rules}");
    }

    /// Scrapes node `i`'s metrics endpoint (127.0.0.1:9464 inside its namespace): value of each
    /// sample line, keyed by the series (name and labels).
    pub fn metrics(&self, i: usize) -> std::collections::BTreeMap<String, f64> {
        let text = self.nodes[i].ns.run(|| {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect("127.0.0.1:9464").expect("metrics endpoint");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .expect("request");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("response");
            out
        });
        let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("text/plain; version=0.0.4"), "{head}");
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, v) = l.rsplit_once(' ').expect("sample line");
                (series.to_string(), v.parse().expect("sample value"))
            })
            .collect()
    }

    pub fn vip4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(VIP4), port)
    }
    pub fn vip6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(VIP6), port)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for i in 0..self.nodes.len() {
            if let Some(mut c) = self.nodes[i].farmd.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            if let Some(pid) = self.nodes[i].adopted.take() {
                // SAFETY: kill(2) on a process this one reaps.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                let _ = reap(pid, Duration::from_secs(5));
                // The next test (same process) is no subreaper unless it upgrades too.
                // SAFETY: prctl with an integer argument.
                unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) };
            }
            // FARM_TEST_LOGS=1 prints every farmd's log even when the test passed.
            if panicking || std::env::var_os("FARM_TEST_LOGS").is_some() {
                eprintln!(
                    "----- farmd log of {} -----\n{}",
                    self.nodes[i].name,
                    self.log(i)
                );
            }
            self.nodes[i].server = None;
            let _ = std::fs::remove_dir_all(self.pin_dir(i));
        }
        self.switch_xdp = None;
        // Namespaces are removed by their own Drop (nodes, client, switch).
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits (bounded) for `pid`, a child of this process (directly or as its subreaper), to exit
/// and reaps it.
fn reap(pid: u32, within: Duration) -> Option<std::process::ExitStatus> {
    use std::os::unix::process::ExitStatusExt as _;
    let deadline = Instant::now() + within;
    loop {
        let mut st = 0;
        // SAFETY: waitpid on a pid with a valid out pointer.
        let r = unsafe { libc::waitpid(pid as i32, &mut st, libc::WNOHANG) };
        if r == pid as i32 {
            return Some(std::process::ExitStatus::from_raw(st));
        }
        if r < 0 {
            // Not our child (no subreaper): wait for it to be gone.
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return Some(std::process::ExitStatus::from_raw(0));
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Connects `host` to the switch: `eth0` in the host, `port` on the bridge.
fn plug(switch: &Netns, host: &Netns, port: &str) {
    switch.ip(&[
        "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", &host.name,
    ]);
    switch.ip(&["link", "set", port, "master", "br0", "up"]);
    host.ip(&["link", "set", "eth0", "up"]);
}

/// "aa:bb:cc:dd:ee:ff" as bytes.
pub fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect();
    v.try_into().expect("6 bytes")
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("/dev/urandom");
}
