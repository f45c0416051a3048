//! The kernel settings that make a member fail silent: with them, the kernel alone never claims
//! a VIP on the farm interface, so a member whose XDP program is gone (farmd killed and its pins
//! lost, the program detached, bpffs unmounted) answers nothing for the VIPs and its peers serve
//! its clients.
//!
//! The VIPs live on another device (`dataplane.vip_device`, `lo` by default), as in LVS direct
//! routing. On the farm interface:
//! - `arp_ignore = 1`: ARP requests are answered only for addresses on that interface, so never
//!   for a VIP (only the XDP program answers them, with the cluster MAC). IPv6 needs nothing:
//!   the kernel answers a neighbour solicitation only for an address of the receiving interface.
//! - `arp_announce = 2`: the kernel's own ARP requests (resolving a client it answers from a
//!   VIP) carry the interface's address, never a VIP.
//! - `drop_unicast_in_l2_multicast = 1` (IPv4 and IPv6): a frame for the cluster MAC that no XDP
//!   program rewrote is dropped by the stack in multicast MAC mode (in unicast mode the stack
//!   drops it anyway: it is addressed to another host).
//!
//! The settings outlive farmd on purpose (a killed farmd's node must stay silent). The values
//! found before the first change are kept in the state directory, so that the farmd that exits
//! cleanly, even after a crashed one, puts back what the host had.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "writing {value} to {path}: {source} (farmd needs /proc/sys writable: with systemd, \
         do not set ProtectKernelTunables)"
    )]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("saving the host's settings to {path}: {source}")]
    Save {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One setting and the value farmd wants: at least `min` (a stricter value the host already has
/// is kept).
struct Wanted {
    key: String,
    min: u32,
    /// Absent on hosts without IPv6: skipped.
    optional: bool,
}

fn wanted(interface: &str) -> Vec<Wanted> {
    let w = |key: String, min, optional| Wanted { key, min, optional };
    vec![
        w(format!("net/ipv4/conf/{interface}/arp_ignore"), 1, false),
        w(format!("net/ipv4/conf/{interface}/arp_announce"), 2, false),
        w(
            format!("net/ipv4/conf/{interface}/drop_unicast_in_l2_multicast"),
            1,
            false,
        ),
        w(
            format!("net/ipv6/conf/{interface}/drop_unicast_in_l2_multicast"),
            1,
            true,
        ),
    ]
}

/// The settings farmd changed, and what they were before.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Sysctls {
    root: PathBuf,
    saved: PathBuf,
    /// (key, the host's value before farm).
    original: Vec<(String, String)>,
}

impl Sysctls {
    /// Applies the settings for `interface` under `root` (`/proc/sys`); the host's values are
    /// kept in `saved` (or read from it, when a farmd that did not exit cleanly left it).
    pub fn apply(root: &Path, interface: &str, saved: &Path) -> Result<Self, SysctlError> {
        let path = |key: &str| root.join(key);
        let mut original: Vec<(String, String)> = match std::fs::read_to_string(saved) {
            Ok(text) => text
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect(),
            Err(_) => Vec::new(),
        };
        let left_by_crash = !original.is_empty();
        let mut changes = Vec::new();
        for w in wanted(interface) {
            let p = path(&w.key);
            let now = match std::fs::read_to_string(&p) {
                Ok(v) => v.trim().to_string(),
                Err(e) if w.optional && e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(SysctlError::Read { path: p, source }),
            };
            if !left_by_crash {
                original.push((w.key.clone(), now.clone()));
            }
            if now.parse::<u32>().is_ok_and(|v| v >= w.min) {
                continue;
            }
            changes.push((p, w.min.to_string()));
        }
        // Saved before anything changes: a crash from here on still leaves the host's values.
        if !left_by_crash {
            let text: String = original.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
            std::fs::write(saved, text).map_err(|source| SysctlError::Save {
                path: saved.into(),
                source,
            })?;
        }
        for (p, value) in changes {
            std::fs::write(&p, &value).map_err(|source| SysctlError::Write {
                path: p.clone(),
                value,
                source,
            })?;
        }
        Ok(Self {
            root: root.into(),
            saved: saved.into(),
            original,
        })
    }

    /// Puts the host's values back and forgets them. Errors are returned after trying all.
    pub fn restore(&self) -> Result<(), SysctlError> {
        let mut first = None;
        for (key, value) in &self.original {
            let p = self.root.join(key);
            if let Err(source) = std::fs::write(&p, value) {
                first.get_or_insert(SysctlError::Write {
                    path: p,
                    value: value.clone(),
                    source,
                });
            }
        }
        let _ = std::fs::remove_file(&self.saved);
        first.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of its own under the temporary directory, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("farm-sysctl-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fake_proc(dir: &Path, values: &[(&str, &str)]) {
        for (k, v) in values {
            let p = dir.join(k);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, format!("{v}\n")).unwrap();
        }
    }

    fn read(dir: &Path, k: &str) -> String {
        std::fs::read_to_string(dir.join(k))
            .unwrap()
            .trim()
            .to_string()
    }

    const IGNORE: &str = "net/ipv4/conf/eth0/arp_ignore";
    const ANNOUNCE: &str = "net/ipv4/conf/eth0/arp_announce";
    const DROP4: &str = "net/ipv4/conf/eth0/drop_unicast_in_l2_multicast";
    const DROP6: &str = "net/ipv6/conf/eth0/drop_unicast_in_l2_multicast";

    #[test]
    fn applies_restores_and_survives_a_crash() {
        let dir = TempDir::new("crash");
        let root = dir.path().join("sys");
        let saved = dir.path().join("saved");
        fake_proc(
            &root,
            &[(IGNORE, "0"), (ANNOUNCE, "0"), (DROP4, "0"), (DROP6, "0")],
        );
        let s = Sysctls::apply(&root, "eth0", &saved).unwrap();
        assert_eq!(read(&root, IGNORE), "1");
        assert_eq!(read(&root, ANNOUNCE), "2");
        assert_eq!(read(&root, DROP4), "1");
        assert_eq!(read(&root, DROP6), "1");
        // A crash: the next farmd finds farm's values on the host and the saved originals.
        drop(s);
        let s = Sysctls::apply(&root, "eth0", &saved).unwrap();
        s.restore().unwrap();
        for k in [IGNORE, ANNOUNCE, DROP4, DROP6] {
            assert_eq!(read(&root, k), "0", "{k}");
        }
        assert!(!saved.exists());
    }

    #[test]
    fn keeps_stricter_values_and_skips_missing_ipv6() {
        let dir = TempDir::new("strict");
        let root = dir.path().join("sys");
        let saved = dir.path().join("saved");
        fake_proc(&root, &[(IGNORE, "2"), (ANNOUNCE, "2"), (DROP4, "0")]);
        let s = Sysctls::apply(&root, "eth0", &saved).unwrap();
        assert_eq!(read(&root, IGNORE), "2");
        assert_eq!(read(&root, DROP4), "1");
        s.restore().unwrap();
        assert_eq!(read(&root, IGNORE), "2");
        assert_eq!(read(&root, DROP4), "0");
    }

    #[test]
    fn a_missing_ipv4_setting_is_an_error_naming_it() {
        let dir = TempDir::new("missing");
        let e = Sysctls::apply(&dir.path().join("sys"), "eth0", &dir.path().join("s"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("arp_ignore"), "{e}");
    }
}
