//! The way out: takes due messages from the queue in a fair order, routes them, hands them to
//! partners and records what became of them (README: Partners).
//!
//! Fairness: tenants take turns, and within a tenant its batches take turns, each turn at most
//! [`QUANTUM`] messages. A tenant's million-line batch therefore delays another tenant's ten
//! lines by one turn, not by a million messages, and the same holds between one tenant's urgent
//! and bulk batches. Scheduled messages (`send_at`) are set aside in the store and come back
//! first when due.
//!
//! Each step's outcomes and the batches' cursors are committed in one durable transaction after
//! the partner answered: a crash can resend at most the step that was in flight, never lose one.

pub mod fleet;
pub mod health;
pub mod http;
pub mod mo;
pub mod partner;
pub mod sink;
pub mod smpp;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::alert::{Alert, AlertKind, Alerter};
use crate::config::{self, Config};
use crate::reply::ReportRequests;
use crate::sms::codes::MessageStatus;
use crate::sms::message::Message;
use crate::store::records::{BatchRecord, CHUNK_MESSAGES, StatusRecord, message_id, split_message_id};
use crate::store::wal::Wal;
use crate::store::{DispatchCommit, IncomingMo, MoOutcome, SentTo, Store, StoreError};
pub use health::PartnerState;
use health::{Change, Health};
use partner::{Inbound, Incoming, Outbound, Partner, PartnerError, Submitted};

/// Messages one batch may send per turn.
pub const QUANTUM: u64 = 32;
/// Transient failures are retried this many times, with growing delays, before `failed`.
const MAX_ATTEMPTS: u32 = 12;

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

/// Tells the dispatcher that batches changed (queued, released, canceled), and lets an
/// operator's command wait until what the dispatcher logged is in the database.
#[derive(Debug, Default)]
pub struct Signal {
    notify: Notify,
    refresh: AtomicBool,
    /// The last dispatch step logged.
    logged: std::sync::atomic::AtomicU64,
    /// The last dispatch step applied to the database.
    applied: std::sync::Mutex<u64>,
    applied_moved: std::sync::Condvar,
    /// Asks the applier not to wait for its interval.
    hurry: Notify,
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

    fn logged(&self, seq: u64) {
        self.logged.store(seq, Ordering::Release);
    }

    fn applied(&self, seq: u64) {
        let mut applied = self.applied.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *applied = (*applied).max(seq);
        self.applied_moved.notify_all();
    }
}

/// The dispatcher's thread: a single-threaded runtime that runs the dispatch loop, the SMPP
/// connections and every submission and receipt, apart from the shared runtime (SFTP, the
/// watcher, HTTP listeners, mail).
///
/// A message's round trip crosses these tasks several times (the loop launches its submission,
/// the connection writes it and reads the answer, the answer lands in the loop, a receipt is
/// handed over and acknowledged once durable). On one thread each hand-over is a queue push; on
/// a pool of workers most were a wake-up of another thread, and on two cores the SMSC, smsdrop's
/// workers and its log writer then took the processors from each other (dispatch benchmark,
/// median of three rounds: 78% of the bare client's rate on the shared pool, 100 to 105% here).
/// What blocks (the database, the dispatch log) runs on threads of its own. smsdrop as a whole
/// spends about 55 µs of CPU per message there, this thread less: at 13,000 messages a second
/// it is not the limit.
pub struct Lane {
    handle: tokio::runtime::Handle,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Lane {
    pub fn start() -> std::io::Result<Lane> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let stop = CancellationToken::new();
        let until = stop.clone();
        let thread = std::thread::Builder::new()
            .name("smsdrop-dispatch".into())
            .spawn(move || {
                runtime.block_on(until.cancelled());
                // Whatever is still running on its blocking threads after the service's stop
                // deadline (see `server`) is not waited for without end.
                runtime.shutdown_timeout(Duration::from_secs(5));
            })?;
        Ok(Lane {
            handle,
            stop,
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> tokio::runtime::Handle {
        self.handle.clone()
    }

    /// Ends the thread once the tasks on it have ended (what is left is dropped).
    pub fn finish(mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// How a partner stands, for `smsdrop status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartnerView {
    pub state: PartnerState,
    /// Unix seconds of the last move.
    pub since: i64,
    /// Why it is down.
    pub reason: String,
    pub connected: bool,
    /// Messages handed to it and not yet recorded, and its window.
    pub in_flight: usize,
    pub window: usize,
    /// Median submit latency and transient failures over its last submissions.
    pub latency_ms: u64,
    pub failed: usize,
    pub samples: usize,
}

/// Every partner's [`PartnerView`], kept by the dispatcher.
pub type HealthBoard = Arc<std::sync::RwLock<std::collections::BTreeMap<String, PartnerView>>>;

/// Sends queued messages through partners.
pub struct Dispatcher {
    pub store: Store,
    /// The configuration of this turn, taken from `live` when a reload changed it.
    pub config: Arc<Config>,
    pub live: tokio::sync::watch::Receiver<Arc<Config>>,
    /// The partners of this turn, taken from `fleet` when a reload changed them.
    pub partners: fleet::PartnerMap,
    pub fleet: tokio::sync::watch::Receiver<fleet::PartnerMap>,
    /// Poked when batches change.
    pub wake: Arc<Signal>,
    pub reports: ReportRequests,
    /// Receipts from partners, committed with the dispatch outcomes.
    pub incoming: tokio::sync::mpsc::UnboundedReceiver<partner::Inbound>,
    /// `partner_down` and `partner_up` go here.
    pub alerts: Alerter,
    /// Partner health, published for `status`.
    pub board: HealthBoard,
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// One message picked to send.
struct Pick {
    id: u64,
    tenant: String,
    message: Message,
    /// It came from the scheduled set, with this due time.
    scheduled: Option<i64>,
    attempts: u32,
}

/// Submissions handed to one partner call, and what the partner answered.
struct Flight {
    partner: String,
    picks: Vec<Pick>,
    results: Vec<Result<Submitted, PartnerError>>,
}

/// Outcomes waiting for their durable commit, and what they hold.
#[derive(Default)]
struct Pending {
    step: DispatchCommit,
    /// Window slots each partner gets back once this is durable.
    release: HashMap<String, usize>,
    /// (batch, index) of fresh messages this settles.
    settled: Vec<(u64, u64)>,
    /// Scheduled message ids this settles.
    scheduled: Vec<u64>,
    /// Partners wait for these to be durable before acknowledging the receipts.
    acks: Vec<tokio::sync::oneshot::Sender<bool>>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.step.outcomes.is_empty()
            && self.step.schedule.is_empty()
            && self.step.unschedule.is_empty()
            && self.settled.is_empty()
            && self.step.receipts.is_empty()
            && self.step.mos.is_empty()
            && self.step.sent.is_empty()
    }
}

/// A flight runs as its own task, so that building and sending PDUs for thousands of messages a
/// second does not share one thread with the dispatcher's bookkeeping. `None` only if the task
/// died, which a panic (it aborts the process) cannot cause.
type Landing = futures_util::future::BoxFuture<'static, Option<Flight>>;

/// A step in the dispatch log, on its way into the database.
struct Logged {
    seq: u64,
    step: DispatchCommit,
    /// Scheduled message ids it settles: the dispatcher may take them again only once the step
    /// is applied (until then the scheduled table still lists them).
    scheduled: Vec<u64>,
}

type SharedWal = Arc<std::sync::Mutex<crate::store::wal::Wal>>;

/// Sends remembered for reply matching are written at least this many at a time (or each second).
const SENT_FLUSH: usize = 8192;

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

/// Messages read ahead of the partners' windows, at most.
const READY_MAX: usize = 2048;

impl Dispatcher {
    /// Runs until `shutdown` and every logged step is applied. Messages flow continuously:
    /// picked in fair order, routed, handed to their partner within its window, and their
    /// outcomes committed in groups. A partner's window slot comes back only when the outcome
    /// is durable, so after a crash at most `window` messages per partner were sent and not
    /// recorded (and are sent again).
    ///
    /// The loop runs on the [`Lane`] with the SMPP partners' connections and the submissions.
    /// Each turn of the loop that landed something hands one step to the dispatch log's own
    /// thread ([`log_writer`]), which writes every step waiting for it in one synchronous write
    /// (a group commit) while the loop goes on landing answers and handing out what the
    /// windows allow.
    ///
    /// The receiver it returns says whether the dispatch log opened at the first try (and what
    /// a crash left in it was applied): `serve` says it is serving only then.
    pub fn spawn(
        self,
        tracker: &tokio_util::task::TaskTracker,
        lane: &Lane,
        shutdown: CancellationToken,
    ) -> tokio::sync::oneshot::Receiver<Result<(), String>> {
        let (opened_tx, opened) = tokio::sync::oneshot::channel();
        tracker.spawn_on(self.run(shutdown, opened_tx), &lane.handle);
        opened
    }

    async fn run(mut self, shutdown: CancellationToken, opened: tokio::sync::oneshot::Sender<Result<(), String>>) {
        use futures_util::StreamExt;
        let Some((wal, mut next_seq)) = self.open_log(&shutdown, Some(opened)).await else {
            return;
        };
        let (to_log, from_loop) = tokio::sync::mpsc::unbounded_channel::<(u64, Vec<u8>)>();
        let (durable_tx, mut durable) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let writer = {
            let wal = wal.clone();
            std::thread::Builder::new()
                .name("smsdrop-log".into())
                .spawn(move || log_writer(wal, from_loop, durable_tx))
        };
        let writer = match writer {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the dispatch log writer; nothing is sent");
                return;
            }
        };
        // Steps handed to the writer, in order, and what waits for each to be durable.
        let mut writing: VecDeque<(u64, Pending)> = VecDeque::new();
        let (logged_tx, logged_rx) = tokio::sync::mpsc::unbounded_channel::<Logged>();
        let (applied_tx, mut applied_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u64>>();
        let applier = tokio::spawn(apply_log(
            self.store.clone(),
            self.wake.clone(),
            wal.clone(),
            self.reports.clone(),
            logged_rx,
            applied_tx,
        ));
        let mut rotation = Rotation::default();
        let mut refresh = true;
        // batch → next index to take (in memory; the durable cursor may lag behind).
        let mut taken: HashMap<u64, u64> = HashMap::new();
        // batch → indexes taken and not yet durable.
        let mut open: HashMap<u64, std::collections::BTreeSet<u64>> = HashMap::new();
        let mut scheduled_open: std::collections::HashSet<u64> = std::collections::HashSet::new();
        let mut ready: HashMap<String, VecDeque<Pick>> = HashMap::new();
        let mut outstanding: HashMap<String, usize> = HashMap::new();
        let mut flights: futures_util::stream::FuturesUnordered<Landing> = Default::default();
        let mut pending = Pending::default();
        let mut idle_since_fill = false;
        let mut health: HashMap<String, Health> = self
            .config
            .partners
            .iter()
            .filter_map(|(id, p)| p.health().map(|h| (id.clone(), Health::new(h))))
            .collect();
        self.live.mark_unchanged();
        self.fleet.mark_unchanged();
        let mut checked = tokio::time::Instant::now();
        let mut swept = tokio::time::Instant::now();
        let mut sent: Vec<SentTo> = Vec::new();
        let mut last_flush = tokio::time::Instant::now();
        let mut inbound_open = true;
        // Batches waiting only for receipts are closed after the longest receipt_timeout.
        let mut receipt_timeout = self.receipt_timeout();
        loop {
            if self.live.has_changed().unwrap_or(false) || self.fleet.has_changed().unwrap_or(false) {
                self.reconfigure(&mut health, &mut ready, &mut pending);
                receipt_timeout = self.receipt_timeout();
            }
            if checked.elapsed() >= Duration::from_millis(200) {
                checked = tokio::time::Instant::now();
                self.check_health(&mut health, &mut ready, &outstanding);
            }
            if let Some(timeout) = receipt_timeout.filter(|_| swept.elapsed() >= Duration::from_secs(1)) {
                swept = tokio::time::Instant::now();
                let t = now();
                match self
                    .blocking(move |s| s.close_unanswered(t, timeout.as_secs() as i64))
                    .await
                {
                    Ok(closed) => {
                        for b in closed {
                            tracing::info!(tenant = %b.tenant, batch = b.id, submitted = b.count(MessageStatus::Submitted), "receipts did not come within receipt_timeout: the batch ends with those messages `submitted`");
                            let _ = self.reports.send(b.id);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot close batches waiting for receipts"),
                }
            }
            let stopping = shutdown.is_cancelled();
            if stopping && flights.is_empty() && pending.is_empty() && writing.is_empty() {
                if sent.is_empty() {
                    break;
                }
                pending.step.sent = std::mem::take(&mut sent);
            }
            if self.wake.refresh.swap(false, Ordering::AcqRel) {
                refresh = true;
            }
            if refresh && !stopping {
                match self.blocking(|s| s.active_batches()).await {
                    Ok(mut active) => {
                        taken.retain(|b, _| active.iter().any(|a| a.id == *b));
                        for b in &mut active {
                            if let Some(t) = taken.get(&b.id) {
                                b.cursor = b.cursor.max(*t);
                            }
                        }
                        rotation.rebuild(active);
                    }
                    Err(e) => tracing::error!(error = %e, "cannot list active batches"),
                }
                refresh = false;
            }
            // Read ahead.
            let queued: usize = ready.values().map(VecDeque::len).sum();
            if !stopping && queued < READY_MAX / 8 {
                match self
                    .fill(
                        &mut rotation,
                        &mut taken,
                        &mut open,
                        &mut scheduled_open,
                        &mut ready,
                        &mut pending,
                        &mut health,
                        READY_MAX - queued,
                    )
                    .await
                {
                    Ok(n) => idle_since_fill = n == 0,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the queue; retrying");
                        refresh = true;
                        idle_since_fill = true;
                    }
                }
            }
            // Hand out what the windows allow.
            if !stopping {
                for (partner_id, queue) in ready.iter_mut() {
                    let Some(partner) = self.partners.get(partner_id) else {
                        continue;
                    };
                    let used = outstanding.entry(partner_id.clone()).or_default();
                    while !queue.is_empty() && *used < partner.window() {
                        let n = (partner.window() - *used).min(partner.batch_size()).min(queue.len());
                        let picks: Vec<Pick> = queue.drain(..n).collect();
                        *used += n;
                        flights.push(self.launch(partner.clone(), partner_id.clone(), picks));
                    }
                }
            }
            // Log what landed: the windows wait for it.
            let flush_due = !sent.is_empty() && last_flush.elapsed() >= Duration::from_secs(1);
            if !pending.is_empty() || flush_due {
                let mut batch = std::mem::take(&mut pending);
                // Who was sent what goes in at most once a second, sorted: one random page per
                // message would double the cost of every commit (see `Store::record_sent`).
                sent.append(&mut batch.step.sent);
                // An incoming message is matched against them: they go in before it.
                if sent.len() >= SENT_FLUSH
                    || last_flush.elapsed() >= Duration::from_secs(1)
                    || !batch.step.mos.is_empty()
                    || stopping
                {
                    batch.step.sent = std::mem::take(&mut sent);
                    last_flush = tokio::time::Instant::now();
                }
                let touched: std::collections::HashSet<u64> = batch.settled.iter().map(|(b, _)| *b).collect();
                for (b, i) in &batch.settled {
                    if let Some(set) = open.get_mut(b) {
                        set.remove(i);
                    }
                }
                for b in touched {
                    let cursor = open
                        .get(&b)
                        .and_then(|set| set.iter().next().copied())
                        .or_else(|| taken.get(&b).copied());
                    if let Some(c) = cursor {
                        batch.step.cursors.push((b, c));
                    }
                }
                let seq = next_seq;
                next_seq += 1;
                if to_log.send((seq, crate::store::encode(&batch.step))).is_err() {
                    tracing::error!("the dispatch log writer stopped; nothing more is sent");
                    break;
                }
                writing.push_back((seq, batch));
            }
            // Wait for something to happen.
            let has_ready = ready.values().any(|q| !q.is_empty());
            let nap = if idle_since_fill && !has_ready {
                let next = self.blocking(|s| s.next_scheduled()).await.ok().flatten();
                next.map(|due| Duration::from_secs((due - now()).clamp(0, 5) as u64))
                    .unwrap_or(Duration::from_secs(5))
            } else if has_ready && flights.is_empty() {
                Duration::from_millis(50) // a partner without window room: look again soon
            } else {
                Duration::from_secs(5)
            };
            // A partner that is down is probed, sends wait to be remembered: look again soon.
            let nap = if health.values().any(|h| !h.is_up()) || !sent.is_empty() {
                nap.min(Duration::from_secs(1))
            } else {
                nap
            };
            let no_flights = flights.is_empty();
            tokio::select! {
                biased;
                Some(mut upto) = durable.recv(), if !writing.is_empty() => {
                    while let Ok(more) = durable.try_recv() {
                        upto = upto.max(more);
                    }
                    self.wake.logged(upto);
                    while writing.front().is_some_and(|(seq, _)| *seq <= upto) {
                        let Some((seq, batch)) = writing.pop_front() else { break };
                        for ack in batch.acks {
                            let _ = ack.send(true);
                        }
                        for (p, n) in batch.release {
                            if let Some(used) = outstanding.get_mut(&p) {
                                *used = used.saturating_sub(n);
                            }
                        }
                        tracing::debug!(messages = batch.step.outcomes.len(), seq, "dispatch step logged");
                        let _ = logged_tx.send(Logged {
                            seq,
                            step: batch.step,
                            scheduled: batch.scheduled,
                        });
                    }
                }
                Some(ids) = applied_rx.recv() => {
                    for id in ids {
                        scheduled_open.remove(&id);
                    }
                }
                inbound = self.incoming.recv(), if inbound_open => {
                    match inbound {
                        Some(first) => {
                            self.take_inbound(first, &mut pending);
                            while let Ok(more) = self.incoming.try_recv() {
                                self.take_inbound(more, &mut pending);
                            }
                        }
                        // No partner can receive anything (only `sink`): a closed channel is
                        // always ready, and would spin this loop.
                        None => inbound_open = false,
                    }
                }
                flight = flights.next(), if !no_flights => {
                    if let Some(Some(flight)) = flight {
                        self.land(flight, &mut pending, &health);
                    }
                    // Whatever else landed meanwhile, in the same turn of the loop.
                    while let Some(Some(more)) = futures_util::FutureExt::now_or_never(flights.next()) {
                        if let Some(flight) = more {
                            self.land(flight, &mut pending, &health);
                        }
                    }
                }
                _ = self.wake.notify.notified(), if !stopping => refresh = true,
                _ = shutdown.cancelled(), if !stopping => {}
                _ = tokio::time::sleep(nap) => refresh = idle_since_fill,
            }
        }
        // Every logged step goes into the database before the store closes.
        drop(to_log);
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        drop(logged_tx);
        let _ = applier.await;
    }

    /// Opens the dispatch log and applies what a crash left in it, before anything reads the
    /// queue; retries until it can or `shutdown`. Returns the log and the next step number.
    async fn open_log(
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

    /// Batches waiting only for receipts are closed after the longest `receipt_timeout`.
    fn receipt_timeout(&self) -> Option<Duration> {
        self.config
            .partners
            .values()
            .filter_map(config::Partner::receipt_timeout)
            .max()
    }

    /// Takes a reloaded configuration and partner set: partners that were replaced start with a
    /// fresh health record, and every message waiting for a partner is routed again under the
    /// new routes (one left without a route ends `failed` with `no_route`, as at any other time).
    fn reconfigure(
        &mut self,
        health: &mut HashMap<String, Health>,
        ready: &mut HashMap<String, VecDeque<Pick>>,
        pending: &mut Pending,
    ) {
        let before = self.partners.clone();
        self.config = self.live.borrow_and_update().clone();
        self.partners = self.fleet.borrow_and_update().clone();
        health
            .retain(|id, _| matches!((before.get(id), self.partners.get(id)), (Some(a), Some(b)) if Arc::ptr_eq(a, b)));
        for (id, p) in &self.config.partners {
            if let (Some(policy), false) = (p.health(), health.contains_key(id)) {
                health.insert(id.clone(), Health::new(policy));
            }
        }
        if let Ok(mut board) = self.board.write() {
            board.retain(|id, _| self.partners.contains_key(id));
        }
        let now = std::time::Instant::now();
        let t = self::now();
        let waiting: Vec<Pick> = ready.drain().flat_map(|(_, q)| q).collect();
        let moved = waiting.len();
        for p in waiting {
            self.route(p, health, ready, pending, now, t);
        }
        tracing::info!(
            partners = self.partners.len(),
            routes = self.config.routes.len(),
            routed_again = moved,
            "dispatcher took the reloaded configuration"
        );
    }

    /// Puts a message in the queue of the partner its route chooses; one without a route ends
    /// `failed` (`no_route`).
    fn route(
        &self,
        p: Pick,
        health: &mut HashMap<String, Health>,
        ready: &mut HashMap<String, VecDeque<Pick>>,
        pending: &mut Pending,
        now: std::time::Instant,
        t: i64,
    ) {
        match self.choose(&p.message.phone, health, now) {
            Some(partner) => ready.entry(partner).or_default().push_back(p),
            None => {
                pending
                    .step
                    .outcomes
                    .push((p.id, final_status(MessageStatus::Failed, "", "no_route", p.attempts, t)));
                self.settle(&p, pending);
            }
        }
    }

    /// Reads every partner's meter; moves partners out of their routes and back, with alerts;
    /// messages waiting for a partner that went down go to the next one of their route.
    fn check_health(
        &self,
        health: &mut HashMap<String, Health>,
        ready: &mut HashMap<String, VecDeque<Pick>>,
        outstanding: &HashMap<String, usize>,
    ) {
        let now = std::time::Instant::now();
        let mut fallen = Vec::new();
        for (id, h) in health.iter_mut() {
            let Some(partner) = self.partners.get(id) else { continue };
            let Some(meter) = partner.meter() else { continue };
            let Some(policy) = self.config.partners.get(id).and_then(config::Partner::health) else {
                continue;
            };
            match h.observe(meter, partner.is_connected(), now) {
                Some(Change::Down(reason)) => {
                    tracing::warn!(partner = %id, %reason, "partner down: its routes use the next partner");
                    let alert = Alert::new(AlertKind::PartnerDown, None, format!("Partner {id} is down: {reason}."))
                        .detail("partner", id)
                        .detail("reason", &reason)
                        .detail("routes", self.routes_of(id))
                        .action(format!(
                            "Nothing is lost: its traffic goes to the next partner of each route. smsdrop probes it every {} and takes it back when it answers well; if it stays down, ask the partner.",
                            humantime::format_duration(policy.probe_interval)
                        ));
                    self.raise(alert);
                    fallen.push(id.clone());
                }
                Some(Change::Up) => {
                    tracing::info!(partner = %id, "partner up again: back in its routes");
                    let alert = Alert::new(AlertKind::PartnerUp, None, format!("Partner {id} is up again."))
                        .detail("partner", id)
                        .detail("routes", self.routes_of(id))
                        .action("None: it has its traffic back.");
                    self.raise(alert);
                }
                None => {}
            }
        }
        for id in fallen {
            let Some(queue) = ready.remove(&id) else { continue };
            for p in queue {
                match self.choose(&p.message.phone, health, now) {
                    Some(target) => ready.entry(target).or_default().push_back(p),
                    None => ready.entry(id.clone()).or_default().push_back(p),
                }
            }
        }
        if let Ok(mut board) = self.board.write() {
            for (id, partner) in self.partners.iter() {
                let (state, since, reason, latency, failed, samples) = match health.get(id) {
                    Some(h) => {
                        let (latency, failed, samples) = h.summary();
                        let (state, reason) = match h.state() {
                            health::State::Up => (PartnerState::Up, String::new()),
                            health::State::Down {
                                reason, probes_sent, ..
                            } => (
                                if *probes_sent > 0 {
                                    PartnerState::Probing
                                } else {
                                    PartnerState::Down
                                },
                                reason.clone(),
                            ),
                        };
                        (state, h.since, reason, latency, failed, samples)
                    }
                    None => (PartnerState::Up, 0, String::new(), Duration::ZERO, 0, 0),
                };
                board.insert(
                    id.clone(),
                    PartnerView {
                        state,
                        since,
                        reason,
                        connected: partner.is_connected(),
                        in_flight: outstanding.get(id).copied().unwrap_or(0),
                        window: partner.window(),
                        latency_ms: latency.as_millis() as u64,
                        failed,
                        samples,
                    },
                );
            }
        }
    }

    fn routes_of(&self, partner: &str) -> String {
        let prefixes: Vec<String> = self
            .config
            .routes
            .iter()
            .filter(|r| r.partners.iter().any(|p| p == partner))
            .map(|r| {
                if r.prefix.is_empty() {
                    "(default)".to_string()
                } else {
                    r.prefix.clone()
                }
            })
            .collect();
        prefixes.join(" ")
    }

    /// Raises an alert off the async threads (it writes the mail queue).
    fn raise(&self, alert: Alert) {
        let alerts = self.alerts.clone();
        tokio::task::spawn_blocking(move || alerts.raise(alert));
    }

    /// The partner a message goes to: the first of its route that is up, or that a probe is due
    /// on; when every one is down, the first. `None`: no route.
    fn choose(&self, phone: &str, health: &mut HashMap<String, Health>, now: std::time::Instant) -> Option<String> {
        let route = self.config.route_for(phone)?;
        let mut known = route.partners.iter().filter(|p| self.partners.contains_key(*p));
        let first = known.clone().next()?;
        for p in known.by_ref() {
            match health.get_mut(p) {
                None => return Some(p.clone()),
                Some(h) if h.is_up() => return Some(p.clone()),
                Some(h) if h.probe_room(now) > 0 => {
                    h.probe_sent();
                    return Some(p.clone());
                }
                Some(_) => {}
            }
        }
        Some(first.clone())
    }

    /// Whether a message that failed on `failing` has another partner up in its route.
    fn has_alternative(&self, phone: &str, failing: &str, health: &HashMap<String, Health>) -> bool {
        self.config.route_for(phone).is_some_and(|r| {
            r.partners
                .iter()
                .any(|p| p != failing && self.partners.contains_key(p) && health.get(p).is_none_or(Health::is_up))
        })
    }

    /// Puts a receipt or an incoming message into the next commit.
    fn take_inbound(&self, inbound: Inbound, pending: &mut Pending) {
        match inbound.what {
            Incoming::Receipt(r) => pending.step.receipts.push((inbound.partner, r)),
            Incoming::Message(m) => pending.step.mos.push(IncomingMo {
                candidates: mo::candidates(&self.config, &m),
                partner: inbound.partner,
                mo: m,
            }),
        }
        pending.acks.push(inbound.ack);
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.store.blocking(f).await
    }

    /// When a message stops being worth delivering: its send time (`send_at`, or now when it has
    /// none) plus its tenant's `validity`. Both the SMPP `validity_period` and the retry limit
    /// use it.
    fn valid_until(&self, p: &Pick, now: i64) -> i64 {
        let validity = self
            .config
            .tenants
            .get(&p.tenant)
            .map(|c| c.validity.as_secs() as i64)
            .unwrap_or(48 * 3600);
        p.message.send_at.unwrap_or(now).min(now) + validity
    }

    /// Hands `picks` to a partner in a task of their own (on the [`Lane`]); lands as a [`Flight`].
    fn launch(&self, partner: Arc<dyn Partner>, partner_id: String, picks: Vec<Pick>) -> Landing {
        let t = now();
        let valid_until: Vec<i64> = picks.iter().map(|p| self.valid_until(p, t)).collect();
        let task = tokio::spawn(async move {
            let results = {
                let outbound: Vec<Outbound<'_>> = picks
                    .iter()
                    .zip(&valid_until)
                    .map(|(p, &valid_until)| Outbound {
                        id: p.id,
                        tenant: &p.tenant,
                        batch: split_message_id(p.id).0,
                        message: &p.message,
                        valid_until,
                    })
                    .collect();
                partner.submit(&outbound).await
            };
            Flight {
                partner: partner_id,
                picks,
                results,
            }
        });
        Box::pin(async move {
            task.await
                .map_err(|e| tracing::error!(error = %e, "a partner submission task died"))
                .ok()
        })
    }

    /// Turns a partner's answers into outcomes waiting for commit. A transient failure is
    /// retried with growing delays, or within a second when its partner is down and another
    /// partner of its route is up (failover).
    fn land(&self, flight: Flight, pending: &mut Pending, health: &HashMap<String, Health>) {
        let done = now();
        let partner_id = flight.partner;
        *pending.release.entry(partner_id.clone()).or_default() += flight.picks.len();
        let mut results = flight.results.into_iter();
        for p in flight.picks {
            let result = results.next().unwrap_or_else(|| {
                Err(PartnerError::Transient {
                    detail: "no answer from the partner".into(),
                })
            });
            let attempts = p.attempts + 1;
            let valid_until = self.valid_until(&p, done);
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
                    let failing_down = health.get(&partner_id).is_some_and(|h| !h.is_up());
                    let delay = if failing_down && self.has_alternative(&p.message.phone, &partner_id, health) {
                        1
                    } else {
                        (5i64 << attempts.min(7)).min(600)
                    };
                    if done + delay > valid_until {
                        final_status(MessageStatus::Expired, &partner_id, &detail, attempts, done)
                    } else {
                        pending.step.schedule.push((done + delay, p.id));
                        tracing::debug!(message = p.id, partner = %partner_id, attempts, "transient failure: {detail}");
                        let mut s = StatusRecord::queued();
                        s.partner = partner_id.clone();
                        s.error = detail;
                        s.attempts = attempts;
                        s
                    }
                }
            };
            if status.status == MessageStatus::Submitted || status.status == MessageStatus::Delivered {
                pending.step.sent.push(SentTo {
                    tenant: p.tenant.clone(),
                    phone: p.message.phone.clone(),
                    message_id: p.id,
                });
            }
            pending.step.outcomes.push((p.id, status));
            self.settle(&p, pending);
        }
    }

    /// Marks a pick as settled by the next commit.
    fn settle(&self, p: &Pick, pending: &mut Pending) {
        match p.scheduled {
            Some(due) => {
                pending.step.unschedule.push((due, p.id));
                pending.scheduled.push(p.id);
            }
            None => pending.settled.push(split_message_id(p.id)),
        }
    }

    /// Takes due and fresh messages into the per-partner queues. Returns how many were taken.
    #[allow(clippy::too_many_arguments)]
    async fn fill(
        &self,
        rotation: &mut Rotation,
        taken: &mut HashMap<u64, u64>,
        open: &mut HashMap<u64, std::collections::BTreeSet<u64>>,
        scheduled_open: &mut std::collections::HashSet<u64>,
        ready: &mut HashMap<String, VecDeque<Pick>>,
        pending: &mut Pending,
        health: &mut HashMap<String, Health>,
        room: usize,
    ) -> Result<usize, StoreError> {
        let t = now();
        let skip: Vec<u64> = scheduled_open.iter().copied().collect();
        let due: Vec<(i64, u64)> = self
            .blocking(move |s| s.due_scheduled(t, room / 4 + skip.len()))
            .await?
            .into_iter()
            .filter(|(_, id)| !scheduled_open.contains(id))
            .take(room / 4)
            .collect();
        let fresh = rotation.take(room - due.len());
        if due.is_empty() && fresh.is_empty() {
            return Ok(0);
        }
        for (batch, _, index) in &fresh {
            let c = taken.entry(*batch).or_default();
            *c = (*c).max(index + 1);
            open.entry(*batch).or_default().insert(*index);
        }
        for (_, id) in &due {
            scheduled_open.insert(*id);
        }
        let n = due.len() + fresh.len();
        let (picks, already, blocked) = self.load(due, fresh).await?;
        // Fresh messages that already have a status were handled before a restart.
        for id in already {
            pending.settled.push(split_message_id(id));
        }
        for p in blocked {
            tracing::debug!(message = p.id, tenant = %p.tenant, "number blocklisted since it was queued: canceled");
            pending.step.outcomes.push((
                p.id,
                final_status(MessageStatus::Canceled, "", "blocklisted", p.attempts, t),
            ));
            self.settle(&p, pending);
        }
        for p in picks {
            if let (Some(at), None) = (p.message.send_at, p.scheduled) {
                if at > t {
                    pending.step.schedule.push((at, p.id));
                    self.settle(&p, pending);
                    continue;
                }
            }
            if p.message.phone.is_empty() {
                // erased (`subject erase`) after it was queued: nothing left to send
                pending
                    .step
                    .outcomes
                    .push((p.id, final_status(MessageStatus::Canceled, "", "erased", p.attempts, t)));
                self.settle(&p, pending);
                continue;
            }
            self.route(p, health, ready, pending, std::time::Instant::now(), t);
        }
        Ok(n)
    }

    /// Reads the picked messages from their chunks; fresh ones that already have a status are
    /// returned apart.
    async fn load(
        &self,
        due: Vec<(i64, u64)>,
        fresh: Vec<(u64, String, u64)>,
    ) -> Result<(Vec<Pick>, Vec<u64>, Vec<Pick>), StoreError> {
        self.blocking(move |store| {
            let mut chunks: HashMap<(u64, u32), Arc<Vec<Message>>> = HashMap::new();
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
            let fresh_ids: Vec<u64> = fresh.iter().map(|(b, _, i)| message_id(*b, *i)).collect();
            let recorded = store.recorded(&fresh_ids)?;
            let already: Vec<u64> = fresh_ids.iter().copied().filter(|id| recorded.contains(id)).collect();
            wanted.extend(
                fresh
                    .into_iter()
                    .filter(|(b, _, i)| !recorded.contains(&message_id(*b, *i)))
                    .map(|(b, t, i)| (b, t, i, None)),
            );
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
            // A number put on the blocklist after its message was queued is never sent to.
            let targets: Vec<(&str, &str)> = picks
                .iter()
                .map(|p| (p.tenant.as_str(), p.message.phone.as_str()))
                .collect();
            let blocked = store.blocked_among(&targets)?;
            let (mut send, mut canceled) = (Vec::with_capacity(picks.len()), Vec::new());
            for (p, b) in picks.into_iter().zip(blocked) {
                if b { canceled.push(p) } else { send.push(p) }
            }
            Ok((send, already, canceled))
        })
        .await
    }
}

/// Writes the steps the dispatcher hands it to the dispatch log until the dispatcher closes
/// `steps`: every step waiting when a write begins goes in that one synchronous write, and the
/// last step number goes back once it is durable; after a small group it waits [`GATHER`]. Steps that cannot be written are written
/// again at their place, every half second: the later ones wait for them.
fn log_writer(
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
async fn apply_log(
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

/// Logs where an incoming message went, without its number or text.
fn log_mo(mo: &IncomingMo, outcome: &MoOutcome) {
    match outcome {
        MoOutcome::Kept {
            tenant,
            answers,
            optout,
        } => {
            tracing::info!(partner = %mo.partner, tenant = %tenant, answers = ?answers, "incoming message kept for the replies file");
            if let Some(word) = optout {
                tracing::info!(partner = %mo.partner, tenant = %tenant, keyword = %word, "opt-out: the sender is on the tenant's blocklist");
            }
        }
        MoOutcome::Unmatched => tracing::warn!(
            partner = %mo.partner, candidates = mo.candidates.len(),
            "incoming message matches no tenant (no sender of its address, nor a message sent to its number); dropped"
        ),
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
