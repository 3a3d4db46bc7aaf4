//! `[metrics] listen`: Prometheus text at `/metrics`, and `/healthz` and `/readyz`.
//!
//! Encoded by the `prometheus-client` crate (OpenMetrics text, which Prometheus reads). Each
//! scrape builds a registry from what the store and the dispatcher know at that moment: messages
//! by tenant and status, queue depth, partner health, window use and latency, the store's size,
//! the sweeper's and the re-sealer's totals, active bans. Names follow Prometheus conventions:
//! the `smsdrop_` prefix, `_total` on counters, seconds and bytes.
//!
//! What happened since start is counted as it happens in [`crate::metrics::events`] and
//! registered into each scrape.
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
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::dispatch::HealthBoard;
use crate::metrics::{Labels, events};
use crate::sms::codes::MessageStatus;
use crate::store::records::BatchState;
use crate::store::{Store, StoreError};
use crate::workers::Workers;

/// Connections at once (a scrape reads every batch record); more are refused.
const SCRAPES: usize = 16;

/// What the listener needs to answer.
#[derive(Clone)]
pub struct Exporter {
    pub store: Store,
    pub config: crate::config::Live,
    pub partners: HealthBoard,
    pub workers: Workers,
}

fn counter_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    registry.register(name, help, family.clone());
    family
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
        let mut registry = Registry::with_prefix("smsdrop");
        events().register(&mut registry);
        self.messages(&mut registry)?;
        self.partners(&mut registry);
        self.store(&mut registry)?;
        self.workers(&mut registry);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        Ok(out)
    }

    /// Messages by tenant and status, queue depth and open batches.
    fn messages(&self, registry: &mut Registry) -> Result<(), StoreError> {
        let config = self.config.get();
        let messages = gauge_family(registry, "messages", "Messages held in the store, by tenant and status");
        let depth = gauge_family(
            registry,
            "queue_depth",
            "Messages still to be sent or answered (queued, held, submitted), by tenant",
        );
        let open = gauge_family(
            registry,
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
        Ok(())
    }

    /// Partner health as the dispatcher sees it.
    fn partners(&self, registry: &mut Registry) {
        let up = gauge_family(
            registry,
            "partner_up",
            "1 while a partner is in its routes, 0 while it is down or probed",
        );
        let connected = gauge_family(registry, "partner_connected", "1 while a partner's connection is up");
        let in_flight = gauge_family(
            registry,
            "partner_in_flight",
            "Messages handed to a partner and not yet answered",
        );
        let window = gauge_family(
            registry,
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
            registry,
            "partner_recent_failures",
            "Transient failures among a partner's last submissions",
        );
        if let Ok(board) = self.partners.read() {
            for (id, v) in board.iter() {
                let l = vec![("partner", id.clone())];
                up.get_or_create(&l)
                    .set(i64::from(v.state == crate::dispatch::PartnerState::Up));
                connected.get_or_create(&l).set(i64::from(v.connected));
                in_flight.get_or_create(&l).set(v.in_flight as i64);
                window.get_or_create(&l).set(v.window as i64);
                latency.get_or_create(&l).set(v.latency_ms as f64 / 1000.0);
                failed.get_or_create(&l).set(v.failed as i64);
            }
        }
    }

    /// The store's size, free space, retention and re-sealing totals, bans.
    fn store(&self, registry: &mut Registry) -> Result<(), StoreError> {
        let config = self.config.get();
        let (file, used) = self.store.space(&config.state_dir)?;
        gauge(registry, "store_file_bytes", "Size of the store's file on disk", file);
        gauge(
            registry,
            "store_used_bytes",
            "Bytes of the store's file in use (the rest is free pages, reused)",
            used,
        );
        counter(
            registry,
            "store_reopened",
            "Times the store was opened again after an I/O error (a full disk) since start",
            self.store.reopened(),
        );
        gauge(
            registry,
            "disk_free_bytes",
            "Free bytes under state_dir, as last looked at",
            crate::disk::free(),
        );
        let (anonymized, deleted, deleted_batches, _) = self.store.sweep_totals()?;
        counter(
            registry,
            "retention_deleted_messages",
            "Messages the retention sweeper deleted",
            deleted,
        );
        counter(
            registry,
            "retention_deleted_batches",
            "Batches the retention sweeper deleted",
            deleted_batches,
        );
        counter(
            registry,
            "retention_anonymized_messages",
            "Messages the retention sweeper anonymised",
            anonymized,
        );
        let reseal = self.store.reseal_progress();
        gauge(
            registry,
            "reseal_records",
            "Records re-sealed by the re-sealer's pass under way or last",
            reseal.resealed,
        );
        if config.sftp.is_some() {
            let bans = crate::sftp::defender::active_bans(&self.store).len() as u64;
            gauge(
                registry,
                "sftp_banned_addresses",
                "Addresses the SFTP defender bans now",
                bans,
            );
        }
        Ok(())
    }

    /// The background workers ([`crate::workers`]): state, rounds, errors.
    fn workers(&self, registry: &mut Registry) {
        let state = gauge_family(
            registry,
            "worker_state",
            "1 for the state a background worker is in, 0 for the others",
        );
        let rounds = counter_family(registry, "worker_rounds", "Rounds a background worker did since start");
        let errors = counter_family(
            registry,
            "worker_errors",
            "Rounds of a background worker that failed since start",
        );
        let failing = gauge_family(
            registry,
            "worker_failing",
            "Failed rounds of a background worker in a row (0 once one works)",
        );
        for (name, w) in self.workers.snapshot() {
            let l = vec![("worker", name.to_string())];
            for s in crate::workers::State::ALL {
                let labels = vec![("worker", name.to_string()), ("state", s.as_str().to_string())];
                state.get_or_create(&labels).set(i64::from(w.state == *s));
            }
            rounds.get_or_create(&l).inc_by(w.rounds);
            errors.get_or_create(&l).inc_by(w.errors);
            failing.get_or_create(&l).set(i64::from(w.failing));
        }
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
            "/readyz" => match self.store.blocking(|s| s.mark(crate::store::Mark::WalApplied)).await {
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
