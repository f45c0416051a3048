//! Health checks of the local application (what SafeKit calls checkers and keepalived track
//! scripts): each runs on its own timer, its results go through rise/fall counters, and the
//! member is healthy while every check passes. A member whose checks fail gives its buckets
//! away; flapping is damped so a bouncing check moves buckets a bounded number of times per
//! minute.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::config::{Check, Probe};

/// One probe's result.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    pub ok: bool,
    /// Whether the application answered at all (an HTTP error status, a failing command) as
    /// opposed to not at all (refused, timed out, process gone): a member whose application
    /// still answers hands its buckets over keeping connections; one whose application does not
    /// gives them away at once.
    pub answered: bool,
    pub detail: String,
    /// The probe could not run for a reason of this host's (no file descriptor, no memory):
    /// it says nothing of the application, and the check keeps its state.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inconclusive: bool,
}

/// Whether an error is this host running out of something, not the application failing.
pub fn local_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)
    )
}

impl Outcome {
    fn pass(detail: impl Into<String>) -> Self {
        Self {
            ok: true,
            answered: true,
            detail: detail.into(),
            inconclusive: false,
        }
    }
    fn fail(answered: bool, detail: impl Into<String>) -> Self {
        Self {
            ok: false,
            answered,
            detail: detail.into(),
            inconclusive: false,
        }
    }
    fn inconclusive(detail: impl Into<String>) -> Self {
        Self {
            ok: false,
            answered: false,
            detail: detail.into(),
            inconclusive: true,
        }
    }
}

/// Runs one probe, bounded by `timeout`.
pub async fn probe(p: &Probe, timeout: Duration) -> Outcome {
    match p {
        Probe::Tcp(addr) => {
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_)) => Outcome::pass("connected"),
                Ok(Err(e)) if local_exhaustion(&e) => {
                    Outcome::inconclusive(format!("this host cannot connect: {e}"))
                }
                Ok(Err(e)) => Outcome::fail(false, format!("connect: {e}")),
                Err(_) => Outcome::fail(false, format!("no connection within {timeout:?}")),
            }
        }
        Probe::Http {
            url,
            expect_status,
            body_contains,
            tls_verify,
        } => {
            let (url, want, body, verify) = (
                url.clone(),
                *expect_status,
                body_contains.clone(),
                *tls_verify,
            );
            match tokio::task::spawn_blocking(move || http(&url, want, body, verify, timeout)).await
            {
                Ok(o) => o,
                Err(e) => Outcome::fail(false, format!("check task: {e}")),
            }
        }
        Probe::Process(name) => {
            let name = name.clone();
            match tokio::task::spawn_blocking(move || process_running(&name)).await {
                Ok(Some(pid)) => Outcome::pass(format!("pid {pid}")),
                Ok(None) => Outcome::fail(false, "no such process"),
                Err(e) => Outcome::fail(false, format!("check task: {e}")),
            }
        }
        Probe::Systemd(unit) => {
            let args = vec![
                "systemctl".to_string(),
                "is-active".into(),
                "--quiet".into(),
                unit.clone(),
            ];
            match run(&args, timeout).await {
                Ok(0) => Outcome::pass("active"),
                Ok(code) => Outcome::fail(false, format!("not active (systemctl exit {code})")),
                Err(e) => Outcome::fail(false, e),
            }
        }
        Probe::Command(args) => match run(args, timeout).await {
            Ok(0) => Outcome::pass("exit 0"),
            Ok(code) => Outcome::fail(true, format!("exit {code}")),
            Err(e) => Outcome::fail(true, e),
        },
    }
}

fn http(
    url: &str,
    want: u16,
    body_contains: Option<String>,
    tls_verify: bool,
    timeout: Duration,
) -> Outcome {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .disable_verification(!tls_verify)
                .build(),
        )
        .user_agent("farm-health-check")
        .build()
        .into();
    let mut resp = match agent.get(url).call() {
        Ok(r) => r,
        Err(ureq::Error::Io(e)) if local_exhaustion(&e) => {
            return Outcome::inconclusive(format!("this host cannot connect: {e}"));
        }
        Err(e) => return Outcome::fail(false, e.to_string()),
    };
    let status = resp.status().as_u16();
    if status != want {
        return Outcome::fail(true, format!("HTTP {status}, expected {want}"));
    }
    let Some(needle) = body_contains else {
        return Outcome::pass(format!("HTTP {status}"));
    };
    match resp
        .body_mut()
        .with_config()
        .limit(256 * 1024)
        .read_to_string()
    {
        Ok(b) if b.contains(&needle) => Outcome::pass(format!("HTTP {status}, body matches")),
        Ok(_) => Outcome::fail(true, format!("HTTP {status}, body lacks {needle:?}")),
        Err(e) => Outcome::fail(true, format!("HTTP {status}, reading the body: {e}")),
    }
}

/// The pid of a running (not zombie) process: one running the program file `name` when it is
/// an absolute path (what /proc/PID/exe links to; a process name can be set by anyone, the
/// executable cannot), else one whose name (/proc/PID/comm) is `name`.
fn process_running(name: &str) -> Option<u32> {
    let by_path = name.starts_with('/');
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "PID (comm) STATE ...": comm may contain spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let state = stat[close + 1..].split_whitespace().next().unwrap_or("");
        if state == "Z" || state == "X" {
            continue;
        }
        let matches = if by_path {
            // A binary replaced by an upgrade while it runs shows as "PATH (deleted)".
            std::fs::read_link(entry.path().join("exe")).is_ok_and(|exe| {
                let exe = exe.as_os_str().as_encoded_bytes();
                exe == name.as_bytes() || exe.strip_suffix(b" (deleted)") == Some(name.as_bytes())
            })
        } else {
            comm == name
        };
        if matches {
            return Some(pid);
        }
    }
    None
}

/// Runs a command with a time limit (killed when it passes); its exit code.
async fn run(args: &[String], timeout: Duration) -> Result<i32, String> {
    let mut cmd = tokio::process::Command::new(&args[0]);
    cmd.args(&args[1..])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    run_bounded(cmd, &args[0], timeout)
        .await
        .map(|st| st.code().unwrap_or(-1))
}

/// Runs `cmd` (stdin closed) in a process group of its own and waits at most `timeout` for it;
/// past that the whole group is killed (a shell's children too). `program` names it in the
/// errors. Shared by checks, notify hooks and the mirror group's application commands.
pub(crate) async fn run_bounded(
    mut cmd: tokio::process::Command,
    program: &str,
    timeout: Duration,
) -> Result<std::process::ExitStatus, String> {
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            drop_capabilities();
            Ok(())
        })
    };
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(st)) => Ok(st),
        Ok(Err(e)) => Err(format!("waiting for {program}: {e}")),
        Err(_) => {
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) of the process group this call created.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
            let _ = child.kill().await;
            Err(format!("{program} did not finish within {timeout:?}"))
        }
    }
}

/// Capabilities farmd needs and the commands it runs (hooks, checks, the mirror's application
/// commands) do not: loading BPF programs and rewriting farm's maps, kernel modules, raw
/// devices and I/O ports, MAC policy, the clock, rebooting. Dropped from a child's bounding set
/// before it runs, so that not even a root command gets them back. Where farmd itself lacks
/// CAP_SETPCAP (a unit that bounds it) the drop is skipped: that unit's bounding set applies.
const DROPPED_CAPABILITIES: [libc::c_ulong; 9] = [
    39, // CAP_BPF
    38, // CAP_PERFMON
    16, // CAP_SYS_MODULE
    17, // CAP_SYS_RAWIO
    22, // CAP_SYS_BOOT
    25, // CAP_SYS_TIME
    32, // CAP_MAC_OVERRIDE
    33, // CAP_MAC_ADMIN
    30, // CAP_AUDIT_CONTROL
];

/// Drops [`DROPPED_CAPABILITIES`] from the calling (child) process's bounding set.
fn drop_capabilities() {
    for cap in DROPPED_CAPABILITIES {
        // SAFETY: prctl with integer arguments; failure (EINVAL for a capability this kernel
        // does not know, EPERM without CAP_SETPCAP) leaves the set as it was.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
}

/// Starts one task per check; results arrive on the returned channel as (check index,
/// outcome). The tasks end when the receiver is dropped.
pub fn start(checks: &[Check]) -> mpsc::Receiver<(usize, Outcome)> {
    let (tx, rx) = mpsc::channel(64);
    for (i, c) in checks.iter().enumerate() {
        let (c, tx) = (c.clone(), tx.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(c.interval);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let o = probe(&c.probe, c.timeout).await;
                if tx.send((i, o)).await.is_err() {
                    return;
                }
            }
        });
    }
    rx
}

/// A check's state after its rise/fall counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckState {
    /// Not yet passed `rise` times in a row since farmd started.
    Pending,
    Passing,
    Failing,
}

/// A check as `farmctl checks` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CheckStatus {
    pub name: String,
    pub kind: String,
    pub target: String,
    pub state: CheckState,
    pub rise: u32,
    pub fall: u32,
    pub interval_ms: u64,
    /// Passes (or failures) in a row, counting the last result.
    pub streak: u32,
    pub last: Option<Outcome>,
    pub last_age_ms: Option<u64>,
}

struct Tracked {
    check: Check,
    state: CheckState,
    /// Positive: passes in a row; negative: failures in a row.
    streak: i64,
    last: Option<(Outcome, Instant)>,
}

/// A member's health as an in-place upgrade hands it over (see `Health::snapshot`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HealthSnapshot {
    pub healthy: bool,
    pub checks: Vec<(String, CheckState, i64)>,
}

/// What the member's health changed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Every check passes (again).
    Healthy,
    /// A check fails; `answered`: the application still answers (hand over keeping
    /// connections) or not (give the buckets away at once).
    Unhealthy { answered: bool, why: String },
}

/// The member's health: every check's state, and flap damping over the changes.
pub struct Health {
    checks: Vec<Tracked>,
    /// Whether the member counts as healthy (after damping).
    healthy: bool,
    /// Times of the changes of `healthy` in the last minute.
    changes: VecDeque<Instant>,
    max_per_minute: u32,
    damped_logged: bool,
}

impl Health {
    /// With no checks a member is healthy from the start; with checks, once they all passed
    /// `rise` times.
    pub fn new(checks: &[Check], max_per_minute: u32) -> Self {
        Self {
            healthy: checks.is_empty(),
            checks: checks
                .iter()
                .map(|c| Tracked {
                    check: c.clone(),
                    state: CheckState::Pending,
                    streak: 0,
                    last: None,
                })
                .collect(),
            changes: VecDeque::new(),
            max_per_minute,
            damped_logged: false,
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// What an in-place upgrade carries over: whether the member is healthy, and each check's
    /// (name, state, streak).
    pub fn snapshot(&self) -> HealthSnapshot {
        HealthSnapshot {
            healthy: self.healthy,
            checks: self
                .checks
                .iter()
                .map(|t| (t.check.name.clone(), t.state, t.streak))
                .collect(),
        }
    }

    /// Takes over a previous farmd's health (an in-place upgrade): checks of the same name
    /// keep their state and streak, so a healthy member stays healthy through the upgrade.
    pub fn resume(&mut self, s: &HealthSnapshot) {
        for t in &mut self.checks {
            if let Some((_, state, streak)) = s.checks.iter().find(|(n, ..)| *n == t.check.name) {
                t.state = *state;
                t.streak = *streak;
            }
        }
        self.healthy = s.healthy && self.checks.iter().all(|t| t.state == CheckState::Passing);
    }

    /// Takes a reloaded set of checks: unchanged ones (same name and settings) keep their state
    /// and last result; new or changed ones start pending, so a healthy member stays healthy
    /// until one of them fails. Call `evaluate` afterwards (a removed failing check may make
    /// the member healthy again).
    pub fn reconfigure(&mut self, checks: &[Check], max_per_minute: u32) {
        let mut old = std::mem::take(&mut self.checks);
        self.checks = checks
            .iter()
            .map(|c| match old.iter().position(|t| t.check == *c) {
                Some(i) => old.swap_remove(i),
                None => Tracked {
                    check: c.clone(),
                    state: CheckState::Pending,
                    streak: 0,
                    last: None,
                },
            })
            .collect();
        self.max_per_minute = max_per_minute;
    }

    /// Takes in a result; returns the change of the member's health it causes, if any. An
    /// inconclusive result (this host out of descriptors or memory) is shown but changes
    /// nothing: a member short of file descriptors is not a member whose application failed.
    pub fn record(&mut self, i: usize, o: Outcome, now: Instant) -> Option<Change> {
        let t = self.checks.get_mut(i)?;
        if o.inconclusive {
            tracing::warn!("check {} could not run: {}", t.check.name, o.detail);
            t.last = Some((o, now));
            return None;
        }
        t.streak = match (o.ok, t.streak) {
            (true, s) if s > 0 => s + 1,
            (true, _) => 1,
            (false, s) if s < 0 => s - 1,
            (false, _) => -1,
        };
        let before = t.state;
        if t.streak >= t.check.rise as i64 {
            t.state = CheckState::Passing;
        } else if -t.streak >= t.check.fall as i64 {
            t.state = CheckState::Failing;
        }
        if t.state != before {
            match t.state {
                CheckState::Passing => tracing::info!(
                    "check {} passes ({} in a row): {}",
                    t.check.name,
                    t.streak,
                    o.detail
                ),
                CheckState::Failing => tracing::warn!(
                    "check {} fails ({} in a row): {}",
                    t.check.name,
                    -t.streak,
                    o.detail
                ),
                CheckState::Pending => {}
            }
        }
        t.last = Some((o, now));
        self.evaluate(now)
    }

    /// Re-evaluates the member's health (also called on a timer, so that a change held back
    /// by damping happens once the window allows it).
    pub fn evaluate(&mut self, now: Instant) -> Option<Change> {
        while self
            .changes
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= Duration::from_secs(60))
        {
            self.changes.pop_front();
        }
        let all_pass = self.checks.iter().all(|t| t.state == CheckState::Passing);
        let failing: Vec<&Tracked> = self
            .checks
            .iter()
            .filter(|t| t.state == CheckState::Failing)
            .collect();
        if self.healthy && !failing.is_empty() {
            // Going out is never held back: the application is failing.
            self.healthy = false;
            self.changes.push_back(now);
            return Some(Change::Unhealthy {
                answered: failing
                    .iter()
                    .any(|t| t.last.as_ref().is_some_and(|(o, _)| o.answered)),
                why: failing
                    .iter()
                    .map(|t| {
                        format!(
                            "{}: {}",
                            t.check.name,
                            t.last.as_ref().map_or("", |(o, _)| o.detail.as_str())
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        }
        if !self.healthy && all_pass {
            if self.changes.len() as u32 >= self.max_per_minute {
                if !self.damped_logged {
                    self.damped_logged = true;
                    tracing::warn!(
                        "checks pass again, but health moved buckets {} times in the last \\
                         minute (health.max_moves_per_minute): staying out until the minute \\
                         allows it",
                        self.changes.len()
                    );
                }
                return None;
            }
            self.damped_logged = false;
            self.healthy = true;
            self.changes.push_back(now);
            return Some(Change::Healthy);
        }
        None
    }

    /// Names of the checks that fail or have not passed yet.
    pub fn failing(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|t| t.state != CheckState::Passing)
            .map(|t| t.check.name.clone())
            .collect()
    }

    /// Whether a return is being held back by flap damping.
    pub fn damped(&self) -> bool {
        self.damped_logged
    }

    pub fn status(&self, now: Instant) -> Vec<CheckStatus> {
        self.checks
            .iter()
            .map(|t| CheckStatus {
                name: t.check.name.clone(),
                kind: t.check.probe.kind().into(),
                target: t.check.probe.target(),
                state: t.state,
                rise: t.check.rise,
                fall: t.check.fall,
                interval_ms: t.check.interval.as_millis() as u64,
                streak: t.streak.unsigned_abs() as u32,
                last: t.last.as_ref().map(|(o, _)| o.clone()),
                last_age_ms: t
                    .last
                    .as_ref()
                    .map(|(_, at)| now.saturating_duration_since(*at).as_millis() as u64),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(rise: u32, fall: u32) -> Check {
        Check {
            name: "web".into(),
            probe: Probe::Tcp("127.0.0.1:80".parse().unwrap()),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(800),
            rise,
            fall,
        }
    }

    fn ok() -> Outcome {
        Outcome::pass("ok")
    }
    fn bad(answered: bool) -> Outcome {
        Outcome::fail(answered, "bad")
    }

    #[test]
    fn a_reload_keeps_unchanged_checks_and_a_new_one_fails_only_after_fall() {
        let t0 = Instant::now();
        let mut h = Health::new(&[check(1, 2)], 4);
        assert_eq!(h.record(0, ok(), t0), Some(Change::Healthy));
        let mut second = check(1, 2);
        second.name = "db".into();
        h.reconfigure(&[check(1, 2), second], 4);
        assert!(
            h.healthy(),
            "a new pending check does not take a healthy member out"
        );
        assert_eq!(h.status(t0)[0].state, CheckState::Passing, "kept");
        assert_eq!(h.status(t0)[1].state, CheckState::Pending);
        assert_eq!(h.record(1, bad(true), t0), None);
        assert!(matches!(
            h.record(1, bad(true), t0),
            Some(Change::Unhealthy { answered: true, .. })
        ));
        // Removing the failing check makes the member healthy again.
        h.reconfigure(&[check(1, 2)], 4);
        assert_eq!(h.evaluate(t0), Some(Change::Healthy));
    }

    #[tokio::test]
    async fn commands_run_without_the_bpf_capability() {
        // CapBnd of the command itself, bit 39 (CAP_BPF) must be clear when farmd could drop it.
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args([
            "-c",
            "grep -q '^CapBnd:' /proc/self/status && b=$(awk '/^CapBnd/ {print $2}' /proc/self/status) && [ $(( 0x$b >> 39 & 1 )) -eq 0 ]",
        ]);
        // SAFETY: capget-free check: can this process drop capabilities at all?
        let can_drop = unsafe { libc::prctl(libc::PR_CAPBSET_READ, 8, 0, 0, 0) } == 1
            && unsafe { libc::geteuid() } == 0;
        let st = run_bounded(cmd, "sh", Duration::from_secs(5))
            .await
            .expect("ran");
        if can_drop {
            assert!(st.success(), "CAP_BPF still in the command's bounding set");
        }
    }

    #[test]
    fn a_process_check_by_path_matches_the_program_file_only() {
        let me = std::env::current_exe().expect("exe");
        let me = me.to_str().expect("utf-8 path");
        assert!(process_running(me).is_some(), "this test's own program");
        assert_eq!(process_running("/nonexistent/nginx"), None);
        // The same name elsewhere is not the program.
        let name = std::path::Path::new(me).file_name().expect("name");
        let elsewhere = format!("/tmp/{}", name.to_string_lossy());
        assert_eq!(process_running(&elsewhere), None);
    }

    #[test]
    fn rise_and_fall_counters() {
        let t0 = Instant::now();
        let mut h = Health::new(&[check(2, 3)], 10);
        assert!(!h.healthy(), "not healthy before the first passes");
        assert_eq!(h.record(0, ok(), t0), None);
        assert_eq!(h.record(0, ok(), t0), Some(Change::Healthy));
        // Two failures are not enough, and a pass resets the count.
        assert_eq!(h.record(0, bad(true), t0), None);
        assert_eq!(h.record(0, bad(true), t0), None);
        assert_eq!(h.record(0, ok(), t0), None);
        assert_eq!(h.record(0, bad(true), t0), None);
        assert_eq!(h.record(0, bad(true), t0), None);
        assert!(matches!(
            h.record(0, bad(true), t0),
            Some(Change::Unhealthy { answered: true, .. })
        ));
        assert_eq!(h.status(t0)[0].state, CheckState::Failing);
        assert_eq!(h.record(0, ok(), t0), None);
        assert_eq!(h.record(0, ok(), t0), Some(Change::Healthy));
    }

    #[test]
    fn an_application_that_does_not_answer_is_left_at_once() {
        let t0 = Instant::now();
        let mut h = Health::new(&[check(1, 1)], 10);
        h.record(0, ok(), t0);
        assert!(matches!(
            h.record(0, bad(false), t0),
            Some(Change::Unhealthy {
                answered: false,
                ..
            })
        ));
    }

    #[test]
    fn flapping_is_damped_to_the_budget_per_minute() {
        let t0 = Instant::now();
        let mut h = Health::new(&[check(1, 1)], 4);
        assert_eq!(h.record(0, ok(), t0), Some(Change::Healthy));
        let mut moves = 0;
        let mut t = t0;
        for _ in 0..20 {
            t += Duration::from_secs(1);
            if h.record(0, bad(true), t).is_some() {
                moves += 1;
            }
            t += Duration::from_secs(1);
            if h.record(0, ok(), t).is_some() {
                moves += 1;
            }
        }
        assert!(moves <= 5, "{moves} moves within 40 s");
        assert!(!h.healthy(), "held out while the budget is spent");
        assert!(h.damped());
        // A minute later it may come back.
        assert_eq!(
            h.evaluate(t + Duration::from_secs(61)),
            Some(Change::Healthy)
        );
    }

    #[test]
    fn every_check_must_pass() {
        let t0 = Instant::now();
        let mut a = check(1, 1);
        a.name = "a".into();
        let mut b = check(1, 1);
        b.name = "b".into();
        let mut h = Health::new(&[a, b], 10);
        assert_eq!(h.record(0, ok(), t0), None, "b has not passed yet");
        assert_eq!(h.record(1, ok(), t0), Some(Change::Healthy));
        assert!(h.record(1, bad(false), t0).is_some());
    }

    #[tokio::test]
    async fn probes_report_what_they_saw() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let o = probe(&Probe::Tcp(addr), Duration::from_secs(1)).await;
        assert!(o.ok, "{o:?}");
        drop(l);
        let o = probe(&Probe::Tcp(addr), Duration::from_secs(1)).await;
        assert!(!o.ok && !o.answered, "{o:?}");
        let o = probe(
            &Probe::Command(vec!["sh".into(), "-c".into(), "exit 3".into()]),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(
            (o.ok, o.answered, o.detail.as_str()),
            (false, true, "exit 3")
        );
        let o = probe(
            &Probe::Command(vec!["sleep".into(), "5".into()]),
            Duration::from_millis(100),
        )
        .await;
        assert!(!o.ok && o.detail.contains("did not finish"), "{o:?}");
        let me = std::fs::read_to_string("/proc/self/comm").unwrap();
        let o = probe(&Probe::Process(me.trim().into()), Duration::from_secs(1)).await;
        assert!(o.ok, "{o:?}");
        let o = probe(
            &Probe::Process("no-such-proc".into()),
            Duration::from_secs(1),
        )
        .await;
        assert!(!o.ok);
    }
}
