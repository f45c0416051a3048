//! A directory tree's content, entry by entry, to compare a replica with its primary.

use std::{
    collections::BTreeMap,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
};

use sha2::{Digest as _, Sha256};

/// One entry: its kind and what must be equal on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        size: u64,
        sha256: [u8; 32],
        nlink: u64,
    },
    Symlink {
        target: Vec<u8>,
    },
    Other {
        mode: u32,
    },
}

/// Every entry under `root` by relative path (times and inode numbers are not compared).
pub fn digest(root: &Path) -> std::io::Result<BTreeMap<String, Entry>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let path = e.path();
            let rel = path
                .strip_prefix(root)
                .expect("beneath root")
                .to_string_lossy()
                .into_owned();
            let m = std::fs::symlink_metadata(&path)?;
            let mode = m.permissions().mode() & 0o7777;
            let ft = m.file_type();
            let entry = if ft.is_dir() {
                stack.push(path);
                Entry::Dir { mode }
            } else if ft.is_symlink() {
                Entry::Symlink {
                    target: std::fs::read_link(&path)?
                        .into_os_string()
                        .into_encoded_bytes(),
                }
            } else if ft.is_file() {
                let mut h = Sha256::new();
                std::io::copy(&mut std::fs::File::open(&path)?, &mut h)?;
                Entry::File {
                    mode,
                    size: m.len(),
                    sha256: h.finalize().into(),
                    nlink: m.nlink(),
                }
            } else {
                Entry::Other { mode: m.mode() }
            };
            out.insert(rel, entry);
        }
    }
    Ok(out)
}

/// The differences between two digests, for people (empty: identical).
pub fn differences(a: &BTreeMap<String, Entry>, b: &BTreeMap<String, Entry>) -> Vec<String> {
    let mut d = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => d.push(format!("{k}: only on the first side")),
            Some(w) if w != v => d.push(format!("{k}: {v:?} != {w:?}")),
            Some(_) => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            d.push(format!("{k}: only on the second side"));
        }
    }
    d
}
