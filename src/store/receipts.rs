//! Delivery receipts: the partner ids of submitted messages, and receipts that came before the
//! `submit_sm_resp` that names their id.
//!
//! Each part of a submitted message is indexed under partner ‖ 0 ‖ its normalised id (a
//! partner's message id is no personal data, and in clear its keys follow the SMSC's counter,
//! so the index stays in a few pages instead of one random page per message); a receipt is
//! looked up under the forms its id may stand for (`crate::sms::receipt::receipt_candidates`): as
//! written, and while the partner's [`IdForm`] is not settled, in the other base too. Each
//! receipt that finds its message is a vote for the form it was found under; after
//! [`SETTLE_VOTES`] votes with no more than a tenth for other forms, the partner's form is
//! settled, kept in `receipt_forms`, and only that form is tried from then on.
//!
//! A receipt that finds no entry is kept (sealed) as an early receipt; when its message's
//! `submit_sm_resp` is applied later, it is applied then. A kept receipt settles a message only
//! under the partner's settled form (the id as written while it is not settled), never by a
//! coincidence of bases, and only when it arrived no earlier than [`EARLY_TOLERANCE_SECS`]
//! before the message's response (a receipt kept from before a crash cannot settle a message
//! submitted after it). Kept receipts are bounded: at most [`MAX_EARLY`], each kept
//! [`EARLY_TTL_SECS`]. Either way a receipt is durable before the partner gets its
//! `deliver_sm_resp`.
//!
//! A long message is sent in parts, each with its own id and receipt: a part that fails makes
//! the message fail; the message is delivered when its last part is.

use std::collections::HashMap;

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::records::{BatchRecord, StatusRecord};
use super::{DispatchCommit, Result, StepTables, Store, encode, open_record};
use crate::sms::codes::MessageStatus;
use crate::sms::receipt::{IdForm, Receipt, early_keys, normal_id, receipt_candidates};

/// partner ‖ 0 ‖ normal id → message id (8 bytes) ‖ last part (1 byte).
pub(super) const RECEIPT_IDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("receipt_ids");
/// partner ‖ 0 ‖ id form → sealed [`EarlyReceipt`].
pub(super) const EARLY: TableDefinition<&[u8], &[u8]> = TableDefinition::new("early_receipts");

/// partner → its settled [`IdForm`] (one byte).
pub(super) const RECEIPT_FORMS: TableDefinition<&str, u8> = TableDefinition::new("receipt_forms");

pub(super) fn create_tables(tx: &WriteTransaction) -> Result<()> {
    tx.open_table(RECEIPT_IDS)?;
    tx.open_table(EARLY)?;
    tx.open_table(RECEIPT_FORMS)?;
    Ok(())
}

/// Votes a form needs to be settled (with no more than a tenth as many for the other forms).
pub const SETTLE_VOTES: u32 = 10;
/// How long before its message's response a kept receipt may have arrived: the longest
/// `response_timeout` a partner may have.
pub const EARLY_TOLERANCE_SECS: i64 = 300;
/// How long a receipt that found no message is kept.
pub const EARLY_TTL_SECS: i64 = 600;
/// Receipts kept at most; past it, a receipt that finds no message is acknowledged and dropped.
pub const MAX_EARLY: u64 = 10_000;

/// The receipt id forms: settled ones, and the votes of the others since start.
#[derive(Debug, Default)]
pub(super) struct FormBook {
    settled: HashMap<String, IdForm>,
    votes: HashMap<String, [u32; 4]>,
    /// When early receipts were last purged of expired ones.
    purged_at: i64,
}

impl FormBook {
    pub(super) fn load(db: &redb::Database) -> Result<FormBook> {
        let tx = db.begin_read()?;
        let table = tx.open_table(RECEIPT_FORMS)?;
        let mut book = FormBook::default();
        for e in table.iter()? {
            let (k, v) = e?;
            if let Some(f) = IdForm::from_u8(v.value()) {
                book.settled.insert(k.value().to_string(), f);
            }
        }
        Ok(book)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct EarlyReceipt {
    status: MessageStatus,
    detail: String,
    at: i64,
}

fn detail(r: &Receipt) -> String {
    if r.status == Some(MessageStatus::Delivered) {
        String::new()
    } else {
        format!("{} err:{}", r.state, r.error)
    }
}

/// Receipts applied with the outcome of their own `submit_sm` (the same group of logged steps):
/// the message goes from queued to its final status in one write, without an index entry to
/// add and remove. At full speed nearly every receipt comes this way: a partner's receipt
/// follows its response by a few milliseconds, a group of steps spans a tenth of a second.
#[derive(Default)]
pub(super) struct Folds<'a> {
    /// (step, outcome) → the receipt that settles it.
    outcomes: HashMap<(usize, usize), &'a Receipt>,
    /// (step, receipt) already settled with its outcome.
    receipts: std::collections::HashSet<(usize, usize)>,
    /// The form each pairing showed, by partner.
    pub(super) votes: Vec<(&'a str, IdForm)>,
}

impl<'a> Folds<'a> {
    /// Pairs the submitted single-part messages of `steps` with their receipts in `steps`
    /// (a receipt before its response included). A long message's parts each have a receipt and
    /// take the index.
    pub(super) fn of(steps: &[&'a DispatchCommit], forms: &HashMap<String, IdForm>) -> Folds<'a> {
        let mut folds = Folds::default();
        let mut submitted: HashMap<(&str, String), (usize, usize)> = HashMap::new();
        for (si, step) in steps.iter().enumerate() {
            for (oi, (_, status)) in step.outcomes.iter().enumerate() {
                if status.status == MessageStatus::Submitted
                    && !status.partner_id.is_empty()
                    && !status.partner_id.contains(' ')
                {
                    submitted.insert((status.partner.as_str(), normal_id(&status.partner_id)), (si, oi));
                }
            }
        }
        if submitted.is_empty() {
            return folds;
        }
        for (si, step) in steps.iter().enumerate() {
            for (ri, (partner, r)) in step.receipts.iter().enumerate() {
                if r.status.is_none() {
                    continue;
                }
                for (key, form) in receipt_candidates(&r.id, forms.get(partner).copied()) {
                    if let Some(at) = submitted.remove(&(partner.as_str(), key)) {
                        folds.outcomes.insert(at, r);
                        folds.receipts.insert((si, ri));
                        folds.votes.push((partner.as_str(), form));
                        break;
                    }
                }
            }
        }
        folds
    }

    /// The receipt that settles outcome `outcome` of step `step`.
    pub(super) fn receipt_for(&self, step: usize, outcome: usize) -> Option<&'a Receipt> {
        self.outcomes.get(&(step, outcome)).copied()
    }

    /// Whether receipt `receipt` of step `step` was settled with its outcome.
    pub(super) fn settled(&self, step: usize, receipt: usize) -> bool {
        self.receipts.contains(&(step, receipt))
    }
}

/// `submitted` as settled by its receipt `r` at `now`.
pub(super) fn receipted(submitted: &StatusRecord, r: &Receipt, now: i64) -> Option<StatusRecord> {
    let status = r.status?;
    if let Some(at) = submitted.submitted_at {
        crate::metrics::events().receipt_delay(&submitted.partner, now - at);
    }
    Some(StatusRecord {
        status,
        done_at: Some(now),
        error: detail(r),
        ..submitted.clone()
    })
}

impl Store {
    /// The settled receipt id forms, by partner.
    pub(super) fn settled_forms(&self) -> HashMap<String, IdForm> {
        self.forms.lock().map(|b| b.settled.clone()).unwrap_or_default()
    }

    fn settled_form(&self, partner: &str) -> Option<IdForm> {
        self.forms.lock().ok()?.settled.get(partner).copied()
    }

    /// Counts a receipt that found its message under `form`; settles the partner's form (and
    /// keeps it) once the votes agree.
    pub(super) fn vote(&self, tables: &mut StepTables<'_>, partner: &str, form: IdForm) -> Result<()> {
        let settled = {
            let Ok(mut book) = self.forms.lock() else { return Ok(()) };
            if book.settled.contains_key(partner) {
                return Ok(());
            }
            let votes = book.votes.entry(partner.to_string()).or_default();
            votes[form as usize] += 1;
            let mine = votes[form as usize];
            let others: u32 = votes.iter().sum::<u32>() - mine;
            if mine < SETTLE_VOTES || others * 10 > mine {
                return Ok(());
            }
            book.settled.insert(partner.to_string(), form);
            form
        };
        tables.forms.insert(partner, settled as u8)?;
        tracing::info!(
            partner,
            form = settled.as_str(),
            "receipt id form of the partner settled"
        );
        Ok(())
    }

    /// At most once a minute: drops kept receipts older than [`EARLY_TTL_SECS`].
    pub(super) fn purge_early(&self, tables: &mut StepTables<'_>, now: i64) -> Result<()> {
        {
            let Ok(mut book) = self.forms.lock() else { return Ok(()) };
            if now - book.purged_at < 60 {
                return Ok(());
            }
            book.purged_at = now;
        }
        if tables.early.is_empty()? {
            return Ok(());
        }
        let keys = self.keys.system();
        let mut old = Vec::new();
        for e in tables.early.iter()? {
            let (k, v) = e?;
            let key = k.value().to_vec();
            let expired = match open_record::<EarlyReceipt>(&keys, "early_receipts", &key, v.value()) {
                Ok(r) => now - r.at > EARLY_TTL_SECS,
                Err(_) => true,
            };
            if expired {
                old.push(key);
            }
        }
        for key in &old {
            tables.early.remove(key.as_slice())?;
        }
        if !old.is_empty() {
            tracing::info!(
                dropped = old.len(),
                "receipts that found no message dropped after {EARLY_TTL_SECS} s"
            );
        }
        Ok(())
    }

    fn receipt_key(partner: &str, form: &str) -> Vec<u8> {
        let mut key = Vec::with_capacity(partner.len() + 1 + form.len());
        key.extend_from_slice(partner.as_bytes());
        key.push(0);
        key.extend_from_slice(form.as_bytes());
        key
    }

    /// Indexes the part ids of a submitted message; returns its final status if an early
    /// receipt for it was waiting.
    pub(super) fn index_submitted(
        &self,
        tables: &mut StepTables<'_>,
        id: u64,
        status: &StatusRecord,
    ) -> Result<Option<StatusRecord>> {
        // Parts whose id is only blanks are not indexed: no receipt may settle them by "".
        let parts: Vec<&str> = status
            .partner_id
            .split(' ')
            .filter(|p| !normal_id(p).is_empty())
            .collect();
        let (index, early) = (&mut tables.receipt_ids, &mut tables.early);
        // Nearly always: no receipt came before its response.
        let none_early = early.is_empty()?;
        let keys = self.keys.system();
        let settled = if none_early {
            None
        } else {
            self.settled_form(&status.partner)
        };
        let mut outcome = None;
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let mut value = id.to_be_bytes().to_vec();
            value.push(u8::from(last));
            let primary = Self::receipt_key(&status.partner, &normal_id(part));
            index.insert(primary.as_slice(), value.as_slice())?;
            if none_early {
                continue;
            }
            for form in early_keys(part, settled) {
                let key = Self::receipt_key(&status.partner, &form);
                let found: Option<EarlyReceipt> = match early.get(key.as_slice())? {
                    Some(v) => Some(open_record(&keys, "early_receipts", &key, v.value())?),
                    None => None,
                };
                if let Some(r) = found {
                    // Kept from long before this message was sent: not its receipt.
                    if r.at < status.submitted_at.unwrap_or(r.at) - EARLY_TOLERANCE_SECS {
                        continue;
                    }
                    early.remove(key.as_slice())?;
                    index.remove(primary.as_slice())?;
                    if r.status != MessageStatus::Delivered || last {
                        if outcome.is_none() {
                            let delay = r.at - status.submitted_at.unwrap_or(r.at);
                            crate::metrics::events().receipt_delay(&status.partner, delay);
                        }
                        outcome.get_or_insert(StatusRecord {
                            status: r.status,
                            // never before it was submitted, whatever the clocks say
                            done_at: Some(r.at.max(status.submitted_at.unwrap_or(r.at))),
                            error: r.detail,
                            ..status.clone()
                        });
                    }
                }
            }
        }
        Ok(outcome)
    }

    /// Drops the index entries of a submitted message's parts (retention, erasure): a receipt
    /// for it that still comes is then kept as an early receipt and swept with them.
    pub(super) fn unindex_receipts(&self, tx: &WriteTransaction, status: &StatusRecord) -> Result<()> {
        let mut index = tx.open_table(RECEIPT_IDS)?;
        for part in status.partner_id.split(' ').filter(|p| !p.is_empty()) {
            index.remove(Self::receipt_key(&status.partner, &normal_id(part)).as_slice())?;
        }
        Ok(())
    }

    /// Applies one receipt inside `tx` (the dispatcher's steps, `Store::apply_logged`).
    pub(super) fn apply_receipt(
        &self,
        tx: &WriteTransaction,
        tables: &mut StepTables<'_>,
        touched: &mut HashMap<u64, BatchRecord>,
        partner: &str,
        r: &Receipt,
        now: i64,
    ) -> Result<()> {
        let keys = self.keys.system();
        let Some(status) = r.status else { return Ok(()) };
        let mut found = None;
        for (candidate, form) in receipt_candidates(&r.id, self.settled_form(partner)) {
            let key = Self::receipt_key(partner, &candidate);
            if let Some(v) = tables.receipt_ids.get(key.as_slice())? {
                found = Some((key, v.value().to_vec(), form));
                break;
            }
        }
        let Some((key, hit, form)) = found else {
            if tables.early.len()? >= MAX_EARLY {
                static DROPPED: crate::limits::Throttle =
                    crate::limits::Throttle::new(std::time::Duration::from_secs(60));
                if let Some(held) = DROPPED.allow(partner) {
                    tracing::warn!(
                        partner,
                        kept = MAX_EARLY,
                        held_back = held,
                        "a receipt that finds no message was dropped: too many kept already"
                    );
                }
                crate::metrics::events().receipt_dropped(partner);
                return Ok(());
            }
            let key = Self::receipt_key(partner, &normal_id(&r.id));
            let early = EarlyReceipt {
                status,
                detail: detail(r),
                at: now,
            };
            tables.early.insert(
                key.as_slice(),
                keys.seal("early_receipts", &key, &encode(&early)).as_slice(),
            )?;
            return Ok(());
        };
        let (Some(id), Some(&last)) = (
            hit.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes),
            hit.get(8),
        ) else {
            return Ok(());
        };
        self.vote(tables, partner, form)?;
        if status == MessageStatus::Delivered && last == 0 {
            return Ok(()); // an early part arrived; the last one decides
        }
        let (batch_id, _) = crate::store::records::split_message_id(id);
        let tenant = match touched.get(&batch_id) {
            Some(b) => Some(b.tenant.clone()),
            None => self.batch_in(tx, batch_id).ok().map(|b| b.tenant),
        };
        let Some(tenant) = tenant else {
            return Ok(());
        };
        let previous =
            Self::status_of(&tables.statuses, &self.keys.tenant(&tenant), id)?.unwrap_or_else(StatusRecord::queued);
        let record = StatusRecord {
            status,
            done_at: Some(now),
            error: detail(r),
            ..previous
        };
        self.set_status_in(tx, &mut tables.statuses, touched, id, &record)?;
        tables.receipt_ids.remove(key.as_slice())?;
        if let Some(submitted) = previous.submitted_at {
            crate::metrics::events().receipt_delay(partner, now - submitted);
        }
        Ok(())
    }
}
