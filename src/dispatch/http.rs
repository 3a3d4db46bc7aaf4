//! The HTTP partner (docs/partners.md): one JSON request per message, receipts and incoming messages by
//! a signed webhook.
//!
//! Request: `POST <url>` with `Content-Type: application/json` (and `Authorization: Bearer …`
//! when `token_file` is set):
//! `{"id": "268435456", "tenant": "acme", "batch": 16, "to": "+33612345678", "from": "ACME",
//!   "text": "…", "encoding": "gsm7", "parts": 1, "valid_until": "2026-12-03T13:00:00Z"}`.
//! `id` is smsdrop's message id: a partner may use it to drop a request it already took
//! (smsdrop sends again what it had in flight when it stopped uncleanly).
//! Answer: 2xx with `{"id": "<the partner's id>"}` (`message_id` is read too). 408, 425, 429
//! and 5xx, time-outs and connection errors are transient (429 pauses sending for its
//! `Retry-After`, one second by default, and is not held against the partner's health); any
//! other status is permanent: the message ends `rejected` with the status and the start of the
//! body.
//!
//! Webhook (`webhook_listen`): `POST` of one JSON event or an array of them, signed with the
//! shared secret: header `X-Smsdrop-Signature: sha256=<hex of HMAC-SHA256(secret, body)>`.
//! `{"type": "receipt", "id": "<partner id>", "status": "DELIVRD", "error": "000"}` (status
//! words as in SMPP receipts, or smsdrop's own: delivered, undeliverable, expired, rejected);
//! `{"type": "mo", "from": "+33612345678", "to": "ACME", "text": "STOP"}`. Answer 200 once every
//! event of the call is durable; 401 for a missing or wrong signature (logged with the source
//! address), 400 for a body that does not read, 413 above 64 KiB, 408 for a body not received
//! within 10 s, 503 when the store could not keep it (the partner should try again). A signed
//! body that was already kept in the last 24 hours (a replay, or the partner's retry of a call
//! whose answer it lost) is answered 200 and not kept again; the bodies seen are remembered in
//! memory, at most [`REPLAYS_REMEMBERED`] of them, and from the start of `serve`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::health::Meter;
use super::partner::{Inbound, Incoming, Outbound, Pacer, Partner, PartnerError, SubmitFuture, Submitted};
use crate::config;
use crate::sms::mo::Mo;
use crate::sms::receipt::{Receipt, status_of_word};

/// A webhook body larger than this is refused.
const WEBHOOK_MAX_BYTES: usize = 64 << 10;
/// Webhook connections served at once.
const WEBHOOK_CONNECTIONS: usize = 64;
/// How long a webhook body may take to arrive, once its head has.
const WEBHOOK_BODY_DEADLINE: Duration = Duration::from_secs(10);
/// Signed bodies remembered against replays, and for how long.
const REPLAYS_REMEMBERED: usize = 100_000;
const REPLAY_WINDOW_SECS: i64 = 24 * 3600;
/// A partner's answer read, at most.
const ANSWER_MAX_BYTES: usize = 64 << 10;

pub struct HttpPartner {
    id: String,
    cfg: config::Http,
    client: reqwest::Client,
    token: Option<String>,
    window: Semaphore,
    /// The `tps` cap, and the pause a 429 asks for.
    pacer: Pacer,
    meter: Meter,
    incoming: mpsc::UnboundedSender<Inbound>,
    /// Digests of the signed webhook bodies kept, with when (against replays).
    seen: std::sync::Mutex<std::collections::HashMap<[u8; 32], i64>>,
}

/// Warnings a webhook client can make repeat: at most one line a minute per address.
static WEBHOOK_WARNINGS: crate::limits::Throttle = crate::limits::Throttle::new(Duration::from_secs(60));

/// Why the HTTP partner could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum HttpSetupError {
    #[error("{what} {}: {cause}", path.display())]
    Secret {
        what: &'static str,
        path: std::path::PathBuf,
        cause: std::io::Error,
    },
    #[error("HTTP client: {0}")]
    Client(reqwest::Error),
    #[error("webhook listener {addr}: {cause}")]
    Listen { addr: SocketAddr, cause: std::io::Error },
}

impl From<reqwest::Error> for HttpSetupError {
    fn from(e: reqwest::Error) -> Self {
        HttpSetupError::Client(e)
    }
}

fn read_secret(what: &'static str, path: &std::path::Path) -> Result<String, HttpSetupError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
        .map_err(|source| HttpSetupError::Secret {
            what,
            path: path.to_path_buf(),
            cause: source,
        })
}

#[derive(Serialize)]
struct MessageRequest<'a> {
    id: String,
    tenant: &'a str,
    batch: u64,
    to: &'a str,
    from: &'a str,
    text: &'a str,
    encoding: &'static str,
    parts: u8,
    valid_until: String,
}

#[derive(Deserialize)]
struct MessageAnswer {
    id: Option<serde_json::Value>,
    message_id: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum WebhookEvent {
    Receipt {
        id: serde_json::Value,
        status: String,
        #[serde(default)]
        error: String,
    },
    Mo {
        from: String,
        to: String,
        text: String,
    },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum WebhookBody {
    One(WebhookEvent),
    Many(Vec<WebhookEvent>),
}

/// A JSON id written as a string or a number.
fn id_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) if !s.is_empty() && s.len() <= 64 => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Whether an HTTP status is worth trying again later.
pub fn is_transient_status(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.as_u16() == 425
}

/// A webhook answer: a status and one line of text.
fn answer(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *r.status_mut() = status;
    r
}

/// A webhook call's body and signature header, or the answer that refuses it: not a `POST`, a
/// body over 64 KiB (refused before a byte of it is read when its declared length says so: a
/// client that asked `Expect: 100-continue`, as curl does for large bodies, then sends nothing,
/// and no unread body is left to reset the connection under the answer), or a body that takes
/// longer than [`WEBHOOK_BODY_DEADLINE`].
async fn read_webhook(req: Request<hyper::body::Incoming>) -> Result<(Bytes, Option<String>), Response<Full<Bytes>>> {
    if req.method() != hyper::Method::POST {
        return Err(answer(StatusCode::METHOD_NOT_ALLOWED, "POST only"));
    }
    let signature = req
        .headers()
        .get("x-smsdrop-signature")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > WEBHOOK_MAX_BYTES as u64) {
        return Err(answer(StatusCode::PAYLOAD_TOO_LARGE, "body too large (64 KiB at most)"));
    }
    match tokio::time::timeout(
        WEBHOOK_BODY_DEADLINE,
        Limited::new(req.into_body(), WEBHOOK_MAX_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(b)) => Ok((b.to_bytes(), signature)),
        Ok(Err(_)) => Err(answer(StatusCode::PAYLOAD_TOO_LARGE, "body too large (64 KiB at most)")),
        Err(_) => Err(answer(StatusCode::REQUEST_TIMEOUT, "body not received within 10 s")),
    }
}

/// The signature a webhook body must carry.
fn signature_ok(secret: &[u8], body: &[u8], header: Option<&str>) -> bool {
    let Some(hex) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else {
        return false;
    };
    let Some(given) = (0..hex.len())
        .step_by(2)
        .map(|i| hex.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

impl HttpPartner {
    pub fn new(
        id: &str,
        cfg: config::Http,
        incoming: mpsc::UnboundedSender<Inbound>,
    ) -> Result<Arc<HttpPartner>, HttpSetupError> {
        let token = cfg
            .token_file
            .as_deref()
            .map(|p| read_secret("token_file", p))
            .transpose()?;
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(cfg.window)
            .user_agent(concat!("smsdrop/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Arc::new(HttpPartner {
            id: id.to_string(),
            window: Semaphore::new(cfg.window),
            pacer: Pacer::new(cfg.tps),
            meter: Meter::of(id),
            seen: Default::default(),
            client,
            token,
            incoming,
            cfg,
        }))
    }

    /// Starts the webhook listener, if one is configured; it ends at `shutdown`.
    pub async fn start(
        self: &Arc<Self>,
        tracker: &tokio_util::task::TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<(), HttpSetupError> {
        let (Some(addr), Some(secret_file)) = (self.cfg.webhook_listen, &self.cfg.webhook_secret_file) else {
            return Ok(());
        };
        let secret = Arc::new(read_secret("webhook_secret_file", secret_file)?.into_bytes());
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| HttpSetupError::Listen { addr, cause: source })?;
        let bound = listener.local_addr().unwrap_or(addr);
        tracing::info!(partner = %self.id, addr = %bound, "HTTP partner webhook listening");
        let me = self.clone();
        tracker.spawn(crate::httpd::serve(
            listener,
            WEBHOOK_CONNECTIONS,
            "webhook",
            shutdown,
            move |req, peer| {
                let (me, secret) = (me.clone(), secret.clone());
                async move { me.webhook(req, &secret, peer).await }
            },
        ));
        Ok(())
    }

    /// One webhook call: checked, read, made durable, answered.
    async fn webhook(
        &self,
        req: Request<hyper::body::Incoming>,
        secret: &[u8],
        peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        let (body, signature) = match read_webhook(req).await {
            Ok(read) => read,
            Err(refused) => return refused,
        };
        if !signature_ok(secret, &body, signature.as_deref()) {
            if let Some(held) = WEBHOOK_WARNINGS.allow(&format!("signature {}", peer.ip())) {
                tracing::warn!(partner = %self.id, %peer, held_back = held, "webhook call with a missing or wrong signature refused");
            }
            return answer(StatusCode::UNAUTHORIZED, "bad signature");
        }
        let digest: [u8; 32] = {
            use sha2::Digest;
            sha2::Sha256::digest(&body).into()
        };
        let now = crate::clock::now();
        if self
            .seen
            .lock()
            .map(|seen| seen.get(&digest).is_some_and(|at| now - at < REPLAY_WINDOW_SECS))
            .unwrap_or(false)
        {
            if let Some(held) = WEBHOOK_WARNINGS.allow(&format!("replay {}", peer.ip())) {
                tracing::warn!(partner = %self.id, %peer, held_back = held, "a webhook body already kept came again; answered, not kept twice");
            }
            return answer(StatusCode::OK, "already received");
        }
        let events = match serde_json::from_slice::<WebhookBody>(&body) {
            Ok(WebhookBody::One(e)) => vec![e],
            Ok(WebhookBody::Many(v)) if v.len() <= 1000 => v,
            Ok(WebhookBody::Many(_)) => return answer(StatusCode::PAYLOAD_TOO_LARGE, "1000 events at most"),
            Err(e) => {
                tracing::info!(partner = %self.id, %peer, error = %e, "webhook body does not read");
                return answer(StatusCode::BAD_REQUEST, "not a receipt or mo event");
            }
        };
        if let Err(refused) = self.keep(events).await {
            return refused;
        }
        self.remember(digest, now);
        answer(StatusCode::OK, "ok")
    }

    /// Hands each event to the dispatcher and waits until every one is durable.
    async fn keep(&self, events: Vec<WebhookEvent>) -> Result<(), Response<Full<Bytes>>> {
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            let what = match event {
                WebhookEvent::Receipt { id, status, error } => {
                    let Some(id) = id_text(&id) else {
                        return Err(answer(StatusCode::BAD_REQUEST, "a receipt needs an id"));
                    };
                    Incoming::Receipt(Receipt {
                        id,
                        status: status_of_word(&status),
                        state: status.to_ascii_uppercase(),
                        error,
                    })
                }
                WebhookEvent::Mo { from, to, text } => Incoming::Message(Mo {
                    from,
                    to,
                    text,
                    received_at: crate::clock::now_ms(),
                }),
            };
            let (ack, durable) = oneshot::channel();
            let inbound = Inbound {
                partner: self.id.clone(),
                what,
                ack,
            };
            if self.incoming.send(inbound).is_err() {
                return Err(answer(StatusCode::SERVICE_UNAVAILABLE, "stopping"));
            }
            acks.push(durable);
        }
        for durable in acks {
            if durable.await != Ok(true) {
                return Err(answer(StatusCode::SERVICE_UNAVAILABLE, "not kept; send again"));
            }
        }
        Ok(())
    }

    /// Remembers a body kept, for [`REPLAY_WINDOW_SECS`], within [`REPLAYS_REMEMBERED`].
    fn remember(&self, digest: [u8; 32], now: i64) {
        let Ok(mut seen) = self.seen.lock() else { return };
        if seen.len() >= REPLAYS_REMEMBERED {
            seen.retain(|_, at| now - *at < REPLAY_WINDOW_SECS);
            if seen.len() >= REPLAYS_REMEMBERED {
                // Still full: forget the oldest half.
                let mut times: Vec<i64> = seen.values().copied().collect();
                times.sort_unstable();
                let cut = times[times.len() / 2];
                seen.retain(|_, at| *at > cut);
            }
        }
        seen.insert(digest, now);
    }

    async fn send(&self, m: &Outbound<'_>) -> Result<Submitted, PartnerError> {
        let body = MessageRequest {
            id: m.id.to_string(),
            tenant: m.tenant,
            batch: m.batch,
            to: &m.message.phone,
            from: &m.message.sender,
            text: &m.message.text,
            encoding: m.message.coding.as_str(),
            parts: m.message.parts,
            valid_until: jiff::Timestamp::from_second(m.valid_until)
                .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_default(),
        };
        let _permit = self.window.acquire().await.map_err(|_| PartnerError::Transient {
            detail: "partner stopped".into(),
        })?;
        self.pacer.wait().await;
        let mut request = self.client.post(self.cfg.url.clone()).json(&body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let sent = tokio::time::Instant::now();
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                self.meter.record(sent.elapsed(), false);
                let detail = if e.is_timeout() {
                    format!("no answer within {} s", self.cfg.timeout.as_secs())
                } else {
                    format!("HTTP request failed: {}", e.without_url())
                };
                return Err(PartnerError::Transient { detail });
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let text = read_limited(response).await;
        let latency = sent.elapsed();
        if status.is_success() {
            self.meter.record(latency, true);
            let id = serde_json::from_slice::<MessageAnswer>(&text)
                .ok()
                .and_then(|a| a.id.or(a.message_id))
                .and_then(|v| id_text(&v));
            if id.is_none() {
                tracing::warn!(partner = %self.id, "HTTP partner took a message without giving its id: no receipt can match it");
            }
            return Ok(Submitted::Accepted {
                partner_id: id.unwrap_or_default(),
            });
        }
        let start: String = String::from_utf8_lossy(&text).chars().take(200).collect();
        let detail = format!("HTTP {}: {}", status.as_u16(), start.trim());
        if status == StatusCode::TOO_MANY_REQUESTS {
            let pause = retry_after.unwrap_or(1).clamp(1, 300);
            self.pacer.pause(Duration::from_secs(pause));
            return Err(PartnerError::Transient { detail });
        }
        let transient = is_transient_status(status);
        self.meter.record(latency, !transient);
        Err(if transient {
            PartnerError::Transient { detail }
        } else {
            PartnerError::Permanent { detail }
        })
    }
}

/// The start of a response body, at most [`ANSWER_MAX_BYTES`].
async fn read_limited(mut response: reqwest::Response) -> Vec<u8> {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = ANSWER_MAX_BYTES.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= ANSWER_MAX_BYTES {
            break;
        }
    }
    out
}

impl Partner for HttpPartner {
    fn id(&self) -> &str {
        &self.id
    }

    fn window(&self) -> usize {
        self.cfg.window
    }

    fn meter(&self) -> Option<&Meter> {
        Some(&self.meter)
    }

    fn submit<'a>(&'a self, messages: &'a [Outbound<'a>]) -> SubmitFuture<'a> {
        Box::pin(async move { futures_util::future::join_all(messages.iter().map(|m| self.send(m))).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures() {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(b"{}");
        let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert!(signature_ok(b"s3cret", b"{}", Some(&format!("sha256={hex}"))));
        assert!(!signature_ok(b"other", b"{}", Some(&format!("sha256={hex}"))));
        assert!(!signature_ok(b"s3cret", b"{ }", Some(&format!("sha256={hex}"))));
        assert!(!signature_ok(b"s3cret", b"{}", None));
        assert!(!signature_ok(b"s3cret", b"{}", Some("sha256=zz")));
    }

    #[test]
    fn statuses() {
        assert!(is_transient_status(StatusCode::TOO_MANY_REQUESTS));
        assert!(is_transient_status(StatusCode::BAD_GATEWAY));
        assert!(!is_transient_status(StatusCode::BAD_REQUEST));
        assert!(!is_transient_status(StatusCode::UNAUTHORIZED));
    }

    #[test]
    fn webhook_bodies() {
        let one: WebhookBody = serde_json::from_str(r#"{"type":"receipt","id":4711,"status":"DELIVRD"}"#).unwrap();
        assert!(matches!(one, WebhookBody::One(WebhookEvent::Receipt { .. })));
        let many: WebhookBody =
            serde_json::from_str(r#"[{"type":"mo","from":"+33612345678","to":"ACME","text":"STOP"}]"#).unwrap();
        assert!(matches!(many, WebhookBody::Many(v) if v.len() == 1));
        assert_eq!(id_text(&serde_json::json!(4711)).as_deref(), Some("4711"));
    }
}
