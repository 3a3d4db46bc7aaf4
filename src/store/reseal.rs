//! The re-sealer: after `key rotate` gave every tenant a new sealing generation, moves each
//! sealed record to it in small steps, then has the keyring destroy the older generations.
//!
//! A *pass* walks every sealed table once, in steps of at most [`STEP_RECORDS`] records, each
//! step its own write transaction (read, open, seal, write back: a record changed by someone
//! else meanwhile cannot be overwritten with an older value, redb runs one writer at a time).
//! A pass that started after the rotation sees every record sealed under an older generation:
//! records are sealed inside the write transaction that stores them (or checked there to still
//! be under the newest generation), so one sealed before the rotation is committed before the
//! pass's first step. When a pass ends, its work is made durable and the older generations are
//! dropped, the system's only once the dispatch log holds no step sealed before the rotation
//! (every step announced by then applied; see [`Store::wal_announce`]).
//!
//! Each record's sealing context is its table's: the tenant is the key's prefix (`tenant_key`),
//! the batch record's own tenant for `batches`, `chunks` and `statuses` (by their batch id), the
//! system for the mail queue, bans, early receipts and the audit log. The audit chain hashes
//! entries, not their sealed bytes, so it survives.

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Instant;

use redb::{Durability, Key, ReadableTable, TableDefinition, WriteTransaction};

use super::records::split_message_id;
use super::{BATCHES, BLOCKLIST, CHUNKS, DAILY, Result, SEEN_FILES, STATUSES, Store, StoreError, chunk_key};
use crate::crypto::{SealError, TenantKeys};

/// Records looked at per step (one write transaction).
pub const STEP_RECORDS: usize = 2000;

/// Where a table's sealing context comes from.
#[derive(Clone, Copy)]
enum Owner {
    /// The tenant is the key up to its first 0 byte; the associated key is the whole key.
    Prefixed,
    /// The system's records keyed by bytes; the associated key is the whole key.
    System,
    /// The system's records keyed by a number; the associated key is its big-endian bytes.
    SystemId,
    /// `batches`: the tenant is in the value (`len ‖ tenant ‖ sealed`).
    Batch,
    /// `chunks`, `statuses`: the tenant is their batch's.
    OfBatch,
}

/// The sealed tables, in the order a pass walks them.
const TABLES: [&str; 16] = [
    "batches",
    "chunks",
    "statuses",
    "seen_files",
    "blocklist",
    "daily",
    "countries",
    "hourly",
    "last_sent",
    "replies",
    "bans",
    "mail_digests",
    "early_receipts",
    "mail",
    "audit",
    "audit_head",
];

/// What a pass has done so far, and what the last one did (`status`, `key status`).
#[derive(Debug, Clone, Default)]
pub struct ResealProgress {
    /// A pass is under way.
    pub running: bool,
    /// Records looked at and re-sealed in the pass under way (or the last one).
    pub examined: u64,
    pub resealed: u64,
    /// Records that did not open (damaged): left as they are, reported by `audit verify` or
    /// wherever they are read.
    pub damaged: u64,
    /// Unix seconds when the last pass ended, and the generations it then dropped.
    pub finished_at: Option<i64>,
    pub dropped: usize,
    /// Why the system's older generation is still kept (the dispatch log), if it is.
    pub waiting: Option<String>,
}

/// A pass's place, kept between looks.
#[derive(Default)]
pub struct Resealer {
    table: usize,
    /// The last key (redb's bytes) of `TABLES[table]` looked at.
    cursor: Option<Vec<u8>>,
    /// The dispatch log step announced when the pass started.
    wal_mark: u64,
    /// Every tenant's newest generation when the pass started: a rotation meanwhile restarts it.
    generations: HashMap<String, u8>,
    /// Tenant of each batch met in this look.
    batch_tenants: HashMap<u64, String>,
    pass: bool,
    /// After a pass: the dispatch log step to be applied before the system's older generation
    /// can go.
    system_wait: Option<u64>,
}

/// What one look did.
#[derive(Debug, Default, Clone, Copy)]
pub struct ResealLook {
    pub steps: u64,
    pub resealed: u64,
    /// The look ended a pass.
    pub finished: bool,
    /// Generations dropped at the end of the pass.
    pub dropped: usize,
}

struct Found {
    keys: Arc<TenantKeys>,
    ad: Vec<u8>,
    /// Bytes before the sealed record in the value.
    prefix: usize,
}

struct Step {
    examined: usize,
    resealed: u64,
    damaged: u64,
    /// The table's end was reached.
    end: bool,
}

fn owner_of(table: &str) -> Owner {
    match table {
        "batches" => Owner::Batch,
        "chunks" | "statuses" => Owner::OfBatch,
        "seen_files" | "blocklist" | "daily" | "countries" | "hourly" | "last_sent" | "replies" => Owner::Prefixed,
        "mail" | "audit" => Owner::SystemId,
        _ => Owner::System,
    }
}

impl Store {
    /// Notes that the dispatch log is about to seal step `seq` (before it seals it): the
    /// system's older generation is kept until every step announced before a pass is applied.
    pub fn wal_announce(&self, seq: u64) {
        self.wal_announced.fetch_max(seq, std::sync::atomic::Ordering::SeqCst);
    }

    /// The re-sealer's progress.
    pub fn reseal_progress(&self) -> ResealProgress {
        self.reseal.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// One look of the re-sealer: up to `budget` steps of the pass under way (one is started
    /// if some tenant has an older generation), fewer when `give_way` says ingest has started.
    pub fn reseal(&self, state: &mut Resealer, budget: u64, give_way: &dyn Fn() -> bool) -> Result<ResealLook> {
        let mut look = ResealLook::default();
        let generations: HashMap<String, u8> = self
            .keys
            .generations()
            .into_iter()
            .filter_map(|(t, g)| g.last().map(|n| (t, *n)))
            .collect();
        if !state.pass && state.generations == generations {
            if let Some(mark) = state.system_wait {
                // The pass is over; only the dispatch log kept the system's older generation.
                if self.mark(super::Mark::WalApplied)?.unwrap_or(0) >= mark {
                    state.system_wait = None;
                    look.dropped = self.keys.drop_old_generations(Some(&["@system".to_string()]))?;
                    self.update_progress(|p| {
                        p.dropped += look.dropped;
                        p.waiting = None;
                    });
                }
                return Ok(look);
            }
        }
        if !state.pass || state.generations != generations {
            if !self.keys.has_old_generations() {
                state.pass = false;
                return Ok(look);
            }
            // A new pass: at the start, or again after another rotation.
            *state = Resealer {
                wal_mark: self.wal_announced.load(std::sync::atomic::Ordering::SeqCst),
                generations,
                pass: true,
                ..Resealer::default()
            };
            self.update_progress(|p| {
                *p = ResealProgress {
                    running: true,
                    finished_at: p.finished_at,
                    ..ResealProgress::default()
                }
            });
            tracing::info!("re-sealing every record under the newest key generation");
        }
        state.batch_tenants.clear();
        while state.table < TABLES.len() {
            if look.steps >= budget || (look.steps > 0 && give_way()) {
                return Ok(look);
            }
            let tx = self.write(Durability::None)?;
            let step = self.reseal_step(&tx, state)?;
            tx.commit()?;
            look.steps += 1;
            look.resealed += step.resealed;
            self.update_progress(|p| {
                p.examined += step.examined as u64;
                p.resealed += step.resealed;
                p.damaged += step.damaged;
            });
            if step.end {
                state.table += 1;
                state.cursor = None;
            }
        }
        // The pass is over: its steps made durable, then the older generations dropped.
        let tx = self.write(Durability::Immediate)?;
        tx.commit()?;
        state.pass = false;
        look.finished = true;
        let applied = self.mark(super::Mark::WalApplied)?.unwrap_or(0);
        let mut tenants: Vec<String> = state.generations.keys().filter(|t| *t != "@system").cloned().collect();
        let waiting = if applied >= state.wal_mark {
            tenants.push("@system".into());
            None
        } else {
            state.system_wait = Some(state.wal_mark);
            Some(format!(
                "the dispatch log still holds steps up to {} sealed before the rotation ({} applied)",
                state.wal_mark, applied
            ))
        };
        look.dropped = self.keys.drop_old_generations(Some(&tenants))?;
        let now = crate::clock::now();
        self.update_progress(|p| {
            p.running = false;
            p.finished_at = Some(now);
            p.dropped = look.dropped;
            p.waiting = waiting.clone();
        });
        Ok(look)
    }

    fn update_progress(&self, f: impl FnOnce(&mut ResealProgress)) {
        if let Ok(mut p) = self.reseal.lock() {
            f(&mut p);
        }
    }

    fn reseal_step(&self, tx: &WriteTransaction, state: &mut Resealer) -> Result<Step> {
        let name = TABLES[state.table];
        let cursor = state.cursor.take();
        let (step, last) = match name {
            "batches" => self.reseal_table(tx, BATCHES, name, cursor.as_deref(), &mut state.batch_tenants),
            "chunks" => self.reseal_table(tx, CHUNKS, name, cursor.as_deref(), &mut state.batch_tenants),
            "statuses" => self.reseal_table(tx, STATUSES, name, cursor.as_deref(), &mut state.batch_tenants),
            "seen_files" => self.reseal_table(tx, SEEN_FILES, name, cursor.as_deref(), &mut state.batch_tenants),
            "blocklist" => self.reseal_table(tx, BLOCKLIST, name, cursor.as_deref(), &mut state.batch_tenants),
            "daily" => self.reseal_table(tx, DAILY, name, cursor.as_deref(), &mut state.batch_tenants),
            "countries" => self.reseal_table(
                tx,
                super::traffic::COUNTRIES,
                name,
                cursor.as_deref(),
                &mut state.batch_tenants,
            ),
            "hourly" => self.reseal_table(
                tx,
                super::traffic::HOURLY,
                name,
                cursor.as_deref(),
                &mut state.batch_tenants,
            ),
            "last_sent" => self.reseal_table(
                tx,
                super::replies::LAST_SENT,
                name,
                cursor.as_deref(),
                &mut state.batch_tenants,
            ),
            "replies" => self.reseal_table(
                tx,
                super::replies::REPLIES,
                name,
                cursor.as_deref(),
                &mut state.batch_tenants,
            ),
            "bans" => self.reseal_table(tx, super::bans::BANS, name, cursor.as_deref(), &mut state.batch_tenants),
            "mail_digests" => self.reseal_table(
                tx,
                super::mail::DIGESTS,
                name,
                cursor.as_deref(),
                &mut state.batch_tenants,
            ),
            "early_receipts" => self.reseal_table(
                tx,
                super::receipts::EARLY,
                name,
                cursor.as_deref(),
                &mut state.batch_tenants,
            ),
            "mail" => self.reseal_table(tx, super::mail::MAIL, name, cursor.as_deref(), &mut state.batch_tenants),
            "audit" => self.reseal_table(
                tx,
                super::audit::AUDIT,
                name,
                cursor.as_deref(),
                &mut state.batch_tenants,
            ),
            _ => self.reseal_table(
                tx,
                super::audit::AUDIT_HEAD,
                name,
                cursor.as_deref(),
                &mut state.batch_tenants,
            ),
        }?;
        state.cursor = last;
        Ok(step)
    }

    /// One step over `def` after `cursor` (redb's key bytes): returns what it did and the last
    /// key it looked at.
    fn reseal_table<K: Key + 'static>(
        &self,
        tx: &WriteTransaction,
        def: TableDefinition<'static, K, &'static [u8]>,
        name: &'static str,
        cursor: Option<&[u8]>,
        batch_tenants: &mut HashMap<u64, String>,
    ) -> Result<(Step, Option<Vec<u8>>)> {
        let mut step = Step {
            examined: 0,
            resealed: 0,
            damaged: 0,
            end: true,
        };
        let mut updates: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut last = None;
        {
            let table = tx.open_table(def)?;
            let start = match cursor {
                Some(c) => Bound::Excluded(K::from_bytes(c)),
                None => Bound::Unbounded,
            };
            for entry in table.range::<K::SelfType<'_>>((start, Bound::Unbounded))? {
                if step.examined >= STEP_RECORDS {
                    step.end = false;
                    break;
                }
                let (k, v) = entry?;
                let key = K::as_bytes(&k.value()).as_ref().to_vec();
                step.examined += 1;
                let value = v.value();
                let found = self.owner(tx, owner_of(name), name, &key, value, batch_tenants)?;
                last = Some(key);
                let Some(found) = found else { continue };
                let sealed = value.get(found.prefix..).unwrap_or_default();
                match found.keys.reseal(name, &found.ad, sealed) {
                    Ok(None) => {}
                    Ok(Some(fresh)) => {
                        let mut out = value[..found.prefix.min(value.len())].to_vec();
                        out.extend_from_slice(&fresh);
                        if let Some(key) = &last {
                            updates.push((key.clone(), out));
                        }
                    }
                    Err(e) => {
                        step.damaged += 1;
                        tracing::warn!(table = name, error = %e, "re-sealer: a record does not open; left as it is");
                    }
                }
            }
        }
        if !updates.is_empty() {
            let mut table = tx.open_table(def)?;
            for (key, value) in &updates {
                table.insert(K::from_bytes(key), value.as_slice())?;
            }
        }
        step.resealed = updates.len() as u64;
        Ok((step, last.or_else(|| cursor.map(<[u8]>::to_vec))))
    }

    /// The keys and associated key a record of `table` is sealed with (`None`: skip it).
    fn owner(
        &self,
        tx: &WriteTransaction,
        owner: Owner,
        table: &str,
        key: &[u8],
        value: &[u8],
        batch_tenants: &mut HashMap<u64, String>,
    ) -> Result<Option<Found>> {
        let be_u64 = |bytes: &[u8]| -> Vec<u8> {
            let mut n = [0u8; 8];
            if let Some(b) = bytes.get(..8) {
                n.copy_from_slice(b);
            }
            u64::from_le_bytes(n).to_be_bytes().to_vec()
        };
        Ok(match owner {
            Owner::Prefixed => {
                let Some(end) = key.iter().position(|b| *b == 0) else {
                    return Ok(None);
                };
                let Ok(tenant) = std::str::from_utf8(&key[..end]) else {
                    return Ok(None);
                };
                Some(Found {
                    keys: self.keys.tenant(tenant),
                    ad: key.to_vec(),
                    prefix: 0,
                })
            }
            Owner::System => Some(Found {
                keys: self.keys.system(),
                ad: key.to_vec(),
                prefix: 0,
            }),
            Owner::SystemId => Some(Found {
                keys: self.keys.system(),
                ad: be_u64(key),
                prefix: 0,
            }),
            Owner::Batch => {
                let len = value.first().copied().unwrap_or(0) as usize;
                let Some(tenant) = value.get(1..1 + len).and_then(|t| std::str::from_utf8(t).ok()) else {
                    return Ok(None);
                };
                Some(Found {
                    keys: self.keys.tenant(tenant),
                    ad: be_u64(key),
                    prefix: 1 + len,
                })
            }
            Owner::OfBatch => {
                let (batch, ad, prefix) = if table == "chunks" {
                    let (batch, n) = <(u64, u32) as redb::Value>::from_bytes(key);
                    (batch, chunk_key(batch, n).to_vec(), 0)
                } else {
                    let ad = be_u64(key);
                    let mut id = [0u8; 8];
                    id.copy_from_slice(&ad);
                    (split_message_id(u64::from_be_bytes(id)).0, ad, 1)
                };
                let tenant = match batch_tenants.get(&batch) {
                    Some(t) => t.clone(),
                    None => {
                        let batches = tx.open_table(BATCHES)?;
                        let Some(v) = batches.get(batch)? else {
                            return Ok(None); // a record of a batch that is gone: nothing reads it
                        };
                        let v = v.value();
                        let len = v.first().copied().unwrap_or(0) as usize;
                        let Some(t) = v.get(1..1 + len).and_then(|t| std::str::from_utf8(t).ok()) else {
                            return Err(StoreError::Sealed {
                                table: "batches",
                                key: batch.to_string(),
                                cause: SealError::Truncated,
                            });
                        };
                        batch_tenants.insert(batch, t.to_string());
                        t.to_string()
                    }
                };
                Some(Found {
                    keys: self.keys.tenant(&tenant),
                    ad,
                    prefix,
                })
            }
        })
    }
}

/// Runs looks until a pass is over, as fast as it goes (offline, or in tests).
pub fn reseal_all(store: &Store) -> Result<ResealLook> {
    let mut state = Resealer::default();
    let mut total = ResealLook::default();
    let started = Instant::now();
    loop {
        let look = store.reseal(&mut state, u64::MAX, &|| false)?;
        total.steps += look.steps;
        total.resealed += look.resealed;
        total.dropped += look.dropped;
        if look.finished || look.steps == 0 {
            total.finished = look.finished;
            tracing::debug!(elapsed = ?started.elapsed(), "re-seal pass over");
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Keyring, MasterKeys};

    #[test]
    fn a_pass_moves_every_record_and_the_old_generation_goes() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("master.key");
        MasterKeys::generate(&key).unwrap();
        let ring = Arc::new(Keyring::open(MasterKeys::load(&key).unwrap(), dir.path()).unwrap());
        let store = Store::open(dir.path(), ring.clone()).unwrap();
        store.blocklist_add("acme", "+33612345678", "test", 1).unwrap();
        store
            .audit(&[crate::store::audit::AuditEvent {
                at: 1,
                action: "test.one".into(),
                tenant: None,
                actor: "test".into(),
                details: vec![],
            }])
            .unwrap();
        assert!(!reseal_all(&store).unwrap().finished, "nothing to do before a rotation");
        ring.new_generation().unwrap();
        let look = reseal_all(&store).unwrap();
        assert!(look.finished);
        assert!(look.resealed >= 3, "{look:?}"); // the blocklist entry, the audit entry and head
        assert!(!ring.has_old_generations());
        assert!(store.blocklist_entry("acme", "+33612345678").unwrap().is_some());
        assert_eq!(
            store.audit_verify().unwrap(),
            crate::store::audit::ChainCheck::Intact { entries: 1 }
        );
        let p = store.reseal_progress();
        assert!(!p.running && p.damaged == 0 && p.resealed == look.resealed, "{p:?}");
    }
}
