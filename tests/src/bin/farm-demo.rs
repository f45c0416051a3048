//! farm-demo: a three-node web farm on this machine, in network namespaces (`cargo xtask demo`).
//!
//! Builds a switch, three nodes each running NGINX and farmd (with an HTTP health check of
//! NGINX), and a client with 200 addresses; shows `farmctl status`, spreads 600 HTTP requests
//! over the farm, kills one node (its farmd and its NGINX) and measures as a client how long its
//! clients went unanswered until the others took them over, restarts it, runs a recovery drill
//! (`farmctl drill`), and removes everything on exit (also on Ctrl-C).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use std::os::unix::process::CommandExt as _;

use anyhow::{Context as _, Result, bail};
use farm_tests::{
    bin,
    topology::{Spec, TCP_PORT, Topology},
    traffic,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}

fn title(s: &str) {
    println!("\n=== {s}");
}

fn main() -> Result<()> {
    // SAFETY: geteuid has no preconditions; the handler only stores to an atomic.
    unsafe {
        if libc::geteuid() != 0 {
            bail!("the demo builds network namespaces and attaches XDP programs: run it as root");
        }
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    title("Building a switch, three nodes (n1-n3) and a client with 200 addresses");
    let mut t = Topology::build(Spec {
        nodes: 3,
        client_addrs: 200,
        deadman_ms: 300,
        test_servers: false,
        extra_config: format!(
            "\n[[check]]\nname = \"nginx\"\nkind = \"http\"\nurl = \"http://127.0.0.1:{TCP_PORT}/health\"\n\
             interval_ms = 500\nrise = 2\nfall = 2\n\n[metrics]\nenabled = true\n\n[drill]\n\
             probe_addresses = [\"10.201.9.192/26\"]\nrto_objective_ms = 1000\n"
        ),
        ..Spec::default()
    });
    let mut web = Nginx::default();
    let result = run(&mut t, &mut web);
    title("Cleaning up (NGINX, farmd, namespaces, programs)");
    drop(web);
    drop(t);
    println!("done");
    result
}

/// The NGINX masters the demo started (one per node), stopped when dropped.
#[derive(Default)]
struct Nginx {
    running: Vec<Option<Child>>,
}

impl Nginx {
    /// Starts NGINX in node `i`'s namespace, answering `GET /` with the node's name and
    /// `GET /health` with "ok"; all its files live in the topology's directory.
    fn start(&mut self, t: &Topology, i: usize) -> Result<()> {
        let name = &t.nodes[i].name;
        let dir: PathBuf = t.dir.join(format!("{name}-nginx"));
        std::fs::create_dir_all(dir.join("tmp"))?;
        let d = dir.display();
        let conf = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/tmp/body;\n  \
             proxy_temp_path {d}/tmp/proxy;\n  fastcgi_temp_path {d}/tmp/fastcgi;\n  \
             uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n  \
             server {{\n    listen {TCP_PORT} reuseport;\n    listen [::]:{TCP_PORT} reuseport;\n    \
             location = /health {{ return 200 \"ok\\n\"; }}\n    \
             location / {{ default_type text/plain; return 200 \"{name}\\n\"; }}\n  }}\n}}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf)?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", t.nodes[i].ns.path()))
            .arg("nginx")
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            // Its own process group (nsenter execs nginx, whose workers inherit it): one
            // signal reaches master and workers.
            .process_group(0)
            .spawn()
            .context("starting nginx (cargo xtask demo installs it)")?;
        if self.running.len() <= i {
            self.running.resize_with(i + 1, || None);
        }
        self.running[i] = Some(child);
        // Ready once it answers (bounded).
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = SocketAddr::new(IpAddr::V4(t.nodes[i].addr4), TCP_PORT);
        loop {
            let ok = t.nodes[i].ns.run(move || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            });
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "nginx on {name} does not answer; see {}",
                    dir.join("error.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills node `i`'s NGINX at once (SIGKILL of master and workers, as a dying host would).
    fn kill(&mut self, i: usize) {
        if let Some(Some(mut c)) = self.running.get_mut(i).map(Option::take) {
            // SAFETY: signals the process group of the NGINX we started.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        for mut c in self.running.iter_mut().filter_map(Option::take) {
            let group = -(c.id() as i32);
            // SAFETY: SIGTERM to the process group of the NGINX we started (fast shutdown).
            unsafe { libc::kill(group, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // Whatever is left of the group (nothing, normally).
            // SAFETY: as above.
            unsafe { libc::kill(group, libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

fn farmctl(t: &Topology, i: usize, args: &[&str]) {
    let out = Command::new(bin("farmctl"))
        .arg("--socket")
        .arg(&t.nodes[i].socket)
        .args(args)
        .output();
    match out {
        Ok(o) => print!("{}", String::from_utf8_lossy(&o.stdout)),
        Err(e) => println!("farmctl: {e}"),
    }
}

fn spread(t: &Topology, sources: &[IpAddr], per_source: usize) -> BTreeMap<String, usize> {
    let reqs: Vec<(IpAddr, SocketAddr)> = (0..sources.len() * per_source)
        .map(|k| (sources[k % sources.len()], t.vip4(TCP_PORT)))
        .collect();
    let mut per_node = BTreeMap::new();
    let answers = t.client.run(move || {
        reqs.into_iter()
            .map(|(src, dst)| traffic::http_get(src, dst, Duration::from_millis(800)))
            .collect::<Vec<_>>()
    });
    for a in answers {
        *per_node
            .entry(a.node.unwrap_or_else(|| "(no answer)".into()))
            .or_insert(0) += 1;
    }
    per_node
}

fn run(t: &mut Topology, web: &mut Nginx) -> Result<()> {
    title("Starting NGINX and farmd on every node (farmd checks http://127.0.0.1/health)");
    for i in 0..3 {
        web.start(t, i)?;
    }
    t.start_all();
    check_interrupt()?;
    println!("$ farmctl status   (on n1)");
    farmctl(t, 0, &["status"]);

    title("600 HTTP requests to the VIP 10.201.0.100:80 from 200 client addresses");
    let sources: Vec<IpAddr> = t.client_v4.iter().map(|&a| IpAddr::V4(a)).collect();
    for (node, n) in spread(t, &sources, 3) {
        println!("  {node}: {n} connections");
    }
    println!("$ farmctl whois 10.201.4.1 10.201.4.2:40000");
    farmctl(t, 0, &["whois", "10.201.4.1", "10.201.4.2:40000"]);
    check_interrupt()?;

    title("Killing node n2 (SIGKILL of its farmd and its NGINX): n1 and n3 take over");
    let n2_clients: Vec<IpAddr> = {
        let names: Vec<String> = sources.iter().map(|a| a.to_string()).collect();
        t.whois(0, &names)
            .into_iter()
            .filter(|w| w.by_client.as_ref().and_then(|p| p.owner.as_deref()) == Some("n2"))
            .filter_map(|w| w.client.parse().ok())
            .collect()
    };
    let killed = Instant::now();
    t.signal_farmd(1, libc::SIGKILL);
    web.kill(1);
    // A client of n2 opens a new connection every few ms until someone answers.
    let mut k = 0;
    let recovered = loop {
        let probe = n2_clients[k % n2_clients.len()];
        k += 1;
        let a = t.client.run({
            let dst = t.vip4(TCP_PORT);
            move || traffic::http_get(probe, dst, Duration::from_millis(50))
        });
        if a.node.as_deref().is_some_and(|n| n != "n2") {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(10) {
            bail!("nobody took over n2's clients");
        }
    };
    println!(
        "  measured RTO: n2's clients were answered again {:.0} ms after it died (a client of \
         n2 opening a new connection every few ms)",
        recovered.as_secs_f64() * 1000.0
    );
    println!("  (detection: heartbeats every 50 ms, lost after 8 missed = 400 ms)");
    std::thread::sleep(Duration::from_millis(300));
    for (node, n) in spread(t, &sources, 1) {
        println!("  {node}: {n} connections");
    }
    println!("$ farmctl status   (on n1)");
    farmctl(t, 0, &["status"]);
    check_interrupt()?;

    title("Restarting n2 (NGINX, then farmd): it rejoins once its check passes");
    web.start(t, 1)?;
    t.start_farmd(1);
    t.wait_converged(&[0, 1, 2], Duration::from_secs(20));
    for (node, n) in spread(t, &sources, 1) {
        println!("  {node}: {n} connections");
    }
    check_interrupt()?;

    title("Recovery drill: n3 acts as if crashed; n1 measures the RTO as a client");
    println!("$ farmctl drill --member n3 --yes   (on n1)");
    farmctl(t, 0, &["drill", "--member", "n3", "--yes"]);
    t.wait_converged(&[0, 1, 2], Duration::from_secs(20));
    Ok(())
}
