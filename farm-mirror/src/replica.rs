//! The secondary's side: applies the primary's operations to the replica directory, and makes
//! them durable (syncfs) when the primary asks, before acknowledging.
//!
//! Every path is resolved beneath the replica directory with openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS) for its parent and a *at call with no symlink following for its last
//! component: whatever the primary sends, nothing outside the replica is touched.

use std::{
    ffi::CString,
    io,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use std::os::unix::ffi::OsStrExt as _;

use crate::{
    state::{StateError, StateFile},
    wire::{self, Entry, Kind, Msg, Op, WireError},
};

/// How a replica entry is described to the primary.
fn describe(path: Vec<u8>, m: &std::fs::Metadata, full: &Path) -> Result<Entry, ReplicaError> {
    use std::os::unix::fs::MetadataExt as _;
    let kind = crate::resync::kind_of(m, full).map_err(Replica::os("reading the link", &path))?;
    Ok(Entry {
        path,
        kind,
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        size: m.len(),
        mtime: (m.mtime(), m.mtime_nsec() as u32),
        ino: m.ino(),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("path {0:?} is not a plain relative path")]
    BadPath(String),
    #[error("{what} {path:?}: {source}")]
    Os {
        what: &'static str,
        path: String,
        source: io::Error,
    },
    #[error("opening the replica directory {0}: {1}")]
    Root(PathBuf, io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("handshake: {0}")]
    Handshake(WireError),
    #[error(
        "refused: {0} (the primary asked for a privileged file; set `allow_privileged_files = \
         true` in the mirror group only if the application needs one)"
    )]
    Refused(String),
    #[error(transparent)]
    State(#[from] StateError),
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The components of a relative path, refused if any could leave the directory.
pub fn components(rel: &[u8]) -> Result<Vec<&[u8]>, ReplicaError> {
    if rel.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<&[u8]> = rel.split(|&b| b == b'/').collect();
    let bad = parts
        .iter()
        .any(|p| p.is_empty() || *p == b"." || *p == b".." || p.contains(&0));
    if bad {
        return Err(ReplicaError::BadPath(
            String::from_utf8_lossy(rel).into_owned(),
        ));
    }
    Ok(parts)
}

/// openat2(2) answered ENOSYS (an old kernel, or systemd's `RestrictSUIDSGID=`): paths are
/// resolved by `Replica::open_dir_by_steps` from then on.
static OPENAT2_REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The replica directory.
pub struct Replica {
    root: OwnedFd,
    /// The directory opened for reading (syncfs does not take O_PATH descriptors).
    synced: std::fs::File,
    dir: PathBuf,
    /// What changed since the last sync (see `sync`).
    dirty: std::sync::Mutex<Dirty>,
    /// Whether device nodes and set-user/group-id files may be made.
    allow_privileged: bool,
}

/// Entries changed since the last sync: a sync makes just these durable (fdatasync of the
/// files written, fsync of those whose metadata changed and of the directories whose entries
/// changed) instead of the whole filesystem, unless too much changed or a change cannot be
/// followed by name (a directory renamed over dirty entries, a reset, a removal of a tree).
#[derive(Default)]
struct Dirty {
    data: std::collections::HashSet<Vec<u8>>,
    meta: std::collections::HashSet<Vec<u8>>,
    dirs: std::collections::HashSet<Vec<u8>>,
    everything: bool,
}

/// Past this many dirty entries a sync is one syncfs.
const TARGETED_SYNC_MAX: usize = 64;

fn parent(rel: &[u8]) -> Vec<u8> {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => rel[..i].to_vec(),
        None => Vec::new(),
    }
}

impl Dirty {
    fn record(&mut self, op: &Op) {
        match op {
            Op::Reset | Op::RemoveAll { .. } => self.everything = true,
            Op::Write { path, .. } | Op::Truncate { path, .. } | Op::Fallocate { path, .. } => {
                self.data.insert(path.clone());
            }
            Op::Chmod { path, .. } | Op::Chown { path, .. } | Op::Times { path, .. } => {
                self.meta.insert(path.clone());
            }
            Op::Create { path, .. } => {
                self.meta.insert(path.clone());
                self.dirs.insert(parent(path));
            }
            Op::Mkdir { path, .. } | Op::Mknod { path, .. } | Op::Symlink { path, .. } => {
                self.dirs.insert(parent(path));
            }
            Op::Unlink { path } | Op::Rmdir { path } => {
                self.dirs.insert(parent(path));
            }
            Op::Link { to, .. } => {
                self.dirs.insert(parent(to));
            }
            Op::Rename { from, to, .. } => {
                self.dirs.insert(parent(from));
                self.dirs.insert(parent(to));
                // Dirty entries now live under the new name.
                let mut prefix = from.clone();
                prefix.push(b'/');
                let all = self.data.iter().chain(&self.meta).chain(&self.dirs);
                if all.clone().any(|p| p.starts_with(&prefix)) {
                    self.everything = true;
                }
                for set in [&mut self.data, &mut self.meta] {
                    if set.contains(from) {
                        set.insert(to.clone());
                    }
                }
            }
        }
        if self.data.len() + self.meta.len() + self.dirs.len() > TARGETED_SYNC_MAX {
            self.everything = true;
        }
    }
}

/// A path's parent directory (an O_PATH fd beneath the root) and its last component.
struct Resolved {
    parent: OwnedFd,
    name: CString,
}

impl Replica {
    pub fn open(dir: &Path) -> Result<Self, ReplicaError> {
        let c = CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|e| ReplicaError::Root(dir.into(), io::Error::other(e)))?;
        // SAFETY: c is a valid C string; the fd is owned right after.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(ReplicaError::Root(dir.into(), io::Error::last_os_error()));
        }
        // SAFETY: fd is fresh and valid.
        let root = unsafe { OwnedFd::from_raw_fd(fd) };
        let synced = std::fs::File::open(dir).map_err(|e| ReplicaError::Root(dir.into(), e))?;
        Ok(Self {
            root,
            synced,
            dir: dir.into(),
            dirty: Default::default(),
            allow_privileged: false,
        })
    }

    /// Lets the primary make device nodes and set-user/group-id files (refused by default:
    /// whoever holds the group key would otherwise be root on the secondary).
    pub fn allow_privileged(mut self, allow: bool) -> Self {
        self.allow_privileged = allow;
        self
    }

    /// Refuses an operation that would plant a privileged file: a device node, or a file with
    /// the set-user-id bit (or set-group-id, except the directories' group inheritance).
    /// Regular files, directories, FIFOs, sockets and symlinks are what applications keep in
    /// a data directory. Ownership, also by root, is replicated: without set-id bits a file
    /// owned by root grants nothing, and Linux clears those bits on every chown.
    pub fn refuse_privileged(&self, op: &Op) -> Result<(), ReplicaError> {
        if self.allow_privileged {
            return Ok(());
        }
        let name = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
        let special = |mode: u32, is_dir: bool| {
            mode & libc::S_ISUID != 0 || (!is_dir && mode & libc::S_ISGID != 0)
        };
        let refused = match op {
            Op::Mknod { path, mode, .. } => {
                let kind = mode & libc::S_IFMT;
                if kind == libc::S_IFCHR || kind == libc::S_IFBLK {
                    Some(format!("device node {}", name(path)))
                } else if special(*mode, false) {
                    Some(format!("set-id mode {mode:o} on {}", name(path)))
                } else {
                    None
                }
            }
            Op::Create { path, mode } if special(*mode, false) => {
                Some(format!("set-id mode {mode:o} on {}", name(path)))
            }
            Op::Mkdir { path, mode } if special(*mode, true) => {
                Some(format!("set-user-id mode {mode:o} on {}", name(path)))
            }
            Op::Chmod { path, mode } if mode & (libc::S_ISUID | libc::S_ISGID) != 0 => {
                let is_dir = self.is_dir(path);
                special(*mode, is_dir).then(|| format!("set-id mode {mode:o} on {}", name(path)))
            }
            _ => None,
        };
        match refused {
            Some(why) => Err(ReplicaError::Refused(why)),
            None => Ok(()),
        }
    }

    /// Whether the entry is a directory (not following a symlink).
    fn is_dir(&self, rel: &[u8]) -> bool {
        rel.is_empty()
            || self
                .resolve(rel)
                .ok()
                .and_then(|r| self.stat_at(&r).ok())
                .is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn os(what: &'static str, rel: &[u8]) -> impl FnOnce(io::Error) -> ReplicaError {
        let path = String::from_utf8_lossy(rel).into_owned();
        move |source| ReplicaError::Os { what, path, source }
    }

    /// Opens a directory beneath the root without following any symlink.
    fn open_dir(&self, parts: &[&[u8]], rel: &[u8]) -> Result<OwnedFd, ReplicaError> {
        // Refused once, refused for good (a seccomp filter does not change under a process):
        // every later path goes straight to the walk instead of a failing call first.
        if OPENAT2_REFUSED.load(std::sync::atomic::Ordering::Relaxed) {
            return self.open_dir_by_steps(parts, rel);
        }
        let joined = if parts.is_empty() {
            b".".to_vec()
        } else {
            parts.join(&b'/')
        };
        let c = CString::new(joined)
            .map_err(|_| Self::os("resolving", rel)(io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: open_how is plain data; zeroed is a valid value, the fields are set below.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64;
        how.resolve =
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: openat2 with a valid dirfd, C string and open_how of the size given.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.root.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOSYS) {
                OPENAT2_REFUSED.store(true, std::sync::atomic::Ordering::Relaxed);
                return self.open_dir_by_steps(parts, rel);
            }
            return Err(Self::os("resolving", rel)(e));
        }
        // SAFETY: fd is fresh and valid.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// `open_dir` where openat2(2) is refused (systemd's RestrictSUIDSGID= answers ENOSYS to
    /// it, as it cannot inspect its flags; so do old kernels): one component at a time, each
    /// opened with O_NOFOLLOW | O_DIRECTORY beneath the previous, so a symlink is refused
    /// (ENOTDIR) and `components` has already refused "..": the walk cannot leave the root.
    fn open_dir_by_steps(&self, parts: &[&[u8]], rel: &[u8]) -> Result<OwnedFd, ReplicaError> {
        let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: openat of "." beneath a valid directory fd.
        let fd = unsafe { libc::openat(self.root.as_raw_fd(), c".".as_ptr(), flags) };
        if fd < 0 {
            return Err(Self::os("resolving", rel)(io::Error::last_os_error()));
        }
        // SAFETY: fd is fresh and valid.
        let mut dir = unsafe { OwnedFd::from_raw_fd(fd) };
        for part in parts {
            let c = CString::new(*part)
                .map_err(|_| Self::os("resolving", rel)(io::ErrorKind::InvalidInput.into()))?;
            // SAFETY: valid directory fd and C string.
            let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags) };
            if fd < 0 {
                return Err(Self::os("resolving", rel)(io::Error::last_os_error()));
            }
            // SAFETY: fd is fresh and valid.
            dir = unsafe { OwnedFd::from_raw_fd(fd) };
        }
        Ok(dir)
    }

    fn resolve(&self, rel: &[u8]) -> Result<Resolved, ReplicaError> {
        let parts = components(rel)?;
        let Some((last, dirs)) = parts.split_last() else {
            return Err(ReplicaError::BadPath("(the directory itself)".into()));
        };
        Ok(Resolved {
            parent: self.open_dir(dirs, rel)?,
            name: CString::new(*last).expect("checked: no NUL"),
        })
    }

    /// Opens a regular file for writing: never through a symlink, never blocking on a FIFO,
    /// and refused unless what was opened is a regular file (a device node or FIFO planted
    /// under a file's name is not written to).
    fn open_file(&self, rel: &[u8], flags: i32) -> Result<std::fs::File, ReplicaError> {
        let r = self.resolve(rel)?;
        // SAFETY: valid fds and C string; the fd is owned right after.
        let fd = unsafe {
            libc::openat(
                r.parent.as_raw_fd(),
                r.name.as_ptr(),
                flags | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY,
                0o600,
            )
        };
        if fd < 0 {
            return Err(Self::os("opening", rel)(io::Error::last_os_error()));
        }
        // SAFETY: fd is fresh and valid.
        let f = unsafe { std::fs::File::from_raw_fd(fd) };
        let meta = f.metadata().map_err(Self::os("opening", rel))?;
        if !meta.file_type().is_file() {
            return Err(ReplicaError::Refused(format!(
                "writing to {}, which is not a regular file",
                String::from_utf8_lossy(rel)
            )));
        }
        Ok(f)
    }

    /// Where a metadata change of `rel` applies, as *at-call arguments: the parent and the
    /// name with AT_SYMLINK_NOFOLLOW, or for the directory itself its fd, an empty name and
    /// AT_EMPTY_PATH.
    fn target(&self, rel: &[u8]) -> Result<(OwnedFd, CString, libc::c_int), ReplicaError> {
        if rel.is_empty() {
            return Ok((
                self.open_dir(&[], rel)?,
                CString::default(),
                libc::AT_EMPTY_PATH,
            ));
        }
        let r = self.resolve(rel)?;
        Ok((r.parent, r.name, libc::AT_SYMLINK_NOFOLLOW))
    }

    /// Applies one operation.
    pub fn apply(&self, op: &Op) -> Result<(), ReplicaError> {
        self.refuse_privileged(op)?;
        self.dirty.lock().expect("dirty").record(op);
        match op {
            Op::Reset => self.clear(),
            Op::Write { path, offset, data } => {
                let f = self.open_file(path, libc::O_WRONLY)?;
                std::os::unix::fs::FileExt::write_all_at(&f, data, *offset)
                    .map_err(Self::os("writing", path))
            }
            Op::Truncate { path, size } => {
                let f = self.open_file(path, libc::O_WRONLY)?;
                f.set_len(*size).map_err(Self::os("truncating", path))
            }
            Op::Create { path, mode } => {
                let f = self.open_file(path, libc::O_WRONLY | libc::O_CREAT)?;
                // SAFETY: valid fd.
                check(unsafe { libc::fchmod(f.as_raw_fd(), *mode & 0o7777) })
                    .map_err(Self::os("creating", path))
            }
            Op::Mkdir { path, mode } => {
                let r = self.resolve(path)?;
                // SAFETY: valid fd and C string.
                match check(unsafe {
                    libc::mkdirat(r.parent.as_raw_fd(), r.name.as_ptr(), *mode & 0o7777)
                }) {
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
                    other => other.map_err(Self::os("mkdir", path)),
                }
            }
            Op::Mknod { path, mode, rdev } => {
                let r = self.resolve(path)?;
                // SAFETY: valid fd and C string.
                check(unsafe { libc::mknodat(r.parent.as_raw_fd(), r.name.as_ptr(), *mode, *rdev) })
                    .map_err(Self::os("mknod", path))
            }
            Op::Unlink { path } => self.unlink(path, 0),
            Op::Rmdir { path } => self.unlink(path, libc::AT_REMOVEDIR),
            Op::Rename { from, to, flags } => {
                let (a, b) = (self.resolve(from)?, self.resolve(to)?);
                // SAFETY: valid fds and C strings.
                check(unsafe {
                    libc::renameat2(
                        a.parent.as_raw_fd(),
                        a.name.as_ptr(),
                        b.parent.as_raw_fd(),
                        b.name.as_ptr(),
                        *flags,
                    )
                })
                .map_err(Self::os("renaming", from))
            }
            Op::Link { from, to } => {
                let (a, b) = (self.resolve(from)?, self.resolve(to)?);
                // SAFETY: valid fds and C strings; no AT_SYMLINK_FOLLOW: links the entry itself.
                check(unsafe {
                    libc::linkat(
                        a.parent.as_raw_fd(),
                        a.name.as_ptr(),
                        b.parent.as_raw_fd(),
                        b.name.as_ptr(),
                        0,
                    )
                })
                .map_err(Self::os("linking", to))
            }
            Op::Symlink { target, path } => {
                let r = self.resolve(path)?;
                let t = CString::new(target.clone())
                    .map_err(|_| ReplicaError::BadPath("symlink target with NUL".into()))?;
                // SAFETY: valid fd and C strings.
                check(unsafe { libc::symlinkat(t.as_ptr(), r.parent.as_raw_fd(), r.name.as_ptr()) })
                    .map_err(Self::os("symlink", path))
            }
            Op::Chmod { path, mode } => {
                let (fd, name, flags) = self.target(path)?;
                let res = if path.is_empty() {
                    // fchmodat takes no AT_EMPTY_PATH.
                    self.chmod_root(*mode)
                } else {
                    // Symlinks have no mode of their own on Linux; AT_SYMLINK_NOFOLLOW refuses
                    // them instead of following.
                    // SAFETY: valid fd and C string.
                    unsafe { libc::fchmodat(fd.as_raw_fd(), name.as_ptr(), *mode & 0o7777, flags) }
                };
                check(res).map_err(Self::os("chmod", path))
            }
            Op::Chown { path, uid, gid } => {
                let (fd, name, flags) = self.target(path)?;
                let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
                // SAFETY: valid fd and C string.
                check(unsafe { libc::fchownat(fd.as_raw_fd(), name.as_ptr(), u, g, flags) })
                    .map_err(Self::os("chown", path))
            }
            Op::Times { path, atime, mtime } => {
                let (fd, name, flags) = self.target(path)?;
                let ts = |t: &Option<(i64, u32)>| match t {
                    Some((s, ns)) => libc::timespec {
                        tv_sec: *s,
                        tv_nsec: *ns as i64,
                    },
                    None => libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    },
                };
                let times = [ts(atime), ts(mtime)];
                // SAFETY: valid fd, C string and two timespecs.
                check(unsafe {
                    libc::utimensat(fd.as_raw_fd(), name.as_ptr(), times.as_ptr(), flags)
                })
                .map_err(Self::os("setting times of", path))
            }
            Op::Fallocate {
                path,
                mode,
                offset,
                len,
            } => {
                let f = self.open_file(path, libc::O_WRONLY)?;
                // SAFETY: valid fd.
                check(unsafe { libc::fallocate(f.as_raw_fd(), *mode, *offset as i64, *len as i64) })
                    .map_err(Self::os("fallocate", path))
            }
            Op::RemoveAll { path } => self.remove_all(path),
        }
    }

    /// Removes an entry of any kind; a directory with its content (std's remove_dir_all does
    /// not follow symlinks), reached through its parent's descriptor.
    fn remove_all(&self, rel: &[u8]) -> Result<(), ReplicaError> {
        let r = self.resolve(rel)?;
        let m = match self.stat_at(&r) {
            Ok(m) => m,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(Self::os("removing", rel)(e)),
        };
        if m.st_mode & libc::S_IFMT == libc::S_IFDIR {
            let p = PathBuf::from(format!("/proc/self/fd/{}", r.parent.as_raw_fd()))
                .join(std::ffi::OsStr::from_bytes(r.name.as_bytes()));
            std::fs::remove_dir_all(p).map_err(Self::os("removing", rel))
        } else {
            self.unlink(rel, 0)
        }
    }

    fn stat_at(&self, r: &Resolved) -> io::Result<libc::stat> {
        // SAFETY: stat is plain data, filled by fstatat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd, C string and stat buffer.
        check(unsafe {
            libc::fstatat(
                r.parent.as_raw_fd(),
                r.name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok(st)
    }

    /// Every entry of the replica (for a resync), parents before children.
    pub fn list(&self) -> Result<Vec<Entry>, ReplicaError> {
        let mut out = Vec::new();
        let mut stack = vec![Vec::<u8>::new()];
        while let Some(rel) = stack.pop() {
            let dir = self.dir.join(std::ffi::OsStr::from_bytes(&rel));
            let read = std::fs::read_dir(&dir).map_err(Self::os("listing", &rel))?;
            for e in read {
                let e = e.map_err(Self::os("listing", &rel))?;
                let child = wire::join(&rel, e.file_name().as_bytes());
                let m = e.metadata().map_err(Self::os("listing", &child))?;
                let entry = describe(child.clone(), &m, &e.path())?;
                if entry.kind == Kind::Dir {
                    stack.push(child);
                }
                out.push(entry);
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// One entry and, for a regular file, the checksums of its blocks.
    pub fn probe(&self, rel: &[u8]) -> Result<Msg, ReplicaError> {
        let none = || Msg::Probed {
            path: rel.to_vec(),
            entry: None,
            block_size: 0,
            blocks: Vec::new(),
        };
        let r = self.resolve(rel)?;
        match self.stat_at(&r) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(none()),
            Err(e) => return Err(Self::os("probing", rel)(e)),
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {}
            Ok(_) => {
                let p = self.dir.join(std::ffi::OsStr::from_bytes(rel));
                let m = std::fs::symlink_metadata(&p).map_err(Self::os("probing", rel))?;
                return Ok(Msg::Probed {
                    path: rel.to_vec(),
                    entry: Some(describe(rel.to_vec(), &m, &p)?),
                    block_size: 0,
                    blocks: Vec::new(),
                });
            }
        }
        let f = self.open_file(rel, libc::O_RDONLY)?;
        let m = f.metadata().map_err(Self::os("probing", rel))?;
        let entry = describe(rel.to_vec(), &m, Path::new(""))?;
        let bs = crate::resync::block_size(m.len());
        let blocks =
            crate::resync::hash_blocks(&f, m.len(), bs).map_err(Self::os("reading", rel))?;
        Ok(Msg::Probed {
            path: rel.to_vec(),
            entry: Some(entry),
            block_size: bs,
            blocks,
        })
    }

    fn chmod_root(&self, mode: u32) -> libc::c_int {
        // The replica directory itself: through its path (fchmod does not take O_PATH fds).
        let c = CString::new(self.dir.as_os_str().as_encoded_bytes()).expect("opened before");
        // SAFETY: valid C string.
        unsafe { libc::chmod(c.as_ptr(), mode & 0o7777) }
    }

    fn unlink(&self, rel: &[u8], flags: i32) -> Result<(), ReplicaError> {
        let r = self.resolve(rel)?;
        // SAFETY: valid fd and C string.
        check(unsafe { libc::unlinkat(r.parent.as_raw_fd(), r.name.as_ptr(), flags) })
            .map_err(Self::os("removing", rel))
    }

    /// Removes everything in the replica directory (symlinks are removed, never followed).
    fn clear(&self) -> Result<(), ReplicaError> {
        let err = |e| ReplicaError::Os {
            what: "emptying",
            path: self.dir.display().to_string(),
            source: e,
        };
        for e in std::fs::read_dir(&self.dir).map_err(err)? {
            let e = e.map_err(err)?;
            let r = if e.file_type().map_err(err)?.is_dir() {
                std::fs::remove_dir_all(e.path())
            } else {
                std::fs::remove_file(e.path())
            };
            r.map_err(err)?;
        }
        Ok(())
    }

    /// Makes everything applied so far durable: the changed entries one by one, or the whole
    /// filesystem when that is simpler (see `Dirty`).
    pub fn sync(&self) -> io::Result<()> {
        let d = std::mem::take(&mut *self.dirty.lock().expect("dirty"));
        if d.everything || self.sync_entries(&d).is_err() {
            // SAFETY: valid fd.
            return check(unsafe { libc::syncfs(self.synced.as_raw_fd()) });
        }
        Ok(())
    }

    fn sync_entries(&self, d: &Dirty) -> Result<(), ReplicaError> {
        for (set, data_only) in [(&d.data, true), (&d.meta, false)] {
            for p in set {
                if data_only && d.meta.contains(p) {
                    continue; // synced in full with the metadata changes
                }
                match self.open_file(p, libc::O_RDONLY) {
                    Ok(f) => {
                        let r = if data_only {
                            f.sync_data()
                        } else {
                            f.sync_all()
                        };
                        r.map_err(Self::os("syncing", p))?;
                    }
                    // Gone since (its directory is dirty), or not a regular file (a symlink's
                    // or a node's metadata): the whole filesystem then.
                    Err(ReplicaError::Os { source, .. })
                        if source.raw_os_error() == Some(libc::ENOENT) =>
                    {
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        for p in &d.dirs {
            let parts = components(p)?;
            let dir = self.open_dir(&parts, p)?;
            // An O_PATH descriptor cannot be fsynced: reopen it for reading.
            let c = CString::new(".").expect("static");
            // SAFETY: valid fd and C string; the result is owned right after.
            let fd = unsafe {
                libc::openat(
                    dir.as_raw_fd(),
                    c.as_ptr(),
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(Self::os("syncing", p)(io::Error::last_os_error()));
            }
            // SAFETY: fresh fd.
            let f = unsafe { std::fs::File::from_raw_fd(fd) };
            f.sync_all().map_err(Self::os("syncing", p))?;
        }
        Ok(())
    }
}

/// What the secondary's server shows (farmctl mirror status).
#[derive(Debug, Clone, Default)]
pub struct ServerStatus {
    /// The primary connected now, if any.
    pub primary: Option<String>,
    /// Whether a resync is running (the replica is incomplete until it ends).
    pub resyncing: bool,
    pub ops_applied: u64,
    pub bytes_applied: u64,
    pub syncs_acknowledged: u64,
    pub sessions: u64,
    /// Connections that did not become a session: failed handshakes (a replayed hello, another
    /// key, a port scan) and connections turned away while too many handshakes ran.
    pub handshakes_refused: u64,
    /// Operations refused because they would plant privileged files (see
    /// [`Replica::refuse_privileged`]).
    pub ops_refused: u64,
}

/// At most this many handshakes at a time; more connections are closed at once (counted), so
/// that a flood of connections cannot pile up threads. An established session is never
/// affected.
const MAX_HANDSHAKES: usize = 8;
/// How long a handshake may take.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

struct Shared {
    replica: Replica,
    state: std::sync::Arc<StateFile>,
    key: [u8; 32],
    /// The session allowed to apply (a newer authenticated session ends an older one: a
    /// primary that lost its connection without a reset reconnects at once).
    current: std::sync::Mutex<(u64, Option<TcpStream>)>,
    /// Held while applying: one session at a time touches the replica.
    apply: std::sync::Mutex<()>,
    status: std::sync::Mutex<ServerStatus>,
    stop: std::sync::atomic::AtomicBool,
    /// Handshakes running now.
    handshakes: std::sync::atomic::AtomicUsize,
}

/// The secondary's replication server: accepts the primary's sessions on a listening socket
/// until stopped.
pub struct Server {
    shared: std::sync::Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub listen: SocketAddr,
}

impl Server {
    /// Listens on `listen` and serves primaries for `replica` until `stop`. `state` records
    /// whether the replica is complete.
    pub fn start(
        listen: SocketAddr,
        replica: Replica,
        state: std::sync::Arc<StateFile>,
        key: &[u8; 32],
    ) -> Result<Self, ReplicaError> {
        let l = bind(listen)?;
        let listen = l.local_addr().unwrap_or(listen);
        l.set_nonblocking(true).map_err(|e| ReplicaError::Os {
            what: "listening on",
            path: listen.to_string(),
            source: e,
        })?;
        tracing::info!(
            "secondary: replica {} listening on {listen}",
            replica.dir().display()
        );
        let shared = std::sync::Arc::new(Shared {
            replica,
            state,
            key: *key,
            current: std::sync::Mutex::new((0, None)),
            apply: std::sync::Mutex::new(()),
            status: Default::default(),
            stop: Default::default(),
            handshakes: Default::default(),
        });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("mirror-listen".into())
            .spawn(move || accept_loop(&l, &sh))
            .expect("spawning a thread");
        Ok(Self {
            shared,
            thread: Some(thread),
            listen,
        })
    }

    pub fn status(&self) -> ServerStatus {
        self.shared.status.lock().expect("status").clone()
    }

    /// Stops listening and ends the current session; returns once nothing applies any more.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.shared
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(s) = self.shared.current.lock().expect("current").1.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // An operation being applied finishes before this returns.
        drop(self.shared.apply.lock());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.halt();
    }
}

fn bind(listen: SocketAddr) -> Result<TcpListener, ReplicaError> {
    TcpListener::bind(listen).map_err(|e| ReplicaError::Os {
        what: "listening on",
        path: listen.to_string(),
        source: e,
    })
}

/// Serves one primary at a time on `listen`, forever (the standalone tool): applies its
/// operations, acknowledges its barriers once durable.
pub fn serve(listen: SocketAddr, replica: Replica, key: &[u8; 32]) -> Result<(), ReplicaError> {
    let _server = Server::start(
        listen,
        replica,
        std::sync::Arc::new(StateFile::in_memory(Default::default())),
        key,
    )?;
    loop {
        std::thread::park();
    }
}

fn accept_loop(l: &TcpListener, sh: &std::sync::Arc<Shared>) {
    use std::sync::atomic::Ordering;
    while !sh.stop.load(Ordering::SeqCst) {
        let conn = match l.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
            Err(_) => continue,
        };
        if sh.handshakes.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES {
            sh.handshakes.fetch_sub(1, Ordering::SeqCst);
            sh.status.lock().expect("status").handshakes_refused += 1;
            continue;
        }
        let sh = sh.clone();
        let _ = std::thread::Builder::new()
            .name("mirror-session".into())
            .spawn(move || {
                let peer = conn.peer_addr().map_or("?".into(), |a| a.to_string());
                match session(conn, &sh, &peer) {
                    Ok(()) => tracing::info!("primary {peer} closed the session"),
                    Err(ReplicaError::Handshake(e)) => {
                        sh.status.lock().expect("status").handshakes_refused += 1;
                        tracing::debug!("connection from {peer} refused: {e}");
                    }
                    Err(e) => tracing::warn!("session with {peer} ended: {e}"),
                }
            });
    }
}

fn session(conn: TcpStream, sh: &Shared, peer: &str) -> Result<(), ReplicaError> {
    use std::sync::atomic::Ordering;
    conn.set_nodelay(true).ok();
    conn.set_nonblocking(false).ok();
    // The handshake is bounded; an established session waits as long as the primary is quiet.
    conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).ok();
    let handshake = (|| {
        let reader =
            std::io::BufReader::with_capacity(1 << 20, conn.try_clone().map_err(WireError::Io)?);
        let writer =
            std::io::BufWriter::with_capacity(1 << 20, conn.try_clone().map_err(WireError::Io)?);
        wire::accept(reader, writer, &sh.key)
    })();
    sh.handshakes.fetch_sub(1, Ordering::SeqCst);
    // Only a primary that proved itself (answered this secondary's fresh welcome) replaces the
    // current session: a replayed hello ends here.
    let (mut from, mut to) = handshake.map_err(ReplicaError::Handshake)?;
    conn.set_read_timeout(None).ok();
    let me = {
        let mut cur = sh.current.lock().expect("current");
        if sh.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(old) = cur.1.take() {
            tracing::info!("a new session from {peer} replaces the previous one");
            let _ = old.shutdown(std::net::Shutdown::Both);
        }
        cur.0 += 1;
        cur.1 = conn.try_clone().ok();
        cur.0
    };
    {
        let mut st = sh.status.lock().expect("status");
        st.primary = Some(peer.to_string());
        st.sessions += 1;
    }
    tracing::info!("primary {peer} connected");
    let result = serve_session(sh, me, &mut from, &mut to);
    let mut st = sh.status.lock().expect("status");
    if sh.current.lock().expect("current").0 == me {
        st.primary = None;
        st.resyncing = false;
    }
    result
}

fn serve_session(
    sh: &Shared,
    me: u64,
    from: &mut wire::Framed<std::io::BufReader<TcpStream>>,
    to: &mut wire::Framed<std::io::BufWriter<TcpStream>>,
) -> Result<(), ReplicaError> {
    let replica = &sh.replica;
    // Set by InSync: the generation the replica is complete at once the next barrier is durable.
    let mut completes: Option<u64> = None;
    loop {
        let m = match from.recv() {
            Ok(m) => m,
            Err(WireError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let _applying = sh.apply.lock().expect("apply");
        if sh.current.lock().expect("current").0 != me {
            return Ok(()); // replaced by a newer session
        }
        match m {
            Msg::Op(op) => {
                if let Err(e) = replica.apply(&op) {
                    if let ReplicaError::Refused(why) = &e {
                        sh.status.lock().expect("status").ops_refused += 1;
                        tracing::error!("the primary's operation is refused: {why}");
                    }
                    let _ = to.send(&Msg::Failed {
                        message: e.to_string(),
                    });
                    let _ = to.flush();
                    return Err(e);
                }
                let mut st = sh.status.lock().expect("status");
                st.ops_applied += 1;
                st.bytes_applied += op.data_len() as u64;
            }
            Msg::Sync { barrier } => {
                replica.sync().map_err(|e| ReplicaError::Os {
                    what: "syncfs",
                    path: replica.dir().display().to_string(),
                    source: e,
                })?;
                if let Some(generation) = completes.take() {
                    sh.state.update(|f| {
                        f.generation = generation;
                        f.synced = true;
                        f.seen = f.seen.max(generation);
                    })?;
                    sh.status.lock().expect("status").resyncing = false;
                    tracing::info!("replica in sync (generation {generation})");
                }
                to.send(&Msg::Ack { barrier })?;
                to.flush()?;
                sh.status.lock().expect("status").syncs_acknowledged += 1;
            }
            Msg::Resync { generation } => {
                let before = sh.state.get();
                // Incomplete from the first change on, durably, before anything is applied.
                sh.state.update(|f| f.synced = false)?;
                sh.status.lock().expect("status").resyncing = true;
                tracing::info!(
                    "resync to generation {generation} begins (replica was generation {}, {})",
                    before.generation,
                    if before.synced {
                        "complete"
                    } else {
                        "incomplete"
                    }
                );
                to.send(&Msg::Resyncing {
                    generation: before.generation,
                    synced: before.synced,
                })?;
                to.flush()?;
            }
            Msg::List => {
                for e in replica.list()? {
                    to.send(&Msg::Entry(e))?;
                }
                to.send(&Msg::EntriesEnd)?;
                to.flush()?;
            }
            Msg::Probe { path } => {
                to.send(&replica.probe(&path)?)?;
                to.flush()?;
            }
            Msg::InSync { generation } => completes = Some(generation),
            other => {
                return Err(
                    WireError::Malformed(format!("{} from the primary", msg_name(&other))).into(),
                );
            }
        }
    }
}

fn msg_name(m: &Msg) -> &'static str {
    match m {
        Msg::Ack { .. } => "an acknowledgement",
        Msg::Failed { .. } => "a failure report",
        Msg::Resyncing { .. } | Msg::Entry(_) | Msg::EntriesEnd | Msg::Probed { .. } => {
            "a secondary's answer"
        }
        _ => "a message",
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};

    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("farm-replica-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("tmp dir");
        d
    }

    #[test]
    fn resolving_without_openat2_stays_beneath_the_root() {
        let d = tmp("steps");
        std::fs::create_dir_all(d.join("a/b")).expect("dirs");
        let outside = tmp("steps-outside");
        std::os::unix::fs::symlink(&outside, d.join("a/link")).expect("symlink");
        let r = Replica::open(&d).expect("open");
        let dir = r
            .open_dir_by_steps(&[b"a", b"b"], b"a/b/x")
            .expect("a real directory");
        let m = std::fs::metadata(format!("/proc/self/fd/{}", dir.as_raw_fd())).expect("fd");
        assert_eq!(m.ino(), std::fs::metadata(d.join("a/b")).expect("b").ino());
        // A symlink on the way is refused, wherever it points.
        let e = r
            .open_dir_by_steps(&[b"a", b"link"], b"a/link/x")
            .expect_err("through a symlink");
        assert!(e.to_string().contains("a/link/x"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_dir_all(&outside);
    }

    #[test]
    fn operations_apply_to_the_replica() {
        let d = tmp("apply");
        let r = Replica::open(&d).expect("open");
        let p = |s: &str| s.as_bytes().to_vec();
        for op in [
            Op::Mkdir {
                path: p("db"),
                mode: 0o750,
            },
            Op::Create {
                path: p("db/wal"),
                mode: 0o640,
            },
            Op::Write {
                path: p("db/wal"),
                offset: 0,
                data: b"hello".to_vec(),
            },
            // Sparse: a hole between 5 and 1 MiB.
            Op::Write {
                path: p("db/wal"),
                offset: 1 << 20,
                data: b"end".to_vec(),
            },
            Op::Link {
                from: p("db/wal"),
                to: p("db/wal.link"),
            },
            Op::Symlink {
                target: p("wal"),
                path: p("db/current"),
            },
            Op::Rename {
                from: p("db/wal.link"),
                to: p("db/wal.2"),
                flags: 0,
            },
            Op::Truncate {
                path: p("db/wal.2"),
                size: (1 << 20) + 3,
            },
            Op::Times {
                path: p("db/wal"),
                atime: None,
                mtime: Some((1_700_000_000, 5)),
            },
            Op::Chmod {
                path: p("db"),
                mode: 0o700,
            },
            Op::Create {
                path: p("tmp"),
                mode: 0o600,
            },
            Op::Unlink { path: p("tmp") },
        ] {
            r.apply(&op).unwrap_or_else(|e| panic!("{op:?}: {e}"));
        }
        r.sync().expect("sync");
        let wal = std::fs::read(d.join("db/wal")).expect("wal");
        assert_eq!(&wal[..5], b"hello");
        assert_eq!(wal.len(), (1 << 20) + 3);
        let m = std::fs::metadata(d.join("db/wal")).expect("meta");
        assert_eq!(m.nlink(), 2, "hard link kept");
        assert_eq!(m.mtime(), 1_700_000_000);
        assert!(m.blocks() * 512 < 1 << 20, "the hole stays a hole");
        assert_eq!(m.permissions().mode() & 0o7777, 0o640);
        assert_eq!(
            std::fs::read_link(d.join("db/current")).unwrap(),
            Path::new("wal")
        );
        assert_eq!(
            std::fs::metadata(d.join("db"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o700
        );
        assert!(!d.join("tmp").exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn privileged_files_are_refused_unless_allowed() {
        let d = tmp("privileged");
        let r = Replica::open(&d).expect("open");
        let refused = |op: Op| {
            assert!(
                matches!(r.apply(&op), Err(ReplicaError::Refused(_))),
                "{op:?} applied"
            );
        };
        refused(Op::Mknod {
            path: b"sda".to_vec(),
            mode: libc::S_IFBLK | 0o660,
            rdev: libc::makedev(8, 0),
        });
        refused(Op::Mknod {
            path: b"mem".to_vec(),
            mode: libc::S_IFCHR | 0o666,
            rdev: libc::makedev(1, 1),
        });
        refused(Op::Create {
            path: b"sh".to_vec(),
            mode: 0o4755,
        });
        refused(Op::Mkdir {
            path: b"d".to_vec(),
            mode: 0o4755,
        });
        assert!(!d.join("sda").exists() && !d.join("sh").exists());
        // What applications do keep: plain files, setgid directories, FIFOs.
        r.apply(&Op::Create {
            path: b"f".to_vec(),
            mode: 0o644,
        })
        .expect("file");
        refused(Op::Chmod {
            path: b"f".to_vec(),
            mode: 0o2755,
        });
        r.apply(&Op::Mkdir {
            path: b"shared".to_vec(),
            mode: 0o2770,
        })
        .expect("setgid directory");
        r.apply(&Op::Chmod {
            path: b"shared".to_vec(),
            mode: 0o2775,
        })
        .expect("setgid directory");
        r.apply(&Op::Mknod {
            path: b"fifo".to_vec(),
            mode: libc::S_IFIFO | 0o600,
            rdev: 0,
        })
        .expect("fifo");
        // A write to something that is not a regular file is refused, and never blocks (a
        // FIFO without a reader: ENXIO at the non-blocking open; with one: not a file).
        let _reader = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(d.join("fifo"))
            .expect("reader");
        refused(Op::Write {
            path: b"fifo".to_vec(),
            offset: 0,
            data: b"x".to_vec(),
        });
        let allowed = Replica::open(&d).expect("open").allow_privileged(true);
        allowed
            .apply(&Op::Create {
                path: b"tool".to_vec(),
                mode: 0o4755,
            })
            .expect("allowed");
    }

    #[test]
    fn nothing_outside_the_replica_is_touched() {
        let d = tmp("escape");
        let outside = tmp("outside");
        let r = Replica::open(&d).expect("open");
        for bad in ["../x", "/etc/passwd", "a//b", "./a", "a/../../x", ""] {
            assert!(
                r.apply(&Op::Create {
                    path: bad.as_bytes().to_vec(),
                    mode: 0o644
                })
                .is_err(),
                "{bad:?} accepted"
            );
        }
        // A symlink in the replica pointing out is never followed.
        r.apply(&Op::Symlink {
            target: outside.as_os_str().as_encoded_bytes().to_vec(),
            path: b"out".to_vec(),
        })
        .expect("symlink");
        assert!(
            r.apply(&Op::Create {
                path: b"out/x".to_vec(),
                mode: 0o644
            })
            .is_err()
        );
        assert!(
            r.apply(&Op::Write {
                path: b"out".to_vec(),
                offset: 0,
                data: b"x".to_vec()
            })
            .is_err()
        );
        assert!(
            r.apply(&Op::Chmod {
                path: b"out".to_vec(),
                mode: 0o777
            })
            .is_err()
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_dir_all(&outside);
    }
}
