//! Alerts: what an operator or a customer must know, by mail, never lost and never a flood.
//!
//! A part of smsdrop that notices something raises an [`Alert`] through the [`Alerter`]; it does
//! not know about mail. The alerter logs it, picks the recipients (the tenant's `alert_to` and
//! the admin's `admin_to`), renders a plain-text mail a person can act on, and stores it, sealed,
//! in the store's mail queue before anything is sent. At most one mail per kind and recipient
//! goes out per `min_interval`; what comes in between is gathered into one digest mail with the
//! count and the first details. The [`mailer::Mailer`] sends the queue.

pub mod daily;
pub mod mailer;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Arc;

use tokio::sync::Notify;

use crate::config::Live;
use crate::store::Store;
use crate::store::records::{DigestRecord, MailRecord};

/// Details kept per digest.
const DIGEST_DETAILS: usize = 10;

/// The closing advice of a digest, by its kind.
fn digest_advice(kind: &str) -> &'static str {
    match kind {
        "auth_rejected" | "ip_banned" => {
            "Every refusal is in the audit log (`smsdrop audit export`); `smsdrop status` lists the banned addresses. A burst from one address is someone trying the door: the defender bans it."
        }
        "partner_down" | "partner_up" => "`smsdrop status` shows each partner's health.",
        "disk_low" => "`df` shows the file systems; `smsdrop status` shows the store's size.",
        "batch_rejected" | "batch_held" | "quota_exceeded" | "anomaly" => {
            "`smsdrop batch list --tenant <id>` shows the batches; `smsdrop batch show` one of them."
        }
        _ => "`smsdrop status` shows the appliance's state.",
    }
}

macro_rules! alert_kinds {
    ($($variant:ident => $wire:literal),+ $(,)?) => {
        /// The kinds of alert, with their wire names (docs/operations.md, alerts by mail).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum AlertKind { $($variant),+ }

        impl AlertKind {
            pub fn as_str(self) -> &'static str {
                match self { $(AlertKind::$variant => $wire),+ }
            }
        }
    };
}

alert_kinds!(
    AuthRejected => "auth_rejected",
    IpBanned => "ip_banned",
    BatchRejected => "batch_rejected",
    BatchHeld => "batch_held",
    QuotaExceeded => "quota_exceeded",
    Anomaly => "anomaly",
    PartnerDown => "partner_down",
    PartnerUp => "partner_up",
    DiskLow => "disk_low",
    DailyReport => "daily_report",
);

/// Something a person must know.
#[derive(Debug, Clone)]
pub struct Alert {
    pub kind: AlertKind,
    pub tenant: Option<String>,
    /// Unix seconds.
    pub at: i64,
    /// One sentence: what happened.
    pub what: String,
    pub details: Vec<(String, String)>,
    /// What to do about it.
    pub action: String,
}

impl Alert {
    pub fn new(kind: AlertKind, tenant: Option<&str>, what: impl Into<String>) -> Alert {
        Alert {
            kind,
            tenant: tenant.map(str::to_string),
            at: crate::clock::now(),
            what: what.into(),
            details: Vec::new(),
            action: String::new(),
        }
    }

    pub fn detail(mut self, key: &str, value: impl ToString) -> Alert {
        self.details.push((key.to_string(), value.to_string()));
        self
    }

    pub fn action(mut self, action: impl Into<String>) -> Alert {
        self.action = action.into();
        self
    }
}

fn utc(t: i64) -> String {
    jiff::Timestamp::from_second(t)
        .map(|ts| ts.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// Raises alerts into the mail queue.
#[derive(Clone)]
pub struct Alerter {
    store: Store,
    config: Live,
    wake: Arc<Notify>,
    pub(crate) host: String,
}

impl Alerter {
    pub fn new(store: Store, config: Live, wake: Arc<Notify>) -> Alerter {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "this host".into());
        Alerter {
            store,
            config,
            wake,
            host,
        }
    }

    /// Who receives an alert: the tenant's `alert_to` and the admin's `admin_to`.
    fn recipients(&self, alert: &Alert) -> BTreeSet<String> {
        let mut to = BTreeSet::new();
        let config = self.config.get();
        if let Some(email) = &config.email {
            to.extend(email.admin_to.iter().map(|m| m.to_string()));
        }
        if let Some(t) = alert.tenant.as_ref().and_then(|t| config.tenants.get(t)) {
            if !matches!(alert.kind, AlertKind::PartnerDown | AlertKind::PartnerUp) {
                to.extend(t.alerts.alert_to.iter().map(|m| m.to_string()));
            }
        }
        to
    }

    /// Logs the alert and queues its mail (or adds it to the next digest). Never fails the
    /// caller: a store error is logged.
    pub fn raise(&self, alert: Alert) {
        tracing::warn!(
            kind = alert.kind.as_str(),
            tenant = alert.tenant.as_deref().unwrap_or(""),
            "alert: {}",
            alert.what
        );
        let config = self.config.get();
        let Some(email) = &config.email else { return };
        let min_interval = email.min_interval.as_secs() as i64;
        // A digest lists its first alerts whole: an attack comes as a burst, and the operator
        // needs each refusal's address, method, key type and fingerprint, not one sentence.
        let mut line = format!("{}  {}", utc(alert.at), alert.what);
        for (k, v) in &alert.details {
            let _ = write!(line, "\n      {k}: {v}");
        }
        let (subject, body) = self.render(&alert);
        let mut queued = false;
        for to in self.recipients(&alert) {
            let mail = MailRecord {
                kind: alert.kind.as_str().to_string(),
                to,
                subject: subject.clone(),
                body: body.clone(),
                attempts: 0,
                next_at: alert.at,
                created_at: alert.at,
            };
            match self
                .store
                .raise_mail(&mail, &line, alert.at, min_interval, DIGEST_DETAILS)
            {
                Ok(now) => {
                    if now {
                        crate::metrics::events().mail("queued");
                    }
                    queued |= now
                }
                Err(e) => tracing::error!(kind = alert.kind.as_str(), error = %e, "cannot queue an alert mail"),
            }
        }
        if queued {
            self.wake.notify_one();
        }
    }

    fn render(&self, alert: &Alert) -> (String, String) {
        let mut subject = format!("[smsdrop] {}: {}", alert.kind.as_str(), alert.what);
        if subject.chars().count() > 160 {
            subject = subject.chars().take(157).collect::<String>() + "...";
        }
        let mut body = format!("{}\n\n", alert.what);
        let _ = writeln!(body, "When:    {}", utc(alert.at));
        if let Some(id) = &alert.tenant {
            match self.config.get().tenants.get(id) {
                Some(t) => {
                    let local = jiff::Timestamp::from_second(alert.at)
                        .map(|ts| {
                            ts.to_zoned_datetime(t.timezone.clone())
                                .strftime("%Y-%m-%d %H:%M:%S %Z")
                                .to_string()
                        })
                        .unwrap_or_default();
                    let _ = writeln!(body, "         {local} (tenant time)");
                    let _ = writeln!(body, "Tenant:  {} ({})", t.id, t.name);
                }
                None => {
                    let _ = writeln!(body, "Tenant:  {id}");
                }
            }
        }
        let _ = writeln!(body, "Kind:    {}", alert.kind.as_str());
        if !alert.details.is_empty() {
            body.push_str("\nDetails:\n");
            for (k, v) in &alert.details {
                let _ = writeln!(body, "  {k}: {v}");
            }
        }
        if !alert.action.is_empty() {
            let _ = write!(body, "\nWhat to do:\n  {}\n", alert.action);
        }
        let _ = write!(body, "\n-- \nsmsdrop on {}\n", self.host);
        (subject, body)
    }

    /// The mail that sums up held-back alerts.
    pub fn render_digest(&self, digest: &DigestRecord, now: i64) -> MailRecord {
        let subject = format!(
            "[smsdrop] {}: {} more alert{} since {}",
            digest.kind,
            digest.pending,
            if digest.pending == 1 { "" } else { "s" },
            utc(digest.since)
        );
        let mut body = format!(
            "{} more {} alert{} came in since {}; at most one mail per kind goes out per {}.\n\n",
            digest.pending,
            digest.kind,
            if digest.pending == 1 { "" } else { "s" },
            utc(digest.since),
            self.config
                .get()
                .email
                .as_ref()
                .map(|e| humantime::format_duration(e.min_interval).to_string())
                .unwrap_or_default()
        );
        for line in &digest.details {
            let _ = writeln!(body, "  {line}");
        }
        let shown = digest.details.len() as u64;
        if digest.pending > shown {
            let _ = writeln!(body, "  ... and {} more", digest.pending - shown);
        }
        let _ = write!(
            body,
            "\nEach alert is also in the log. {}\n\n-- \nsmsdrop on {}\n",
            digest_advice(&digest.kind),
            self.host
        );
        MailRecord {
            kind: digest.kind.clone(),
            to: digest.to.clone(),
            subject,
            body,
            attempts: 0,
            next_at: now,
            created_at: now,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::config::Config;
    use crate::crypto::{Keyring, MasterKeys};

    /// A store and an alerter whose mail goes to ops@ and acme@ (nothing is sent: the mailer is
    /// not running), with `extra` in `[email]`.
    pub(crate) fn alerter(dir: &Path, extra: &str) -> (Store, Alerter, Arc<Config>) {
        let key = dir.join("master.key");
        MasterKeys::generate(&key).expect("key");
        let keys = Keyring::open(MasterKeys::load(&key).expect("load"), dir).expect("keyring");
        let store = Store::open(dir, Arc::new(keys)).expect("store");
        let src = format!(
            "[email]\nsmtp_url = \"smtp://127.0.0.1:1\"\nfrom = \"smsdrop <noreply@example.net>\"\nadmin_to = [\"ops@example.net\"]\n{extra}\n[tenant.acme]\ntimezone = \"UTC\"\nalert_to = [\"acme@example.net\"]\n"
        );
        let config = Arc::new(Config::parse(&dir.join("c.toml"), &src).expect("config"));
        let alerter = Alerter::new(store.clone(), Live::new(config.clone()), Arc::default());
        (store, alerter, config)
    }

    #[tokio::test(start_paused = true)]
    async fn alerts_within_min_interval_wait_for_one_digest() {
        let dir = tempfile::tempdir().expect("dir");
        let (store, alerter, _) = alerter(dir.path(), "min_interval = \"60s\"");
        let raise = |n: u32| alerter.raise(Alert::new(AlertKind::DiskLow, None, format!("disk low #{n}")));
        let flush = || {
            let now = crate::clock::now();
            store
                .flush_digests(now, 60, |d| alerter.render_digest(d, now))
                .expect("flush")
        };
        raise(1);
        assert_eq!(store.pending_mails().expect("mails"), 1, "the first alert goes at once");
        tokio::time::advance(Duration::from_secs(10)).await;
        raise(2);
        tokio::time::advance(Duration::from_secs(10)).await;
        raise(3);
        assert_eq!(
            store.pending_mails().expect("mails"),
            1,
            "the next ones wait for the digest"
        );
        tokio::time::advance(Duration::from_secs(38)).await;
        assert_eq!(flush(), 0, "not before min_interval has passed since the first mail");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(flush(), 1, "one digest once min_interval has passed");
        assert_eq!(store.pending_mails().expect("mails"), 2);
        raise(4);
        assert_eq!(
            store.pending_mails().expect("mails"),
            2,
            "the digest counts as a mail sent"
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(flush(), 1);
        let due = store.due_mails(crate::clock::now(), 10).expect("due");
        let bodies: Vec<&str> = due.iter().map(|(_, m)| m.body.as_str()).collect();
        assert!(
            bodies[1].contains("disk low #2") && bodies[1].contains("disk low #3"),
            "{}",
            bodies[1]
        );
        assert!(bodies[2].contains("disk low #4"), "{}", bodies[2]);
    }
}
