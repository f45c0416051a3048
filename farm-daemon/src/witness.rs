//! The witness: a host a two-member farm pings to decide which side of a partition may serve.
//! A thread sends an ICMP echo request every `interval` and records when the last reply came.
//!
//! A reply counts only if it answers a probe this thread sent recently: from the witness's
//! address, with the random identifier of this farmd's probes, the probe's sequence number and
//! the probe's own random token (16 bytes, fresh per probe) echoed back, once. So a host that
//! cannot see the probes cannot make an unreachable witness look reachable, however many
//! replies it sprays; one that sees them (on the path, or on a segment flooded to it) can, as
//! with any ICMP witness: see the README's threat model.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use farm_mirror::wire::random;

#[derive(Debug, thiserror::Error)]
#[error("cannot open an ICMP socket to probe the witness {witness}: {source}")]
pub struct WitnessError {
    witness: IpAddr,
    source: std::io::Error,
}

/// Reachability of the witness, updated by a background thread.
pub struct Witness {
    pub addr: IpAddr,
    started: Instant,
    /// Milliseconds after `started` of the last reply (0 = never).
    last_reply_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Witness {
    pub fn start(addr: IpAddr, interval: Duration) -> Result<Self, WitnessError> {
        let (domain, proto) = match addr {
            IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP),
            IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6),
        };
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            return Err(WitnessError {
                witness: addr,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Best effort, as before: without it the probe thread only notices a stop at the next
        // reply.
        let _ = crate::packet::set_recv_timeout(&fd, Duration::from_millis(50));
        let started = Instant::now();
        let last_reply_ms = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (last, stop2) = (last_reply_ms.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("witness".into())
            .spawn(move || probe_loop(fd, addr, interval, started, &last, &stop2))
            .expect("spawn witness thread");
        Ok(Self {
            addr,
            started,
            last_reply_ms,
            stop,
            thread: Some(thread),
        })
    }

    /// Whether the witness answered within `within`.
    pub fn reachable(&self, within: Duration) -> bool {
        let last = self.last_reply_ms.load(Ordering::Relaxed);
        last != 0
            && self
                .started
                .elapsed()
                .saturating_sub(Duration::from_millis(last))
                <= within
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const TAG: &[u8] = b"farm-witness";
const TOKEN: usize = 16;
/// Probes remembered (replies to older ones are ignored).
const OUTSTANDING: usize = 16;

fn echo_request(v6: bool, id: u16, seq: u16, token: &[u8; TOKEN]) -> Vec<u8> {
    let mut m = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(TAG);
    m.extend_from_slice(token);
    if !v6 {
        // ICMPv4 checksum (the kernel computes the ICMPv6 one for raw ICMPv6 sockets).
        let sum = crate::packet::inet_checksum(&[&m]);
        m[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    m
}

fn probe_loop(
    fd: OwnedFd,
    addr: IpAddr,
    interval: Duration,
    started: Instant,
    last: &AtomicU64,
    stop: &AtomicBool,
) {
    let v6 = addr.is_ipv6();
    let id = u16::from_be_bytes(random());
    let dst: socket_addr::Raw = socket_addr::Raw::new(SocketAddr::new(addr, 0));
    let mut seq: u16 = u16::from_be_bytes(random());
    let mut probes = Probes::default();
    let mut next = Instant::now();
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next {
            seq = seq.wrapping_add(1);
            let token = probes.sent(seq);
            let m = echo_request(v6, id, seq, &token);
            // SAFETY: valid buffer and address for the lengths given.
            unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    m.as_ptr().cast(),
                    m.len(),
                    0,
                    dst.ptr(),
                    dst.len(),
                )
            };
            next += interval;
        }
        // SAFETY: zeroed sockaddr_storage is valid; the kernel fills it within its length.
        let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of_val(&from) as libc::socklen_t;
        // SAFETY: valid buffers; the socket has a receive timeout.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut from).cast(),
                &mut from_len,
            )
        };
        if n <= 0 || crate::packet::sockaddr_to_std(&from).map(|a| a.ip()) != Some(addr) {
            continue;
        }
        let pkt = &buf[..n as usize];
        // Raw ICMPv4 sockets deliver the IP header too; ICMPv6 ones do not.
        let icmp = if v6 {
            pkt
        } else {
            let ihl = ((pkt[0] & 0x0f) as usize) * 4;
            match pkt.get(ihl..) {
                Some(icmp) => icmp,
                None => continue,
            }
        };
        if probes.answers(v6, id, icmp) {
            last.store(
                started.elapsed().as_millis().max(1) as u64,
                Ordering::Relaxed,
            );
        }
    }
}

/// The probes sent recently, each answerable once.
#[derive(Default)]
struct Probes {
    /// (sequence, token), oldest first.
    recent: std::collections::VecDeque<(u16, [u8; TOKEN])>,
}

impl Probes {
    /// A new probe numbered `seq`: its fresh token.
    fn sent(&mut self, seq: u16) -> [u8; TOKEN] {
        let token = random();
        if self.recent.len() == OUTSTANDING {
            self.recent.pop_front();
        }
        self.recent.push_back((seq, token));
        token
    }

    /// Whether `icmp` is the echo reply to one of the recent probes (which then cannot be
    /// answered again).
    fn answers(&mut self, v6: bool, id: u16, icmp: &[u8]) -> bool {
        let reply_type = if v6 { 129 } else { 0 };
        if icmp.len() != 8 + TAG.len() + TOKEN
            || icmp[0] != reply_type
            || icmp[4..6] != id.to_be_bytes()
            || &icmp[8..8 + TAG.len()] != TAG
        {
            return false;
        }
        let seq = u16::from_be_bytes([icmp[6], icmp[7]]);
        let token = &icmp[8 + TAG.len()..];
        match self
            .recent
            .iter()
            .position(|(s, t)| *s == seq && t[..] == *token)
        {
            Some(i) => {
                self.recent.remove(i);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(id: u16, seq: u16, token: &[u8]) -> Vec<u8> {
        let mut m = vec![0, 0, 0, 0];
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(TAG);
        m.extend_from_slice(token);
        m
    }

    #[test]
    fn only_a_reply_echoing_a_recent_probes_token_counts_and_only_once() {
        let mut p = Probes::default();
        let t1 = p.sent(1);
        let t2 = p.sent(2);
        assert!(
            !p.answers(false, 7, &reply(8, 1, &t1)),
            "another identifier"
        );
        assert!(
            !p.answers(false, 7, &reply(7, 1, &t2)),
            "another probe's token"
        );
        assert!(
            !p.answers(false, 7, &reply(7, 3, &t1)),
            "a probe never sent"
        );
        assert!(
            !p.answers(false, 7, &reply(7, 1, &[0; TOKEN])),
            "a guessed token"
        );
        assert!(
            !p.answers(true, 7, &reply(7, 1, &t1)),
            "an ICMPv4 reply type on v6"
        );
        assert!(p.answers(false, 7, &reply(7, 1, &t1)));
        assert!(!p.answers(false, 7, &reply(7, 1, &t1)), "answered twice");
        assert!(p.answers(false, 7, &reply(7, 2, &t2)));
        // Old probes are forgotten.
        let old = p.sent(100);
        for s in 101..=(100 + OUTSTANDING as u16) {
            p.sent(s);
        }
        assert!(!p.answers(false, 7, &reply(7, 100, &old)));
    }
}

mod socket_addr {
    use std::net::SocketAddr;

    /// A `sockaddr_in`/`sockaddr_in6` for sendto(2).
    pub enum Raw {
        V4(libc::sockaddr_in),
        V6(libc::sockaddr_in6),
    }

    impl Raw {
        pub fn new(a: SocketAddr) -> Self {
            match a {
                SocketAddr::V4(v4) => {
                    // SAFETY: zeroed sockaddr_in is valid.
                    let mut s: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                    s.sin_family = libc::AF_INET as u16;
                    s.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
                    Raw::V4(s)
                }
                SocketAddr::V6(v6) => {
                    // SAFETY: zeroed sockaddr_in6 is valid.
                    let mut s: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
                    s.sin6_family = libc::AF_INET6 as u16;
                    s.sin6_addr.s6_addr = v6.ip().octets();
                    Raw::V6(s)
                }
            }
        }
        pub fn ptr(&self) -> *const libc::sockaddr {
            match self {
                Raw::V4(s) => (s as *const libc::sockaddr_in).cast(),
                Raw::V6(s) => (s as *const libc::sockaddr_in6).cast(),
            }
        }
        pub fn len(&self) -> u32 {
            match self {
                Raw::V4(_) => std::mem::size_of::<libc::sockaddr_in>() as u32,
                Raw::V6(_) => std::mem::size_of::<libc::sockaddr_in6>() as u32,
            }
        }
    }
}
