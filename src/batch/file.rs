//! One batch file, checked whole: its size, encoding and header first, then every line.
//!
//! The pipeline has three stages on their own threads, joined by bounded channels so memory
//! stays flat: a reader parses CSV records in chunks; a checker validates each chunk's lines in
//! parallel (rayon); the caller's thread applies the rules that need file order or the lists
//! the caller holds (`duplicate_recipient`, `blocklisted`) and hands every line to a
//! [`LineSink`]. What the sink does with them (seal them into the store, or build the result a
//! dry run shows) is the caller's: this module reads the file and writes nothing.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;

use encoding_rs::Encoding;
use nohash_hasher::BuildNoHashHasher;
use rayon::prelude::*;

use super::parse::{self, CHUNK_RECORDS, RawRecord, Records};
use super::validate::{Checked, LineRules};
use crate::config::Tenant;
use crate::crypto::TenantKeys;
use crate::sms::codes::{FileReason, LineReason};
use crate::sms::columns::{Column, ColumnMap};
use crate::sms::format::ReplyFormat;

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
    /// What stops the sink (a store or a file it writes to that failed).
    type Error;
    fn start(&mut self, format: &ReplyFormat) -> Result<(), Self::Error>;
    /// `index` is the message's index in the batch when the line was accepted.
    fn line(&mut self, checked: Checked, index: Option<u64>) -> Result<(), Self::Error>;
}

/// Why [`process`] stopped before the file's end (a rejected file is a [`Summary`], not this).
#[derive(Debug)]
pub enum Stopped<E> {
    /// The sink or the duplicate lookup failed.
    Failed(E),
    /// `cancel` was set (a shutdown).
    Cancelled,
}

/// What the file-level checks need from outside the file.
pub struct Context<'a, E> {
    pub tenant: &'a Tenant,
    pub keys: &'a TenantKeys,
    /// Whether a number (its tenant-keyed hash and E.164 form) is on a blocklist.
    pub blocklisted: &'a dyn Fn(&[u8; 16], &str) -> bool,
    /// Whether content with this keyed hash was already taken within the dedupe window.
    pub seen: &'a dyn Fn(&[u8; 32]) -> Result<bool, E>,
    pub cancel: &'a AtomicBool,
}

fn reject<E>(summary: &mut Summary, reason: FileReason, detail: impl Into<String>) -> Result<Summary, Stopped<E>> {
    summary.rejection = Some((reason, detail.into()));
    Ok(std::mem::take(summary))
}

/// A file refused whole: its reason, and a detail for the log.
type Refusal = (FileReason, String);

/// Reads, checks and hands on every line of the file at `path`.
pub fn process<S: LineSink>(
    path: &Path,
    ctx: &Context<'_, S::Error>,
    sink: &mut S,
) -> Result<Summary, Stopped<S::Error>> {
    let tenant = ctx.tenant;
    let mut summary = Summary {
        format: ReplyFormat {
            delimiter: tenant.batch.delimiter.unwrap_or(b';'),
            ..ReplyFormat::default()
        },
        ..Summary::default()
    };
    let size = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) => return reject(&mut summary, FileReason::Unreadable, e.to_string()),
    };
    if size > tenant.batch.max_file_bytes {
        return reject(
            &mut summary,
            FileReason::TooLarge,
            format!("{size} bytes, more than max_file_bytes {}", tenant.batch.max_file_bytes),
        );
    }
    let scan = match parse::scan(path, ctx.keys.file_hasher()) {
        Ok(s) => s,
        Err(e) => return reject(&mut summary, FileReason::Unreadable, e.to_string()),
    };
    summary.hash = Some(scan.hash);
    let encoding = parse::choose_encoding(tenant.batch.encoding, &scan);
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
    if (ctx.seen)(&scan.hash).map_err(Stopped::Failed)? {
        return reject(
            &mut summary,
            FileReason::DuplicateFile,
            "same content as a batch taken within dedupe_window",
        );
    }
    let mut records = match Records::open(path, encoding, tenant.batch.delimiter) {
        Ok(r) => r,
        Err(e) => return reject(&mut summary, FileReason::Unreadable, e.to_string()),
    };
    summary.format.delimiter = records.delimiter;
    let columns = match columns(tenant, &mut records, encoding) {
        Ok(c) => c,
        Err((reason, detail)) => return reject(&mut summary, reason, detail),
    };

    sink.start(&summary.format).map_err(Stopped::Failed)?;
    let rules = LineRules {
        tenant,
        keys: ctx.keys,
        columns: &columns,
        encoding,
        utf8_fields: records.utf8_fields,
        now: crate::clock::timestamp(),
    };
    // The one structure that grows with the file: 8-byte fingerprints of accepted lines, for
    // `duplicate_recipient`. Sized once from the file's line count (at most `max_lines`) so it
    // never rehashes into twice its size.
    let expected = scan.newlines.saturating_add(1).min(tenant.batch.max_lines) as usize;
    let mut tally = Tally {
        ctx,
        summary: &mut summary,
        dedupe: HashSet::with_capacity_and_hasher(expected, Default::default()),
        countries: HashSet::new(),
        strict_failure: None,
    };
    let (read, written) = pipeline(records, &rules, ctx.cancel, tenant.batch.max_lines, |checked| {
        tally.take(checked, sink)
    });
    let strict_failure = tally.strict_failure;
    written.map_err(Stopped::Failed)?;
    if ctx.cancel.load(Ordering::Relaxed) {
        return Err(Stopped::Cancelled);
    }
    if let Some((line, reason)) = strict_failure {
        return reject(
            &mut summary,
            FileReason::Strict,
            format!("line {line} rejected ({reason}) and the tenant is strict"),
        );
    }
    match read {
        Ok((_, true)) => reject(
            &mut summary,
            FileReason::TooManyLines,
            format!("more than max_lines {} data lines", tenant.batch.max_lines),
        ),
        Ok(_) => Ok(summary),
        Err(e) => {
            let detail = format!("after line {}: {e}", summary.lines);
            reject(&mut summary, FileReason::Unreadable, detail)
        }
    }
}

/// The file's columns: the tenant's `columns`, or its header line; refused when the phone
/// column, the text (without a template) or a template's variable is missing.
fn columns(tenant: &Tenant, records: &mut Records, encoding: &'static Encoding) -> Result<ColumnMap, Refusal> {
    let unreadable = |detail: &str| (FileReason::Unreadable, detail.to_string());
    let columns = match &tenant.batch.columns {
        Some(cols) => ColumnMap::new(cols),
        None => {
            let header = match records.next_record() {
                Ok(Some(h)) => h,
                Ok(None) => return Err(unreadable("no header line")),
                Err(e) => return Err(unreadable(&e.to_string())),
            };
            if header.oversized {
                return Err(unreadable("the header line has more than 4,096 columns or 64 KiB"));
            }
            let mut cols = Vec::with_capacity(header.len());
            for field in header.iter() {
                match Records::decode(records.utf8_fields, encoding, field) {
                    Some(name) => cols.push(Column::from_header(&name)),
                    None => return Err(unreadable("the header line is not valid in the file's encoding")),
                }
            }
            ColumnMap::new(&cols)
        }
    };
    let missing = |detail: String| Err((FileReason::MissingColumn, detail));
    if columns.phone.is_none() {
        return missing("no phone column".into());
    }
    if columns.message.is_none() && tenant.batch.template.is_none() {
        return missing("no message column and no template".into());
    }
    if let Some(template) = &tenant.batch.template {
        if let Some(var) = template.variables().find(|v| !columns.vars.iter().any(|(n, _)| n == v)) {
            return missing(format!("the template uses {{{var}}} and the file has no such column"));
        }
    }
    Ok(columns)
}

/// The three stages: a reader thread parses records in chunks, a checker thread checks each
/// chunk's lines in parallel, and this thread hands every checked line, in file order, to
/// `take` (which says whether to go on). Returns what the reader saw (records read, whether
/// past `max_lines`), and how `take` ended.
fn pipeline<E>(
    mut records: Records,
    rules: &LineRules<'_>,
    cancel: &AtomicBool,
    max_lines: u64,
    mut take: impl FnMut(Checked) -> Result<bool, E>,
) -> (io::Result<(u64, bool)>, Result<(), E>) {
    std::thread::scope(|scope| {
        let (raw_tx, raw_rx) = sync_channel::<Vec<RawRecord>>(2);
        let (checked_tx, checked_rx) = sync_channel::<Vec<Checked>>(2);
        let reader = scope.spawn(move || -> io::Result<(u64, bool)> {
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
        scope.spawn(move || {
            for chunk in raw_rx {
                let checked: Vec<Checked> = chunk.par_iter().map(|r| rules.check(r)).collect();
                if checked_tx.send(checked).is_err() {
                    return;
                }
            }
        });
        let mut taken = Ok(());
        'chunks: for chunk in checked_rx {
            for checked in chunk {
                match take(checked) {
                    Ok(true) => {}
                    Ok(false) => break 'chunks,
                    Err(e) => {
                        taken = Err(e);
                        break 'chunks;
                    }
                }
            }
        }
        let read = reader
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the reader thread panicked")));
        (read, taken)
    })
}

/// The rules that need file order or the caller's lists, and the file's totals.
struct Tally<'a, 'c, E> {
    ctx: &'a Context<'c, E>,
    summary: &'a mut Summary,
    dedupe: HashSet<u64, BuildNoHashHasher<u64>>,
    countries: HashSet<rlibphonenumber::Region>,
    /// The first rejected line of a strict tenant: the file is refused.
    strict_failure: Option<(u64, LineReason)>,
}

impl<E> Tally<'_, '_, E> {
    /// Applies `blocklisted` and `duplicate_recipient`, counts the line and hands it to `sink`.
    /// `Ok(false)`: a strict tenant's line was rejected, stop.
    fn take<S: LineSink<Error = E>>(&mut self, mut checked: Checked, sink: &mut S) -> Result<bool, E> {
        let summary = &mut *self.summary;
        summary.lines += 1;
        if let Ok(acc) = &checked.outcome {
            if (self.ctx.blocklisted)(&acc.phone_hash, &acc.message.phone) {
                checked.outcome = Err(LineReason::Blocklisted);
            } else if !self.dedupe.insert(acc.dedupe) {
                checked.outcome = Err(LineReason::DuplicateRecipient);
            }
        }
        let index = match &checked.outcome {
            Ok(acc) => {
                if let Some(c) = acc.country {
                    if self.countries.insert(c) {
                        summary.countries.insert(c.to_string());
                    }
                }
                summary.accepted += 1;
                Some(summary.accepted - 1)
            }
            Err(reason) => {
                summary.rejected += 1;
                *summary.reasons.entry(*reason).or_default() += 1;
                tracing::debug!(tenant = %self.ctx.tenant.id, line = checked.line, reason = %reason, "line rejected");
                if self.ctx.tenant.batch.strict {
                    self.strict_failure = Some((checked.line, *reason));
                    return Ok(false);
                }
                None
            }
        };
        sink.line(checked, index)?;
        Ok(true)
    }
}
