//! Reply files in a tenant's outbox (docs/reply-files.md): `<stem>.result.csv`, `<stem>.report.csv` and
//! `replies-<UTC timestamp>.csv`.
//!
//! Every reply file is written whole under a hidden temporary name in the outbox, synced, and
//! renamed, so an ERP never reads half a file. It uses the batch's delimiter and encoding (and
//! a byte-order mark when the batch had one). This module writes files; it decides nothing about
//! when (ingest writes results, the [`ReportWriter`] writes reports).
//!
//! Every cell is guarded against formula injection (OWASP "CSV injection") when a row is
//! written, because refs, phone numbers as written, partners' error texts and incoming texts come
//! from outside and an operator may open the file in a spreadsheet: see [`guard`].

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use encoding_rs::{Encoding, UTF_8, UTF_16BE, UTF_16LE};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::sms::format::ReplyFormat;
use crate::store::records::{BatchRecord, CHUNK_MESSAGES, message_id};
use crate::store::{Store, StoreError};

pub const RESULT_HEADER: [&str; 6] = ["line", "ref", "phone", "status", "reason", "message_id"];
pub const REPORT_HEADER: [&str; 9] = [
    "line",
    "ref",
    "phone",
    "message_id",
    "status",
    "partner",
    "submitted_at",
    "done_at",
    "error",
];

pub const REPLIES_HEADER: [&str; 5] = ["received_at", "from", "to", "text", "message_id"];

/// Replies written to one file, at most.
const REPLIES_PER_FILE: usize = 10_000;

/// CSV rows written in a batch's delimiter and encoding.
pub struct ReplyCsv<W: Write> {
    out: W,
    csv: csv::Writer<Vec<u8>>,
    delimiter: u8,
    encoding: &'static Encoding,
    encoder: Option<encoding_rs::Encoder>,
}

impl<W: Write> ReplyCsv<W> {
    pub fn new(mut out: W, format: &ReplyFormat) -> io::Result<ReplyCsv<W>> {
        let encoding = Encoding::for_label(format.encoding.as_bytes()).unwrap_or(UTF_8);
        if format.bom {
            match encoding {
                e if e == UTF_8 => out.write_all(b"\xEF\xBB\xBF")?,
                e if e == UTF_16LE => out.write_all(b"\xFF\xFE")?,
                e if e == UTF_16BE => out.write_all(b"\xFE\xFF")?,
                _ => {}
            }
        }
        let encoder =
            (encoding != UTF_8 && encoding != UTF_16LE && encoding != UTF_16BE).then(|| encoding.new_encoder());
        Ok(ReplyCsv {
            out,
            csv: csv_writer(format.delimiter),
            delimiter: format.delimiter,
            encoding,
            encoder,
        })
    }

    /// Appends one row.
    pub fn row<I, F>(&mut self, fields: I) -> io::Result<()>
    where
        I: IntoIterator<Item = F>,
        F: AsRef<[u8]>,
    {
        let fields: Vec<F> = fields.into_iter().collect();
        self.csv
            .write_record(fields.iter().map(|f| guard(f.as_ref())))
            .map_err(io::Error::other)?;
        if self.csv.get_ref().len() >= 60 << 10 {
            self.drain()?;
        }
        Ok(())
    }

    fn drain(&mut self) -> io::Result<()> {
        let writer = std::mem::replace(&mut self.csv, csv_writer(self.delimiter));
        let buf = writer.into_inner().map_err(|e| e.into_error())?;
        // Everything the csv writer produced came from &str fields, so it is UTF-8.
        let text = String::from_utf8_lossy(&buf);
        match (self.encoding, &mut self.encoder) {
            (e, _) if e == UTF_8 => self.out.write_all(&buf)?,
            (e, _) if e == UTF_16LE => {
                let bytes: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
                self.out.write_all(&bytes)?
            }
            (e, _) if e == UTF_16BE => {
                let bytes: Vec<u8> = text.encode_utf16().flat_map(u16::to_be_bytes).collect();
                self.out.write_all(&bytes)?
            }
            (_, Some(encoder)) => {
                let mut bytes = Vec::with_capacity(buf.len() + 16);
                let max = encoder
                    .max_buffer_length_from_utf8_if_no_unmappables(text.len())
                    .unwrap_or(text.len() * 4)
                    + 64;
                bytes.reserve(max);
                let (_, _, _) = encoder.encode_from_utf8_to_vec(&text, &mut bytes, false);
                self.out.write_all(&bytes)?
            }
            (_, None) => self.out.write_all(&buf)?,
        }
        Ok(())
    }

    /// Writes what is buffered and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.drain()?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// A cell as it is written to a reply file. A cell that a spreadsheet would take for a formula
/// (one that begins with `=`, `+`, `-`, `@`, a TAB or a CR) gets a single quote in front, and so
/// does a cell that begins with a single quote, so that the rule undoes exactly: **a cell that
/// begins with `'` had one added; drop that first character to get the value back.** A number
/// (`+` or `-` then digits only, as E.164 numbers are) is left as it is: a spreadsheet reads it
/// as a number, not a formula.
pub fn guard(cell: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let risky = matches!(cell.first(), Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r' | b'\''));
    let number =
        matches!(cell.first(), Some(b'+' | b'-')) && cell.len() > 1 && cell[1..].iter().all(u8::is_ascii_digit);
    if risky && !number {
        let mut guarded = Vec::with_capacity(cell.len() + 1);
        guarded.push(b'\'');
        guarded.extend_from_slice(cell);
        std::borrow::Cow::Owned(guarded)
    } else {
        std::borrow::Cow::Borrowed(cell)
    }
}

fn csv_writer(delimiter: u8) -> csv::Writer<Vec<u8>> {
    csv::WriterBuilder::new()
        .delimiter(delimiter)
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::with_capacity(64 << 10))
}

/// A file written under a hidden temporary name beside its final name, then renamed. Dropped
/// before [`AtomicFile::sync`], it removes its temporary file.
pub struct AtomicFile {
    temp: PathBuf,
    target: PathBuf,
    file: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Creates `dir/.<name>.<tag>.tmp` for a file that will become `dir/<name>`.
    pub fn create(dir: &Path, name: &str, tag: &str) -> io::Result<AtomicFile> {
        let temp = temp_path(dir, name, tag);
        let file = File::create(&temp)?;
        Ok(AtomicFile {
            temp,
            target: dir.join(name),
            file: Some(BufWriter::with_capacity(256 << 10, file)),
        })
    }

    /// Syncs the temporary file; it can then be renamed even after a crash.
    pub fn sync(mut self) -> io::Result<PreparedFile> {
        if let Some(writer) = self.file.take() {
            let file = writer.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
        }
        Ok(PreparedFile {
            temp: self.temp.clone(),
            target: self.target.clone(),
        })
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(buf),
            None => Err(io::Error::other("file already synced")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// The temporary name of a reply file, also used to find it again after a crash.
pub fn temp_path(dir: &Path, name: &str, tag: &str) -> PathBuf {
    dir.join(format!(".{name}.{tag}.tmp"))
}

/// A synced temporary file waiting for its rename.
pub struct PreparedFile {
    pub temp: PathBuf,
    pub target: PathBuf,
}

impl PreparedFile {
    /// Renames the file into place and syncs the folder, so the name survives a crash.
    pub fn publish(&self) -> io::Result<()> {
        publish(&self.temp, &self.target)
    }
}

/// Renames `temp` to `target` and syncs the folder.
pub fn publish(temp: &Path, target: &Path) -> io::Result<()> {
    fs::rename(temp, target)?;
    if let Some(dir) = target.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The name of a batch's result file.
pub fn result_name(batch: &BatchRecord) -> String {
    format!("{}.result.csv", batch.stem())
}

/// The name of a batch's delivery report.
pub fn report_name(batch: &BatchRecord) -> String {
    format!("{}.report.csv", batch.stem())
}

fn time_text(t: Option<i64>) -> String {
    t.and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map(|ts| ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// Writes (or rewrites) a batch's delivery report into `outbox`.
pub fn write_report(store: &Store, outbox: &Path, batch: &BatchRecord) -> Result<(), ReplyError> {
    let file = AtomicFile::create(outbox, &report_name(batch), &format!("b{}", batch.id))?;
    let mut csv = ReplyCsv::new(file, &batch.format)?;
    csv.row(REPORT_HEADER)?;
    let chunks = batch.accepted.div_ceil(CHUNK_MESSAGES);
    for chunk in 0..chunks {
        let messages = store.load_chunk(&batch.tenant, batch.id, chunk as u32)?;
        let from = chunk * CHUNK_MESSAGES;
        let statuses = store.statuses(batch, from, from + CHUNK_MESSAGES)?;
        for (i, m) in messages.iter().enumerate() {
            let index = from + i as u64;
            let status = statuses.get(&index);
            let state = status.map(|s| s.status).unwrap_or_else(|| batch.implicit_status(index));
            csv.row([
                m.line.to_string().as_str(),
                &m.reference,
                &m.phone,
                &message_id(batch.id, index).to_string(),
                state.as_str(),
                status.map(|s| s.partner.as_str()).unwrap_or(""),
                &time_text(status.and_then(|s| s.submitted_at)),
                &time_text(status.and_then(|s| s.done_at)),
                status.map(|s| s.error.as_str()).unwrap_or(""),
            ])?;
        }
    }
    csv.finish()?.sync()?.publish()?;
    Ok(())
}

/// Writes a tenant's pending incoming messages into one `replies-<UTC timestamp>.csv`, then
/// drops them from the store. Returns how many it wrote.
///
/// The timestamp is the first reply's arrival, to the millisecond, and always later than the
/// previous file's, so no file overwrites another. A crash after the rename and before the
/// store forgets the replies writes the same file again (the same name, the same first rows).
/// The file uses the tenant's `delimiter` (`;` when it has none) and its `encoding` when one is
/// set (UTF-8 otherwise), since an MO belongs to no batch.
pub fn write_replies(store: &Store, tenant: &crate::config::Tenant) -> Result<usize, ReplyError> {
    let pending = store.pending_replies(&tenant.id, REPLIES_PER_FILE)?;
    let (Some((_, first)), Some((last, _))) = (pending.first(), pending.last()) else {
        return Ok(0);
    };
    let mark = crate::store::Mark::RepliesMs(&tenant.id);
    let previous = store.mark(mark)?.unwrap_or(0) as i64;
    let ms = first.received_at.max(previous + 1);
    let name = jiff::Timestamp::from_millisecond(ms)
        .map(|t| format!("replies-{}.csv", t.strftime("%Y%m%dT%H%M%S%.3fZ")))
        .unwrap_or_else(|_| format!("replies-{ms}.csv"));
    let format = ReplyFormat {
        delimiter: tenant.batch.delimiter.unwrap_or(b';'),
        encoding: match tenant.batch.encoding {
            crate::config::EncodingChoice::Fixed(e) => e.name().to_string(),
            crate::config::EncodingChoice::Auto => "UTF-8".into(),
        },
        bom: false,
    };
    let file = AtomicFile::create(&tenant.folders.outbox, &name, "replies")?;
    let mut csv = ReplyCsv::new(file, &format)?;
    csv.row(REPLIES_HEADER)?;
    for (_, r) in &pending {
        csv.row([
            time_text(Some(r.received_at.div_euclid(1000))).as_str(),
            &r.from,
            &r.to,
            &r.text,
            &r.message_id.map(|id| id.to_string()).unwrap_or_default(),
        ])?;
    }
    csv.finish()?.sync()?.publish()?;
    store.replies_written(&tenant.id, *last, (mark, ms as u64))?;
    tracing::info!(tenant = %tenant.id, file = %name, replies = pending.len(), "replies file written");
    Ok(pending.len())
}

#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error("writing a reply file: {0}")]
    Io(io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<io::Error> for ReplyError {
    fn from(e: io::Error) -> Self {
        ReplyError::Io(e)
    }
}

/// Keeps delivery reports up to date: every tenant's `report_interval` while a batch is under
/// way, and a last time when every message of it is final. Writes incoming messages into
/// replies files within a second of their arrival.
pub struct ReportWriter {
    pub store: Store,
    pub config: crate::config::Live,
}

/// Asks the report writer for a batch's final report.
pub type ReportRequests = mpsc::UnboundedSender<u64>;

impl ReportWriter {
    /// Runs until `shutdown`; batches whose every message became final arrive on `done`.
    pub async fn run(self, mut done: mpsc::UnboundedReceiver<u64>, shutdown: CancellationToken) {
        let mut last: std::collections::HashMap<u64, std::time::Instant> = Default::default();
        // Final reports missed by a crash are written at start.
        let mut missed = !self.catch_up().await;
        // One that could not be written (a full outbox) is tried again every 5 s.
        let mut retry = tokio::time::interval(Duration::from_secs(5));
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(id) = done.recv() => {
                    last.remove(&id);
                    missed |= !self.final_report(id).await;
                }
                _ = tick.tick() => {
                    self.periodic(&mut last).await;
                    self.replies().await;
                }
                _ = retry.tick(), if missed => missed = !self.catch_up().await,
            }
        }
    }

    /// Writes every final report not written yet; `false` when one of them could not be.
    async fn catch_up(&self) -> bool {
        let store = self.store.clone();
        let batches = tokio::task::spawn_blocking(move || store.batches(None)).await;
        let mut all = true;
        match batches {
            Ok(Ok(batches)) => {
                for b in batches {
                    if b.state == crate::store::records::BatchState::Done && !b.report_final && b.accepted > 0 {
                        all &= self.final_report(b.id).await;
                    }
                }
            }
            _ => all = false,
        }
        all
    }

    /// Writes a batch's final report; `false` when it could not (tried again later).
    async fn final_report(&self, id: u64) -> bool {
        let store = self.store.clone();
        let config = self.config.get();
        let res = tokio::task::spawn_blocking(move || -> Result<(), ReplyError> {
            let Some(batch) = store.batch(id)? else { return Ok(()) };
            let Some(tenant) = config.tenants.get(&batch.tenant) else { return Ok(()) };
            write_report(&store, &tenant.folders.outbox, &batch)?;
            store.mark_report_final(id)?;
            tracing::info!(batch = id, tenant = %batch.tenant, file = %report_name(&batch), "final delivery report written");
            Ok(())
        })
        .await;
        if let Ok(Err(e)) | Err(e) = res.map_err(|e| ReplyError::Io(io::Error::other(e))) {
            static THROTTLE: crate::limits::Throttle = crate::limits::Throttle::new(Duration::from_secs(60));
            if let Some(held) = THROTTLE.allow(&id.to_string()) {
                tracing::error!(batch = id, error = %e, "cannot write the final report; tried again every 5 s ({held} more failures not logged)");
            }
            return false;
        }
        true
    }

    async fn replies(&self) {
        let store = self.store.clone();
        let config = self.config.get();
        let res = tokio::task::spawn_blocking(move || -> Result<(), ReplyError> {
            for tenant in config.tenants.values() {
                while write_replies(&store, tenant)? == REPLIES_PER_FILE {}
            }
            Ok(())
        })
        .await;
        if let Ok(Err(e)) = res {
            tracing::warn!(error = %e, "cannot write a replies file; will retry");
        }
    }

    async fn periodic(&self, last: &mut std::collections::HashMap<u64, std::time::Instant>) {
        let store = self.store.clone();
        let Ok(Ok(active)) = tokio::task::spawn_blocking(move || store.active_batches()).await else {
            return;
        };
        let now = std::time::Instant::now();
        for batch in active {
            let Some(tenant) = self.config.get().tenants.get(&batch.tenant).cloned() else {
                continue;
            };
            let since = last.entry(batch.id).or_insert(now);
            if now.duration_since(*since) < tenant.replies.report_interval {
                continue;
            }
            *since = now;
            let store = self.store.clone();
            let outbox = tenant.folders.outbox.clone();
            let res = tokio::task::spawn_blocking(move || write_report(&store, &outbox, &batch)).await;
            if let Ok(Err(e)) = res {
                tracing::warn!(error = %e, "cannot write a delivery report; will retry");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(format: &ReplyFormat, rows: &[[&str; 3]]) -> Vec<u8> {
        let mut csv = ReplyCsv::new(Vec::new(), format).unwrap();
        for r in rows {
            csv.row(r).unwrap();
        }
        csv.finish().unwrap()
    }

    #[test]
    fn formula_cells_are_guarded_and_numbers_are_not() {
        let cases: &[(&str, &str)] = &[
            ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"),
            ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
            ("-2+3", "'-2+3"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\tx", "'\tx"),
            ("\rx", "'\rx"),
            ("'quoted", "''quoted"),
            ("+33612345678", "+33612345678"),
            ("-42", "-42"),
            ("+", "'+"),
            ("INV-2026-001", "INV-2026-001"),
            ("", ""),
            ("Bonjour = hello", "Bonjour = hello"),
        ];
        for (cell, want) in cases {
            assert_eq!(String::from_utf8_lossy(&guard(cell.as_bytes())), *want, "{cell:?}");
            // The documented way back: a leading quote is dropped.
            let back = want.strip_prefix('\'').unwrap_or(want);
            assert_eq!(back, *cell, "{cell:?}");
        }
    }

    #[test]
    fn delimiter_quoting_and_encodings() {
        let mut f = ReplyFormat::default();
        assert_eq!(write(&f, &[["a", "b;c", "\"q\""]]), b"a;\"b;c\";\"\"\"q\"\"\"\r\n");
        f.delimiter = b'\t';
        f.encoding = "windows-1252".into();
        assert_eq!(write(&f, &[["é", "€", "x"]]), b"\xe9\t\x80\tx\r\n");
        f.encoding = "UTF-16LE".into();
        f.bom = true;
        assert_eq!(write(&f, &[["a", "b", "c"]]), b"\xff\xfea\0\t\0b\0\t\0c\0\r\0\n\0");
    }
}
