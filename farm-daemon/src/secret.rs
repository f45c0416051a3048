//! The cluster key file, and the keys derived from it.
//!
//! One file, identical on every member, holds the cluster secret (at least 32 bytes; any bytes,
//! e.g. `head -c 32 /dev/urandom`). Separate keys are derived from it with HMAC-SHA256 and a
//! label per use, so that knowing one (say, the bucket hash key) reveals nothing of another.

use std::{os::unix::fs::MetadataExt as _, path::Path};

use farm_common::HashKey;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use crate::config::MacMode;

pub const MIN_SECRET_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the cluster key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the cluster key file {path} is accessible by group or others (mode {mode:03o}): \
         run `chmod 600 {path}` (farmd refuses keys others can read, as ssh does)"
    )]
    Permissions { path: String, mode: u32 },
    #[error(
        "the cluster key file {path} holds {len} bytes; at least {MIN_SECRET_LEN} are needed \
         (create one with `head -c 32 /dev/urandom > {path}`)"
    )]
    TooShort { path: String, len: usize },
    #[error("the cluster key file {path} is not a regular file")]
    NotAFile { path: String },
    #[error(
        "the cluster key file {path} belongs to uid {uid}, not to root or farmd's user: run \
         `chown root {path}`"
    )]
    Owner { path: String, uid: u32 },
}

/// The cluster secret, loaded from its file.
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Reads the key file, checking the file it read (not a path looked at before): a regular
    /// file, owned by root or farmd's user, readable by nobody else.
    pub fn load(path: &Path) -> Result<Self, SecretError> {
        use std::io::Read as _;
        let p = path.display().to_string();
        let read_err = |source| SecretError::Read {
            path: p.clone(),
            source,
        };
        let f = std::fs::File::open(path).map_err(read_err)?;
        let meta = f.metadata().map_err(read_err)?;
        if !meta.file_type().is_file() {
            return Err(SecretError::NotAFile { path: p });
        }
        if !crate::trust::trusted_uid(meta.uid()) {
            return Err(SecretError::Owner {
                path: p,
                uid: meta.uid(),
            });
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecretError::Permissions { path: p, mode });
        }
        let mut bytes = Vec::new();
        f.take(1 << 20).read_to_end(&mut bytes).map_err(read_err)?;
        if bytes.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort {
                path: p,
                len: bytes.len(),
            });
        }
        Ok(Self(bytes))
    }

    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self(bytes.to_vec())
    }

    fn derive(&self, label: &str) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"farm/");
        mac.update(label.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Key of the bucket hash (SipHash-1-3).
    pub fn hash_key(&self) -> HashKey {
        let d = self.derive("bucket-hash/v1");
        let mut k = [0u8; 16];
        k.copy_from_slice(&d[..16]);
        HashKey::from_bytes(&k)
    }

    /// Key for authenticating cluster messages.
    pub fn message_key(&self) -> [u8; 32] {
        self.derive("messages/v1")
    }

    /// The key mirror-mode replication authenticates its sessions with.
    pub fn mirror_key(&self) -> [u8; 32] {
        self.derive("mirror/v1")
    }

    /// The cluster MAC when the config does not set one: locally administered, unicast or
    /// multicast as the mode says, the same on every member.
    pub fn cluster_mac(&self, mode: MacMode) -> [u8; 6] {
        let d = self.derive("cluster-mac/v1");
        let first = match mode {
            MacMode::Unicast => 0x02,
            MacMode::Multicast => 0x03,
        };
        [first, 0xfa, d[0], d[1], d[2], d[3]]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn derived_keys_are_stable_and_distinct() {
        let s = Secret::from_bytes(&[7u8; 32]);
        assert_eq!(s.hash_key(), Secret::from_bytes(&[7u8; 32]).hash_key());
        assert_ne!(s.hash_key(), Secret::from_bytes(&[8u8; 32]).hash_key());
        assert_ne!(&s.message_key()[..16], &s.hash_key().to_bytes()[..]);
        assert_eq!(s.cluster_mac(MacMode::Unicast)[0], 0x02);
        assert_eq!(s.cluster_mac(MacMode::Multicast)[0] & 1, 1);
    }

    #[test]
    fn key_file_checks() {
        let dir = std::env::temp_dir().join(format!("farm-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("key");
        std::fs::write(&f, [1u8; 32]).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Secret::load(&f),
            Err(SecretError::Permissions { .. })
        ));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Secret::load(&f).is_ok());
        std::fs::write(&f, [1u8; 8]).unwrap();
        assert!(matches!(
            Secret::load(&f),
            Err(SecretError::TooShort { len: 8, .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
