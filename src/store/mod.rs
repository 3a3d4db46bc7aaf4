//! The encrypted durable queue: batches, their messages and statuses, scheduled sends, files
//! already seen, opt-out lists. Backed by redb: ACID transactions across tables, an `fdatasync`
//! before `commit()` returns, and freed pages reused under a queue's insert-then-delete load
//! (sled, the other candidate, syncs only in the background and did not reclaim that space).
//!
//! Nothing outside this module sees redb's types. Every value is sealed with its tenant's key
//! (`crypto`), bound to its table and record key. Phone numbers appear only inside sealed values
//! or, where something must be found by number, as a keyed hash in a key.
//!
//! Durability: a batch becomes visible to the dispatcher, and may be acknowledged, only when
//! [`Store::finish_batch`] returns, after a commit with `Durability::Immediate` (fdatasync).
//! Chunks written before that are committed without sync; a crash loses them together with the
//! batch's `Ingesting` record, or leaves that record behind for recovery to redo the batch.

mod audit;
pub mod backup;
mod bans;
mod mail;
mod marks;
mod receipts;
pub mod records;
mod replies;
pub mod reseal;
pub mod retention;
pub mod subject;
mod traffic;
pub mod wal;

pub use audit::{AuditEntry, AuditEvent, ChainCheck};
pub use bans::Ban;
pub use marks::Mark;
pub use replies::{IncomingMo, MoOutcome, ReplyRecord, SentTo};
pub use traffic::Traffic;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crypto::{Keyring, SealError, TenantKeys};
use crate::sms::codes::{FileReason, MessageStatus};
use crate::sms::format::ReplyFormat;
use crate::sms::message::Message;
use records::*;

pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// batch id → tenant-prefixed sealed [`BatchRecord`].
const BATCHES: TableDefinition<u64, &[u8]> = TableDefinition::new("batches");
/// Batches the dispatcher still has work in: batch id → ().
const ACTIVE: TableDefinition<u64, ()> = TableDefinition::new("active");
/// tenant ‖ 0 ‖ keyed hash of a reply stem → keyed hash of the file name ‖ batch id (see
/// `Store::reply_stem`).
pub(crate) const REPLY_STEMS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("reply_stems");
/// (batch id, chunk number) → sealed `Vec<Message>`.
const CHUNKS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("chunks");
/// message id → status code (one byte, in clear: it moves a batch's counts without opening
/// the record, and says nothing about anyone) ‖ sealed [`StatusRecord`]; absent means queued.
const STATUSES: TableDefinition<u64, &[u8]> = TableDefinition::new("statuses");
/// (due unix seconds, message id) → (): messages whose `send_at` has not come yet.
const SCHEDULED: TableDefinition<(u64, u64), ()> = TableDefinition::new("scheduled");
/// tenant ‖ 0 ‖ keyed file hash → sealed [`SeenFile`].
const SEEN_FILES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("seen_files");
/// tenant ‖ 0 ‖ keyed phone hash → sealed [`BlockEntry`].
const BLOCKLIST: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blocklist");
/// spool file name → batch id, while a claimed file is in the spool.
const CLAIMS: TableDefinition<&str, u64> = TableDefinition::new("claims");
/// tenant ‖ 0 ‖ day (YYYY-MM-DD, tenant's time zone) → sealed count of messages queued that day.
const DAILY: TableDefinition<&[u8], &[u8]> = TableDefinition::new("daily");

/// Where the global opt-out list (across tenants) is kept in place of a tenant id: tenant ids
/// cannot start with `@`. Its numbers are hashed under a key of its own.
pub const GLOBAL_LIST: &str = "@global";

/// Page cache; redb's default of 1 GiB would dwarf the rest of the daemon.
const CACHE_BYTES: usize = 16 << 20;

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(redb::Error),
    #[error("the database is in use by another process (is `smsdrop serve` running?)")]
    Locked,
    #[error("record {table}/{key} does not open: {cause}")]
    Sealed {
        table: &'static str,
        key: String,
        cause: SealError,
    },
    #[error("record {table}/{key} does not decode: {cause}")]
    Decode {
        table: &'static str,
        key: String,
        cause: postcard::Error,
    },
    #[error("the database had an I/O error and is being opened again")]
    Reopening,
    #[error("keys: {0}")]
    Keys(crate::crypto::KeyError),
    #[error("no batch {0}")]
    NoBatch(u64),
    #[error("batch {id} is {state}: {action} applies only to {wanted} batches")]
    WrongState {
        id: u64,
        state: &'static str,
        action: &'static str,
        wanted: &'static str,
    },
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Database(e)
    }
}

impl From<crate::crypto::KeyError> for StoreError {
    fn from(e: crate::crypto::KeyError) -> Self {
        StoreError::Keys(e)
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Database(e.into()) }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl From<redb::DatabaseError> for StoreError {
    fn from(e: redb::DatabaseError) -> Self {
        match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked,
            e => StoreError::Database(e.into()),
        }
    }
}

impl StoreError {
    /// Whether this is the database refusing work after an earlier I/O error (it does until it
    /// is opened again: [`Store::recover`]).
    pub fn is_latched(&self) -> bool {
        matches!(
            self,
            StoreError::Database(redb::Error::PreviousIo) | StoreError::Reopening
        )
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The queue and everything around it. Cheap to clone; safe to share between threads.
#[derive(Clone)]
pub struct Store {
    pub(crate) db: Arc<Db>,
    pub(crate) keys: Arc<Keyring>,
    /// The folder the database is in (`state_dir`).
    dir: Arc<std::path::PathBuf>,
    /// The last dispatch log step about to be sealed ([`Store::wal_announce`]).
    wal_announced: Arc<std::sync::atomic::AtomicU64>,
    reseal: Arc<std::sync::Mutex<reseal::ResealProgress>>,
    /// How each partner writes its receipts' ids, as learned (`store::receipts`).
    forms: Arc<std::sync::Mutex<receipts::FormBook>>,
}

/// A tenant's blocklist and the global one, as ingest checks them.
pub struct Blocklists {
    pub tenant: HashSet<[u8; 16]>,
    pub global: HashSet<[u8; 16]>,
    pub global_keys: Arc<TenantKeys>,
}

impl Blocklists {
    /// Whether a number (its tenant-keyed hash and E.164 form) is on either list.
    pub fn contains(&self, phone_hash: &[u8; 16], e164: &str) -> bool {
        self.tenant.contains(phone_hash)
            || (!self.global.is_empty() && self.global.contains(&self.global_keys.phone_hash(e164)))
    }
}

/// The tenant's policies a batch meets when it is committed.
#[derive(Debug, Clone, Default)]
pub struct Admission {
    /// Today in the tenant's time zone, `YYYY-MM-DD`.
    pub day: String,
    pub max_per_day: Option<u64>,
    /// Hold the batch instead of queueing it.
    pub hold: bool,
}

/// What became of a batch at commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    Queued,
    Held,
    /// Queueing it would pass `max_per_day`; nothing was written.
    OverQuota {
        used: u64,
    },
}

/// What one dispatcher step changes, applied in one durable transaction (or logged first, see
/// [`wal`]).
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct DispatchCommit {
    /// New dispatch cursors: batch id → next index not yet taken.
    pub cursors: Vec<(u64, u64)>,
    /// New statuses: message id → status.
    pub outcomes: Vec<(u64, StatusRecord)>,
    /// Messages set aside until their `send_at`: (due unix seconds, message id).
    pub schedule: Vec<(i64, u64)>,
    /// Scheduled entries taken.
    pub unschedule: Vec<(i64, u64)>,
    /// Delivery receipts: (partner, receipt), applied after the outcomes.
    pub receipts: Vec<(String, crate::sms::receipt::Receipt)>,
    /// Messages handed to a partner, for matching the replies to them.
    pub sent: Vec<SentTo>,
    /// Incoming messages, kept for their tenant's replies file.
    pub mos: Vec<IncomingMo>,
}

/// What a committed dispatcher step finished.
#[derive(Debug, Default)]
pub struct DispatchDone {
    /// Batches whose every message is now final.
    pub finished: Vec<BatchRecord>,
    /// Where each incoming message of the step went, in order.
    pub mos: Vec<MoOutcome>,
}

fn key_text(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // postcard only fails on types serde cannot describe or on a full fixed buffer: neither
    // applies to our records written into a growable Vec.
    postcard::to_stdvec(value).unwrap_or_default()
}

pub(crate) fn open_record<T: DeserializeOwned>(
    keys: &TenantKeys,
    table: &'static str,
    key: &[u8],
    sealed: &[u8],
) -> Result<T> {
    let plain = keys.open(table, key, sealed).map_err(|source| StoreError::Sealed {
        table,
        key: key_text(key),
        cause: source,
    })?;
    postcard::from_bytes(&plain).map_err(|source| StoreError::Decode {
        table,
        key: key_text(key),
        cause: source,
    })
}

/// The tables every dispatch step writes, opened once for a whole `apply_steps` transaction
/// (opening a table costs about as much as the insert that follows).
pub(super) struct StepTables<'tx> {
    pub(super) statuses: redb::Table<'tx, u64, &'static [u8]>,
    pub(super) receipt_ids: redb::Table<'tx, &'static [u8], &'static [u8]>,
    pub(super) early: redb::Table<'tx, &'static [u8], &'static [u8]>,
    pub(super) forms: redb::Table<'tx, &'static str, u8>,
    pub(super) scheduled: redb::Table<'tx, (u64, u64), ()>,
}

impl<'tx> StepTables<'tx> {
    fn open(tx: &'tx WriteTransaction) -> Result<StepTables<'tx>> {
        Ok(StepTables {
            statuses: tx.open_table(STATUSES)?,
            receipt_ids: tx.open_table(receipts::RECEIPT_IDS)?,
            early: tx.open_table(receipts::EARLY)?,
            forms: tx.open_table(receipts::RECEIPT_FORMS)?,
            scheduled: tx.open_table(SCHEDULED)?,
        })
    }
}

/// A `statuses` value: the status code, then the sealed record (the code is bound to it as the
/// record's own `status`, checked when opened).
fn seal_status(keys: &TenantKeys, id: u64, status: &StatusRecord) -> Vec<u8> {
    let sealed = keys.seal("statuses", &id.to_be_bytes(), &encode(status));
    let mut value = Vec::with_capacity(1 + sealed.len());
    value.push(status.status as u8);
    value.extend_from_slice(&sealed);
    value
}

fn open_status(keys: &TenantKeys, id: u64, value: &[u8]) -> Result<StatusRecord> {
    let sealed = value.get(1..).unwrap_or_default();
    let record: StatusRecord = open_record(keys, "statuses", &id.to_be_bytes(), sealed)?;
    if value.first() != Some(&(record.status as u8)) {
        return Err(StoreError::Sealed {
            table: "statuses",
            key: id.to_string(),
            cause: SealError::Truncated,
        });
    }
    Ok(record)
}

/// The status code of a `statuses` value, without opening it.
fn status_code(id: u64, value: &[u8]) -> Result<MessageStatus> {
    value
        .first()
        .and_then(|&b| MessageStatus::ALL.get(b as usize).copied())
        .ok_or(StoreError::Sealed {
            table: "statuses",
            key: id.to_string(),
            cause: SealError::Truncated,
        })
}

pub(crate) fn tenant_key(tenant: &str, hash: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 1 + hash.len());
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(hash);
    k
}

/// The key range of one tenant's entries in a table keyed by `tenant_key`.
pub(crate) fn tenant_range(tenant: &str) -> (Vec<u8>, Vec<u8>) {
    let start = tenant_key(tenant, &[]);
    let mut end = start.clone();
    if let Some(last) = end.last_mut() {
        *last = 1; // the byte after the 0 separator
    }
    (start, end)
}

pub(crate) fn chunk_key(batch: u64, chunk: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&batch.to_be_bytes());
    k[8..].copy_from_slice(&chunk.to_be_bytes());
    k
}

/// The open database, and its reopening after an I/O error.
///
/// redb latches the first failed write (a full disk, say): from then on every transaction of that
/// `Database` fails with "Previous I/O error occurred" until it is opened again. [`Db::recover`]
/// does that in place, so the service heals by itself when space comes back. What was committed
/// before the failure is on the disk; a transaction that failed was never acknowledged to anyone
/// (ingest answers only after its commit, dispatch steps wait in the dispatch log and are
/// applied again).
pub(crate) struct Db {
    path: std::path::PathBuf,
    /// `None` only while it is being reopened (or could not be yet).
    slot: std::sync::RwLock<Option<Arc<Database>>>,
    /// How many times it was reopened.
    reopened: AtomicU64,
}

/// What [`Db::recover`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing to do.
    Healthy,
    /// It had failed and is open again.
    Reopened,
    /// It has failed and cannot be opened again yet (the disk is still full, a transaction of the
    /// failed one is still running); tried again at the next call.
    Waiting,
}

impl Db {
    fn create(path: &Path) -> Result<Database> {
        let mut builder = Database::builder();
        builder.set_cache_size(CACHE_BYTES);
        Ok(builder.create(path)?)
    }

    fn get(&self) -> Result<Arc<Database>> {
        let slot = self.slot.read().unwrap_or_else(|e| e.into_inner());
        slot.clone().ok_or(StoreError::Reopening)
    }

    pub(crate) fn begin_read(&self) -> Result<redb::ReadTransaction> {
        Ok(self.get()?.begin_read()?)
    }

    pub(crate) fn begin_write(&self) -> Result<WriteTransaction> {
        Ok(self.get()?.begin_write()?)
    }

    /// Whether the open database has latched an I/O error (a write transaction that could start
    /// now would fail at once). A running writer hides it until it ends: it is looked at again.
    fn failed(&self) -> bool {
        let Ok(db) = self.get() else { return true };
        matches!(
            db.try_begin_write(),
            Err(redb::TransactionError::Storage(
                redb::StorageError::PreviousIo | redb::StorageError::Io(_)
            ))
        )
    }

    /// Reopens the database if it has failed. Cheap when it has not (one write transaction begun
    /// and dropped, without waiting for another one).
    pub(crate) fn recover(&self) -> Recovery {
        if !self.failed() {
            return Recovery::Healthy;
        }
        let mut slot = self.slot.write().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = slot.take() {
            match Arc::try_unwrap(old) {
                // Closing releases the file and its lock at once (a write transaction still
                // running holds them until it ends: the open below then waits for a later call).
                Ok(db) => {
                    if let Err(e) = db.close() {
                        tracing::debug!(error = %e, "closing the failed database");
                    }
                }
                // Someone is between taking the handle and beginning a transaction: later.
                Err(old) => {
                    *slot = Some(old);
                    return Recovery::Waiting;
                }
            }
        }
        match Db::create(&self.path) {
            Ok(db) => {
                *slot = Some(Arc::new(db));
                self.reopened.fetch_add(1, Ordering::Relaxed);
                Recovery::Reopened
            }
            Err(e) => {
                tracing::debug!(error = %e, "the database does not open again yet");
                Recovery::Waiting
            }
        }
    }
}

impl Store {
    /// Opens (or creates) the database in `state_dir`, repairing it after a crash.
    pub fn open(state_dir: &Path, keys: Arc<Keyring>) -> Result<Store> {
        let path = state_dir.join(crate::paths::DB_FILE);
        Store::with_database(Db::create(&path)?, &path, keys, state_dir)
    }

    /// Reopens the database if an I/O error has latched it (see [`Db`]); called every second by
    /// the disk watch. Logs what it did.
    pub fn recover(&self) -> Recovery {
        let r = self.db.recover();
        match r {
            Recovery::Healthy => {}
            Recovery::Reopened => {
                static THROTTLE: crate::limits::Throttle =
                    crate::limits::Throttle::new(std::time::Duration::from_secs(60));
                if let Some(held) = THROTTLE.allow("reopened") {
                    tracing::warn!(
                        times = self.reopened(),
                        "the database had an I/O error and is open again; work goes on ({held} more such reopenings not logged)"
                    )
                }
            }
            Recovery::Waiting => tracing::debug!("the database had an I/O error; reopening it later"),
        }
        r
    }

    /// How many times the database was reopened after an I/O error since start.
    pub fn reopened(&self) -> u64 {
        self.db.reopened.load(Ordering::Relaxed)
    }

    /// A store on an opened database, its tables made if they are not there yet.
    fn with_database(db: Database, path: &Path, keys: Arc<Keyring>, dir: &Path) -> Result<Store> {
        let tx = db.begin_write()?;
        tx.open_table(META)?;
        tx.open_table(BATCHES)?;
        tx.open_table(ACTIVE)?;
        tx.open_table(REPLY_STEMS)?;
        tx.open_table(CHUNKS)?;
        tx.open_table(STATUSES)?;
        tx.open_table(SCHEDULED)?;
        tx.open_table(SEEN_FILES)?;
        tx.open_table(BLOCKLIST)?;
        tx.open_table(CLAIMS)?;
        tx.open_table(DAILY)?;
        mail::create_tables(&tx)?;
        traffic::create_tables(&tx)?;
        bans::create_tables(&tx)?;
        audit::create_tables(&tx)?;
        receipts::create_tables(&tx)?;
        replies::create_tables(&tx)?;
        retention::create_tables(&tx)?;
        tx.commit()?;
        let forms = receipts::FormBook::load(&db)?;
        Ok(Store {
            db: Arc::new(Db {
                path: path.to_path_buf(),
                slot: std::sync::RwLock::new(Some(Arc::new(db))),
                reopened: AtomicU64::new(0),
            }),
            keys,
            dir: Arc::new(dir.to_path_buf()),
            wal_announced: Default::default(),
            reseal: Default::default(),
            forms: Arc::new(std::sync::Mutex::new(forms)),
        })
    }

    /// Where the tenant key store lives (beside the database).
    pub(crate) fn key_store_path(&self) -> std::path::PathBuf {
        self.dir.join(crate::paths::KEY_STORE_FILE)
    }

    pub fn keys(&self) -> &Arc<Keyring> {
        &self.keys
    }

    /// Runs `f` on the store on a blocking thread, for async callers (redb is synchronous).
    pub async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Store) -> Result<T> + Send + 'static) -> Result<T> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .unwrap_or_else(|e| Err(StoreError::Database(redb::Error::Io(std::io::Error::other(e)))))
    }

    pub(crate) fn write(&self, durability: Durability) -> Result<WriteTransaction> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(durability)?;
        tx.set_quick_repair(true);
        Ok(tx)
    }

    fn put_batch(tx: &WriteTransaction, keys: &TenantKeys, batch: &BatchRecord) -> Result<()> {
        let key = batch.id.to_be_bytes();
        let sealed = keys.seal("batches", &key, &encode(batch));
        let mut value = Vec::with_capacity(1 + batch.tenant.len() + sealed.len());
        value.push(batch.tenant.len() as u8);
        value.extend_from_slice(batch.tenant.as_bytes());
        value.extend_from_slice(&sealed);
        tx.open_table(BATCHES)?.insert(batch.id, value.as_slice())?;
        Ok(())
    }

    fn decode_batch(&self, id: u64, value: &[u8]) -> Result<BatchRecord> {
        let bad = |source| StoreError::Sealed {
            table: "batches",
            key: id.to_string(),
            cause: source,
        };
        let len = *value.first().ok_or(bad(SealError::Truncated))? as usize;
        let tenant = value
            .get(1..1 + len)
            .and_then(|t| std::str::from_utf8(t).ok())
            .ok_or(bad(SealError::Truncated))?;
        let keys = self.keys.tenant(tenant);
        let plain = keys
            .open("batches", &id.to_be_bytes(), &value[1 + len..])
            .map_err(bad)?;
        records::decode_batch(&plain).map_err(|source| StoreError::Decode {
            table: "batches",
            key: id.to_string(),
            cause: source,
        })
    }

    /// A batch by id.
    pub fn batch(&self, id: u64) -> Result<Option<BatchRecord>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(BATCHES)?;
        match table.get(id)? {
            Some(v) => Ok(Some(self.decode_batch(id, v.value())?)),
            None => Ok(None),
        }
    }

    /// Every batch, oldest first, optionally of one tenant only.
    pub fn batches(&self, tenant: Option<&str>) -> Result<Vec<BatchRecord>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(BATCHES)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let value = v.value();
            let len = value.first().copied().unwrap_or(0) as usize;
            if let Some(t) = tenant {
                if value.get(1..1 + len) != Some(t.as_bytes()) {
                    continue;
                }
            }
            out.push(self.decode_batch(k.value(), value)?);
        }
        Ok(out)
    }

    /// Batches that still have messages to dispatch or to finish.
    pub fn active_batches(&self) -> Result<Vec<BatchRecord>> {
        let ids: Vec<u64> = {
            let tx = self.db.begin_read()?;
            let table = tx.open_table(ACTIVE)?;
            table
                .iter()?
                .map(|e| e.map(|(k, _)| k.value()))
                .collect::<std::result::Result<_, _>>()?
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(b) = self.batch(id)? {
                out.push(b);
            }
        }
        Ok(out)
    }

    // ---- ingest ------------------------------------------------------------------------

    /// Records a claimed file as a batch being ingested and returns the new batch.
    pub fn begin_batch(
        &self,
        tenant: &str,
        file_name: &str,
        claim: &str,
        format: ReplyFormat,
        received_at: i64,
    ) -> Result<BatchRecord> {
        let tx = self.write(Durability::None)?;
        let id = {
            let mut meta = tx.open_table(META)?;
            next_id(&mut meta, Mark::NextBatch)?
        };
        let mut batch = BatchRecord::new(id, tenant, file_name, claim, received_at, format);
        let keys = self.keys.tenant(tenant);
        batch.reply_stem = self.reply_stem(&tx, &keys, tenant, file_name, id)?;
        Self::put_batch(&tx, &keys, &batch)?;
        tx.open_table(CLAIMS)?.insert(claim, id)?;
        tx.commit()?;
        Ok(batch)
    }

    /// The reply files' stem of a new batch, when it cannot be its file's own: never one that
    /// another file's batch answers under (`june.csv` and `june.txt`), nor one a batch of the
    /// same name that is still under way answers under. Then the whole file name is the stem
    /// (`june.txt.result.csv`), or that and the batch id. `None`: the file's own stem.
    ///
    /// `reply_stems` holds, per tenant and keyed hash of a stem, the keyed hash of the file name
    /// and the batch id that last took it; an entry whose batch is gone (retention) is free.
    fn reply_stem(
        &self,
        tx: &WriteTransaction,
        keys: &TenantKeys,
        tenant: &str,
        file_name: &str,
        id: u64,
    ) -> Result<Option<String>> {
        let mut stems = tx.open_table(REPLY_STEMS)?;
        let batches = tx.open_table(BATCHES)?;
        let active = tx.open_table(ACTIVE)?;
        let name_hash = keys.phone_hash(&format!("file:{file_name}"));
        let own = records::file_stem(file_name);
        for candidate in [own.to_string(), file_name.to_string(), format!("{file_name}.{id}")] {
            let key = tenant_key(tenant, &keys.phone_hash(&format!("stem:{candidate}")));
            let taken = match stems.get(key.as_slice())? {
                None => false,
                Some(v) => {
                    let v = v.value();
                    let owner = v.get(16..24).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
                    match owner {
                        Some(owner) if batches.get(owner)?.is_some() => {
                            v.get(..16) != Some(&name_hash[..]) || active.get(owner)?.is_some()
                        }
                        _ => false,
                    }
                }
            };
            if !taken {
                let mut value = name_hash.to_vec();
                value.extend_from_slice(&id.to_be_bytes());
                stems.insert(key.as_slice(), value.as_slice())?;
                return Ok((candidate != own).then_some(candidate));
            }
        }
        // The last candidate holds this batch's own id: never taken.
        Ok(Some(format!("{file_name}.{id}")))
    }

    /// Seals and writes chunks of a batch being ingested, without waiting for the disk.
    /// `chunks` are (chunk number, messages).
    pub fn write_chunks(&self, batch: &BatchRecord, chunks: &[(u32, Vec<Message>)]) -> Result<()> {
        let keys = self.keys.tenant(&batch.tenant);
        let sealed: Vec<(u32, Vec<u8>)> = chunks
            .iter()
            .map(|(n, msgs)| (*n, keys.seal("chunks", &chunk_key(batch.id, *n), &encode(msgs))))
            .collect();
        let tx = self.write(Durability::None)?;
        // Sealed outside the transaction (it holds the writer's lock): one sealed under a
        // generation a rotation has since replaced is sealed again here, so that the re-sealer's
        // next pass, which starts after this commit, finds every older record (see `reseal`).
        let newest = Some(keys.newest_generation());
        let sealed: Vec<(u32, Vec<u8>)> = if sealed.iter().all(|(_, v)| crate::crypto::generation_of(v) == newest) {
            sealed
        } else {
            chunks
                .iter()
                .map(|(n, msgs)| (*n, keys.seal("chunks", &chunk_key(batch.id, *n), &encode(msgs))))
                .collect()
        };
        {
            let mut table = tx.open_table(CHUNKS)?;
            for (n, value) in &sealed {
                table.insert((batch.id, *n), value.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Makes a batch durable and visible to the dispatcher (state `Queued`, or `Done` when it has
    /// no message), or `Held` by policy, and remembers the file for `duplicate_file`. Returns
    /// after fdatasync. A batch over the tenant's daily quota is not written at all.
    pub fn finish_batch(
        &self,
        batch: &mut BatchRecord,
        file_hash: Option<[u8; 32]>,
        now: i64,
        admission: &Admission,
    ) -> Result<Admitted> {
        let keys = self.keys.tenant(&batch.tenant);
        let tx = self.write(Durability::Immediate)?;
        let day_key = tenant_key(&batch.tenant, admission.day.as_bytes());
        let used: u64 = match tx.open_table(DAILY)?.get(day_key.as_slice())? {
            Some(v) => open_record(&keys, "daily", &day_key, v.value())?,
            None => 0,
        };
        if let Some(max) = admission.max_per_day {
            if batch.accepted > 0 && used + batch.accepted > max {
                return Ok(Admitted::OverQuota { used });
            }
        }
        let held = admission.hold && batch.accepted > 0;
        batch.counts = [0; 9];
        let initial = if held {
            MessageStatus::Held
        } else {
            MessageStatus::Queued
        };
        batch.counts[initial as usize] = batch.accepted;
        batch.state = match (batch.accepted, held) {
            (0, _) => BatchState::Done,
            (_, true) => BatchState::Held,
            _ => BatchState::Queued,
        };
        batch.updated_at = now;
        Self::put_batch(&tx, &keys, batch)?;
        if batch.state == BatchState::Queued {
            tx.open_table(ACTIVE)?.insert(batch.id, ())?;
        }
        if batch.accepted > 0 {
            let sealed = keys.seal("daily", &day_key, &encode(&(used + batch.accepted)));
            tx.open_table(DAILY)?.insert(day_key.as_slice(), sealed.as_slice())?;
        }
        if let Some(hash) = file_hash {
            let key = tenant_key(&batch.tenant, &hash);
            let seen = SeenFile {
                batch: batch.id,
                seen_at: now,
            };
            let sealed = keys.seal("seen_files", &key, &encode(&seen));
            tx.open_table(SEEN_FILES)?.insert(key.as_slice(), sealed.as_slice())?;
        }
        tx.commit()?;
        Ok(if held { Admitted::Held } else { Admitted::Queued })
    }

    /// Releases a held batch: its messages are queued for dispatch.
    pub fn release_batch(&self, id: u64, now: i64) -> Result<BatchRecord> {
        let tx = self.write(Durability::Immediate)?;
        let mut batch = self.batch_in(&tx, id)?;
        if batch.state != BatchState::Held {
            return Err(StoreError::WrongState {
                id,
                state: batch.state.as_str(),
                action: "release",
                wanted: "held",
            });
        }
        batch.state = BatchState::Queued;
        let held = std::mem::take(&mut batch.counts[MessageStatus::Held as usize]);
        batch.counts[MessageStatus::Queued as usize] += held;
        batch.updated_at = now;
        Self::put_batch(&tx, &self.keys.tenant(&batch.tenant), &batch)?;
        tx.open_table(ACTIVE)?.insert(id, ())?;
        tx.commit()?;
        Ok(batch)
    }

    /// Cancels what a batch has not sent yet: held or queued messages, scheduled ones and
    /// retries. Messages already with a partner keep their outcome.
    pub fn cancel_batch(&self, id: u64, now: i64) -> Result<BatchRecord> {
        let tx = self.write(Durability::Immediate)?;
        let mut batch = self.batch_in(&tx, id)?;
        if !matches!(batch.state, BatchState::Queued | BatchState::Held) {
            return Err(StoreError::WrongState {
                id,
                state: batch.state.as_str(),
                action: "cancel",
                wanted: "queued or held",
            });
        }
        let keys = self.keys.tenant(&batch.tenant);
        let untaken = batch.accepted - batch.cursor;
        let from_status = if batch.state == BatchState::Held {
            MessageStatus::Held
        } else {
            MessageStatus::Queued
        };
        batch.counts[from_status as usize] = batch.counts[from_status as usize].saturating_sub(untaken);
        batch.counts[MessageStatus::Canceled as usize] += untaken;
        batch.canceled_from = Some(batch.cursor);
        batch.cursor = batch.accepted;
        if batch.state == BatchState::Held {
            batch.state = BatchState::Queued;
        }
        // Scheduled messages and retries of this batch: canceled too.
        let first = message_id(id, 0);
        let last = message_id(id + 1, 0);
        let scheduled: Vec<(u64, u64)> = tx
            .open_table(SCHEDULED)?
            .iter()?
            .filter_map(|e| e.ok().map(|(k, _)| k.value()))
            .filter(|(_, m)| (first..last).contains(m))
            .collect();
        {
            let mut table = tx.open_table(SCHEDULED)?;
            let mut statuses = tx.open_table(STATUSES)?;
            for (due, m) in scheduled {
                table.remove((due, m))?;
                let previous = match statuses.get(m)? {
                    Some(v) => status_code(m, v.value())?,
                    None => MessageStatus::Queued,
                };
                batch.counts[previous as usize] = batch.counts[previous as usize].saturating_sub(1);
                batch.counts[MessageStatus::Canceled as usize] += 1;
                let mut status = StatusRecord::queued();
                status.status = MessageStatus::Canceled;
                status.done_at = Some(now);
                status.error = "canceled by operator".into();
                statuses.insert(m, seal_status(&keys, m, &status).as_slice())?;
            }
        }
        batch.updated_at = now;
        if batch.finished() >= batch.accepted {
            batch.state = BatchState::Done;
            tx.open_table(ACTIVE)?.remove(id)?;
        }
        Self::put_batch(&tx, &keys, &batch)?;
        tx.commit()?;
        Ok(batch)
    }

    fn batch_in(&self, tx: &WriteTransaction, id: u64) -> Result<BatchRecord> {
        let table = tx.open_table(BATCHES)?;
        let value = table.get(id)?.ok_or(StoreError::NoBatch(id))?;
        self.decode_batch(id, value.value())
    }

    /// Refuses a whole batch: drops any chunk already written and records the reason, durably.
    pub fn reject_batch(&self, batch: &mut BatchRecord, reason: FileReason, now: i64) -> Result<()> {
        let keys = self.keys.tenant(&batch.tenant);
        batch.state = BatchState::Rejected;
        batch.file_reason = Some(reason);
        batch.accepted = 0;
        batch.counts = [0; 9];
        batch.updated_at = now;
        let tx = self.write(Durability::Immediate)?;
        tx.open_table(CHUNKS)?
            .extract_from_if((batch.id, 0)..=(batch.id, u32::MAX), |_, _| true)?
            .for_each(drop);
        Self::put_batch(&tx, &keys, batch)?;
        tx.commit()?;
        Ok(())
    }

    /// Forgets a batch cut short by a crash (state `Ingesting`), so that it can be ingested anew.
    pub fn discard_batch(&self, batch: &BatchRecord) -> Result<()> {
        let tx = self.write(Durability::Immediate)?;
        tx.open_table(CHUNKS)?
            .extract_from_if((batch.id, 0)..=(batch.id, u32::MAX), |_, _| true)?
            .for_each(drop);
        tx.open_table(BATCHES)?.remove(batch.id)?;
        tx.open_table(CLAIMS)?.remove(batch.claim.as_str())?;
        tx.commit()?;
        Ok(())
    }

    /// The batch a spool file was claimed as, if it got that far.
    pub fn batch_by_claim(&self, claim: &str) -> Result<Option<BatchRecord>> {
        let id = {
            let tx = self.db.begin_read()?;
            let table = tx.open_table(CLAIMS)?;
            table.get(claim)?.map(|v| v.value())
        };
        match id {
            Some(id) => self.batch(id),
            None => Ok(None),
        }
    }

    /// Drops the claim entry once the spool file is gone.
    pub fn forget_claim(&self, claim: &str) -> Result<()> {
        let tx = self.write(Durability::None)?;
        tx.open_table(CLAIMS)?.remove(claim)?;
        tx.commit()?;
        Ok(())
    }

    /// Spool claims recorded in the store.
    pub fn claims(&self) -> Result<Vec<String>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(CLAIMS)?;
        let mut out = Vec::new();
        for e in table.iter()? {
            out.push(e?.0.value().to_string());
        }
        Ok(out)
    }

    /// The batch that last had this content, if within `window_secs` of `now`.
    pub fn seen_file(&self, tenant: &str, hash: &[u8; 32], now: i64, window_secs: i64) -> Result<Option<SeenFile>> {
        let key = tenant_key(tenant, hash);
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SEEN_FILES)?;
        let Some(v) = table.get(key.as_slice())? else {
            return Ok(None);
        };
        let seen: SeenFile = open_record(&self.keys.tenant(tenant), "seen_files", &key, v.value())?;
        Ok((now - seen.seen_at <= window_secs).then_some(seen))
    }

    /// What ingest checks numbers against: the tenant's list and the global one (with the key
    /// its hashes are made with).
    pub fn blocklists(&self, tenant: &str) -> Result<Blocklists> {
        Ok(Blocklists {
            tenant: self.blocklist_hashes(tenant)?,
            global: self.blocklist_hashes(GLOBAL_LIST)?,
            global_keys: self.keys.tenant(GLOBAL_LIST),
        })
    }

    /// The keyed hashes of a tenant's blocklisted numbers.
    pub fn blocklist_hashes(&self, tenant: &str) -> Result<HashSet<[u8; 16]>> {
        let (start, end) = tenant_range(tenant);
        let tx = self.db.begin_read()?;
        let table = tx.open_table(BLOCKLIST)?;
        let mut out = HashSet::new();
        for e in table.range(start.as_slice()..end.as_slice())? {
            let (k, _) = e?;
            if let Ok(h) = <[u8; 16]>::try_from(&k.value()[start.len()..]) {
                out.insert(h);
            }
        }
        Ok(out)
    }

    /// Puts an E.164 number on a tenant's blocklist.
    pub fn blocklist_add(&self, tenant: &str, e164: &str, source: &str, now: i64) -> Result<()> {
        let keys = self.keys.tenant(tenant);
        let key = tenant_key(tenant, &keys.phone_hash(e164));
        let entry = BlockEntry {
            added_at: now,
            source: source.to_string(),
        };
        let tx = self.write(Durability::Immediate)?;
        let sealed = keys.seal("blocklist", &key, &encode(&entry));
        tx.open_table(BLOCKLIST)?.insert(key.as_slice(), sealed.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    /// Puts many numbers on a tenant's blocklist in one transaction; returns how many were new.
    pub fn blocklist_add_all(&self, tenant: &str, numbers: &[String], source: &str, now: i64) -> Result<usize> {
        let keys = self.keys.tenant(tenant);
        let entry = encode(&BlockEntry {
            added_at: now,
            source: source.to_string(),
        });
        // Sealed inside the transaction, so a key rotation cannot come in between (see `reseal`).
        let tx = self.write(Durability::Immediate)?;
        let mut rows: Vec<(Vec<u8>, Vec<u8>)> = numbers
            .iter()
            .map(|n| {
                let key = tenant_key(tenant, &keys.phone_hash(n));
                let sealed = keys.seal("blocklist", &key, &entry);
                (key, sealed)
            })
            .collect();
        rows.sort();
        rows.dedup_by(|a, b| a.0 == b.0);
        let mut added = 0;
        {
            let mut table = tx.open_table(BLOCKLIST)?;
            for (key, sealed) in &rows {
                if table.get(key.as_slice())?.is_none() {
                    table.insert(key.as_slice(), sealed.as_slice())?;
                    added += 1;
                }
            }
        }
        tx.commit()?;
        Ok(added)
    }

    /// For each (tenant, E.164 number), whether the number is on the tenant's blocklist or the
    /// global one; one read transaction, no hashing at all while no blocklist has an entry.
    pub fn blocked_among(&self, targets: &[(&str, &str)]) -> Result<Vec<bool>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(BLOCKLIST)?;
        if table.is_empty()? {
            return Ok(vec![false; targets.len()]);
        }
        let (start, end) = tenant_range(GLOBAL_LIST);
        let global = table
            .range(start.as_slice()..end.as_slice())?
            .next()
            .is_some()
            .then(|| self.keys.tenant(GLOBAL_LIST));
        let mut keys: HashMap<&str, Arc<TenantKeys>> = HashMap::new();
        let mut out = Vec::with_capacity(targets.len());
        for (tenant, phone) in targets {
            if phone.is_empty() {
                out.push(false);
                continue;
            }
            let k = keys.entry(tenant).or_insert_with(|| self.keys.tenant(tenant));
            let mut blocked = table
                .get(tenant_key(tenant, &k.phone_hash(phone)).as_slice())?
                .is_some();
            if let (false, Some(g)) = (blocked, &global) {
                blocked = table
                    .get(tenant_key(GLOBAL_LIST, &g.phone_hash(phone)).as_slice())?
                    .is_some();
            }
            out.push(blocked);
        }
        Ok(out)
    }

    /// Takes an E.164 number off a tenant's blocklist. Returns whether it was there.
    pub fn blocklist_remove(&self, tenant: &str, e164: &str) -> Result<bool> {
        let keys = self.keys.tenant(tenant);
        let key = tenant_key(tenant, &keys.phone_hash(e164));
        let tx = self.write(Durability::Immediate)?;
        let removed = tx.open_table(BLOCKLIST)?.remove(key.as_slice())?.is_some();
        tx.commit()?;
        Ok(removed)
    }

    /// The blocklist entry of an E.164 number, if it is on the tenant's (or global) list.
    pub fn blocklist_entry(&self, tenant: &str, e164: &str) -> Result<Option<BlockEntry>> {
        let keys = self.keys.tenant(tenant);
        let key = tenant_key(tenant, &keys.phone_hash(e164));
        let tx = self.db.begin_read()?;
        match tx.open_table(BLOCKLIST)?.get(key.as_slice())? {
            Some(v) => Ok(Some(open_record(&keys, "blocklist", &key, v.value())?)),
            None => Ok(None),
        }
    }

    /// A tenant's blocklist entries: (keyed hash of the number, entry). The numbers themselves
    /// are not stored.
    pub fn blocklist_entries(&self, tenant: &str) -> Result<Vec<([u8; 16], BlockEntry)>> {
        let keys = self.keys.tenant(tenant);
        let (start, end) = tenant_range(tenant);
        let tx = self.db.begin_read()?;
        let table = tx.open_table(BLOCKLIST)?;
        let mut out = Vec::new();
        for e in table.range(start.as_slice()..end.as_slice())? {
            let (k, v) = e?;
            let key = k.value();
            if let Ok(h) = <[u8; 16]>::try_from(&key[start.len()..]) {
                out.push((h, open_record(&keys, "blocklist", key, v.value())?));
            }
        }
        Ok(out)
    }

    // ---- dispatch and reports ----------------------------------------------------------

    /// The messages of one chunk of a batch.
    pub fn load_chunk(&self, tenant: &str, batch: u64, chunk: u32) -> Result<Vec<Message>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(CHUNKS)?;
        match table.get((batch, chunk))? {
            Some(v) => open_record(&self.keys.tenant(tenant), "chunks", &chunk_key(batch, chunk), v.value()),
            None => Ok(Vec::new()),
        }
    }

    /// Statuses recorded for message indexes `from..to` of a batch, by index.
    pub fn statuses(&self, batch: &BatchRecord, from: u64, to: u64) -> Result<HashMap<u64, StatusRecord>> {
        let keys = self.keys.tenant(&batch.tenant);
        let tx = self.db.begin_read()?;
        let table = tx.open_table(STATUSES)?;
        let mut out = HashMap::new();
        for e in table.range(message_id(batch.id, from)..message_id(batch.id, to))? {
            let (k, v) = e?;
            let id = k.value();
            out.insert(split_message_id(id).1, open_status(&keys, id, v.value())?);
        }
        Ok(out)
    }

    /// Which of these messages have a status on record.
    pub fn recorded(&self, ids: &[u64]) -> Result<HashSet<u64>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(STATUSES)?;
        let mut out = HashSet::new();
        for id in ids {
            if table.get(*id)?.is_some() {
                out.insert(*id);
            }
        }
        Ok(out)
    }

    /// Scheduled messages due at `now` or before, oldest first.
    pub fn due_scheduled(&self, now: i64, limit: usize) -> Result<Vec<(i64, u64)>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SCHEDULED)?;
        let mut out = Vec::new();
        for e in table.range((0, 0)..=(now.max(0) as u64, u64::MAX))?.take(limit) {
            let (due, id) = e?.0.value();
            out.push((due as i64, id));
        }
        Ok(out)
    }

    /// When the next scheduled message is due.
    pub fn next_scheduled(&self) -> Result<Option<i64>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SCHEDULED)?;
        Ok(table.first()?.map(|(k, _)| k.value().0 as i64))
    }

    /// Applies dispatcher steps from the dispatch log (`wal`) in one durable transaction, in
    /// order, and records the last one's number. Steps at or below the recorded number were
    /// applied before and are skipped, so a step is never applied twice.
    pub fn apply_logged(&self, steps: &[(u64, DispatchCommit)], now: i64) -> Result<DispatchDone> {
        let applied = self.mark(Mark::WalApplied)?.unwrap_or(0);
        let fresh: Vec<&(u64, DispatchCommit)> = steps.iter().filter(|(seq, _)| *seq > applied).collect();
        let Some(last) = fresh.last().map(|(seq, _)| *seq) else {
            return Ok(DispatchDone::default());
        };
        let steps: Vec<&DispatchCommit> = fresh.into_iter().map(|(_, s)| s).collect();
        self.apply_steps(&steps, last, now)
    }

    fn apply_steps(&self, steps: &[&DispatchCommit], logged: u64, now: i64) -> Result<DispatchDone> {
        let mut tx = self.write(Durability::Immediate)?;
        // The dispatcher commits often: saving the allocator state with each commit (quick
        // repair) costs about 40% of a small one. A crash after one of these makes the next
        // open run a full repair instead, a fraction of a second per million records.
        tx.set_quick_repair(false);
        let mut touched: HashMap<u64, BatchRecord> = HashMap::new();
        let mut mos = Vec::new();
        {
            let mut tables = StepTables::open(&tx)?;
            let folds = receipts::Folds::of(steps, &self.settled_forms());
            for (partner, form) in &folds.votes {
                self.vote(&mut tables, partner, *form)?;
            }
            self.purge_early(&mut tables, now)?;
            for (i, step) in steps.iter().enumerate() {
                self.apply_step(&tx, &mut tables, &mut touched, (i, step), &folds, now)?;
                self.record_sent(&tx, &step.sent)?;
                for mo in &step.mos {
                    mos.push(self.keep_mo(&tx, mo, now)?);
                }
            }
        }
        tx.open_table(META)?.insert(Mark::WalApplied.key().as_ref(), logged)?;
        let finished = self.put_touched(&tx, touched, now)?;
        tx.commit()?;
        Ok(DispatchDone { finished, mos })
    }

    /// The statuses, receipts and schedule of one step (who was sent what and the incoming
    /// messages follow in `apply_steps`).
    fn apply_step(
        &self,
        tx: &WriteTransaction,
        tables: &mut StepTables<'_>,
        touched: &mut HashMap<u64, BatchRecord>,
        (index, step): (usize, &DispatchCommit),
        folds: &receipts::Folds<'_>,
        now: i64,
    ) -> Result<()> {
        for (batch, cursor) in &step.cursors {
            if let std::collections::hash_map::Entry::Vacant(e) = touched.entry(*batch) {
                match self.batch_in(tx, *batch) {
                    Ok(b) => {
                        e.insert(b);
                    }
                    Err(StoreError::NoBatch(_)) => continue,
                    Err(err) => return Err(err),
                }
            }
            if let Some(b) = touched.get_mut(batch) {
                b.cursor = b.cursor.max(*cursor);
            }
        }
        for (o, (id, status)) in step.outcomes.iter().enumerate() {
            let mut status = status.clone();
            if let Some(settled) = folds
                .receipt_for(index, o)
                .and_then(|r| receipts::receipted(&status, r, now))
            {
                status = settled;
            } else if status.status == MessageStatus::Submitted && !status.partner_id.is_empty() {
                // A receipt that came before its submit_sm_resp is waiting for this id.
                if let Some(early) = self.index_submitted(tables, *id, &status)? {
                    status = early;
                }
            }
            self.set_status_in(tx, &mut tables.statuses, touched, *id, &status)?;
        }
        for (r, (partner, receipt)) in step.receipts.iter().enumerate() {
            if !folds.settled(index, r) {
                self.apply_receipt(tx, tables, touched, partner, receipt, now)?;
            }
        }
        for (due, id) in &step.schedule {
            // A batch canceled after the dispatcher set this message aside (a `send_at` ahead,
            // a retry), but before the step was applied: the cancel did not see it in the
            // scheduled table, so it is canceled here.
            if self.canceled(tx, touched, *id)? {
                let mut status = StatusRecord::queued();
                status.status = MessageStatus::Canceled;
                status.done_at = Some(now);
                status.error = "canceled by operator".into();
                self.set_status_in(tx, &mut tables.statuses, touched, *id, &status)?;
                continue;
            }
            tables.scheduled.insert(((*due).max(0) as u64, *id), ())?;
        }
        for (due, id) in &step.unschedule {
            tables.scheduled.remove(((*due).max(0) as u64, *id))?;
        }
        Ok(())
    }

    /// Whether the batch of message `id` was canceled (its record joins `touched`).
    fn canceled(&self, tx: &WriteTransaction, touched: &mut HashMap<u64, BatchRecord>, id: u64) -> Result<bool> {
        let (batch_id, _) = split_message_id(id);
        Ok(self
            .touch(tx, touched, batch_id)?
            .is_some_and(|b| b.canceled_from.is_some()))
    }

    /// The record of batch `batch_id` in `touched`, read in first; `None` if there is none.
    fn touch<'t>(
        &self,
        tx: &WriteTransaction,
        touched: &'t mut HashMap<u64, BatchRecord>,
        batch_id: u64,
    ) -> Result<Option<&'t mut BatchRecord>> {
        if let std::collections::hash_map::Entry::Vacant(e) = touched.entry(batch_id) {
            match self.batch_in(tx, batch_id) {
                Ok(b) => {
                    e.insert(b);
                }
                Err(StoreError::NoBatch(_)) => return Ok(None),
                Err(err) => return Err(err),
            }
        }
        Ok(touched.get_mut(&batch_id))
    }

    /// The status record of a message, if one was written.
    pub(crate) fn status_in(&self, tx: &WriteTransaction, tenant: &str, id: u64) -> Result<Option<StatusRecord>> {
        Self::status_of(&tx.open_table(STATUSES)?, &self.keys.tenant(tenant), id)
    }

    fn status_of(
        statuses: &impl ReadableTable<u64, &'static [u8]>,
        keys: &TenantKeys,
        id: u64,
    ) -> Result<Option<StatusRecord>> {
        match statuses.get(id)? {
            Some(v) => Ok(Some(open_status(keys, id, v.value())?)),
            None => Ok(None),
        }
    }

    /// Records a message's new status and moves its batch's counts. A final status never
    /// changes, except an implicit `canceled` for a message that was already with a partner when
    /// the batch was canceled: its outcome is the truth. `touched` collects the batches changed.
    pub(crate) fn set_status(
        &self,
        tx: &WriteTransaction,
        touched: &mut HashMap<u64, BatchRecord>,
        id: u64,
        status: &StatusRecord,
    ) -> Result<bool> {
        self.set_status_in(tx, &mut tx.open_table(STATUSES)?, touched, id, status)
    }

    /// [`Store::set_status`] with the statuses table already open.
    fn set_status_in(
        &self,
        tx: &WriteTransaction,
        statuses: &mut redb::Table<'_, u64, &'static [u8]>,
        touched: &mut HashMap<u64, BatchRecord>,
        id: u64,
        status: &StatusRecord,
    ) -> Result<bool> {
        let (batch_id, index) = split_message_id(id);
        let Some(batch) = self.touch(tx, touched, batch_id)? else {
            return Ok(false);
        };
        let (previous, recorded) = match statuses.get(id)? {
            Some(v) => (status_code(id, v.value())?, true),
            None => (batch.implicit_status(index), false),
        };
        if previous.is_final() && recorded {
            return Ok(false);
        }
        batch.counts[previous as usize] = batch.counts[previous as usize].saturating_sub(1);
        batch.counts[status.status as usize] += 1;
        let sealed = seal_status(&self.keys.tenant(&batch.tenant), id, status);
        statuses.insert(id, sealed.as_slice())?;
        Ok(true)
    }

    /// Writes the touched batches back; those now finished leave the active set and are returned.
    pub(crate) fn put_touched(
        &self,
        tx: &WriteTransaction,
        mut touched: HashMap<u64, BatchRecord>,
        now: i64,
    ) -> Result<Vec<BatchRecord>> {
        let mut done = Vec::new();
        let mut active = tx.open_table(ACTIVE)?;
        for batch in touched.values_mut() {
            batch.updated_at = now;
            if batch.state == BatchState::Queued && batch.finished() >= batch.accepted {
                batch.state = BatchState::Done;
                active.remove(batch.id)?;
                done.push(batch.clone());
            }
            Self::put_batch(tx, &self.keys.tenant(&batch.tenant), batch)?;
        }
        Ok(done)
    }

    /// Closes the batches that only wait for receipts that did not come: every message final or
    /// `submitted`, and no change to the batch for `timeout` (so every submitted message was
    /// submitted at least that long ago). They become `Done`, their messages stay `submitted`,
    /// and they are returned for their final report. Writes only when there is one to close.
    pub fn close_unanswered(&self, now: i64, timeout: i64) -> Result<Vec<BatchRecord>> {
        let waiting = |b: &BatchRecord| {
            b.state == BatchState::Queued
                && b.count(MessageStatus::Queued) == 0
                && b.count(MessageStatus::Held) == 0
                && b.count(MessageStatus::Submitted) > 0
                && b.finished() + b.count(MessageStatus::Submitted) >= b.accepted
                && b.updated_at + timeout <= now
        };
        let stale: Vec<u64> = self
            .active_batches()?
            .iter()
            .filter(|b| waiting(b))
            .map(|b| b.id)
            .collect();
        if stale.is_empty() {
            return Ok(Vec::new());
        }
        let tx = self.write(Durability::Immediate)?;
        let mut closed = Vec::new();
        for id in stale {
            let mut batch = self.batch_in(&tx, id)?;
            if !waiting(&batch) {
                continue; // a receipt came in between
            }
            batch.state = BatchState::Done;
            batch.updated_at = now;
            tx.open_table(ACTIVE)?.remove(id)?;
            Self::put_batch(&tx, &self.keys.tenant(&batch.tenant), &batch)?;
            closed.push(batch);
        }
        tx.commit()?;
        Ok(closed)
    }

    /// Seconds from submission to delivery of every delivered message of a batch.
    pub fn delivery_seconds(&self, batch: &BatchRecord) -> Result<Vec<u32>> {
        let keys = self.keys.tenant(&batch.tenant);
        let tx = self.db.begin_read()?;
        let table = tx.open_table(STATUSES)?;
        let mut out = Vec::new();
        for e in table.range(message_id(batch.id, 0)..message_id(batch.id + 1, 0))? {
            let (k, v) = e?;
            let rec = open_status(&keys, k.value(), v.value())?;
            if let (MessageStatus::Delivered, Some(sent), Some(done)) = (rec.status, rec.submitted_at, rec.done_at) {
                out.push(u32::try_from(done - sent).unwrap_or(0));
            }
        }
        Ok(out)
    }

    /// The database file's size and the bytes of it in use: pages freed by deletions are
    /// reused by later writes, the file itself does not shrink. Walks the trees under the write
    /// lock (a few milliseconds per 100 MiB): for `status`, not for hot paths.
    pub fn space(&self, state_dir: &Path) -> Result<(u64, u64)> {
        let file = std::fs::metadata(state_dir.join(crate::paths::DB_FILE))
            .map(|m| m.len())
            .unwrap_or(0);
        let tx = self.db.begin_write()?;
        let stats = tx.stats()?;
        let used = stats.allocated_pages() * stats.page_size() as u64;
        tx.abort()?;
        Ok((file, used))
    }

    /// A counter or mark (not personal data: times, ids, totals).
    pub fn mark(&self, mark: Mark<'_>) -> Result<Option<u64>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(META)?;
        Ok(table.get(mark.key().as_ref())?.map(|v| v.value()))
    }

    pub fn set_mark(&self, mark: Mark<'_>, value: u64) -> Result<()> {
        let tx = self.write(Durability::Immediate)?;
        tx.open_table(META)?.insert(mark.key().as_ref(), value)?;
        tx.commit()?;
        Ok(())
    }

    /// Records that a batch's last report has been written.
    pub fn mark_report_final(&self, batch_id: u64) -> Result<()> {
        let tx = self.write(Durability::Immediate)?;
        let mut batch = self.batch_in(&tx, batch_id)?;
        batch.report_final = true;
        Self::put_batch(&tx, &self.keys.tenant(&batch.tenant), &batch)?;
        tx.commit()?;
        Ok(())
    }
}

/// Takes the next id of a sequence kept in `meta` (ids start at 1).
fn next_id(meta: &mut redb::Table<&str, u64>, mark: Mark<'_>) -> Result<u64> {
    let name = mark.key();
    let next = meta.get(name.as_ref())?.map(|v| v.value()).unwrap_or(1);
    meta.insert(name.as_ref(), next + 1)?;
    Ok(next)
}
