//! The on-LAN attacker of the threat model: a host on the farm's switch that does not hold the
//! cluster key. It sees every frame (the switch is made to flood like a hub, as a switch does
//! when its MAC table overflows or a port is mirrored), captures, replays frames exactly as they
//! were sent (the members' own MAC and IP source addresses), forges datagrams from any address
//! and floods.
//!
//! Everything it sends is a raw Ethernet frame on its own port of the test's switch.

use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{netns::Netns, topology::Topology};

/// The attacker's own address (on the farm's subnet).
pub const ATTACKER_ADDR4: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 250);

pub struct Attacker {
    pub ns: Netns,
}

/// A captured frame's UDP datagram, as far as the attacker reads it.
#[derive(Debug, Clone)]
pub struct Udp {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: Vec<u8>,
}

/// The UDP datagram in an Ethernet frame (IPv4 without options' surprises, or IPv6 without
/// extension headers), if it is one.
pub fn udp(frame: &[u8]) -> Option<Udp> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    match ethertype {
        0x0800 => {
            let ip = frame.get(14..)?;
            let ihl = ((ip.first()? & 0x0f) as usize) * 4;
            if *ip.get(9)? != 17 {
                return None;
            }
            let u = ip.get(ihl..)?;
            let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            Some(Udp {
                src: src.into(),
                dst: dst.into(),
                src_port: u16::from_be_bytes([*u.first()?, *u.get(1)?]),
                dst_port: u16::from_be_bytes([*u.get(2)?, *u.get(3)?]),
                payload: u.get(8..)?.to_vec(),
            })
        }
        0x86dd => {
            let ip = frame.get(14..)?;
            if *ip.get(6)? != 17 {
                return None;
            }
            let u = ip.get(40..)?;
            let addr = |at: usize| -> Option<IpAddr> {
                let b: [u8; 16] = ip.get(at..at + 16)?.try_into().ok()?;
                Some(std::net::Ipv6Addr::from(b).into())
            };
            Some(Udp {
                src: addr(8)?,
                dst: addr(24)?,
                src_port: u16::from_be_bytes([*u.first()?, *u.get(1)?]),
                dst_port: u16::from_be_bytes([*u.get(2)?, *u.get(3)?]),
                payload: u.get(8..)?.to_vec(),
            })
        }
        _ => None,
    }
}

/// A captured IPv4 TCP segment, as far as the attacker reads it.
#[derive(Debug, Clone)]
pub struct Tcp {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub payload: Vec<u8>,
}

/// The TCP segment in an IPv4 Ethernet frame, if it is one.
pub fn tcp4(frame: &[u8]) -> Option<Tcp> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = frame.get(14..)?;
    if *ip.get(9)? != 6 {
        return None;
    }
    let ihl = ((ip.first()? & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]) as usize;
    let t = ip.get(ihl..total.min(ip.len()))?;
    let off = ((t.get(12)? >> 4) as usize) * 4;
    Some(Tcp {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        src_port: u16::from_be_bytes([t[0], t[1]]),
        dst_port: u16::from_be_bytes([t[2], t[3]]),
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        payload: t.get(off..)?.to_vec(),
    })
}

/// The bytes one side sent on a TCP connection, in sequence order, from captured segments
/// (retransmissions counted once).
pub fn tcp_stream(segments: &[Tcp]) -> Vec<u8> {
    let mut by_seq: std::collections::BTreeMap<u32, &[u8]> = Default::default();
    for s in segments.iter().filter(|s| !s.payload.is_empty()) {
        by_seq.entry(s.seq).or_insert(&s.payload);
    }
    let mut out = Vec::new();
    let mut next: Option<u32> = None;
    for (seq, p) in by_seq {
        match next {
            Some(n) if seq != n => break,
            _ => {}
        }
        out.extend_from_slice(p);
        next = Some(seq.wrapping_add(p.len() as u32));
    }
    out
}

/// A frame as a host on a real wire would have seen it. Captured between veths, a UDP
/// checksum the sender's stack left to the (virtual) NIC is still partial; over IPv4 a zero
/// checksum means "none", which is what a replay then carries.
fn as_on_the_wire(f: &mut [u8]) {
    if f.len() < 14 + 20 + 8 || f[12..14] != [0x08, 0x00] || f[14 + 9] != 17 {
        return;
    }
    let ihl = ((f[14] & 0x0f) as usize) * 4;
    if let Some(sum) = f.get_mut(14 + ihl + 6..14 + ihl + 8) {
        sum.copy_from_slice(&[0, 0]);
    }
}

/// An IPv4 UDP frame from `src` (any address: the attacker spoofs) to `dst`.
pub fn udp4_frame(
    eth: ([u8; 6], [u8; 6]),
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let ip =
        crate::frames::V4::new(src.0, dst.0, 17).build(&crate::frames::udp(src.1, dst.1, payload));
    crate::frames::eth(eth.1, eth.0, 0x0800, &ip)
}

/// An ICMPv4 echo reply frame from `src` (spoofed) to `dst`.
pub fn echo_reply4(
    eth: ([u8; 6], [u8; 6]),
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ident: u16,
    seq: u16,
    body: &[u8],
) -> Vec<u8> {
    let mut rest = [0u8; 4];
    rest[..2].copy_from_slice(&ident.to_be_bytes());
    rest[2..].copy_from_slice(&seq.to_be_bytes());
    let mut icmp = crate::frames::icmp(0, 0, rest, body);
    let sum = crate::frames::checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let ip = crate::frames::V4::new(src, dst, 1).build(&icmp);
    crate::frames::eth(eth.1, eth.0, 0x0800, &ip)
}

impl Attacker {
    /// Plugs an attacker host into the topology's switch and makes the switch flood every
    /// frame to every port (a switch whose MAC table overflowed, or a mirrored port): it sees
    /// the members' traffic.
    pub fn plug(t: &Topology) -> Self {
        let a = Self::plug_blind(t);
        let out = t
            .switch
            .ip(&["link", "set", "br0", "type", "bridge", "ageing_time", "0"]);
        assert!(out.status.success(), "bridge ageing_time 0: {out:?}");
        a
    }

    /// The switch goes back to switching (learning MACs for 300 s, the default).
    pub fn stop_flooding(&self, t: &Topology) {
        let out = t.switch.ip(&[
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "ageing_time",
            "30000",
        ]);
        assert!(out.status.success(), "bridge ageing_time: {out:?}");
    }

    /// Plugs an attacker host into the topology's switch, which goes on switching: the
    /// attacker sees only what is flooded or sent to it.
    pub fn plug_blind(t: &Topology) -> Self {
        let ns = Netns::new(format!("{}-ev", t.stem));
        t.switch.ip(&[
            "link", "add", "ev", "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        t.switch.ip(&["link", "set", "ev", "master", "br0", "up"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("{ATTACKER_ADDR4}/16"),
            "dev",
            "eth0",
        ]);
        Self { ns }
    }

    /// Captures, for `within`, the frames `keep` selects (everything the switch floods to the
    /// attacker's port).
    pub fn capture(
        &self,
        within: Duration,
        keep: impl Fn(&[u8]) -> bool + Send + 'static,
    ) -> Vec<Vec<u8>> {
        self.ns.run(move || {
            let fd = raw_socket();
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            let end = Instant::now() + within;
            while Instant::now() < end {
                // SAFETY: valid socket and buffer.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 && keep(&buf[..n as usize]) {
                    let mut f = buf[..n as usize].to_vec();
                    as_on_the_wire(&mut f);
                    frames.push(f);
                }
            }
            frames
        })
    }

    /// The attacker's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.ns.run(|| crate::probe::mac_of("eth0"))
    }

    /// Sends `frames` in turn, over and over, `per_second` frames a second (in bursts every
    /// 10 ms), until `stop` is set or `limit` has passed. Returns how many were sent.
    pub fn send_loop(
        &self,
        frames: Vec<Vec<u8>>,
        per_second: u64,
        limit: Duration,
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<u64> {
        assert!(!frames.is_empty(), "nothing to send");
        self.ns.spawn(move || {
            let fd = raw_socket();
            let started = Instant::now();
            let mut sent = 0u64;
            let mut next = 0usize;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
                let due = (started.elapsed().as_micros() as u64 * per_second / 1_000_000)
                    .saturating_sub(sent)
                    .min(per_second / 10 + 1);
                // In batches of up to 64 frames per system call (sendmmsg).
                let mut left = due as usize;
                while left > 0 {
                    let n = left.min(64);
                    let mut iovs: Vec<libc::iovec> = (0..n)
                        .map(|k| {
                            let f = &frames[(next + k) % frames.len()];
                            libc::iovec {
                                iov_base: f.as_ptr() as *mut libc::c_void,
                                iov_len: f.len(),
                            }
                        })
                        .collect();
                    let mut msgs: Vec<libc::mmsghdr> = iovs
                        .iter_mut()
                        .map(|iov| {
                            // SAFETY: a zeroed mmsghdr is valid; the iovec outlives the call.
                            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                            m.msg_hdr.msg_iov = iov;
                            m.msg_hdr.msg_iovlen = 1;
                            m
                        })
                        .collect();
                    // SAFETY: valid socket and n messages pointing at live frames.
                    let r =
                        unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0) };
                    if r <= 0 {
                        break;
                    }
                    next += r as usize;
                    sent += r as u64;
                    left -= r as usize;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            sent
        })
    }
}

/// An AF_PACKET socket on the attacker's eth0 (in the calling thread's namespace), receiving
/// every frame with a 20 ms timeout and sending raw frames, with room for bursts.
fn raw_socket() -> OwnedFd {
    let (fd, _) = crate::probe::raw_socket("eth0");
    let big: libc::c_int = 4 << 20;
    let one: libc::c_int = 1;
    // SAFETY: valid socket and option values.
    unsafe {
        // Straight to the device, as flooding tools do.
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            4,
        );
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const big).cast(),
            4,
        );
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw const big).cast(),
            4,
        );
    }
    fd
}
