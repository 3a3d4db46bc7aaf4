//! The audit log: append-only, every entry sealed like any record and carrying the hash of the
//! entry before it, so that a changed, removed or reordered entry breaks the chain.
//!
//! Entry `n` is stored under key `n` (from 1) as `seal(postcard(AuditEntry))`, where the entry
//! holds `prev`, the chain hash after entry `n - 1`. The chain hash after entry `n` is
//! `BLAKE3(prev ‖ n ‖ postcard(entry n))`: of the entry, not of its sealed bytes, so that the
//! re-sealer can move an entry to a new key generation without breaking the chain (the seal
//! still proves the bytes are ours). The head (last sequence number and chain hash) is a
//! sealed record of its own, so cutting entries off the end is found too. Only the holder of the
//! master key can write an entry that opens, so an entry cannot be forged, only damaged.

use redb::{Durability, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{Result, Store, StoreError, encode, open_record};

/// sequence number → sealed [`AuditEntry`].
pub(super) const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// "head" → sealed [`Head`].
pub(super) const AUDIT_HEAD: TableDefinition<&str, &[u8]> = TableDefinition::new("audit_head");

pub(super) fn create_tables(tx: &WriteTransaction) -> Result<()> {
    tx.open_table(AUDIT)?;
    tx.open_table(AUDIT_HEAD)?;
    Ok(())
}

/// Something that happened, as the code that saw it describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Unix milliseconds.
    pub at: i64,
    /// What happened, `area.verb`: `sftp.login`, `batch.taken`, `admin.blocklist-add`, …
    pub action: String,
    /// The tenant it concerns, if one.
    pub tenant: Option<String>,
    /// Who did it: `sftp 192.0.2.7:50022`, `admin uid 0`, `smsdrop`.
    pub actor: String,
    /// Everything else, in the order it was given. Never a phone number or a text in clear.
    pub details: Vec<(String, String)>,
}

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    /// Chain hash after the entry before (all zeros for the first).
    pub prev: [u8; 32],
    pub event: AuditEvent,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Head {
    seq: u64,
    hash: [u8; 32],
}

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainCheck {
    Intact {
        entries: u64,
    },
    /// The first entry that does not fit, and why.
    Broken {
        seq: u64,
        reason: String,
    },
}

fn chain(prev: &[u8; 32], seq: u64, plain: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("smsdrop audit chain v2");
    h.update(prev);
    h.update(&seq.to_be_bytes());
    h.update(plain);
    *h.finalize().as_bytes()
}

impl Store {
    fn audit_head(&self, tx: &WriteTransaction) -> Result<Head> {
        let keys = self.keys.system();
        match tx.open_table(AUDIT_HEAD)?.get("head")? {
            Some(v) => open_record(&keys, "audit_head", b"head", v.value()),
            None => Ok(Head::default()),
        }
    }

    /// Appends `events` in order, in one durable transaction.
    pub fn audit(&self, events: &[AuditEvent]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let keys = self.keys.system();
        let tx = self.write(Durability::Immediate)?;
        let mut head = self.audit_head(&tx)?;
        {
            let mut table = tx.open_table(AUDIT)?;
            for event in events {
                let seq = head.seq + 1;
                let entry = AuditEntry {
                    seq,
                    prev: head.hash,
                    event: event.clone(),
                };
                let plain = encode(&entry);
                let sealed = keys.seal("audit", &seq.to_be_bytes(), &plain);
                table.insert(seq, sealed.as_slice())?;
                head = Head {
                    seq,
                    hash: chain(&head.hash, seq, &plain),
                };
            }
        }
        let sealed = keys.seal("audit_head", b"head", &encode(&head));
        tx.open_table(AUDIT_HEAD)?.insert("head", sealed.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    /// Entries with `at >= since_ms`, oldest first, for `audit export`. An entry that does not
    /// open is given as `Err((seq, why))` whatever the filter: the reader must know of it.
    pub fn audit_entries(
        &self,
        since_ms: i64,
        tenant: Option<&str>,
    ) -> Result<Vec<std::result::Result<AuditEntry, (u64, String)>>> {
        let keys = self.keys.system();
        let tx = self.db.begin_read()?;
        let table = tx.open_table(AUDIT)?;
        let mut out = Vec::new();
        for e in table.iter()? {
            let (k, v) = e?;
            let seq = k.value();
            match open_record::<AuditEntry>(&keys, "audit", &seq.to_be_bytes(), v.value()) {
                Ok(entry) => {
                    if entry.event.at >= since_ms && (tenant.is_none() || entry.event.tenant.as_deref() == tenant) {
                        out.push(Ok(entry));
                    }
                }
                Err(e) => out.push(Err((seq, e.to_string()))),
            }
        }
        Ok(out)
    }

    /// Walks the whole chain.
    pub fn audit_verify(&self) -> Result<ChainCheck> {
        let keys = self.keys.system();
        let tx = self.db.begin_read()?;
        let table = tx.open_table(AUDIT)?;
        let mut running = Head::default();
        for e in table.iter()? {
            let (k, v) = e?;
            let seq = k.value();
            let broken = |reason: String| Ok(ChainCheck::Broken { seq, reason });
            if seq != running.seq + 1 {
                return Ok(ChainCheck::Broken {
                    seq: running.seq + 1,
                    reason: format!("entry missing (the next one on record is {seq})"),
                });
            }
            let entry: AuditEntry = match open_record(&keys, "audit", &seq.to_be_bytes(), v.value()) {
                Ok(entry) => entry,
                Err(StoreError::Sealed { cause: source, .. }) => {
                    return broken(format!("does not open ({source}): altered or not written by this key"));
                }
                Err(e) => return broken(e.to_string()),
            };
            if entry.seq != seq {
                return broken(format!("carries sequence number {} in slot {seq}", entry.seq));
            }
            if entry.prev != running.hash {
                return broken("does not follow the entry before it (chain hash differs)".into());
            }
            running = Head {
                seq,
                hash: chain(&running.hash, seq, &encode(&entry)),
            };
        }
        let head: Option<Head> = match tx.open_table(AUDIT_HEAD)?.get("head")? {
            Some(v) => match open_record(&keys, "audit_head", b"head", v.value()) {
                Ok(h) => Some(h),
                Err(e) => {
                    return Ok(ChainCheck::Broken {
                        seq: running.seq,
                        reason: format!("the head record is damaged: {e}"),
                    });
                }
            },
            None => None,
        };
        let head = head.unwrap_or_default();
        if head.seq != running.seq || head.hash != running.hash {
            return Ok(ChainCheck::Broken {
                seq: running.seq + 1,
                reason: format!(
                    "the log ends at entry {} but its head records entry {}: entries were cut off",
                    running.seq, head.seq
                ),
            });
        }
        Ok(ChainCheck::Intact { entries: running.seq })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Keyring, MasterKeys};
    use std::sync::Arc;

    fn store_in(dir: &std::path::Path) -> Store {
        let key = dir.join("master.key");
        MasterKeys::generate(&key).unwrap();
        Store::open(
            dir,
            Arc::new(Keyring::open(MasterKeys::load(&key).unwrap(), dir).unwrap()),
        )
        .unwrap()
    }

    fn event(n: i64) -> AuditEvent {
        AuditEvent {
            at: n,
            action: "test.event".into(),
            tenant: Some("acme".into()),
            actor: "test".into(),
            details: vec![("n".into(), n.to_string())],
        }
    }

    #[test]
    fn the_chain_holds_and_breaks_where_it_was_touched() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(dir.path());
        assert_eq!(store.audit_verify().unwrap(), ChainCheck::Intact { entries: 0 });
        store.audit(&[event(1), event(2)]).unwrap();
        store.audit(&[event(3)]).unwrap();
        assert_eq!(store.audit_verify().unwrap(), ChainCheck::Intact { entries: 3 });
        assert_eq!(store.audit_entries(2, None).unwrap().len(), 2);
        assert!(store.audit_entries(0, None).unwrap().iter().all(|e| e.is_ok()));
        assert_eq!(store.audit_entries(0, Some("other")).unwrap().len(), 0);

        // An entry moved into another slot opens no more (the slot is bound as associated data).
        let tx = store.write(Durability::Immediate).unwrap();
        {
            let mut t = tx.open_table(AUDIT).unwrap();
            let third = t.get(3).unwrap().unwrap().value().to_vec();
            t.insert(2, third.as_slice()).unwrap();
        }
        tx.commit().unwrap();
        match store.audit_verify().unwrap() {
            ChainCheck::Broken { seq: 2, .. } => {}
            other => panic!("{other:?}"),
        }

        // The last entry removed: the head says more.
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(dir.path());
        store.audit(&[event(1), event(2)]).unwrap();
        let tx = store.write(Durability::Immediate).unwrap();
        tx.open_table(AUDIT).unwrap().remove(2).unwrap();
        tx.commit().unwrap();
        match store.audit_verify().unwrap() {
            ChainCheck::Broken { seq: 2, reason } => assert!(reason.contains("cut off"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
}
