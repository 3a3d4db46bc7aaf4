//! Incoming messages (MO) waiting for their `replies-*.csv`, and what each tenant last sent to
//! each number, so that an MO finds the tenant and the message it answers
//! (`crate::sms::mo` describes the matching).
//!
//! Both tables are keyed by tenant ‖ 0 ‖ …, so a tenant's entries are one range, and sealed with
//! the tenant's key: the number appears only as the tenant's keyed hash in `last_sent` keys and
//! inside sealed values. `last_sent` holds one entry per (tenant, number), overwritten at each
//! send: it does not grow with traffic. A reply leaves the store once the file holding it is
//! synced and renamed into the outbox.

use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{BLOCKLIST, META, Result, Store, encode, open_record, tenant_key, tenant_range};
use crate::sms::mo::{Mo, MoCandidate};
use crate::store::records::BlockEntry;

/// tenant ‖ 0 ‖ keyed phone hash → sealed [`LastSent`].
pub(super) const LAST_SENT: TableDefinition<&[u8], &[u8]> = TableDefinition::new("last_sent");
/// tenant ‖ 0 ‖ sequence (8 bytes, big-endian) → sealed [`ReplyRecord`].
pub(super) const REPLIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("replies");

pub(super) fn create_tables(tx: &WriteTransaction) -> Result<()> {
    tx.open_table(LAST_SENT)?;
    tx.open_table(REPLIES)?;
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LastSent {
    message_id: u64,
    /// Unix milliseconds.
    at: i64,
}

/// An incoming message kept for its tenant's next replies file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyRecord {
    /// Unix milliseconds.
    pub received_at: i64,
    /// E.164.
    pub from: String,
    pub to: String,
    pub text: String,
    /// The message it answers, when the tenant ever sent to that number.
    pub message_id: Option<u64>,
    pub partner: String,
}

/// A message handed to a partner, for `last_sent`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SentTo {
    pub tenant: String,
    /// E.164.
    pub phone: String,
    pub message_id: u64,
}

/// An MO waiting for its commit, with the tenants it may belong to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingMo {
    pub partner: String,
    pub mo: Mo,
    pub candidates: Vec<MoCandidate>,
}

/// Where an MO went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoOutcome {
    /// Kept for the tenant's replies file; `optout` when it put the number on the blocklist.
    Kept {
        tenant: String,
        answers: Option<u64>,
        optout: Option<String>,
    },
    /// No tenant could be told apart.
    Unmatched,
}

fn seq_key(tenant: &str, seq: u64) -> Vec<u8> {
    tenant_key(tenant, &seq.to_be_bytes())
}

impl Store {
    /// Remembers, for each message handed to a partner, that its tenant last sent to its number.
    ///
    /// The keys are keyed hashes, so each lands on a random page of a table as large as the
    /// tenant's audience: written one by one with every dispatch commit, they cost more than the
    /// rest of the commit. The dispatcher therefore hands them over in groups (about once a
    /// second, and always before an incoming message is matched), and they go in key order, so that one page takes all the entries that fall on it.
    /// Sends remembered in memory when the process dies are lost: a reply to them is matched by
    /// the address it was sent to alone.
    pub(super) fn record_sent(&self, tx: &WriteTransaction, sent: &[SentTo]) -> Result<()> {
        if sent.is_empty() {
            return Ok(());
        }
        let now = crate::clock::now_ms();
        let mut entries: Vec<(Vec<u8>, &SentTo)> = sent
            .iter()
            .map(|s| {
                let keys = self.keys.tenant(&s.tenant);
                (tenant_key(&s.tenant, &keys.phone_hash(&s.phone)), s)
            })
            .collect();
        // the last send to a number wins
        entries.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.message_id.cmp(&a.1.message_id)));
        entries.dedup_by(|a, b| a.0 == b.0);
        let mut table = tx.open_table(LAST_SENT)?;
        for (key, s) in entries {
            let keys = self.keys.tenant(&s.tenant);
            let value = LastSent {
                message_id: s.message_id,
                at: now,
            };
            table.insert(key.as_slice(), keys.seal("last_sent", &key, &encode(&value)).as_slice())?;
        }
        Ok(())
    }

    /// Forgets that the tenant last sent message `id` to the number with keyed hash `hash`
    /// (retention, erasure); a later send to the number is kept.
    pub(super) fn forget_sent(&self, tx: &WriteTransaction, tenant: &str, hash: &[u8; 16], id: u64) -> Result<()> {
        let key = tenant_key(tenant, hash);
        let mut table = tx.open_table(LAST_SENT)?;
        let last: Option<LastSent> = match table.get(key.as_slice())? {
            Some(v) => Some(open_record(&self.keys.tenant(tenant), "last_sent", &key, v.value())?),
            None => None,
        };
        if last.is_some_and(|l| l.message_id == id) {
            table.remove(key.as_slice())?;
        }
        Ok(())
    }

    /// The replies from `e164` waiting for the tenant's next file: (table key, reply).
    pub(super) fn replies_from(&self, tenant: &str, e164: &str) -> Result<Vec<(Vec<u8>, ReplyRecord)>> {
        let keys = self.keys.tenant(tenant);
        let (start, end) = tenant_range(tenant);
        let tx = self.db.begin_read()?;
        let table = tx.open_table(REPLIES)?;
        let mut out = Vec::new();
        for e in table.range(start.as_slice()..end.as_slice())? {
            let (k, v) = e?;
            let reply: ReplyRecord = open_record(&keys, "replies", k.value(), v.value())?;
            if reply.from == e164 {
                out.push((k.value().to_vec(), reply));
            }
        }
        Ok(out)
    }

    pub(super) fn remove_reply(&self, tx: &WriteTransaction, key: &[u8]) -> Result<()> {
        tx.open_table(REPLIES)?.remove(key)?;
        Ok(())
    }

    /// The message the tenant last sent to the number with keyed hash `hash`.
    pub(super) fn last_sent_to(&self, tenant: &str, hash: &[u8; 16]) -> Result<Option<u64>> {
        let key = tenant_key(tenant, hash);
        let tx = self.db.begin_read()?;
        let table = tx.open_table(LAST_SENT)?;
        match table.get(key.as_slice())? {
            Some(v) => {
                let last: LastSent = open_record(&self.keys.tenant(tenant), "last_sent", &key, v.value())?;
                Ok(Some(last.message_id))
            }
            None => Ok(None),
        }
    }

    pub(super) fn forget_last_sent(&self, tx: &WriteTransaction, tenant: &str, hash: &[u8; 16]) -> Result<()> {
        tx.open_table(LAST_SENT)?.remove(tenant_key(tenant, hash).as_slice())?;
        Ok(())
    }

    /// Keeps one MO for the tenant it belongs to, and blocklists its number for an opt-out.
    pub(super) fn keep_mo(&self, tx: &WriteTransaction, incoming: &IncomingMo, now: i64) -> Result<MoOutcome> {
        let mut best: Option<(&MoCandidate, LastSent)> = None;
        {
            let table = tx.open_table(LAST_SENT)?;
            for c in &incoming.candidates {
                let keys = self.keys.tenant(&c.tenant);
                let key = tenant_key(&c.tenant, &keys.phone_hash(&c.from));
                if let Some(v) = table.get(key.as_slice())? {
                    let last: LastSent = open_record(&keys, "last_sent", &key, v.value())?;
                    // the latest send wins; a later batch breaks a tie within a millisecond
                    if best
                        .as_ref()
                        .is_none_or(|(_, b)| (last.at, last.message_id) > (b.at, b.message_id))
                    {
                        best = Some((c, last));
                    }
                }
            }
        }
        let (candidate, answers) = match (best, incoming.candidates.as_slice()) {
            (Some((c, last)), _) => (c, Some(last.message_id)),
            (None, [only]) => (only, None),
            (None, _) => return Ok(MoOutcome::Unmatched),
        };
        let keys = self.keys.tenant(&candidate.tenant);
        let seq = {
            let mut meta = tx.open_table(META)?;
            super::next_id(&mut meta, super::Mark::NextReply)?
        };
        let record = ReplyRecord {
            received_at: incoming.mo.received_at,
            from: candidate.from.clone(),
            to: incoming.mo.to.clone(),
            text: incoming.mo.text.clone(),
            message_id: answers,
            partner: incoming.partner.clone(),
        };
        let key = seq_key(&candidate.tenant, seq);
        tx.open_table(REPLIES)?
            .insert(key.as_slice(), keys.seal("replies", &key, &encode(&record)).as_slice())?;
        if let Some(word) = &candidate.optout {
            let key = tenant_key(&candidate.tenant, &keys.phone_hash(&candidate.from));
            let entry = BlockEntry {
                added_at: now,
                source: format!("mo:{word}"),
            };
            tx.open_table(BLOCKLIST)?
                .insert(key.as_slice(), keys.seal("blocklist", &key, &encode(&entry)).as_slice())?;
        }
        Ok(MoOutcome::Kept {
            tenant: candidate.tenant.clone(),
            answers,
            optout: candidate.optout.clone(),
        })
    }

    /// A tenant's replies not yet written to a file, oldest first, at most `limit`:
    /// (sequence, reply).
    pub fn pending_replies(&self, tenant: &str, limit: usize) -> Result<Vec<(u64, ReplyRecord)>> {
        let keys = self.keys.tenant(tenant);
        let (start, end) = tenant_range(tenant);
        let tx = self.db.begin_read()?;
        let table = tx.open_table(REPLIES)?;
        let mut out = Vec::new();
        for e in table.range(start.as_slice()..end.as_slice())?.take(limit) {
            let (k, v) = e?;
            let key = k.value();
            let Some(seq) = key.get(start.len()..).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
                continue;
            };
            out.push((u64::from_be_bytes(seq), open_record(&keys, "replies", key, v.value())?));
        }
        Ok(out)
    }

    /// Drops a tenant's replies up to `last` (written to a file) and records the name the file
    /// got (`mark`), in one durable transaction.
    pub fn replies_written(&self, tenant: &str, last: u64, mark: (super::Mark<'_>, u64)) -> Result<()> {
        let (start, _) = tenant_range(tenant);
        let end = seq_key(tenant, last);
        let tx = self.write(redb::Durability::Immediate)?;
        tx.open_table(REPLIES)?
            .extract_from_if(start.as_slice()..=end.as_slice(), |_, _| true)?
            .for_each(drop);
        tx.open_table(META)?.insert(mark.0.key().as_ref(), mark.1)?;
        tx.commit()?;
        Ok(())
    }
}
