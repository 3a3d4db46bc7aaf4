//! The dispatch log: each turn's outcomes, receipts and incoming messages are sealed and written
//! by a thread of their own in group commits ([`log_writer`]), and folded into the database in
//! one transaction every [`APPLY_EVERY`] ([`apply_log`]). At start, what a crash left in the log
//! is applied before anything reads the queue ([`Dispatcher::open_log`]).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::inbound::log_mo;
use super::{Dispatcher, Signal, now};
use crate::reply::ReportRequests;
use crate::store::wal::Wal;
use crate::store::{DispatchCommit, Store};

/// A step in the dispatch log, on its way into the database.
pub(super) struct Logged {
    pub seq: u64,
    pub step: DispatchCommit,
    /// Scheduled message ids it settles: the dispatcher may take them again only once the step
    /// is applied (until then the scheduled table still lists them).
    pub scheduled: Vec<u64>,
}

pub(super) type SharedWal = Arc<std::sync::Mutex<crate::store::wal::Wal>>;

/// Logged steps are applied to the database at most this often, in one transaction: a commit
/// costs the same for ten messages as for a thousand, and a receipt that comes in the same
/// group as its message's submission is applied with it in one write.
const APPLY_EVERY: Duration = Duration::from_millis(100);

/// After a write of fewer than [`GATHER_BELOW`] steps, the log writer lets the next group
/// gather this long. Each synchronous write costs the processor about 80 µs here (most of it
/// the kernel's and the virtual disk's), the same for one step as for ten: writing back to back
/// under load took a third of smsdrop's CPU from the two cores it shares with the SMSC. With the
/// pause, CPU per 1,000 messages fell from 49–58 ms to 35–50 ms and the rate rose (dispatch
/// benchmark); a lone message waits 150 µs more.
const GATHER: Duration = Duration::from_micros(150);
const GATHER_BELOW: usize = 4;

/// Step numbers skipped at each start (see `open_log`).
const RESTART_GAP: u64 = 1 << 20;

impl Dispatcher {
    /// Opens the dispatch log and applies what a crash left in it, before anything reads the
    /// queue; retries until it can or `shutdown`. Returns the log and the next step number.
    pub(super) async fn open_log(
        &self,
        shutdown: &CancellationToken,
        mut first: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    ) -> Option<(SharedWal, u64)> {
        loop {
            let (store, dir, reports) = (self.store.clone(), self.config.state_dir.clone(), self.reports.clone());
            let opened = tokio::task::spawn_blocking(move || -> Result<(Wal, u64), String> {
                let announcer = store.clone();
                let announce = Box::new(move |seq| announcer.wal_announce(seq));
                let (mut wal, records) =
                    Wal::open(&dir, store.keys().system(), announce).map_err(|e| format!("dispatch log: {e}"))?;
                let mut steps = Vec::with_capacity(records.len());
                for (seq, plain) in records {
                    match postcard::from_bytes::<DispatchCommit>(&plain) {
                        Ok(step) => steps.push((seq, step)),
                        Err(e) => tracing::error!(seq, error = %e, "a dispatch log record does not decode; skipped"),
                    }
                }
                if !steps.is_empty() {
                    let done = store.apply_logged(&steps, now()).map_err(|e| e.to_string())?;
                    tracing::info!(
                        steps = steps.len(),
                        "dispatch steps logged before the last stop applied"
                    );
                    for b in done.finished {
                        let _ = reports.send(b.id);
                    }
                }
                let applied = store
                    .mark(crate::store::Mark::WalApplied)
                    .map_err(|e| e.to_string())?
                    .unwrap_or(0);
                wal.reset_if_applied(wal.last.max(applied), true);
                // Past a gap: a group write cut short by a crash may have left a later step
                // of its group on the disk without an earlier one (never acknowledged, and not
                // read back, since reading stops at the first record that does not open); the
                // steps written from now on must not run into it with numbers that still grow.
                let next = wal.last.max(applied) + 1 + RESTART_GAP;
                Ok((wal, next))
            })
            .await;
            match opened {
                Ok(Ok((wal, next))) => {
                    if let Some(first) = first.take() {
                        let _ = first.send(Ok(()));
                    }
                    return Some((Arc::new(std::sync::Mutex::new(wal)), next));
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot open the dispatch log; nothing is sent until it opens");
                    if let Some(first) = first.take() {
                        let _ = first.send(Err(e));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "dispatch log task failed");
                    if let Some(first) = first.take() {
                        let _ = first.send(Err(e.to_string()));
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }
}

/// Writes the steps the dispatcher hands it to the dispatch log until the dispatcher closes
/// `steps`: every step waiting when a write begins goes in that one synchronous write, and the
/// last step number goes back once it is durable; after a small group it waits [`GATHER`]. Steps that cannot be written are written
/// again at their place, every half second: the later ones wait for them.
pub(super) fn log_writer(
    wal: SharedWal,
    mut steps: tokio::sync::mpsc::UnboundedReceiver<(u64, Vec<u8>)>,
    durable: tokio::sync::mpsc::UnboundedSender<u64>,
) {
    let mut group: Vec<(u64, Vec<u8>)> = Vec::new();
    while let Some(first) = steps.blocking_recv() {
        group.push(first);
        while let Ok(more) = steps.try_recv() {
            group.push(more);
        }
        loop {
            let written = wal
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .append_group(&group);
            match written {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(error = %e, steps = group.len(), "cannot write the dispatch log; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        if let Some((last, _)) = group.last() {
            let _ = durable.send(*last);
        }
        if group.len() < GATHER_BELOW {
            std::thread::sleep(GATHER);
        }
        group.clear();
    }
}

/// Applies logged dispatch steps to the database, as many at a time as have gathered, until
/// `logged` closes and everything is applied. Batches now final get their report; scheduled
/// ids the steps settled go back to the dispatcher.
pub(super) async fn apply_log(
    store: Store,
    wake: Arc<Signal>,
    wal: SharedWal,
    reports: ReportRequests,
    mut logged: tokio::sync::mpsc::UnboundedReceiver<Logged>,
    applied: tokio::sync::mpsc::UnboundedSender<Vec<u64>>,
) {
    let mut buffer: Vec<Logged> = Vec::new();
    let mut last = tokio::time::Instant::now();
    loop {
        if buffer.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep_until(last + APPLY_EVERY) => {}
                _ = wake.hurry.notified() => {}
            }
            match logged.recv().await {
                Some(l) => buffer.push(l),
                None => break,
            }
        }
        while buffer.len() < 4096 {
            match logged.try_recv() {
                Ok(l) => buffer.push(l),
                Err(_) => break,
            }
        }
        last = tokio::time::Instant::now();
        let (store, wal) = (store.clone(), wal.clone());
        let task = tokio::task::spawn_blocking(move || {
            let steps: Vec<(u64, DispatchCommit)> = buffer
                .iter_mut()
                .map(|l| (l.seq, std::mem::take(&mut l.step)))
                .collect();
            let result = store.apply_logged(&steps, now());
            if result.is_ok() {
                let last = buffer.last().map(|l| l.seq).unwrap_or(0);
                if let Ok(mut w) = wal.lock() {
                    w.reset_if_applied(last, false);
                }
            }
            (result, buffer, steps)
        });
        let Ok((result, taken, steps)) = task.await else {
            tracing::error!("dispatch log applier failed");
            break;
        };
        match result {
            Ok(done) => {
                if let Some(l) = taken.last() {
                    wake.applied(l.seq);
                }
                for b in done.finished {
                    tracing::info!(tenant = %b.tenant, batch = b.id, "every message of the batch is final");
                    let _ = reports.send(b.id);
                }
                for (mo, outcome) in steps.iter().flat_map(|(_, s)| s.mos.iter()).zip(done.mos) {
                    log_mo(mo, &outcome);
                }
                let ids: Vec<u64> = taken.into_iter().flat_map(|l| l.scheduled).collect();
                if !ids.is_empty() {
                    let _ = applied.send(ids);
                }
                buffer = Vec::new();
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot apply logged dispatch steps; retrying (they are safe in the log)");
                buffer = taken;
                for (l, (_, step)) in buffer.iter_mut().zip(steps) {
                    l.step = step;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
