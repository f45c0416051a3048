//! The standalone `farm-mirror` tool on a topology's nodes, and its mounts (the mirror tests
//! and `farm-bench mirror`).

use std::{
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::{bin, topology::Topology};

/// A running farm-mirror: asked to stop (SIGTERM: a primary unmounts) when dropped, killed if
/// it has not within 10 s.
pub struct MirrorProc(pub Child);

impl Drop for MirrorProc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `farm-mirror ARGS` (with the topology's key) on node `i`, output to `log`.
pub fn spawn(t: &Topology, i: usize, args: &[String], log: &Path) -> std::io::Result<MirrorProc> {
    let f = std::fs::File::create(log)?;
    Ok(MirrorProc(
        t.nodes[i]
            .ns
            .command(&bin("farm-mirror"))
            .arg("--key")
            .arg(t.key_file())
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()?,
    ))
}

/// Whether a farm-mirror filesystem is mounted at `mount`.
pub fn mounted(mount: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(&format!(" {} ", mount.display())) && l.contains("farm-mirror"))
}

/// Lazily unmounts whatever is mounted at a path (a killed primary leaves its FUSE mount):
/// farmd's own.
pub use farm_daemon::mirror::detach;

/// A mount point, detached when dropped.
pub struct Mount(pub PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        detach(&self.0);
    }
}
