//! Mirror mode's replication on two real nodes (network namespaces), with the standalone
//! `farm-mirror` tool: every kind of change an application makes reaches the replica, which is
//! the same tree as the primary's entry for entry, and fsx's random workload finds the
//! replicated directory consistent. (Failover through farmd: `mirror_failover.rs`.)

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use farm_mirror::tree;
use farm_tests::{
    mirror_tool::{self, MirrorProc, Mount},
    require_root,
    topology::{Spec, Topology},
};

const PORT: u16 = 7947;

fn mirror(t: &Topology, i: usize, args: &[&str], log: &str) -> MirrorProc {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    mirror_tool::spawn(t, i, &args, &t.dir.join(log)).expect("spawn farm-mirror")
}

fn secondary(t: &Topology, i: usize, replica: &Path) -> MirrorProc {
    let listen = format!("{}:{PORT}", t.nodes[i].addr4);
    let p = mirror(
        t,
        i,
        &[
            "secondary",
            "--replica",
            &replica.display().to_string(),
            "--listen",
            &listen,
        ],
        &format!("secondary-{i}.log"),
    );
    // Listening once a connection succeeds (bounded).
    let addr: std::net::SocketAddr = listen.parse().expect("addr");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t.nodes[i].ns.run(move || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
    }) {
        assert!(
            Instant::now() < deadline,
            "secondary on n{} never listened",
            i + 1
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

/// Starts the primary on node `i` (backing -> mount, replicated to node `peer`) and waits
/// until the mount serves.
fn primary(
    t: &Topology,
    i: usize,
    peer: usize,
    backing: &Path,
    mount: &Path,
) -> (MirrorProc, Mount) {
    let p = mirror(
        t,
        i,
        &[
            "primary",
            "--backing",
            &backing.display().to_string(),
            "--mount",
            &mount.display().to_string(),
            "--secondary",
            &format!("{}:{PORT}", t.nodes[peer].addr4),
        ],
        &format!("primary-{i}.log"),
    );
    let m = Mount(mount.to_path_buf());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if mirror_tool::mounted(mount) {
            return (p, m);
        }
        assert!(
            Instant::now() < deadline,
            "the primary never mounted: {}",
            std::fs::read_to_string(t.dir.join(format!("primary-{i}.log"))).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs fsx on `file` with `ops` operations; returns (passed, what it printed last).
fn fsx(t: &Topology, file: &Path, seed: u64, ops: u64) -> (bool, String) {
    let home = std::env::var("HOME").expect("HOME");
    let fsx = PathBuf::from(home).join(".local/share/farm/tools/bin/fsx");
    assert!(
        fsx.exists(),
        "{} is missing: run `cargo xtask setup`",
        fsx.display()
    );
    let config = t.dir.join("fsx.toml");
    std::fs::write(
        &config,
        "flen = 1048576\n\n[opsize]\nmax = 131072\n\n[weights]\nclose_open = 2\nread = 10\n\
         write = 10\nmapread = 5\nmapwrite = 5\ninvalidate = 1\ntruncate = 3\nfsync = 2\n\
         fdatasync = 2\nposix_fallocate = 2\npunch_hole = 2\nsendfile = 2\n\
         copy_file_range = 2\n",
    )
    .expect("fsx config");
    let out = std::process::Command::new(&fsx)
        .arg("-f")
        .arg(&config)
        .args(["-N", &ops.to_string(), "-S", &seed.to_string(), "-P"])
        .arg(&t.dir)
        .arg(file)
        .output()
        .expect("run fsx");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let last: Vec<&str> = text.lines().rev().take(8).collect();
    let summary = format!(
        "{ops} operations, exit {}: {}",
        out.status,
        last.into_iter().rev().collect::<Vec<_>>().join(" | ")
    );
    (out.status.success(), summary)
}

fn two_nodes() -> Topology {
    Topology::build(Spec {
        nodes: 2,
        client_addrs: 1,
        test_servers: false,
        ..Spec::default()
    })
}

#[test]
fn the_replica_is_the_same_tree_as_the_primary() {
    if !require_root("the_replica_is_the_same_tree_as_the_primary") {
        return;
    }
    let t = two_nodes();
    let (backing, replica, mnt) = (
        t.dir.join("backing"),
        t.dir.join("replica"),
        t.dir.join("mnt"),
    );
    for d in [&backing, &replica, &mnt] {
        std::fs::create_dir_all(d).expect("dir");
    }
    // Data from before the mirror started, and junk in the replica that must go.
    std::fs::write(backing.join("before"), vec![1u8; 300_000]).expect("write");
    std::fs::write(replica.join("junk"), b"x").expect("write");
    let _sec = secondary(&t, 1, &replica);
    let (mut prim, mount) = primary(&t, 0, 1, &backing, &mnt);

    // Every kind of change an application makes, through the mount.
    let m = |p: &str| mnt.join(p);
    std::fs::create_dir_all(m("db/base/1")).expect("mkdir");
    std::fs::write(m("db/base/1/table"), vec![7u8; 1 << 20]).expect("write");
    {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(m("db/sparse"))
            .expect("sparse");
        std::os::unix::fs::FileExt::write_all_at(&f, b"far", 64 << 20).expect("write");
        // O_SYNC file: every write returns once replicated.
        let mut s = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open(m("db/wal"))
            .expect("o_sync");
        for i in 0..50 {
            s.write_all(format!("wal entry {i}\n").as_bytes())
                .expect("wal");
        }
        // O_DIRECT is accepted (served without the page cache).
        let mut d = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(m("db/direct"))
            .expect("o_direct");
        d.write_all(&[9u8; 4096]).expect("direct write");
    }
    std::fs::rename(m("db/base/1/table"), m("db/base/1/table.new")).expect("rename");
    std::fs::hard_link(m("db/base/1/table.new"), m("db/hard")).expect("link");
    std::os::unix::fs::symlink("base/1/table.new", m("db/current")).expect("symlink");
    std::fs::OpenOptions::new()
        .write(true)
        .open(m("db/base/1/table.new"))
        .and_then(|f| f.set_len(4096))
        .expect("truncate");
    std::fs::set_permissions(
        m("db/base"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod");
    std::fs::write(m("gone"), b"soon removed").expect("write");
    std::fs::remove_file(m("gone")).expect("unlink");
    std::fs::create_dir(m("empty-dir")).expect("mkdir");
    std::fs::remove_dir(m("empty-dir")).expect("rmdir");
    std::fs::rename(m("before"), m("db/before")).expect("rename");
    // fsync of the directory: returns once the secondary has everything before it.
    std::fs::File::open(m("db"))
        .and_then(|d| d.sync_all())
        .expect("fsync dir");

    // Conformance: fsx (the File System eXerciser) drives random reads, writes, mmap reads and
    // writes, truncates, fsync, fdatasync, fallocate, hole punching, copy_file_range and
    // sendfile on the mount, checking every read against its model of the file.
    let fsx_ops = 20_000;
    for (seed, file) in [(1, "fsx-a"), (2, "fsx-b")] {
        let (ok, summary) = fsx(&t, &m(file), seed, fsx_ops);
        eprintln!("mirror fsx seed {seed}: {summary}");
        assert!(
            ok,
            "fsx found an inconsistency on the replicated directory: {summary}"
        );
    }

    let (a, b) = (
        tree::digest(&backing).expect("backing"),
        tree::digest(&replica).expect("replica"),
    );
    let diff = tree::differences(&a, &b);
    assert!(diff.is_empty(), "replica differs: {diff:#?}");
    assert_eq!(
        tree::digest(&mnt).expect("mount"),
        a,
        "the mount shows the backing tree"
    );
    assert!(!replica.join("junk").exists());
    let sparse = std::fs::metadata(replica.join("db/sparse")).expect("sparse");
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&sparse) * 512 < 1 << 20,
        "the hole stayed a hole on the replica"
    );
    eprintln!("mirror: replica equal to the primary, {} entries", a.len());
    // SIGTERM unmounts cleanly.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(prim.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while prim.0.try_wait().expect("wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "the primary did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .contains(&format!(" {} ", mnt.display()));
    assert!(!mounted, "still mounted after SIGTERM");
    drop(mount);
}
