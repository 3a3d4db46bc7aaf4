//! What the store keeps, as plain Rust types. Each is encoded with postcard and then sealed;
//! none of these bytes reach the disk in clear.

use serde::{Deserialize, Serialize};

use crate::sms::codes::{FileReason, LineReason, MessageStatus};
use crate::sms::format::ReplyFormat;

/// Messages of one batch are stored this many to a record: one seal and one B-tree entry per
/// chunk instead of per message is what lets ingest outrun a per-record store.
pub const CHUNK_MESSAGES: u64 = 256;

/// A message id is its batch id and its index among the batch's accepted messages.
pub const INDEX_BITS: u32 = 24;

/// The message id of the `index`-th accepted message of batch `batch`.
pub fn message_id(batch: u64, index: u64) -> u64 {
    (batch << INDEX_BITS) | index
}

/// Splits a message id into its batch id and index.
pub fn split_message_id(id: u64) -> (u64, u64) {
    (id >> INDEX_BITS, id & ((1 << INDEX_BITS) - 1))
}

/// Where a batch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchState {
    /// Lines are being sealed into the store; not visible to the dispatcher. A batch found in
    /// this state at start-up was cut short by a crash and is ingested again from its spool file.
    Ingesting,
    /// Durable and acknowledged; its messages are being dispatched.
    Queued,
    /// Durable and acknowledged, but above the tenant's `hold_above`: nothing is sent until an
    /// operator releases (or cancels) it.
    Held,
    /// Every message has reached a final status.
    Done,
    /// The whole file was refused; it has no messages.
    Rejected,
}

impl BatchState {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchState::Ingesting => "ingesting",
            BatchState::Queued => "queued",
            BatchState::Held => "held",
            BatchState::Done => "done",
            BatchState::Rejected => "rejected",
        }
    }
}

/// One uploaded file and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub id: u64,
    pub tenant: String,
    /// The name the file had in the inbox.
    pub file_name: String,
    /// The name of its spool file, which identifies the claim across a crash.
    pub claim: String,
    pub received_at: i64,
    pub state: BatchState,
    pub file_reason: Option<FileReason>,
    pub format: ReplyFormat,
    /// Data lines read (the header is not counted).
    pub lines: u64,
    /// Messages queued, numbered 0..accepted.
    pub accepted: u64,
    pub rejected: u64,
    /// The next message index the dispatcher has not yet taken.
    pub cursor: u64,
    /// Messages by status, indexed by `MessageStatus as usize`.
    pub counts: [u64; 9],
    pub report_final: bool,
    pub updated_at: i64,
    /// Rejected lines by reason.
    pub reasons: Vec<(LineReason, u64)>,
    /// Destination regions of the accepted messages (ISO 3166 alpha-2).
    pub countries: Vec<String>,
    /// Set by a cancel: messages from this index on that were never taken are `canceled`.
    pub canceled_from: Option<u64>,
    /// The reply files' stem when it is not the file's own (another batch answers under that
    /// one: see `Store::begin_batch`).
    pub reply_stem: Option<String>,
}

/// A batch as stored before `reply_stem` existed: read, then taken as a batch with none.
#[derive(Deserialize)]
struct BatchRecordV1 {
    id: u64,
    tenant: String,
    file_name: String,
    claim: String,
    received_at: i64,
    state: BatchState,
    file_reason: Option<FileReason>,
    format: ReplyFormat,
    lines: u64,
    accepted: u64,
    rejected: u64,
    cursor: u64,
    counts: [u64; 9],
    report_final: bool,
    updated_at: i64,
    reasons: Vec<(LineReason, u64)>,
    countries: Vec<String>,
    canceled_from: Option<u64>,
}

/// Reads a stored batch record, of this version or of the one before `reply_stem`.
pub fn decode_batch(plain: &[u8]) -> Result<BatchRecord, postcard::Error> {
    postcard::from_bytes::<BatchRecord>(plain).or_else(|e| {
        let v1: BatchRecordV1 = postcard::from_bytes(plain).map_err(|_| e)?;
        Ok(BatchRecord {
            id: v1.id,
            tenant: v1.tenant,
            file_name: v1.file_name,
            claim: v1.claim,
            received_at: v1.received_at,
            state: v1.state,
            file_reason: v1.file_reason,
            format: v1.format,
            lines: v1.lines,
            accepted: v1.accepted,
            rejected: v1.rejected,
            cursor: v1.cursor,
            counts: v1.counts,
            report_final: v1.report_final,
            updated_at: v1.updated_at,
            reasons: v1.reasons,
            countries: v1.countries,
            canceled_from: v1.canceled_from,
            reply_stem: None,
        })
    })
}

/// A file name without its last extension (docs/reply-files.md, `<stem>`).
pub fn file_stem(file_name: &str) -> &str {
    match file_name.rfind('.') {
        Some(i) if i > 0 => &file_name[..i],
        _ => file_name,
    }
}

impl BatchRecord {
    /// A batch just claimed, about to be ingested.
    pub fn new(id: u64, tenant: &str, file_name: &str, claim: &str, received_at: i64, format: ReplyFormat) -> Self {
        BatchRecord {
            id,
            tenant: tenant.to_string(),
            file_name: file_name.to_string(),
            claim: claim.to_string(),
            received_at,
            state: BatchState::Ingesting,
            file_reason: None,
            format,
            lines: 0,
            accepted: 0,
            rejected: 0,
            cursor: 0,
            counts: [0; 9],
            report_final: false,
            updated_at: received_at,
            reasons: Vec::new(),
            countries: Vec::new(),
            canceled_from: None,
            reply_stem: None,
        }
    }

    /// The status of a message that has no status record of its own.
    pub fn implicit_status(&self, index: u64) -> MessageStatus {
        match (self.state, self.canceled_from) {
            (_, Some(from)) if index >= from => MessageStatus::Canceled,
            (BatchState::Held, _) => MessageStatus::Held,
            _ => MessageStatus::Queued,
        }
    }

    /// The reply files' stem: the file name without its last extension (docs/reply-files.md), unless
    /// another batch answers under that one.
    pub fn stem(&self) -> &str {
        self.reply_stem.as_deref().unwrap_or_else(|| file_stem(&self.file_name))
    }

    pub fn count(&self, status: MessageStatus) -> u64 {
        self.counts[status as usize]
    }

    /// Messages in a final status.
    pub fn finished(&self) -> u64 {
        MessageStatus::ALL
            .iter()
            .filter(|s| s.is_final())
            .map(|s| self.count(*s))
            .sum()
    }
}

/// What happened to one message after it was queued. Absent means `queued`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRecord {
    pub status: MessageStatus,
    pub partner: String,
    /// The partner's id for the message, once submitted.
    pub partner_id: String,
    pub submitted_at: Option<i64>,
    pub done_at: Option<i64>,
    pub error: String,
    pub attempts: u32,
}

impl StatusRecord {
    pub fn queued() -> StatusRecord {
        StatusRecord {
            status: MessageStatus::Queued,
            partner: String::new(),
            partner_id: String::new(),
            submitted_at: None,
            done_at: None,
            error: String::new(),
            attempts: 0,
        }
    }
}

/// A file already taken, for `duplicate_file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenFile {
    pub batch: u64,
    pub seen_at: i64,
}

/// An opt-out list entry; the number itself is only in the key, as its keyed hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockEntry {
    pub added_at: i64,
    pub source: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_split_back() {
        let id = message_id(77, 1_000_000);
        assert_eq!(split_message_id(id), (77, 1_000_000));
        assert!(message_id(1, 0) > message_id(0, (1 << INDEX_BITS) - 1));
    }

    #[test]
    fn stem_drops_last_extension() {
        let mut b = BatchRecord::new(1, "t", "june.batch.csv", "", 0, ReplyFormat::default());
        assert_eq!(b.stem(), "june.batch");
        b.file_name = "noext".into();
        assert_eq!(b.stem(), "noext");
        b.reply_stem = Some("noext.7".into());
        assert_eq!(b.stem(), "noext.7");
    }

    #[test]
    fn batches_stored_before_reply_stem_still_read() {
        let mut b = BatchRecord::new(3, "t", "june.csv", "c1", 5, ReplyFormat::default());
        b.accepted = 9;
        let mut old = postcard::to_stdvec(&b).expect("encode");
        old.pop(); // the `reply_stem` None tag: what an older version wrote
        assert_eq!(decode_batch(&old).expect("old record"), b);
        b.reply_stem = Some("june.csv".into());
        assert_eq!(
            decode_batch(&postcard::to_stdvec(&b).expect("encode")).expect("new record"),
            b
        );
    }
}

/// A mail waiting to be sent. Recipients, subjects and bodies are sealed like everything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailRecord {
    pub kind: String,
    pub to: String,
    pub subject: String,
    pub body: String,
    pub attempts: u32,
    pub next_at: i64,
    pub created_at: i64,
}

/// Alerts of one kind for one recipient held back by `min_interval`, for the next digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestRecord {
    pub kind: String,
    pub to: String,
    /// When the last mail of this kind went to this recipient.
    pub last_sent: i64,
    /// Alerts held back since then.
    pub pending: u64,
    pub since: i64,
    /// The first few held-back alerts, one line each.
    pub details: Vec<String>,
}
