//! The few bpf(2) calls the tests make themselves: detaching a pinned link the way `bpftool
//! link detach` does (the program leaves the interface while the daemon still runs), and a
//! private bpf filesystem mounted for one test.

use std::{
    os::fd::{FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<libc::c_long> {
    // SAFETY: bpf(2) with a zero-initialised attribute union of 128 bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Detaches the link pinned at `path` from whatever it is attached to (BPF_LINK_DETACH): the
/// link object stays, defunct, for whoever holds it.
pub fn detach_pinned_link(path: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: bpf returned a new descriptor that we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut attr = [0u64; 16];
    attr[0] = std::os::fd::AsRawFd::as_raw_fd(&fd) as u64;
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

/// A bpf filesystem mounted at a directory of the test's own, unmounted (lazily) on drop.
pub struct BpffsMount {
    pub path: PathBuf,
    mounted: bool,
}

impl BpffsMount {
    pub fn new(path: PathBuf) -> Self {
        std::fs::create_dir_all(&path).expect("bpffs directory");
        let out = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&path)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "mount -t bpf: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            path,
            mounted: true,
        }
    }

    /// Unmounts it now (lazily, as `umount -l`).
    pub fn unmount(&mut self) {
        if std::mem::take(&mut self.mounted) {
            let c =
                std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()).expect("no NUL");
            // SAFETY: valid path.
            let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            assert_eq!(rc, 0, "umount {}", self.path.display());
        }
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        if self.mounted {
            self.mounted = false;
            let c =
                std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()).expect("no NUL");
            // SAFETY: valid path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}
