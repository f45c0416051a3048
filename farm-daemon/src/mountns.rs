//! The application's view of the file system. A mount made in a mount namespace of farmd's own
//! (a systemd unit with `ProtectSystem=`, `PrivateTmp=`, ...; `ip netns exec`) is invisible to
//! the rest of the system: PostgreSQL, started in its own unit, would write to the directory
//! underneath, unreplicated. So mirror mode mounts (and unmounts) its replicated directory from
//! a thread that has joined the mount namespace of PID 1 (the host's, or the container's init),
//! where the application's unit lives; mounts there propagate into farmd's namespace too.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum MountNsError {
    #[error(
        "cannot join the host's mount namespace to mount the replicated directory where the \
         application sees it ({what}: {source}); farmd needs CAP_SYS_ADMIN, CAP_SYS_CHROOT and \
         CAP_SYS_PTRACE and, under systemd, RestrictNamespaces=mnt (install config/farmd-mirror.conf as \
         /etc/systemd/system/farmd.service.d/mirror.conf)"
    )]
    Join {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("the thread in the host's mount namespace ended without an answer")]
    Lost,
}

/// Runs `f` on a thread in PID 1's mount namespace and returns its result.
pub fn in_host_namespace<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, MountNsError> {
    let handle = std::thread::Builder::new()
        .name("farm-hostmnt".into())
        .spawn(move || -> Result<T, MountNsError> {
            if in_init_mount_namespace() != Some(true) {
                join_init_mount_namespace()?;
            }
            Ok(f())
        })
        .map_err(|source| MountNsError::Join {
            what: "spawning a thread",
            source,
        })?;
    handle.join().map_err(|_| MountNsError::Lost)?
}

/// Moves the calling thread (only) into PID 1's mount namespace.
fn join_init_mount_namespace() -> Result<(), MountNsError> {
    // Threads share their file-system context (root, cwd); a thread may only change mount
    // namespace with a context of its own.
    // SAFETY: unshare(CLONE_FS) affects only the calling thread's fs context.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(MountNsError::Join {
            what: "unshare(CLONE_FS)",
            source: std::io::Error::last_os_error(),
        });
    }
    let ns = std::fs::File::open("/proc/1/ns/mnt").map_err(|source| MountNsError::Join {
        what: "opening /proc/1/ns/mnt",
        source,
    })?;
    // SAFETY: setns on a namespace fd we hold; it affects only the calling thread.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNS) } != 0 {
        return Err(MountNsError::Join {
            what: "setns(/proc/1/ns/mnt)",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The type of the file system `path` is on (statfs(2) `f_type`), or `None`.
pub fn fs_type(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type)
}

/// (file-system type, device) of `path`: what tells one mount from another, or `None`.
pub fn fs_identity(path: &Path) -> Option<(i64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    Some((fs_type(path)?, std::fs::metadata(path).ok()?.dev()))
}

/// Whether this process shares its mount namespace with PID 1 (the host's, or the
/// container's init): a mount made here is the one the rest of the system sees, and outlives
/// farmd. `None`: cannot tell.
pub fn in_init_mount_namespace() -> Option<bool> {
    if let (Ok(me), Ok(init)) = (
        std::fs::read_link("/proc/self/ns/mnt"),
        std::fs::read_link("/proc/1/ns/mnt"),
    ) {
        return Some(me == init);
    }
    // Some hosts refuse the namespace link of PID 1 even to root (a non-dumpable init under a
    // hypervisor's agent). Mount ids are unique across namespaces: the same table is the same
    // namespace.
    let me = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let init = std::fs::read_to_string("/proc/1/mountinfo").ok()?;
    Some(me == init)
}

/// FUSE's file-system magic number.
pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
