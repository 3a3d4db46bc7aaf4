//! `[metrics] listen`: Prometheus text at `/metrics`, and `/healthz` and `/readyz`.
//!
//! Encoded by the `prometheus-client` crate (OpenMetrics text, which Prometheus reads). Each
//! scrape builds a registry from what the store and the dispatcher know at that moment: messages
//! by tenant and status, queue depth, partner health, window use and latency, the store's size,
//! the sweeper's and the re-sealer's totals, active bans. Names follow Prometheus conventions:
//! the `smsdrop_` prefix, `_total` on counters, seconds and bytes.
//!
//! What happened since start (files and lines by outcome, line rejections by reason, SFTP
//! logins, refusals and open sessions, mails, reloads, submit latency per partner) is counted
//! as it happens in [`events`], one process-wide set of counters, and read by each scrape.
//!
//! `/healthz` answers while the process does; `/readyz` only when the store answers a read and
//! free space under `state_dir` is above `min_free_space` (`crate::disk`).

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::codes::MessageStatus;
use crate::dispatch::HealthBoard;
use crate::store::records::BatchState;
use crate::store::{Store, StoreError};

/// Connections at once (a scrape reads every batch record); more are refused.
const SCRAPES: usize = 16;

type Labels = Vec<(&'static str, String)>;

/// A histogram of seconds from 1 ms to about 16 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// A histogram of whole seconds from 1 s to about 9 hours (receipts are stamped in seconds).
fn delay_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

/// Counters of events since start; see [`events`].
pub struct Events {
    files: Family<Labels, Counter>,
    lines: Family<Labels, Counter>,
    line_rejections: Family<Labels, Counter>,
    sftp_logins: Family<Labels, Counter>,
    sftp_refusals: Family<Labels, Counter>,
    sftp_sessions: Gauge,
    mails: Family<Labels, Counter>,
    reloads: Family<Labels, Counter>,
    submit_latency: Family<Labels, Histogram, fn() -> Histogram>,
    receipt_delay: Family<Labels, Histogram, fn() -> Histogram>,
    receipts_ignored: Family<Labels, Counter>,
}

/// The process's event counters.
pub fn events() -> &'static Events {
    static EVENTS: std::sync::LazyLock<Events> = std::sync::LazyLock::new(|| {
        let events = Events {
            files: Family::default(),
            lines: Family::default(),
            line_rejections: Family::default(),
            sftp_logins: Family::default(),
            sftp_refusals: Family::default(),
            sftp_sessions: Gauge::default(),
            mails: Family::default(),
            reloads: Family::default(),
            submit_latency: Family::new_with_constructor(latency_histogram),
            receipt_delay: Family::new_with_constructor(delay_histogram),
            receipts_ignored: Family::default(),
        };
        // Series with fixed labels exist from the start at 0, so that rates see the first one.
        for outcome in ["queued", "sent", "failed"] {
            let _ = events.mails.get_or_create(&vec![("outcome", outcome.to_string())]);
        }
        for result in ["applied", "refused"] {
            let _ = events.reloads.get_or_create(&vec![("result", result.to_string())]);
        }
        events
    });
    &EVENTS
}

impl Events {
    /// A batch file was ingested: its outcome, its lines, its rejections by reason.
    pub fn batch(&self, batch: &crate::store::records::BatchRecord) {
        let tenant = || ("tenant", batch.tenant.clone());
        let outcome = batch.file_reason.map(|r| r.as_str()).unwrap_or("accepted");
        self.files
            .get_or_create(&vec![tenant(), ("outcome", outcome.to_string())])
            .inc();
        self.lines
            .get_or_create(&vec![tenant(), ("outcome", "accepted".to_string())])
            .inc_by(batch.accepted);
        self.lines
            .get_or_create(&vec![tenant(), ("outcome", "rejected".to_string())])
            .inc_by(batch.rejected);
        for (reason, n) in &batch.reasons {
            self.line_rejections
                .get_or_create(&vec![tenant(), ("reason", reason.as_str().to_string())])
                .inc_by(*n);
        }
    }

    pub fn sftp_login(&self, tenant: &str) {
        self.sftp_logins
            .get_or_create(&vec![("tenant", tenant.to_string())])
            .inc();
        self.sftp_sessions.inc();
    }

    pub fn sftp_logout(&self) {
        self.sftp_sessions.dec();
    }

    pub fn sftp_refused(&self, reason: &str) {
        self.sftp_refusals
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc();
    }

    /// `what`: `queued`, `sent` or `failed` (given up).
    pub fn mail(&self, what: &'static str) {
        self.mails.get_or_create(&vec![("outcome", what.to_string())]).inc();
    }

    pub fn reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "refused" };
        self.reloads.get_or_create(&vec![("result", result.to_string())]).inc();
    }

    /// The histogram a partner's submit latencies go to.
    pub fn submit_latency(&self, partner: &str) -> Histogram {
        self.submit_latency
            .get_or_create(&vec![("partner", partner.to_string())])
            .clone()
    }

    /// A receipt that finds no message, dropped because too many are kept already.
    pub fn receipt_dropped(&self, partner: &str) {
        self.receipts_ignored
            .get_or_create(&vec![
                ("partner", partner.to_string()),
                ("why", "too_many_kept".to_string()),
            ])
            .inc();
    }

    /// A `deliver_sm` that could not be read (a receipt without an id, a message without a
    /// sender): acknowledged, since sending it again would not help, and counted.
    pub fn deliver_unreadable(&self, partner: &str) {
        self.receipts_ignored
            .get_or_create(&vec![
                ("partner", partner.to_string()),
                ("why", "unreadable".to_string()),
            ])
            .inc();
    }

    /// A delivery receipt was applied `seconds` after its message was submitted.
    pub fn receipt_delay(&self, partner: &str, seconds: i64) {
        self.receipt_delay
            .get_or_create(&vec![("partner", partner.to_string())])
            .observe(seconds.max(0) as f64);
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "files",
            "Batch files taken in, by tenant and outcome (accepted or the file's reason code)",
            self.files.clone(),
        );
        registry.register(
            "lines",
            "Data lines of batch files, by tenant and outcome (accepted, rejected)",
            self.lines.clone(),
        );
        registry.register(
            "line_rejections",
            "Rejected lines by tenant and reason code",
            self.line_rejections.clone(),
        );
        registry.register("sftp_logins", "SFTP logins let in, by tenant", self.sftp_logins.clone());
        registry.register(
            "deliver_sm_ignored",
            "Incoming deliver_sm acknowledged and not kept, by partner and why (unreadable, too_many_kept)",
            self.receipts_ignored.clone(),
        );
        registry.register(
            "sftp_refusals",
            "SFTP connections and logins refused, by reason",
            self.sftp_refusals.clone(),
        );
        registry.register(
            "sftp_sessions",
            "SFTP sessions logged in now",
            self.sftp_sessions.clone(),
        );
        registry.register(
            "mails",
            "Alert and report mails, by outcome (queued, sent, failed)",
            self.mails.clone(),
        );
        registry.register(
            "reloads",
            "Configuration reloads, by result (applied, refused)",
            self.reloads.clone(),
        );
        registry.register(
            "submit_latency_seconds",
            "Time from handing a message to a partner to its answer (submit_sm_resp, HTTP response)",
            self.submit_latency.clone(),
        );
        registry.register(
            "receipt_delay_seconds",
            "Time from a message's submission to its delivery receipt, by partner",
            self.receipt_delay.clone(),
        );
    }
}

/// What the listener needs to answer.
#[derive(Clone)]
pub struct Exporter {
    pub store: Store,
    pub config: crate::reload::Live,
    pub partners: HealthBoard,
}

fn gauge_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    registry.register(name, help, family.clone());
    family
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let g = Gauge::<i64>::default();
    g.set(value as i64);
    registry.register(name, help, g);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

impl Exporter {
    /// The text of one scrape.
    pub fn render(&self) -> Result<String, StoreError> {
        let config = self.config.get();
        let mut registry = Registry::with_prefix("smsdrop");
        events().register(&mut registry);
        let messages = gauge_family(
            &mut registry,
            "messages",
            "Messages held in the store, by tenant and status",
        );
        let depth = gauge_family(
            &mut registry,
            "queue_depth",
            "Messages still to be sent or answered (queued, held, submitted), by tenant",
        );
        let open = gauge_family(
            &mut registry,
            "open_batches",
            "Batches not finished yet (ingesting, queued, held), by tenant",
        );
        for tenant in config.tenants.keys() {
            let mut counts = [0u64; 9];
            let mut open_batches = 0;
            for b in self.store.batches(Some(tenant))? {
                if matches!(b.state, BatchState::Queued | BatchState::Ingesting | BatchState::Held) {
                    open_batches += 1;
                }
                for (i, c) in b.counts.iter().enumerate() {
                    counts[i] += c;
                }
            }
            for s in MessageStatus::ALL {
                messages
                    .get_or_create(&vec![("tenant", tenant.clone()), ("status", s.as_str().to_string())])
                    .set(counts[*s as usize] as i64);
            }
            let d = counts[MessageStatus::Queued as usize]
                + counts[MessageStatus::Held as usize]
                + counts[MessageStatus::Submitted as usize];
            depth.get_or_create(&vec![("tenant", tenant.clone())]).set(d as i64);
            open.get_or_create(&vec![("tenant", tenant.clone())]).set(open_batches);
        }

        let up = gauge_family(
            &mut registry,
            "partner_up",
            "1 while a partner is in its routes, 0 while it is down or probed",
        );
        let connected = gauge_family(
            &mut registry,
            "partner_connected",
            "1 while a partner's connection is up",
        );
        let in_flight = gauge_family(
            &mut registry,
            "partner_in_flight",
            "Messages handed to a partner and not yet answered",
        );
        let window = gauge_family(
            &mut registry,
            "partner_window",
            "A partner's window: messages it may have outstanding",
        );
        let latency = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "partner_submit_latency_median_seconds",
            "Median submit latency over a partner's last submissions",
            latency.clone(),
        );
        let failed = gauge_family(
            &mut registry,
            "partner_recent_failures",
            "Transient failures among a partner's last submissions",
        );
        if let Ok(board) = self.partners.read() {
            for (id, v) in board.iter() {
                let l = vec![("partner", id.clone())];
                up.get_or_create(&l).set(i64::from(v.state == "up"));
                connected.get_or_create(&l).set(i64::from(v.connected));
                in_flight.get_or_create(&l).set(v.in_flight as i64);
                window.get_or_create(&l).set(v.window as i64);
                latency.get_or_create(&l).set(v.latency_ms as f64 / 1000.0);
                failed.get_or_create(&l).set(v.failed as i64);
            }
        }

        let (file, used) = self.store.space(&config.state_dir)?;
        gauge(
            &mut registry,
            "store_file_bytes",
            "Size of the store's file on disk",
            file,
        );
        gauge(
            &mut registry,
            "store_used_bytes",
            "Bytes of the store's file in use (the rest is free pages, reused)",
            used,
        );
        counter(
            &mut registry,
            "store_reopened",
            "Times the store was opened again after an I/O error (a full disk) since start",
            self.store.reopened(),
        );
        gauge(
            &mut registry,
            "disk_free_bytes",
            "Free bytes under state_dir, as last looked at",
            crate::disk::free(),
        );
        let (anonymized, deleted, deleted_batches, _) = self.store.sweep_totals()?;
        counter(
            &mut registry,
            "retention_deleted_messages",
            "Messages the retention sweeper deleted",
            deleted,
        );
        counter(
            &mut registry,
            "retention_deleted_batches",
            "Batches the retention sweeper deleted",
            deleted_batches,
        );
        counter(
            &mut registry,
            "retention_anonymized_messages",
            "Messages the retention sweeper anonymised",
            anonymized,
        );
        let reseal = self.store.reseal_progress();
        gauge(
            &mut registry,
            "reseal_records",
            "Records re-sealed by the re-sealer's pass under way or last",
            reseal.resealed,
        );
        if config.sftp.is_some() {
            let bans = crate::sftp::defender::active_bans(&self.store).len() as u64;
            gauge(
                &mut registry,
                "sftp_banned_addresses",
                "Addresses the SFTP defender bans now",
                bans,
            );
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        Ok(out)
    }

    async fn answer(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let text = |status: StatusCode, body: String, kind: &str| {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = status;
            if let Ok(v) = kind.parse() {
                r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            r
        };
        if req.method() != hyper::Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into(), "text/plain");
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
            "/readyz" => match self.store.blocking(|s| s.mark("wal_applied")).await {
                Ok(_) if crate::disk::is_low() => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "{} ({} MiB free under state_dir)\n",
                        crate::disk::why_paused().unwrap_or("paused"),
                        crate::disk::free() >> 20
                    ),
                    "text/plain",
                ),
                Ok(_) => text(StatusCode::OK, "ready\n".into(), "text/plain"),
                Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}\n"), "text/plain"),
            },
            "/metrics" => {
                let me = self.clone();
                match tokio::task::spawn_blocking(move || me.render()).await {
                    Ok(Ok(body)) => text(
                        StatusCode::OK,
                        body,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                    Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}\n"), "text/plain"),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"), "text/plain"),
                }
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "/metrics, /healthz, /readyz\n".into(),
                "text/plain",
            ),
        }
    }

    /// Binds `addr` (before `READY=1`), then serves until `shutdown`.
    pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
        tokio::net::TcpListener::bind(addr).await
    }

    pub async fn run(self, listener: tokio::net::TcpListener, shutdown: CancellationToken) {
        crate::httpd::serve(listener, SCRAPES, "metrics", shutdown, move |req, _| {
            let me = self.clone();
            async move { me.answer(req).await }
        })
        .await;
    }
}
