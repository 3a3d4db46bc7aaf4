//! The counters and marks the store keeps beside the records (not personal data: times, ids,
//! totals), each under one name given here.

use std::borrow::Cow;

/// A counter or mark in the store's `meta` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark<'a> {
    /// The dispatch log's position up to which its steps are in the store.
    WalApplied,
    /// The next batch id, mail id and reply sequence number.
    NextBatch,
    NextMail,
    NextReply,
    /// When the last retention sweep ended (unix seconds), and its totals since the store began.
    SweepAt,
    SweepAnonymized,
    SweepDeleted,
    SweepDeletedBatches,
    /// When the last scheduled backup was taken (unix seconds).
    BackupAt,
    /// When a tenant's last daily report was sent (unix seconds).
    DailyReport(&'a str),
    /// The last replies file's time stamp of a tenant (unix milliseconds), so that names never
    /// repeat.
    RepliesMs(&'a str),
}

impl Mark<'_> {
    /// The name the mark is kept under.
    pub fn key(&self) -> Cow<'static, str> {
        match self {
            Mark::WalApplied => "wal_applied".into(),
            Mark::NextBatch => "next_batch".into(),
            Mark::NextMail => "next_mail".into(),
            Mark::NextReply => "next_reply".into(),
            Mark::SweepAt => "sweep_at".into(),
            Mark::SweepAnonymized => "sweep_anonymized".into(),
            Mark::SweepDeleted => "sweep_deleted".into(),
            Mark::SweepDeletedBatches => "sweep_deleted_batches".into(),
            Mark::BackupAt => "backup_at".into(),
            Mark::DailyReport(tenant) => format!("daily_report:{tenant}").into(),
            Mark::RepliesMs(tenant) => format!("replies_ms:{tenant}").into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_ones_stores_already_hold() {
        // Stores written by earlier versions keep their marks under these names.
        assert_eq!(Mark::WalApplied.key(), "wal_applied");
        assert_eq!(Mark::SweepDeletedBatches.key(), "sweep_deleted_batches");
        assert_eq!(Mark::DailyReport("acme").key(), "daily_report:acme");
        assert_eq!(Mark::RepliesMs("acme").key(), "replies_ms:acme");
    }
}
