//! What happened since start, counted as it happens: files and lines by outcome, line
//! rejections by reason, SFTP logins, refusals and open sessions, mails, reloads, submit latency
//! and receipt delay per partner. One process-wide set of counters ([`events`]); the `/metrics`
//! endpoint (`crate::exporter`) registers them into each scrape.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::sms::codes::{FileReason, LineReason};

pub(crate) type Labels = Vec<(&'static str, String)>;

/// A histogram of seconds from 1 ms to about 16 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// A histogram of whole seconds from 1 s to about 9 hours (receipts are stamped in seconds).
fn delay_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

/// What one ingested batch file came to, for [`Events::batch`].
pub struct BatchCounts<'a> {
    pub tenant: &'a str,
    pub file_reason: Option<FileReason>,
    pub accepted: u64,
    pub rejected: u64,
    pub reasons: &'a [(LineReason, u64)],
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
    pub fn batch(&self, batch: &BatchCounts<'_>) {
        let tenant = || ("tenant", batch.tenant.to_string());
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
        for (reason, n) in batch.reasons {
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

    /// Adds every counter to a scrape's registry.
    pub fn register(&self, registry: &mut Registry) {
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
