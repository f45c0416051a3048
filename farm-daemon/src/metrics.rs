//! The Prometheus endpoint and the status page (off by default; on, they listen on
//! 127.0.0.1:9464 unless configured otherwise): a read-only HTTP/1.1 listener, one request per
//! connection, that answers `GET /metrics` in the Prometheus text format, `GET /` with the
//! status page (`status.html`: the bucket map drawn as a grid coloured by owner, the members,
//! heartbeat networks and recent events, refreshed every second) and `GET /status.json` with
//! what the page draws. The content is rendered by the daemon's main loop (see `daemon`); this
//! module only speaks HTTP and writes the text format.

use std::{fmt::Write as _, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

/// Builds the text exposition format: one HELP/TYPE header per metric family, then samples.
#[derive(Default)]
pub struct Text {
    out: String,
}

/// A label value escaped as the text format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Text {
    /// Starts a metric family.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self
    }

    /// One sample.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// The status page (static; it fetches `/status.json`).
pub const PAGE: &str = include_str!("status.html");

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Metrics,
    Page,
    State,
    NotFound(String),
    BadRequest,
}

/// What the main loop renders for the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Render {
    Metrics,
    State,
}

/// Parses the request line of `head`.
pub fn route(head: &str) -> Route {
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(path)) => match path.split('?').next().unwrap_or("") {
            "/metrics" => Route::Metrics,
            "/" | "/status" => Route::Page,
            "/status.json" => Route::State,
            other => Route::NotFound(other.to_string()),
        },
        _ => Route::BadRequest,
    }
}

/// Reads one request head (bounded in size and time).
async fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read = async {
        loop {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
            if buf.len() > 8192 {
                return None;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .ok()
        .flatten()
}

async fn respond(s: &mut TcpStream, status: &str, content_type: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        s.write_all(head.as_bytes()).await?;
        s.write_all(body.as_bytes()).await?;
        s.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
}

/// Connections served at a time; more are closed at once. A scraper needs one; the cap keeps
/// a flood of idle connections from taking farmd's file descriptors (which its health checks
/// and heartbeats need).
pub const MAX_CONNECTIONS: usize = 32;

/// Serves the endpoint until the process ends. `render` produces the metrics text (it asks
/// the main loop).
pub async fn serve<F, Fut>(listener: TcpListener, render: F)
where
    F: Fn(Render) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Option<String>> + Send,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut refused: u64 = 0;
    loop {
        let Ok((mut s, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    "metrics endpoint: {MAX_CONNECTIONS} connections open, closing one from \
                     {peer} ({refused} so far)"
                );
            }
            drop(s);
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let Some(head) = read_head(&mut s).await else {
                return;
            };
            match route(&head) {
                Route::Metrics => match render(Render::Metrics).await {
                    Some(text) => {
                        respond(
                            &mut s,
                            "200 OK",
                            "text/plain; version=0.0.4; charset=utf-8",
                            &text,
                        )
                        .await
                    }
                    None => respond(&mut s, "503 Service Unavailable", "text/plain", "").await,
                },
                Route::State => match render(Render::State).await {
                    Some(json) => respond(&mut s, "200 OK", "application/json", &json).await,
                    None => respond(&mut s, "503 Service Unavailable", "text/plain", "").await,
                },
                Route::Page => respond(&mut s, "200 OK", "text/html; charset=utf-8", PAGE).await,
                Route::NotFound(p) => {
                    let body = format!("no such page: {p} (try / or /metrics)\n");
                    respond(&mut s, "404 Not Found", "text/plain", &body).await
                }
                Route::BadRequest => {
                    respond(&mut s, "400 Bad Request", "text/plain", "GET only\n").await
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format() {
        let mut t = Text::default();
        t.family("farm_buckets_owned", "gauge", "Buckets each member owns.")
            .sample("farm_buckets_owned", &[("member", "web\"1")], 21845.0);
        assert_eq!(
            t.finish(),
            "# HELP farm_buckets_owned Buckets each member owns.\n\
             # TYPE farm_buckets_owned gauge\n\
             farm_buckets_owned{member=\"web\\\"1\"} 21845\n"
        );
    }

    #[test]
    fn routes() {
        assert_eq!(
            route("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route("GET /metrics?x=1 HTTP/1.1\r\n\r\n"), Route::Metrics);
        assert_eq!(
            route("GET /other HTTP/1.1\r\n\r\n"),
            Route::NotFound("/other".into())
        );
        assert_eq!(route("GET / HTTP/1.1\r\n\r\n"), Route::Page);
        assert_eq!(route("GET /status.json HTTP/1.1\r\n\r\n"), Route::State);
        assert_eq!(route("POST /metrics HTTP/1.1\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(""), Route::BadRequest);
    }
}
