//! farmd replaced in place by a new binary (`farmctl upgrade`), unnoticed by the farm.
//!
//! The running farmd starts the new binary with the same arguments and one end of a Unix
//! socket pair (its number in `FARMD_UPGRADE_FD`), and the two speak this protocol over it:
//!
//! 1. **Offer** (old -> new), with the descriptors that must not be reopened: the state
//!    directory's lock, the control socket, the metrics listener and the heartbeat sockets (a
//!    datagram queued in them is read by the new farmd, none is lost). The maps are pinned
//!    under the pin directory, by name, in a directory named after their layout version.
//! 2. **Ready** (new -> old): it loaded its programs over those maps (the verifier ran) and
//!    holds everything else; nothing on the host has changed yet. Or **Failed**, and the old
//!    farmd goes on as if nothing happened.
//! 3. **Commit** (old -> new), at a quiet point only (no bucket move, drill or stop in
//!    progress): the old farmd's heartbeat thread stops sending and hands over the membership
//!    (incarnation, sequence, replay guards, every peer as last judged), and the node core its
//!    settled map, state and health.
//! 4. **Done** (new -> old): the pinned XDP and tc links now run the new programs (one
//!    `BPF_LINK_UPDATE` each: the interface is never without a program) and its heartbeat
//!    thread goes on with the next sequence number. The old farmd exits without touching the
//!    host. No answer within the time allowed, or **Failed**: the old farmd moves the links
//!    back to its own programs and its heartbeats resume after whatever the new one sent.
//!
//! The peers see one heartbeat interval plus a few milliseconds between two heartbeats of the
//! same incarnation: no loss, no restart, no bucket move.

use std::{
    io::{IoSlice, IoSliceMut, Read as _, Write as _},
    net::IpAddr,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

use crate::{membership::Membership, node::NodeSnapshot};

/// The environment variable that tells a farmd it takes over (the socket's descriptor).
pub const ENV_FD: &str = "FARMD_UPGRADE_FD";
/// This protocol's version: a farmd takes over only from one that speaks the same.
pub const PROTOCOL: u32 = 1;
/// At most this many descriptors travel with one message.
const MAX_FDS: usize = 16;
/// A message is at most this long (a membership of 64 members is a few tens of kB).
const MAX_MESSAGE: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("upgrade socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("upgrade socket: {0}")]
    Sys(#[from] nix::Error),
    #[error("upgrade message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the other farmd closed the upgrade socket")]
    Closed,
    #[error("upgrade: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("upgrade: {0}")]
    Refused(String),
}

/// What the old farmd offers (see the module's documentation).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Offer {
    pub protocol: u32,
    /// The old farmd's version (`CARGO_PKG_VERSION`) and pid.
    pub from_version: String,
    pub from_pid: u32,
    /// The maps' layout version and where they are pinned.
    pub map_layout: u32,
    pub maps_dir: PathBuf,
    /// Where the links are pinned, and the XDP attach mode in use.
    pub pin_dir: PathBuf,
    pub xdp_mode: String,
    /// What the old farmd runs, for the new one to check its configuration file against
    /// (a file edited but not reloaded is refused: `farmctl reload` first).
    pub members: Vec<(String, u32)>,
    pub me: usize,
    pub interface: String,
    pub vips: Vec<IpAddr>,
    pub heartbeat_port: u16,
    /// The host changes the old farmd made, for the new one to undo when it stops.
    pub undo: serde_json::Value,
    pub lock_path: PathBuf,
    /// Descriptors attached, in this order: lock, control socket, metrics listener (if
    /// `metrics`), heartbeat sockets (`heartbeat_sockets` of them).
    pub metrics: bool,
    pub heartbeat_sockets: usize,
    /// Counters the status page shows, carried on.
    pub failovers: u64,
}

/// The state handed over at the quiet point.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Commit {
    pub membership: Membership,
    pub node: NodeSnapshot,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Message {
    Offer(Box<Offer>),
    Ready {
        pid: u32,
    },
    Commit(Box<Commit>),
    Done {
        pid: u32,
        xdp_program_id: u32,
        xdp_link_id: u32,
    },
    Failed {
        error: String,
    },
}

impl Message {
    fn name(&self) -> String {
        match self {
            Message::Offer(_) => "offer".into(),
            Message::Ready { .. } => "ready".into(),
            Message::Commit(_) => "commit".into(),
            Message::Done { .. } => "done".into(),
            Message::Failed { error } => format!("failed: {error}"),
        }
    }
}

/// Sends `msg` (length-prefixed JSON) with `fds` attached to its first byte.
pub fn send(sock: &UnixStream, msg: &Message, fds: &[RawFd]) -> Result<(), UpgradeError> {
    let body = serde_json::to_vec(msg)?;
    let mut buf = (body.len() as u32).to_be_bytes().to_vec();
    buf.extend_from_slice(&body);
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    let n = sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&buf)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    (&*sock).write_all(&buf[n..])?;
    Ok(())
}

/// Receives one message and the descriptors attached to it, waiting at most `timeout`.
pub fn recv(sock: &UnixStream, timeout: Duration) -> Result<(Message, Vec<OwnedFd>), UpgradeError> {
    sock.set_read_timeout(Some(timeout))?;
    let mut header = [0u8; 4];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (got, fds) = {
        let mut iov = [IoSliceMut::new(&mut header)];
        let r = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| match e {
            nix::Error::EAGAIN => UpgradeError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            )),
            e => UpgradeError::Sys(e),
        })?;
        let mut fds = Vec::new();
        for c in r.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: descriptors the kernel just installed in this process for us.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (r.bytes, fds)
    };
    if got == 0 {
        return Err(UpgradeError::Closed);
    }
    (&*sock).read_exact(&mut header[got..])?;
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_MESSAGE {
        return Err(UpgradeError::Refused(format!("a message of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    (&*sock).read_exact(&mut body)?;
    Ok((serde_json::from_slice(&body)?, fds))
}

/// Receives a message and checks it is the one expected (`Failed` becomes the error).
pub fn expect(
    sock: &UnixStream,
    timeout: Duration,
    expected: &'static str,
    is: impl Fn(&Message) -> bool,
) -> Result<(Message, Vec<OwnedFd>), UpgradeError> {
    let (m, fds) = recv(sock, timeout)?;
    match m {
        Message::Failed { error } => Err(UpgradeError::Refused(error)),
        m if is(&m) => Ok((m, fds)),
        m => Err(UpgradeError::Unexpected {
            expected,
            got: m.name(),
        }),
    }
}

/// Where the maps are pinned for the farmd taking over: by layout version, so a build with
/// another layout never opens them as its own.
pub fn maps_dir(pin_dir: &Path, layout: u32) -> PathBuf {
    pin_dir.join(format!("upgrade-maps-v{layout}"))
}

/// Brings maps pinned with layout `from` to this build's (`farm_common::MAP_LAYOUT`). Layout 1
/// is the first: there is nothing to migrate from yet. A build that changes the layout adds
/// the step from the previous one here (read the old maps by pin, fill the new ones, pin them
/// under `maps_dir(pin_dir, MAP_LAYOUT)`); until then a differing layout is refused and the
/// old farmd goes on serving.
pub fn migrate(from: u32, _maps: &Path) -> Result<(), UpgradeError> {
    let to = farm_common::MAP_LAYOUT;
    if from == to {
        return Ok(());
    }
    Err(UpgradeError::Refused(format!(
        "the running farmd's maps have layout {from}, this build's {to}, and this build knows \
         no migration between them: restart farmd instead (a drain: `systemctl restart farmd`)"
    )))
}

/// Clears close-on-exec on `fd`, so that the new binary inherits it.
pub fn inheritable(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor this process owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The socket a farmd started to take over was given, if it was (see `ENV_FD`).
pub fn from_env() -> Option<Result<UnixStream, UpgradeError>> {
    let v = std::env::var(ENV_FD).ok()?;
    // SAFETY: removing our own variable before any other thread reads the environment
    // (called first thing in main).
    unsafe { std::env::remove_var(ENV_FD) };
    Some(match v.parse::<RawFd>() {
        Ok(fd) if fd > 2 => {
            // SAFETY: the descriptor the old farmd handed this process for this purpose.
            let s = unsafe { UnixStream::from_raw_fd(fd) };
            // Not inherited further (a health check's command must not hold it).
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
            Ok(s)
        }
        _ => Err(UpgradeError::Refused(format!(
            "{ENV_FD}={v} is no descriptor"
        ))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_descriptors_cross_the_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile_fd();
        let big = Message::Failed {
            error: "x".repeat(300_000),
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                send(&a, &Message::Ready { pid: 7 }, &[file.as_raw_fd()]).unwrap();
                send(&a, &big, &[]).unwrap();
            });
            let (m, fds) = recv(&b, Duration::from_secs(5)).unwrap();
            assert!(matches!(m, Message::Ready { pid: 7 }));
            assert_eq!(fds.len(), 1);
            // The same open file: what one writes, the other's offset shows.
            let mut f = std::fs::File::from(fds.into_iter().next().unwrap());
            f.write_all(b"hello").unwrap();
            let err = expect(&b, Duration::from_secs(5), "ready", |m| {
                matches!(m, Message::Ready { .. })
            })
            .unwrap_err();
            assert!(matches!(err, UpgradeError::Refused(e) if e.len() == 300_000));
        });
        let mut f = std::fs::File::from(file);
        use std::io::Seek as _;
        assert_eq!(f.stream_position().unwrap(), 5);
    }

    #[test]
    fn a_silent_peer_times_out_and_a_closed_one_is_said() {
        let (a, b) = UnixStream::pair().unwrap();
        let e = recv(&b, Duration::from_millis(50)).unwrap_err();
        assert!(e.to_string().contains("no answer"), "{e}");
        drop(a);
        assert!(matches!(
            recv(&b, Duration::from_millis(50)),
            Err(UpgradeError::Closed)
        ));
    }

    #[test]
    fn only_the_same_layout_is_adopted_without_a_migration() {
        let dir = Path::new("/nonexistent");
        assert!(migrate(farm_common::MAP_LAYOUT, dir).is_ok());
        let e = migrate(farm_common::MAP_LAYOUT + 1, dir).unwrap_err();
        assert!(e.to_string().contains("restart farmd"), "{e}");
    }

    fn tempfile_fd() -> OwnedFd {
        let path = std::env::temp_dir().join(format!("farm-upgrade-test-{}", std::process::id()));
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        f.into()
    }
}
