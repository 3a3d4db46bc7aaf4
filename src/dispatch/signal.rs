//! The dispatcher's doorbell: batches changed, and how far the dispatch log is applied.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// Tells the dispatcher that batches changed (queued, released, canceled), and lets an
/// operator's command wait until what the dispatcher logged is in the database.
#[derive(Debug, Default)]
pub struct Signal {
    pub(super) notify: Notify,
    pub(super) refresh: AtomicBool,
    /// The last dispatch step logged.
    logged: std::sync::atomic::AtomicU64,
    /// The last dispatch step applied to the database.
    applied: std::sync::Mutex<u64>,
    applied_moved: std::sync::Condvar,
    /// Asks the applier not to wait for its interval.
    pub(super) hurry: Notify,
}

impl Signal {
    /// The dispatcher re-reads the active batches before its next step.
    pub fn poke(&self) {
        self.refresh.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// Waits (at most `timeout`) until every step logged so far is applied: `batch cancel`
    /// then sees the outcomes the partners already gave, instead of canceling a message a
    /// partner has delivered. Returns whether they are applied.
    pub fn settle(&self, timeout: Duration) -> bool {
        let target = self.logged.load(Ordering::Acquire);
        let applied = self.applied.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if *applied >= target {
            return true;
        }
        self.hurry.notify_one();
        let (applied, _) = self
            .applied_moved
            .wait_timeout_while(applied, timeout, |a| *a < target)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *applied >= target
    }

    pub(super) fn logged(&self, seq: u64) {
        self.logged.store(seq, Ordering::Release);
    }

    pub(super) fn applied(&self, seq: u64) {
        let mut applied = self.applied.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *applied = (*applied).max(seq);
        self.applied_moved.notify_all();
    }
}
