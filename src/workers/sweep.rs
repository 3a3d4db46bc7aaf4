//! The retention sweeper: applies every tenant's `anonymize_after` and `delete_after` in small
//! steps (transactions of at most `store::retention::STEP_CHUNKS` chunks), off the async
//! threads, giving way to ingest ([`Pace`]); records when it ran and what it did (for `status`)
//! and puts each sweep that did something on the audit log.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{Failed, Next, Pace, Worker};
use crate::audit::{Audit, Event};
use crate::config::Live;
use crate::store::retention::Retention;
use crate::store::{Mark, Store};

/// How often the sweeper looks for batches due when nothing was.
pub const EVERY: Duration = Duration::from_secs(2);
/// Steps per round: a million expired messages go in seconds, one small transaction at a time.
pub const STEPS: u64 = 64;

pub struct Sweeper {
    pub store: Store,
    pub config: Live,
    pub audit: Audit,
    pub pace: Pace,
    /// When `SweepAt` was last written: it is written at least once a minute, so that `status`
    /// shows the sweeper alive even when nothing is due.
    pub last_mark: i64,
}

impl Sweeper {
    /// Every tenant's policy, read at each round: a reload changes retention from the next one.
    fn policies(&self) -> Arc<HashMap<String, Retention>> {
        let policies = self
            .config
            .get()
            .tenants
            .values()
            .map(|t| {
                (
                    t.id.clone(),
                    Retention {
                        anonymize_after: t.retention.anonymize_after.map(|d| d.as_secs() as i64),
                        delete_after: t.retention.delete_after.as_secs() as i64,
                    },
                )
            })
            .collect();
        Arc::new(policies)
    }
}

impl Worker for Sweeper {
    fn name(&self) -> &'static str {
        "sweeper"
    }

    async fn work(&mut self) -> Result<Next, Failed> {
        let now = crate::clock::now();
        let policies = self.policies();
        let mark = now - self.last_mark >= 60;
        let budget = self.pace.budget();
        let give_way = self.pace.give_way();
        let swept = self
            .store
            .blocking(move |s| {
                let swept = s.sweep(&policies, now, budget, &give_way)?;
                if swept.steps > 0 || mark {
                    s.set_mark(Mark::SweepAt, now.max(0) as u64)?;
                }
                Ok(swept)
            })
            .await
            .map_err(Failed::new)?;
        if mark || swept.steps > 0 {
            self.last_mark = now;
        }
        if swept.steps > 0 {
            tracing::info!(
                anonymized = swept.anonymized_messages,
                deleted = swept.deleted_messages,
                batches_deleted = swept.deleted_batches,
                "retention sweep"
            );
            self.audit.record(
                Event::new("retention.sweep", "smsdrop")
                    .detail("anonymized_messages", swept.anonymized_messages)
                    .detail("deleted_messages", swept.deleted_messages)
                    .detail("deleted_batches", swept.deleted_batches),
            );
        }
        Ok(self.pace.next(swept.steps, budget))
    }
}
