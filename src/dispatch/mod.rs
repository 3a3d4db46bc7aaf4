//! The way out: takes due messages from the queue in a fair order, routes them, hands them to
//! partners and records what became of them (SPEC §6).
//!
//! Fairness: tenants take turns, and within a tenant its batches take turns, each turn at most
//! [`QUANTUM`] messages. A tenant's million-line batch therefore delays another tenant's ten
//! lines by one turn, not by a million messages, and the same holds between one tenant's urgent
//! and bulk batches. Scheduled messages (`send_at`) are set aside in the store and come back
//! first when due.
//!
//! Each step's outcomes and the batches' cursors are committed in one durable transaction after
//! the partner answered: a crash can resend at most the step that was in flight, never lose one.

pub mod partner;
pub mod receipt;
pub mod sink;
pub mod smpp;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::codes::MessageStatus;
use crate::config::{self, Config};
use crate::reply::ReportRequests;
use crate::store::records::{BatchRecord, CHUNK_MESSAGES, StatusRecord, StoredMessage, message_id, split_message_id};
use crate::store::{DispatchCommit, Store, StoreError};
use partner::{Outbound, Partner, PartnerError, Submitted};

/// Messages one batch may send per turn.
pub const QUANTUM: u64 = 32;
/// Messages per dispatcher step (one durable commit).
const STEP: usize = 1024;
/// Transient failures are retried this many times, with growing delays, before `failed`.
const MAX_ATTEMPTS: u32 = 12;

/// Builds the partners named in the configuration and starts their connections; receipts go to
/// `incoming`.
pub fn build_partners(
    config: &Config,
    incoming: &tokio::sync::mpsc::UnboundedSender<smpp::Inbound>,
    tracker: &tokio_util::task::TaskTracker,
    shutdown: &CancellationToken,
) -> HashMap<String, Arc<dyn Partner>> {
    config
        .partners
        .iter()
        .map(|(id, p)| {
            let partner: Arc<dyn Partner> = match p {
                config::Partner::Sink { path } => Arc::new(sink::SinkPartner::new(id, path)),
                config::Partner::Smpp(cfg) => {
                    let smpp = smpp::SmppPartner::new(id, cfg.clone(), incoming.clone());
                    smpp.start(tracker, shutdown.clone());
                    smpp
                }
            };
            (id.clone(), partner)
        })
        .collect()
}

/// A batch with messages not yet taken.
#[derive(Debug, Clone)]
struct Turn {
    id: u64,
    tenant: String,
    cursor: u64,
    accepted: u64,
}

/// Tenants in turn, and each tenant's batches in turn.
#[derive(Debug, Default)]
struct Rotation {
    tenants: VecDeque<String>,
    batches: HashMap<String, VecDeque<Turn>>,
}

impl Rotation {
    fn rebuild(&mut self, active: Vec<BatchRecord>) {
        let previous: Vec<String> = self.tenants.drain(..).collect();
        self.batches.clear();
        for b in active.into_iter().filter(|b| b.cursor < b.accepted) {
            self.batches.entry(b.tenant.clone()).or_default().push_back(Turn {
                id: b.id,
                tenant: b.tenant,
                cursor: b.cursor,
                accepted: b.accepted,
            });
        }
        // Keep the order tenants had, so a rebuild does not favour anyone.
        for t in previous {
            if self.batches.contains_key(&t) {
                self.tenants.push_back(t);
            }
        }
        let mut new: Vec<&String> = self.batches.keys().filter(|t| !self.tenants.contains(t)).collect();
        new.sort();
        let new: Vec<String> = new.into_iter().cloned().collect();
        self.tenants.extend(new);
    }

    /// Takes up to `budget` (batch, index) pairs, turn by turn.
    fn take(&mut self, mut budget: usize) -> Vec<(u64, String, u64)> {
        let mut picks = Vec::new();
        while budget > 0 {
            let Some(tenant) = self.tenants.pop_front() else { break };
            let Some(queue) = self.batches.get_mut(&tenant) else {
                continue;
            };
            let Some(mut turn) = queue.pop_front() else {
                self.batches.remove(&tenant);
                continue;
            };
            let n = QUANTUM.min(turn.accepted - turn.cursor).min(budget as u64);
            for i in turn.cursor..turn.cursor + n {
                picks.push((turn.id, turn.tenant.clone(), i));
            }
            turn.cursor += n;
            budget -= n as usize;
            if turn.cursor < turn.accepted {
                queue.push_back(turn);
            }
            if queue.is_empty() {
                self.batches.remove(&tenant);
            } else {
                self.tenants.push_back(tenant);
            }
        }
        picks
    }
}

/// Tells the dispatcher that batches changed (queued, released, canceled).
#[derive(Debug, Default)]
pub struct Signal {
    notify: Notify,
    refresh: AtomicBool,
}

impl Signal {
    /// The dispatcher re-reads the active batches before its next step.
    pub fn poke(&self) {
        self.refresh.store(true, Ordering::Release);
        self.notify.notify_one();
    }
}

/// Sends queued messages through partners.
pub struct Dispatcher {
    pub store: Store,
    pub config: Arc<Config>,
    pub partners: HashMap<String, Arc<dyn Partner>>,
    /// Poked when batches change.
    pub wake: Arc<Signal>,
    pub reports: ReportRequests,
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// One message picked for this step.
struct Pick {
    id: u64,
    tenant: String,
    message: StoredMessage,
    /// It came from the scheduled set, with this due time.
    scheduled: Option<i64>,
    attempts: u32,
}

impl Dispatcher {
    /// Runs until `shutdown`; a step under way is finished and committed first.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut rotation = Rotation::default();
        let mut refresh = true;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if self.wake.refresh.swap(false, Ordering::AcqRel) {
                refresh = true;
            }
            if refresh {
                match self.blocking(|s| s.active_batches()).await {
                    Ok(active) => rotation.rebuild(active),
                    Err(e) => tracing::error!(error = %e, "cannot list active batches"),
                }
                refresh = false;
            }
            match self.step(&mut rotation).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "dispatch step failed; retrying");
                    refresh = true;
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            }
            // Nothing to do: wait for a new batch, the next scheduled message, or a tick.
            let next = self.blocking(|s| s.next_scheduled()).await.ok().flatten();
            let wait = next
                .map(|due| Duration::from_secs((due - now()).clamp(0, 5) as u64))
                .unwrap_or(Duration::from_secs(5));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notify.notified() => refresh = true,
                _ = tokio::time::sleep(wait) => refresh = true,
            }
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.store.blocking(f).await
    }

    /// Sends one step's worth of messages. Returns whether there was anything to send.
    async fn step(&self, rotation: &mut Rotation) -> Result<bool, StoreError> {
        let t = now();
        let due = self.blocking(move |s| s.due_scheduled(t, STEP / 4)).await?;
        let budget = STEP - due.len();
        let fresh = rotation.take(budget);
        if due.is_empty() && fresh.is_empty() {
            return Ok(false);
        }
        let mut step = DispatchCommit::default();
        let mut cursors: HashMap<u64, u64> = HashMap::new();
        for (batch, _, index) in &fresh {
            let c = cursors.entry(*batch).or_default();
            *c = (*c).max(index + 1);
        }
        step.cursors = cursors.into_iter().collect();
        let picks = self.load(due, fresh).await?;

        let mut by_partner: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, p) in picks.iter().enumerate() {
            if let (Some(at), None) = (p.message.send_at, p.scheduled) {
                if at > t {
                    step.schedule.push((at, p.id));
                    continue;
                }
            }
            if let Some(due) = p.scheduled {
                step.unschedule.push((due, p.id));
            }
            match self.config.route_for(&p.message.phone).and_then(|r| r.partners.first()) {
                Some(partner) => by_partner.entry(partner.clone()).or_default().push(i),
                None => step
                    .outcomes
                    .push((p.id, final_status(MessageStatus::Failed, "", "no_route", p.attempts, t))),
            }
        }
        for (partner_id, indexes) in by_partner {
            let Some(partner) = self.partners.get(&partner_id) else {
                continue;
            };
            let outbound: Vec<Outbound<'_>> = indexes
                .iter()
                .map(|&i| Outbound {
                    id: picks[i].id,
                    tenant: &picks[i].tenant,
                    batch: split_message_id(picks[i].id).0,
                    message: &picks[i].message,
                    valid_until: picks[i].message.send_at.unwrap_or(t).max(t)
                        + self
                            .config
                            .tenants
                            .get(&picks[i].tenant)
                            .map(|c| c.validity.as_secs() as i64)
                            .unwrap_or(48 * 3600),
                })
                .collect();
            let results = partner.submit(&outbound).await;
            let done = now();
            for (&i, result) in indexes.iter().zip(results) {
                let p = &picks[i];
                let attempts = p.attempts + 1;
                let status = match result {
                    Ok(Submitted::Delivered { partner_id: pid }) => StatusRecord {
                        status: MessageStatus::Delivered,
                        partner: partner_id.clone(),
                        partner_id: pid,
                        submitted_at: Some(done),
                        done_at: Some(done),
                        error: String::new(),
                        attempts,
                    },
                    Ok(Submitted::Accepted { partner_id: pid }) => StatusRecord {
                        status: MessageStatus::Submitted,
                        partner: partner_id.clone(),
                        partner_id: pid,
                        submitted_at: Some(done),
                        done_at: None,
                        error: String::new(),
                        attempts,
                    },
                    Err(PartnerError::Permanent { detail }) => {
                        final_status(MessageStatus::Rejected, &partner_id, &detail, attempts, done)
                    }
                    Err(PartnerError::Transient { detail }) if attempts >= MAX_ATTEMPTS => {
                        final_status(MessageStatus::Failed, &partner_id, &detail, attempts, done)
                    }
                    Err(PartnerError::Transient { detail }) => {
                        let delay = (30i64 << attempts.min(7)).min(3600);
                        step.schedule.push((done + delay, p.id));
                        tracing::debug!(message = p.id, partner = %partner_id, attempts, "transient failure: {detail}");
                        let mut s = StatusRecord::queued();
                        s.partner = partner_id.clone();
                        s.error = detail;
                        s.attempts = attempts;
                        s
                    }
                };
                step.outcomes.push((p.id, status));
            }
        }
        let count = step.outcomes.len();
        let finished = self.blocking(move |s| s.commit_dispatch(&step, now())).await?;
        tracing::debug!(messages = count, "dispatch step committed");
        for b in finished {
            tracing::info!(tenant = %b.tenant, batch = b.id, "every message of the batch is final");
            let _ = self.reports.send(b.id);
        }
        Ok(true)
    }

    /// Reads the picked messages from their chunks.
    async fn load(&self, due: Vec<(i64, u64)>, fresh: Vec<(u64, String, u64)>) -> Result<Vec<Pick>, StoreError> {
        self.blocking(move |store| {
            let mut chunks: HashMap<(u64, u32), Arc<Vec<StoredMessage>>> = HashMap::new();
            let mut tenants: HashMap<u64, Option<String>> = HashMap::new();
            let mut picks = Vec::with_capacity(due.len() + fresh.len());
            let mut wanted: Vec<(u64, String, u64, Option<i64>)> = Vec::new();
            for (at, id) in due {
                let (batch, index) = split_message_id(id);
                let tenant = match tenants.entry(batch) {
                    std::collections::hash_map::Entry::Occupied(e) => e.get().clone(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(store.batch(batch)?.map(|b| b.tenant)).clone()
                    }
                };
                if let Some(tenant) = tenant {
                    wanted.push((batch, tenant, index, Some(at)));
                }
            }
            wanted.extend(fresh.into_iter().map(|(b, t, i)| (b, t, i, None)));
            for (batch, tenant, index, scheduled) in wanted {
                let chunk_no = (index / CHUNK_MESSAGES) as u32;
                let chunk = match chunks.get(&(batch, chunk_no)) {
                    Some(c) => c.clone(),
                    None => {
                        let c = Arc::new(store.load_chunk(&tenant, batch, chunk_no)?);
                        chunks.insert((batch, chunk_no), c.clone());
                        c
                    }
                };
                let Some(message) = chunk.get((index % CHUNK_MESSAGES) as usize) else {
                    continue;
                };
                let id = message_id(batch, index);
                let attempts = if scheduled.is_some() {
                    let batch_rec = store.batch(batch)?;
                    batch_rec
                        .map(|b| store.statuses(&b, index, index + 1))
                        .transpose()?
                        .and_then(|m| m.get(&index).map(|s| s.attempts))
                        .unwrap_or(0)
                } else {
                    0
                };
                picks.push(Pick {
                    id,
                    tenant,
                    message: message.clone(),
                    scheduled,
                    attempts,
                });
            }
            Ok(picks)
        })
        .await
    }
}

/// Makes partners' receipts durable, then lets the partner acknowledge them.
pub struct ReceiptWriter {
    pub store: Store,
    pub reports: ReportRequests,
    pub incoming: tokio::sync::mpsc::UnboundedReceiver<smpp::Inbound>,
}

impl ReceiptWriter {
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.incoming.recv() => match r {
                    Some(r) => r,
                    None => break,
                },
            };
            let mut group = vec![first];
            while group.len() < 1024 {
                match self.incoming.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
            let mut by_partner: HashMap<String, Vec<smpp::Inbound>> = HashMap::new();
            for r in group {
                by_partner.entry(r.partner.clone()).or_default().push(r);
            }
            for (partner, inbound) in by_partner {
                let receipts: Vec<receipt::Receipt> = inbound.iter().map(|i| i.receipt.clone()).collect();
                let n = receipts.len();
                let result = self
                    .store
                    .blocking(move |s| s.apply_receipts(&partner, &receipts, now()))
                    .await;
                let durable = match result {
                    Ok(done) => {
                        for b in done {
                            tracing::info!(tenant = %b.tenant, batch = b.id, "every message of the batch is final");
                            let _ = self.reports.send(b.id);
                        }
                        true
                    }
                    Err(e) => {
                        tracing::error!(error = %e, receipts = n, "cannot record receipts; the partner will send them again");
                        false
                    }
                };
                for i in inbound {
                    let _ = i.ack.send(durable);
                }
            }
        }
    }
}

fn final_status(status: MessageStatus, partner: &str, error: &str, attempts: u32, at: i64) -> StatusRecord {
    StatusRecord {
        status,
        partner: partner.to_string(),
        partner_id: String::new(),
        submitted_at: None,
        done_at: Some(at),
        error: error.to_string(),
        attempts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(id: u64, tenant: &str, accepted: u64) -> BatchRecord {
        let mut b = BatchRecord::new(id, tenant, "f.csv", "", 0, Default::default());
        b.state = crate::store::records::BatchState::Queued;
        b.accepted = accepted;
        b
    }

    #[test]
    fn a_small_batch_is_not_held_behind_a_big_one() {
        let mut r = Rotation::default();
        r.rebuild(vec![batch(1, "big", 1_000_000), batch(2, "small", 10)]);
        let picks = r.take(256);
        let small: Vec<_> = picks.iter().filter(|p| p.1 == "small").collect();
        assert_eq!(small.len(), 10, "the small tenant's whole batch goes in the first step");
        assert_eq!(picks.len(), 256);
    }

    #[test]
    fn batches_of_one_tenant_take_turns() {
        let mut r = Rotation::default();
        r.rebuild(vec![batch(1, "t", 1000), batch(2, "t", 1000)]);
        let picks = r.take(4 * QUANTUM as usize);
        let first: usize = picks.iter().filter(|p| p.0 == 1).count();
        assert_eq!(first, 2 * QUANTUM as usize);
        // the cursor moves on: nothing is taken twice
        let again = r.take(QUANTUM as usize);
        assert_eq!(again[0], (1, "t".to_string(), 2 * QUANTUM));
    }
}
