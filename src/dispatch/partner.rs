//! The interface every way out implements: SMPP and HTTP partners plug in here (docs/partners.md).

use std::future::Future;
use std::pin::Pin;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::sms::message::Message;
use crate::sms::mo::Mo;
use crate::sms::receipt::Receipt;

/// One message handed to a partner.
#[derive(Debug, Clone, Copy)]
pub struct Outbound<'a> {
    pub id: u64,
    pub tenant: &'a str,
    pub batch: u64,
    pub message: &'a Message,
    /// Unix seconds after which the message is not worth delivering (its validity).
    pub valid_until: i64,
}

/// What a partner did with a message it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// Taken; a delivery receipt will follow.
    Accepted { partner_id: String },
    /// Taken and already final (the `sink` partner).
    Delivered { partner_id: String },
}

/// Why a partner did not take a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartnerError {
    /// Throttling, time-outs, a lost connection: try again later.
    #[error("transient partner error: {detail}")]
    Transient { detail: String },
    /// The partner will never take this message (bad number, refused content).
    #[error("permanent partner error: {detail}")]
    Permanent { detail: String },
}

pub type SubmitFuture<'a> = Pin<Box<dyn Future<Output = Vec<Result<Submitted, PartnerError>>> + Send + 'a>>;

/// A way out to the telecom network.
pub trait Partner: Send + Sync {
    /// The partner's id in the configuration.
    fn id(&self) -> &str;

    /// Messages that may be with the partner and not yet recorded as sent: after a crash, at
    /// most this many are sent again.
    fn window(&self) -> usize;

    /// Messages handed over in one `submit` call.
    fn batch_size(&self) -> usize {
        1
    }

    /// Its own measurements of its submissions, for its health (`dispatch::health`); `None` for
    /// a partner that is never unwell (`sink`).
    fn meter(&self) -> Option<&super::health::Meter> {
        None
    }

    /// Whether it has a connection to send on now.
    fn is_connected(&self) -> bool {
        true
    }

    /// Submits messages; answers one result per message, in order. A partner must not answer
    /// `Accepted` or `Delivered` before the message is really out of smsdrop's hands.
    fn submit<'a>(&'a self, messages: &'a [Outbound<'a>]) -> SubmitFuture<'a>;
}

/// What a partner receives from the network: a delivery receipt or an incoming message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Receipt(Receipt),
    Message(Mo),
}

/// Something a partner received, to be made durable; `ack` says whether it was, and only then
/// may the partner acknowledge it to the network.
#[derive(Debug)]
pub struct Inbound {
    pub partner: String,
    pub what: Incoming,
    pub ack: oneshot::Sender<bool>,
}

/// A partner's sending pace: its `tps` cap, and pauses it asked for (`ESME_RTHROTTLED`, HTTP
/// 429). Shared by every send of the partner.
#[derive(Debug)]
pub struct Pacer {
    tps: Option<u32>,
    /// Unix ms before which nothing is sent.
    paused_until: AtomicU64,
    /// When the next send may go under the cap.
    next: tokio::sync::Mutex<tokio::time::Instant>,
}

fn now_ms() -> u64 {
    crate::clock::now_ms().max(0) as u64
}

impl Pacer {
    pub fn new(tps: Option<u32>) -> Pacer {
        Pacer {
            tps,
            paused_until: AtomicU64::new(0),
            next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Nothing is sent for `pause` from now.
    pub fn pause(&self, pause: Duration) {
        self.paused_until
            .store(now_ms() + pause.as_millis() as u64, Ordering::Relaxed);
    }

    /// Waits until one more send may go.
    pub async fn wait(&self) {
        let paused = self.paused_until.load(Ordering::Relaxed);
        let now = now_ms();
        if paused > now {
            tokio::time::sleep(Duration::from_millis(paused - now)).await;
        }
        if let Some(tps) = self.tps {
            let gap = Duration::from_secs_f64(1.0 / f64::from(tps));
            let mut next = self.next.lock().await;
            let now = tokio::time::Instant::now();
            let at = (*next).max(now);
            *next = at + gap;
            drop(next);
            tokio::time::sleep_until(at).await;
        }
    }
}
