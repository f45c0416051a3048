//! The recovery drill's probe client: a client of the farm played by this member on its own
//! farm interface, so that the drill measures what a client sees rather than what the daemons
//! believe.
//!
//! It sends ICMP echo requests to a VIP every few milliseconds from a probe address (unused on
//! the LAN, chosen so that its bucket is the drilled member's) and a locally administered MAC,
//! as raw Ethernet frames to the cluster MAC: they leave through the switch like any client's
//! and reach every member, and exactly the owner of the probe's bucket answers. A classic BPF
//! filter lets only ARP and frames to the probe address reach its socket, so a busy interface
//! costs it nothing.
//!
//! The members must know the probe's MAC to answer it. Their ARP requests for it are sent from
//! the VIP, and this member's XDP program drops ARP from a VIP before any socket sees it (so
//! that its kernel never takes another member's ARP as an address conflict). So the probe
//! introduces itself instead, as a client does: every 250 ms it asks each member for that
//! member's own address ("who has 10.0.0.12? tell <probe>"), from which every member's kernel
//! learns, and keeps fresh, the probe's MAC. It still answers any ARP request for its address
//! that reaches it.
//!
//! The outage is the gap between the last probe answered before the crash and the first one
//! answered after it, at the probe interval's resolution.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::packet::inet_checksum;

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error("opening the probe client's packet socket on {interface}: {source}")]
    Socket {
        interface: String,
        source: std::io::Error,
    },
}

/// How often the probe client asks.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(5);

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;

/// What the probe client has seen: per probe (by sequence number), when it was sent and when
/// its answer came.
#[derive(Debug, Default, Clone)]
pub struct ProbeLog {
    pub sent: Vec<Instant>,
    pub answered: Vec<Option<Instant>>,
    pub arp_answered: u64,
}

impl ProbeLog {
    pub fn answered_count(&self) -> u64 {
        self.answered.iter().filter(|a| a.is_some()).count() as u64
    }

    /// Whether the last `n` probes sent at least `grace` ago were all answered.
    pub fn steady(&self, n: usize, now: Instant, grace: Duration) -> bool {
        let ripe: Vec<usize> = (0..self.sent.len())
            .filter(|&i| now.saturating_duration_since(self.sent[i]) >= grace)
            .collect();
        ripe.len() >= n
            && ripe[ripe.len() - n..]
                .iter()
                .all(|&i| self.answered[i].is_some())
    }

    /// The outage a crash ordered at `crash` caused: from the last probe answered before the
    /// first one that went unanswered (sent at or after the order, and unanswered for `grace`
    /// by `now`) to the first probe answered after that. None until then. The victim stops
    /// when the order reaches it (it travels in a heartbeat): the probes it still answers
    /// meanwhile are no outage.
    pub fn outage(&self, crash: Instant, now: Instant, grace: Duration) -> Option<Duration> {
        let lost = (0..self.sent.len()).find(|&i| {
            self.sent[i] >= crash
                && self.answered[i].is_none()
                && now.saturating_duration_since(self.sent[i]) >= grace
        })?;
        let after = (lost + 1..self.sent.len()).find(|&i| self.answered[i].is_some())?;
        let before = (0..lost)
            .rev()
            .find(|&i| self.answered[i].is_some())
            .map_or(crash, |i| self.sent[i]);
        Some(self.sent[after].saturating_duration_since(before))
    }

    /// Probes sent at or after `from` that have gone unanswered for `grace`.
    pub fn lost_since(&self, from: Instant, now: Instant, grace: Duration) -> u64 {
        (0..self.sent.len())
            .filter(|&i| {
                self.sent[i] >= from
                    && now.saturating_duration_since(self.sent[i]) >= grace
                    && self.answered[i].is_none()
            })
            .count() as u64
    }
}

/// Who the probe client is and whom it asks.
#[derive(Debug, Clone)]
pub struct Probe {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub addr: Ipv4Addr,
    pub vip: Ipv4Addr,
    pub cluster_mac: [u8; 6],
    /// ICMP echo identifier (tells our answers from others').
    pub ident: u16,
    /// The other members' IPv4 addresses, asked for so that they learn the probe's MAC.
    pub members: Vec<Ipv4Addr>,
}

/// How often the probe introduces itself to the members.
const INTRODUCE_INTERVAL: Duration = Duration::from_millis(250);

/// The running probe client (a thread); stops when dropped.
pub struct ProbeClient {
    pub log: Arc<Mutex<ProbeLog>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProbeClient {
    pub fn start(p: Probe, interface: &str) -> Result<Self, DrillError> {
        let fd = open_socket(&p).map_err(|source| DrillError::Socket {
            interface: interface.into(),
            source,
        })?;
        let log = Arc::new(Mutex::new(ProbeLog::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (log.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("drill-probe".into())
            .spawn(move || run(fd, p, &l, &s))
            .expect("spawning a thread");
        Ok(Self {
            log,
            stop,
            thread: Some(thread),
        })
    }

    /// What `f` reads of the log, under its lock (no copy of the log).
    pub fn with<T>(&self, f: impl FnOnce(&ProbeLog) -> T) -> T {
        f(&self.log.lock().expect("probe log"))
    }
}

impl Drop for ProbeClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open_socket(p: &Probe) -> std::io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket call; the fd is owned right after.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            proto as i32,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh, valid fd.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // Only ARP, and IPv4 to the probe address, reach the socket.
    let dst = u32::from(p.addr);
    let filter = [
        bpf(0x28, 0, 0, 12),       // ldh [12]           ethertype
        bpf(0x15, 3, 0, 0x0806),   // jeq ARP -> accept
        bpf(0x15, 0, 3, 0x0800),   // jne IPv4 -> drop
        bpf(0x20, 0, 0, 30),       // ld [30]            IPv4 destination
        bpf(0x15, 0, 1, dst),      // jne probe -> drop
        bpf(0x06, 0, 0, 0x4_0000), // accept
        bpf(0x06, 0, 0, 0),        // drop
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prog points at `filter`, alive for the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as u32,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: zeroed sockaddr_ll is valid; the fields set are the ones bind reads.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = p.ifindex as i32;
    // SAFETY: sll is a valid sockaddr_ll of the size given.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Frames that arrived before the filter was attached may sit in the queue: they are parsed
    // and ignored like any other.
    crate::packet::set_recv_timeout(&fd, Duration::from_millis(1))?;
    Ok(fd)
}

fn bpf(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

fn send(fd: &OwnedFd, frame: &[u8]) {
    // SAFETY: frame is a valid buffer of the length given; the socket is bound.
    unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
}

fn run(fd: OwnedFd, p: Probe, log: &Mutex<ProbeLog>, stop: &AtomicBool) {
    let mut next = Instant::now();
    let mut introduce = Instant::now();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= introduce {
            for &m in &p.members {
                send(&fd, &arp_request(&p, m));
            }
            introduce = now + INTRODUCE_INTERVAL;
        }
        if now >= next {
            let seq = {
                let mut l = log.lock().expect("probe log");
                l.sent.push(now);
                l.answered.push(None);
                (l.sent.len() - 1) as u16
            };
            send(&fd, &echo_request(&p, seq));
            next += PROBE_INTERVAL;
            if next < now {
                next = now + PROBE_INTERVAL;
            }
        }
        // SAFETY: buf is valid for its length; SO_RCVTIMEO bounds the wait to 1 ms.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            continue;
        }
        match parse(&buf[..n as usize], &p) {
            Some(Seen::ArpRequest { mac, ip }) => {
                send(&fd, &arp_reply(&p, mac, ip));
                log.lock().expect("probe log").arp_answered += 1;
            }
            Some(Seen::EchoReply { seq }) => {
                let mut l = log.lock().expect("probe log");
                // Sequence numbers wrap at 65536 probes (5.5 minutes): the newest match.
                let len = l.sent.len();
                if let Some(i) = (0..len).rev().find(|&i| i as u16 == seq)
                    && l.answered[i].is_none()
                {
                    l.answered[i] = Some(Instant::now());
                }
            }
            None => {}
        }
    }
}

/// A frame the probe client acts on.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    ArpRequest { mac: [u8; 6], ip: Ipv4Addr },
    EchoReply { seq: u16 },
}

/// An ARP request for the probe address, or an echo reply to it from the VIP.
pub fn parse(f: &[u8], p: &Probe) -> Option<Seen> {
    let ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    match ethertype {
        ETH_P_ARP => {
            let a = f.get(14..42)?;
            let op = u16::from_be_bytes([a[6], a[7]]);
            let target = Ipv4Addr::new(a[24], a[25], a[26], a[27]);
            (a[0..6] == [0, 1, 8, 0, 6, 4] && op == 1 && target == p.addr).then(|| {
                Seen::ArpRequest {
                    mac: a[8..14].try_into().expect("6 bytes"),
                    ip: Ipv4Addr::new(a[14], a[15], a[16], a[17]),
                }
            })
        }
        ETH_P_IP => {
            let ip = f.get(14..)?;
            let ihl = (*ip.first()? & 0x0f) as usize * 4;
            if ip[0] >> 4 != 4 || ihl < 20 || ip.len() < ihl + 8 || ip[9] != 1 {
                return None;
            }
            let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            let icmp = &ip[ihl..];
            let ident = u16::from_be_bytes([icmp[4], icmp[5]]);
            (src == p.vip && dst == p.addr && icmp[0] == 0 && ident == p.ident).then(|| {
                Seen::EchoReply {
                    seq: u16::from_be_bytes([icmp[6], icmp[7]]),
                }
            })
        }
        _ => None,
    }
}

/// An ICMP echo request from the probe to the VIP, sent to the cluster MAC.
pub fn echo_request(p: &Probe, seq: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 20 + 16);
    f.extend_from_slice(&p.cluster_mac);
    f.extend_from_slice(&p.mac);
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(20u16 + 16).to_be_bytes());
    ip[4..6].copy_from_slice(&seq.to_be_bytes());
    ip[8] = 64;
    ip[9] = 1;
    ip[12..16].copy_from_slice(&p.addr.octets());
    ip[16..20].copy_from_slice(&p.vip.octets());
    let c = inet_checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut icmp = [0u8; 16];
    icmp[0] = 8;
    icmp[4..6].copy_from_slice(&p.ident.to_be_bytes());
    icmp[6..8].copy_from_slice(&seq.to_be_bytes());
    icmp[8..16].copy_from_slice(b"farmdril");
    let c = inet_checksum(&[&icmp]);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&icmp);
    f
}

/// "Who has `target`? Tell the probe", broadcast: `target`'s kernel learns the probe's MAC.
pub fn arp_request(p: &Probe, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&p.mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&p.mac);
    f.extend_from_slice(&p.addr.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// The probe's answer to an ARP request for its address.
pub fn arp_reply(p: &Probe, to_mac: [u8; 6], to_ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&to_mac);
    f.extend_from_slice(&p.mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    f.extend_from_slice(&p.mac);
    f.extend_from_slice(&p.addr.octets());
    f.extend_from_slice(&to_mac);
    f.extend_from_slice(&to_ip.octets());
    f
}

/// The addresses of `blocks`, in order (a /32 is one address; network and broadcast addresses
/// of larger blocks are skipped).
pub fn candidates(blocks: &[(Ipv4Addr, u8)]) -> impl Iterator<Item = Ipv4Addr> + '_ {
    blocks.iter().flat_map(|&(a, len)| {
        let size = 1u64 << (32 - len);
        let base = u32::from(a) & (u32::MAX.checked_shl(32 - len as u32).unwrap_or(0));
        let (lo, hi) = if size <= 2 { (0, size) } else { (1, size - 1) };
        (lo..hi).map(move |i| Ipv4Addr::from(base.wrapping_add(i as u32)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe() -> Probe {
        Probe {
            ifindex: 1,
            mac: [2, 0, 0, 0, 0, 9],
            addr: "192.0.2.240".parse().unwrap(),
            vip: "192.0.2.100".parse().unwrap(),
            cluster_mac: [2, 0xfa, 0, 0, 0, 1],
            ident: 0x4242,
            members: vec!["192.0.2.2".parse().unwrap()],
        }
    }

    #[test]
    fn echo_request_is_a_valid_ipv4_icmp_frame() {
        let f = echo_request(&probe(), 7);
        assert_eq!(f.len(), 50);
        assert_eq!(inet_checksum(&[&f[14..34]]), 0, "IP header checksum");
        assert_eq!(inet_checksum(&[&f[34..]]), 0, "ICMP checksum");
        assert_eq!(&f[0..6], &probe().cluster_mac);
    }

    #[test]
    fn replies_and_arp_requests_are_recognised() {
        let p = probe();
        // The VIP's owner answers: swap addresses, type 0.
        let mut reply = echo_request(&p, 7);
        reply[26..30].copy_from_slice(&p.vip.octets());
        reply[30..34].copy_from_slice(&p.addr.octets());
        reply[34] = 0;
        assert_eq!(parse(&reply, &p), Some(Seen::EchoReply { seq: 7 }));
        let mut other = reply.clone();
        other[38] = 0; // another identifier: someone else's ping
        assert_eq!(parse(&other, &p), None);
        assert_eq!(parse(&echo_request(&p, 7), &p), None, "our own request");
        // "Who has 192.0.2.240? Tell 192.0.2.100", from the cluster MAC.
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&p.cluster_mac);
        arp.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&p.cluster_mac);
        arp.extend_from_slice(&p.vip.octets());
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&p.addr.octets());
        assert_eq!(
            parse(&arp, &p),
            Some(Seen::ArpRequest {
                mac: p.cluster_mac,
                ip: p.vip
            })
        );
        let ours = arp_request(&p, p.members[0]);
        assert_eq!(parse(&ours, &p), None, "not a request for the probe");
        assert_eq!(&ours[38..42], &[192, 0, 2, 2]);
        let answer = arp_reply(&p, p.cluster_mac, p.vip);
        assert_eq!(answer.len(), 42);
        assert_eq!(&answer[22..28], &p.mac);
        for n in 0..arp.len() {
            let _ = parse(&arp[..n], &p);
            let _ = parse(&reply[..n.min(reply.len())], &p);
        }
    }

    #[test]
    fn the_outage_runs_from_the_last_answer_before_to_the_first_after() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut l = ProbeLog::default();
        for i in 0..100u64 {
            l.sent.push(ms(i * 5));
            // Answered before 100 ms and from 420 ms on.
            l.answered
                .push((i * 5 < 100 || i * 5 >= 420).then(|| ms(i * 5 + 1)));
        }
        let g = Duration::from_millis(50);
        assert_eq!(
            l.outage(ms(102), ms(600), g),
            Some(Duration::from_millis(325))
        );
        assert_eq!(l.outage(ms(600), ms(600), g), None, "nothing sent after");
        assert_eq!(
            l.outage(ms(102), ms(130), g),
            None,
            "not judged within the grace"
        );
        // A victim that reads the order 45 ms late answers until then: no outage yet, and the
        // outage runs from its last answer.
        let mut late = ProbeLog::default();
        for i in 0..100u64 {
            late.sent.push(ms(i * 5));
            late.answered
                .push((i * 5 < 150 || i * 5 >= 420).then(|| ms(i * 5 + 1)));
        }
        assert_eq!(late.outage(ms(102), ms(140), g), None, "still answered");
        assert_eq!(
            late.outage(ms(102), ms(600), g),
            Some(Duration::from_millis(275))
        );
        assert_eq!(l.lost_since(ms(0), ms(600), Duration::from_millis(50)), 64);
        assert!(l.steady(10, ms(600), Duration::from_millis(50)));
        assert!(!l.steady(10, ms(200), Duration::from_millis(50)));
    }

    #[test]
    fn candidate_addresses_skip_network_and_broadcast() {
        let c: Vec<Ipv4Addr> = candidates(&[
            ("192.0.2.240".parse().unwrap(), 29),
            ("192.0.2.9".parse().unwrap(), 32),
        ])
        .collect();
        assert_eq!(c.len(), 7);
        assert_eq!(c[0], "192.0.2.241".parse::<Ipv4Addr>().unwrap());
        assert_eq!(c[5], "192.0.2.246".parse::<Ipv4Addr>().unwrap());
        assert_eq!(c[6], "192.0.2.9".parse::<Ipv4Addr>().unwrap());
    }
}
