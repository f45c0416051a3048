//! The previous release, built from its git tag: what a rolling upgrade starts from.
//!
//! The tag is checked out in a git worktree under the workspace's `target/previous/` (or, in a
//! clone without tags, the release's source archive from `releases/` unpacked there) and built
//! there with its own target directory, once (later runs reuse both). The test thus runs the
//! real earlier farmd, not the current one pretending.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The workspace's root (this crate's parent).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn git(args: &[&str]) -> Result<String, String> {
    let o = Command::new("git")
        .arg("-C")
        .arg(root())
        .args(args)
        .output()
        .map_err(|e| format!("git {args:?}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "git {args:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// `v0.2.10` -> (0, 2, 10).
fn parse(tag: &str) -> Option<(u64, u64, u64)> {
    let mut it = tag.strip_prefix('v')?.split('.').map(|p| p.parse().ok());
    let v = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(v)
}

/// Where a release's source comes from: its git tag, or its source archive in `releases/`
/// (`git archive` of the tag, as published), for clones made without tags (CI's are).
enum Source {
    Tag,
    Archive(PathBuf),
}

/// The newest release older than this build's version (`CARGO_PKG_VERSION`), from the clone's
/// tags and the archives in `releases/` (`farm-0.1.0.tar.gz` is `v0.1.0`); a tag wins over an
/// archive of the same version.
fn previous_release() -> Result<(String, Source), String> {
    let current = parse(&format!("v{}", env!("CARGO_PKG_VERSION"))).expect("a semver version");
    let mut found: Vec<((u64, u64, u64), String, Source)> = Vec::new();
    if let Ok(tags) = git(&["tag", "--list", "v*"]) {
        found.extend(
            tags.lines()
                .filter_map(|t| parse(t).map(|v| (v, t.to_string(), Source::Tag))),
        );
    }
    let dir = root().join("releases");
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(version) = name
                .strip_prefix("farm-")
                .and_then(|n| n.strip_suffix(".tar.gz"))
            else {
                continue;
            };
            let tag = format!("v{version}");
            if let Some(v) = parse(&tag) {
                found.push((v, tag, Source::Archive(e.path())));
            }
        }
    }
    found
        .into_iter()
        .filter(|(v, _, _)| *v < current)
        .max_by_key(|(v, _, s)| (*v, matches!(s, Source::Tag)))
        .map(|(_, t, s)| (t, s))
        .ok_or_else(|| {
            format!(
                "no release older than {} in this clone: neither a tag (git fetch --tags) nor \
                 an archive in {}",
                env!("CARGO_PKG_VERSION"),
                dir.display()
            )
        })
}

/// The previous release's farmd (and farmctl next to it), built if needed. Returns the
/// directory holding them and the release's tag.
pub fn build_previous() -> Result<(PathBuf, String), String> {
    let (tag, source) = previous_release()?;
    let base = root().join("target/previous");
    let tree = base.join(&tag);
    let target = base.join("target");
    if !tree.join("Cargo.toml").exists() {
        std::fs::create_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
        match source {
            Source::Tag => {
                // A worktree left half-made by an interrupted run is pruned first.
                let _ = git(&["worktree", "prune"]);
                git(&[
                    "worktree",
                    "add",
                    "--force",
                    "--detach",
                    tree.to_str().expect("utf-8 path"),
                    &tag,
                ])?;
            }
            Source::Archive(archive) => {
                // Unpacked beside, then renamed: an interrupted run leaves no half tree.
                let part = base.join(format!("{tag}.part"));
                let _ = std::fs::remove_dir_all(&part);
                std::fs::create_dir_all(&part).map_err(|e| format!("{}: {e}", part.display()))?;
                let status = Command::new("tar")
                    .arg("-xzf")
                    .arg(&archive)
                    .arg("--strip-components=1")
                    .arg("-C")
                    .arg(&part)
                    .status()
                    .map_err(|e| format!("tar: {e}"))?;
                if !status.success() {
                    return Err(format!("unpacking {} failed ({status})", archive.display()));
                }
                let _ = std::fs::remove_dir_all(&tree);
                std::fs::rename(&part, &tree).map_err(|e| format!("{}: {e}", tree.display()))?;
            }
        }
    }
    let bins = target.join("debug");
    eprintln!(
        "building farm {tag} in {} (once; later runs reuse it)",
        tree.display()
    );
    let status = Command::new(env!("CARGO"))
        .current_dir(&tree)
        .env("CARGO_TARGET_DIR", &target)
        // Whatever the test run set for its own build does not apply to the old tree.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .args([
            "build",
            "--quiet",
            "-p",
            "farm-daemon",
            "--bin",
            "farmd",
            "--bin",
            "farmctl",
        ])
        .status()
        .map_err(|e| format!("cargo build in {}: {e}", tree.display()))?;
    if !status.success() {
        return Err(format!(
            "building {tag} in {} failed ({status})",
            tree.display()
        ));
    }
    let farmd = bins.join("farmd");
    if !farmd.exists() {
        return Err(format!("{} missing after the build", farmd.display()));
    }
    Ok((bins, tag))
}

#[cfg(test)]
mod tests {
    use super::{parse, previous_release};

    /// Every clone finds the release before this one (CI clones carry no tags: the archive).
    #[test]
    fn the_previous_release_is_found_in_any_clone() {
        let (tag, _) = previous_release().expect("a previous release");
        assert!(parse(&tag).is_some(), "{tag}");
    }

    #[test]
    fn tags_order_as_versions() {
        assert_eq!(parse("v0.2.10"), Some((0, 2, 10)));
        assert!(parse("v0.10.0") > parse("v0.9.3"));
        assert_eq!(parse("v1.2"), None);
        assert_eq!(parse("0.1.0"), None);
        assert_eq!(parse("v0.1.0-rc1"), None);
    }
}
