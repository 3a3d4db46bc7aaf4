//! The re-sealer: after `key rotate`, re-seals every record under the new generations in small
//! steps (of `store::reseal::STEP_RECORDS` records), giving way to ingest like the sweeper
//! ([`Pace`]), and puts each finished pass on the audit log.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Failed, Next, Pace, Worker};
use crate::audit::{Audit, Event};
use crate::store::Store;
use crate::store::reseal::Resealer as Cursor;

/// How often the re-sealer looks for a rotation to follow up.
pub const EVERY: Duration = Duration::from_secs(2);
/// Steps per round while a pass is under way.
pub const STEPS: u64 = 16;

pub struct Resealer {
    pub store: Store,
    pub audit: Audit,
    pub pace: Pace,
    /// Where the pass under way is (moved into the store's blocking call and back).
    pub cursor: Arc<Mutex<Cursor>>,
}

impl Worker for Resealer {
    fn name(&self) -> &'static str {
        "resealer"
    }

    async fn work(&mut self) -> Result<Next, Failed> {
        let budget = self.pace.budget();
        let (give_way, cursor) = (self.pace.give_way(), self.cursor.clone());
        let look = self
            .store
            .blocking(move |s| {
                let mut cursor = cursor.lock().unwrap_or_else(|p| p.into_inner());
                s.reseal(&mut cursor, budget, &give_way)
            })
            .await
            .map_err(Failed::new)?;
        if look.finished {
            let progress = self.store.reseal_progress();
            tracing::info!(
                examined = progress.examined,
                resealed = progress.resealed,
                damaged = progress.damaged,
                generations_destroyed = look.dropped,
                "re-seal pass over"
            );
            self.audit.record(
                Event::new("key.reseal", "smsdrop")
                    .detail("examined", progress.examined)
                    .detail("resealed", progress.resealed)
                    .detail("damaged", progress.damaged)
                    .detail("generations_destroyed", look.dropped),
            );
            return Ok(Next::Idle(EVERY));
        }
        if look.dropped > 0 {
            tracing::info!(
                generations_destroyed = look.dropped,
                "the system's older key generation destroyed"
            );
            self.audit
                .record(Event::new("key.reseal", "smsdrop").detail("generations_destroyed", look.dropped));
            return Ok(Next::Idle(EVERY));
        }
        Ok(self.pace.next(look.steps, budget))
    }
}
