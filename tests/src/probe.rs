//! Raw neighbour-discovery probes from a client namespace: an ARP request or an IPv6 neighbour
//! solicitation for an address, sent on the wire as a frame (optionally 802.1Q-tagged), and
//! every answer heard within a time limit, with the MAC it came from and its VLAN tag. This is
//! what tells "exactly one member answered, with the cluster MAC" from "a kernel answered with
//! its own MAC too", which the client's neighbour table (last answer wins) cannot.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use crate::{frames, netns::Netns};

/// One answer heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The frame's source MAC.
    pub eth_src: [u8; 6],
    /// The link-layer address the answer gives for the target (ARP sender hardware address,
    /// NA target link-layer option).
    pub lladdr: Option<[u8; 6]>,
    /// The 802.1Q VLAN id the answer carried (in the frame or in the kernel's metadata).
    pub vlan: Option<u16>,
}

const ETH_P_ALL: u16 = 0x0003;

/// An AF_PACKET socket on `iface` (in the calling thread's namespace) receiving every frame,
/// with VLAN metadata and a 20 ms receive timeout; and the interface's index.
pub(crate) fn raw_socket(iface: &str) -> (OwnedFd, i32) {
    let name = std::ffi::CString::new(iface).expect("name");
    // SAFETY: valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
    assert!(index > 0, "no interface {iface}");
    // SAFETY: plain socket call; checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (ETH_P_ALL.to_be()) as i32) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: we own the new descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_ll is valid; fields set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ALL.to_be();
    sll.sll_ifindex = index;
    // SAFETY: valid socket and address of the right length.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    let one: libc::c_int = 1;
    // SAFETY: valid socket and option value.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_AUXDATA,
            (&raw const one).cast(),
            4,
        )
    };
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 20_000,
    };
    // SAFETY: valid socket and option value.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    (fd, index)
}

/// The MAC address of `iface` (in the calling thread's namespace).
pub fn mac_of(iface: &str) -> [u8; 6] {
    // SAFETY: plain socket call; checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(fd >= 0);
    // SAFETY: we own the new descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(iface.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: valid socket and ifreq.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
    assert_eq!(rc, 0, "SIOCGIFHWADDR {iface}");
    // SAFETY: the kernel filled ifru_hwaddr.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(data.iter()) {
        *d = *s as u8;
    }
    mac
}

/// Sends `frames` and collects what `parse` recognises as an answer (keyed by what it names:
/// the requester) for `wait`.
fn exchange<K>(
    iface: &str,
    frames: Vec<Vec<u8>>,
    wait: Duration,
    parse: impl Fn(&[u8]) -> Option<(K, Option<[u8; 6]>)>,
) -> Vec<(K, Answer)> {
    let (fd, index) = raw_socket(iface);
    for frame in &frames {
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = index;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: valid socket, buffer and address.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const to).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n as usize,
            frame.len(),
            "send: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut answers = Vec::new();
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 2048];
    let mut cbuf = [0u64; 64];
    while Instant::now() < deadline {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: zeroed sockaddr_ll and msghdr are valid; pointers set to live buffers.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&raw mut from).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        // SAFETY: valid socket and message.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, 0) };
        if n <= 0 {
            continue;
        }
        if from.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        let frame = &buf[..n as usize];
        // The tag: in the frame, or taken off by the kernel (PACKET_AUXDATA).
        let mut vlan = None;
        let mut payload_at = 12;
        if frame.len() >= 18 && u16::from_be_bytes([frame[12], frame[13]]) == 0x8100 {
            vlan = Some(u16::from_be_bytes([frame[14], frame[15]]) & 0x0fff);
            payload_at = 16;
        }
        // SAFETY: walking the control messages the kernel wrote into `msg`.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA {
                    let aux: libc::tpacket_auxdata =
                        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                        vlan = Some(aux.tp_vlan_tci & 0x0fff);
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        // Untagged view: MACs, ethertype, payload.
        let mut plain = frame[..12].to_vec();
        plain.extend_from_slice(&frame[payload_at..]);
        if let Some((key, lladdr)) = parse(&plain) {
            answers.push((
                key,
                Answer {
                    eth_src: plain[6..12].try_into().expect("6 bytes"),
                    lladdr,
                    vlan,
                },
            ));
        }
    }
    answers
}

/// An Ethernet frame, 802.1Q-tagged with `vlan` if given.
fn framed(
    dst: [u8; 6],
    src: [u8; 6],
    vlan: Option<u16>,
    ethertype: u16,
    payload: &[u8],
) -> Vec<u8> {
    match vlan {
        Some(v) => frames::eth_vlan(dst, src, v, ethertype, payload),
        None => frames::eth(dst, src, ethertype, payload),
    }
}

/// Sends an ARP request "who has `target`, tell `src`" out of `iface` in `ns` (tagged with
/// `vlan` if given) and returns every ARP reply for `target` heard within `wait`.
pub fn arp(
    ns: &Netns,
    iface: &str,
    src: Ipv4Addr,
    target: Ipv4Addr,
    vlan: Option<u16>,
    wait: Duration,
) -> Vec<Answer> {
    arp_many(ns, iface, vec![src], target, vlan, wait)
        .remove(&src)
        .unwrap_or_default()
}

/// ARP requests for `target` from each of `sources` at once; the replies heard within `wait`,
/// by requester (a reply names the requester as its target).
pub fn arp_many(
    ns: &Netns,
    iface: &str,
    sources: Vec<Ipv4Addr>,
    target: Ipv4Addr,
    vlan: Option<u16>,
    wait: Duration,
) -> BTreeMap<Ipv4Addr, Vec<Answer>> {
    let iface = iface.to_string();
    ns.run(move || {
        let mac = mac_of(&iface);
        let frames = sources
            .iter()
            .map(|&src| {
                let body = frames::arp(1, mac, src, [0; 6], target);
                framed([0xff; 6], mac, vlan, 0x0806, &body)
            })
            .collect();
        let heard = exchange(&iface, frames, wait, move |f| {
            let a = f.get(14..42)?;
            (u16::from_be_bytes([f[12], f[13]]) == 0x0806
                && u16::from_be_bytes([a[6], a[7]]) == 2
                && a[14..18] == target.octets())
            .then(|| {
                let requester = Ipv4Addr::new(a[24], a[25], a[26], a[27]);
                (requester, Some(a[8..14].try_into().expect("6 bytes")))
            })
        });
        group(sources, heard)
    })
}

/// Sends a neighbour solicitation for `target` from `src` out of `iface` in `ns` (tagged with
/// `vlan` if given) and returns every neighbour advertisement for `target` heard within `wait`.
pub fn neighbour_solicitation(
    ns: &Netns,
    iface: &str,
    src: Ipv6Addr,
    target: Ipv6Addr,
    vlan: Option<u16>,
    wait: Duration,
) -> Vec<Answer> {
    neighbour_solicitations(ns, iface, vec![src], target, vlan, wait)
        .remove(&src)
        .unwrap_or_default()
}

/// Neighbour solicitations for `target` from each of `sources` at once; the advertisements
/// heard within `wait`, by requester (an answer is addressed to it).
pub fn neighbour_solicitations(
    ns: &Netns,
    iface: &str,
    sources: Vec<Ipv6Addr>,
    target: Ipv6Addr,
    vlan: Option<u16>,
    wait: Duration,
) -> BTreeMap<Ipv6Addr, Vec<Answer>> {
    let iface = iface.to_string();
    ns.run(move || {
        let mac = mac_of(&iface);
        let dst = frames::solicited_node(target);
        let d = dst.octets();
        let eth_dst = [0x33, 0x33, d[12], d[13], d[14], d[15]];
        let frames = sources
            .iter()
            .map(|&src| {
                let mut icmp = frames::neighbour_solicitation(target, mac);
                let sum = icmpv6_checksum(src, dst, &icmp);
                icmp[2..4].copy_from_slice(&sum.to_be_bytes());
                let mut ip = frames::ipv6(src, dst, 58, &[], &icmp);
                ip[7] = 255; // NDP requires hop limit 255
                framed(eth_dst, mac, vlan, 0x86dd, &ip)
            })
            .collect();
        let heard = exchange(&iface, frames, wait, move |f| {
            let ip = f.get(14..)?;
            if u16::from_be_bytes([f[12], f[13]]) != 0x86dd || *ip.get(6)? != 58 {
                return None;
            }
            let to: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            let m = ip.get(40..)?;
            if *m.first()? != 136 || m.get(8..24)? != target.octets() {
                return None;
            }
            // Options: the target link-layer address (type 2).
            let mut opts = m.get(24..).unwrap_or_default();
            let mut lladdr = None;
            while opts.len() >= 8 {
                let len = opts[1] as usize * 8;
                if len == 0 || len > opts.len() {
                    break;
                }
                if opts[0] == 2 {
                    lladdr = opts[2..8].try_into().ok();
                }
                opts = &opts[len..];
            }
            Some((Ipv6Addr::from(to), lladdr))
        });
        group(sources, heard)
    })
}

/// The answers by requester, every requester present (an empty list: nobody answered it).
fn group<K: Ord>(sources: Vec<K>, heard: Vec<(K, Answer)>) -> BTreeMap<K, Vec<Answer>> {
    let mut by: BTreeMap<K, Vec<Answer>> = sources.into_iter().map(|k| (k, Vec::new())).collect();
    for (k, a) in heard {
        by.entry(k).or_default().push(a);
    }
    by
}

/// The ICMPv6 checksum of `msg` (checksum field zero) from `src` to `dst`.
pub fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40 + msg.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(msg);
    frames::checksum(&pseudo)
}

/// Arrival times of the UDP datagrams from `src` to port `dst_port` seen on `iface` of a
/// namespace (a peer's view of another member's heartbeats), recorded until stopped.
pub struct UdpTap {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Instant>>>,
}

impl UdpTap {
    pub fn start(ns: &Netns, iface: &str, src: std::net::IpAddr, dst_port: u16) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stop2, iface) = (stop.clone(), iface.to_string());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || {
            let (fd, _) = raw_socket(&iface);
            let _ = ready_tx.send(());
            let mut seen = Vec::new();
            let mut buf = [0u8; 2048];
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: valid socket and buffer (the 20 ms receive timeout bounds the wait).
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                let at = Instant::now();
                if n <= 0 {
                    continue;
                }
                if let Some(u) = crate::attacker::udp(&buf[..n as usize])
                    && u.src == src
                    && u.dst_port == dst_port
                {
                    seen.push(at);
                }
            }
            seen
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("tap did not start");
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the tap; the arrival times.
    pub fn finish(mut self) -> Vec<Instant> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("tap thread")
    }
}

impl Drop for UdpTap {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The longest gap between consecutive arrivals within `[from, to]`.
pub fn longest_gap(arrivals: &[Instant], from: Instant, to: Instant) -> Duration {
    arrivals
        .windows(2)
        .filter(|w| w[1] >= from && w[0] <= to)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}
