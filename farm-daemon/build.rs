//! Builds the eBPF object (farm-ebpf) with aya-build and leaves it in OUT_DIR for
//! `include_bytes_aligned!`. Before that, checks that the eBPF toolchain is there, so that a
//! missing piece is one clear line instead of a wall of cargo output.

use std::process::{Command, Stdio};

fn missing_toolchain() -> Option<String> {
    let ok = |cmd: &mut Command| {
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !ok(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        return Some("the nightly Rust toolchain is not installed".into());
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if !std::path::Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/core")
        .exists()
    {
        return Some("rust-src is not installed for the nightly toolchain".into());
    }
    if !ok(Command::new("bpf-linker").arg("--version")) {
        return Some("bpf-linker is not installed (or not on PATH)".into());
    }
    None
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=PATH");
    if let Some(what) = missing_toolchain() {
        eprintln!();
        eprintln!("error: cannot build the farm eBPF program: {what}.");
        eprintln!("       Run `cargo xtask setup` once on this machine, then build again.");
        eprintln!();
        std::process::exit(1);
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("farm-ebpf");
    let root = root.to_str().expect("utf-8 path");
    println!("cargo:rerun-if-changed={root}/src");
    println!("cargo:rerun-if-changed={root}/../farm-common/src");
    // aya-build forwards every line the inner cargo prints as a cargo warning; keep it to real
    // diagnostics (errors and warnings still come through).
    // SAFETY: the build script is single-threaded here.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "farm-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
