//! Announcing the VIPs: gratuitous ARP (IPv4) and unsolicited neighbour advertisements (IPv6)
//! that map each VIP to the cluster MAC, so switches and clients learn it at once. The Ethernet
//! source is the member's own MAC: the cluster MAC is never a source address, so switches never
//! learn it on one port and keep flooding it to every member.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, thiserror::Error)]
#[error("sending an announcement on interface index {ifindex}: {source}")]
pub struct AnnounceError {
    ifindex: u32,
    source: std::io::Error,
}

/// A gratuitous ARP request: "who has VIP? tell VIP (at the cluster MAC)".
pub fn garp_frame(src_mac: [u8; 6], cluster_mac: [u8; 6], vip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&cluster_mac);
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&vip.octets());
    f.resize(60, 0);
    f
}

/// An unsolicited neighbour advertisement to all nodes, Override set, with the cluster MAC.
pub fn unsolicited_na_frame(src_mac: [u8; 6], cluster_mac: [u8; 6], vip: Ipv6Addr) -> Vec<u8> {
    let all_nodes: Ipv6Addr = "ff02::1".parse().expect("valid");
    let mut icmp = Vec::with_capacity(32);
    icmp.extend_from_slice(&[136, 0, 0, 0, 0x20, 0, 0, 0]);
    icmp.extend_from_slice(&vip.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&cluster_mac);
    let sum = icmpv6_checksum(&vip, &all_nodes, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());

    let mut f = Vec::with_capacity(14 + 40 + icmp.len());
    f.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&all_nodes.octets());
    f.extend_from_slice(&icmp);
    f
}

/// The ICMPv6 checksum (pseudo-header included) of `msg`, whose checksum field is zero.
pub fn icmpv6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, msg: &[u8]) -> u16 {
    crate::packet::inet_checksum(&[
        &src.octets(),
        &dst.octets(),
        &(msg.len() as u32).to_be_bytes(),
        &[0, 0, 0, 58],
        msg,
    ])
}

/// Sends raw frames on one interface.
pub struct Announcer {
    fd: std::os::fd::OwnedFd,
    ifindex: u32,
}

impl Announcer {
    pub fn new(ifindex: u32) -> Result<Self, AnnounceError> {
        let err = |source| AnnounceError { ifindex, source };
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh, owned descriptor.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Self { fd, ifindex })
    }

    pub fn send(&self, frame: &[u8]) -> Result<(), AnnounceError> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: zeroed sockaddr_ll is valid; we fill the fields sendto needs.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: buffer and address are valid for the given lengths.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(AnnounceError {
                ifindex: self.ifindex,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Announces every VIP once.
    pub fn announce(
        &self,
        src_mac: [u8; 6],
        cluster_mac: [u8; 6],
        vips: impl IntoIterator<Item = IpAddr>,
    ) -> Result<(), AnnounceError> {
        for vip in vips {
            let frame = match vip {
                IpAddr::V4(v4) => garp_frame(src_mac, cluster_mac, v4),
                IpAddr::V6(v6) => unsolicited_na_frame(src_mac, cluster_mac, v6),
            };
            self.send(&frame)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_layout() {
        let f = garp_frame(
            [2, 0, 0, 0, 0, 1],
            [2, 0xfa, 1, 2, 3, 4],
            "10.0.0.100".parse().unwrap(),
        );
        assert_eq!(f.len(), 60);
        assert_eq!(&f[12..14], &[8, 6]);
        assert_eq!(
            &f[22..28],
            &[2, 0xfa, 1, 2, 3, 4],
            "sender MAC is the cluster MAC"
        );
        assert_eq!(&f[28..32], &[10, 0, 0, 100]);
        assert_eq!(&f[38..42], &[10, 0, 0, 100]);
        assert_eq!(
            &f[6..12],
            &[2, 0, 0, 0, 0, 1],
            "Ethernet source is the member's MAC"
        );
    }

    #[test]
    fn na_checksum_verifies() {
        let vip: Ipv6Addr = "fd00::100".parse().unwrap();
        let f = unsolicited_na_frame([2, 0, 0, 0, 0, 1], [2, 0xfa, 1, 2, 3, 4], vip);
        let icmp = &f[54..];
        // Recomputing over the message with its checksum in place gives 0.
        let mut zeroed = icmp.to_vec();
        zeroed[2] = 0;
        zeroed[3] = 0;
        let all: Ipv6Addr = "ff02::1".parse().unwrap();
        assert_eq!(
            icmpv6_checksum(&vip, &all, &zeroed),
            u16::from_be_bytes([icmp[2], icmp[3]])
        );
        assert_eq!(icmp[0], 136);
        assert_eq!(&icmp[26..32], &[2, 0xfa, 1, 2, 3, 4]);
    }
}
