//! The replication protocol between primary and secondary, over one TCP connection.
//!
//! A session starts with a handshake that proves both ends hold the cluster key (HMAC-SHA256
//! with the mirror key derived from it) and agrees on a session key from two fresh nonces.
//! After it, every frame is
//!
//! ```text
//! length (u32, big-endian, of what follows)  |  message (postcard)  |  tag (16 bytes)
//! ```
//!
//! where the tag is HMAC-SHA256(session key, direction || frame number || message), truncated.
//! Frame numbers are implicit (each side counts), so a frame that is altered, replayed,
//! dropped or reordered fails authentication and ends the session.

use std::io::{Read, Write};

use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

const MAGIC: [u8; 4] = *b"FRMM";
const VERSION: u8 = 2;
const TAG: usize = 16;
/// The largest frame accepted (a write of up to 1 MiB plus its path).
pub const MAX_FRAME: usize = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer is not a farm mirror of this version")]
    Foreign,
    #[error("authentication failed (another cluster key, or the stream was altered)")]
    BadTag,
    #[error("frame of {0} bytes is too large")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// A path relative to the replicated directory, as bytes (`a/b/c`; empty: the directory
/// itself). Checked by the secondary before use (see `replica::resolve`).
pub type RelPath = Vec<u8>;

/// `parent/name` as a relative path (`name` alone under the root).
pub fn join(parent: &[u8], name: &[u8]) -> RelPath {
    let mut p = parent.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// A change to the replicated directory, as the primary made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Empty the replica (the start of a full copy).
    Reset,
    Write {
        path: RelPath,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Truncate {
        path: RelPath,
        size: u64,
    },
    /// A new regular file (or an existing one opened with O_CREAT: its mode is set).
    Create {
        path: RelPath,
        mode: u32,
    },
    Mkdir {
        path: RelPath,
        mode: u32,
    },
    Mknod {
        path: RelPath,
        mode: u32,
        rdev: u64,
    },
    Unlink {
        path: RelPath,
    },
    Rmdir {
        path: RelPath,
    },
    Rename {
        from: RelPath,
        to: RelPath,
        flags: u32,
    },
    /// A new name `to` for the existing file `from`.
    Link {
        from: RelPath,
        to: RelPath,
    },
    Symlink {
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
        path: RelPath,
    },
    Chmod {
        path: RelPath,
        mode: u32,
    },
    Chown {
        path: RelPath,
        uid: Option<u32>,
        gid: Option<u32>,
    },
    /// Access and modification times, (seconds, nanoseconds); `None` leaves one as it is.
    Times {
        path: RelPath,
        atime: Option<(i64, u32)>,
        mtime: Option<(i64, u32)>,
    },
    Fallocate {
        path: RelPath,
        mode: i32,
        offset: u64,
        len: u64,
    },
    /// Remove an entry whatever it is, a directory with everything in it (resync).
    RemoveAll {
        path: RelPath,
    },
}

impl Op {
    /// Bytes of file data it carries (for the in-flight bound).
    pub fn data_len(&self) -> usize {
        match self {
            Op::Write { data, .. } => data.len(),
            _ => 0,
        }
    }

    /// The paths it changes (for the change record while the replica is out of sync).
    pub fn paths(&self) -> [Option<&RelPath>; 2] {
        match self {
            Op::Reset => [None, None],
            Op::Rename { from, to, .. } | Op::Link { from, to } => [Some(from), Some(to)],
            Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::Create { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Mknod { path, .. }
            | Op::Unlink { path }
            | Op::Rmdir { path }
            | Op::Symlink { path, .. }
            | Op::Chmod { path, .. }
            | Op::Chown { path, .. }
            | Op::Times { path, .. }
            | Op::Fallocate { path, .. }
            | Op::RemoveAll { path } => [Some(path), None],
        }
    }
}

/// What an entry of the replica is (resync compares it with the primary's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Dir,
    File,
    Symlink(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A FIFO, socket or device node.
    Other {
        rdev: u64,
    },
}

/// An entry of the replica as the secondary describes it during a resync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: RelPath,
    pub kind: Kind,
    /// Permission bits and file type bits (st_mode).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, u32),
    /// The replica's inode number (hard links share one).
    pub ino: u64,
}

/// A message of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// Primary to secondary: apply.
    Op(Op),
    /// Primary to secondary: make everything sent so far durable, then acknowledge.
    Sync {
        barrier: u64,
    },
    /// Secondary to primary: everything up to this barrier is durable here.
    Ack {
        barrier: u64,
    },
    /// Secondary to primary: an operation could not be applied; the replica is out of sync.
    Failed {
        message: String,
    },
    /// Primary to secondary: a resync of generation `generation` begins; the replica is out of
    /// sync until it ends (answered with `Resyncing`).
    Resync {
        generation: u64,
    },
    /// Secondary to primary: the replica's state before the resync began.
    Resyncing {
        generation: u64,
        synced: bool,
    },
    /// Primary to secondary: describe every entry (answered with `Entry`s, then `EntriesEnd`).
    List,
    Entry(Entry),
    EntriesEnd,
    /// Primary to secondary: describe one entry and, for a file, the checksums of its blocks
    /// (answered with `Probed`).
    Probe {
        path: RelPath,
    },
    Probed {
        path: RelPath,
        entry: Option<Entry>,
        block_size: u64,
        /// Truncated SHA-256 of each block (the last one may be short).
        blocks: Vec<[u8; 16]>,
    },
    /// Primary to secondary: with the next barrier the replica is in sync at `generation`
    /// (recorded durably before that barrier is acknowledged).
    InSync {
        generation: u64,
    },
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    // SAFETY: getrandom fills the buffer it is given.
    let got = unsafe { libc::getrandom(n.as_mut_ptr().cast(), n.len(), 0) };
    assert_eq!(got, 16, "getrandom");
    n
}

/// Which way a frame goes (part of its tag, so a frame cannot be reflected back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToSecondary = 1,
    ToPrimary = 2,
}

/// One direction of an authenticated session.
pub struct Framed<S> {
    stream: S,
    key: [u8; 32],
    direction: Direction,
    frame: u64,
}

impl<S> Framed<S> {
    fn tag(&self, body: &[u8]) -> [u8; 32] {
        hmac(
            &self.key,
            &[&[self.direction as u8], &self.frame.to_be_bytes(), body],
        )
    }
}

impl<S: Write> Framed<S> {
    pub fn send(&mut self, m: &Msg) -> Result<(), WireError> {
        let body = postcard::to_stdvec(m).map_err(|e| WireError::Malformed(e.to_string()))?;
        let tag = self.tag(&body);
        let len = body.len() + TAG;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        let mut frame = Vec::with_capacity(4 + len);
        frame.extend_from_slice(&(len as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        frame.extend_from_slice(&tag[..TAG]);
        self.stream.write_all(&frame)?;
        self.frame += 1;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), WireError> {
        Ok(self.stream.flush()?)
    }
}

impl<S: Read> Framed<S> {
    pub fn recv(&mut self) -> Result<Msg, WireError> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        if len < TAG {
            return Err(WireError::Malformed("short frame".into()));
        }
        let mut buf = vec![0u8; len];
        self.stream.read_exact(&mut buf)?;
        let (body, tag) = buf.split_at(len - TAG);
        if !equal(&self.tag(body)[..TAG], tag) {
            return Err(WireError::BadTag);
        }
        self.frame += 1;
        postcard::from_bytes(body).map_err(|e| WireError::Malformed(e.to_string()))
    }
}

fn session_key(key: &[u8; 32], np: &[u8; 16], ns: &[u8; 16]) -> [u8; 32] {
    hmac(key, &[b"session", np, ns])
}

/// The primary's side of the handshake: returns (to the secondary, from it).
pub fn connect<R: Read, W: Write>(
    mut r: R,
    mut w: W,
    key: &[u8; 32],
) -> Result<(Framed<W>, Framed<R>), WireError> {
    let np = nonce();
    let mut hello = Vec::with_capacity(4 + 1 + 16 + 32);
    hello.extend_from_slice(&MAGIC);
    hello.push(VERSION);
    hello.extend_from_slice(&np);
    let tag = hmac(key, &[b"hello", &hello]);
    hello.extend_from_slice(&tag);
    w.write_all(&hello)?;
    w.flush()?;
    let mut answer = [0u8; 4 + 1 + 16 + 32];
    r.read_exact(&mut answer)?;
    if answer[..4] != MAGIC || answer[4] != VERSION {
        return Err(WireError::Foreign);
    }
    let ns: [u8; 16] = answer[5..21].try_into().expect("16 bytes");
    if !equal(&hmac(key, &[b"welcome", &np, &answer[..21]]), &answer[21..]) {
        return Err(WireError::BadTag);
    }
    let k = session_key(key, &np, &ns);
    Ok((
        Framed {
            stream: w,
            key: k,
            direction: Direction::ToSecondary,
            frame: 0,
        },
        Framed {
            stream: r,
            key: k,
            direction: Direction::ToPrimary,
            frame: 0,
        },
    ))
}

/// The secondary's side of the handshake: returns (from the primary, to it).
pub fn accept<R: Read, W: Write>(
    mut r: R,
    mut w: W,
    key: &[u8; 32],
) -> Result<(Framed<R>, Framed<W>), WireError> {
    let mut hello = [0u8; 4 + 1 + 16 + 32];
    r.read_exact(&mut hello)?;
    if hello[..4] != MAGIC || hello[4] != VERSION {
        return Err(WireError::Foreign);
    }
    if !equal(&hmac(key, &[b"hello", &hello[..21]]), &hello[21..]) {
        return Err(WireError::BadTag);
    }
    let np: [u8; 16] = hello[5..21].try_into().expect("16 bytes");
    let ns = nonce();
    let mut answer = Vec::with_capacity(53);
    answer.extend_from_slice(&MAGIC);
    answer.push(VERSION);
    answer.extend_from_slice(&ns);
    let tag = hmac(key, &[b"welcome", &np, &answer]);
    answer.extend_from_slice(&tag);
    w.write_all(&answer)?;
    w.flush()?;
    let k = session_key(key, &np, &ns);
    Ok((
        Framed {
            stream: r,
            key: k,
            direction: Direction::ToSecondary,
            frame: 0,
        },
        Framed {
            stream: w,
            key: k,
            direction: Direction::ToPrimary,
            frame: 0,
        },
    ))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    fn pair(
        kp: [u8; 32],
        ks: [u8; 32],
    ) -> Result<(Framed<UnixStream>, Framed<UnixStream>), String> {
        let (a, b) = UnixStream::pair().expect("pair");
        let secondary = std::thread::spawn(move || {
            accept(b.try_clone().expect("clone"), b, &ks).map(|(from, _to)| from)
        });
        let primary = connect(a.try_clone().expect("clone"), a, &kp);
        let from = secondary.join().expect("thread");
        match (primary, from) {
            (Ok((to, _)), Ok(from)) => Ok((to, from)),
            (p, s) => Err(format!("{:?} / {:?}", p.err(), s.err())),
        }
    }

    #[test]
    fn a_session_carries_messages_in_order() {
        let (mut to, mut from) = pair([1; 32], [1; 32]).expect("session");
        let msgs = vec![
            Msg::Op(Op::Write {
                path: b"db/wal".to_vec(),
                offset: 4096,
                data: vec![7; 10_000],
            }),
            Msg::Op(Op::Rename {
                from: b"a".to_vec(),
                to: b"b".to_vec(),
                flags: 0,
            }),
            Msg::Sync { barrier: 9 },
        ];
        for m in &msgs {
            to.send(m).expect("send");
        }
        for m in &msgs {
            assert_eq!(&from.recv().expect("recv"), m);
        }
    }

    #[test]
    fn another_key_is_refused_at_the_handshake() {
        assert!(pair([1; 32], [2; 32]).is_err());
    }

    #[test]
    fn an_altered_or_replayed_frame_is_refused() {
        let key = [3; 32];
        let mut to = Framed {
            stream: Vec::new(),
            key,
            direction: Direction::ToSecondary,
            frame: 0,
        };
        to.send(&Msg::Sync { barrier: 1 }).expect("send");
        let one = to.stream.clone();
        let reader = |bytes: Vec<u8>| Framed {
            stream: std::io::Cursor::new(bytes),
            key,
            direction: Direction::ToSecondary,
            frame: 0,
        };
        assert_eq!(
            reader(one.clone()).recv().expect("ok"),
            Msg::Sync { barrier: 1 }
        );
        let mut altered = one.clone();
        altered[5] ^= 1;
        assert!(matches!(reader(altered).recv(), Err(WireError::BadTag)));
        // The same frame twice: the second is frame 1 and fails.
        let mut twice = one.clone();
        twice.extend_from_slice(&one);
        let mut r = reader(twice);
        r.recv().expect("first");
        assert!(matches!(r.recv(), Err(WireError::BadTag)));
        // Reflected: a frame sent to the secondary is not one from it.
        let mut back = reader(one);
        back.direction = Direction::ToPrimary;
        assert!(matches!(back.recv(), Err(WireError::BadTag)));
        // Oversized length prefix.
        let mut huge = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        huge.extend_from_slice(&[0; 32]);
        assert!(matches!(reader(huge).recv(), Err(WireError::TooLarge(_))));
    }
}
