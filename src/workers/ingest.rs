//! The ingest worker: one claimed file at a time, on a blocking thread, through
//! [`crate::ingest`] into the store; a file whose ingest failed (a full disk, say) is taken
//! again later ([`Retries`]). At start, claims whose spool file is gone are forgotten
//! ([`forget_stale_claims`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::task::TaskTracker;

use crate::alert::Alerter;
use crate::audit::Audit;
use crate::config::{Config, Live};
use crate::dispatch::Signal;
use crate::ingest::{IngestError, Ingestor};
use crate::store::Store;
use crate::watch::Claimed;

/// What the ingest worker works with.
pub struct IngestWorker {
    pub store: Store,
    pub live: Live,
    pub alerts: Alerter,
    pub audit: Audit,
    /// Rung after each file: the dispatcher reads the batches again.
    pub wake: Arc<Signal>,
    /// Set while a batch is being ingested: the sweeper and the re-sealer give way.
    pub ingesting: Arc<AtomicBool>,
    /// Set at a stop: the batch being ingested is cut short (redone from the spool at next start).
    pub cancel: Arc<AtomicBool>,
}

impl IngestWorker {
    /// Runs on a blocking thread of `tracker` until `claimed` closes or a stop: what the last
    /// stop left first, then what the watcher and SFTP claim, and failed files again later
    /// ([`Retries`]).
    pub fn spawn(self, tracker: &TaskTracker, mut claimed: UnboundedReceiver<Claimed>, recovered: Vec<Claimed>) {
        tracker.spawn_blocking(move || {
            let w = self;
            let ingestor = Ingestor {
                store: &w.store,
                cancel: &w.cancel,
                alerts: &w.alerts,
                audit: &w.audit,
            };
            let mut queue: VecDeque<Claimed> = recovered.into();
            let mut later = Retries::default();
            let runtime = tokio::runtime::Handle::current();
            loop {
                let next = match queue.pop_front().or_else(|| later.due()) {
                    Some(c) => c,
                    None => match runtime.block_on(tokio::time::timeout(later.wait(), claimed.recv())) {
                        Ok(Some(c)) => c,
                        Ok(None) => break,
                        Err(_) => continue, // a retry is due
                    },
                };
                if w.cancel.load(Ordering::Relaxed) {
                    break;
                }
                w.ingesting.store(true, Ordering::Relaxed);
                let failed = !ingest_one(&ingestor, &w.live.get(), &next);
                w.ingesting.store(false, Ordering::Relaxed);
                if failed {
                    later.push(next);
                } else {
                    later.done(&next.claim);
                }
                w.wake.poke();
            }
        });
    }
}

/// Claims whose spool file is gone: the batch finished (or a partial one was abandoned by hand).
pub fn forget_stale_claims(store: &Store, recovered: &[Claimed]) {
    let Ok(claims) = store.claims() else { return };
    for claim in claims.iter().filter(|c| !recovered.iter().any(|r| &r.claim == *c)) {
        let result = store.batch_by_claim(claim).and_then(|batch| match batch {
            Some(b) if b.state == crate::store::records::BatchState::Ingesting => store.discard_batch(&b),
            _ => store.forget_claim(claim),
        });
        if let Err(e) = result {
            tracing::warn!(claim = %claim, error = %e, "cannot forget a stale claim");
        }
    }
}

/// Spool files whose ingest failed (the store or the outbox could not be written: a full disk,
/// say), taken again later, each after 5 s, then twice as long each time up to a minute. Taken
/// again as after a crash: a batch cut short is discarded, a committed one only published.
#[derive(Default)]
struct Retries {
    waiting: Vec<(tokio::time::Instant, Claimed)>,
    delays: HashMap<String, Duration>,
}

impl Retries {
    const FIRST: Duration = Duration::from_secs(5);
    const MAX: Duration = Duration::from_secs(60);

    fn push(&mut self, mut claimed: Claimed) {
        let delay = self.delays.entry(claimed.claim.clone()).or_insert(Self::FIRST / 2);
        *delay = (*delay * 2).min(Self::MAX);
        tracing::warn!(
            tenant = %claimed.tenant, file = %claimed.file_name,
            "the file stays in the spool and is taken again in {} s", delay.as_secs()
        );
        claimed.recovered = true;
        self.waiting.push((tokio::time::Instant::now() + *delay, claimed));
    }

    fn done(&mut self, claim: &str) {
        self.delays.remove(claim);
    }

    /// The first retry that is due, if any.
    fn due(&mut self) -> Option<Claimed> {
        let now = tokio::time::Instant::now();
        let i = self.waiting.iter().position(|(at, _)| *at <= now)?;
        Some(self.waiting.swap_remove(i).1)
    }

    /// How long until the next retry is due (a long nap when none waits).
    fn wait(&self) -> Duration {
        let now = tokio::time::Instant::now();
        self.waiting
            .iter()
            .map(|(at, _)| at.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(3600))
    }
}

/// Ingests one claimed file; `false` when it failed and should be taken again later.
fn ingest_one(ingestor: &Ingestor<'_>, config: &Config, claimed: &Claimed) -> bool {
    let Some(tenant) = config.tenants.get(&claimed.tenant) else {
        tracing::error!(tenant = %claimed.tenant, file = %claimed.file_name, "spool file of a tenant no longer configured; left in place");
        return true;
    };
    let result = if claimed.recovered {
        ingestor.recover_claim(tenant, &claimed.spool, &claimed.claim, &claimed.file_name)
    } else {
        ingestor.ingest_claimed(tenant, &claimed.spool, &claimed.claim, &claimed.file_name)
    };
    match result {
        Ok(batch) => crate::metrics::events().batch(&crate::metrics::BatchCounts {
            tenant: &batch.tenant,
            file_reason: batch.file_reason,
            accepted: batch.accepted,
            rejected: batch.rejected,
            reasons: &batch.reasons,
        }),
        Err(IngestError::Cancelled) => {
            tracing::info!(tenant = %tenant.id, file = %claimed.file_name, "ingest cut short by shutdown; resumed at next start")
        }
        Err(e) => {
            tracing::error!(tenant = %tenant.id, file = %claimed.file_name, error = %e, "cannot ingest the file");
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimed(claim: &str) -> Claimed {
        Claimed {
            tenant: "acme".into(),
            spool: std::path::PathBuf::from("/nonexistent"),
            claim: claim.into(),
            file_name: "june.csv".into(),
            recovered: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_file_is_retried_after_5_s_then_twice_as_long_up_to_a_minute() {
        let mut retries = Retries::default();
        let mut waits = Vec::new();
        for _ in 0..6 {
            retries.push(claimed("c1"));
            let wait = retries.wait();
            waits.push(wait.as_secs());
            tokio::time::advance(wait - Duration::from_millis(1)).await;
            assert!(retries.due().is_none(), "not due a millisecond early");
            tokio::time::advance(Duration::from_millis(1)).await;
            let due = retries.due().expect("due on time");
            assert!(due.recovered, "a retry is taken as after a crash");
        }
        assert_eq!(waits, [5, 10, 20, 40, 60, 60]);
        // Once the file went through, its next failure starts again at 5 s; others keep theirs.
        retries.push(claimed("c2"));
        retries.done("c1");
        retries.push(claimed("c1"));
        assert_eq!(retries.wait(), Duration::from_secs(5));
        assert_eq!(retries.waiting.len(), 2);
        assert_eq!(
            Retries::default().wait(),
            Duration::from_secs(3600),
            "a long nap when none waits"
        );
    }
}
