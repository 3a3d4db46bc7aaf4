//! One batch, from its spool file to durable queue records and a result file.
//!
//! The pipeline has three stages on their own threads, joined by bounded channels so memory
//! stays flat: a reader parses CSV records in chunks; a checker validates each chunk's lines in
//! parallel (rayon); the caller's thread applies the rules that need file order or the store
//! (`duplicate_recipient`, `blocklisted`) and hands every line to a [`LineSink`]. The queueing
//! sink ([`QueueSink`]) seals accepted messages into the store and streams the result rows into
//! a hidden temporary file; [`ingest_claimed`] then commits the batch durably and only after that
//! renames the result file into the outbox. A crash anywhere is recovered by [`recover_claim`].
//!
//! What this module does not do: find files (`watch`) or send messages (`dispatch`).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;

use nohash_hasher::BuildNoHashHasher;
use rayon::prelude::*;

use crate::alert::{Alert, AlertKind, Alerter};
use crate::audit::Event;
use crate::batch::columns::{Column, ColumnMap};
use crate::batch::parse::{self, CHUNK_RECORDS, RawRecord, Records};
use crate::batch::validate::{Checked, LineRules};
use crate::codes::{FileReason, LineReason};
use crate::config::Tenant;
use crate::crypto::TenantKeys;
use crate::reply::{self, AtomicFile, RESULT_HEADER, ReplyCsv};
use crate::store::records::{BatchRecord, BatchState, CHUNK_MESSAGES, ReplyFormat, StoredMessage, message_id};
use crate::store::{Admission, Admitted, Store, StoreError};

/// Chunks of messages written to the store per transaction.
const CHUNKS_PER_WRITE: usize = 64;

/// Why a batch could not be processed at all (as opposed to being rejected, which is a result).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the result file: {0}")]
    Reply(#[source] io::Error),
    #[error("stopped by shutdown; the batch is taken again at next start")]
    Cancelled,
}

/// How a whole file ended.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub format: ReplyFormat,
    pub hash: Option<[u8; 32]>,
    pub lines: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub reasons: BTreeMap<LineReason, u64>,
    /// Destination regions of accepted lines.
    pub countries: BTreeSet<String>,
    /// The whole file was refused, with a detail for the log.
    pub rejection: Option<(FileReason, String)>,
}

/// Receives every line of a batch, in file order, once the batch's format is known.
pub trait LineSink {
    fn start(&mut self, format: &ReplyFormat) -> Result<(), IngestError>;
    /// `index` is the message's index in the batch when the line was accepted.
    fn line(&mut self, checked: Checked, index: Option<u64>) -> Result<(), IngestError>;
}

/// What the file-level checks need from outside the file.
pub struct Context<'a> {
    pub tenant: &'a Tenant,
    pub keys: &'a TenantKeys,
    pub blocklist: crate::store::Blocklists,
    /// Whether content with this keyed hash was already taken within the dedupe window.
    pub seen: &'a dyn Fn(&[u8; 32]) -> Result<bool, StoreError>,
    pub cancel: &'a AtomicBool,
}

fn reject(summary: &mut Summary, reason: FileReason, detail: impl Into<String>) -> Result<Summary, IngestError> {
    summary.rejection = Some((reason, detail.into()));
    Ok(std::mem::take(summary))
}

/// Reads, checks and hands on every line of the file at `path`.
pub fn process(path: &Path, ctx: &Context<'_>, sink: &mut dyn LineSink) -> Result<Summary, IngestError> {
    let tenant = ctx.tenant;
    let mut summary = Summary {
        format: ReplyFormat {
            delimiter: tenant.delimiter.unwrap_or(b';'),
            ..ReplyFormat::default()
        },
        ..Summary::default()
    };
    let size = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) => return reject(&mut summary, FileReason::Unreadable, e.to_string()),
    };
    if size > tenant.max_file_bytes {
        return reject(
            &mut summary,
            FileReason::TooLarge,
            format!("{size} bytes, more than max_file_bytes {}", tenant.max_file_bytes),
        );
    }
    let scan = match parse::scan(path, ctx.keys.file_hasher()) {
        Ok(s) => s,
        Err(e) => return reject(&mut summary, FileReason::Unreadable, e.to_string()),
    };
    summary.hash = Some(scan.hash);
    let encoding = parse::choose_encoding(tenant.encoding, &scan);
    summary.format.encoding = encoding.name().to_string();
    summary.format.bom = scan.bom.is_some();
    if scan.size == 0 {
        return reject(&mut summary, FileReason::Unreadable, "the file is empty");
    }
    if scan.has_nul && encoding.is_ascii_compatible() {
        return reject(
            &mut summary,
            FileReason::Unreadable,
            "the file holds NUL bytes: not a text file",
        );
    }
    if (ctx.seen)(&scan.hash)? {
        return reject(
            &mut summary,
            FileReason::DuplicateFile,
            "same content as a batch taken within dedupe_window",
        );
    }
    let mut records = match Records::open(path, encoding, tenant.delimiter) {
        Ok(r) => r,
        Err(e) => return reject(&mut summary, FileReason::Unreadable, e.to_string()),
    };
    summary.format.delimiter = records.delimiter;

    let columns = match &tenant.columns {
        Some(cols) => ColumnMap::new(cols),
        None => {
            let header = match records.next_record() {
                Ok(Some(h)) => h,
                Ok(None) => return reject(&mut summary, FileReason::Unreadable, "no header line"),
                Err(e) => return reject(&mut summary, FileReason::Unreadable, e.to_string()),
            };
            if header.oversized {
                return reject(
                    &mut summary,
                    FileReason::Unreadable,
                    "the header line has more than 4,096 columns or 64 KiB",
                );
            }
            let mut cols = Vec::with_capacity(header.len());
            for field in header.iter() {
                match Records::decode(records.utf8_fields, encoding, field) {
                    Some(name) => cols.push(Column::from_header(&name)),
                    None => {
                        return reject(
                            &mut summary,
                            FileReason::Unreadable,
                            "the header line is not valid in the file's encoding",
                        );
                    }
                }
            }
            ColumnMap::new(&cols)
        }
    };
    if columns.phone.is_none() {
        return reject(&mut summary, FileReason::MissingColumn, "no phone column");
    }
    if columns.message.is_none() && tenant.template.is_none() {
        return reject(
            &mut summary,
            FileReason::MissingColumn,
            "no message column and no template",
        );
    }
    if let Some(template) = &tenant.template {
        if let Some(var) = template.variables().find(|v| !columns.vars.iter().any(|(n, _)| n == v)) {
            return reject(
                &mut summary,
                FileReason::MissingColumn,
                format!("the template uses {{{var}}} and the file has no such column"),
            );
        }
    }

    sink.start(&summary.format)?;
    let rules = LineRules {
        tenant,
        keys: ctx.keys,
        columns: &columns,
        encoding,
        utf8_fields: records.utf8_fields,
        now: jiff::Timestamp::now(),
    };
    let max_lines = tenant.max_lines;
    // The one structure that grows with the file: 8-byte fingerprints of accepted lines, for
    // `duplicate_recipient`. Sized once from the file's line count (at most `max_lines`) so it
    // never rehashes into twice its size.
    let expected = scan.newlines.saturating_add(1).min(max_lines) as usize;
    let mut dedupe: HashSet<u64, BuildNoHashHasher<u64>> =
        HashSet::with_capacity_and_hasher(expected, Default::default());
    let mut countries: HashSet<rlibphonenumber::Region> = HashSet::new();
    let mut outcome: Result<(), IngestError> = Ok(());
    let mut strict_failure = None;

    let read_result = std::thread::scope(|scope| {
        let (raw_tx, raw_rx) = sync_channel::<Vec<RawRecord>>(2);
        let (checked_tx, checked_rx) = sync_channel::<Vec<Checked>>(2);
        let cancel = ctx.cancel;
        let reader = scope.spawn(move || -> Result<(u64, bool), io::Error> {
            let mut count = 0u64;
            loop {
                if cancel.load(Ordering::Relaxed) {
                    return Ok((count, false));
                }
                let mut chunk = Vec::with_capacity(CHUNK_RECORDS);
                while chunk.len() < CHUNK_RECORDS {
                    match records.next_record()? {
                        Some(r) => chunk.push(r),
                        None => break,
                    }
                }
                let last = chunk.len() < CHUNK_RECORDS;
                count += chunk.len() as u64;
                if count > max_lines {
                    return Ok((count, true));
                }
                if !chunk.is_empty() && raw_tx.send(chunk).is_err() {
                    return Ok((count, false));
                }
                if last {
                    return Ok((count, false));
                }
            }
        });
        let rules = &rules;
        scope.spawn(move || {
            for chunk in raw_rx {
                let checked: Vec<Checked> = chunk.par_iter().map(|r| rules.check(r)).collect();
                if checked_tx.send(checked).is_err() {
                    return;
                }
            }
        });
        'chunks: for chunk in checked_rx {
            for mut checked in chunk {
                summary.lines += 1;
                if let Ok(acc) = &checked.outcome {
                    if ctx.blocklist.contains(&acc.phone_hash, &acc.message.phone) {
                        checked.outcome = Err(LineReason::Blocklisted);
                    } else if !dedupe.insert(acc.dedupe) {
                        checked.outcome = Err(LineReason::DuplicateRecipient);
                    }
                }
                let index = match &checked.outcome {
                    Ok(acc) => {
                        if let Some(c) = acc.country {
                            if countries.insert(c) {
                                summary.countries.insert(c.to_string());
                            }
                        }
                        summary.accepted += 1;
                        Some(summary.accepted - 1)
                    }
                    Err(reason) => {
                        summary.rejected += 1;
                        *summary.reasons.entry(*reason).or_default() += 1;
                        tracing::debug!(tenant = %tenant.id, line = checked.line, reason = %reason, "line rejected");
                        if tenant.strict {
                            strict_failure = Some((checked.line, *reason));
                            break 'chunks;
                        }
                        None
                    }
                };
                if let Err(e) = sink.line(checked, index) {
                    outcome = Err(e);
                    break 'chunks;
                }
            }
        }
        reader
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the reader thread panicked")))
    });
    outcome?;
    if ctx.cancel.load(Ordering::Relaxed) {
        return Err(IngestError::Cancelled);
    }
    if let Some((line, reason)) = strict_failure {
        return reject(
            &mut summary,
            FileReason::Strict,
            format!("line {line} rejected ({reason}) and the tenant is strict"),
        );
    }
    match read_result {
        Ok((_, true)) => reject(
            &mut summary,
            FileReason::TooManyLines,
            format!("more than max_lines {max_lines} data lines"),
        ),
        Ok(_) => Ok(summary),
        Err(e) => {
            let detail = format!("after line {}: {e}", summary.lines);
            reject(&mut summary, FileReason::Unreadable, detail)
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
    current: Vec<StoredMessage>,
    pending: Vec<(u32, Vec<StoredMessage>)>,
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
    fn context<'c>(
        &self,
        tenant: &'c Tenant,
        keys: &'c TenantKeys,
        seen: &'c dyn Fn(&[u8; 32]) -> Result<bool, StoreError>,
    ) -> Result<Context<'c>, StoreError>
    where
        Self: 'c,
    {
        Ok(Context {
            tenant,
            keys,
            blocklist: self.store.blocklists(&tenant.id)?,
            seen,
            cancel: self.cancel,
        })
    }

    /// Ingests a spool file: the batch is durable and its result file published when this returns
    /// `Ok`. The spool file is removed.
    pub fn ingest_claimed(
        &self,
        tenant: &Tenant,
        spool: &Path,
        claim: &str,
        file_name: &str,
    ) -> Result<BatchRecord, IngestError> {
        let now = jiff::Timestamp::now().as_second();
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
        let window = tenant.dedupe_window.as_secs() as i64;
        let seen = move |hash: &[u8; 32]| -> Result<bool, StoreError> {
            Ok(store.seen_file(&tenant.id, hash, now, window)?.is_some())
        };
        let ctx = self.context(tenant, &keys, &seen)?;
        let mut sink = QueueSink {
            store: self.store,
            batch: &batch,
            outbox: &tenant.outbox,
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
                day: jiff::Timestamp::now()
                    .to_zoned_datetime(tenant.timezone.clone())
                    .date()
                    .to_string(),
                max_per_day: tenant.max_per_day,
                hold: tenant.hold_above.is_some_and(|limit| summary.accepted > limit),
            };
            match self.store.finish_batch(&mut batch, summary.hash, now, &admission)? {
                Admitted::OverQuota { used } => {
                    let _ = fs::remove_file(&prepared.temp);
                    let detail = format!(
                        "{} messages would pass max_per_day {} ({used} already queued on {})",
                        summary.accepted,
                        tenant.max_per_day.unwrap_or(0),
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
        if let Some((reason, detail)) = &rejection {
            self.store.reject_batch(&mut batch, *reason, now)?;
            let kind = if *reason == FileReason::QuotaExceeded {
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
                .detail("lines read", summary.lines)
                .action(advice(*reason)),
            );
            tracing::warn!(tenant = %tenant.id, batch = batch.id, file = %file_name, reason = %reason, "file rejected: {detail}");
            Event::new("batch.rejected", "ingest")
                .tenant(&tenant.id)
                .detail("batch", batch.id)
                .detail("file", file_name)
                .detail("reason", reason)
                .detail("lines", summary.lines)
                .record(self.audit);
            publish_rejection(tenant, &batch)?;
        } else {
            self.alert_accepted(tenant, &batch, file_name, admitted == Some(Admitted::Held), now);
            let state = if admitted == Some(Admitted::Held) {
                "held"
            } else {
                "queued"
            };
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
        finish_claim(self.store, spool, claim);
        Ok(batch)
    }

    /// Alerts about a batch that was queued or held: many rejected lines, held, unusual traffic.
    fn alert_accepted(&self, tenant: &Tenant, batch: &BatchRecord, file_name: &str, held: bool, now: i64) {
        let reasons = batch
            .reasons
            .iter()
            .map(|(r, n)| format!("{r}={n}"))
            .collect::<Vec<_>>()
            .join(", ");
        if batch.rejected > 0 && batch.rejected * 100 >= u64::from(tenant.alert_rejected_percent) * batch.lines.max(1) {
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
                .detail("hold_above", tenant.hold_above.unwrap_or(0))
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
                if traffic.is_volume_anomaly(tenant.anomaly_factor, tenant.anomaly_min_messages) {
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
                        .detail("anomaly_factor", tenant.anomaly_factor)
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
                let temp = reply::temp_path(&tenant.outbox, &reply::result_name(&batch), claim);
                if temp.exists() {
                    reply::publish(&temp, &tenant.outbox.join(reply::result_name(&batch)))
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
    let file =
        AtomicFile::create(&tenant.outbox, &reply::result_name(batch), &batch.claim).map_err(IngestError::Reply)?;
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
            crate::reload::Live::new(config),
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
        fs::create_dir_all(&tenant.outbox).unwrap();
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
        let stray = StoredMessage {
            line: 2,
            reference: String::new(),
            phone: "+33612345678".into(),
            sender: "ACME".into(),
            text: "a".into(),
            coding: crate::store::records::TextCoding::Gsm7,
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
        let result = fs::read_to_string(tenant.outbox.join("june.result.csv")).unwrap();
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
        let temp = reply::temp_path(&tenant.outbox, "july.result.csv", "c2");
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
        let published = fs::read_to_string(tenant.outbox.join("july.result.csv")).unwrap();
        assert_eq!(published, "the result written before the crash");
        assert!(!temp.exists() && !spool.exists());
        assert!(store.claims().unwrap().is_empty());
    }
}
