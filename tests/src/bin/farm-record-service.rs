//! farm-record-service: the stateful service of the mirror-mode tests. Clients send numbered
//! records, one per line; each is appended to `records.log` in `--dir`, made durable
//! (fdatasync), and only then acknowledged with `ok N`. What a client saw acknowledged must
//! therefore survive the loss of the primary.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    path::PathBuf,
    sync::{Arc, Mutex},
};

fn main() {
    let mut dir = None;
    let mut listen = None;
    let mut pidfile = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => dir = args.next().map(PathBuf::from),
            "--listen" => listen = args.next(),
            "--pidfile" => pidfile = args.next().map(PathBuf::from),
            other => {
                eprintln!(
                    "usage: farm-record-service --dir DIR --listen ADDR:PORT [--pidfile F] ({other}?)"
                );
                std::process::exit(2);
            }
        }
    }
    let (Some(dir), Some(listen)) = (dir, listen) else {
        eprintln!("usage: farm-record-service --dir DIR --listen ADDR:PORT [--pidfile F]");
        std::process::exit(2);
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("records.log"))
        .unwrap_or_else(|e| panic!("opening {}/records.log: {e}", dir.display()));
    let l = TcpListener::bind(&listen).unwrap_or_else(|e| panic!("listening on {listen}: {e}"));
    if let Some(p) = pidfile {
        std::fs::write(p, std::process::id().to_string()).expect("pidfile");
    }
    eprintln!("farm-record-service: {} on {listen}", dir.display());
    let file = Arc::new(Mutex::new(file));
    for conn in l.incoming() {
        let Ok(conn) = conn else { continue };
        let file = file.clone();
        std::thread::spawn(move || {
            let mut w = conn.try_clone().expect("clone");
            for line in BufReader::new(conn).lines() {
                let Ok(line) = line else { return };
                let Ok(n) = line.trim().parse::<u64>() else {
                    return;
                };
                let ok = {
                    let mut f = file.lock().expect("file");
                    f.write_all(format!("{n}\n").as_bytes()).is_ok() && f.sync_data().is_ok()
                };
                if !ok || w.write_all(format!("ok {n}\n").as_bytes()).is_err() {
                    return;
                }
            }
        });
    }
}
