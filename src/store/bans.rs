//! Banned source addresses of the SFTP defender, so bans survive a restart. Addresses are
//! sealed; an entry is found by a keyed hash of the address.

use redb::{Durability, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{Result, Store, encode, open_record};

/// keyed hash of the address → sealed [`Ban`].
pub(super) const BANS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("bans");

pub(super) fn create_tables(tx: &WriteTransaction) -> Result<()> {
    tx.open_table(BANS)?;
    Ok(())
}

/// One banned address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    pub ip: String,
    /// Unix seconds.
    pub until: i64,
    /// Bans so far: each one lasts twice the one before.
    pub count: u32,
    pub reason: String,
}

impl Store {
    pub fn put_ban(&self, ban: &Ban) -> Result<()> {
        let keys = self.keys.system();
        let key = keys.lookup_hash(&ban.ip);
        let tx = self.write(Durability::Immediate)?;
        tx.open_table(BANS)?
            .insert(key.as_slice(), keys.seal("bans", &key, &encode(ban)).as_slice())?;
        tx.commit()?;
        Ok(())
    }

    /// Every ban on record (lifted ones too: their count makes the next ban longer).
    pub fn bans(&self) -> Result<Vec<Ban>> {
        let keys = self.keys.system();
        let tx = self.db.begin_read()?;
        let table = tx.open_table(BANS)?;
        let mut out = Vec::new();
        for e in table.iter()? {
            let (k, v) = e?;
            out.push(open_record(&keys, "bans", k.value(), v.value())?);
        }
        Ok(out)
    }
}
