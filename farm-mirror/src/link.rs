//! The primary's link to the secondary: operations go out in order on one authenticated
//! session, sync barriers come back acknowledged once durable there.
//!
//! `Link::establish` connects, empties the replica and copies the backing directory into it
//! (sparse files stay sparse, hard links stay links), and returns once the secondary has made
//! the copy durable: from then on the replica is in sync. A sender thread drains the queue; a
//! receiver thread takes the acknowledgements and completes the syncs waiting for them.
//!
//! When the session fails (the secondary or the network is gone) or more than the in-flight
//! bound is queued, the link becomes **degraded**: the primary goes on alone, syncs complete
//! after the local fsync only, and that is said loudly. This version does not reconnect by
//! itself: the replica is out of sync from then on and is brought back by establishing a new
//! link (a full copy).

use std::{
    collections::VecDeque,
    io::BufReader,
    net::{SocketAddr, TcpStream},
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::Path,
    sync::{Arc, Condvar, Mutex},
    time::Duration,
};

use crate::wire::{self, Msg, Op, WireError};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connecting to the secondary at {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("session with the secondary: {0}")]
    Wire(#[from] WireError),
    #[error("reading the backing directory at {path}: {source}")]
    Backing {
        path: String,
        source: std::io::Error,
    },
    #[error("the secondary could not apply the initial copy: {0}")]
    Refused(String),
}

/// What a waiting sync learns: whether the secondary has the data too.
pub type Done = Box<dyn FnOnce(bool) + Send>;

/// The link's state, as status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    InSync,
    Degraded(String),
}

struct Inner {
    queue: VecDeque<Msg>,
    queued_bytes: usize,
    next_barrier: u64,
    acked: u64,
    waiting: Vec<(u64, Done)>,
    state: State,
    max_queued_bytes: usize,
    ops_sent: u64,
    bytes_sent: u64,
}

/// The primary's link (cheap to clone: shared).
#[derive(Clone)]
pub struct Link {
    shared: Arc<(Mutex<Inner>, Condvar)>,
}

/// Counters for status.
#[derive(Debug, Clone)]
pub struct LinkStatus {
    pub state: State,
    pub queued_bytes: usize,
    pub ops_sent: u64,
    pub bytes_sent: u64,
    pub syncs_acknowledged: u64,
}

impl Link {
    /// Connects, copies `backing` to the replica and returns the link once the copy is durable
    /// on the secondary.
    pub fn establish(
        peer: SocketAddr,
        key: &[u8; 32],
        backing: &Path,
        max_queued_bytes: usize,
    ) -> Result<Self, LinkError> {
        let conn = TcpStream::connect_timeout(&peer, Duration::from_secs(5))
            .map_err(|e| LinkError::Connect(peer, e))?;
        conn.set_nodelay(true).ok();
        let reader = BufReader::new(conn.try_clone().map_err(|e| LinkError::Connect(peer, e))?);
        let writer = std::io::BufWriter::with_capacity(1 << 20, conn);
        let (mut to, mut from) = wire::connect(reader, writer, key)?;
        let copied = copy_tree(backing, &mut |op| to.send(&Msg::Op(op)))?;
        to.send(&Msg::Sync { barrier: 0 })?;
        to.flush()?;
        match from.recv()? {
            Msg::Ack { barrier: 0 } => {}
            Msg::Failed { message } => return Err(LinkError::Refused(message)),
            other => {
                return Err(
                    WireError::Malformed(format!("{other:?} instead of the first ack")).into(),
                );
            }
        }
        tracing::info!(
            "secondary {peer} in sync: {} entries, {} bytes copied",
            copied.entries,
            copied.bytes
        );
        let link = Link {
            shared: Arc::new((
                Mutex::new(Inner {
                    queue: VecDeque::new(),
                    queued_bytes: 0,
                    next_barrier: 1,
                    acked: 0,
                    waiting: Vec::new(),
                    state: State::InSync,
                    max_queued_bytes,
                    ops_sent: copied.entries,
                    bytes_sent: copied.bytes,
                }),
                Condvar::new(),
            )),
        };
        let l = link.clone();
        std::thread::Builder::new()
            .name("mirror-send".into())
            .spawn(move || l.send_loop(to))
            .expect("spawning a thread");
        let l = link.clone();
        std::thread::Builder::new()
            .name("mirror-ack".into())
            .spawn(move || l.ack_loop(from))
            .expect("spawning a thread");
        Ok(link)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.0.lock().expect("link state")
    }

    /// Queues an operation (dropped when degraded: the replica is out of sync anyway).
    pub fn op(&self, op: Op) {
        let mut g = self.lock();
        if g.state != State::InSync {
            return;
        }
        let m = Msg::Op(op);
        g.queued_bytes += queued_cost(&m);
        if g.queued_bytes > g.max_queued_bytes {
            let why = format!(
                "more than {} MiB waiting for the secondary",
                g.max_queued_bytes >> 20
            );
            Self::degrade(&mut g, why);
            return;
        }
        g.queue.push_back(m);
        self.shared.1.notify_all();
    }

    /// Completes `done` once everything queued so far is durable on the secondary (`true`), or
    /// at once with `false` when degraded.
    pub fn sync(&self, done: Done) {
        let mut g = self.lock();
        if g.state != State::InSync {
            drop(g);
            done(false);
            return;
        }
        let barrier = g.next_barrier;
        g.next_barrier += 1;
        g.queue.push_back(Msg::Sync { barrier });
        g.waiting.push((barrier, done));
        self.shared.1.notify_all();
    }

    /// Marks the replica out of sync (something could not be replicated).
    pub fn fail(&self, why: String) {
        let mut g = self.lock();
        Self::degrade(&mut g, why);
        self.shared.1.notify_all();
    }

    pub fn status(&self) -> LinkStatus {
        let g = self.lock();
        LinkStatus {
            state: g.state.clone(),
            queued_bytes: g.queued_bytes,
            ops_sent: g.ops_sent,
            bytes_sent: g.bytes_sent,
            syncs_acknowledged: g.acked,
        }
    }

    fn degrade(g: &mut Inner, why: String) {
        if g.state == State::InSync {
            tracing::error!(
                "DEGRADED: the replica is out of sync ({why}); this primary goes on alone and \
                 fsync covers only the local disk until the secondary is brought back"
            );
            g.state = State::Degraded(why);
        }
        g.queue.clear();
        g.queued_bytes = 0;
        for (_, done) in g.waiting.drain(..) {
            done(false);
        }
    }

    fn send_loop(self, mut to: wire::Framed<std::io::BufWriter<TcpStream>>) {
        loop {
            let batch: Vec<Msg> = {
                let mut g = self.lock();
                while g.queue.is_empty() && g.state == State::InSync {
                    g = self.shared.1.wait(g).expect("link state");
                }
                if g.state != State::InSync {
                    return;
                }
                g.queue.drain(..).collect()
            };
            // One pass: what goes out, and what it frees of the in-flight bound.
            let (mut ops, mut data, mut cost) = (0u64, 0u64, 0usize);
            let result = batch.iter().try_for_each(|m| {
                if let Msg::Op(op) = m {
                    ops += 1;
                    data += op.data_len() as u64;
                }
                cost += queued_cost(m);
                to.send(m)
            });
            let result = result.and_then(|()| to.flush());
            let mut g = self.lock();
            match result {
                Ok(()) => {
                    g.ops_sent += ops;
                    g.bytes_sent += data;
                    g.queued_bytes = g.queued_bytes.saturating_sub(cost);
                }
                Err(e) => {
                    Self::degrade(&mut g, format!("sending failed: {e}"));
                    return;
                }
            }
        }
    }

    fn ack_loop(self, mut from: wire::Framed<BufReader<TcpStream>>) {
        loop {
            let m = from.recv();
            let mut g = self.lock();
            match m {
                Ok(Msg::Ack { barrier }) => {
                    g.acked = g.acked.max(barrier);
                    let acked = g.acked;
                    let (ready, wait): (Vec<_>, Vec<_>) =
                        g.waiting.drain(..).partition(|(b, _)| *b <= acked);
                    g.waiting = wait;
                    drop(g);
                    for (_, done) in ready {
                        done(true);
                    }
                }
                Ok(Msg::Failed { message }) => {
                    Self::degrade(&mut g, format!("the secondary could not apply: {message}"));
                    self.shared.1.notify_all();
                    return;
                }
                Ok(other) => {
                    Self::degrade(&mut g, format!("unexpected message {other:?}"));
                    self.shared.1.notify_all();
                    return;
                }
                Err(e) => {
                    Self::degrade(&mut g, format!("session lost: {e}"));
                    self.shared.1.notify_all();
                    return;
                }
            }
        }
    }
}

/// What a queued message counts against the in-flight bound: its file data and a fixed
/// allowance for the rest of an operation.
fn queued_cost(m: &Msg) -> usize {
    match m {
        Msg::Op(op) => op.data_len() + 64,
        _ => 0,
    }
}

/// What the initial copy sent.
pub struct Copied {
    pub entries: u64,
    pub bytes: u64,
}

/// Sends operations that make an empty replica equal to `root` (contents, sparse holes,
/// hard links, symlinks, owners, modes, times), after one that empties it.
pub fn copy_tree(
    root: &Path,
    send: &mut dyn FnMut(Op) -> Result<(), WireError>,
) -> Result<Copied, LinkError> {
    let backing = |path: &Path| {
        let p = path.display().to_string();
        move |source| LinkError::Backing { path: p, source }
    };
    send(Op::Reset)?;
    let mut copied = Copied {
        entries: 0,
        bytes: 0,
    };
    // (dev, ino) of files seen, for hard links.
    let mut seen: std::collections::HashMap<(u64, u64), Vec<u8>> = Default::default();
    // Directories get their times after their content.
    let mut dir_times: Vec<(Vec<u8>, std::fs::Metadata)> = Vec::new();
    let mut stack = vec![Vec::<u8>::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&rel));
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(backing(&dir))?
            .collect::<Result<_, _>>()
            .map_err(backing(&dir))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            let mut child = rel.clone();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(name.as_encoded_bytes());
            let path = e.path();
            let m = std::fs::symlink_metadata(&path).map_err(backing(&path))?;
            let ft = m.file_type();
            copied.entries += 1;
            if ft.is_dir() {
                send(Op::Mkdir {
                    path: child.clone(),
                    mode: m.mode() & 0o7777,
                })?;
                stack.push(child.clone());
                dir_times.push((child, m));
                continue;
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&path).map_err(backing(&path))?;
                send(Op::Symlink {
                    target: target.as_os_str().as_encoded_bytes().to_vec(),
                    path: child.clone(),
                })?;
            } else if ft.is_file() {
                if m.nlink() > 1 {
                    if let Some(first) = seen.get(&(m.dev(), m.ino())) {
                        send(Op::Link {
                            from: first.clone(),
                            to: child,
                        })?;
                        continue;
                    }
                    seen.insert((m.dev(), m.ino()), child.clone());
                }
                send(Op::Create {
                    path: child.clone(),
                    mode: m.mode() & 0o7777,
                })?;
                copied.bytes += copy_file(&path, &child, m.len(), send)?;
            } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() || ft.is_socket()
            {
                send(Op::Mknod {
                    path: child.clone(),
                    mode: m.mode(),
                    rdev: m.rdev(),
                })?;
            }
            meta(&child, &m, send)?;
        }
    }
    for (rel, m) in dir_times.into_iter().rev() {
        meta(&rel, &m, send)?;
    }
    let root_meta = std::fs::metadata(root).map_err(backing(root))?;
    meta(&[], &root_meta, send)?;
    Ok(copied)
}

/// Owner, mode (not for symlinks) and times.
fn meta(
    rel: &[u8],
    m: &std::fs::Metadata,
    send: &mut dyn FnMut(Op) -> Result<(), WireError>,
) -> Result<(), WireError> {
    send(Op::Chown {
        path: rel.to_vec(),
        uid: Some(m.uid()),
        gid: Some(m.gid()),
    })?;
    if !m.file_type().is_symlink() {
        send(Op::Chmod {
            path: rel.to_vec(),
            mode: m.mode() & 0o7777,
        })?;
    }
    send(Op::Times {
        path: rel.to_vec(),
        atime: Some((m.atime(), m.atime_nsec() as u32)),
        mtime: Some((m.mtime(), m.mtime_nsec() as u32)),
    })
}

/// The data regions of a file (SEEK_DATA/SEEK_HOLE), as writes; then its size.
fn copy_file(
    path: &Path,
    rel: &[u8],
    size: u64,
    send: &mut dyn FnMut(Op) -> Result<(), WireError>,
) -> Result<u64, LinkError> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::FileExt as _;
    let p = path.display().to_string();
    let err = |source| LinkError::Backing {
        path: p.clone(),
        source,
    };
    let f = std::fs::File::open(path).map_err(err)?;
    let mut bytes = 0;
    let mut pos: u64 = 0;
    const CHUNK: u64 = 512 << 10;
    while pos < size {
        // SAFETY: valid fd.
        let data = unsafe { libc::lseek(f.as_raw_fd(), pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole is left
        }
        // SAFETY: valid fd.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 {
            size
        } else {
            (hole as u64).min(size)
        };
        let mut at = data as u64;
        while at < end {
            let n = (end - at).min(CHUNK) as usize;
            let mut buf = vec![0u8; n];
            f.read_exact_at(&mut buf, at).map_err(err)?;
            send(Op::Write {
                path: rel.to_vec(),
                offset: at,
                data: buf,
            })?;
            bytes += n as u64;
            at += n as u64;
        }
        pos = end;
    }
    send(Op::Truncate {
        path: rel.to_vec(),
        size,
    })?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::{replica, tree};

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("farm-link-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("tmp dir");
        d
    }

    /// A tree with every kind of entry the copy must carry.
    fn sample(d: &Path) {
        std::fs::create_dir_all(d.join("db/base")).unwrap();
        std::fs::write(d.join("db/base/1"), vec![3u8; 100_000]).unwrap();
        let f = std::fs::File::create(d.join("db/sparse")).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"tail", 8 << 20).unwrap();
        std::fs::hard_link(d.join("db/base/1"), d.join("db/hard")).unwrap();
        std::os::unix::fs::symlink("base/1", d.join("db/link")).unwrap();
        std::fs::set_permissions(d.join("db/base"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        std::fs::write(d.join("empty"), b"").unwrap();
    }

    #[test]
    fn the_initial_copy_makes_the_replica_equal() {
        let (src, dst) = (tmp("src"), tmp("dst"));
        sample(&src);
        std::fs::write(dst.join("stale"), b"left from before").unwrap();
        let r = replica::Replica::open(&dst).unwrap();
        let copied = copy_tree(&src, &mut |op| {
            r.apply(&op)
                .map_err(|e| WireError::Malformed(e.to_string()))
        })
        .expect("copy");
        let diff = tree::differences(&tree::digest(&src).unwrap(), &tree::digest(&dst).unwrap());
        assert!(diff.is_empty(), "{diff:#?}");
        assert_eq!(copied.bytes, 100_000 + 4, "the hole is not sent");
        let _ = std::fs::remove_dir_all(&src);
        let _ = std::fs::remove_dir_all(&dst);
    }

    #[test]
    fn a_sync_returns_once_the_secondary_has_the_data() {
        let (src, dst) = (tmp("lsrc"), tmp("ldst"));
        sample(&src);
        let key = [9u8; 32];
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let d2 = dst.clone();
        std::thread::spawn(move || {
            let r = replica::Replica::open(&d2).unwrap();
            replica::serve_on(&l, &r, &key);
        });
        let link = Link::establish(addr, &key, &src, 64 << 20).expect("link");
        link.op(Op::Write {
            path: b"db/base/1".to_vec(),
            offset: 0,
            data: b"changed".to_vec(),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        link.sync(Box::new(move |ok| tx.send(ok).unwrap()));
        assert!(rx.recv_timeout(Duration::from_secs(5)).expect("sync done"));
        assert_eq!(
            &std::fs::read(dst.join("db/base/1")).unwrap()[..7],
            b"changed"
        );
        assert_eq!(link.status().state, State::InSync);
        let _ = std::fs::remove_dir_all(&src);
        let _ = std::fs::remove_dir_all(&dst);
    }
}
