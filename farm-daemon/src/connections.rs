//! Handover accounting: how many live TCP connections this member still holds in the buckets
//! it hands over. Asked of the kernel with sock_diag (NETLINK_SOCK_DIAG), filtered by state in
//! the kernel: TIME_WAIT, closed and listening sockets are never sent, so the cost follows the
//! live connections, not every socket the host holds (reading `/proc/net/tcp`, as farmd did
//! before, formats and parses every TIME_WAIT socket each time: 2k-24k per member on a busy web
//! farm).
//!
//! Runs on a thread of its own (`farm-accounting`), handed requests by the main loop and
//! answering through a channel: nothing here can delay heartbeats or the main loop.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use farm_common::{BUCKETS, BucketKey, HashKey, affinity, bucket_of, proto_mask};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use crate::{config::Vip, transition::View};

#[derive(Debug, thiserror::Error)]
pub enum ConnectionsError {
    #[error("sock_diag socket: {0}")]
    Socket(std::io::Error),
    #[error("sock_diag answer: {0}")]
    Decode(String),
    #[error("sock_diag refused the dump (errno {0})")]
    Refused(i32),
}

/// The TCP states in which a connection still needs its packets: everything but TIME_WAIT,
/// CLOSE and LISTEN.
pub fn live_states() -> StateFlags {
    StateFlags::all() - StateFlags::TIME_WAIT - StateFlags::CLOSE - StateFlags::LISTEN
}

/// One live TCP socket as sock_diag reports it: (local address, local port, remote address,
/// remote port), IPv4-mapped IPv6 addresses given as IPv4.
pub type Socket4 = (IpAddr, u16, IpAddr, u16);

fn unmap(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

/// Every TCP socket of this network namespace in a live state (see `live_states`).
pub fn live_tcp_sockets() -> Result<Vec<Socket4>, ConnectionsError> {
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump(family, live_states(), &mut out)?;
    }
    Ok(out)
}

fn dump(family: u8, states: StateFlags, out: &mut Vec<Socket4>) -> Result<(), ConnectionsError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(ConnectionsError::Socket)?;
    socket.bind_auto().map_err(ConnectionsError::Socket)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(ConnectionsError::Socket)?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf[..]);
    socket.send(&buf, 0).map_err(ConnectionsError::Socket)?;
    let mut rx = vec![0u8; 64 * 1024];
    loop {
        let n = socket
            .recv(&mut &mut rx[..], 0)
            .map_err(ConnectionsError::Socket)?;
        let mut offset = 0;
        while offset < n {
            let m = <NetlinkMessage<SockDiagMessage>>::deserialize(&rx[offset..n])
                .map_err(|e| ConnectionsError::Decode(e.to_string()))?;
            let len = m.header.length as usize;
            match m.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let id = &r.header.socket_id;
                    out.push((
                        unmap(id.source_address),
                        id.source_port,
                        unmap(id.destination_address),
                        id.destination_port,
                    ));
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(ConnectionsError::Refused(e.code.map_or(0, |c| c.get())));
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

/// The connections among `sockets` that a VIP of `vips` holds in one of `buckets` (a set of
/// 65536 flags): the client's bucket computed as the data plane does.
pub fn count_in(sockets: &[Socket4], vips: &[Vip], seed: &HashKey, buckets: &[bool]) -> usize {
    let mut n = 0;
    for &(local, lport, remote, rport) in sockets {
        let Some(vip) = vips.iter().find(|v| v.address == local) else {
            continue;
        };
        let conn = vip.rules.iter().any(|r| {
            r.protocols & proto_mask::TCP != 0
                && (r.port_lo..=r.port_hi).contains(&lport)
                && r.affinity == affinity::CONNECTION
        });
        let key = match (remote, conn) {
            (IpAddr::V4(a), false) => BucketKey::V4(a.octets()),
            (IpAddr::V4(a), true) => BucketKey::V4Port(a.octets(), rport.to_be_bytes()),
            (IpAddr::V6(a), false) => BucketKey::V6(a.octets()),
            (IpAddr::V6(a), true) => BucketKey::V6Port(a.octets(), rport.to_be_bytes()),
        };
        if buckets
            .get(bucket_of(seed, key) as usize)
            .copied()
            .unwrap_or(false)
        {
            n += 1;
        }
    }
    n
}

/// A count the main loop asks for: the connections in `buckets` (handed over for `target`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountRequest {
    pub target: View,
    pub buckets: Vec<u32>,
    pub vips: Vec<Vip>,
    /// When the count was asked for (a count proves nothing about connections opened after).
    pub asked: Instant,
}

/// Its answer.
#[derive(Debug, Clone)]
pub struct Counted {
    pub target: View,
    pub asked: Instant,
    /// `None` when the kernel could not be asked (logged; the move then ends by its timeout).
    pub connections: Option<usize>,
    pub took: Duration,
}

/// The accounting thread: answers count requests, one at a time, in order.
pub struct Accounting {
    requests: std::sync::mpsc::Sender<CountRequest>,
}

impl Accounting {
    pub fn start(
        seed: HashKey,
        answers: tokio::sync::mpsc::UnboundedSender<Counted>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<CountRequest>();
        std::thread::Builder::new()
            .name("farm-accounting".into())
            .spawn(move || {
                let mut set = vec![false; BUCKETS as usize];
                let mut failing = false;
                while let Ok(req) = rx.recv() {
                    let t0 = Instant::now();
                    set.iter_mut().for_each(|b| *b = false);
                    for &b in &req.buckets {
                        if let Some(f) = set.get_mut(b as usize) {
                            *f = true;
                        }
                    }
                    let connections = match live_tcp_sockets() {
                        Ok(s) => {
                            failing = false;
                            Some(count_in(&s, &req.vips, &seed, &set))
                        }
                        Err(e) => {
                            if !failing {
                                tracing::error!(
                                    "counting the connections of the buckets handed over: {e}; \
                                     moves end by their drain timeout"
                                );
                            }
                            failing = true;
                            None
                        }
                    };
                    let a = Counted {
                        target: req.target,
                        asked: req.asked,
                        connections,
                        took: t0.elapsed(),
                    };
                    if answers.send(a).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self { requests: tx })
    }

    /// Asks for a count; the answer comes on the channel given to `start`.
    pub fn ask(&self, req: CountRequest) {
        let _ = self.requests.send(req);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Rule;

    fn vip(a: &str, affinity: u8) -> Vip {
        Vip {
            address: a.parse().unwrap(),
            rules: vec![Rule {
                protocols: proto_mask::TCP,
                port_lo: 80,
                port_hi: 80,
                affinity,
            }],
        }
    }

    #[test]
    fn connections_are_counted_by_the_bucket_of_their_client() {
        let seed = HashKey::from_bytes(&[7; 16]);
        let vips = [vip("10.0.0.100", affinity::CLIENT)];
        let client: IpAddr = "10.0.1.5".parse().unwrap();
        let b = bucket_of(&seed, BucketKey::V4([10, 0, 1, 5])) as usize;
        let mut set = vec![false; BUCKETS as usize];
        let vip_addr: IpAddr = "10.0.0.100".parse().unwrap();
        let other: IpAddr = "10.0.0.1".parse().unwrap();
        let sockets = vec![
            (vip_addr, 80, client, 40000),
            (vip_addr, 80, client, 40001),
            // Not to a VIP: the member's own address.
            (other, 80, client, 40002),
        ];
        assert_eq!(count_in(&sockets, &vips, &seed, &set), 0);
        set[b] = true;
        assert_eq!(count_in(&sockets, &vips, &seed, &set), 2);
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_ipv4() {
        assert_eq!(
            unmap("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert!(!live_states().contains(StateFlags::TIME_WAIT));
        assert!(live_states().contains(StateFlags::ESTABLISHED | StateFlags::FIN_WAIT2));
    }

    #[test]
    fn sock_diag_sees_a_live_connection_and_not_its_listener() {
        // Unprivileged: sock_diag dumps this namespace's sockets to anyone.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_s, _) = l.accept().unwrap();
        let sockets = live_tcp_sockets().unwrap();
        let local = c.local_addr().unwrap().port();
        assert!(
            sockets
                .iter()
                .any(|&(_, lp, _, rp)| lp == local && rp == port),
            "the client's side is listed"
        );
        assert!(
            !sockets
                .iter()
                .any(|&(_, lp, r, _)| lp == port && r.is_unspecified()),
            "the listener is not"
        );
    }
}
