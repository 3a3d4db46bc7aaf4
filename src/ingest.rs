//! Ingest: a claimed file, from its spool file to durable queue records and a result file.
//!
//! [`crate::batch::file::process`] reads and checks the file and hands every line to a sink.
//! The queueing sink (`QueueSink`) seals accepted messages into the store and streams the result
//! rows into a hidden temporary file; [`Ingestor::ingest_claimed`] then commits the batch durably
//! and only after that renames the result file into the outbox, raises the alerts the batch
//! calls for and records it on the audit trail. A crash anywhere is recovered by
//! [`Ingestor::recover_claim`]. [`DryRunSink`] builds the result a file would get, queueing
//! nothing (`smsdrop validate`).
//!
//! What this module does not do: find files (`watch`, `sftp`) or send messages (`dispatch`).

use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::AtomicBool;

use crate::alert::{Alert, AlertKind, Alerter};
use crate::audit::Event;
use crate::batch::file::{Context, LineSink, Stopped, Summary, process};
use crate::batch::validate::Checked;
use crate::config::Tenant;
use crate::reply::{self, AtomicFile, RESULT_HEADER, ReplyCsv};
use crate::sms::codes::FileReason;
use crate::sms::format::ReplyFormat;
use crate::sms::message::Message;
use crate::store::records::{BatchRecord, BatchState, CHUNK_MESSAGES, message_id};
use crate::store::{Admission, Admitted, Store, StoreError};

/// Chunks of messages written to the store per transaction.
const CHUNKS_PER_WRITE: usize = 64;

/// Why a batch could not be processed at all (as opposed to being rejected, which is a result).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the result file: {0}")]
    Reply(io::Error),
    #[error("stopped by shutdown; the batch is taken again at next start")]
    Cancelled,
}

impl From<Stopped<IngestError>> for IngestError {
    fn from(stopped: Stopped<IngestError>) -> Self {
        match stopped {
            Stopped::Failed(e) => e,
            Stopped::Cancelled => IngestError::Cancelled,
        }
    }
}

/// Writes a rejected file's one-row result.
pub fn write_file_rejection<W: Write>(out: W, format: &ReplyFormat, reason: FileReason) -> io::Result<W> {
    let mut csv = ReplyCsv::new(out, format)?;
    csv.row(RESULT_HEADER)?;
    csv.row(["0", "", "", "rejected", reason.as_str(), ""])?;
    csv.finish()
}

/// Result rows for a line.
fn result_row<W: Write>(csv: &mut ReplyCsv<W>, checked: &Checked, id: Option<u64>) -> io::Result<()> {
    let line = checked.line.to_string();
    let id = id.map(|i| i.to_string()).unwrap_or_default();
    match &checked.outcome {
        Ok(_) => csv.row([line.as_str(), &checked.reference, &checked.phone, "queued", "", &id]),
        Err(reason) => csv.row([
            line.as_str(),
            &checked.reference,
            &checked.phone,
            "rejected",
            reason.as_str(),
            "",
        ]),
    }
}

/// A sink that builds the result file a batch would get, queueing nothing (`smsdrop validate`).
#[derive(Default)]
pub struct DryRunSink {
    csv: Option<ReplyCsv<Vec<u8>>>,
}

impl DryRunSink {
    /// The result file: the rows seen, or a file rejection's one row.
    pub fn finish(self, summary: &Summary) -> io::Result<Vec<u8>> {
        match (&summary.rejection, self.csv) {
            (Some((reason, _)), _) => write_file_rejection(Vec::new(), &summary.format, *reason),
            (None, Some(csv)) => csv.finish(),
            (None, None) => Ok(Vec::new()),
        }
    }
}

impl LineSink for DryRunSink {
    type Error = IngestError;

    fn start(&mut self, format: &ReplyFormat) -> Result<(), IngestError> {
        let mut csv = ReplyCsv::new(Vec::new(), format).map_err(IngestError::Reply)?;
        csv.row(RESULT_HEADER).map_err(IngestError::Reply)?;
        self.csv = Some(csv);
        Ok(())
    }

    fn line(&mut self, checked: Checked, _index: Option<u64>) -> Result<(), IngestError> {
        if let Some(csv) = &mut self.csv {
            result_row(csv, &checked, None).map_err(IngestError::Reply)?;
        }
        Ok(())
    }
}

/// Seals accepted lines into the store and streams result rows to a temporary file.
struct QueueSink<'a> {
    store: &'a Store,
    batch: &'a BatchRecord,
    outbox: &'a Path,
    csv: Option<ReplyCsv<AtomicFile>>,
    current: Vec<Message>,
    pending: Vec<(u32, Vec<Message>)>,
    next_chunk: u32,
}

impl QueueSink<'_> {
    fn flush_chunks(&mut self, all: bool) -> Result<(), IngestError> {
        if all && !self.current.is_empty() {
            let chunk = std::mem::take(&mut self.current);
            self.pending.push((self.next_chunk, chunk));
            self.next_chunk += 1;
        }
        if !self.pending.is_empty() && (all || self.pending.len() >= CHUNKS_PER_WRITE) {
            self.store.write_chunks(self.batch, &self.pending)?;
            self.pending.clear();
        }
        Ok(())
    }
}

impl LineSink for QueueSink<'_> {
    type Error = IngestError;

    fn start(&mut self, format: &ReplyFormat) -> Result<(), IngestError> {
        let file = AtomicFile::create(self.outbox, &reply::result_name(self.batch), &self.batch.claim)
            .map_err(IngestError::Reply)?;
        let mut csv = ReplyCsv::new(file, format).map_err(IngestError::Reply)?;
        csv.row(RESULT_HEADER).map_err(IngestError::Reply)?;
        self.csv = Some(csv);
        Ok(())
    }

    fn line(&mut self, checked: Checked, index: Option<u64>) -> Result<(), IngestError> {
        let id = index.map(|i| message_id(self.batch.id, i));
        if let Some(csv) = &mut self.csv {
            result_row(csv, &checked, id).map_err(IngestError::Reply)?;
        }
        if let Ok(accepted) = checked.outcome {
            self.current.push(accepted.message);
            if self.current.len() as u64 == CHUNK_MESSAGES {
                let chunk = std::mem::replace(&mut self.current, Vec::with_capacity(CHUNK_MESSAGES as usize));
                self.pending.push((self.next_chunk, chunk));
                self.next_chunk += 1;
                self.flush_chunks(false)?;
            }
        }
        Ok(())
    }
}

/// Everything needed to ingest claimed files.
pub struct Ingestor<'a> {
    pub store: &'a Store,
    pub cancel: &'a AtomicBool,
    pub alerts: &'a Alerter,
    pub audit: &'a crate::audit::Audit,
}

/// What a customer can do about a rejected file.
fn advice(reason: FileReason) -> &'static str {
    match reason {
        FileReason::DuplicateFile => {
            "The same content was already received within dedupe_window and was not queued again. If it must be sent again, change the file (for example a new reference)."
        }
        FileReason::Unreadable => {
            "The file could not be read as text (empty, binary, or not in the tenant's encoding). Export it again as CSV."
        }
        FileReason::MissingColumn => {
            "The header must name a phone column (phone, to, msisdn...) and a message column (message, text...) unless the tenant has a template using only existing columns."
        }
        FileReason::TooLarge => "Split the file below the tenant's max_file_bytes, or have the operator raise it.",
        FileReason::TooManyLines => "Split the file below the tenant's max_lines, or have the operator raise it.",
        FileReason::Strict => {
            "The tenant is strict: one bad line rejects the whole file. `smsdrop validate` lists the bad lines; fix them and send the file again."
        }
        FileReason::QuotaExceeded => {
            "Nothing of the file was queued. Send it again tomorrow, split it, or have the operator raise max_per_day."
        }
    }
}

impl Ingestor<'_> {
    /// Ingests a spool file: the batch is durable and its result file published when this returns
    /// `Ok`. The spool file is removed.
    pub fn ingest_claimed(
        &self,
        tenant: &Tenant,
        spool: &Path,
        claim: &str,
        file_name: &str,
    ) -> Result<BatchRecord, IngestError> {
        let now = crate::clock::now();
        let mut batch = self
            .store
            .begin_batch(&tenant.id, file_name, claim, ReplyFormat::default(), now)?;
        if let Some(stem) = &batch.reply_stem {
            tracing::info!(
                tenant = %tenant.id,
                file = %file_name,
                batch = batch.id,
                "reply files named {stem}.result.csv and {stem}.report.csv: another batch answers under {}",
                crate::store::records::file_stem(file_name)
            );
        }
        let keys = self.store.keys().tenant(&tenant.id);
        let store = self.store;
        let window = tenant.batch.dedupe_window.as_secs() as i64;
        let seen = move |hash: &[u8; 32]| -> Result<bool, IngestError> {
            Ok(store.seen_file(&tenant.id, hash, now, window)?.is_some())
        };
        let lists = self.store.blocklists(&tenant.id)?;
        let blocklisted = |hash: &[u8; 16], e164: &str| lists.contains(hash, e164);
        let ctx = Context {
            tenant,
            keys: &keys,
            blocklisted: &blocklisted,
            seen: &seen,
            cancel: self.cancel,
        };
        let mut sink = QueueSink {
            store: self.store,
            batch: &batch,
            outbox: &tenant.folders.outbox,
            csv: None,
            current: Vec::with_capacity(CHUNK_MESSAGES as usize),
            pending: Vec::new(),
            next_chunk: 0,
        };
        let summary = process(spool, &ctx, &mut sink)?;
        let prepared = match summary.rejection {
            Some(_) => None,
            None => {
                sink.flush_chunks(true)?;
                match sink.csv.take() {
                    Some(csv) => Some(csv.finish().and_then(AtomicFile::sync).map_err(IngestError::Reply)?),
                    None => return Err(IngestError::Reply(io::Error::other("result file never started"))),
                }
            }
        };
        drop(sink);
        batch.format = summary.format.clone();
        batch.lines = summary.lines;
        batch.rejected = summary.rejected;
        batch.reasons = summary.reasons.iter().map(|(r, n)| (*r, *n)).collect();
        batch.countries = summary.countries.iter().cloned().collect();
        let mut rejection = summary.rejection.clone();
        let mut admitted = None;
        if let (None, Some(prepared)) = (&rejection, prepared) {
            batch.accepted = summary.accepted;
            let admission = Admission {
                day: crate::clock::timestamp()
                    .to_zoned_datetime(tenant.timezone.clone())
                    .date()
                    .to_string(),
                max_per_day: tenant.policy.max_per_day,
                hold: tenant.policy.hold_above.is_some_and(|limit| summary.accepted > limit),
            };
            match self.store.finish_batch(&mut batch, summary.hash, now, &admission)? {
                Admitted::OverQuota { used } => {
                    let _ = fs::remove_file(&prepared.temp);
                    let detail = format!(
                        "{} messages would pass max_per_day {} ({used} already queued on {})",
                        summary.accepted,
                        tenant.policy.max_per_day.unwrap_or(0),
                        admission.day
                    );
                    rejection = Some((FileReason::QuotaExceeded, detail));
                }
                state => {
                    prepared.publish().map_err(IngestError::Reply)?;
                    admitted = Some(state);
                }
            }
        }
        match &rejection {
            Some((reason, detail)) => {
                self.rejected(tenant, &mut batch, file_name, (*reason, detail), summary.lines, now)?
            }
            None => self.accepted(
                tenant,
                &batch,
                file_name,
                &summary,
                admitted == Some(Admitted::Held),
                now,
            ),
        }
        finish_claim(self.store, spool, claim);
        Ok(batch)
    }

    /// A file refused whole: the batch marked, an alert, the log, the audit trail, and its
    /// one-row result file.
    fn rejected(
        &self,
        tenant: &Tenant,
        batch: &mut BatchRecord,
        file_name: &str,
        (reason, detail): (FileReason, &str),
        lines: u64,
        now: i64,
    ) -> Result<(), IngestError> {
        self.store.reject_batch(batch, reason, now)?;
        let kind = if reason == FileReason::QuotaExceeded {
            AlertKind::QuotaExceeded
        } else {
            AlertKind::BatchRejected
        };
        self.alerts.raise(
            Alert::new(
                kind,
                Some(&tenant.id),
                format!("file {file_name} of tenant {} rejected as a whole: {reason}", tenant.id),
            )
            .detail("file", file_name)
            .detail("batch", batch.id)
            .detail("reason", reason)
            .detail("detail", detail)
            .detail("lines read", lines)
            .action(advice(reason)),
        );
        tracing::warn!(tenant = %tenant.id, batch = batch.id, file = %file_name, reason = %reason, "file rejected: {detail}");
        Event::new("batch.rejected", "ingest")
            .tenant(&tenant.id)
            .detail("batch", batch.id)
            .detail("file", file_name)
            .detail("reason", reason)
            .detail("lines", lines)
            .record(self.audit);
        publish_rejection(tenant, batch)?;
        Ok(())
    }

    /// A batch queued or held: its alerts, the log and the audit trail.
    fn accepted(&self, tenant: &Tenant, batch: &BatchRecord, file_name: &str, summary: &Summary, held: bool, now: i64) {
        self.alert_accepted(tenant, batch, file_name, held, now);
        let state = if held { "held" } else { "queued" };
        tracing::info!(
            tenant = %tenant.id, batch = batch.id, file = %file_name,
            lines = summary.lines, queued = summary.accepted, rejected = summary.rejected,
            reasons = ?summary.reasons.iter().map(|(r, n)| format!("{r}={n}")).collect::<Vec<_>>(),
            "batch {state}"
        );
        Event::new("batch.taken", "ingest")
            .tenant(&tenant.id)
            .detail("batch", batch.id)
            .detail("file", file_name)
            .detail("state", state)
            .detail("lines", summary.lines)
            .detail("accepted", summary.accepted)
            .detail("rejected", summary.rejected)
            .record(self.audit);
    }

    /// Alerts about a batch that was queued or held: many rejected lines, held, unusual traffic.
    fn alert_accepted(&self, tenant: &Tenant, batch: &BatchRecord, file_name: &str, held: bool, now: i64) {
        let reasons = batch
            .reasons
            .iter()
            .map(|(r, n)| format!("{r}={n}"))
            .collect::<Vec<_>>()
            .join(", ");
        if batch.rejected > 0
            && batch.rejected * 100 >= u64::from(tenant.alerts.alert_rejected_percent) * batch.lines.max(1)
        {
            self.alerts.raise(
                Alert::new(
                    AlertKind::BatchRejected,
                    Some(&tenant.id),
                    format!("{} of {} lines of {file_name} rejected", batch.rejected, batch.lines),
                )
                .detail("file", file_name)
                .detail("batch", batch.id)
                .detail("queued", batch.accepted)
                .detail("rejected by reason", &reasons)
                .action(format!(
                    "The other lines are queued. {}.result.csv names each rejected line and its reason; fix them and send those lines again.",
                    batch.stem()
                )),
            );
        }
        if held {
            self.alerts.raise(
                Alert::new(
                    AlertKind::BatchHeld,
                    Some(&tenant.id),
                    format!("batch {} ({file_name}, {} messages) held above hold_above", batch.id, batch.accepted),
                )
                .detail("file", file_name)
                .detail("batch", batch.id)
                .detail("messages", batch.accepted)
                .detail("hold_above", tenant.policy.hold_above.unwrap_or(0))
                .action(format!(
                    "Nothing is sent until an operator runs `smsdrop batch release {id}`, or `smsdrop batch cancel {id}` to drop it.",
                    id = batch.id
                )),
            );
        }
        if batch.accepted == 0 {
            return;
        }
        match self
            .store
            .note_traffic(&tenant.id, &batch.countries, batch.accepted, now)
        {
            Ok(traffic) => {
                if !traffic.new_countries.is_empty() {
                    self.alerts.raise(
                        Alert::new(
                            AlertKind::Anomaly,
                            Some(&tenant.id),
                            format!(
                                "batch {} sends to a country tenant {} never sent to: {}",
                                batch.id,
                                tenant.id,
                                traffic.new_countries.join(", ")
                            ),
                        )
                        .detail("file", file_name)
                        .detail("batch", batch.id)
                        .detail("new countries", traffic.new_countries.join(", "))
                        .action("If this traffic is unexpected, cancel it with `smsdrop batch cancel ID` and check the account; allowed_countries restricts destinations."),
                    );
                }
                if traffic.is_volume_anomaly(tenant.alerts.anomaly_factor, tenant.alerts.anomaly_min_messages) {
                    self.alerts.raise(
                        Alert::new(
                            AlertKind::Anomaly,
                            Some(&tenant.id),
                            format!(
                                "tenant {} queued {} messages this hour, {:.0} per hour is usual",
                                tenant.id,
                                traffic.hour_count,
                                traffic.usual_per_hour.unwrap_or(0.0)
                            ),
                        )
                        .detail("file", file_name)
                        .detail("batch", batch.id)
                        .detail("anomaly_factor", tenant.alerts.anomaly_factor)
                        .action("If this volume is unexpected, cancel the batch with `smsdrop batch cancel ID` and check the account."),
                    );
                }
            }
            Err(e) => tracing::warn!(tenant = %tenant.id, error = %e, "cannot record traffic for anomaly detection"),
        }
    }

    /// Brings a spool file left by a crash to its end, exactly once: a batch already committed
    /// only gets its result file published; one cut short is discarded and ingested again.
    pub fn recover_claim(
        &self,
        tenant: &Tenant,
        spool: &Path,
        claim: &str,
        file_name: &str,
    ) -> Result<BatchRecord, IngestError> {
        match self.store.batch_by_claim(claim)? {
            Some(batch) if batch.state == BatchState::Ingesting => {
                tracing::info!(tenant = %tenant.id, batch = batch.id, file = %file_name, "batch was cut short (a stop, or a write that failed); ingesting it again");
                self.store.discard_batch(&batch)?;
                self.ingest_claimed(tenant, spool, claim, file_name)
            }
            Some(batch) if batch.state == BatchState::Rejected => {
                publish_rejection(tenant, &batch)?;
                finish_claim(self.store, spool, claim);
                Ok(batch)
            }
            Some(batch) => {
                let temp = reply::temp_path(&tenant.folders.outbox, &reply::result_name(&batch), claim);
                if temp.exists() {
                    reply::publish(&temp, &tenant.folders.outbox.join(reply::result_name(&batch)))
                        .map_err(IngestError::Reply)?;
                }
                tracing::info!(tenant = %tenant.id, batch = batch.id, file = %file_name, "batch was already queued before the stop; result file published");
                finish_claim(self.store, spool, claim);
                Ok(batch)
            }
            None => self.ingest_claimed(tenant, spool, claim, file_name),
        }
    }
}

fn publish_rejection(tenant: &Tenant, batch: &BatchRecord) -> Result<(), IngestError> {
    let reason = batch.file_reason.unwrap_or(FileReason::Unreadable);
    let file = AtomicFile::create(&tenant.folders.outbox, &reply::result_name(batch), &batch.claim)
        .map_err(IngestError::Reply)?;
    write_file_rejection(file, &batch.format, reason)
        .and_then(AtomicFile::sync)
        .and_then(|p| p.publish())
        .map_err(IngestError::Reply)
}

fn finish_claim(store: &Store, spool: &Path, claim: &str) {
    if let Err(e) = fs::remove_file(spool) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::error!(file = %spool.display(), error = %e, "cannot remove the spool file");
            return;
        }
    }
    if let Err(e) = store.forget_claim(claim) {
        tracing::warn!(error = %e, "cannot forget a finished claim; it is dropped at next start");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::crypto::{Keyring, MasterKeys};
    use std::sync::Arc;

    fn alerter(store: &Store, tenant: &Tenant) -> Alerter {
        let src = format!("[tenant.{}]\n", tenant.id);
        let config = Arc::new(Config::parse(Path::new("/x.toml"), &src).unwrap());
        Alerter::new(
            store.clone(),
            crate::config::Live::new(config),
            Arc::new(tokio::sync::Notify::new()),
        )
    }

    fn setup(dir: &Path) -> (Store, Arc<Tenant>) {
        let key = dir.join("master.key");
        MasterKeys::generate(&key).unwrap();
        let src = format!(
            "state_dir = \"{d}\"\nkey_file = \"{d}/master.key\"\n[tenant.acme]\ndefault_region = \"FR\"\nsender = \"ACME\"\n",
            d = dir.display()
        );
        let config = Config::parse(&dir.join("c.toml"), &src).unwrap();
        let tenant = config.tenants["acme"].clone();
        fs::create_dir_all(&tenant.folders.outbox).unwrap();
        let store = Store::open(
            dir,
            Arc::new(Keyring::open(MasterKeys::load(&key).unwrap(), dir).unwrap()),
        )
        .unwrap();
        (store, tenant)
    }

    #[test]
    fn a_batch_cut_short_is_discarded_and_ingested_anew() {
        let dir = tempfile::tempdir().unwrap();
        let (store, tenant) = setup(dir.path());
        let spool = dir.path().join("c1~june.csv");
        fs::write(&spool, "phone;message\n0612345678;a\n0612345679;b\n").unwrap();
        // What a crash mid-ingest leaves when a later durable commit carried the partial batch:
        let partial = store
            .begin_batch("acme", "june.csv", "c1", ReplyFormat::default(), 0)
            .unwrap();
        let stray = Message {
            line: 2,
            reference: String::new(),
            phone: "+33612345678".into(),
            sender: "ACME".into(),
            text: "a".into(),
            coding: crate::sms::message::TextCoding::Gsm7,
            parts: 1,
            send_at: None,
        };
        store.write_chunks(&partial, &[(0, vec![stray])]).unwrap();
        let cancel = AtomicBool::new(false);
        let alerts = alerter(&store, &tenant);
        let ingestor = Ingestor {
            store: &store,
            cancel: &cancel,
            alerts: &alerts,
            audit: &crate::audit::Audit::direct(store.clone()),
        };
        let batch = ingestor.recover_claim(&tenant, &spool, "c1", "june.csv").unwrap();
        assert_ne!(batch.id, partial.id);
        assert_eq!((batch.state, batch.accepted), (BatchState::Queued, 2));
        let all = store.batches(None).unwrap();
        assert_eq!(all.len(), 1, "the partial batch is gone");
        assert!(
            store.load_chunk("acme", partial.id, 0).unwrap().is_empty(),
            "its chunks too"
        );
        assert!(!spool.exists());
        assert!(store.claims().unwrap().is_empty());
        let result = fs::read_to_string(tenant.folders.outbox.join("june.result.csv")).unwrap();
        assert_eq!(result.lines().count(), 3);
    }

    #[test]
    fn a_committed_batch_is_only_published_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let (store, tenant) = setup(dir.path());
        // The state between the durable commit and the rename: claim recorded, batch queued,
        // synced temporary result in the outbox, spool file still there.
        let spool = dir.path().join("c2~july.csv");
        fs::write(&spool, "phone;message\n0612345678;a\n").unwrap();
        let mut batch = store
            .begin_batch("acme", "july.csv", "c2", ReplyFormat::default(), 0)
            .unwrap();
        batch.accepted = 1;
        store
            .finish_batch(&mut batch, Some([9; 32]), 0, &Admission::default())
            .unwrap();
        let temp = reply::temp_path(&tenant.folders.outbox, "july.result.csv", "c2");
        fs::write(&temp, "the result written before the crash").unwrap();

        let cancel = AtomicBool::new(false);
        let alerts = alerter(&store, &tenant);
        let ingestor = Ingestor {
            store: &store,
            cancel: &cancel,
            alerts: &alerts,
            audit: &crate::audit::Audit::direct(store.clone()),
        };
        let recovered = ingestor.recover_claim(&tenant, &spool, "c2", "july.csv").unwrap();
        assert_eq!(recovered.id, batch.id, "not queued a second time");
        assert_eq!(store.batches(None).unwrap().len(), 1);
        let published = fs::read_to_string(tenant.folders.outbox.join("july.result.csv")).unwrap();
        assert_eq!(published, "the result written before the crash");
        assert!(!temp.exists() && !spool.exists());
        assert!(store.claims().unwrap().is_empty());
    }
}
