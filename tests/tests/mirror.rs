//! Mirror mode's replication on two real nodes (network namespaces): what the primary's
//! application was told is durable (its fsync returned) is on the secondary, whenever the
//! primary dies; and the replica is the same tree as the primary's, entry for entry.

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use farm_mirror::tree;
use farm_tests::{
    bin, require_root,
    topology::{Spec, Topology},
};

const PORT: u16 = 7947;

/// A running farm-mirror, killed (SIGKILL) when dropped if still running.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A mount point, lazily unmounted when dropped (a killed primary leaves its FUSE mount).
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

fn mirror(t: &Topology, i: usize, args: &[&str], log: &str) -> Proc {
    let log = std::fs::File::create(t.dir.join(log)).expect("log");
    Proc(
        t.nodes[i]
            .ns
            .command(&bin("farm-mirror"))
            .arg("--key")
            .arg(t.key_file())
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn farm-mirror"),
    )
}

fn secondary(t: &Topology, i: usize, replica: &Path) -> Proc {
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
fn primary(t: &Topology, i: usize, peer: usize, backing: &Path, mount: &Path) -> (Proc, Mount) {
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
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(&format!(" {} ", mount.display())) && l.contains("farm-mirror"));
        if mounted {
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

fn two_nodes() -> Topology {
    Topology::build(Spec {
        nodes: 2,
        client_addrs: 1,
        test_servers: false,
        ..Spec::default()
    })
}

/// Records `first..` appended to `file`, each fsync'ed before it counts as acknowledged, until
/// the filesystem fails (its primary died) or `stop`.
fn append_records(file: PathBuf, first: u64, acked: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(&file)
    else {
        return;
    };
    let mut n = first;
    while !stop.load(Ordering::Relaxed) {
        let line = format!("record {n:08}\n");
        if f.write_all(line.as_bytes()).is_err() || f.sync_data().is_err() {
            return;
        }
        acked.store(n, Ordering::SeqCst);
        n += 1;
    }
}

/// The records in a file (complete lines only; a torn last line is not a record).
fn records(file: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim().strip_prefix("record ")?.parse().ok())
        .collect()
}

#[test]
fn no_acknowledged_write_is_lost_when_the_primary_is_killed() {
    if !require_root("no_acknowledged_write_is_lost_when_the_primary_is_killed") {
        return;
    }
    let t = two_nodes();
    // One data directory and one mount point per node; the roles swap at every failover.
    let data: Vec<PathBuf> = (0..2)
        .map(|i| t.dir.join(format!("data-n{}", i + 1)))
        .collect();
    let mnt: Vec<PathBuf> = (0..2)
        .map(|i| t.dir.join(format!("mnt-n{}", i + 1)))
        .collect();
    for d in data.iter().chain(&mnt) {
        std::fs::create_dir_all(d).expect("dir");
    }
    let mut seed = std::process::id() as u64 | 1;
    let mut next = 0u64;
    let mut lost_total = 0;
    let mut recoveries = Vec::new();
    for round in 0..10 {
        let (p, s) = (round % 2, 1 - round % 2);
        let sec = secondary(&t, s, &data[s]);
        let started = Instant::now();
        let (mut prim, mount) = primary(&t, p, s, &data[p], &mnt[p]);
        let serving_after = started.elapsed();
        // The application resumes after the last record it finds (as a database replays its
        // log), appending and fsyncing; the primary's node dies at a random moment.
        let file = mnt[p].join("records.log");
        let have = records(&file);
        // A record torn by the crash (a line without its newline) is dropped first, as a
        // database drops a torn log record: it was never acknowledged.
        let text = std::fs::read(&file).unwrap_or_default();
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&file)
                .and_then(|f| f.set_len(complete as u64))
                .expect("truncate the torn record");
        }
        assert_eq!(
            have.last().map_or(0, |l| l + 1),
            next,
            "round {round}: the new primary starts from the last acknowledged record"
        );
        let acked = Arc::new(AtomicU64::new(u64::MAX));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (f, a, s) = (file.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || append_records(f, next, a, s))
        };
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(150 + seed % 500));
        // SIGKILL: no unmount, no goodbye to the secondary.
        prim.0.kill().expect("kill primary");
        let _ = prim.0.wait();
        stop.store(true, Ordering::Relaxed);
        drop(mount);
        let _ = writer.join();
        drop(sec);
        // What the secondary has is what the next primary will serve.
        let got = records(&data[s].join("records.log"));
        let last_acked = acked.load(Ordering::SeqCst);
        let lost = if last_acked == u64::MAX {
            0
        } else {
            (next..=last_acked).filter(|n| !got.contains(n)).count()
        };
        eprintln!(
            "mirror round {round}: n{} killed after records {next}..{last_acked}; the replica \
             on n{} has up to {:?}; lost acknowledged records: {lost}; primary served {:.0} ms \
             after start (full copy included)",
            p + 1,
            s + 1,
            got.last(),
            serving_after.as_secs_f64() * 1000.0
        );
        lost_total += lost;
        recoveries.push(serving_after);
        let bad: Vec<&[u64]> = got.windows(2).filter(|w| w[1] != w[0] + 1).collect();
        assert!(
            bad.is_empty(),
            "records out of order or duplicated on the replica: {bad:?}; primary's backing has \
             {:?}",
            records(&data[p].join("records.log"))
                .windows(2)
                .filter(|w| w[1] != w[0] + 1)
                .map(|w| w.to_vec())
                .collect::<Vec<_>>()
        );
        if last_acked != u64::MAX {
            assert!(last_acked > next, "round {round}: the workload ran");
        }
        next = got.last().map_or(0, |l| l + 1);
    }
    assert_eq!(lost_total, 0, "acknowledged records lost");
    assert!(next > 100, "only {next} records in 10 rounds");
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
