//! The primary's filesystem: FUSE in front of the local backing directory. Every operation is
//! done on the backing directory first; every change is then queued to the secondary (`link`)
//! by path, in the order the application made them. fsync, fdatasync, fsync of a directory and
//! every write on an O_SYNC/O_DSYNC file answer only once the local disk has the data *and*
//! the secondary has acknowledged everything before it: a write the application was told is
//! durable is on both nodes.
//!
//! Inode numbers are the backing files' (mapped to FUSE numbers; the root is 1), so hard links
//! share one. O_DIRECT opens are served with FOPEN_DIRECT_IO (no page cache). Extended
//! attributes are not supported (ENOTSUP).

use std::{
    collections::HashMap,
    ffi::{CString, OsStr},
    fs::File,
    os::{
        fd::{AsRawFd as _, FromRawFd as _},
        unix::{
            ffi::OsStrExt as _,
            fs::{FileExt as _, MetadataExt as _},
        },
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use fuser::{
    FileAttr, FileType, Filesystem, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};

use crate::{
    link::{Link, Synced},
    wire::Op,
};

const TTL: Duration = Duration::from_secs(1);

struct Node {
    /// Relative path of its last known name (`None`: its last name was removed).
    path: Option<Vec<u8>>,
    lookups: u64,
}

enum Handle {
    File {
        file: File,
        ino: u64,
        /// Every write is synchronous (O_SYNC/O_DSYNC).
        sync_writes: bool,
    },
    Dir {
        entries: Vec<(u64, FileType, Vec<u8>)>,
    },
}

/// The filesystem.
pub struct MirrorFs {
    backing: PathBuf,
    link: Link,
    nodes: HashMap<u64, Node>,
    by_backing: HashMap<(u64, u64), u64>,
    next_ino: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn cstr(p: &Path) -> Result<CString, i32> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| libc::EINVAL)
}

fn check(r: libc::c_int) -> Result<(), i32> {
    if r < 0 {
        Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    } else {
        Ok(())
    }
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

fn kind(m: &std::fs::Metadata) -> FileType {
    let ft = m.file_type();
    use std::os::unix::fs::FileTypeExt as _;
    if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_block_device() {
        FileType::BlockDevice
    } else if ft.is_char_device() {
        FileType::CharDevice
    } else if ft.is_fifo() {
        FileType::NamedPipe
    } else if ft.is_socket() {
        FileType::Socket
    } else {
        FileType::RegularFile
    }
}

fn join(parent: &[u8], name: &OsStr) -> Vec<u8> {
    crate::wire::join(parent, name.as_bytes())
}

fn reply_entry(reply: ReplyEntry, r: Result<FileAttr, i32>) {
    match r {
        Ok(attr) => reply.entry(&TTL, &attr, 0),
        Err(e) => reply.error(e),
    }
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), i32>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl MirrorFs {
    pub fn new(backing: &Path, link: Link) -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            fuser::FUSE_ROOT_ID,
            Node {
                path: Some(Vec::new()),
                lookups: 1,
            },
        );
        Self {
            backing: backing.to_path_buf(),
            link,
            nodes,
            by_backing: HashMap::new(),
            next_ino: 2,
            handles: HashMap::new(),
            next_fh: 1,
        }
    }

    fn real(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.backing.clone()
        } else {
            self.backing.join(OsStr::from_bytes(rel))
        }
    }

    fn path_of(&self, ino: u64) -> Result<Vec<u8>, i32> {
        self.nodes
            .get(&ino)
            .and_then(|n| n.path.clone())
            .ok_or(libc::ENOENT)
    }

    fn attr(&self, ino: u64, m: &std::fs::Metadata) -> FileAttr {
        FileAttr {
            ino,
            size: m.len(),
            blocks: m.blocks(),
            atime: time(m.atime(), m.atime_nsec()),
            mtime: time(m.mtime(), m.mtime_nsec()),
            ctime: time(m.ctime(), m.ctime_nsec()),
            crtime: time(m.ctime(), m.ctime_nsec()),
            kind: kind(m),
            perm: (m.mode() & 0o7777) as u16,
            nlink: m.nlink() as u32,
            uid: m.uid(),
            gid: m.gid(),
            rdev: m.rdev() as u32,
            blksize: m.blksize() as u32,
            flags: 0,
        }
    }

    /// Registers (or finds) the node of `rel` and returns its attributes; counts a lookup.
    fn entry(&mut self, rel: Vec<u8>) -> Result<FileAttr, i32> {
        let m = std::fs::symlink_metadata(self.real(&rel)).map_err(|e| errno(&e))?;
        let key = (m.dev(), m.ino());
        let ino = if rel.is_empty() {
            fuser::FUSE_ROOT_ID
        } else {
            match self.by_backing.get(&key) {
                Some(&i) => i,
                None => {
                    let i = self.next_ino;
                    self.next_ino += 1;
                    self.by_backing.insert(key, i);
                    i
                }
            }
        };
        let n = self.nodes.entry(ino).or_insert(Node {
            path: None,
            lookups: 0,
        });
        n.path = Some(rel);
        n.lookups += 1;
        Ok(self.attr(ino, &m))
    }

    /// Gives a new entry to the caller (a root daemon creates it as root) and queues that.
    fn own(&self, rel: &[u8], req: &Request<'_>) -> Result<(), i32> {
        let c = cstr(&self.real(rel))?;
        // SAFETY: valid C string.
        check(unsafe { libc::lchown(c.as_ptr(), req.uid(), req.gid()) })?;
        self.link.op(Op::Chown {
            path: rel.to_vec(),
            uid: Some(req.uid()),
            gid: Some(req.gid()),
        });
        Ok(())
    }

    /// Renames in the node table (a directory's descendants move with it).
    fn renamed(&mut self, from: &[u8], to: &[u8]) {
        let mut prefix = from.to_vec();
        prefix.push(b'/');
        for n in self.nodes.values_mut() {
            if let Some(p) = &mut n.path {
                if p.as_slice() == from {
                    *p = to.to_vec();
                } else if p.starts_with(&prefix) {
                    let mut np = to.to_vec();
                    np.extend_from_slice(&p[from.len()..]);
                    *p = np;
                }
            }
        }
    }

    /// A name was removed: nodes known by it lose their path.
    fn removed(&mut self, rel: &[u8]) {
        for n in self.nodes.values_mut() {
            if n.path.as_deref() == Some(rel) {
                n.path = None;
            }
        }
    }

    /// Current times of `rel`, queued (after a change that sets them, e.g. utimensat(NOW)).
    fn queue_times(&self, rel: &[u8]) {
        if let Ok(m) = std::fs::symlink_metadata(self.real(rel)) {
            self.link.op(Op::Times {
                path: rel.to_vec(),
                atime: Some((m.atime(), m.atime_nsec() as u32)),
                mtime: Some((m.mtime(), m.mtime_nsec() as u32)),
            });
        }
    }

    /// Removes a file (or an empty directory) and queues that.
    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), i32> {
        let rel = join(&self.path_of(parent)?, name);
        let real = self.real(&rel);
        let (r, op) = if dir {
            (std::fs::remove_dir(real), Op::Rmdir { path: rel.clone() })
        } else {
            (std::fs::remove_file(real), Op::Unlink { path: rel.clone() })
        };
        r.map_err(|e| errno(&e))?;
        self.link.op(op);
        self.removed(&rel);
        Ok(())
    }

    /// Makes everything so far durable here (`local`) and on the secondary at the same time:
    /// the barrier goes out first, the local sync runs while the secondary works, and `answer`
    /// gets the outcome once both are done (the local error first; EIO when the primary stops
    /// without its secondary having the data).
    fn sync_both(
        &self,
        local: impl FnOnce() -> Result<(), i32>,
        answer: impl FnOnce(Result<(), i32>) + Send + 'static,
    ) {
        type Answer = Box<dyn FnOnce(Result<(), i32>) + Send>;
        struct Pending {
            local: Option<Result<(), i32>>,
            remote: Option<Synced>,
            answer: Option<Answer>,
        }
        fn settle(p: &Mutex<Pending>, local: Option<Result<(), i32>>, remote: Option<Synced>) {
            let mut g = p.lock().expect("pending sync");
            if local.is_some() {
                g.local = local;
            }
            if remote.is_some() {
                g.remote = remote;
            }
            if let (Some(l), Some(r)) = (g.local, g.remote)
                && let Some(answer) = g.answer.take()
            {
                drop(g);
                answer(match (l, r) {
                    (Err(e), _) => Err(e),
                    (Ok(()), Synced::Failed) => Err(libc::EIO),
                    (Ok(()), Synced::Both | Synced::Local) => Ok(()),
                });
            }
        }
        let pending = Arc::new(Mutex::new(Pending {
            local: None,
            remote: None,
            answer: Some(Box::new(answer)),
        }));
        let p = pending.clone();
        self.link.sync(Box::new(move |r| settle(&p, None, Some(r))));
        settle(&pending, Some(local()), None);
    }
}

impl Filesystem for MirrorFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let r = self
            .path_of(parent)
            .and_then(|p| self.entry(join(&p, name)));
        reply_entry(reply, r);
    }

    fn forget(&mut self, _req: &Request<'_>, ino: u64, nlookup: u64) {
        if ino == fuser::FUSE_ROOT_ID {
            return;
        }
        let gone = match self.nodes.get_mut(&ino) {
            Some(n) => {
                n.lookups = n.lookups.saturating_sub(nlookup);
                n.lookups == 0
            }
            None => false,
        };
        let open = self
            .handles
            .values()
            .any(|h| matches!(h, Handle::File { ino: i, .. } if *i == ino));
        if gone && !open {
            self.nodes.remove(&ino);
            self.by_backing.retain(|_, i| *i != ino);
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, fh: Option<u64>, reply: ReplyAttr) {
        let m = match (fh.and_then(|f| self.handles.get(&f)), self.path_of(ino)) {
            (Some(Handle::File { file, .. }), _) => file.metadata(),
            (_, Ok(p)) => std::fs::symlink_metadata(self.real(&p)),
            (_, Err(e)) => return reply.error(e),
        };
        match m {
            Ok(m) => reply.attr(&TTL, &self.attr(ino, &m)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        // Held while the change is made and queued (see Link::pass).
        let _pass = self.link.pass();
        let rel = match self.path_of(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let real = self.real(&rel);
        let c = match cstr(&real) {
            Ok(c) => c,
            Err(e) => return reply.error(e),
        };
        let r = (|| -> Result<(), i32> {
            if let Some(mode) = mode {
                // SAFETY: valid C string.
                check(unsafe { libc::chmod(c.as_ptr(), mode & 0o7777) })?;
                self.link.op(Op::Chmod {
                    path: rel.clone(),
                    mode: mode & 0o7777,
                });
            }
            if uid.is_some() || gid.is_some() {
                let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
                // SAFETY: valid C string.
                check(unsafe { libc::lchown(c.as_ptr(), u, g) })?;
                self.link.op(Op::Chown {
                    path: rel.clone(),
                    uid,
                    gid,
                });
            }
            if let Some(size) = size {
                let r = match fh.and_then(|f| self.handles.get(&f)) {
                    Some(Handle::File { file, .. }) => file.set_len(size),
                    _ => std::fs::OpenOptions::new()
                        .write(true)
                        .open(&real)
                        .and_then(|f| f.set_len(size)),
                };
                r.map_err(|e| errno(&e))?;
                self.link.op(Op::Truncate {
                    path: rel.clone(),
                    size,
                });
            }
            if atime.is_some() || mtime.is_some() {
                let ts = |t: Option<TimeOrNow>| match t {
                    None => libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    },
                    Some(TimeOrNow::Now) => libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_NOW,
                    },
                    Some(TimeOrNow::SpecificTime(t)) => {
                        let (s, ns) = match t.duration_since(UNIX_EPOCH) {
                            Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                            Err(e) => (-(e.duration().as_secs() as i64), 0),
                        };
                        libc::timespec {
                            tv_sec: s,
                            tv_nsec: ns,
                        }
                    }
                };
                let times = [ts(atime), ts(mtime)];
                // SAFETY: valid C string and two timespecs.
                check(unsafe {
                    libc::utimensat(
                        libc::AT_FDCWD,
                        c.as_ptr(),
                        times.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                })?;
                self.queue_times(&rel);
            }
            Ok(())
        })();
        if let Err(e) = r {
            return reply.error(e);
        }
        match std::fs::symlink_metadata(&real) {
            Ok(m) => reply.attr(&TTL, &self.attr(ino, &m)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        match self
            .path_of(ino)
            .and_then(|p| std::fs::read_link(self.real(&p)).map_err(|e| errno(&e)))
        {
            Ok(t) => reply.data(t.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        // Held while the change is made and queued (see Link::pass).
        let _pass = self.link.pass();
        let r = (|| {
            let rel = join(&self.path_of(parent)?, name);
            let c = cstr(&self.real(&rel))?;
            let mode = mode & !umask;
            // SAFETY: valid C string.
            check(unsafe { libc::mknod(c.as_ptr(), mode, rdev as u64) })?;
            self.link.op(Op::Mknod {
                path: rel.clone(),
                mode,
                rdev: rdev as u64,
            });
            self.own(&rel, req)?;
            self.entry(rel)
        })();
        reply_entry(reply, r);
    }

    fn mkdir(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        // Held while the change is made and queued (see Link::pass).
        let _pass = self.link.pass();
        let r = (|| {
            let rel = join(&self.path_of(parent)?, name);
            let c = cstr(&self.real(&rel))?;
            let mode = mode & !umask & 0o7777;
            // SAFETY: valid C string.
            check(unsafe { libc::mkdir(c.as_ptr(), mode) })?;
            self.link.op(Op::Mkdir {
                path: rel.clone(),
                mode,
            });
            // The process umask may have masked more: the replica gets the real mode.
            if let Ok(m) = std::fs::symlink_metadata(self.real(&rel)) {
                self.link.op(Op::Chmod {
                    path: rel.clone(),
                    mode: m.mode() & 0o7777,
                });
            }
            self.own(&rel, req)?;
            self.entry(rel)
        })();
        reply_entry(reply, r);
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        // Held while the change is made and queued (see Link::pass).
        let _pass = self.link.pass();
        let r = self.remove(parent, name, false);
        reply_empty(reply, r);
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        // Held while the change is made and queued (see Link::pass).
        let _pass = self.link.pass();
        let r = self.remove(parent, name, true);
        reply_empty(reply, r);
    }

    fn symlink(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        // Held while the change is made and queued (see Link::pass).
        let _pass = self.link.pass();
        let r = (|| {
            let rel = join(&self.path_of(parent)?, link_name);
            std::os::unix::fs::symlink(target, self.real(&rel)).map_err(|e| errno(&e))?;
            self.link.op(Op::Symlink {
                target: target.as_os_str().as_bytes().to_vec(),
                path: rel.clone(),
            });
            self.own(&rel, req)?;
            self.entry(rel)
        })();
        reply_entry(reply, r);
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        // Held while the change is made and queued (see Link::pass).
        let _pass = self.link.pass();
        let r = (|| {
            let from = join(&self.path_of(parent)?, name);
            let to = join(&self.path_of(newparent)?, newname);
            let (a, b) = (cstr(&self.real(&from))?, cstr(&self.real(&to))?);
            // SAFETY: valid C strings.
            check(unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    a.as_ptr(),
                    libc::AT_FDCWD,
                    b.as_ptr(),
                    flags,
                )
            })?;
            self.link.op(Op::Rename {
                from: from.clone(),
                to: to.clone(),
                flags,
            });
            if flags & libc::RENAME_EXCHANGE != 0 {
                // Swap the two names in the table through a placeholder.
                let tmp = b"\0exchange".to_vec();
                self.renamed(&to, &tmp);
                self.renamed(&from, &to);
                self.renamed(&tmp, &from);
            } else {
                self.removed(&to);
                self.renamed(&from, &to);
            }
            Ok(())
        })();
        reply_empty(reply, r);
    }

    fn link(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        // Held while the change is made and queued (see Link::pass).
        let _pass = self.link.pass();
        let r = (|| {
            let from = self.path_of(ino)?;
            let to = join(&self.path_of(newparent)?, newname);
            std::fs::hard_link(self.real(&from), self.real(&to)).map_err(|e| errno(&e))?;
            self.link.op(Op::Link {
                from,
                to: to.clone(),
            });
            self.entry(to)
        })();
        reply_entry(reply, r);
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let rel = match self.path_of(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        // The kernel truncates with setattr, appends at the offsets it sends, and O_DIRECT is
        // served without the page cache (FOPEN_DIRECT_IO) rather than with aligned buffers.
        let backing_flags = flags
            & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_APPEND | libc::O_DIRECT)
            | libc::O_CLOEXEC
            | libc::O_NOFOLLOW;
        let c = match cstr(&self.real(&rel)) {
            Ok(c) => c,
            Err(e) => return reply.error(e),
        };
        // SAFETY: valid C string; the fd is owned right after.
        let fd = unsafe { libc::open(c.as_ptr(), backing_flags) };
        if fd < 0 {
            return reply.error(errno(&std::io::Error::last_os_error()));
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(
            fh,
            Handle::File {
                // SAFETY: fd is fresh and valid.
                file: unsafe { File::from_raw_fd(fd) },
                ino,
                sync_writes: flags & (libc::O_SYNC | libc::O_DSYNC) != 0,
            },
        );
        let open_flags = if flags & libc::O_DIRECT != 0 {
            fuser::consts::FOPEN_DIRECT_IO
        } else {
            0
        };
        reply.opened(fh, open_flags);
    }

    fn create(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        // Held while the change is made and queued (see Link::pass).
        let _pass = self.link.pass();
        let r = (|| {
            let rel = join(&self.path_of(parent)?, name);
            let c = cstr(&self.real(&rel))?;
            let mode = mode & !umask & 0o7777;
            let backing_flags = flags & !(libc::O_TRUNC | libc::O_APPEND | libc::O_DIRECT)
                | libc::O_CREAT
                | libc::O_CLOEXEC
                | libc::O_NOFOLLOW;
            // SAFETY: valid C string; the fd is owned right after.
            let fd = unsafe { libc::open(c.as_ptr(), backing_flags, mode) };
            if fd < 0 {
                return Err(errno(&std::io::Error::last_os_error()));
            }
            // SAFETY: fd is fresh and valid.
            let file = unsafe { File::from_raw_fd(fd) };
            let real_mode = file.metadata().map(|m| m.mode() & 0o7777).unwrap_or(mode);
            self.link.op(Op::Create {
                path: rel.clone(),
                mode: real_mode,
            });
            if flags & libc::O_TRUNC != 0 {
                file.set_len(0).map_err(|e| errno(&e))?;
                self.link.op(Op::Truncate {
                    path: rel.clone(),
                    size: 0,
                });
            }
            self.own(&rel, req)?;
            let attr = self.entry(rel)?;
            let fh = self.next_fh;
            self.next_fh += 1;
            self.handles.insert(
                fh,
                Handle::File {
                    file,
                    ino: attr.ino,
                    sync_writes: flags & (libc::O_SYNC | libc::O_DSYNC) != 0,
                },
            );
            Ok((attr, fh))
        })();
        match r {
            Ok((attr, fh)) => {
                let open_flags = if flags & libc::O_DIRECT != 0 {
                    fuser::consts::FOPEN_DIRECT_IO
                } else {
                    0
                };
                reply.created(&TTL, &attr, 0, fh, open_flags)
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Some(Handle::File { file, .. }) = self.handles.get(&fh) else {
            return reply.error(libc::EBADF);
        };
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], offset as u64 + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(errno(&e)),
            }
        }
        reply.data(&buf[..got]);
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        // Held while the change is made and queued (see Link::pass).
        let _pass = self.link.pass();
        let Some(Handle::File {
            file,
            ino,
            sync_writes,
        }) = self.handles.get(&fh)
        else {
            return reply.error(libc::EBADF);
        };
        if let Err(e) = file.write_all_at(data, offset as u64) {
            return reply.error(errno(&e));
        }
        let (ino, sync_writes) = (*ino, *sync_writes);
        if let Some(path) = self.nodes.get(&ino).and_then(|n| n.path.clone()) {
            self.link.op(Op::Write {
                path,
                offset: offset as u64,
                data: data.to_vec(),
            });
        } else if file.metadata().is_ok_and(|m| m.nlink() > 0) {
            // A file whose name this filesystem saw removed but that has another name (a hard
            // link): the write cannot be sent by name. Unlinked files need nothing (the replica
            // removed them too).
            self.link
                .fail("a write to a hard-linked file through a removed name".into());
        }
        let n = data.len() as u32;
        if sync_writes {
            let Some(Handle::File { file, .. }) = self.handles.get(&fh) else {
                return reply.error(libc::EBADF);
            };
            self.sync_both(
                || file.sync_data().map_err(|e| errno(&e)),
                move |r| match r {
                    Ok(()) => reply.written(n),
                    Err(e) => reply.error(e),
                },
            );
        } else {
            reply.written(n);
        }
    }

    fn copy_file_range(
        &mut self,
        _req: &Request<'_>,
        _ino_in: u64,
        fh_in: u64,
        offset_in: i64,
        _ino_out: u64,
        fh_out: u64,
        offset_out: i64,
        len: u64,
        _flags: u32,
        reply: ReplyWrite,
    ) {
        // Held while the change is made and queued (see Link::pass).
        let _pass = self.link.pass();
        let (Some(Handle::File { file: from, .. }), Some(Handle::File { file: to, ino, .. })) =
            (self.handles.get(&fh_in), self.handles.get(&fh_out))
        else {
            return reply.error(libc::EBADF);
        };
        let (mut off_in, mut off_out) = (offset_in, offset_out);
        // The backing filesystem copies (reflinks where it can); the copied range is then
        // shipped as writes of what the destination now holds.
        // SAFETY: valid fds and offsets owned by this call.
        let n = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut off_in,
                to.as_raw_fd(),
                &mut off_out,
                len as usize,
                0,
            )
        };
        if n < 0 {
            return reply.error(errno(&std::io::Error::last_os_error()));
        }
        let Some(path) = self.nodes.get(ino).and_then(|n| n.path.clone()) else {
            self.link
                .fail("a copy into a hard-linked file through a removed name".into());
            return reply.written(n as u32);
        };
        // Read back through a descriptor of our own (the destination may be write-only).
        let from = offset_out as u64;
        let shipped = File::open(self.real(&path))
            .map_err(|e| crate::link::LinkError::Backing {
                path: String::from_utf8_lossy(&path).into_owned(),
                source: e,
            })
            .and_then(|back| {
                crate::resync::range_writes(&back, &path, from, from + n as u64, &mut |op| {
                    self.link.op(op);
                    Ok(())
                })
            });
        if let Err(e) = shipped {
            self.link.fail(format!("reading back a copied range: {e}"));
        }
        reply.written(n as u32);
    }

    fn flush(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _lock_owner: u64,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.remove(&fh);
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, _ino: u64, fh: u64, datasync: bool, reply: ReplyEmpty) {
        let Some(Handle::File { file, .. }) = self.handles.get(&fh) else {
            return reply.error(libc::EBADF);
        };
        let local = || {
            if datasync {
                file.sync_data()
            } else {
                file.sync_all()
            }
            .map_err(|e| errno(&e))
        };
        self.sync_both(local, move |r| reply_empty(reply, r));
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        let rel = match self.path_of(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let read = std::fs::read_dir(self.real(&rel)).and_then(|d| {
            d.map(|e| {
                let e = e?;
                let m = e.metadata()?;
                Ok((m.ino(), kind(&m), e.file_name().as_bytes().to_vec()))
            })
            .collect::<std::io::Result<Vec<_>>>()
        });
        match read {
            Ok(mut entries) => {
                entries.insert(0, (ino, FileType::Directory, b".".to_vec()));
                entries.insert(1, (ino, FileType::Directory, b"..".to_vec()));
                let fh = self.next_fh;
                self.next_fh += 1;
                self.handles.insert(fh, Handle::Dir { entries });
                reply.opened(fh, 0);
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let Some(Handle::Dir { entries }) = self.handles.get(&fh) else {
            return reply.error(libc::EBADF);
        };
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as i64, *kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        reply: ReplyEmpty,
    ) {
        self.handles.remove(&fh);
        reply.ok();
    }

    fn fsyncdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let dir = self
            .path_of(ino)
            .and_then(|p| File::open(self.real(&p)).map_err(|e| errno(&e)));
        match dir {
            Ok(d) => self.sync_both(
                || d.sync_all().map_err(|e| errno(&e)),
                move |r| reply_empty(reply, r),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let c = match cstr(&self.backing) {
            Ok(c) => c,
            Err(e) => return reply.error(e),
        };
        // SAFETY: zeroed statvfs is valid; filled by the call.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid C string and statvfs.
        if let Err(e) = check(unsafe { libc::statvfs(c.as_ptr(), &mut s) }) {
            return reply.error(e);
        }
        reply.statfs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize as u32,
            s.f_namemax as u32,
            s.f_frsize as u32,
        );
    }

    fn ioctl(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _flags: u32,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(libc::ENOTTY);
    }

    fn getxattr(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(libc::ENOTSUP);
    }

    fn listxattr(&mut self, _req: &Request<'_>, _ino: u64, size: u32, reply: fuser::ReplyXattr) {
        // No attributes: an empty list.
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        // Held while the change is made and queued (see Link::pass).
        let _pass = self.link.pass();
        let Some(Handle::File { file, .. }) = self.handles.get(&fh) else {
            return reply.error(libc::EBADF);
        };
        // SAFETY: valid fd.
        if let Err(e) = check(unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, length) }) {
            return reply.error(e);
        }
        if let Ok(path) = self.path_of(ino) {
            self.link.op(Op::Fallocate {
                path,
                mode,
                offset: offset as u64,
                len: length as u64,
            });
        }
        reply.ok();
    }
}
