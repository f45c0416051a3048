//! What a node knows durably about its copy of the replicated data: the data generation it
//! holds, whether that copy is complete (in sync), and the highest generation it has seen its
//! peer announce.
//!
//! A generation starts whenever a node serves as primary without the other one in sync (it
//! promotes after a failover, or goes on alone after losing its secondary): from then on the
//! other copy lacks something. A node may take the primary role by itself only while its copy
//! is complete *and* no newer generation exists as far as it knows; farmd enforces that rule,
//! this module keeps the facts across restarts (written to a temporary file, fsynced, renamed).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a farm mirror state file ({message}); move it away to start over")]
    Parse { path: PathBuf, message: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The facts, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Facts {
    /// The data generation this node's copy belongs to.
    pub generation: u64,
    /// Whether the copy is a complete copy of `generation` (false from the start of a resync
    /// until its end, and for a copy never synced).
    pub synced: bool,
    /// The highest generation the peer has announced.
    pub seen: u64,
}

impl Facts {
    /// Whether this copy may become the live data without the peer: complete, and not older
    /// than anything the peer announced.
    pub fn eligible(&self) -> bool {
        self.synced && self.generation >= self.seen
    }
}

/// The state file (or, without a path, the facts in memory only: the standalone tool).
#[derive(Debug)]
pub struct StateFile {
    path: Option<PathBuf>,
    facts: Mutex<Facts>,
}

impl StateFile {
    /// Opens `path`, or starts from `initial` when it does not exist yet.
    pub fn open(path: &Path, initial: Facts) -> Result<Self, StateError> {
        let facts = match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| StateError::Parse {
                path: path.into(),
                message: e.message().to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => initial,
            Err(source) => {
                return Err(StateError::Read {
                    path: path.into(),
                    source,
                });
            }
        };
        let s = Self {
            path: Some(path.into()),
            facts: Mutex::new(facts),
        };
        s.update(|_| ())?;
        Ok(s)
    }

    pub fn in_memory(initial: Facts) -> Self {
        Self {
            path: None,
            facts: Mutex::new(initial),
        }
    }

    pub fn get(&self) -> Facts {
        *self.facts.lock().expect("state")
    }

    /// Changes the facts and makes the change durable before returning.
    pub fn update(&self, f: impl FnOnce(&mut Facts)) -> Result<Facts, StateError> {
        let mut g = self.facts.lock().expect("state");
        let mut next = *g;
        f(&mut next);
        if let Some(path) = &self.path {
            write_durably(path, &next).map_err(|source| StateError::Write {
                path: path.clone(),
                source,
            })?;
        }
        *g = next;
        Ok(next)
    }
}

fn write_durably(path: &Path, facts: &Facts) -> std::io::Result<()> {
    let text = format!(
        "# farm mirror state: written by farmd, do not edit while it runs\n{}",
        toml::to_string(facts).map_err(std::io::Error::other)?
    );
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_survive_a_restart_and_decide_eligibility() {
        let d = std::env::temp_dir().join(format!("farm-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("mirror.state");
        let s = StateFile::open(&p, Facts::default()).unwrap();
        assert!(!s.get().eligible(), "a copy never synced");
        s.update(|f| {
            f.generation = 3;
            f.synced = true;
        })
        .unwrap();
        assert!(s.get().eligible());
        s.update(|f| f.seen = 4).unwrap();
        let again = StateFile::open(&p, Facts::default()).unwrap();
        assert_eq!(
            again.get(),
            Facts {
                generation: 3,
                synced: true,
                seen: 4
            }
        );
        assert!(!again.get().eligible(), "the peer has a newer generation");
        std::fs::write(&p, "generation = \"x\"").unwrap();
        let e = StateFile::open(&p, Facts::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("move it away"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
