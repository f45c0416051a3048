//! Small pieces shared by farmd's raw-socket users (announcements, the witness ping, the drill's
//! probe client).

use std::{
    os::fd::{AsRawFd, OwnedFd},
    time::Duration,
};

/// The Internet checksum (RFC 1071) over `parts` in order, each summed in 16-bit words (an odd
/// last byte padded with zero). Callers zero the checksum field first.
pub fn inet_checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for c in part.chunks(2) {
            sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sets a SOL_SOCKET option to `value`.
fn set_socket_option<T>(fd: &impl AsRawFd, option: libc::c_int, value: &T) -> std::io::Result<()> {
    // SAFETY: valid descriptor, and a pointer to a live value of the given size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as u32,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes blocking receives on `fd` give up after `timeout`.
pub fn set_recv_timeout(fd: &OwnedFd, timeout: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    set_socket_option(fd, libc::SO_RCVTIMEO, &tv)
}

/// Asks the kernel to stamp every datagram received on `fd` with its arrival time
/// (SO_TIMESTAMPNS), read by [`recv_timestamped`].
pub fn enable_rx_timestamps(fd: &impl AsRawFd) -> std::io::Result<()> {
    set_socket_option(fd, libc::SO_TIMESTAMPNS, &(1 as libc::c_int))
}

/// Receives one datagram without blocking: its length, its source, and how long it waited in
/// the socket since the kernel received it (zero without a timestamp).
pub fn recv_timestamped(
    fd: &impl AsRawFd,
    buf: &mut [u8],
) -> std::io::Result<(usize, std::net::SocketAddr, Duration)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for one SCM_TIMESTAMPNS control message, 8-byte aligned.
    let mut control = [0u64; 8];
    // SAFETY: zeroed msghdr and sockaddr_storage are valid initial values.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut name).cast();
    msg.msg_namelen = std::mem::size_of_val(&name) as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: every pointer in msg points to live buffers of the given sizes.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut waited = Duration::ZERO;
    // SAFETY: the CMSG macros walk the control buffer the kernel filled, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                let mut now = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                libc::clock_gettime(libc::CLOCK_REALTIME, &mut now);
                let ns = |t: &libc::timespec| t.tv_sec as i128 * 1_000_000_000 + t.tv_nsec as i128;
                // A wall-clock step between the two readings gives nonsense: clamp to [0, 10 s].
                let d = (ns(&now) - ns(&ts)).clamp(0, 10_000_000_000);
                waited = Duration::from_nanos(d as u64);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let from = sockaddr_to_std(&name).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "datagram without an IP source",
        )
    })?;
    Ok((n as usize, from, waited))
}

/// An IPv4 or IPv6 socket address as the kernel filled it in.
pub fn sockaddr_to_std(s: &libc::sockaddr_storage) -> Option<std::net::SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a: libc::sockaddr_in =
                unsafe { std::ptr::read((s as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a: libc::sockaddr_in6 =
                unsafe { std::ptr::read((s as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the sum of these words is 0xddf2, its complement 0x220d.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(inet_checksum(&[&data]), 0x220d);
        assert_eq!(inet_checksum(&[&data[..4], &data[4..]]), 0x220d);
    }
}
