//! Retention (docs/data.md; `anonymize_after`, `delete_after` in docs/configuration.md): finished batches lose their personal
//! data, then leave the store, in small steps.
//!
//! A batch is due once it is finished (`done` or `rejected`) and its last change (`updated_at`:
//! its last status, receipt or report) is that old. Each step is one transaction over at most
//! [`STEP_CHUNKS`] chunks (4,096 messages), so ingest and dispatch, which need the same write
//! lock, wait a few milliseconds at most.
//!
//! - **Anonymising** rewrites a batch's chunks with each message's number replaced by the
//!   tenant's keyed hash (hex) and its text, sender and reference emptied; statuses, counts and
//!   the batch record stay, so reports and `status` still add up.
//! - **Deleting** removes its chunks, its statuses, the receipt index entries of messages still
//!   waiting for one, what `last_sent` remembers of it, and at last the batch record.
//!
//! The pages these records held are freed by the commit and reused by later writes (redb does
//! not shrink its file): the store's size stays bounded by what the retention keeps, not by what
//! was ever sent. What lay on a freed page stays sealed until overwritten.

use std::collections::HashMap;

use redb::{Durability, ReadableTable, TableDefinition, WriteTransaction};

use super::records::{BatchState, CHUNK_MESSAGES, message_id};
use super::{BATCHES, CHUNKS, META, Mark, Result, STATUSES, Store, chunk_key, encode, open_record, open_status};
use crate::sms::codes::MessageStatus;
use crate::sms::message::Message;

/// Chunks one step handles.
pub const STEP_CHUNKS: u32 = 16;

/// batch id → the next chunk to anonymise (`u32::MAX`: the whole batch is anonymised).
pub(super) const ANONYMIZED: TableDefinition<u64, u32> = TableDefinition::new("anonymized");

pub(super) fn create_tables(tx: &WriteTransaction) -> Result<()> {
    tx.open_table(ANONYMIZED)?;
    Ok(())
}

/// What `purge_tenant` removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    pub batches: u64,
    pub messages: u64,
    /// Entries of tables keyed by tenant.
    pub entries: u64,
}

/// A tenant's retention, in seconds.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub anonymize_after: Option<i64>,
    pub delete_after: i64,
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub anonymized_messages: u64,
    pub deleted_messages: u64,
    pub deleted_batches: u64,
    /// Steps (transactions) taken.
    pub steps: u64,
}

impl Swept {
    fn one_step() -> Swept {
        Swept {
            steps: 1,
            ..Swept::default()
        }
    }

    fn add(&mut self, other: Swept) {
        self.anonymized_messages += other.anonymized_messages;
        self.deleted_messages += other.deleted_messages;
        self.deleted_batches += other.deleted_batches;
        self.steps += other.steps;
    }
}

enum Due {
    Delete,
    Anonymize,
}

impl Store {
    /// Batches due for deletion or anonymisation at `now`, by tenant policy; batches of tenants
    /// no longer configured are left alone (`tenant purge` handles them).
    fn due(&self, policies: &HashMap<String, Retention>, now: i64) -> Result<Vec<(u64, String, Due)>> {
        let anonymized: HashMap<u64, u32> = {
            let tx = self.db.begin_read()?;
            let table = tx.open_table(ANONYMIZED)?;
            table
                .iter()?
                .map(|e| e.map(|(k, v)| (k.value(), v.value())))
                .collect::<std::result::Result<_, _>>()?
        };
        let mut due = Vec::new();
        for b in self.batches(None)? {
            let Some(policy) = policies.get(&b.tenant) else {
                continue;
            };
            if !matches!(b.state, BatchState::Done | BatchState::Rejected) {
                continue;
            }
            let age = now - b.updated_at;
            if age >= policy.delete_after {
                due.push((b.id, b.tenant, Due::Delete));
            } else if let Some(after) = policy.anonymize_after.filter(|a| age >= *a) {
                let next = anonymized.get(&b.id).copied().unwrap_or(0);
                if next != u32::MAX && b.accepted > 0 && after > 0 {
                    due.push((b.id, b.tenant, Due::Anonymize));
                }
            }
        }
        Ok(due)
    }

    /// Applies the tenants' retention at `now`, step after step, until nothing is due,
    /// `budget` steps were taken or `give_way` says another writer wants the store (checked
    /// after each step). `now` comes from the caller's clock (tests move it). Steps are
    /// committed without a sync, each with its count in the totals; the last commit of the sweep
    /// syncs them all (a crash before it means the same deletions are done again, and counted
    /// again only if their first count was lost with them).
    pub fn sweep(
        &self,
        policies: &HashMap<String, Retention>,
        now: i64,
        budget: u64,
        give_way: &dyn Fn() -> bool,
    ) -> Result<Swept> {
        let mut total = Swept::default();
        'due: for (batch, tenant, due) in self.due(policies, now)? {
            loop {
                if total.steps >= budget || (total.steps > 0 && give_way()) {
                    break 'due; // the rest at the next look; what was done still counts
                }
                let (step, finished) = match due {
                    Due::Delete => self.delete_step(batch, &tenant)?,
                    Due::Anonymize => self.anonymize_step(batch, &tenant)?,
                };
                total.add(step);
                if finished {
                    break;
                }
            }
        }
        if total.steps > 0 {
            // One synced commit makes every step of the sweep durable.
            self.write(Durability::Immediate)?.commit()?;
        }
        Ok(total)
    }

    /// Adds a step's work to the totals, in the step's own transaction: a step made durable by
    /// any later synced commit (another writer's, say) before a crash is counted with it. (The
    /// totals were added once per sweep: a kill lost the count of steps that another writer
    /// had made durable; the torture suite found it.)
    fn count_step(tx: &WriteTransaction, step: &Swept) -> Result<()> {
        let mut meta = tx.open_table(META)?;
        for (mark, n) in [
            (Mark::SweepAnonymized, step.anonymized_messages),
            (Mark::SweepDeleted, step.deleted_messages),
            (Mark::SweepDeletedBatches, step.deleted_batches),
        ] {
            if n > 0 {
                let name = mark.key();
                let before = meta.get(name.as_ref())?.map(|v| v.value()).unwrap_or(0);
                meta.insert(name.as_ref(), before + n)?;
            }
        }
        Ok(())
    }

    /// Anonymises the next chunks of a batch. Returns what it did and whether the batch is done.
    fn anonymize_step(&self, batch: u64, tenant: &str) -> Result<(Swept, bool)> {
        let keys = self.keys.tenant(tenant);
        let tx = self.write(Durability::None)?;
        let mut swept = Swept::one_step();
        let finished = {
            let mut marks = tx.open_table(ANONYMIZED)?;
            let from = marks.get(batch)?.map(|v| v.value()).unwrap_or(0);
            let mut chunks = tx.open_table(CHUNKS)?;
            let found: Vec<(u32, Vec<u8>)> = chunks
                .range((batch, from)..(batch, from.saturating_add(STEP_CHUNKS)))?
                .map(|e| e.map(|(k, v)| (k.value().1, v.value().to_vec())))
                .collect::<std::result::Result<_, _>>()?;
            for (n, sealed) in &found {
                let key = chunk_key(batch, *n);
                let mut messages: Vec<Message> = open_record(&keys, "chunks", &key, sealed)?;
                for m in &mut messages {
                    if !m.phone.starts_with('#') {
                        m.phone = format!("#{}", hex(&keys.phone_hash(&m.phone)));
                    }
                    m.text.clear();
                    m.sender.clear();
                    m.reference.clear();
                }
                swept.anonymized_messages += messages.len() as u64;
                chunks.insert((batch, *n), keys.seal("chunks", &key, &encode(&messages)).as_slice())?;
            }
            let more = chunks
                .range((batch, from.saturating_add(STEP_CHUNKS))..(batch + 1, 0))?
                .next()
                .is_some();
            marks.insert(
                batch,
                if more {
                    from.saturating_add(STEP_CHUNKS)
                } else {
                    u32::MAX
                },
            )?;
            !more
        };
        Self::count_step(&tx, &swept)?;
        tx.commit()?;
        Ok((swept, finished))
    }

    /// Deletes the next chunks of a batch with their statuses; the batch record goes with the
    /// last of them. Returns what it did and whether the batch is gone.
    fn delete_step(&self, batch: u64, tenant: &str) -> Result<(Swept, bool)> {
        let keys = self.keys.tenant(tenant);
        let tx = self.write(Durability::None)?;
        let mut swept = Swept::one_step();
        let finished = {
            let mut chunks = tx.open_table(CHUNKS)?;
            let found: Vec<(u32, Vec<u8>)> = chunks
                .range((batch, 0)..(batch + 1, 0))?
                .take(STEP_CHUNKS as usize)
                .map(|e| e.map(|(k, v)| (k.value().1, v.value().to_vec())))
                .collect::<std::result::Result<_, _>>()?;
            let mut statuses = tx.open_table(STATUSES)?;
            for (n, sealed) in &found {
                let messages: Vec<Message> = open_record(&keys, "chunks", &chunk_key(batch, *n), sealed)?;
                let first = u64::from(*n) * CHUNK_MESSAGES;
                for (i, m) in messages.iter().enumerate() {
                    let id = message_id(batch, first + i as u64);
                    if !m.phone.starts_with('#') {
                        self.forget_sent(&tx, tenant, &keys.phone_hash(&m.phone), id)?;
                    }
                    if let Some(v) = statuses.remove(id)? {
                        let status = open_status(&keys, id, v.value())?;
                        if status.status == MessageStatus::Submitted {
                            self.unindex_receipts(&tx, &status)?;
                        }
                    }
                }
                swept.deleted_messages += messages.len() as u64;
                chunks.remove((batch, *n))?;
            }
            let more = chunks.range((batch, 0)..(batch + 1, 0))?.next().is_some();
            if !more {
                // Statuses of messages whose chunk is already gone (none, unless a step was
                // cut short by hand), then the batch itself.
                let left: Vec<u64> = statuses
                    .range(message_id(batch, 0)..message_id(batch + 1, 0))?
                    .map(|e| e.map(|(k, _)| k.value()))
                    .collect::<std::result::Result<_, _>>()?;
                for id in left {
                    statuses.remove(id)?;
                }
                tx.open_table(BATCHES)?.remove(batch)?;
                tx.open_table(ANONYMIZED)?.remove(batch)?;
                swept.deleted_batches = 1;
            }
            !more
        };
        Self::count_step(&tx, &swept)?;
        tx.commit()?;
        Ok((swept, finished))
    }

    /// What the sweeper did since the store was made: (anonymised messages, deleted messages,
    /// deleted batches), and when it last ran (unix seconds).
    /// Deletes everything a tenant (no longer configured) left in the store: its batches with
    /// their messages, statuses, receipt index entries and scheduled sends, then its entries in
    /// every table keyed by tenant (seen files, blocklist, daily and hourly counts, countries,
    /// replies, `last_sent`). The audit log keeps its entries (no number or text; the number
    /// hashes in them can no longer be linked once the tenant's keys are gone).
    pub fn purge_tenant(&self, tenant: &str) -> Result<Purged> {
        use super::{ACTIVE, BLOCKLIST, CLAIMS, DAILY, SCHEDULED, SEEN_FILES, replies, tenant_range, traffic};
        let mut purged = Purged::default();
        for b in self.batches(Some(tenant))? {
            {
                // out of the dispatcher's sight first
                let tx = self.write(Durability::Immediate)?;
                tx.open_table(ACTIVE)?.remove(b.id)?;
                tx.open_table(CLAIMS)?.remove(b.claim.as_str())?;
                tx.open_table(SCHEDULED)?
                    .extract_from_if((0u64, 0u64)..=(u64::MAX, u64::MAX), |k, _| {
                        let id = k.1;
                        id >= message_id(b.id, 0) && id < message_id(b.id + 1, 0)
                    })?
                    .for_each(drop);
                tx.commit()?;
            }
            loop {
                let (step, done) = self.delete_step(b.id, tenant)?;
                purged.messages += step.deleted_messages;
                if done {
                    break;
                }
            }
            purged.batches += 1;
        }
        let (start, end) = tenant_range(tenant);
        let tx = self.write(Durability::Immediate)?;
        for def in [
            SEEN_FILES,
            BLOCKLIST,
            DAILY,
            traffic::COUNTRIES,
            traffic::HOURLY,
            replies::LAST_SENT,
            replies::REPLIES,
        ] {
            let mut table = tx.open_table(def)?;
            purged.entries += table
                .extract_from_if(start.as_slice()..end.as_slice(), |_, _| true)?
                .count() as u64;
        }
        tx.commit()?;
        Ok(purged)
    }

    pub fn sweep_totals(&self) -> Result<(u64, u64, u64, Option<u64>)> {
        Ok((
            self.mark(Mark::SweepAnonymized)?.unwrap_or(0),
            self.mark(Mark::SweepDeleted)?.unwrap_or(0),
            self.mark(Mark::SweepDeletedBatches)?.unwrap_or(0),
            self.mark(Mark::SweepAt)?,
        ))
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Keyring, MasterKeys};
    use crate::sms::format::ReplyFormat;
    use crate::sms::message::TextCoding;
    use std::sync::Arc;

    #[test]
    fn a_sweep_cut_by_its_budget_still_counts_what_it_did() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("master.key");
        MasterKeys::generate(&key).unwrap();
        let store = Store::open(
            dir.path(),
            Arc::new(Keyring::open(MasterKeys::load(&key).unwrap(), dir.path()).unwrap()),
        )
        .unwrap();
        let mut batch = store
            .begin_batch("acme", "a.csv", "c1", ReplyFormat::default(), 0)
            .unwrap();
        let chunks: Vec<(u32, Vec<Message>)> = (0..40)
            .map(|i| {
                let m = Message {
                    line: u64::from(i) + 2,
                    reference: String::new(),
                    phone: "+33612345678".into(),
                    sender: "ACME".into(),
                    text: "x".into(),
                    coding: TextCoding::Gsm7,
                    parts: 1,
                    send_at: None,
                };
                (i, vec![m])
            })
            .collect();
        store.write_chunks(&batch, &chunks).unwrap();
        batch.accepted = 40;
        store
            .finish_batch(&mut batch, None, 0, &crate::store::Admission::default())
            .unwrap();
        store.cancel_batch(batch.id, 0).unwrap();
        let policies = HashMap::from([(
            "acme".to_string(),
            Retention {
                anonymize_after: None,
                delete_after: 10,
            },
        )]);
        let mut looks = 0;
        while store.sweep_totals().unwrap().2 == 0 {
            let swept = store.sweep(&policies, 100, 1, &|| false).unwrap();
            assert_eq!(swept.steps, 1, "one step per look");
            looks += 1;
            assert!(looks < 10);
        }
        assert_eq!(looks, 3, "40 chunks, 16 per step");
        let (anonymized, deleted, batches, _) = store.sweep_totals().unwrap();
        assert_eq!((anonymized, deleted, batches), (0, 40, 1));
        assert!(store.batch(batch.id).unwrap().is_none());
    }
}
