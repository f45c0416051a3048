//! What farmd tells its service manager (systemd's `sd_notify` protocol, through the sd-notify
//! crate): ready once it serves, reloading on SIGHUP, stopping on SIGTERM, a one-line status,
//! and watchdog keep-alives while its main loop makes progress, so that `WatchdogSec=` restarts
//! a farmd that hangs. Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;

/// The service manager, as farmd sees it.
#[derive(Debug, Default)]
pub struct Service {
    /// A service manager listens (`NOTIFY_SOCKET` is set).
    active: bool,
    watchdog: Option<Duration>,
    status: String,
}

impl Service {
    /// Reads what the service manager asked for (`WATCHDOG_USEC`, for this process only).
    pub fn new() -> Self {
        Self {
            active: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled(),
            status: String::new(),
        }
    }

    /// Whether a service manager listens: without one, nothing is worth preparing for it.
    pub fn active(&self) -> bool {
        self.active
    }

    /// How often to send keep-alives: half the watchdog timeout, or never.
    pub fn keepalive_every(&self) -> Option<Duration> {
        self.watchdog
            .map(|w| (w / 2).max(Duration::from_millis(10)))
    }

    fn notify(states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            tracing::debug!("sd_notify: {e}");
        }
    }

    /// farmd serves (or has finished reloading).
    pub fn ready(&mut self, status: String) {
        self.status = status;
        Self::notify(&[NotifyState::Ready, NotifyState::Status(&self.status)]);
    }

    pub fn reloading(&self) {
        let mut states = vec![NotifyState::Reloading];
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        Self::notify(&states);
    }

    pub fn stopping(&self, why: &str) {
        Self::notify(&[NotifyState::Stopping, NotifyState::Status(why)]);
    }

    /// The status line, sent only when it changed.
    pub fn status(&mut self, status: String) {
        if status != self.status {
            self.status = status;
            Self::notify(&[NotifyState::Status(&self.status)]);
        }
    }

    /// The main loop is making progress.
    /// Another process (an in-place upgrade's new farmd) is the service's main process now.
    pub fn main_pid(&self, pid: u32) {
        Self::notify(&[
            NotifyState::MainPid(pid),
            NotifyState::Status("handed over to a new farmd (in-place upgrade)"),
        ]);
    }

    pub fn keepalive(&self) {
        Self::notify(&[NotifyState::Watchdog]);
    }
}
