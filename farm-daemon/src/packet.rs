//! Small pieces shared by farmd's raw-socket users (announcements, the witness ping, the drill's
//! probe client).

use std::{
    os::fd::{AsRawFd as _, OwnedFd},
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

/// Makes blocking receives on `fd` give up after `timeout`.
pub fn set_recv_timeout(fd: &OwnedFd, timeout: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: valid descriptor, option pointer and length.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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
