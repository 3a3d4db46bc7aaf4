//! The mailer ([`crate::alert::mailer`]) and the daily report ([`crate::alert::daily`]) as
//! workers: the mailer sends digests whose time has come and due mails every second, or at once
//! when an alert is queued; the daily report queues each tenant's report when its hour comes.

use std::time::Duration;

use super::{Failed, Next, Worker};
use crate::alert::Alerter;
use crate::alert::mailer::Mailer;
use crate::config::Live;
use crate::store::Store;

/// How often the mailer and the daily report look when not woken.
pub const EVERY: Duration = Duration::from_secs(1);

pub struct MailWorker {
    pub mailer: Mailer,
    /// Whether the mails left by the last stop were counted.
    pub started: bool,
}

impl Worker for MailWorker {
    fn name(&self) -> &'static str {
        "mailer"
    }

    fn woken_by(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        Some(self.mailer.wake())
    }

    async fn work(&mut self) -> Result<Next, Failed> {
        if !self.started {
            self.started = true;
            let pending = self.mailer.pending().await;
            if pending > 0 {
                tracing::info!(mails = pending, "mail queued before the last stop will be sent");
            }
        }
        self.mailer.round().await.map_err(Failed::new)?;
        Ok(Next::Idle(EVERY))
    }
}

/// Queues the daily reports that are due (`[email] daily_report_at`).
pub struct DailyReport {
    pub store: Store,
    pub config: Live,
    pub alerts: Alerter,
}

impl Worker for DailyReport {
    fn name(&self) -> &'static str {
        "daily-report"
    }

    async fn work(&mut self) -> Result<Next, Failed> {
        let (config, alerts) = (self.config.get(), self.alerts.clone());
        self.store
            .blocking(move |s| crate::alert::daily::send_due(s, &config, &alerts))
            .await
            .map_err(Failed::new)?;
        Ok(Next::Idle(EVERY))
    }
}
