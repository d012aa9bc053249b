//! Time comes from one injected clock so that tests can move time forward instead of sleeping,
//! and so that every timestamp the broker stores (received_at, idempotency windows, retention
//! ages) is computed the same way in production and in tests.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (UTC). The broker stores every time as one of these.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The number of milliseconds since the Unix epoch.
    pub fn as_ms(self) -> u64 {
        self.0
    }

    /// This time plus `ms` milliseconds, saturating rather than wrapping.
    pub fn plus_ms(self, ms: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self`, or zero when `earlier` is later.
    pub fn ms_since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// The time as RFC 3339 in UTC with millisecond precision, e.g. `2026-11-22T17:19:57.123Z`.
    ///
    /// Written by hand (civil-from-days) because it is the only calendar arithmetic the core
    /// needs and a date crate would be a large dependency for one formatter.
    pub fn to_rfc3339(self) -> String {
        let ms = self.0 % 1000;
        let secs = self.0 / 1000;
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let mo = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(mo <= 2);
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{ms:03}Z")
    }
}

impl Timestamp {
    /// Parses RFC 3339 (`2026-11-22T17:19:57Z`, `...57.123+01:00`); fractions beyond
    /// milliseconds are truncated. Returns `None` for anything else.
    pub fn parse_rfc3339(s: &str) -> Option<Timestamp> {
        let b = s.as_bytes();
        if b.len() < 20
            || b[4] != b'-'
            || b[7] != b'-'
            || !matches!(b[10], b'T' | b't' | b' ')
            || b[13] != b':'
            || b[16] != b':'
        {
            return None;
        }
        let num = |r: std::ops::Range<usize>| -> Option<i64> {
            let part = s.get(r)?;
            if part.bytes().all(|c| c.is_ascii_digit()) {
                part.parse().ok()
            } else {
                None
            }
        };
        let (y, mo, d, h, mi, sec) = (
            num(0..4)?,
            num(5..7)?,
            num(8..10)?,
            num(11..13)?,
            num(14..16)?,
            num(17..19)?,
        );
        if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
            return None;
        }
        let mut i = 19;
        let mut ms = 0i64;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if i == start {
                return None;
            }
            let frac = &s[start..i.min(start + 3)];
            ms = frac.parse::<i64>().ok()? * 10i64.pow(3 - frac.len() as u32);
        }
        let offset_min = match b.get(i) {
            Some(b'Z' | b'z') if i + 1 == b.len() => 0,
            Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
                let m = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
                if *sign == b'+' {
                    m
                } else {
                    -m
                }
            }
            _ => return None,
        };
        // days_from_civil (Howard Hinnant).
        let yy = if mo <= 2 { y - 1 } else { y };
        let era = yy.div_euclid(400);
        let yoe = yy - era * 400;
        let doy = (153 * ((mo + 9) % 12) + 2) / 5 + d - 1;
        let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
        let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
        u64::try_from(secs * 1000 + ms).ok().map(Timestamp)
    }
}

/// What [`Clock::sleep_until`] returns: a future that completes when the clock reads a time.
pub type ClockSleep<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A source of the current time. The broker asks it and nothing else.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;

    /// Completes once this clock reads `at` or later (at once when it already does). The broker
    /// waits with it for something that falls due by time, e.g. a long-poll for a retry delay
    /// or a lease to run out.
    ///
    /// The default sleeps in real (monotonic) time for as long as this clock says is left, which
    /// is right for a clock that moves with real time. If the clock steps meanwhile it may end
    /// early or late: callers look at the time again when it ends, and bound their wait by
    /// their own deadline. A clock that moves otherwise (see [`ManualClock`]) overrides it.
    fn sleep_until(&self, at: Timestamp) -> ClockSleep<'_> {
        let left = Duration::from_millis(at.ms_since(self.now()));
        Box::pin(tokio::time::sleep(left))
    }
}

/// The real wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Timestamp(ms)
    }
}

/// A clock that only moves when told to; cheap to clone, all clones share one time.
///
/// Its [`Clock::sleep_until`] ends when the clock is moved to or past the time waited for, and
/// never by itself: a test that moves the clock wakes whoever waits for that time, with no real
/// time passing and no race.
#[derive(Clone, Debug)]
pub struct ManualClock {
    now_ms: Arc<AtomicU64>,
    /// Notified whenever the time is moved or set.
    moved: Arc<Notify>,
}

impl ManualClock {
    /// A clock that starts at `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            now_ms: Arc::new(AtomicU64::new(start.0)),
            moved: Arc::new(Notify::new()),
        }
    }

    /// Moves the clock forward by `ms` milliseconds.
    pub fn advance_ms(&self, ms: u64) {
        self.now_ms.fetch_add(ms, Ordering::SeqCst);
        self.moved.notify_waiters();
    }

    /// Sets the clock to `t`, which may be earlier than now (tests of clock steps need that).
    pub fn set(&self, t: Timestamp) {
        self.now_ms.store(t.0, Ordering::SeqCst);
        self.moved.notify_waiters();
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.now_ms.load(Ordering::SeqCst))
    }

    fn sleep_until(&self, at: Timestamp) -> ClockSleep<'_> {
        Box::pin(async move {
            loop {
                // Registered before the time is read, so that a move in between is not missed.
                let moved = self.moved.notified();
                tokio::pin!(moved);
                moved.as_mut().enable();
                if self.now() >= at {
                    return;
                }
                moved.await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_instants() {
        let check = |ms: u64, want: &str| assert_eq!(Timestamp(ms).to_rfc3339(), want);
        check(0, "1970-01-01T00:00:00.000Z");
        check(951_782_400_000, "2000-02-29T00:00:00.000Z");
        check(1_614_265_330_000, "2021-02-25T15:02:10.000Z");
        check(1_795_368_000_123, "2026-11-22T17:20:00.123Z");
    }

    #[test]
    fn rfc3339_parses_what_it_formats_and_offsets() {
        for ms in [0u64, 951_782_400_000, 1_795_368_000_123] {
            assert_eq!(
                Timestamp::parse_rfc3339(&Timestamp(ms).to_rfc3339()),
                Some(Timestamp(ms))
            );
        }
        assert_eq!(
            Timestamp::parse_rfc3339("2021-02-25T16:02:10+01:00"),
            Some(Timestamp(1_614_265_330_000))
        );
        assert_eq!(
            Timestamp::parse_rfc3339("2021-02-25T15:02:10.5Z"),
            Some(Timestamp(1_614_265_330_500))
        );
        for bad in [
            "",
            "yesterday",
            "2021-02-25",
            "2021-13-01T00:00:00Z",
            "2021-02-25T15:02:10",
            "2021-02-25T15:02:10.Z",
        ] {
            assert_eq!(Timestamp::parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(Timestamp(1000));
        let c2 = c.clone();
        assert_eq!(c.now(), Timestamp(1000));
        c2.advance_ms(500);
        assert_eq!(c.now(), Timestamp(1500));
    }

    #[tokio::test]
    async fn manual_clock_sleep_ends_when_the_clock_is_moved_past_its_time() {
        let c = ManualClock::new(Timestamp(1000));
        c.sleep_until(Timestamp(900)).await;
        let sleeper = {
            let c = c.clone();
            tokio::spawn(async move { c.sleep_until(Timestamp(2000)).await })
        };
        c.advance_ms(500);
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished(), "1500 is not 2000 yet");
        c.advance_ms(500);
        tokio::time::timeout(Duration::from_secs(10), sleeper)
            .await
            .expect("woken by the move")
            .unwrap();
    }
}
