//! The replication protocol between primary and secondary, over one TCP connection.
//!
//! A session starts with a three-message handshake authenticated with the mirror group's key
//! (HMAC-SHA256) and an ephemeral X25519 exchange:
//!
//! ```text
//! primary   -> hello    magic, version, nonce P, ephemeral key P, tag(hello)
//! secondary -> welcome  magic, version, nonce S, ephemeral key S, tag(hello, welcome)
//! primary   -> confirm  tag(hello, welcome)
//! ```
//!
//! The secondary's fresh nonce and ephemeral key are in everything the primary signs after
//! them, so a recorded hello replayed by someone without the key gets a welcome and nothing
//! more: it cannot answer with a confirm, and the secondary's current session is left alone
//! (it is replaced only by a session whose primary has proven itself). The session keys (one
//! per direction) come from the key, the whole handshake and the X25519 shared secret: a
//! recording of a session stays unreadable even to whoever gets the group key later (forward
//! secrecy).
//!
//! After the handshake every frame is
//!
//! ```text
//! length (u32, big-endian, of what follows)  |  ChaCha20-Poly1305(message (postcard))  |  tag (16)
//! ```
//!
//! encrypted and authenticated with the direction's key, the frame number as nonce and the
//! length as associated data. Frame numbers are implicit (each side counts), so a frame that is
//! altered, replayed, dropped, reordered or reflected fails authentication and ends the session.

use std::io::{Read, Write};

use chacha20poly1305::{AeadInPlace as _, ChaCha20Poly1305, KeyInit as _};
use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

const MAGIC: [u8; 4] = *b"FRMM";
const VERSION: u8 = 3;
const TAG: usize = 16;
/// The largest frame accepted (a write of up to 1 MiB plus its path).
pub const MAX_FRAME: usize = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer is not a farm mirror of this version")]
    Foreign,
    #[error("authentication failed (another group key, or the stream was altered)")]
    BadTag,
    #[error(
        "the primary did not prove itself after the welcome (a replayed hello, or another key)"
    )]
    Unconfirmed,
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
    let mut m = <HmacSha256 as hmac::Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `N` bytes from the kernel's random generator (nonces, ephemeral keys, tokens).
pub fn random<const N: usize>() -> [u8; N] {
    let mut n = [0u8; N];
    // SAFETY: getrandom fills the buffer it is given.
    let got = unsafe { libc::getrandom(n.as_mut_ptr().cast(), n.len(), 0) };
    assert_eq!(got, N as isize, "getrandom");
    n
}

/// Which way a frame goes (each direction has its own key, so a frame cannot be reflected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToSecondary = 1,
    ToPrimary = 2,
}

/// One direction of an authenticated, encrypted session.
pub struct Framed<S> {
    stream: S,
    cipher: ChaCha20Poly1305,
    frame: u64,
}

impl<S> Framed<S> {
    fn new(stream: S, key: &[u8; 32]) -> Self {
        Self {
            stream,
            cipher: ChaCha20Poly1305::new(key.into()),
            frame: 0,
        }
    }

    fn nonce(&self) -> chacha20poly1305::Nonce {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.frame.to_be_bytes());
        n.into()
    }
}

impl<S: Write> Framed<S> {
    pub fn send(&mut self, m: &Msg) -> Result<(), WireError> {
        let mut frame = vec![0u8; 4];
        postcard::to_io(m, &mut frame).map_err(|e| WireError::Malformed(e.to_string()))?;
        let len = frame.len() - 4 + TAG;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        let prefix = (len as u32).to_be_bytes();
        frame[..4].copy_from_slice(&prefix);
        let nonce = self.nonce();
        let tag = self
            .cipher
            .encrypt_in_place_detached(&nonce, &prefix, &mut frame[4..])
            .map_err(|_| WireError::TooLarge(len))?;
        frame.extend_from_slice(&tag);
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
        let mut prefix = [0u8; 4];
        self.stream.read_exact(&mut prefix)?;
        let len = u32::from_be_bytes(prefix) as usize;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        if len < TAG {
            return Err(WireError::Malformed("short frame".into()));
        }
        let mut buf = vec![0u8; len];
        self.stream.read_exact(&mut buf)?;
        let (body, tag) = buf.split_at_mut(len - TAG);
        let nonce = self.nonce();
        self.cipher
            .decrypt_in_place_detached(&nonce, &prefix, body, (&*tag).into())
            .map_err(|_| WireError::BadTag)?;
        self.frame += 1;
        postcard::from_bytes(body).map_err(|e| WireError::Malformed(e.to_string()))
    }
}

/// hello and welcome: magic, version, nonce, ephemeral public key, tag.
const GREETING: usize = 4 + 1 + 16 + 32 + 32;
const SIGNED: usize = GREETING - 32;

/// A greeting's body: magic, version, a fresh nonce and an ephemeral X25519 key (whose secret
/// is returned).
fn greeting() -> (Vec<u8>, [u8; 32]) {
    let secret: [u8; 32] = random();
    let public = x25519_dalek::x25519(secret, x25519_dalek::X25519_BASEPOINT_BYTES);
    let mut g = Vec::with_capacity(GREETING);
    g.extend_from_slice(&MAGIC);
    g.push(VERSION);
    g.extend_from_slice(&random::<16>());
    g.extend_from_slice(&public);
    (g, secret)
}

fn check_greeting(g: &[u8]) -> Result<[u8; 32], WireError> {
    if g[..4] != MAGIC || g[4] != VERSION {
        return Err(WireError::Foreign);
    }
    Ok(g[21..53].try_into().expect("32 bytes"))
}

/// The session keys (to the secondary, to the primary) from the key, the transcript and the
/// shared secret; a peer's ephemeral key of small order (an all-zero shared secret) is refused.
fn session_keys(
    key: &[u8; 32],
    transcript: &[u8],
    secret: [u8; 32],
    their_public: [u8; 32],
) -> Result<([u8; 32], [u8; 32]), WireError> {
    let shared = x25519_dalek::x25519(secret, their_public);
    if shared == [0; 32] {
        return Err(WireError::BadTag);
    }
    let master = hmac(key, &[b"farm mirror session", transcript, &shared]);
    Ok((
        hmac(&master, &[b"to secondary"]),
        hmac(&master, &[b"to primary"]),
    ))
}

/// The primary's side of the handshake: returns (to the secondary, from it).
pub fn connect<R: Read, W: Write>(
    mut r: R,
    mut w: W,
    key: &[u8; 32],
) -> Result<(Framed<W>, Framed<R>), WireError> {
    let (mut hello, secret) = greeting();
    let tag = hmac(key, &[b"hello", &hello]);
    hello.extend_from_slice(&tag);
    w.write_all(&hello)?;
    w.flush()?;
    let mut welcome = [0u8; GREETING];
    r.read_exact(&mut welcome)?;
    let theirs = check_greeting(&welcome)?;
    if !equal(
        &hmac(key, &[b"welcome", &hello, &welcome[..SIGNED]]),
        &welcome[SIGNED..],
    ) {
        return Err(WireError::BadTag);
    }
    let transcript = [&hello[..], &welcome[..]].concat();
    w.write_all(&hmac(key, &[b"confirm", &transcript]))?;
    w.flush()?;
    let (to_secondary, to_primary) = session_keys(key, &transcript, secret, theirs)?;
    Ok((Framed::new(w, &to_secondary), Framed::new(r, &to_primary)))
}

/// The secondary's side of the handshake: returns (from the primary, to it) once the primary
/// has proven itself (a replayed hello ends here with [`WireError::Unconfirmed`]).
pub fn accept<R: Read, W: Write>(
    mut r: R,
    mut w: W,
    key: &[u8; 32],
) -> Result<(Framed<R>, Framed<W>), WireError> {
    let mut hello = [0u8; GREETING];
    r.read_exact(&mut hello)?;
    let theirs = check_greeting(&hello)?;
    if !equal(&hmac(key, &[b"hello", &hello[..SIGNED]]), &hello[SIGNED..]) {
        return Err(WireError::BadTag);
    }
    let (mut welcome, secret) = greeting();
    let tag = hmac(key, &[b"welcome", &hello, &welcome]);
    welcome.extend_from_slice(&tag);
    w.write_all(&welcome)?;
    w.flush()?;
    let transcript = [&hello[..], &welcome[..]].concat();
    let mut confirm = [0u8; 32];
    r.read_exact(&mut confirm)
        .map_err(|_| WireError::Unconfirmed)?;
    if !equal(&hmac(key, &[b"confirm", &transcript]), &confirm) {
        return Err(WireError::Unconfirmed);
    }
    let (to_secondary, to_primary) = session_keys(key, &transcript, secret, theirs)?;
    Ok((Framed::new(r, &to_secondary), Framed::new(w, &to_primary)))
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
        let mut to = Framed::new(Vec::new(), &key);
        to.send(&Msg::Sync { barrier: 1 }).expect("send");
        let one = to.stream.clone();
        let reader = |bytes: Vec<u8>| Framed::new(std::io::Cursor::new(bytes), &key);
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
        // Reflected: the other direction has another key.
        let back = Framed::new(std::io::Cursor::new(one), &[4; 32]);
        let mut back = back;
        assert!(matches!(back.recv(), Err(WireError::BadTag)));
        // Oversized length prefix.
        let mut huge = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        huge.extend_from_slice(&[0; 32]);
        assert!(matches!(reader(huge).recv(), Err(WireError::TooLarge(_))));
    }

    #[test]
    fn frames_are_unreadable_on_the_wire() {
        let mut to = Framed::new(Vec::new(), &[5; 32]);
        let secret = b"INSERT INTO accounts VALUES ('alice', 1000000)".to_vec();
        to.send(&Msg::Op(Op::Write {
            path: b"base/16384/2619".to_vec(),
            offset: 0,
            data: secret.clone(),
        }))
        .expect("send");
        let wire = &to.stream;
        assert!(!wire.windows(6).any(|w| w == b"alice'" || w == b"base/1"));
    }

    #[test]
    fn a_replayed_hello_gets_no_session() {
        let key = [6; 32];
        // A real primary's hello, recorded.
        let (a, b) = UnixStream::pair().expect("pair");
        let secondary =
            std::thread::spawn(move || accept(b.try_clone().expect("clone"), b, &key).map(|_| ()));
        let mut recorder = Recorder {
            inner: a.try_clone().expect("clone"),
            seen: Vec::new(),
        };
        connect(a, &mut recorder, &key).expect("primary");
        secondary.join().expect("thread").expect("secondary");
        let hello = recorder.seen[..GREETING].to_vec();
        // Replayed (with the confirm that answered another welcome): refused.
        let (mut eve, b) = UnixStream::pair().expect("pair");
        let secondary =
            std::thread::spawn(move || accept(b.try_clone().expect("clone"), b, &key).map(|_| ()));
        eve.write_all(&recorder.seen).expect("replay");
        let err = secondary
            .join()
            .expect("thread")
            .expect_err("replay accepted");
        assert!(matches!(err, WireError::Unconfirmed), "{err}");
        assert_eq!(hello.len(), GREETING);
    }

    struct Recorder {
        inner: UnixStream,
        seen: Vec<u8>,
    }

    impl Write for &mut Recorder {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.seen.extend_from_slice(b);
            self.inner.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }
}
