//! The audit trail (docs/cli.md: `audit verify|export`): who logged in or was refused, which files
//! came and went, which batches were taken or rejected, every command that read or changed data.
//!
//! Code that sees something calls [`Audit::record`]. Inside `serve` events go through a queue to
//! one writer task that appends whatever has gathered in one durable transaction (a burst of
//! refusals costs one fsync, not one each); commands run without `serve` append directly. The
//! log itself, its hash chain and its check live in `store::audit`.

use std::fmt::Write as _;
use std::net::SocketAddr;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store::{AuditEntry, AuditEvent, Store};

/// Most events appended in one transaction.
const GROUP: usize = 512;

/// Where events go. Cheap to clone.
#[derive(Clone)]
pub struct Audit {
    sink: Sink,
}

#[derive(Clone)]
enum Sink {
    Queue(mpsc::UnboundedSender<AuditEvent>),
    Direct(Store),
}

/// Builds one event.
#[must_use]
pub struct Event(AuditEvent);

impl Event {
    pub fn new(action: &str, actor: impl Into<String>) -> Event {
        Event(AuditEvent {
            at: crate::clock::now_ms(),
            action: action.to_string(),
            tenant: None,
            actor: actor.into(),
            details: Vec::new(),
        })
    }

    pub fn tenant(mut self, tenant: &str) -> Event {
        self.0.tenant = Some(tenant.to_string());
        self
    }

    pub fn detail(mut self, key: &str, value: impl std::fmt::Display) -> Event {
        self.0.details.push((key.to_string(), value.to_string()));
        self
    }

    pub fn set_tenant(&mut self, tenant: &str) {
        self.0.tenant = Some(tenant.to_string());
    }

    pub fn push(&mut self, key: &str, value: impl std::fmt::Display) {
        self.0.details.push((key.to_string(), value.to_string()));
    }

    pub fn record(self, audit: &Audit) {
        audit.record(self);
    }
}

/// The actor of what an SFTP client did.
pub fn sftp_actor(peer: SocketAddr) -> String {
    format!("sftp {peer}")
}

impl Audit {
    /// Appends straight to `store`, for commands run without `serve`.
    pub fn direct(store: Store) -> Audit {
        Audit {
            sink: Sink::Direct(store),
        }
    }

    /// A queue and the writer that empties it into `store`.
    pub fn queued(store: Store) -> (Audit, AuditWriter) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Audit { sink: Sink::Queue(tx) }, AuditWriter { store, rx })
    }

    pub fn record(&self, event: Event) {
        let event = event.0;
        match &self.sink {
            Sink::Queue(tx) => {
                if tx.send(event).is_err() {
                    tracing::warn!("audit writer stopped; an audit event after shutdown is not kept");
                }
            }
            Sink::Direct(store) => {
                if let Err(e) = store.audit(std::slice::from_ref(&event)) {
                    tracing::error!(error = %e, action = %event.action, "cannot write the audit log");
                }
            }
        }
    }
}

/// Most events held in memory while the store cannot take them (a full disk): beyond it, further
/// events are kept only as a count per action, appended as one `audit.overflow` event when the
/// store takes writes again. While any are held, no new work is taken ([`crate::disk::set_audit_backlog`]).
const HELD_MAX: usize = 50_000;

/// The task that appends queued events.
pub struct AuditWriter {
    store: Store,
    rx: mpsc::UnboundedReceiver<AuditEvent>,
}

/// Events not written yet, in order, and those past [`HELD_MAX`] counted by action.
#[derive(Default)]
struct Held {
    events: Vec<AuditEvent>,
    overflow: std::collections::BTreeMap<String, u64>,
}

impl Held {
    fn push(&mut self, event: AuditEvent) {
        if self.events.len() < HELD_MAX {
            self.events.push(event);
        } else {
            *self.overflow.entry(event.action).or_default() += 1;
        }
    }

    /// The next group to append: held events first, then the overflow count.
    fn group(&mut self) -> Vec<AuditEvent> {
        let n = self.events.len().min(GROUP);
        let mut group: Vec<AuditEvent> = self.events.drain(..n).collect();
        if self.events.is_empty() && !self.overflow.is_empty() && group.len() < GROUP {
            let mut e = Event::new("audit.overflow", "smsdrop").detail(
                "why",
                "the store could not take writes and more events came than could be held",
            );
            for (action, n) in std::mem::take(&mut self.overflow) {
                e.push(&action, n);
            }
            group.push(e.0);
        }
        group
    }

    fn put_back(&mut self, group: Vec<AuditEvent>) {
        let mut rest = std::mem::replace(&mut self.events, group);
        self.events.append(&mut rest);
        // An overflow event put back is counted again when taken next.
        if let Some(pos) = self
            .events
            .iter()
            .position(|e| e.action == "audit.overflow" && e.actor == "smsdrop")
        {
            let e = self.events.remove(pos);
            for (k, v) in e.details {
                if let Ok(v) = v.parse::<u64>() {
                    *self.overflow.entry(k).or_default() += v;
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.events.is_empty() && self.overflow.is_empty()
    }
}

impl AuditWriter {
    /// Appends until `stop`, then whatever is still queued. Events the store cannot take (a full
    /// disk) are held and tried again, every second at first, then up to every 30 s.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut held = Held::default();
        let mut retry = std::time::Duration::from_secs(1);
        loop {
            if held.is_empty() && !self.take(&mut held, &stop, None).await {
                break;
            }
            while held.events.len() < GROUP {
                match self.rx.try_recv() {
                    Ok(e) => held.push(e),
                    Err(_) => break,
                }
            }
            let group = held.group();
            match self.append(group).await {
                Ok(()) => {
                    if held.is_empty() && crate::disk::set_audit_backlog(false) {
                        tracing::info!("the audit log is written again; every held event is in it");
                    }
                    retry = std::time::Duration::from_secs(1);
                }
                Err((group, e)) => {
                    held.put_back(group);
                    if !crate::disk::set_audit_backlog(true) {
                        tracing::error!(error = %e, held = held.events.len(), "cannot write the audit log; events are held and no new work is taken until it can");
                    }
                    // Wait, taking in what comes meanwhile.
                    let until = tokio::time::Instant::now() + retry;
                    retry = (retry * 2).min(std::time::Duration::from_secs(30));
                    while self.take(&mut held, &stop, Some(until)).await {}
                    if stop.is_cancelled() {
                        break;
                    }
                }
            }
        }
        self.rx.close();
        while let Ok(e) = self.rx.try_recv() {
            held.push(e);
        }
        while !held.is_empty() {
            let group = held.group();
            if let Err((group, e)) = self.append(group).await {
                held.put_back(group);
                tracing::error!(error = %e, events = held.events.len(), "cannot write the audit log at shutdown; these events are not kept");
                break;
            }
        }
    }

    /// Waits for one event into `held`; `false` once the queue is closed, `stop` is cancelled or
    /// `until` has come.
    async fn take(&mut self, held: &mut Held, stop: &CancellationToken, until: Option<tokio::time::Instant>) -> bool {
        let deadline = async {
            match until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            e = self.rx.recv() => match e {
                Some(e) => {
                    held.push(e);
                    true
                }
                None => false,
            },
            _ = stop.cancelled() => false,
            _ = deadline => false,
        }
    }

    async fn append(&self, group: Vec<AuditEvent>) -> Result<(), (Vec<AuditEvent>, crate::store::StoreError)> {
        if group.is_empty() {
            return Ok(());
        }
        let group = std::sync::Arc::new(group);
        let g = group.clone();
        match self.store.blocking(move |s| s.audit(&g)).await {
            Ok(()) => Ok(()),
            Err(e) => Err((std::sync::Arc::try_unwrap(group).unwrap_or_else(|a| (*a).clone()), e)),
        }
    }
}

/// One entry as a JSON line for `audit export`.
pub fn entry_json(entry: &AuditEntry) -> String {
    let at = jiff::Timestamp::from_millisecond(entry.event.at)
        .map(|t| t.to_string())
        .unwrap_or_default();
    let details: serde_json::Map<String, serde_json::Value> = entry
        .event
        .details
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let prev: String = entry.prev.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    });
    serde_json::json!({
        "seq": entry.seq,
        "at": at,
        "action": entry.event.action,
        "tenant": entry.event.tenant,
        "actor": entry.event.actor,
        "details": details,
        "prev": prev,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(action: &str) -> AuditEvent {
        Event::new(action, "test").0
    }

    #[test]
    fn held_events_keep_their_order_and_past_the_bound_are_counted_not_dropped() {
        let mut held = Held::default();
        for i in 0..HELD_MAX + 3 {
            held.push(event(if i < HELD_MAX { "sftp.login" } else { "sftp.refused" }));
        }
        assert_eq!(held.events.len(), HELD_MAX);
        assert_eq!(held.overflow.get("sftp.refused"), Some(&3));
        held.push(event("late")); // counted: still full
        // A group that fails goes back in front, in order.
        let first = held.group();
        assert_eq!(first.len(), GROUP);
        held.put_back(first.clone());
        assert_eq!(held.events.len(), HELD_MAX);
        assert_eq!(held.events[..GROUP], first[..]);
        // Drained to the end, the overflow comes last as one event with the counts.
        let mut all = Vec::new();
        while !held.is_empty() {
            all.extend(held.group());
        }
        assert_eq!(all.len(), HELD_MAX + 1);
        let last = all.last().expect("overflow event");
        assert_eq!(last.action, "audit.overflow");
        assert!(last.details.contains(&("sftp.refused".to_string(), "3".to_string())));
        assert!(last.details.contains(&("late".to_string(), "1".to_string())));
    }

    #[test]
    fn an_overflow_event_put_back_is_counted_again_not_twice() {
        let mut held = Held::default();
        held.overflow.insert("x".into(), 2);
        let group = held.group();
        assert_eq!(group.len(), 1);
        held.put_back(group);
        assert!(held.events.is_empty());
        assert_eq!(held.overflow.get("x"), Some(&2));
    }
}
