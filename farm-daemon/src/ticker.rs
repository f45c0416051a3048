//! Periodic timers on the kernel's clock (`timerfd`), for the ticks an idle farmd is made of.
//!
//! tokio's timer wheel files a deadline by the bits it shares with the current time: a deadline
//! past the next 64 ms boundary sits on the wheel's second level and the runtime wakes at that
//! boundary to move it down, then again at the deadline. A 50 ms heartbeat tick crosses a
//! boundary on most periods, so each such timer cost up to two wake-ups per period (measured:
//! the main loop of an idle member woke ~55 times a second for 20 heartbeat ticks). A
//! `timerfd` is one kernel timer: the thread wakes once, when it is due.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use tokio::io::unix::AsyncFd;

#[derive(Debug, thiserror::Error)]
pub enum TickerError {
    #[error("creating a timer (timerfd_create): {0}")]
    Create(io::Error),
    #[error("setting a timer (timerfd_settime): {0}")]
    Set(io::Error),
    #[error("registering a timer with the runtime: {0}")]
    Register(io::Error),
}

/// A periodic tick: first due one period after it is made (or reset), then every period. Ticks
/// missed while the thread was busy are not made up: the next `tick` returns once, and the
/// period goes on from the schedule (tokio's `MissedTickBehavior::Skip`).
pub struct Ticker {
    fd: AsyncFd<OwnedFd>,
    period: Duration,
    /// When the next expiration is due, on the kernel's schedule.
    next: Instant,
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

impl Ticker {
    /// A ticker of `period` (at least a microsecond); must be called inside a tokio runtime.
    pub fn new(period: Duration) -> Result<Self, TickerError> {
        // SAFETY: plain system call; the descriptor it returns is owned below.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(TickerError::Create(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a descriptor just created and owned by nobody else.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the OwnedFd is moved into the AsyncFd, which keeps it open and returns the
        // same descriptor for as long as it lives.
        let fd = unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
            .map_err(|e| TickerError::Register(e.into_parts().1))?;
        let period = period.max(Duration::from_micros(1));
        let mut t = Self {
            fd,
            period,
            next: Instant::now(),
        };
        t.reset_after(period)?;
        Ok(t)
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    /// Next tick `after` from now, then every period.
    pub fn reset_after(&mut self, after: Duration) -> Result<(), TickerError> {
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: timespec(self.period),
            it_value: timespec(after),
        };
        self.next = Instant::now() + after;
        // SAFETY: a valid descriptor and a valid itimerspec; the old value is not asked for.
        let r =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r < 0 {
            return Err(TickerError::Set(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// A new period, the next tick one period from now.
    pub fn set_period(&mut self, period: Duration) -> Result<(), TickerError> {
        self.period = period.max(Duration::from_micros(1));
        self.reset_after(self.period)
    }

    /// Waits for the next tick; returns when it was due (later ones missed meanwhile skipped).
    pub async fn tick(&mut self) -> Instant {
        loop {
            let Ok(mut guard) = self.fd.readable().await else {
                // The runtime is shutting down: never ready again.
                return std::future::pending().await;
            };
            let mut buf = [0u8; 8];
            // SAFETY: reads 8 bytes into an 8-byte buffer from a valid descriptor.
            let n = unsafe {
                libc::read(
                    guard.get_inner().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n == 8 {
                let expirations = u64::from_ne_bytes(buf).max(1);
                let missed = u32::try_from(expirations - 1).unwrap_or(u32::MAX);
                let due = self.next + self.period.saturating_mul(missed);
                self.next = due + self.period;
                return due;
            }
            // EAGAIN (woken early, or reset meanwhile): wait again.
            guard.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ticks_at_the_period_and_skips_what_was_missed() {
        let mut t = Ticker::new(Duration::from_millis(20)).unwrap();
        let start = Instant::now();
        let due = t.tick().await;
        assert!(due >= start && Instant::now() >= start + Duration::from_millis(19));
        // Busy for several periods: one tick returns for them all, then the schedule goes on.
        std::thread::sleep(Duration::from_millis(75));
        let late = t.tick().await;
        assert!(
            late >= due + Duration::from_millis(60),
            "the latest missed expiration"
        );
        let next = t.tick().await;
        let gap = next.duration_since(late);
        assert!(
            gap >= Duration::from_millis(20) && gap.as_micros() % 20_000 == 0,
            "on the period's schedule: {gap:?}"
        );
    }

    #[tokio::test]
    async fn a_reset_moves_the_next_tick() {
        let mut t = Ticker::new(Duration::from_millis(10)).unwrap();
        t.reset_after(Duration::from_millis(60)).unwrap();
        let start = Instant::now();
        t.tick().await;
        assert!(start.elapsed() >= Duration::from_millis(55));
        t.set_period(Duration::from_millis(30)).unwrap();
        assert_eq!(t.period(), Duration::from_millis(30));
        let start = Instant::now();
        t.tick().await;
        assert!(start.elapsed() >= Duration::from_millis(28));
    }
}
