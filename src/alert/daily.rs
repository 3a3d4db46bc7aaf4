//! The daily report (`[email] daily_report_at`): once a day, in each tenant's time zone, a mail
//! to the tenant's `alert_to` with what its batches became, and one summary for the admin.
//!
//! A report covers the batches received since the previous one (the 24 hours before, the first
//! time). The time of each report is stored, so a restart neither skips nor repeats one.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{AlertKind, Alerter};
use crate::config::{Config, Tenant};
use crate::sms::codes::{FileReason, LineReason, MessageStatus};
use crate::store::records::{BatchRecord, BatchState, MailRecord};
use crate::store::{Mark, Store, StoreError};

/// One tenant's day.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DayTotals {
    pub files: u64,
    pub files_rejected: BTreeMap<FileReason, u64>,
    pub lines_accepted: u64,
    pub lines_rejected: BTreeMap<LineReason, u64>,
    pub messages: BTreeMap<MessageStatus, u64>,
    pub delivery_seconds: Vec<u32>,
}

impl DayTotals {
    fn add(&mut self, store: &Store, b: &BatchRecord) -> Result<(), StoreError> {
        self.files += 1;
        if let (BatchState::Rejected, Some(r)) = (b.state, b.file_reason) {
            *self.files_rejected.entry(r).or_default() += 1;
        }
        self.lines_accepted += b.accepted;
        for (r, n) in &b.reasons {
            *self.lines_rejected.entry(*r).or_default() += n;
        }
        for s in MessageStatus::ALL {
            if b.count(*s) > 0 {
                *self.messages.entry(*s).or_default() += b.count(*s);
            }
        }
        if b.count(MessageStatus::Delivered) > 0 {
            self.delivery_seconds.extend(store.delivery_seconds(b)?);
        }
        Ok(())
    }

    /// Delivered among messages in a final status, in percent.
    pub fn delivery_rate(&self) -> Option<f64> {
        let finished: u64 = self.messages.iter().filter(|(s, _)| s.is_final()).map(|(_, n)| n).sum();
        let delivered = self.messages.get(&MessageStatus::Delivered).copied().unwrap_or(0);
        (finished > 0).then(|| delivered as f64 * 100.0 / finished as f64)
    }

    /// Median seconds from submission to delivery.
    pub fn median_delivery(&mut self) -> Option<u32> {
        if self.delivery_seconds.is_empty() {
            return None;
        }
        let mid = self.delivery_seconds.len() / 2;
        Some(*self.delivery_seconds.select_nth_unstable(mid).1)
    }

    fn render(&mut self, out: &mut String) {
        let _ = writeln!(out, "Files received:     {}", self.files);
        for (r, n) in &self.files_rejected {
            let _ = writeln!(out, "  rejected {r}: {n}");
        }
        let rejected: u64 = self.lines_rejected.values().sum();
        let _ = writeln!(out, "Lines accepted:     {}", self.lines_accepted);
        let _ = writeln!(out, "Lines rejected:     {rejected}");
        for (r, n) in &self.lines_rejected {
            let _ = writeln!(out, "  {r}: {n}");
        }
        let _ = writeln!(out, "Messages by status:");
        for (s, n) in &self.messages {
            let _ = writeln!(out, "  {s}: {n}");
        }
        match self.delivery_rate() {
            Some(rate) => {
                let _ = writeln!(out, "Delivery rate:      {rate:.1}% of messages with a final status");
            }
            None => {
                let _ = writeln!(out, "Delivery rate:      no message reached a final status");
            }
        }
        if let Some(m) = self.median_delivery() {
            let _ = writeln!(out, "Median delivery:    {m} s from submission");
        }
    }
}

/// Totals of the batches a tenant received in `[from, to)`.
pub fn totals(store: &Store, tenant: &str, from: i64, to: i64) -> Result<DayTotals, StoreError> {
    let mut t = DayTotals::default();
    for b in store.batches(Some(tenant))? {
        if (from..to).contains(&b.received_at) {
            t.add(store, &b)?;
        }
    }
    Ok(t)
}

/// When today's report of `tenant` is due, as unix seconds.
fn due_at(tenant: &Tenant, at: jiff::civil::Time, now: jiff::Timestamp) -> Option<i64> {
    let today = now.to_zoned_datetime(tenant.timezone.clone()).date();
    let local = today.to_datetime(at);
    local
        .to_zoned_datetime(tenant.timezone.clone())
        .ok()
        .map(|z| z.timestamp().as_second())
}

fn utc(t: i64) -> String {
    jiff::Timestamp::from_second(t)
        .map(|ts| ts.strftime("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_default()
}

/// Queues one report mail; reports bypass `min_interval` (they come once a day anyway).
fn queue_report(store: &Store, to: &str, subject: &str, body: &str, now: i64) -> Result<(), StoreError> {
    let mail = MailRecord {
        kind: AlertKind::DailyReport.as_str().into(),
        to: to.to_string(),
        subject: subject.to_string(),
        body: body.to_string(),
        attempts: 0,
        next_at: now,
        created_at: now,
    };
    store.raise_mail(&mail, subject, now, 0, 0).map(drop)
}

/// Sends every report that is due. Returns how many mails were queued.
pub fn send_due(store: &Store, config: &Config, alerter: &Alerter) -> Result<usize, StoreError> {
    let Some(email) = &config.email else { return Ok(0) };
    let Some(at) = email.daily_report_at else { return Ok(0) };
    let now_s = crate::clock::now();
    let Ok(now) = jiff::Timestamp::from_second(now_s) else {
        return Ok(0);
    };
    let mut queued = 0;
    let mut summary = String::new();
    let mut summary_from = i64::MAX;
    for tenant in config.tenants.values() {
        let Some(due) = due_at(tenant, at, now) else { continue };
        let last = store.mark(Mark::DailyReport(&tenant.id))?.map(|v| v as i64);
        if now_s < due || last.is_some_and(|l| l >= due) {
            continue;
        }
        let from = last.unwrap_or(now_s - 86400).max(now_s - 7 * 86400);
        let mut totals = totals(store, &tenant.id, from, now_s)?;
        let mut body = format!(
            "Daily report of tenant {} ({}) from {} to {}.\n\n",
            tenant.id,
            tenant.name,
            utc(from),
            utc(now_s)
        );
        totals.render(&mut body);
        let _ = write!(
            body,
            "\nEach batch's result and report files are in the tenant's outbox.\n\n-- \nsmsdrop on {}\n",
            alerter.host
        );
        let subject = format!(
            "[smsdrop] daily_report: tenant {}, {} files, {} messages",
            tenant.id, totals.files, totals.lines_accepted
        );
        for to in &tenant.alerts.alert_to {
            queue_report(store, &to.to_string(), &subject, &body, now_s)?;
            queued += 1;
        }
        let _ = writeln!(summary, "== {} ({}) ==", tenant.id, tenant.name);
        totals.render(&mut summary);
        summary.push('\n');
        summary_from = summary_from.min(from);
        store.set_mark(Mark::DailyReport(&tenant.id), now_s as u64)?;
    }
    if !summary.is_empty() {
        let subject = "[smsdrop] daily_report: summary of every tenant".to_string();
        let body = format!(
            "Daily report of every tenant due now, from {} to {}.\n\n{summary}-- \nsmsdrop on {}\n",
            utc(summary_from),
            utc(now_s),
            alerter.host
        );
        for to in &email.admin_to {
            queue_report(store, &to.to_string(), &subject, &body, now_s)?;
            queued += 1;
        }
    }
    if queued > 0 {
        tracing::info!(mails = queued, "daily reports queued");
    }
    Ok(queued)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Moves the paused clock by `minutes`.
    async fn advance(minutes: u64) {
        tokio::time::advance(Duration::from_secs(minutes * 60)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn reports_go_once_a_day_at_the_hour_set() {
        // Keep clear of midnight, where "today" changes under the test.
        let hour = jiff::Timestamp::from_second(crate::clock::now())
            .expect("now")
            .to_zoned_datetime(jiff::tz::TimeZone::UTC)
            .hour();
        if hour >= 21 {
            advance(4 * 60).await;
        }
        // The report is due in 60 minutes, to the minute (between 59 and 60 minutes from now).
        let due = jiff::Timestamp::from_second(crate::clock::now() + 3600)
            .expect("due")
            .to_zoned_datetime(jiff::tz::TimeZone::UTC)
            .time();
        let at = format!("{:02}:{:02}", due.hour(), due.minute());
        let dir = tempfile::tempdir().expect("dir");
        let (store, alerter, config) = crate::alert::tests::alerter(dir.path(), &format!("daily_report_at = \"{at}\""));
        let send = || send_due(&store, &config, &alerter).expect("send");

        assert_eq!(send(), 0, "not before the hour");
        advance(58).await;
        assert_eq!(send(), 0, "not a minute early");
        advance(2).await;
        assert_eq!(send(), 2, "the tenant's report and the admin's summary");
        assert_eq!(send(), 0, "once");
        advance(23 * 60).await;
        assert_eq!(send(), 0, "not again the same day");
        advance(60).await;
        assert_eq!(send(), 2, "the next day at the same hour");
        assert_eq!(store.pending_mails().expect("mails"), 4);
    }
}
