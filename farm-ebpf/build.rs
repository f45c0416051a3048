fn main() {
    // Rebuild when the shared crate changes (it is a path dependency, so this is automatic),
    // and give a clear error if the linker is missing.
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf")
        && which::which("bpf-linker").is_err()
    {
        panic!("bpf-linker is not installed: run `cargo xtask setup`");
    }
}
