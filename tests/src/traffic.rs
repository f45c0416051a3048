//! Servers that answer with their node's name, and clients that use many source addresses.
//!
//! Server protocol: TCP: on accept, the server writes `<name>\n`; then every line the client
//! sends is answered with `<name> <line>\n` until the client closes (keep-alive). A server with
//! a keep-alive limit (as NGINX's `keepalive_requests`) answers the last request of a
//! connection with `<name> <line> close\n` and closes it cleanly, as an HTTP server's
//! `Connection: close` does; clients then reconnect. UDP: every datagram is answered with
//! `<name> <payload>`.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::Netns;

/// The servers of one node.
pub struct Server {
    stop: Arc<AtomicBool>,
    /// TCP connections accepted.
    pub tcp_accepts: Arc<AtomicU64>,
    /// UDP datagrams received.
    pub udp_datagrams: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

fn dual_stack(ty: Type, proto: Protocol, port: u16) -> Socket {
    let s = Socket::new(Domain::IPV6, ty, Some(proto)).expect("socket");
    s.set_only_v6(false).expect("dual stack");
    s.set_reuse_address(true).expect("reuseaddr");
    let addr: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, port).into();
    s.bind(&addr.into())
        .unwrap_or_else(|e| panic!("bind [::]:{port}: {e}"));
    s
}

impl Server {
    /// Starts TCP and UDP servers inside `ns`, answering as `name`; keep-alive connections are
    /// served for as long as the client holds them.
    pub fn start(ns: &Netns, name: &str, tcp_ports: &[u16], udp_ports: &[u16]) -> Self {
        Self::start_with(ns, name, tcp_ports, udp_ports, None)
    }

    /// As `start`, closing every TCP connection cleanly after `keepalive_requests` requests.
    pub fn start_with(
        ns: &Netns,
        name: &str,
        tcp_ports: &[u16],
        udp_ports: &[u16],
        keepalive_requests: Option<u64>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tcp_accepts = Arc::new(AtomicU64::new(0));
        let udp_datagrams = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for &port in tcp_ports {
            let (stop, count, name, ready) = (
                stop.clone(),
                tcp_accepts.clone(),
                name.to_string(),
                ready_tx.clone(),
            );
            threads.push(ns.spawn(move || {
                let s = dual_stack(Type::STREAM, Protocol::TCP, port);
                s.listen(1024).expect("listen");
                let l: TcpListener = s.into();
                l.set_nonblocking(true).expect("nonblocking");
                ready.send(()).expect("ready");
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((c, _)) => {
                            count.fetch_add(1, Ordering::Relaxed);
                            let name = name.clone();
                            let stop = stop.clone();
                            std::thread::spawn(move || {
                                serve_tcp(c, &name, &stop, keepalive_requests)
                            });
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(1))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
            }));
        }
        for &port in udp_ports {
            let (stop, count, name, ready) = (
                stop.clone(),
                udp_datagrams.clone(),
                name.to_string(),
                ready_tx.clone(),
            );
            threads.push(ns.spawn(move || {
                let u: UdpSocket = dual_stack(Type::DGRAM, Protocol::UDP, port).into();
                u.set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("timeout");
                ready.send(()).expect("ready");
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = u.recv_from(&mut buf) {
                        count.fetch_add(1, Ordering::Relaxed);
                        let mut reply = format!("{name} ").into_bytes();
                        reply.extend_from_slice(&buf[..n]);
                        let _ = u.send_to(&reply, from);
                    }
                }
            }));
        }
        for _ in 0..tcp_ports.len() + udp_ports.len() {
            ready_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("server did not start");
        }
        Self {
            stop,
            tcp_accepts,
            udp_datagrams,
            threads,
        }
    }
}

fn serve_tcp(c: TcpStream, name: &str, stop: &AtomicBool, limit: Option<u64>) {
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
    let mut w = match c.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    if w.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let mut r = BufReader::new(c);
    let mut line = String::new();
    let mut served = 0u64;
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                served += 1;
                if limit.is_some_and(|l| served >= l) {
                    // Last answer, then a clean close: FIN first, then read until the client
                    // closes too, so that nothing it sent meanwhile turns into a reset.
                    let _ = w.write_all(format!("{name} {} close\n", line.trim_end()).as_bytes());
                    let _ = w.shutdown(std::net::Shutdown::Write);
                    let deadline = Instant::now() + Duration::from_secs(5);
                    let mut sink = [0u8; 512];
                    while Instant::now() < deadline {
                        match r.get_mut().read(&mut sink) {
                            Ok(0) => return,
                            Ok(_) => {}
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => return,
                        }
                    }
                    return;
                }
                if w.write_all(format!("{name} {}", line).as_bytes()).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The outcome of one TCP request.
#[derive(Debug, Clone)]
pub struct TcpAnswer {
    pub src: IpAddr,
    pub dst: SocketAddr,
    /// The node that answered.
    pub node: Option<String>,
    pub error: Option<String>,
}

/// Opens a TCP connection from `src` (any port) to `dst` and reads the answering node's name.
pub fn tcp_request(src: IpAddr, dst: SocketAddr, timeout: Duration) -> TcpAnswer {
    tcp_request_from(SocketAddr::new(src, 0), dst, timeout)
}

/// A TCP connection from `from` (address, and port unless 0) to `dst`, with `timeout` for the
/// connect and for every read.
fn connect(from: SocketAddr, dst: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let domain = if dst.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&from.into())?;
    s.connect_timeout(&dst.into(), timeout)?;
    let c: TcpStream = s.into();
    c.set_read_timeout(Some(timeout))?;
    Ok(c)
}

impl TcpAnswer {
    /// The outcome of one attempt that reads a node's name (`empty`: the error when the name
    /// read is empty).
    fn of(src: IpAddr, dst: SocketAddr, attempt: std::io::Result<String>, empty: &str) -> Self {
        let (node, error) = match attempt {
            Ok(node) if !node.is_empty() => (Some(node), None),
            Ok(_) => (None, Some(empty.to_string())),
            Err(e) => (None, Some(e.to_string())),
        };
        TcpAnswer {
            src,
            dst,
            node,
            error,
        }
    }
}

/// Opens a TCP connection from `src` (address and port) to `dst` and reads the answer.
pub fn tcp_request_from(from: SocketAddr, dst: SocketAddr, timeout: Duration) -> TcpAnswer {
    let attempt = || -> std::io::Result<String> {
        let mut c = connect(from, dst, timeout)?;
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while buf.len() < 128 {
            let n = c.read(&mut byte)?;
            if n == 0 || byte[0] == b'\n' {
                break;
            }
            buf.push(byte[0]);
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    TcpAnswer::of(
        from.ip(),
        dst,
        attempt(),
        "connection closed without an answer",
    )
}

/// Sends `GET /` over a new connection from `src` to `dst` (a web server such as NGINX that
/// answers with the node's name as the body) and reads the answer.
pub fn http_get(src: IpAddr, dst: SocketAddr, timeout: Duration) -> TcpAnswer {
    let attempt = || -> std::io::Result<String> {
        let mut c = connect(SocketAddr::new(src, 0), dst, timeout)?;
        c.write_all(b"GET / HTTP/1.1\r\nHost: farm\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        c.read_to_string(&mut text)?;
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        if !head.starts_with("HTTP/1.1 200") {
            return Err(std::io::Error::other(format!(
                "answer: {}",
                head.lines().next().unwrap_or("")
            )));
        }
        Ok(body.trim().to_string())
    };
    TcpAnswer::of(src, dst, attempt(), "empty answer")
}

/// Runs `requests` (source, destination) inside `ns` on `threads` threads.
pub fn tcp_requests(
    ns: &Netns,
    requests: Vec<(IpAddr, SocketAddr)>,
    threads: usize,
    timeout: Duration,
) -> Vec<TcpAnswer> {
    let chunks: Vec<Vec<(IpAddr, SocketAddr)>> = {
        let per = requests.len().div_ceil(threads.max(1)).max(1);
        requests.chunks(per).map(|c| c.to_vec()).collect()
    };
    let handles: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            ns.spawn(move || {
                chunk
                    .into_iter()
                    .map(|(s, d)| tcp_request(s, d, timeout))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().expect("client thread"))
        .collect()
}

/// Replies to one UDP datagram.
#[derive(Debug, Clone)]
pub struct UdpAnswer {
    pub src: IpAddr,
    pub id: u64,
    /// Every node that answered this datagram (should be exactly one).
    pub nodes: Vec<String>,
}

/// Sends `per_source` datagrams from each source address to `dst` (inside `ns`) and collects
/// every reply until `wait` has passed after the last send.
pub fn udp_requests(
    ns: &Netns,
    sources: Vec<IpAddr>,
    dst: SocketAddr,
    per_source: usize,
    wait: Duration,
) -> Vec<UdpAnswer> {
    ns.run(move || {
        let socks: Vec<(IpAddr, UdpSocket)> = sources
            .iter()
            .map(|&s| {
                let u = UdpSocket::bind(SocketAddr::new(s, 0)).expect("bind udp client");
                u.set_nonblocking(true).expect("nonblocking");
                (s, u)
            })
            .collect();
        let mut answers: Vec<UdpAnswer> = Vec::new();
        let mut id = 0u64;
        let mut index_of = std::collections::HashMap::new();
        // The window waits for at most 10 s in all: a farm that loses most datagrams fails
        // the caller's check without this loop taking minutes.
        let patience = Instant::now() + Duration::from_secs(10);
        for _round in 0..per_source {
            for (src, u) in &socks {
                // A client with a window of requests in flight, as real UDP clients (DNS
                // resolvers, RADIUS, QUIC) have: a burst of a thousand datagrams in a few
                // microseconds overflows a veth's 256-slot XDP ring or a server's receive
                // buffer on a busy host, farm or not. A lost datagram does not hold the window
                // shut for longer than 100 ms; it is still counted as unanswered.
                let shut = (Instant::now() + Duration::from_millis(100)).min(patience);
                while outstanding(&answers) >= UDP_WINDOW && Instant::now() < shut {
                    drain(&socks, &mut answers, &index_of);
                    std::thread::sleep(Duration::from_micros(200));
                }
                u.send_to(format!("{id}").as_bytes(), dst).expect("send");
                index_of.insert(id, answers.len());
                answers.push(UdpAnswer {
                    src: *src,
                    id,
                    nodes: Vec::new(),
                });
                id += 1;
            }
            drain(&socks, &mut answers, &index_of);
        }
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            drain(&socks, &mut answers, &index_of);
            std::thread::sleep(Duration::from_millis(5));
        }
        answers
    })
}

/// Datagrams `udp_requests` lets be in flight (sent, not yet answered) at once.
const UDP_WINDOW: usize = 64;

/// Datagrams sent and not answered yet (the most recent ones: older losses do not count, so a
/// lost datagram cannot hold the window shut for good).
fn outstanding(answers: &[UdpAnswer]) -> usize {
    answers
        .iter()
        .rev()
        .take(4 * UDP_WINDOW)
        .filter(|a| a.nodes.is_empty())
        .count()
}

fn drain(
    socks: &[(IpAddr, UdpSocket)],
    answers: &mut [UdpAnswer],
    index_of: &std::collections::HashMap<u64, usize>,
) {
    let mut buf = [0u8; 1500];
    for (_, u) in socks {
        while let Ok(n) = u.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]);
            if let Some((node, id)) = text.split_once(' ')
                && let Ok(id) = id.trim().parse::<u64>()
                && let Some(&i) = index_of.get(&id)
            {
                answers[i].nodes.push(node.to_string());
            }
        }
    }
}

/// Counters of a keep-alive client (shared by the threads of one `KeepAlives`).
#[derive(Debug, Default)]
pub struct KeepAliveCounters {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Failed requests or connections (a reset, a timeout, a close without `close`).
    pub errors: AtomicU64,
    /// Clean closes by the server followed by a new connection.
    pub reconnects: AtomicU64,
}

/// Holds a keep-alive connection from `src` to `dst` and sends a request every 20 ms until
/// `stop`. When the server closes the connection cleanly (its answer ends in ` close`) it opens
/// a new one, as an HTTP client does. A failed or reset connection is one error; the client
/// then opens a new connection, as a retrying client would.
pub fn keep_alive(src: IpAddr, dst: SocketAddr, stop: &AtomicBool, c: &KeepAliveCounters) {
    let open = || -> std::io::Result<(TcpStream, BufReader<TcpStream>)> {
        let c = connect(SocketAddr::new(src, 0), dst, Duration::from_secs(2))?;
        c.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut r = BufReader::new(c.try_clone()?);
        let mut greeting = String::new();
        if r.read_line(&mut greeting)? == 0 {
            return Err(std::io::Error::other("closed before the greeting"));
        }
        Ok((c, r))
    };
    let mut line = String::new();
    'connection: while !stop.load(Ordering::Relaxed) {
        let (mut w, mut r) = match open() {
            Ok(x) => x,
            Err(_) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        while !stop.load(Ordering::Relaxed) {
            line.clear();
            let ok = w.write_all(b"ping\n").is_ok() && r.read_line(&mut line).is_ok_and(|n| n > 0);
            if ok && line.ends_with("ping\n") {
                c.requests.fetch_add(1, Ordering::Relaxed);
            } else if ok && line.ends_with("ping close\n") {
                c.requests.fetch_add(1, Ordering::Relaxed);
                c.reconnects.fetch_add(1, Ordering::Relaxed);
                continue 'connection;
            } else {
                c.errors.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
                continue 'connection;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Keep-alive connections from several sources, each on its own thread (see `keep_alive`).
pub struct KeepAlives {
    stop: Arc<AtomicBool>,
    counters: Arc<KeepAliveCounters>,
    threads: Vec<JoinHandle<()>>,
}

impl KeepAlives {
    /// One keep-alive connection from each of `sources` to `dst`, inside `ns`.
    pub fn start(ns: &Netns, sources: &[IpAddr], dst: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(KeepAliveCounters::default());
        let threads = sources
            .iter()
            .map(|&src| {
                let (stop, counters) = (stop.clone(), counters.clone());
                ns.spawn(move || keep_alive(src, dst, &stop, &counters))
            })
            .collect();
        Self {
            stop,
            counters,
            threads,
        }
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.counters.requests.load(Ordering::Relaxed)
    }

    /// Stops them; returns (requests answered, errors).
    pub fn finish(self) -> (u64, u64) {
        let (requests, errors, _) = self.finish_all();
        (requests, errors)
    }

    /// Stops them; returns (requests answered, errors, clean reconnects).
    pub fn finish_all(mut self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().expect("keep-alive thread");
        }
        let c = &self.counters;
        (
            c.requests.load(Ordering::Relaxed),
            c.errors.load(Ordering::Relaxed),
            c.reconnects.load(Ordering::Relaxed),
        )
    }
}

/// What a `NewConnections` load saw.
#[derive(Debug, Default, Clone)]
pub struct NewConnectionReport {
    pub answered: u64,
    /// Failed connections, with the first few errors.
    pub failed: u64,
    pub errors: Vec<String>,
    /// Connections that took longer than 900 ms: a SYN was lost and retransmitted (nobody took
    /// it), which users feel as a one-second stall.
    pub slow: u64,
    /// The first few slow connections: wall-clock start (to compare with farmd's logs), source,
    /// duration and outcome.
    pub slow_samples: Vec<String>,
    /// Answers per node.
    pub by_node: std::collections::BTreeMap<String, u64>,
}

/// A stream of new TCP connections: `threads` threads inside `ns`, each cycling through its
/// share of `sources`, one connection (connect, read the answer, close) at a time with a pause
/// of `pause` between them.
pub struct NewConnections {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<NewConnectionReport>>,
}

impl NewConnections {
    pub fn start(
        ns: &Netns,
        sources: &[IpAddr],
        dst: SocketAddr,
        threads: usize,
        pause: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let per = sources.len().div_ceil(threads.max(1)).max(1);
        let threads = sources
            .chunks(per)
            .map(|chunk| {
                let (stop, chunk) = (stop.clone(), chunk.to_vec());
                ns.spawn(move || {
                    let mut r = NewConnectionReport::default();
                    let mut k = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let src = chunk[k % chunk.len()];
                        k += 1;
                        let (t0, wall) = (Instant::now(), std::time::SystemTime::now());
                        let a = tcp_request(src, dst, Duration::from_secs(3));
                        if t0.elapsed() > Duration::from_millis(900) {
                            r.slow += 1;
                            if r.slow_samples.len() < 5 {
                                let at = wall
                                    .duration_since(std::time::UNIX_EPOCH)
                                    .unwrap_or_default();
                                r.slow_samples.push(format!(
                                    "{}.{:03} (unix s) from {src}: {} ms, {:?}",
                                    at.as_secs(),
                                    at.subsec_millis(),
                                    t0.elapsed().as_millis(),
                                    a.node.as_ref().or(a.error.as_ref())
                                ));
                            }
                        }
                        match (a.node, a.error) {
                            (Some(node), _) => {
                                r.answered += 1;
                                *r.by_node.entry(node).or_default() += 1;
                            }
                            (None, e) => {
                                r.failed += 1;
                                if r.errors.len() < 5 {
                                    r.errors.push(format!("{src}: {}", e.unwrap_or_default()));
                                }
                            }
                        }
                        std::thread::sleep(pause);
                    }
                    r
                })
            })
            .collect();
        Self { stop, threads }
    }

    /// Stops the load and sums up what every thread saw.
    pub fn finish(mut self) -> NewConnectionReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = NewConnectionReport::default();
        for t in self.threads.drain(..) {
            let r = t.join().expect("client thread");
            total.answered += r.answered;
            total.failed += r.failed;
            total.slow += r.slow;
            total.slow_samples.extend(r.slow_samples);
            total.errors.extend(r.errors);
            for (n, c) in r.by_node {
                *total.by_node.entry(n).or_default() += c;
            }
        }
        total
    }
}

/// What a `HealthEndpoint` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// `200 OK`, body `ok`.
    Ok,
    /// `503 Service Unavailable`: the application answers, but says it is not well.
    Unavailable,
    /// The listener is closed: connections are refused (the application is gone).
    Down,
}

/// A tiny HTTP server on 127.0.0.1:`port` inside a node, for the health checks, whose answer
/// the test sets.
pub struct HealthEndpoint {
    state: Arc<std::sync::Mutex<Health>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HealthEndpoint {
    pub fn start(ns: &Netns, port: u16) -> Self {
        let state = Arc::new(std::sync::Mutex::new(Health::Ok));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = ns.spawn(move || {
            let mut listener: Option<TcpListener> = None;
            while !sp.load(Ordering::Relaxed) {
                let now = *st.lock().expect("health state");
                if now == Health::Down {
                    listener = None;
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                let l = listener.get_or_insert_with(|| {
                    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
                        .expect("socket");
                    s.set_reuse_address(true).expect("reuseaddr");
                    s.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())
                        .expect("bind health endpoint");
                    s.listen(64).expect("listen");
                    let l: TcpListener = s.into();
                    l.set_nonblocking(true).expect("nonblocking");
                    l
                });
                match l.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(Duration::from_millis(500)));
                        let mut req = [0u8; 1024];
                        let _ = c.read(&mut req);
                        let reply: &[u8] = if now == Health::Ok {
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                        } else {
                            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\
                              Connection: close\r\n\r\nbusy"
                        };
                        let _ = c.write_all(reply);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Self {
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn set(&self, h: Health) {
        *self.state.lock().expect("health state") = h;
    }
}

impl Drop for HealthEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a `UdpStream` saw.
#[derive(Debug, Default)]
pub struct UdpStreamReport {
    pub sent: u64,
    pub answered: u64,
    /// Sequence numbers never answered (the first 20).
    pub lost: Vec<u64>,
    pub lost_total: u64,
    /// Datagrams answered by more than one node.
    pub duplicated: u64,
    pub by_node: std::collections::BTreeMap<String, u64>,
}

/// A steady, sequence-numbered UDP stream to `dst`: one datagram every `every`, the sources
/// taken in turn, every answer matched to its sequence number.
pub struct UdpStream {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<UdpStreamReport>>,
}

impl UdpStream {
    pub fn start(ns: &Netns, sources: &[IpAddr], dst: SocketAddr, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, sources) = (stop.clone(), sources.to_vec());
        let thread = ns.spawn(move || {
            let socks: Vec<UdpSocket> = sources
                .iter()
                .map(|&s| {
                    let u = UdpSocket::bind(SocketAddr::new(s, 0)).expect("bind udp client");
                    u.set_nonblocking(true).expect("nonblocking");
                    u
                })
                .collect();
            let mut answers: Vec<Vec<String>> = Vec::new();
            let mut buf = [0u8; 1500];
            let mut receive = |answers: &mut Vec<Vec<String>>| {
                for u in &socks {
                    while let Ok(n) = u.recv(&mut buf) {
                        let text = String::from_utf8_lossy(&buf[..n]);
                        if let Some((node, id)) = text.split_once(' ')
                            && let Ok(id) = id.trim().parse::<usize>()
                            && id < answers.len()
                        {
                            answers[id].push(node.to_string());
                        }
                    }
                }
            };
            let mut next = Instant::now();
            while !stop2.load(Ordering::Relaxed) {
                let seq = answers.len();
                answers.push(Vec::new());
                let _ = socks[seq % socks.len()].send_to(seq.to_string().as_bytes(), dst);
                next += every;
                loop {
                    receive(&mut answers);
                    let now = Instant::now();
                    if now >= next {
                        break;
                    }
                    std::thread::sleep((next - now).min(Duration::from_micros(500)));
                }
            }
            // The last answers, bounded.
            let deadline = Instant::now() + Duration::from_secs(1);
            while Instant::now() < deadline {
                receive(&mut answers);
                std::thread::sleep(Duration::from_millis(5));
            }
            let mut r = UdpStreamReport {
                sent: answers.len() as u64,
                ..Default::default()
            };
            for (seq, nodes) in answers.iter().enumerate() {
                match nodes.len() {
                    0 => {
                        r.lost_total += 1;
                        if r.lost.len() < 20 {
                            r.lost.push(seq as u64);
                        }
                    }
                    n => {
                        r.answered += 1;
                        if n > 1 {
                            r.duplicated += 1;
                        }
                        *r.by_node.entry(nodes[0].clone()).or_default() += 1;
                    }
                }
            }
            r
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the stream and reports what was answered.
    pub fn finish(mut self) -> UdpStreamReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("udp stream thread")
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
