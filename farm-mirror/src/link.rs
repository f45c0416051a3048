//! The primary's link to the secondary: operations go out in order on one authenticated
//! session, sync barriers come back acknowledged once durable there.
//!
//! States:
//! - **in sync**: every change is shipped as it happens; a sync (fsync, fdatasync, O_SYNC
//!   write, fsync of a directory) completes once the secondary has made everything before it
//!   durable;
//! - **broken**: the session failed or more than the in-flight bound waits. Syncs wait: whether
//!   the primary may go on alone is decided by farmd (the secondary must not be able to take
//!   over with a copy that lacks what the primary acknowledges from now on). The standalone
//!   tool decides at once (`auto_degrade`);
//! - **degraded**: the primary serves alone; syncs cover the local disk; every path touched is
//!   kept in the change record; a resync is tried every second;
//! - **resyncing**: a resync session runs (`resync`): only what differs is sent, the record
//!   narrows the comparison when the replica was a complete copy of the generation the record
//!   starts from; then the link is in sync again on the same session;
//! - **stopped**: a planned stop (swap) flushed everything and closed the session.

use std::{
    collections::{BTreeSet, VecDeque},
    io::BufReader,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use crate::{
    resync::{Progress, Resync},
    wire::{self, Msg, Op, RelPath, WireError},
};

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
    #[error("the secondary could not apply a change: {0}")]
    Refused(String),
    #[error("the link was stopped")]
    Stopped,
}

/// How a sync ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synced {
    /// Durable here and on the secondary.
    Both,
    /// Durable here; the primary serves alone (decided: the secondary is known out of sync).
    Local,
    /// Not acknowledged: the primary is stopping without its secondary (the application gets
    /// EIO, as from a disk that went away).
    Failed,
}

/// What a waiting sync learns.
pub type Done = Box<dyn FnOnce(Synced) + Send>;

/// The link's state, as status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    InSync,
    Broken(String),
    Degraded(String),
    Resyncing,
    Stopped,
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::InSync => "in sync",
            State::Broken(_) => "broken",
            State::Degraded(_) => "degraded",
            State::Resyncing => "resyncing",
            State::Stopped => "stopped",
        }
    }
}

/// How the link behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Past this much data waiting for the secondary, the session is given up.
    pub max_queued_bytes: usize,
    /// Go on alone at once when the session breaks (the standalone tool), instead of waiting
    /// for `degrade`.
    pub auto_degrade: bool,
    /// The data generation this primary serves.
    pub generation: u64,
    /// The generation the change record starts from: a replica that is a complete copy of it
    /// needs only the recorded paths compared by checksum (None: every file is).
    pub record_base: Option<u64>,
}

/// A completed resync, for status and tests: its last progress, and how long it took.
#[derive(Debug, Clone)]
pub struct ResyncReport {
    pub progress: Progress,
    pub took: Duration,
}

struct Inner {
    queue: VecDeque<Msg>,
    queued_bytes: usize,
    next_barrier: u64,
    acked: u64,
    waiting: Vec<(u64, Done)>,
    state: State,
    opts: Options,
    ops_sent: u64,
    bytes_sent: u64,
    /// Operations sent or queued but not yet covered by an acknowledged barrier: (the barrier
    /// that covers it, path, when, data bytes). What the secondary may lack if the session ends.
    unacked: VecDeque<(u64, RelPath, Instant, usize)>,
    unacked_bytes: usize,
    /// Paths changed while the replica is not in sync.
    record: BTreeSet<RelPath>,
    /// Bumped whenever a session ends: its threads stop touching the state.
    session: u64,
    stream: Option<TcpStream>,
    last_barrier: Instant,
    /// The door to changes: closed by the last resync pass, which then runs alone.
    gate_closed: bool,
    busy: u32,
    resyncing: bool,
    progress: Arc<Mutex<Progress>>,
    last_resync: Option<ResyncReport>,
    resync_error: Option<String>,
}

/// The primary's link (cheap to clone: shared).
#[derive(Clone)]
pub struct Link {
    shared: Arc<(Mutex<Inner>, Condvar)>,
    peer: SocketAddr,
    key: [u8; 32],
    backing: PathBuf,
}

/// Counters for status.
#[derive(Debug, Clone)]
pub struct LinkStatus {
    pub state: State,
    pub generation: u64,
    pub queued_bytes: usize,
    /// Data shipped but not yet durable on the secondary, and how old the oldest such change is.
    pub lag_bytes: usize,
    pub lag: Duration,
    pub ops_sent: u64,
    pub bytes_sent: u64,
    pub syncs_acknowledged: u64,
    /// Paths in the change record.
    pub recorded: usize,
    pub resync: Option<Progress>,
    pub last_resync: Option<ResyncReport>,
    pub resync_error: Option<String>,
}

/// A change passing the door (see `Link::pass`); the door can close once none is inside.
pub struct Pass {
    shared: Arc<(Mutex<Inner>, Condvar)>,
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut g = self.shared.0.lock().expect("link state");
        g.busy -= 1;
        self.shared.1.notify_all();
    }
}

/// Periodic barrier: changes without an fsync are acknowledged within this too (lag, record).
const BARRIER_EVERY: Duration = Duration::from_millis(50);

impl Link {
    /// A link to the secondary at `peer` for the directory `backing`. It starts degraded (the
    /// replica is not known to be in sync) and resyncs in the background.
    pub fn start(peer: SocketAddr, key: &[u8; 32], backing: &Path, opts: Options) -> Self {
        let link = Link {
            shared: Arc::new((
                Mutex::new(Inner {
                    queue: VecDeque::new(),
                    queued_bytes: 0,
                    next_barrier: 1,
                    acked: 0,
                    waiting: Vec::new(),
                    state: State::Degraded("no secondary yet".into()),
                    opts,
                    ops_sent: 0,
                    bytes_sent: 0,
                    unacked: VecDeque::new(),
                    unacked_bytes: 0,
                    record: BTreeSet::new(),
                    session: 0,
                    stream: None,
                    last_barrier: Instant::now(),
                    gate_closed: false,
                    busy: 0,
                    resyncing: false,
                    progress: Default::default(),
                    last_resync: None,
                    resync_error: None,
                }),
                Condvar::new(),
            )),
            peer,
            key: *key,
            backing: backing.to_path_buf(),
        };
        link.spawn_resync();
        link
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.0.lock().expect("link state")
    }

    /// Waits until the link is in sync (true) or `timeout` passes.
    pub fn wait_in_sync(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        while g.state != State::InSync {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .shared
                .1
                .wait_timeout(g, deadline - now)
                .expect("link state")
                .0;
        }
        true
    }

    /// Enters the door for one change (held until the returned pass drops): waits while the
    /// last resync pass runs.
    pub fn pass(&self) -> Pass {
        let mut g = self.lock();
        while g.gate_closed {
            g = self.shared.1.wait(g).expect("link state");
        }
        g.busy += 1;
        Pass {
            shared: self.shared.clone(),
        }
    }

    /// Queues an operation (recorded instead while the replica is not in sync).
    pub fn op(&self, op: Op) {
        let mut g = self.lock();
        if g.state != State::InSync {
            g.record_paths(&op);
            return;
        }
        g.queued_bytes += op_cost(&op);
        if g.queued_bytes > g.opts.max_queued_bytes {
            let why = format!(
                "more than {} MiB waiting for the secondary",
                g.opts.max_queued_bytes >> 20
            );
            g.record_paths(&op);
            self.break_locked(&mut g, why);
            return;
        }
        let barrier = g.next_barrier;
        let now = Instant::now();
        let data = op.data_len();
        for p in op.paths().into_iter().flatten() {
            // Consecutive changes of one file are remembered once.
            if g.unacked
                .back()
                .is_none_or(|(bb, last, _, _)| *bb != barrier || last != p)
            {
                g.unacked.push_back((barrier, p.clone(), now, data));
            } else if let Some(last) = g.unacked.back_mut() {
                last.3 += data;
            }
        }
        g.unacked_bytes += data;
        g.queue.push_back(Msg::Op(op));
        self.shared.1.notify_all();
    }

    /// Completes `done` once everything queued so far is durable on the secondary (`Both`); at
    /// once with `Local` when the primary serves alone; when the link is broken, once farmd has
    /// decided (`degrade`: `Local`, `stop`: `Failed`).
    pub fn sync(&self, done: Done) {
        let mut g = self.lock();
        match g.state {
            State::InSync => {
                let barrier = g.next_barrier;
                g.next_barrier += 1;
                g.last_barrier = Instant::now();
                g.queue.push_back(Msg::Sync { barrier });
                g.waiting.push((barrier, done));
                self.shared.1.notify_all();
            }
            State::Broken(_) => {
                let barrier = g.next_barrier;
                g.waiting.push((barrier, done));
            }
            State::Stopped => {
                drop(g);
                done(Synced::Failed);
            }
            State::Degraded(_) | State::Resyncing => {
                drop(g);
                done(Synced::Local);
            }
        }
    }

    /// Gives the session up (something could not be replicated).
    pub fn fail(&self, why: String) {
        let mut g = self.lock();
        self.break_locked(&mut g, why);
    }

    fn break_locked(&self, g: &mut Inner, why: String) {
        if g.state != State::InSync {
            return;
        }
        g.end_session();
        g.queue.clear();
        g.queued_bytes = 0;
        if g.opts.auto_degrade {
            let generation = g.opts.generation;
            self.degrade_locked(g, why, generation);
        } else {
            tracing::error!(
                "replication broken ({why}): syncs wait until this primary may go on alone"
            );
            g.state = State::Broken(why);
        }
        self.shared.1.notify_all();
    }

    /// Goes on alone at data generation `generation` (farmd's decision once the secondary is
    /// known to be out of sync, or gone): waiting syncs complete, changes are recorded, resyncs
    /// are tried. Does nothing unless in sync or broken.
    pub fn degrade(&self, why: &str, generation: u64) {
        let mut g = self.lock();
        if g.state == State::InSync {
            self.break_locked(&mut g, why.to_string());
        }
        if matches!(g.state, State::Broken(_)) {
            self.degrade_locked(&mut g, why.to_string(), generation);
        }
    }

    fn degrade_locked(&self, g: &mut Inner, why: String, generation: u64) {
        tracing::error!(
            "DEGRADED: the replica is out of sync ({why}); this primary goes on alone at \
             generation {generation}, fsync covers only the local disk until the secondary is \
             back in sync"
        );
        // The secondary had everything acknowledged at the old generation; what it may lack is
        // in the record.
        g.opts.record_base = Some(g.opts.generation);
        g.opts.generation = generation;
        let unacked: Vec<RelPath> = g.unacked.drain(..).map(|(_, p, _, _)| p).collect();
        g.record.extend(unacked);
        g.unacked_bytes = 0;
        g.state = State::Degraded(why);
        for (_, done) in g.waiting.drain(..) {
            done(Synced::Local);
        }
        self.spawn_resync_locked(g);
    }

    /// A planned stop (swap): waits until everything is durable on the secondary (bounded by
    /// `timeout`), then closes the session. Returns whether the secondary has everything.
    pub fn stop(&self, timeout: Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        self.sync(Box::new(move |r| {
            let _ = tx.send(r == Synced::Both);
        }));
        let ok = rx.recv_timeout(timeout).unwrap_or(false);
        let mut g = self.lock();
        g.end_session();
        g.state = State::Stopped;
        for (_, done) in g.waiting.drain(..) {
            done(Synced::Failed);
        }
        self.shared.1.notify_all();
        ok
    }

    pub fn status(&self) -> LinkStatus {
        let g = self.lock();
        LinkStatus {
            state: g.state.clone(),
            generation: g.opts.generation,
            queued_bytes: g.queued_bytes,
            lag_bytes: g.unacked_bytes,
            lag: g
                .unacked
                .front()
                .map_or(Duration::ZERO, |(_, _, t, _)| t.elapsed()),
            ops_sent: g.ops_sent,
            bytes_sent: g.bytes_sent,
            syncs_acknowledged: g.acked,
            recorded: g.record.len(),
            resync: (g.state == State::Resyncing)
                .then(|| g.progress.lock().expect("progress").clone()),
            last_resync: g.last_resync.clone(),
            resync_error: g.resync_error.clone(),
        }
    }

    fn spawn_resync(&self) {
        let mut g = self.lock();
        self.spawn_resync_locked(&mut g);
    }

    /// Starts the resync thread unless one runs or the link is not degraded (the thread takes
    /// the lock only once the caller has let it go).
    fn spawn_resync_locked(&self, g: &mut Inner) {
        if g.resyncing || !matches!(g.state, State::Degraded(_)) {
            return;
        }
        g.resyncing = true;
        let l = self.clone();
        std::thread::Builder::new()
            .name("mirror-resync".into())
            .spawn(move || l.resync_loop())
            .expect("spawning a thread");
    }

    /// Tries a resync every second while degraded.
    fn resync_loop(self) {
        let mut failures = 0u32;
        loop {
            {
                let g = self.lock();
                if !matches!(g.state, State::Degraded(_)) {
                    drop(g);
                    self.lock().resyncing = false;
                    return;
                }
            }
            match self.resync_once() {
                Ok(()) => {
                    self.lock().resyncing = false;
                    return;
                }
                Err(e) => {
                    let mut g = self.lock();
                    if g.state == State::Resyncing {
                        g.state = State::Degraded(format!("resync failed: {e}"));
                    }
                    if g.gate_closed {
                        g.gate_closed = false;
                        self.shared.1.notify_all();
                    }
                    if failures.is_multiple_of(30) {
                        tracing::warn!("resync with {}: {e}", self.peer);
                    }
                    g.resync_error = Some(e.to_string());
                    failures += 1;
                }
            }
            let g = self.lock();
            let _ = self
                .shared
                .1
                .wait_timeout_while(g, Duration::from_secs(1), |g| {
                    matches!(g.state, State::Degraded(_))
                })
                .expect("link state");
        }
    }

    fn resync_once(&self) -> Result<(), LinkError> {
        let conn = TcpStream::connect_timeout(&self.peer, Duration::from_secs(2))
            .map_err(|e| LinkError::Connect(self.peer, e))?;
        conn.set_nodelay(true).ok();
        // A resync answer that never comes ends the attempt.
        conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
        set_user_timeout(&conn, Duration::from_secs(10));
        let reader = BufReader::with_capacity(
            1 << 20,
            conn.try_clone()
                .map_err(|e| LinkError::Connect(self.peer, e))?,
        );
        let writer = std::io::BufWriter::with_capacity(
            1 << 20,
            conn.try_clone()
                .map_err(|e| LinkError::Connect(self.peer, e))?,
        );
        let (mut to, mut from) = wire::connect(reader, writer, &self.key)?;
        let (generation, record_base, progress, record) = {
            let mut g = self.lock();
            if !matches!(g.state, State::Degraded(_)) {
                return Err(LinkError::Stopped);
            }
            g.state = State::Resyncing;
            g.resync_error = None;
            let progress = Arc::new(Mutex::new(Progress {
                started: Some(Instant::now()),
                ..Default::default()
            }));
            g.progress = progress.clone();
            (
                g.opts.generation,
                g.opts.record_base,
                progress,
                std::mem::take(&mut g.record),
            )
        };
        to.send(&Msg::Resync { generation })?;
        to.flush()?;
        let trusted = match from.recv()? {
            Msg::Resyncing {
                generation: theirs,
                synced,
            } => synced && record_base == Some(theirs),
            Msg::Failed { message } => return Err(LinkError::Refused(message)),
            other => {
                return Err(WireError::Malformed(format!("{other:?} instead of Resyncing")).into());
            }
        };
        tracing::info!(
            "resync with {} to generation {generation}: {}",
            self.peer,
            if trusted {
                format!(
                    "replica complete at the record's start, {} recorded path(s) compared by \
                     checksum, the rest by size and mtime",
                    record.len()
                )
            } else {
                "every file compared by checksum".to_string()
            }
        );
        progress.lock().expect("progress").full_check = !trusted;
        let mut r = Resync::new(&mut to, &mut from, &self.backing, progress.clone());
        r.full_pass(&record, !trusted)?;
        let mut passes = 1;
        // Later passes: what changed meanwhile, until little is left or enough passes ran.
        loop {
            passes += 1;
            progress.lock().expect("progress").pass = passes;
            let last = {
                let g = self.lock();
                g.record.len() <= 256 || passes >= 8
            };
            if last {
                break;
            }
            let changed = std::mem::take(&mut self.lock().record);
            r.record_pass(&changed)?;
        }
        // The last pass, with changes held at the door: then in sync on this session.
        {
            let mut g = self.lock();
            g.gate_closed = true;
            while g.busy > 0 {
                g = self.shared.1.wait(g).expect("link state");
            }
        }
        let changed = std::mem::take(&mut self.lock().record);
        r.record_pass(&changed)?;
        let barrier = {
            let mut g = self.lock();
            let b = g.next_barrier;
            g.next_barrier += 1;
            b
        };
        to.send(&Msg::InSync { generation })?;
        to.send(&Msg::Sync { barrier })?;
        to.flush()?;
        match from.recv()? {
            Msg::Ack { barrier: b } if b == barrier => {}
            Msg::Failed { message } => return Err(LinkError::Refused(message)),
            other => {
                return Err(WireError::Malformed(format!("{other:?} instead of an ack")).into());
            }
        }
        conn.set_read_timeout(None).ok();
        let p = progress.lock().expect("progress").clone();
        let report = ResyncReport {
            took: p.started.map_or(Duration::ZERO, |t| t.elapsed()),
            progress: p.clone(),
        };
        tracing::info!(
            "secondary {} in sync at generation {generation}: {} pass(es), {} bytes of file data \
             sent, {} bytes found equal, {} operations, {:.1} s",
            self.peer,
            p.pass,
            p.bytes_sent,
            p.bytes_same,
            p.operations,
            report.took.as_secs_f64()
        );
        let session = {
            let mut g = self.lock();
            g.state = State::InSync;
            g.acked = barrier;
            g.unacked.clear();
            g.unacked_bytes = 0;
            g.record.clear();
            g.session += 1;
            g.stream = conn.try_clone().ok();
            g.last_resync = Some(report);
            g.gate_closed = false;
            g.ops_sent += p.operations;
            g.bytes_sent += p.bytes_sent;
            self.shared.1.notify_all();
            g.session
        };
        let l = self.clone();
        std::thread::Builder::new()
            .name("mirror-send".into())
            .spawn(move || l.send_loop(to, session))
            .expect("spawning a thread");
        let l = self.clone();
        std::thread::Builder::new()
            .name("mirror-ack".into())
            .spawn(move || l.ack_loop(from, session))
            .expect("spawning a thread");
        Ok(())
    }

    fn send_loop(self, mut to: wire::Framed<std::io::BufWriter<TcpStream>>, session: u64) {
        loop {
            let batch: Vec<Msg> = {
                let mut g = self.lock();
                loop {
                    if g.session != session || g.state != State::InSync {
                        return;
                    }
                    if !g.queue.is_empty() {
                        break;
                    }
                    // Changes without an fsync get a barrier of their own after a while.
                    let pending = g.unacked.back().is_some_and(|(b, ..)| *b == g.next_barrier);
                    if pending && g.last_barrier.elapsed() >= BARRIER_EVERY {
                        let barrier = g.next_barrier;
                        g.next_barrier += 1;
                        g.last_barrier = Instant::now();
                        g.queue.push_back(Msg::Sync { barrier });
                        break;
                    }
                    g = self
                        .shared
                        .1
                        .wait_timeout(g, BARRIER_EVERY)
                        .expect("link state")
                        .0;
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
            if g.session != session {
                return;
            }
            match result {
                Ok(()) => {
                    g.ops_sent += ops;
                    g.bytes_sent += data;
                    g.queued_bytes = g.queued_bytes.saturating_sub(cost);
                }
                Err(e) => {
                    self.break_locked(&mut g, format!("sending failed: {e}"));
                    return;
                }
            }
        }
    }

    fn ack_loop(self, mut from: wire::Framed<BufReader<TcpStream>>, session: u64) {
        loop {
            let m = from.recv();
            let mut g = self.lock();
            if g.session != session {
                return;
            }
            match m {
                Ok(Msg::Ack { barrier }) => {
                    g.acked = g.acked.max(barrier);
                    let acked = g.acked;
                    while g.unacked.front().is_some_and(|(b, ..)| *b <= acked) {
                        let (_, _, _, n) = g.unacked.pop_front().expect("front");
                        g.unacked_bytes = g.unacked_bytes.saturating_sub(n);
                    }
                    let (ready, wait): (Vec<_>, Vec<_>) =
                        g.waiting.drain(..).partition(|(b, _)| *b <= acked);
                    g.waiting = wait;
                    drop(g);
                    for (_, done) in ready {
                        done(Synced::Both);
                    }
                }
                Ok(Msg::Failed { message }) => {
                    self.break_locked(&mut g, format!("the secondary could not apply: {message}"));
                    return;
                }
                Ok(other) => {
                    self.break_locked(&mut g, format!("unexpected message {other:?}"));
                    return;
                }
                Err(e) => {
                    self.break_locked(&mut g, format!("session lost: {e}"));
                    return;
                }
            }
        }
    }
}

/// Ends a session whose data has gone unacknowledged this long (a peer that vanished without a
/// reset), instead of TCP's retransmissions for many minutes.
fn set_user_timeout(conn: &TcpStream, t: Duration) {
    use std::os::fd::AsRawFd as _;
    let ms = t.as_millis() as libc::c_uint;
    // SAFETY: setsockopt with a valid fd and a c_uint of the size given.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        );
    }
}

/// What an operation counts against the in-flight bound: its file data and a fixed allowance
/// for the rest.
fn op_cost(op: &Op) -> usize {
    op.data_len() + 64
}

/// The same for any queued message (barriers count nothing).
fn queued_cost(m: &Msg) -> usize {
    match m {
        Msg::Op(op) => op_cost(op),
        _ => 0,
    }
}

impl Inner {
    /// Keeps the paths `op` changes in the change record.
    fn record_paths(&mut self, op: &Op) {
        for p in op.paths().into_iter().flatten() {
            self.record.insert(p.clone());
        }
    }

    /// Ends the current session: its threads stop touching the state, its socket closes.
    fn end_session(&mut self) {
        self.session += 1;
        if let Some(s) = self.stream.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::{replica, state::StateFile, tree};

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
        std::fs::write(d.join("big"), vec![7u8; 4 << 20]).unwrap();
    }

    fn equal(a: &Path, b: &Path) {
        let diff = tree::differences(&tree::digest(a).unwrap(), &tree::digest(b).unwrap());
        assert!(diff.is_empty(), "{diff:#?}");
    }

    fn server(dst: &Path, key: [u8; 32]) -> (replica::Server, SocketAddr) {
        let r = replica::Replica::open(dst).unwrap();
        let st = Arc::new(StateFile::in_memory(Default::default()));
        let s = replica::Server::start("127.0.0.1:0".parse().unwrap(), r, st, &key).unwrap();
        let addr = s.listen;
        (s, addr)
    }

    /// Waits (bounded) until `link` is in sync.
    fn in_sync(link: &Link) {
        assert!(
            link.wait_in_sync(Duration::from_secs(20)),
            "{:?}",
            link.status()
        );
    }

    fn opts(record_base: Option<u64>) -> Options {
        Options {
            max_queued_bytes: 64 << 20,
            auto_degrade: true,
            generation: 1,
            record_base,
        }
    }

    #[test]
    fn a_resync_fills_an_empty_replica_and_then_sends_only_what_changed() {
        let (src, dst) = (tmp("src"), tmp("dst"));
        sample(&src);
        std::fs::write(dst.join("stale"), b"left from before").unwrap();
        let key = [9u8; 32];
        let (_server, addr) = server(&dst, key);
        let link = Link::start(addr, &key, &src, opts(None));
        in_sync(&link);
        equal(&src, &dst);
        let first = link.status().last_resync.expect("report");
        assert_eq!(
            first.progress.bytes_sent,
            100_000 + 4 + (4 << 20),
            "holes are not sent"
        );

        // The session breaks; one block of the big file changes meanwhile (recorded), and a
        // file goes away.
        link.fail("test: cut".into());
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(src.join("big"))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"changed", 1 << 20).unwrap();
        link.op(Op::Write {
            path: b"big".to_vec(),
            offset: 1 << 20,
            data: b"changed".to_vec(),
        });
        std::fs::remove_file(src.join("empty")).unwrap();
        link.op(Op::Unlink {
            path: b"empty".to_vec(),
        });
        in_sync(&link);
        equal(&src, &dst);
        let second = link.status().last_resync.expect("report");
        assert!(
            !second.progress.full_check,
            "the record is trusted: {second:?}"
        );
        assert_eq!(
            second.progress.bytes_sent,
            64 << 10,
            "one block: {second:?}"
        );
        let _ = std::fs::remove_dir_all(&src);
        let _ = std::fs::remove_dir_all(&dst);
    }

    #[test]
    fn without_a_record_every_file_is_compared_by_checksum() {
        let (src, dst) = (tmp("csrc"), tmp("cdst"));
        sample(&src);
        let key = [8u8; 32];
        let (server1, addr) = server(&dst, key);
        let link = Link::start(addr, &key, &src, opts(None));
        in_sync(&link);
        link.stop(Duration::from_secs(5));
        drop(server1);
        // The replica is altered behind the primary's back, keeping size and mtime.
        let p = dst.join("big");
        let m = std::fs::metadata(&p).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"rot", 3 << 20).unwrap();
        f.set_modified(m.modified().unwrap()).unwrap();
        let (_server2, addr) = server(&dst, key);
        let link = Link::start(addr, &key, &src, opts(None));
        in_sync(&link);
        equal(&src, &dst);
        let r = link.status().last_resync.expect("report");
        assert!(r.progress.full_check);
        assert_eq!(r.progress.bytes_sent, 64 << 10, "{r:?}");
        let _ = std::fs::remove_dir_all(&src);
        let _ = std::fs::remove_dir_all(&dst);
    }

    #[test]
    fn a_sync_returns_once_the_secondary_has_the_data() {
        let (src, dst) = (tmp("lsrc"), tmp("ldst"));
        sample(&src);
        let key = [7u8; 32];
        let (_server, addr) = server(&dst, key);
        let link = Link::start(addr, &key, &src, opts(None));
        in_sync(&link);
        link.op(Op::Write {
            path: b"db/base/1".to_vec(),
            offset: 0,
            data: b"changed".to_vec(),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        link.sync(Box::new(move |r| tx.send(r).unwrap()));
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(Synced::Both));
        assert_eq!(
            &std::fs::read(dst.join("db/base/1")).unwrap()[..7],
            b"changed"
        );
        assert_eq!(link.status().state, State::InSync);
        let _ = std::fs::remove_dir_all(&src);
        let _ = std::fs::remove_dir_all(&dst);
    }

    #[test]
    fn a_broken_link_holds_syncs_until_told_to_go_on_alone() {
        let (src, dst) = (tmp("bsrc"), tmp("bdst"));
        sample(&src);
        let key = [6u8; 32];
        let (_server, addr) = server(&dst, key);
        let link = Link::start(
            addr,
            &key,
            &src,
            Options {
                auto_degrade: false,
                ..opts(None)
            },
        );
        in_sync(&link);
        link.fail("test: cut".into());
        assert!(matches!(link.status().state, State::Broken(_)));
        let (tx, rx) = std::sync::mpsc::channel();
        link.sync(Box::new(move |r| tx.send(r).unwrap()));
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "a sync completed while nobody decided"
        );
        link.degrade("test: decided", 2);
        assert_eq!(rx.recv_timeout(Duration::from_secs(1)), Ok(Synced::Local));
        assert!(
            link.wait_in_sync(Duration::from_secs(20)),
            "resynced afterwards"
        );
        assert_eq!(link.status().generation, 2);
        let _ = std::fs::remove_dir_all(&src);
        let _ = std::fs::remove_dir_all(&dst);
    }
}
