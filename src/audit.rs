//! The audit trail (SPEC §8 `audit verify|export`): who logged in or was refused, which files
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
            at: jiff::Timestamp::now().as_millisecond(),
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

/// The task that appends queued events.
pub struct AuditWriter {
    store: Store,
    rx: mpsc::UnboundedReceiver<AuditEvent>,
}

impl AuditWriter {
    /// Appends until `stop`, then whatever is still queued.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            let first = tokio::select! {
                biased;
                e = self.rx.recv() => match e {
                    Some(e) => e,
                    None => break,
                },
                _ = stop.cancelled() => break,
            };
            let mut group = vec![first];
            while group.len() < GROUP {
                match self.rx.try_recv() {
                    Ok(e) => group.push(e),
                    Err(_) => break,
                }
            }
            self.append(group).await;
        }
        self.rx.close();
        let mut rest = Vec::new();
        while let Ok(e) = self.rx.try_recv() {
            rest.push(e);
        }
        self.append(rest).await;
    }

    async fn append(&self, group: Vec<AuditEvent>) {
        if group.is_empty() {
            return;
        }
        let n = group.len();
        if let Err(e) = self.store.blocking(move |s| s.audit(&group)).await {
            tracing::error!(error = %e, events = n, "cannot write the audit log; these events are lost");
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
