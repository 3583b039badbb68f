//! Wall-clock time as a port, so tests can move it by hand.
//!
//! Durable timers (sleeps, retry backoff, timeouts) are stored as unix
//! milliseconds, so the clock speaks wall-clock time.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, watch};

pub type ClockFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

pub trait Clock: Send + Sync + 'static {
    /// Now, in unix milliseconds.
    fn now_ms(&self) -> i64;
    /// Resolves once `now_ms() >= at_ms`.
    fn sleep_until(&self, at_ms: i64) -> ClockFuture;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
    }

    fn sleep_until(&self, at_ms: i64) -> ClockFuture {
        let wait = at_ms.saturating_sub(self.now_ms()).max(0) as u64;
        Box::pin(tokio::time::sleep(Duration::from_millis(wait)))
    }
}

/// A clock that only moves when told to. Tests use it to run retries,
/// timeouts and hour-long sleeps without waiting.
#[derive(Clone, Default)]
pub struct ManualClock {
    inner: Arc<ManualInner>,
}

struct ManualInner {
    state: Mutex<ManualState>,
    /// Bumped whenever a sleeper registers.
    generation: watch::Sender<u64>,
}

impl Default for ManualInner {
    fn default() -> Self {
        Self { state: Mutex::default(), generation: watch::channel(0).0 }
    }
}

#[derive(Default)]
struct ManualState {
    now: i64,
    next_id: u64,
    sleepers: BTreeMap<(i64, u64), oneshot::Sender<()>>,
}

impl ManualClock {
    pub fn new(start_ms: i64) -> Self {
        let clock = Self::default();
        clock.inner.state.lock().expect("clock lock").now = start_ms;
        clock
    }

    /// Moves time forward and wakes every sleeper that is due.
    pub fn advance(&self, by: Duration) {
        let mut st = self.inner.state.lock().expect("clock lock");
        st.now = st.now.saturating_add(by.as_millis() as i64);
        let now = st.now;
        while let Some(entry) = st.sleepers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let _ = entry.remove().send(());
        }
    }

    /// Moves time to `at_ms` if that is in the future.
    pub fn advance_to(&self, at_ms: i64) {
        let now = self.now_ms();
        if at_ms > now {
            self.advance(Duration::from_millis((at_ms - now) as u64));
        }
    }

    /// The earliest pending deadline, dropping sleepers nobody waits for.
    pub fn next_deadline(&self) -> Option<i64> {
        let mut st = self.inner.state.lock().expect("clock lock");
        st.sleepers.retain(|_, tx| !tx.is_closed());
        st.sleepers.keys().next().map(|k| k.0)
    }

    /// The earliest pending deadline, waiting until some task sleeps on
    /// this clock. Tests advance to it: time then moves only when the code
    /// under test waits for time.
    pub async fn next_sleeper(&self) -> i64 {
        let mut generation = self.inner.generation.subscribe();
        loop {
            generation.borrow_and_update();
            if let Some(deadline) = self.next_deadline() {
                return deadline;
            }
            if generation.changed().await.is_err() {
                return i64::MAX;
            }
        }
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.inner.state.lock().expect("clock lock").now
    }

    fn sleep_until(&self, at_ms: i64) -> ClockFuture {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.inner.state.lock().expect("clock lock");
            if at_ms <= st.now {
                return Box::pin(async {});
            }
            let id = st.next_id;
            st.next_id += 1;
            st.sleepers.insert((at_ms, id), tx);
        }
        self.inner.generation.send_modify(|g| *g += 1);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_clock_wakes_due_sleepers_only() {
        let clock = ManualClock::new(1_000);
        let early = clock.sleep_until(1_500);
        let late = clock.sleep_until(5_000);
        assert_eq!(clock.next_deadline(), Some(1_500));
        clock.advance(Duration::from_millis(600));
        early.await;
        assert_eq!(clock.next_deadline(), Some(5_000));
        assert_eq!(clock.next_sleeper().await, 5_000);
        clock.advance_to(5_000);
        late.await;
        assert_eq!(clock.now_ms(), 5_000);
    }
}
