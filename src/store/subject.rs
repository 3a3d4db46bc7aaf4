//! Subject requests (docs/cli.md: `subject export`, `subject erase`): everything held about one
//! number in one tenant, found and erased.
//!
//! Messages are stored sealed by chunk, with no index by number (an index would be one more
//! place the number's traces live), so a request opens every chunk of the tenant's batches:
//! seconds per million messages, for a request an operator makes by hand. A message matches by
//! its number, or by the keyed hash an anonymised message keeps instead.
//!
//! Erasing rewrites each chunk that holds the number with those messages emptied (number, text,
//! sender and reference); a message not yet final becomes `canceled`, so it is never sent; the
//! batch's counts stay. Replies from the number waiting for their file, what `last_sent`
//! remembers and the blocklist entry go too; `--block` then puts the keyed hash back on the
//! blocklist. Each batch is its own transaction.

use std::collections::HashMap;

use redb::{Durability, ReadableTable};
use serde::Serialize;

use super::records::{BlockEntry, CHUNK_MESSAGES, StatusRecord, message_id};
use super::replies::ReplyRecord;
use super::retention::hex;
use super::{BLOCKLIST, CHUNKS, Result, STATUSES, Store, chunk_key, encode, open_record, open_status, tenant_key};
use crate::crypto::TenantKeys;
use crate::sms::codes::MessageStatus;
use crate::sms::message::Message;

/// One message to the number.
#[derive(Debug, Clone, Serialize)]
pub struct SubjectMessage {
    pub batch: u64,
    pub file: String,
    pub line: u64,
    pub message_id: u64,
    pub received_at: i64,
    pub reference: String,
    pub sender: String,
    pub text: String,
    pub send_at: Option<i64>,
    /// Whether retention has already anonymised it (only its hash and status are left).
    pub anonymized: bool,
    pub status: &'static str,
    pub partner: String,
    pub partner_id: String,
    pub submitted_at: Option<i64>,
    pub done_at: Option<i64>,
    pub error: String,
}

/// Everything a tenant holds about one number.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SubjectData {
    pub number_hash: String,
    pub messages: Vec<SubjectMessage>,
    pub replies: Vec<ReplyRecord>,
    pub blocklist: Option<BlockEntry>,
    /// The message the tenant last sent to the number, as reply matching remembers it.
    pub last_sent: Option<u64>,
}

/// What an erasure removed.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Erased {
    pub messages: u64,
    pub canceled: u64,
    pub replies: u64,
    pub blocklist: bool,
}

impl Store {
    /// The chunks of a batch that hold a message to `e164` (or to its anonymised form).
    fn chunks_holding(&self, keys: &TenantKeys, batch: u64, e164: &str, anonymized: &str) -> Result<Vec<u32>> {
        let tx = self.db.begin_read()?;
        let chunks = tx.open_table(CHUNKS)?;
        let mut out = Vec::new();
        for e in chunks.range((batch, 0)..(batch + 1, 0))? {
            let (k, v) = e?;
            let n = k.value().1;
            let messages: Vec<Message> = open_record(keys, "chunks", &chunk_key(batch, n), v.value())?;
            if messages.iter().any(|m| m.phone == e164 || m.phone == anonymized) {
                out.push(n);
            }
        }
        Ok(out)
    }

    /// Every message, status, reply and blocklist entry the tenant holds for `e164`.
    pub fn subject_export(&self, tenant: &str, e164: &str) -> Result<SubjectData> {
        let keys = self.keys.tenant(tenant);
        let hash = keys.phone_hash(e164);
        let anonymized = format!("#{}", hex(&hash));
        let mut out = SubjectData {
            number_hash: hex(&hash),
            ..SubjectData::default()
        };
        for batch in self.batches(Some(tenant))? {
            let tx = self.db.begin_read()?;
            let chunks = tx.open_table(CHUNKS)?;
            let statuses = tx.open_table(STATUSES)?;
            for e in chunks.range((batch.id, 0)..(batch.id + 1, 0))? {
                let (k, v) = e?;
                let n = k.value().1;
                let messages: Vec<Message> = open_record(&keys, "chunks", &chunk_key(batch.id, n), v.value())?;
                for (i, m) in messages.iter().enumerate() {
                    if m.phone != e164 && m.phone != anonymized {
                        continue;
                    }
                    let index = u64::from(n) * CHUNK_MESSAGES + i as u64;
                    let id = message_id(batch.id, index);
                    let status = match statuses.get(id)? {
                        Some(v) => open_status(&keys, id, v.value())?,
                        None => StatusRecord {
                            status: batch.implicit_status(index),
                            ..StatusRecord::queued()
                        },
                    };
                    out.messages.push(SubjectMessage {
                        batch: batch.id,
                        file: batch.file_name.clone(),
                        line: m.line,
                        message_id: id,
                        received_at: batch.received_at,
                        reference: m.reference.clone(),
                        sender: m.sender.clone(),
                        text: m.text.clone(),
                        send_at: m.send_at,
                        anonymized: m.phone == anonymized,
                        status: status.status.as_str(),
                        partner: status.partner,
                        partner_id: status.partner_id,
                        submitted_at: status.submitted_at,
                        done_at: status.done_at,
                        error: status.error,
                    });
                }
            }
        }
        out.replies = self.replies_from(tenant, e164)?.into_iter().map(|(_, r)| r).collect();
        out.last_sent = self.last_sent_to(tenant, &hash)?;
        out.blocklist = self.blocklist_entry(tenant, e164)?;
        Ok(out)
    }

    /// Erases everything the tenant holds for `e164`; with `block`, the number's keyed hash
    /// goes (back) on the blocklist.
    pub fn subject_erase(&self, tenant: &str, e164: &str, block: bool, now: i64) -> Result<Erased> {
        let keys = self.keys.tenant(tenant);
        let hash = keys.phone_hash(e164);
        let anonymized = format!("#{}", hex(&hash));
        let mut erased = Erased::default();
        for batch in self.batches(Some(tenant))? {
            // Found on a read transaction: the write lock is taken only for batches that hold
            // the number, and only their chunks are opened twice.
            let hits = self.chunks_holding(&keys, batch.id, e164, &anonymized)?;
            if hits.is_empty() {
                continue;
            }
            let tx = self.write(Durability::Immediate)?;
            let mut touched = HashMap::new();
            {
                let found: Vec<(u32, Vec<u8>)> = {
                    let chunks = tx.open_table(CHUNKS)?;
                    let mut found = Vec::with_capacity(hits.len());
                    for n in hits {
                        if let Some(v) = chunks.get((batch.id, n))? {
                            found.push((n, v.value().to_vec()));
                        }
                    }
                    found
                };
                for (n, sealed) in found {
                    let key = chunk_key(batch.id, n);
                    let mut messages: Vec<Message> = open_record(&keys, "chunks", &key, &sealed)?;
                    let mut hit = false;
                    for (i, m) in messages.iter_mut().enumerate() {
                        if m.phone != e164 && m.phone != anonymized {
                            continue;
                        }
                        hit = true;
                        erased.messages += 1;
                        let id = message_id(batch.id, u64::from(n) * CHUNK_MESSAGES + i as u64);
                        match self.status_in(&tx, tenant, id)? {
                            Some(s) if s.status.is_final() => {}
                            // with the partner already: its receipt no longer finds it
                            Some(s) if s.status == MessageStatus::Submitted => self.unindex_receipts(&tx, &s)?,
                            _ => {
                                let mut canceled = StatusRecord::queued();
                                canceled.status = MessageStatus::Canceled;
                                canceled.done_at = Some(now);
                                canceled.error = "erased".into();
                                if self.set_status(&tx, &mut touched, id, &canceled)? {
                                    erased.canceled += 1;
                                }
                            }
                        }
                        m.phone.clear();
                        m.text.clear();
                        m.sender.clear();
                        m.reference.clear();
                    }
                    if hit {
                        tx.open_table(CHUNKS)?
                            .insert((batch.id, n), keys.seal("chunks", &key, &encode(&messages)).as_slice())?;
                    }
                }
            }
            self.put_touched(&tx, touched, now)?;
            tx.commit()?;
        }
        let tx = self.write(Durability::Immediate)?;
        for (key, _) in self.replies_from(tenant, e164)? {
            self.remove_reply(&tx, &key)?;
            erased.replies += 1;
        }
        self.forget_last_sent(&tx, tenant, &hash)?;
        let key = tenant_key(tenant, &hash);
        erased.blocklist = tx.open_table(BLOCKLIST)?.remove(key.as_slice())?.is_some();
        if block {
            let entry = BlockEntry {
                added_at: now,
                source: "subject-erase".into(),
            };
            let sealed = keys.seal("blocklist", &key, &encode(&entry));
            tx.open_table(BLOCKLIST)?.insert(key.as_slice(), sealed.as_slice())?;
        }
        tx.commit()?;
        Ok(erased)
    }
}
