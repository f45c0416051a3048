//! Network namespaces: creation, removal on drop, running code and commands inside.

use std::{
    os::fd::AsRawFd as _,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Prefix of every namespace this harness creates; `ft<pid>x<n>-...`.
pub const PREFIX: &str = "ft";

/// A run-unique name stem: `ft<pid>x<counter>`.
pub fn unique_stem() -> String {
    format!(
        "{PREFIX}{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `ip` with `args`, panicking with its output on failure.
pub fn ip(args: &[&str]) -> Output {
    run("ip", args)
}

pub fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Removes namespaces left behind by test processes that no longer exist (a run killed before
/// its destructors ran).
pub fn remove_stale() {
    // The replicated directories of mirror tests in a killed run: a FUSE mount whose server
    // died (ENOTCONN), under the run's `farm-test-ft<pid>x<n>` directory.
    for line in std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
    {
        let mut fields = line.split_whitespace();
        let (Some("farm-mirror"), Some(target)) = (fields.next(), fields.next()) else {
            continue;
        };
        let stale = target
            .split('/')
            .find_map(|part| part.strip_prefix("farm-test-"))
            .and_then(stale_owner);
        if stale.is_some() {
            farm_daemon::mirror::detach(std::path::Path::new(target));
        }
    }
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if stale_owner(name).is_some() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// The pid in a name made by `unique_stem` (`ft<pid>x<n>...`), if that process is gone.
fn stale_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let pid = rest.split('x').next()?.parse::<u32>().ok()?;
    (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(pid)
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Inode of the namespace (what farmd uses to name its pins and lock files).
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(self.path()).expect("netns file").ino()
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// stdout of `ip -n <ns> <args>`.
    pub fn ip_out(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.ip(args).stdout).into_owned()
    }

    /// Runs many `ip` commands in one process (`ip -batch`), e.g. hundreds of addresses.
    pub fn ip_batch(&self, lines: &[String]) {
        use std::io::Write as _;
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("ip -batch");
        {
            let mut stdin = child.stdin.take().expect("stdin");
            for l in lines {
                writeln!(stdin, "{l}").expect("write to ip -batch");
            }
        }
        assert!(
            child.wait().expect("ip -batch").success(),
            "ip -batch failed"
        );
    }

    /// A command that runs inside the namespace (via nsenter, which execs it: the child's pid
    /// is the program's own).
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path()))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `f` on a new thread that has entered this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }

    /// Runs `f` inside the namespace and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("thread in netns panicked")
    }
}

/// Moves the calling thread into the namespace at `path`.
pub fn enter(path: &str) {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
