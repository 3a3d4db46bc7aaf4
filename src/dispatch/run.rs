//! The dispatch loop, as a struct whose state is its fields. Messages flow continuously: picked
//! in fair order ([`super::rotation`]), read ahead ([`super::fill`]), routed
//! ([`super::routing`]), handed to their partner within its window ([`super::outcome`]), and
//! their outcomes logged in groups ([`super::log`]). A partner's window slot comes back only
//! when the outcome is durable, so after a crash at most `window` messages per partner were
//! sent and not recorded (and are sent again).
//!
//! Each turn ([`Run::turn`]) follows a reload, reads the partners' health, closes batches whose
//! receipts did not come, reads ahead, hands out what the windows allow, hands what landed to
//! the log writer, and then waits for the first thing to happen: a step durable, scheduled ids
//! applied, a receipt or an incoming message, a flight landed, a doorbell, shutdown, or a nap.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::health::Health;
use super::log::{Logged, apply_log, log_writer};
use super::outcome::{Landing, Pending, Pick};
use super::rotation::Rotation;
use super::{Dispatcher, now};
use crate::sms::codes::MessageStatus;
use crate::store::SentTo;

/// Sends remembered for reply matching are written at least this many at a time (or each second).
const SENT_FLUSH: usize = 8192;

/// Messages read ahead of the partners' windows, at most.
const READY_MAX: usize = 2048;

/// The loop's link to the dispatch log: steps handed to the writer thread, in order, with what
/// waits for each to be durable.
struct LogLink {
    next_seq: u64,
    to_log: UnboundedSender<(u64, Vec<u8>)>,
    /// Step numbers the writer made durable.
    durable: UnboundedReceiver<u64>,
    writing: VecDeque<(u64, Pending)>,
    /// Durable steps on their way to the applier.
    logged: UnboundedSender<Logged>,
    /// Scheduled ids the applier has settled in the database.
    applied: UnboundedReceiver<Vec<u64>>,
}

/// The dispatch loop's state.
pub(super) struct Run {
    pub d: Dispatcher,
    pub rotation: Rotation,
    /// The active batches are read again before the next fill.
    pub refresh: bool,
    /// batch → next index to take (in memory; the durable cursor may lag behind).
    pub taken: HashMap<u64, u64>,
    /// batch → indexes taken and not yet durable.
    pub open: HashMap<u64, BTreeSet<u64>>,
    /// Scheduled ids taken and not yet applied.
    pub scheduled_open: HashSet<u64>,
    /// Messages routed and waiting for their partner's window.
    pub ready: HashMap<String, VecDeque<Pick>>,
    /// Messages handed to each partner and not yet durable.
    pub outstanding: HashMap<String, usize>,
    pub flights: FuturesUnordered<Landing>,
    /// What landed since the last step was handed to the log.
    pub pending: Pending,
    /// The last fill found nothing.
    pub idle_since_fill: bool,
    pub health: HashMap<String, Health>,
    pub checked: Instant,
    pub swept: Instant,
    /// Sends to remember for reply matching, written about once a second.
    pub sent: Vec<SentTo>,
    pub last_flush: Instant,
    /// Whether any partner can still send receipts or incoming messages.
    pub inbound_open: bool,
    /// Batches waiting only for receipts are closed after this (the longest of the partners').
    pub receipt_timeout: Option<Duration>,
    log: LogLink,
}

impl Run {
    /// Runs until `shutdown` and every logged step is applied.
    pub(super) async fn run(
        mut d: Dispatcher,
        shutdown: CancellationToken,
        opened: tokio::sync::oneshot::Sender<Result<(), String>>,
    ) {
        let Some((wal, next_seq)) = d.open_log(&shutdown, Some(opened)).await else {
            return;
        };
        let (to_log, from_loop) = unbounded_channel::<(u64, Vec<u8>)>();
        let (durable_tx, durable) = unbounded_channel::<u64>();
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
        let (logged, logged_rx) = unbounded_channel::<Logged>();
        let (applied_tx, applied) = unbounded_channel::<Vec<u64>>();
        let applier = tokio::spawn(apply_log(
            d.store.clone(),
            d.wake.clone(),
            wal,
            d.reports.clone(),
            logged_rx,
            applied_tx,
        ));
        let health = d
            .config
            .partners
            .iter()
            .filter_map(|(id, p)| p.health().map(|h| (id.clone(), Health::new(h))))
            .collect();
        d.live.mark_unchanged();
        d.fleet.mark_unchanged();
        let receipt_timeout = d.receipt_timeout();
        let mut run = Run {
            d,
            rotation: Rotation::default(),
            refresh: true,
            taken: HashMap::new(),
            open: HashMap::new(),
            scheduled_open: HashSet::new(),
            ready: HashMap::new(),
            outstanding: HashMap::new(),
            flights: FuturesUnordered::new(),
            pending: Pending::default(),
            idle_since_fill: false,
            health,
            checked: Instant::now(),
            swept: Instant::now(),
            sent: Vec::new(),
            last_flush: Instant::now(),
            inbound_open: true,
            receipt_timeout,
            log: LogLink {
                next_seq,
                to_log,
                durable,
                writing: VecDeque::new(),
                logged,
                applied,
            },
        };
        while run.turn(&shutdown).await {}
        // Every logged step goes into the database before the store closes.
        drop(run);
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        let _ = applier.await;
    }

    /// One turn of the loop; `false` once it is over (stopped with nothing left in the air, or
    /// the log writer gone).
    async fn turn(&mut self, shutdown: &CancellationToken) -> bool {
        if self.d.live.has_changed().unwrap_or(false) || self.d.fleet.has_changed().unwrap_or(false) {
            self.reconfigure();
        }
        if self.checked.elapsed() >= Duration::from_millis(200) {
            self.checked = Instant::now();
            self.d
                .check_health(&mut self.health, &mut self.ready, &self.outstanding);
        }
        self.close_unanswered().await;
        let stopping = shutdown.is_cancelled();
        if stopping && self.flights.is_empty() && self.pending.is_empty() && self.log.writing.is_empty() {
            if self.sent.is_empty() {
                return false;
            }
            self.pending.step.sent = std::mem::take(&mut self.sent);
        }
        if self.d.wake.refresh.swap(false, Ordering::AcqRel) {
            self.refresh = true;
        }
        if !stopping {
            if self.refresh {
                self.refresh_batches().await;
            }
            self.read_ahead().await;
            self.hand_out();
        }
        if !self.log_landed(stopping) {
            return false;
        }
        let nap = self.nap().await;
        self.wait(nap, stopping, shutdown).await;
        true
    }

    /// Closes the batches whose receipts did not come within `receipt_timeout` (once a second).
    async fn close_unanswered(&mut self) {
        let Some(timeout) = self
            .receipt_timeout
            .filter(|_| self.swept.elapsed() >= Duration::from_secs(1))
        else {
            return;
        };
        self.swept = Instant::now();
        let t = now();
        match self
            .d
            .blocking(move |s| s.close_unanswered(t, timeout.as_secs() as i64))
            .await
        {
            Ok(closed) => {
                for b in closed {
                    tracing::info!(tenant = %b.tenant, batch = b.id, submitted = b.count(MessageStatus::Submitted), "receipts did not come within receipt_timeout: the batch ends with those messages `submitted`");
                    let _ = self.d.reports.send(b.id);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot close batches waiting for receipts"),
        }
    }

    /// Reads the active batches again into the rotation, keeping the cursors taken in memory.
    async fn refresh_batches(&mut self) {
        match self.d.blocking(|s| s.active_batches()).await {
            Ok(mut active) => {
                self.taken.retain(|b, _| active.iter().any(|a| a.id == *b));
                for b in &mut active {
                    if let Some(t) = self.taken.get(&b.id) {
                        b.cursor = b.cursor.max(*t);
                    }
                }
                self.rotation.rebuild(active);
            }
            Err(e) => tracing::error!(error = %e, "cannot list active batches"),
        }
        self.refresh = false;
    }

    /// Tops up the partners' queues when they run low.
    async fn read_ahead(&mut self) {
        let queued: usize = self.ready.values().map(VecDeque::len).sum();
        if queued >= READY_MAX / 8 {
            return;
        }
        match self.fill(READY_MAX - queued).await {
            Ok(n) => self.idle_since_fill = n == 0,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the queue; retrying");
                self.refresh = true;
                self.idle_since_fill = true;
            }
        }
    }

    /// Launches flights for what the partners' windows allow.
    fn hand_out(&mut self) {
        let Run {
            d,
            ready,
            outstanding,
            flights,
            ..
        } = self;
        for (partner_id, queue) in ready.iter_mut() {
            let Some(partner) = d.partners.get(partner_id) else {
                continue;
            };
            let used = outstanding.entry(partner_id.clone()).or_default();
            while !queue.is_empty() && *used < partner.window() {
                let n = (partner.window() - *used).min(partner.batch_size()).min(queue.len());
                let picks: Vec<Pick> = queue.drain(..n).collect();
                *used += n;
                flights.push(d.launch(partner.clone(), partner_id.clone(), picks));
            }
        }
    }

    /// Hands what landed to the log writer: the windows wait for it. `false` if the writer is gone.
    fn log_landed(&mut self, stopping: bool) -> bool {
        let flush_due = !self.sent.is_empty() && self.last_flush.elapsed() >= Duration::from_secs(1);
        if self.pending.is_empty() && !flush_due {
            return true;
        }
        let mut batch = std::mem::take(&mut self.pending);
        // Who was sent what goes in at most once a second, sorted: one random page per message
        // would double the cost of every commit (see `Store::record_sent`).
        self.sent.append(&mut batch.step.sent);
        // An incoming message is matched against them: they go in before it.
        if self.sent.len() >= SENT_FLUSH
            || self.last_flush.elapsed() >= Duration::from_secs(1)
            || !batch.step.mos.is_empty()
            || stopping
        {
            batch.step.sent = std::mem::take(&mut self.sent);
            self.last_flush = Instant::now();
        }
        let touched: HashSet<u64> = batch.settled.iter().map(|(b, _)| *b).collect();
        for (b, i) in &batch.settled {
            if let Some(set) = self.open.get_mut(b) {
                set.remove(i);
            }
        }
        for b in touched {
            let cursor = self
                .open
                .get(&b)
                .and_then(|set| set.iter().next().copied())
                .or_else(|| self.taken.get(&b).copied());
            if let Some(c) = cursor {
                batch.step.cursors.push((b, c));
            }
        }
        let seq = self.log.next_seq;
        self.log.next_seq += 1;
        if self.log.to_log.send((seq, crate::store::encode(&batch.step))).is_err() {
            tracing::error!("the dispatch log writer stopped; nothing more is sent");
            return false;
        }
        self.log.writing.push_back((seq, batch));
        true
    }

    /// How long to wait for something to happen.
    async fn nap(&mut self) -> Duration {
        let has_ready = self.ready.values().any(|q| !q.is_empty());
        let nap = if self.idle_since_fill && !has_ready {
            let next = self.d.blocking(|s| s.next_scheduled()).await.ok().flatten();
            next.map(|due| Duration::from_secs((due - now()).clamp(0, 5) as u64))
                .unwrap_or(Duration::from_secs(5))
        } else if has_ready && self.flights.is_empty() {
            Duration::from_millis(50) // a partner without window room: look again soon
        } else {
            Duration::from_secs(5)
        };
        // A partner that is down is probed, sends wait to be remembered: look again soon.
        if self.health.values().any(|h| !h.is_up()) || !self.sent.is_empty() {
            nap.min(Duration::from_secs(1))
        } else {
            nap
        }
    }

    /// Waits for the first thing to happen, and takes it.
    async fn wait(&mut self, nap: Duration, stopping: bool, shutdown: &CancellationToken) {
        let no_flights = self.flights.is_empty();
        let writing = !self.log.writing.is_empty();
        tokio::select! {
            biased;
            Some(upto) = self.log.durable.recv(), if writing => self.durable(upto),
            Some(ids) = self.log.applied.recv() => {
                for id in ids {
                    self.scheduled_open.remove(&id);
                }
            }
            inbound = self.d.incoming.recv(), if self.inbound_open => {
                match inbound {
                    Some(first) => {
                        self.d.take_inbound(first, &mut self.pending);
                        while let Ok(more) = self.d.incoming.try_recv() {
                            self.d.take_inbound(more, &mut self.pending);
                        }
                    }
                    // No partner can receive anything (only `sink`): a closed channel is
                    // always ready, and would spin this loop.
                    None => self.inbound_open = false,
                }
            }
            flight = self.flights.next(), if !no_flights => {
                if let Some(Some(flight)) = flight {
                    self.d.land(flight, &mut self.pending, &self.health);
                }
                // Whatever else landed meanwhile, in the same turn of the loop.
                while let Some(Some(more)) = futures_util::FutureExt::now_or_never(self.flights.next()) {
                    if let Some(flight) = more {
                        self.d.land(flight, &mut self.pending, &self.health);
                    }
                }
            }
            _ = self.d.wake.notify.notified(), if !stopping => self.refresh = true,
            _ = shutdown.cancelled(), if !stopping => {}
            _ = tokio::time::sleep(nap) => self.refresh = self.idle_since_fill,
        }
    }

    /// Steps up to `upto` are durable: their receipts are acknowledged, their window slots come
    /// back, and they go to the applier.
    fn durable(&mut self, mut upto: u64) {
        while let Ok(more) = self.log.durable.try_recv() {
            upto = upto.max(more);
        }
        self.d.wake.logged(upto);
        while self.log.writing.front().is_some_and(|(seq, _)| *seq <= upto) {
            let Some((seq, batch)) = self.log.writing.pop_front() else {
                break;
            };
            for ack in batch.acks {
                let _ = ack.send(true);
            }
            for (p, n) in batch.release {
                if let Some(used) = self.outstanding.get_mut(&p) {
                    *used = used.saturating_sub(n);
                }
            }
            tracing::debug!(messages = batch.step.outcomes.len(), seq, "dispatch step logged");
            let _ = self.log.logged.send(Logged {
                seq,
                step: batch.step,
                scheduled: batch.scheduled,
            });
        }
    }
}
