//! The previous release, built from its git tag: what a rolling upgrade starts from.
//!
//! The tag is checked out in a git worktree under the workspace's `target/previous/` and built
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

/// The newest release tag older than this build's version (`CARGO_PKG_VERSION`).
pub fn previous_tag() -> Result<String, String> {
    let current = parse(&format!("v{}", env!("CARGO_PKG_VERSION"))).expect("a semver version");
    git(&["tag", "--list", "v*"])?
        .lines()
        .filter_map(|t| parse(t).map(|v| (v, t.to_string())))
        .filter(|(v, _)| *v < current)
        .max()
        .map(|(_, t)| t)
        .ok_or_else(|| {
            format!(
                "no release tag older than {} in this clone (git fetch --tags)",
                env!("CARGO_PKG_VERSION")
            )
        })
}

/// The previous release's farmd (and farmctl next to it), built if needed. Returns the
/// directory holding them and the tag.
pub fn build_previous() -> Result<(PathBuf, String), String> {
    let tag = previous_tag()?;
    let base = root().join("target/previous");
    let tree = base.join(&tag);
    let target = base.join("target");
    if !tree.join("Cargo.toml").exists() {
        std::fs::create_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
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
    use super::parse;

    #[test]
    fn tags_order_as_versions() {
        assert_eq!(parse("v0.2.10"), Some((0, 2, 10)));
        assert!(parse("v0.10.0") > parse("v0.9.3"));
        assert_eq!(parse("v1.2"), None);
        assert_eq!(parse("0.1.0"), None);
        assert_eq!(parse("v0.1.0-rc1"), None);
    }
}
