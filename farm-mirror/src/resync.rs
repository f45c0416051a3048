//! Resync: bringing a replica in sync while the primary keeps serving, sending only what
//! differs.
//!
//! One pass compares entries: the secondary lists its tree (kind, mode, owner, size, mtime,
//! inode), the primary walks its own, and for each path it sends what makes the replica's entry
//! equal: removals, new directories, links, nodes, owners and modes, and for regular files only
//! the blocks whose checksums differ (the secondary hashes its blocks when probed; holes are
//! punched, not written). A file is probed when it is in the primary's change record, when its
//! size or mtime differs, or always when the record cannot be trusted (the replica was not a
//! complete copy of the generation the record starts from).
//!
//! The application goes on writing during a pass; what it touches lands in the change record,
//! and the next pass compares only those paths. The last pass runs with the application's
//! changes held at the filesystem's door (a few paths at most), then the replica switches to
//! synchronous mode on the same session.

use std::{
    collections::{BTreeSet, HashMap},
    io::{BufReader, BufWriter},
    net::TcpStream,
    os::unix::{
        ffi::OsStrExt as _,
        fs::{FileExt as _, FileTypeExt as _, MetadataExt as _},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use sha2::{Digest as _, Sha256};

use crate::{
    link::LinkError,
    wire::{Entry, Framed, Kind, Msg, Op, RelPath, WireError, join},
};

/// Block size for comparing a file of `size` bytes: 64 KiB, doubled until the checksums fit in
/// one message (at most 65536 blocks).
pub fn block_size(size: u64) -> u64 {
    let mut bs = 64 << 10;
    while size.div_ceil(bs) > 65536 {
        bs *= 2;
    }
    bs
}

fn hash(data: &[u8]) -> [u8; 16] {
    let d = Sha256::digest(data);
    d[..16].try_into().expect("16 bytes")
}

/// The checksums of each `bs`-byte block of the first `size` bytes of `f`.
pub fn hash_blocks(f: &std::fs::File, size: u64, bs: u64) -> std::io::Result<Vec<[u8; 16]>> {
    let mut out = Vec::with_capacity(size.div_ceil(bs) as usize);
    let mut buf = vec![0u8; bs as usize];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(bs) as usize;
        f.read_exact_at(&mut buf[..n], at)?;
        out.push(hash(&buf[..n]));
        at += n as u64;
    }
    Ok(out)
}

/// A resync's progress, as status shows it.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub pass: u32,
    /// Whether every file is compared by checksums (no trusted change record).
    pub full_check: bool,
    pub entries_total: u64,
    pub entries_done: u64,
    /// File data sent (blocks that differed, new files).
    pub bytes_sent: u64,
    /// File data found equal by checksum (not sent).
    pub bytes_same: u64,
    pub operations: u64,
    pub started: Option<Instant>,
}

/// The replica's answer to a probe: its entry and, for a file, its block checksums.
struct Probed {
    entry: Option<Entry>,
    block_size: u64,
    blocks: Vec<[u8; 16]>,
}

/// The primary's side of one resync session.
pub struct Resync<'a> {
    pub to: &'a mut Framed<BufWriter<TcpStream>>,
    pub from: &'a mut Framed<BufReader<TcpStream>>,
    pub root: &'a Path,
    pub progress: Arc<Mutex<Progress>>,
    /// First name seen of each hard-linked inode (dev, ino) in this resync.
    links: HashMap<(u64, u64), RelPath>,
    /// The replica's inode of each listed path (to see whether two names are linked there).
    their_inos: HashMap<RelPath, u64>,
    /// Directories whose times are set after their content.
    dir_times: Vec<(RelPath, std::fs::Metadata)>,
}

fn backing(path: &Path) -> impl FnOnce(std::io::Error) -> LinkError + '_ {
    move |source| LinkError::Backing {
        path: path.display().to_string(),
        source,
    }
}

/// What an entry is, from its metadata (`full`: its path, read only for a symlink's target).
/// Shared by both sides of a resync.
pub(crate) fn kind_of(m: &std::fs::Metadata, full: &Path) -> std::io::Result<Kind> {
    let ft = m.file_type();
    Ok(if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_symlink() {
        Kind::Symlink(
            std::fs::read_link(full)?
                .into_os_string()
                .into_encoded_bytes(),
        )
    } else if ft.is_fifo() || ft.is_socket() || ft.is_char_device() || ft.is_block_device() {
        Kind::Other { rdev: m.rdev() }
    } else {
        Kind::Other { rdev: 0 }
    })
}

impl<'a> Resync<'a> {
    pub fn new(
        to: &'a mut Framed<BufWriter<TcpStream>>,
        from: &'a mut Framed<BufReader<TcpStream>>,
        root: &'a Path,
        progress: Arc<Mutex<Progress>>,
    ) -> Self {
        Self {
            to,
            from,
            root,
            progress,
            links: HashMap::new(),
            their_inos: HashMap::new(),
            dir_times: Vec::new(),
        }
    }

    fn send(&mut self, op: Op) -> Result<(), LinkError> {
        let data = op.data_len() as u64;
        self.to.send(&Msg::Op(op))?;
        let mut p = self.progress.lock().expect("progress");
        p.operations += 1;
        p.bytes_sent += data;
        Ok(())
    }

    fn full(&self, rel: &[u8]) -> PathBuf {
        self.root.join(std::ffi::OsStr::from_bytes(rel))
    }

    /// The first pass: every entry of both trees. `force`: paths whose files are compared by
    /// checksums whatever their size and mtime; `all`: every file is.
    pub fn full_pass(&mut self, force: &BTreeSet<RelPath>, all: bool) -> Result<(), LinkError> {
        self.to.send(&Msg::List)?;
        self.to.flush()?;
        let mut theirs = std::collections::BTreeMap::new();
        loop {
            match self.from.recv()? {
                Msg::Entry(e) => {
                    theirs.insert(e.path.clone(), e);
                }
                Msg::EntriesEnd => break,
                Msg::Failed { message } => return Err(LinkError::Refused(message)),
                other => return Err(unexpected(&other)),
            }
        }
        self.their_inos = theirs.iter().map(|(p, e)| (p.clone(), e.ino)).collect();
        let ours = walk(self.root)?;
        {
            let mut p = self.progress.lock().expect("progress");
            p.entries_total = ours.len() as u64;
            p.entries_done = 0;
        }
        // Removals first, deepest first, so a directory goes with what it holds.
        for (path, _) in theirs.iter().rev() {
            if !ours.contains(path) {
                self.send(Op::RemoveAll { path: path.clone() })?;
            }
        }
        for path in &ours {
            let force = all || force.contains(path);
            self.fix(path, theirs.get(path), force, true)?;
            self.progress.lock().expect("progress").entries_done += 1;
        }
        self.finish_dirs()?;
        // The directory itself.
        let m = std::fs::metadata(self.root).map_err(backing(self.root))?;
        self.meta(&[], &m, None, true)
    }

    /// A later pass: only `paths` (what changed during the previous pass), each probed.
    pub fn record_pass(&mut self, paths: &BTreeSet<RelPath>) -> Result<(), LinkError> {
        {
            let mut p = self.progress.lock().expect("progress");
            p.entries_total = paths.len() as u64;
            p.entries_done = 0;
        }
        // Parents sort before their children; a path gone here is removed there.
        for path in paths {
            let theirs = self.probe(path)?.entry;
            self.fix(path, theirs.as_ref(), true, false)?;
            self.progress.lock().expect("progress").entries_done += 1;
        }
        self.finish_dirs()
    }

    fn finish_dirs(&mut self) -> Result<(), LinkError> {
        for (path, m) in std::mem::take(&mut self.dir_times).into_iter().rev() {
            self.send(times(&path, &m))?;
        }
        Ok(())
    }

    fn probe(&mut self, path: &[u8]) -> Result<Probed, LinkError> {
        self.to.send(&Msg::Probe {
            path: path.to_vec(),
        })?;
        self.to.flush()?;
        match self.from.recv()? {
            Msg::Probed {
                path: p,
                entry,
                block_size,
                blocks,
            } if p == path => Ok(Probed {
                entry,
                block_size,
                blocks,
            }),
            Msg::Failed { message } => Err(LinkError::Refused(message)),
            other => Err(unexpected(&other)),
        }
    }

    /// Makes the replica's `rel` equal to ours. `theirs`: the replica's entry as listed
    /// (`listed`) or probed.
    fn fix(
        &mut self,
        rel: &[u8],
        theirs: Option<&Entry>,
        force: bool,
        listed: bool,
    ) -> Result<(), LinkError> {
        let full = self.full(rel);
        let m = match std::fs::symlink_metadata(&full) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Gone here since (a later pass deals with what replaced it).
                if theirs.is_some() {
                    self.send(Op::RemoveAll { path: rel.to_vec() })?;
                }
                return Ok(());
            }
            Err(e) => return Err(backing(&full)(e)),
        };
        let kind = match kind_of(&m, &full) {
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(backing(&full)(e)),
        };
        let same_kind = theirs.is_some_and(|t| {
            t.kind == kind && (t.mode & libc::S_IFMT) == (m.mode() & libc::S_IFMT)
        });
        let theirs = if same_kind {
            theirs
        } else {
            if theirs.is_some() {
                self.send(Op::RemoveAll { path: rel.to_vec() })?;
            }
            None
        };
        let path = rel.to_vec();
        match &kind {
            Kind::Dir => {
                if theirs.is_none() {
                    self.send(Op::Mkdir {
                        path: path.clone(),
                        mode: m.mode() & 0o7777,
                    })?;
                }
                self.meta(rel, &m, theirs, false)?;
                if theirs.is_none_or(|t| t.mtime != mtime(&m)) {
                    self.dir_times.push((path, m));
                }
                return Ok(());
            }
            Kind::Symlink(target) => {
                if theirs.is_none() {
                    self.send(Op::Symlink {
                        target: target.clone(),
                        path: path.clone(),
                    })?;
                }
                return self.meta(rel, &m, theirs, false);
            }
            Kind::Other { rdev } => {
                if theirs.is_none() {
                    self.send(Op::Mknod {
                        path: path.clone(),
                        mode: m.mode(),
                        rdev: *rdev,
                    })?;
                }
                return self.meta(rel, &m, theirs, true);
            }
            Kind::File => {}
        }
        if m.nlink() > 1 {
            let key = (m.dev(), m.ino());
            if let Some(first) = self.links.get(&key).cloned() {
                // Another name of an inode already dealt with: linked there too, unless the
                // listing shows both names on one inode already.
                let linked =
                    listed && theirs.is_some_and(|t| Some(t.ino) == self.their_ino(&first));
                if !linked {
                    if theirs.is_some() {
                        self.send(Op::RemoveAll { path: path.clone() })?;
                    }
                    self.send(Op::Link {
                        from: first,
                        to: path,
                    })?;
                }
                return Ok(());
            }
            self.links.insert(key, path.clone());
        }
        let f = match std::fs::File::open(&full) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(backing(&full)(e)),
        };
        let size = m.len();
        let sent = match theirs {
            None => {
                self.send(Op::Create {
                    path: path.clone(),
                    mode: m.mode() & 0o7777,
                })?;
                self.copy_regions(&f, rel, size)?;
                true
            }
            Some(t) if force || t.size != size || t.mtime != mtime(&m) => {
                let p = self.probe(rel)?;
                let changed = self.send_differing(&f, rel, size, p.block_size.max(1), &p.blocks)?;
                if t.size != size {
                    self.send(Op::Truncate {
                        path: path.clone(),
                        size,
                    })?;
                }
                changed || t.size != size
            }
            Some(_) => false,
        };
        self.meta(rel, &m, theirs, true)?;
        if sent || theirs.is_none_or(|t| t.mtime != mtime(&m)) {
            self.send(times(rel, &m))?;
        }
        Ok(())
    }

    fn their_ino(&self, first: &[u8]) -> Option<u64> {
        self.their_inos.get(first).copied()
    }

    /// Owner and mode where they differ (or for a new entry).
    fn meta(
        &mut self,
        rel: &[u8],
        m: &std::fs::Metadata,
        theirs: Option<&Entry>,
        with_mode: bool,
    ) -> Result<(), LinkError> {
        if theirs.is_none_or(|t| t.uid != m.uid() || t.gid != m.gid()) {
            self.send(Op::Chown {
                path: rel.to_vec(),
                uid: Some(m.uid()),
                gid: Some(m.gid()),
            })?;
        }
        let symlink = m.file_type().is_symlink();
        if !symlink
            && (with_mode || theirs.is_some())
            && theirs.is_none_or(|t| t.mode & 0o7777 != m.mode() & 0o7777)
        {
            self.send(Op::Chmod {
                path: rel.to_vec(),
                mode: m.mode() & 0o7777,
            })?;
        }
        Ok(())
    }

    /// A new file: its data regions (holes stay holes), then its size.
    fn copy_regions(&mut self, f: &std::fs::File, rel: &[u8], size: u64) -> Result<(), LinkError> {
        use std::os::fd::AsRawFd as _;
        let mut pos: u64 = 0;
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
            range_writes(f, rel, data as u64, end, &mut |op| self.send(op))?;
            pos = end;
        }
        self.send(Op::Truncate {
            path: rel.to_vec(),
            size,
        })
    }

    /// Sends the blocks of our file whose checksums differ from the replica's (`blocks` of
    /// `bs` bytes); a block that is a hole here is punched there. Returns whether any was sent.
    fn send_differing(
        &mut self,
        f: &std::fs::File,
        rel: &[u8],
        size: u64,
        bs: u64,
        blocks: &[[u8; 16]],
    ) -> Result<bool, LinkError> {
        use std::os::fd::AsRawFd as _;
        let mut buf = vec![0u8; bs as usize];
        let mut changed = false;
        let mut at = 0u64;
        let mut i = 0usize;
        while at < size {
            let n = (size - at).min(bs) as usize;
            // A whole hole here: punched there if it holds anything.
            // SAFETY: valid fd.
            let data = unsafe { libc::lseek(f.as_raw_fd(), at as i64, libc::SEEK_DATA) };
            let hole = data < 0 || data as u64 >= at + n as u64;
            if hole {
                buf[..n].fill(0);
            } else if let Err(e) = f.read_exact_at(&mut buf[..n], at) {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    break;
                }
                return Err(LinkError::Backing {
                    path: String::from_utf8_lossy(rel).into_owned(),
                    source: e,
                });
            }
            let same = blocks.get(i).is_some_and(|b| *b == hash(&buf[..n]));
            if same {
                self.progress.lock().expect("progress").bytes_same += n as u64;
            } else if hole && i < blocks.len() {
                self.send(Op::Fallocate {
                    path: rel.to_vec(),
                    mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset: at,
                    len: n as u64,
                })?;
                changed = true;
            } else if !hole {
                self.send(Op::Write {
                    path: rel.to_vec(),
                    offset: at,
                    data: buf[..n].to_vec(),
                })?;
                changed = true;
            }
            at += n as u64;
            i += 1;
        }
        Ok(changed)
    }
}

/// The bytes `from..to` of `f` as writes to `rel` of at most 512 KiB each, in order, given to
/// `emit`; stops at the file's end if it shrank meanwhile (whoever shrank it recorded that).
/// Shared by the resync and the primary's copy_file_range.
pub fn range_writes(
    f: &std::fs::File,
    rel: &[u8],
    from: u64,
    to: u64,
    emit: &mut dyn FnMut(Op) -> Result<(), LinkError>,
) -> Result<(), LinkError> {
    const CHUNK: u64 = 512 << 10;
    let mut at = from;
    while at < to {
        let n = (to - at).min(CHUNK) as usize;
        let mut buf = vec![0u8; n];
        match f.read_exact_at(&mut buf, at) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => {
                return Err(LinkError::Backing {
                    path: String::from_utf8_lossy(rel).into_owned(),
                    source: e,
                });
            }
        }
        emit(Op::Write {
            path: rel.to_vec(),
            offset: at,
            data: buf,
        })?;
        at += n as u64;
    }
    Ok(())
}

fn mtime(m: &std::fs::Metadata) -> (i64, u32) {
    (m.mtime(), m.mtime_nsec() as u32)
}

fn times(rel: &[u8], m: &std::fs::Metadata) -> Op {
    Op::Times {
        path: rel.to_vec(),
        atime: Some((m.atime(), m.atime_nsec() as u32)),
        mtime: Some(mtime(m)),
    }
}

fn unexpected(m: &Msg) -> LinkError {
    WireError::Malformed(format!("unexpected answer during a resync: {m:?}")).into()
}

/// Every path under `root`, sorted (parents before children).
pub fn walk(root: &Path) -> Result<BTreeSet<RelPath>, LinkError> {
    let mut out = BTreeSet::new();
    let mut stack = vec![Vec::<u8>::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(std::ffi::OsStr::from_bytes(&rel));
        let read = match std::fs::read_dir(&dir) {
            Ok(r) => r,
            // Removed meanwhile: the change record has it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !rel.is_empty() => continue,
            Err(e) => return Err(backing(&dir)(e)),
        };
        for e in read {
            let e = e.map_err(backing(&dir))?;
            let child = join(&rel, e.file_name().as_bytes());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(child.clone());
            }
            out.insert(child);
        }
    }
    Ok(out)
}
