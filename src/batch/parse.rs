//! Reading a batch file: one scan for its fingerprint and encoding, then RFC 4180 records in
//! bounded chunks (docs/batch-format.md). Memory does not depend on the file's size.
//!
//! The scan computes the keyed content hash (for `duplicate_file`), checks UTF-8 validity (for
//! `encoding = "auto"`) and looks for NUL bytes (a binary file is `unreadable`). Records are then
//! read as raw bytes by the `csv` crate for ASCII-compatible encodings, and decoded field by field
//! later, so one badly encoded line is `bad_encoding` and the rest of the file goes on. Encodings
//! that are not ASCII-compatible (UTF-16) are transcoded to UTF-8 while reading.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use encoding_rs::{Encoding, UTF_8, UTF_16BE, UTF_16LE, WINDOWS_1252};

use crate::config::EncodingChoice;

/// Records are handed on this many at a time.
pub const CHUNK_RECORDS: usize = 2048;

/// What one pass over the raw bytes found.
#[derive(Debug, Clone)]
pub struct Scan {
    pub size: u64,
    pub hash: [u8; 32],
    pub is_utf8: bool,
    pub has_nul: bool,
    pub bom: Option<&'static Encoding>,
    /// Line breaks in the file (LF, CRLF or a lone CR): an upper bound on its records.
    pub newlines: u64,
}

/// Reads the whole file once: keyed hash, UTF-8 validity, NUL bytes, byte-order mark.
pub fn scan(path: &Path, mut hasher: blake3::Hasher) -> io::Result<Scan> {
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    let mut is_utf8 = true;
    let mut has_nul = false;
    let mut breaks = LineBreaks::default();
    let mut head = Vec::new();
    // up to 3 bytes of a UTF-8 sequence cut by the buffer's end
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let data = &buf[..n];
        hasher.update(data);
        if head.len() < 3 {
            head.extend_from_slice(&data[..data.len().min(3 - head.len())]);
        }
        size += n as u64;
        has_nul |= memchr_nul(data);
        breaks.count(data);
        if is_utf8 {
            let mut joined;
            let slice = if carry.is_empty() {
                data
            } else {
                joined = std::mem::take(&mut carry);
                joined.extend_from_slice(data);
                &joined[..]
            };
            match simdutf8::compat::from_utf8(slice) {
                Ok(_) => {}
                Err(e) if e.error_len().is_none() => carry = slice[e.valid_up_to()..].to_vec(),
                Err(_) => is_utf8 = false,
            }
        }
    }
    if !carry.is_empty() {
        is_utf8 = false;
    }
    let bom = Encoding::for_bom(&head).map(|(e, _)| e);
    Ok(Scan {
        size,
        hash: *hasher.finalize().as_bytes(),
        is_utf8,
        has_nul,
        bom,
        newlines: breaks.total,
    })
}

/// Counts line breaks across buffers: LF, CRLF (once) and a lone CR (old Mac exports) each end
/// a line, as they end a record for csv-core.
#[derive(Debug, Default, Clone)]
pub struct LineBreaks {
    pub total: u64,
    /// The last byte counted was a CR: an LF right after it is the same break.
    after_cr: bool,
}

impl LineBreaks {
    /// Adds the breaks in `data`, which follows what was counted before.
    pub fn count(&mut self, data: &[u8]) {
        for i in memchr::memchr2_iter(b'\r', b'\n', data) {
            let lf_of_crlf = data[i] == b'\n' && if i == 0 { self.after_cr } else { data[i - 1] == b'\r' };
            if !lf_of_crlf {
                self.total += 1;
            }
        }
        if let Some(&last) = data.last() {
            self.after_cr = last == b'\r';
        }
    }
}

fn memchr_nul(data: &[u8]) -> bool {
    data.contains(&0)
}

/// The encoding a file is read with: a byte-order mark wins (as in WHATWG decoding), then the
/// tenant's choice; `auto` is UTF-8 when the whole file is valid UTF-8, else Windows-1252.
pub fn choose_encoding(choice: EncodingChoice, scan: &Scan) -> &'static Encoding {
    if let Some(bom) = scan.bom {
        return bom;
    }
    match choice {
        EncodingChoice::Fixed(e) => e,
        EncodingChoice::Auto if scan.is_utf8 => UTF_8,
        EncodingChoice::Auto => WINDOWS_1252,
    }
}

/// Records longer than this are `bad_line` (their bytes are skipped, not kept).
pub const MAX_RECORD_BYTES: usize = 64 << 10;
/// Records with more fields than this are `bad_line` too (a header that long: `unreadable`).
pub const MAX_RECORD_FIELDS: usize = 4096;

/// One record of the file, its fields still in the file's bytes (or UTF-8 when transcoded).
#[derive(Debug, Clone, Default)]
pub struct RawRecord {
    /// 1-based line where the record starts, header included.
    pub line: u64,
    data: Vec<u8>,
    ends: Vec<usize>,
    /// Longer than [`MAX_RECORD_BYTES`]: its fields were dropped.
    pub oversized: bool,
}

impl RawRecord {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        self.data.get(start..end)
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.len()).filter_map(|i| self.get(i))
    }
}

/// A batch file opened for reading records.
///
/// RFC 4180 parsing is `csv-core`'s; this driver adds what it lacks: exact line numbers where a
/// record starts (quoted line breaks, CRLF and blank lines included) and a bound on record size.
pub struct Records {
    source: Box<dyn BufRead + Send>,
    core: csv_core::Reader,
    /// Line breaks consumed so far.
    breaks: LineBreaks,
    pub delimiter: u8,
    /// Fields are UTF-8 already (the file was UTF-8, or transcoded to it).
    pub utf8_fields: bool,
    pub encoding: &'static Encoding,
}

/// Picks the delimiter from the first line: the most frequent of `;`, `,`, TAB and `|` outside
/// quotes, `;` when none appears.
pub fn detect_delimiter(first_line: &[u8]) -> u8 {
    let mut counts = [(b';', 0usize), (b',', 0), (b'\t', 0), (b'|', 0)];
    let mut quoted = false;
    for &b in first_line {
        match b {
            b'"' => quoted = !quoted,
            b'\n' if !quoted => break,
            _ if !quoted => {
                if let Some(c) = counts.iter_mut().find(|(d, _)| *d == b) {
                    c.1 += 1;
                }
            }
            _ => {}
        }
    }
    counts
        .iter()
        .fold((b';', 0), |best, c| if c.1 > best.1 { *c } else { best })
        .0
}

impl Records {
    /// Opens `path` for reading with `encoding`, skipping a byte-order mark, with `delimiter` or
    /// the one detected from the first line.
    pub fn open(path: &Path, encoding: &'static Encoding, delimiter: Option<u8>) -> io::Result<Records> {
        let file = File::open(path)?;
        let transcode = !encoding.is_ascii_compatible();
        let mut source: Box<dyn BufRead + Send> = if transcode {
            let decoder = encoding_rs_io::DecodeReaderBytesBuilder::new()
                .encoding(Some(encoding))
                .bom_override(true)
                .build(file);
            Box::new(BufReader::with_capacity(256 << 10, decoder))
        } else {
            Box::new(BufReader::with_capacity(256 << 10, file))
        };
        // Skip a BOM of the file's encoding (a transcoding reader has already dropped it).
        let head = source.fill_buf()?;
        if !transcode && head.starts_with(b"\xEF\xBB\xBF") && encoding == UTF_8 {
            source.consume(3);
        }
        let head = source.fill_buf()?;
        let delimiter = delimiter.unwrap_or_else(|| detect_delimiter(head));
        let core = csv_core::ReaderBuilder::new().delimiter(delimiter).build();
        Ok(Records {
            source,
            core,
            breaks: LineBreaks::default(),
            delimiter,
            utf8_fields: transcode || encoding == UTF_8,
            encoding,
        })
    }

    /// The next record, or `None` at the end of the file.
    pub fn next_record(&mut self) -> io::Result<Option<RawRecord>> {
        // Skip line breaks between records, counting them, so the record's first line is known.
        loop {
            let buf = self.source.fill_buf()?;
            if buf.is_empty() {
                return Ok(None);
            }
            let skip = buf.iter().take_while(|b| **b == b'\n' || **b == b'\r').count();
            self.breaks.count(&buf[..skip]);
            let done = skip < buf.len();
            self.source.consume(skip);
            if done {
                break;
            }
        }
        let mut record = RawRecord {
            line: self.breaks.total + 1,
            data: vec![0; 256],
            ends: vec![0; 16],
            oversized: false,
        };
        let (mut out, mut nends) = (0usize, 0usize);
        loop {
            let input = self.source.fill_buf()?;
            let (result, nin, nout, nend) =
                self.core
                    .read_record(input, &mut record.data[out..], &mut record.ends[nends..]);
            self.breaks.count(&input[..nin]);
            self.source.consume(nin);
            // csv-core keeps field ends relative to the record's start across calls.
            out += nout;
            nends += nend;
            match result {
                csv_core::ReadRecordResult::InputEmpty => continue,
                csv_core::ReadRecordResult::OutputFull => {
                    if record.data.len() >= MAX_RECORD_BYTES {
                        // Keep reading to the record's end, dropping its bytes.
                        record.oversized = true;
                        out = 0;
                        nends = 0;
                    } else {
                        let len = record.data.len() * 2;
                        record.data.resize(len, 0);
                    }
                }
                csv_core::ReadRecordResult::OutputEndsFull => {
                    if record.ends.len() >= MAX_RECORD_FIELDS {
                        record.oversized = true;
                        nends = 0;
                        out = 0;
                    } else {
                        let len = record.ends.len() * 2;
                        record.ends.resize(len, 0);
                    }
                }
                csv_core::ReadRecordResult::Record | csv_core::ReadRecordResult::End => {
                    if result == csv_core::ReadRecordResult::End && nends == 0 && out == 0 && !record.oversized {
                        return Ok(None);
                    }
                    record.data.truncate(out);
                    record.ends.truncate(nends);
                    if record.oversized {
                        record.data.clear();
                        record.ends.clear();
                    }
                    return Ok(Some(record));
                }
            }
        }
    }

    /// Decodes one field: `None` when its bytes are not valid in the file's encoding.
    pub fn decode<'a>(
        utf8_fields: bool,
        encoding: &'static Encoding,
        bytes: &'a [u8],
    ) -> Option<std::borrow::Cow<'a, str>> {
        if utf8_fields {
            let s = std::str::from_utf8(bytes).ok()?;
            // A transcoding reader marks malformed input with U+FFFD.
            if s.contains('\u{fffd}') && encoding != UTF_8 {
                return None;
            }
            Some(std::borrow::Cow::Borrowed(s))
        } else {
            encoding.decode_without_bom_handling_and_without_replacement(bytes)
        }
    }
}

/// Whether `encoding` needs transcoding for CSV parsing (used for reply files too).
pub fn is_utf16(encoding: &'static Encoding) -> bool {
    encoding == UTF_16LE || encoding == UTF_16BE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delimiter_detection() {
        assert_eq!(detect_delimiter(b"phone;message\n1,2,3"), b';');
        assert_eq!(detect_delimiter(b"phone,message,ref"), b',');
        assert_eq!(detect_delimiter(b"phone\tmessage"), b'\t');
        assert_eq!(detect_delimiter(b"phone|message|x;y"), b'|');
        assert_eq!(detect_delimiter(b"\"a;b;c\",phone"), b',');
        assert_eq!(detect_delimiter(b"phone"), b';');
    }

    #[test]
    fn scan_finds_encoding_facts() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.csv");
        let hasher = || blake3::Hasher::new_keyed(&[1; 32]);
        std::fs::write(&p, "\u{feff}phone;message\n1;é\n").unwrap();
        let s = scan(&p, hasher()).unwrap();
        assert!(s.is_utf8 && !s.has_nul && s.bom == Some(UTF_8));
        std::fs::write(&p, b"phone;message\n1;\xe9t\xe9\n").unwrap();
        let s = scan(&p, hasher()).unwrap();
        assert!(!s.is_utf8 && s.bom.is_none());
        assert_eq!(choose_encoding(EncodingChoice::Auto, &s), WINDOWS_1252);
        // a multi-byte sequence cut across the scan buffer is still valid UTF-8
        let mut big = vec![b'a'; (1 << 20) - 1];
        big.extend_from_slice("é".as_bytes());
        std::fs::write(&p, &big).unwrap();
        assert!(scan(&p, hasher()).unwrap().is_utf8);
    }

    #[test]
    fn oversized_records_are_flagged_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.csv");
        let long = "x".repeat(MAX_RECORD_BYTES * 3);
        std::fs::write(&p, format!("a;b\n1;{long}\n2;ok\n")).unwrap();
        let mut r = Records::open(&p, UTF_8, None).unwrap();
        r.next_record().unwrap();
        let big = r.next_record().unwrap().unwrap();
        assert!(big.oversized && big.line == 2);
        let next = r.next_record().unwrap().unwrap();
        assert_eq!((next.line, next.get(1)), (3, Some(&b"ok"[..])));
    }

    #[test]
    fn line_breaks_of_every_kind_count_once() {
        let count = |parts: &[&[u8]]| {
            let mut b = LineBreaks::default();
            for p in parts {
                b.count(p);
            }
            b.total
        };
        assert_eq!(count(&[b"a\nb\r\nc\rd"]), 3);
        assert_eq!(count(&[b"a\r", b"\nb"]), 1, "a CRLF cut between two buffers");
        assert_eq!(count(&[b"a\r\r\n"]), 2);
        assert_eq!(count(&[b"\n\n"]), 2);
        assert_eq!(count(&[b"x\r", b"", b"y"]), 1);
    }

    #[test]
    fn cr_only_files_number_their_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.csv");
        std::fs::write(&p, "phone;message\r1;a\r\r3;\"two\rlines\"\r5;b").unwrap();
        let mut r = Records::open(&p, UTF_8, None).unwrap();
        let mut lines = Vec::new();
        while let Some(rec) = r.next_record().unwrap() {
            lines.push(rec.line);
        }
        assert_eq!(lines, [1, 2, 4, 6]);
        let s = scan(&p, blake3::Hasher::new_keyed(&[1; 32])).unwrap();
        assert_eq!(s.newlines, 5);
    }

    #[test]
    fn records_report_their_starting_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.csv");
        std::fs::write(&p, "phone;message\r\n1;\"two\nlines\"\r\n\r\n3;x\r\n").unwrap();
        let mut r = Records::open(&p, UTF_8, None).unwrap();
        let mut lines = Vec::new();
        while let Some(rec) = r.next_record().unwrap() {
            lines.push((rec.line, rec.len()));
        }
        assert_eq!(lines, [(1, 2), (2, 2), (5, 2)]);
        std::fs::write(&p, "a;b\n\n\n\"x\r\ny\";\"\"\"q\"\n\nlast;1").unwrap();
        let mut r = Records::open(&p, UTF_8, None).unwrap();
        let mut seen = Vec::new();
        while let Some(rec) = r.next_record().unwrap() {
            seen.push((
                rec.line,
                rec.iter()
                    .map(|f| String::from_utf8_lossy(f).into_owned())
                    .collect::<Vec<_>>(),
            ));
        }
        assert_eq!(seen[1], (4, vec!["x\r\ny".to_string(), "\"q".to_string()]));
        assert_eq!(seen[2], (7, vec!["last".to_string(), "1".to_string()]));
        assert_eq!(seen.len(), 3);
    }

    /// Records of plain or quoted fields (quoted ones may hold delimiters, quotes and line
    /// breaks of every kind), separated by LF, CRLF or CR, with blank lines between some.
    fn record_strategy() -> impl proptest::strategy::Strategy<Value = Vec<(Vec<String>, &'static str, usize)>> {
        use proptest::prelude::*;
        let field = prop_oneof![
            "[a-z0-9 ]{0,8}",
            "[a-z;\"\n\r ]{0,8}".prop_map(|f| format!("\"{}\"", f.replace('"', "\"\""))),
        ];
        let record = proptest::collection::vec(field, 1..4);
        let end = prop_oneof![Just("\n"), Just("\r\n"), Just("\r")];
        proptest::collection::vec((record, end, 0usize..3), 1..30)
    }

    proptest::proptest! {
        /// Every record is numbered with the line it starts on, whatever the line endings, the
        /// blank lines between records and the line breaks inside quoted fields.
        #[test]
        fn records_are_numbered_with_the_line_they_start_on(records in record_strategy()) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("f.csv");
            let mut text = String::new();
            let mut expected = Vec::new();
            let mut line = 1u64;
            for (fields, end, blanks) in &records {
                let body = fields.join(";");
                // A record that reads as empty is a blank line, not a record.
                if body.is_empty() {
                    continue;
                }
                expected.push(line);
                text.push_str(&body);
                text.push_str(end);
                line += 1 + breaks_in(&body);
                for _ in 0..*blanks {
                    text.push_str(end);
                    line += 1;
                }
            }
            std::fs::write(&p, &text).unwrap();
            let mut r = Records::open(&p, UTF_8, Some(b';')).unwrap();
            let mut got = Vec::new();
            while let Some(rec) = r.next_record().unwrap() {
                got.push(rec.line);
            }
            proptest::prop_assert_eq!(got, expected, "{:?}", text);
        }
    }

    /// Line breaks inside a record (within quoted fields): CRLF counts once.
    fn breaks_in(body: &str) -> u64 {
        body.replace("\r\n", "\n")
            .chars()
            .filter(|c| *c == '\n' || *c == '\r')
            .count() as u64
    }
}
