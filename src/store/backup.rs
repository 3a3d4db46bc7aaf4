//! Backups (docs/cli.md): a consistent, encrypted, checksummed snapshot of the whole store, taken
//! while `serve` runs, and its restore into an empty `state_dir`.
//!
//! A snapshot is one redb read transaction: it sees the store as of one commit and does not
//! hold back writers (ingest and dispatch go on; redb keeps the pages it reads until it ends).
//! Every table is written as it is: records stay sealed under their tenant's key, and the
//! frames around them are sealed again, so keys, counts and the shape of the data are not
//! readable either.
//!
//! Format: `MAGIC ‖ master key version (1 byte) ‖ backup id (16 random bytes) ‖ frames`; a
//! frame is `length (u32 LE) ‖ kind (1 byte) ‖ sealed postcard [`Frame`]`, sealed with keys
//! derived from that master key version, bound to the backup id, the frame's number and its
//! kind: a frame moved, dropped, reordered or taken from another
//! backup does not open. The last frame (kind [`KIND_END`]) counts the frames and entries and
//! carries the BLAKE3 hash of every frame before it; a file without it is cut short.
//!
//! The tenant key store (`state_dir/keys`, sealed under the master key) goes along: restored
//! with the store, it opens the records again. Retiring the master key version a backup was
//! taken under (`key retire`) makes it unreadable.
//!
//! Not in a backup: dispatcher steps still in the dispatch log (a restored queue may send those
//! messages again: at least once), files in the spool (never acknowledged; their uploads were
//! not closed successfully), the master key (kept apart, as it must be to open anything).

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use redb::{
    Database, Key, ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle, Value,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

use super::{Result, Store, StoreError};
use crate::crypto::TenantKeys;

/// First bytes of every backup file.
pub const MAGIC: &[u8; 16] = b"SMSDROP BACKUP 1";
const ID_LEN: usize = 16;
/// Magic, master key version, backup id.
pub const HEAD_LEN: usize = 16 + 1 + ID_LEN;
/// The name the tenant key store goes under in a backup.
pub const KEY_STORE: &str = "tenant_keys";
pub const KIND_DATA: u8 = 0;
pub const KIND_END: u8 = 1;
/// Sent instead of the end frame when a backup taken through the admin socket fails.
pub const KIND_ERROR: u8 = 2;
/// Largest frame accepted when reading; frames are written at about [`FRAME_BYTES`].
pub const MAX_FRAME: usize = 16 << 20;
const FRAME_BYTES: usize = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
enum Frame {
    /// The first frame: when and by which version.
    Header { created_at: i64, version: String },
    /// Entries of one table: (key bytes, value bytes) as redb stores them.
    Entries {
        table: String,
        entries: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// A file kept beside the database (the SFTP host key): its name and bytes.
    File { name: String, bytes: Vec<u8> },
    /// The last frame.
    End {
        frames: u64,
        entries: u64,
        checksum: [u8; 32],
    },
}

/// What a backup holds (or a restore gave back).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupSummary {
    pub created_at: i64,
    pub entries: u64,
    pub frames: u64,
    pub bytes: u64,
    pub batches: u64,
    pub files: Vec<String>,
}

/// Why a backup could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Io(io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "not an smsdrop backup (its first bytes are not `{}`)",
        String::from_utf8_lossy(MAGIC)
    )]
    NotABackup,
    #[error("the backup is cut short at frame {0}: it has no end frame")]
    Truncated(u64),
    #[error("sealed under master key version {0}, which the key file does not hold (retired, or another key)")]
    NoMasterVersion(u8),
    #[error("frame {0} does not open: changed, moved, or sealed under another master key")]
    Forged(u64),
    #[error("frame {0} is damaged: {1}")]
    Damaged(u64, String),
    #[error("the backup failed while it was taken: {0}")]
    Failed(String),
    #[error("{0} is not empty: restore only into an empty state_dir")]
    NotEmpty(PathBuf),
    #[error("the backup holds no tenant key store: its records could not be opened")]
    NoKeyStore,
}

impl From<io::Error> for BackupError {
    fn from(e: io::Error) -> Self {
        BackupError::Io(e)
    }
}

/// Something done with every table of the store, each with its own key and value types.
trait EachTable {
    fn table<K: Key + 'static, V: Value + 'static>(&mut self, def: TableDefinition<'static, K, V>) -> Result<()>;
}

/// Every table of the store: a table missing here is missing from backups (the test of a
/// restore compares every table).
fn each_table(v: &mut impl EachTable) -> Result<()> {
    use super::*;
    v.table(META)?;
    v.table(BATCHES)?;
    v.table(ACTIVE)?;
    v.table(REPLY_STEMS)?;
    v.table(CHUNKS)?;
    v.table(STATUSES)?;
    v.table(SCHEDULED)?;
    v.table(SEEN_FILES)?;
    v.table(BLOCKLIST)?;
    v.table(CLAIMS)?;
    v.table(DAILY)?;
    v.table(mail::MAIL)?;
    v.table(mail::DIGESTS)?;
    v.table(traffic::COUNTRIES)?;
    v.table(traffic::HOURLY)?;
    v.table(bans::BANS)?;
    v.table(audit::AUDIT)?;
    v.table(audit::AUDIT_HEAD)?;
    v.table(receipts::RECEIPT_IDS)?;
    v.table(receipts::EARLY)?;
    v.table(receipts::RECEIPT_FORMS)?;
    v.table(replies::LAST_SENT)?;
    v.table(replies::REPLIES)?;
    v.table(retention::ANONYMIZED)?;
    Ok(())
}

fn frame_key(id: &[u8; ID_LEN], index: u64, kind: u8) -> Vec<u8> {
    let mut key = Vec::with_capacity(ID_LEN + 9);
    key.extend_from_slice(id);
    key.extend_from_slice(&index.to_be_bytes());
    key.push(kind);
    key
}

/// Writes frames to `out`.
struct FrameWriter<'a, W: Write> {
    out: W,
    keys: &'a TenantKeys,
    id: [u8; ID_LEN],
    index: u64,
    hasher: blake3::Hasher,
    summary: BackupSummary,
    /// The table being written and its entries so far.
    table: String,
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    pending: usize,
}

impl<W: Write> FrameWriter<'_, W> {
    fn frame(&mut self, kind: u8, frame: &Frame) -> io::Result<()> {
        let plain = super::encode(frame);
        if kind == KIND_DATA {
            self.hasher.update(&plain);
        }
        let sealed = self.keys.seal("backup", &frame_key(&self.id, self.index, kind), &plain);
        self.out.write_all(&(sealed.len() as u32).to_le_bytes())?;
        self.out.write_all(&[kind])?;
        self.out.write_all(&sealed)?;
        self.index += 1;
        self.summary.frames += 1;
        self.summary.bytes += 5 + sealed.len() as u64;
        Ok(())
    }

    fn flush_entries(&mut self) -> io::Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let frame = Frame::Entries {
            table: self.table.clone(),
            entries: std::mem::take(&mut self.entries),
        };
        self.pending = 0;
        self.frame(KIND_DATA, &frame)
    }
}

struct Dump<'a, 'w, W: Write> {
    tx: &'a ReadTransaction,
    writer: &'a mut FrameWriter<'w, W>,
}

impl<W: Write> EachTable for Dump<'_, '_, W> {
    fn table<K: Key + 'static, V: Value + 'static>(&mut self, def: TableDefinition<'static, K, V>) -> Result<()> {
        let table = self.tx.open_table(def)?;
        self.writer.table = def.name().to_string();
        for e in table.iter()? {
            let (k, v) = e?;
            let key = K::as_bytes(&k.value()).as_ref().to_vec();
            let value = V::as_bytes(&v.value()).as_ref().to_vec();
            self.writer.pending += key.len() + value.len() + 8;
            self.writer.entries.push((key, value));
            self.writer.summary.entries += 1;
            if self.writer.pending >= FRAME_BYTES {
                self.writer.flush_entries().map_err(io_err)?;
            }
        }
        if def.name() == "batches" {
            self.writer.summary.batches = table.len()?;
        }
        self.writer.flush_entries().map_err(io_err)?;
        Ok(())
    }
}

fn io_err(e: io::Error) -> StoreError {
    StoreError::Database(redb::Error::Io(e))
}

impl Store {
    /// Writes a snapshot of the whole store, and of the files named in `files` (name, path;
    /// those missing are skipped), to `out`.
    pub fn backup(&self, out: impl Write, files: &[(&str, &Path)], now: i64) -> Result<BackupSummary> {
        let mut id = [0u8; ID_LEN];
        getrandom::fill(&mut id).map_err(|e| io_err(io::Error::other(e.to_string())))?;
        let Some((version, keys)) = self.keys.backup(None) else {
            return Err(io_err(io::Error::other("no master key version")));
        };
        let mut out = io::BufWriter::with_capacity(1 << 20, out);
        out.write_all(MAGIC).map_err(io_err)?;
        out.write_all(&[version]).map_err(io_err)?;
        out.write_all(&id).map_err(io_err)?;
        let mut writer = FrameWriter {
            out,
            keys: &keys,
            id,
            index: 0,
            hasher: blake3::Hasher::new(),
            summary: BackupSummary {
                created_at: now,
                bytes: HEAD_LEN as u64,
                ..BackupSummary::default()
            },
            table: String::new(),
            entries: Vec::new(),
            pending: 0,
        };
        writer
            .frame(
                KIND_DATA,
                &Frame::Header {
                    created_at: now,
                    version: env!("CARGO_PKG_VERSION").to_string(),
                },
            )
            .map_err(io_err)?;
        {
            let tx = self.db.begin_read()?;
            each_table(&mut Dump {
                tx: &tx,
                writer: &mut writer,
            })?;
        }
        let key_store = self.key_store_path();
        let files: Vec<(&str, &Path)> = std::iter::once((KEY_STORE, key_store.as_path()))
            .chain(files.iter().copied())
            .collect();
        for (name, path) in &files {
            match std::fs::read(path) {
                Ok(bytes) => {
                    let frame = Frame::File {
                        name: name.to_string(),
                        bytes,
                    };
                    writer.frame(KIND_DATA, &frame).map_err(io_err)?;
                    if *name != KEY_STORE {
                        writer.summary.files.push(name.to_string());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        let end = Frame::End {
            frames: writer.index,
            entries: writer.summary.entries,
            checksum: *writer.hasher.finalize().as_bytes(),
        };
        writer.frame(KIND_END, &end).map_err(io_err)?;
        writer.out.flush().map_err(io_err)?;
        Ok(writer.summary)
    }

    /// Writes a backup to `path`, whole or not at all: into `path.partial` first, synced, then
    /// linked to `path` (an existing file is never overwritten).
    pub fn backup_to_file(&self, path: &Path, files: &[(&str, &Path)], now: i64) -> Result<BackupSummary> {
        let partial = partial_path(path);
        if path.exists() {
            return Err(io_err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists: a backup never overwrites a file", path.display()),
            )));
        }
        let file = create_partial(&partial).map_err(io_err)?;
        let result = self.backup(&file, files, now).and_then(|summary| {
            file.sync_all().map_err(io_err)?;
            publish(&partial, path).map_err(io_err)?;
            Ok(summary)
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result
    }
}

/// `path` with `.partial` added: where a backup is written until it is whole.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    path.with_file_name(name)
}

/// Opens (afresh) the `.partial` file a backup is written into, mode 0600.
pub fn create_partial(partial: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(partial)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", partial.display())))
}

/// Gives a finished `partial` its name (never replacing a file) and syncs the folder.
pub fn publish(partial: &Path, path: &Path) -> io::Result<()> {
    std::fs::hard_link(partial, path)?;
    std::fs::remove_file(partial)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Reads a backup's frames, checking each one.
pub struct BackupReader<R: Read> {
    input: R,
    keys: std::sync::Arc<TenantKeys>,
    id: [u8; ID_LEN],
    /// The master key version the backup is sealed under.
    pub version: u8,
    index: u64,
    hasher: blake3::Hasher,
    done: bool,
}

impl<R: Read> BackupReader<R> {
    pub fn new(mut input: R, keys: &crate::crypto::Keyring) -> std::result::Result<Self, BackupError> {
        let mut head = [0u8; HEAD_LEN];
        input.read_exact(&mut head).map_err(|_| BackupError::NotABackup)?;
        if &head[..16] != MAGIC {
            return Err(BackupError::NotABackup);
        }
        let version = head[16];
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&head[17..]);
        let (_, frame_keys) = keys
            .backup(Some(version))
            .ok_or(BackupError::NoMasterVersion(version))?;
        Ok(BackupReader {
            input,
            keys: frame_keys,
            id,
            version,
            index: 0,
            hasher: blake3::Hasher::new(),
            done: false,
        })
    }

    /// The next data frame; `None` after a good end frame.
    fn next(&mut self) -> std::result::Result<Option<Frame>, BackupError> {
        if self.done {
            return Ok(None);
        }
        let (kind, sealed) = match read_frame(&mut self.input) {
            Ok(Some(f)) => f,
            Ok(None) | Err(BackupError::Truncated(_)) => return Err(BackupError::Truncated(self.index)),
            Err(e) => return Err(e),
        };
        let index = self.index;
        if kind == KIND_ERROR {
            return Err(BackupError::Failed(String::from_utf8_lossy(&sealed).into_owned()));
        }
        let plain = self
            .keys
            .open("backup", &frame_key(&self.id, index, kind), &sealed)
            .map_err(|_| BackupError::Forged(index))?;
        let frame: Frame = postcard::from_bytes(&plain).map_err(|e| BackupError::Damaged(index, e.to_string()))?;
        self.index += 1;
        match (kind, frame) {
            (KIND_END, Frame::End { frames, checksum, .. }) => {
                if frames != index || checksum != *self.hasher.finalize().as_bytes() {
                    return Err(BackupError::Damaged(
                        index,
                        "the end frame does not match the frames before it".into(),
                    ));
                }
                let mut rest = [0u8; 1];
                if self.input.read(&mut rest)? != 0 {
                    return Err(BackupError::Damaged(index, "bytes after the end frame".into()));
                }
                self.done = true;
                Ok(None)
            }
            (KIND_DATA, Frame::End { .. }) | (KIND_END, _) => Err(BackupError::Damaged(
                index,
                "frame kind does not match its content".into(),
            )),
            (_, frame) => {
                self.hasher.update(&plain);
                Ok(Some(frame))
            }
        }
    }
}

/// Reads a whole backup without restoring it: the number of data frames, or why it is refused
/// (not a backup, cut short, changed, forged, bytes after its end).
pub fn verify(input: impl Read, keys: &crate::crypto::Keyring) -> std::result::Result<u64, BackupError> {
    let mut reader = BackupReader::new(input, keys)?;
    let mut frames = 0;
    while reader.next()?.is_some() {
        frames += 1;
    }
    Ok(frames)
}

/// One raw frame: (kind, sealed bytes); `None` at a clean end of input.
pub fn read_frame(input: &mut impl Read) -> std::result::Result<Option<(u8, Vec<u8>)>, BackupError> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match input.read(&mut head[got..])? {
            0 if got == 0 => return Ok(None),
            0 => return Err(BackupError::Truncated(0)),
            n => got += n,
        }
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len > MAX_FRAME {
        return Err(BackupError::Damaged(
            0,
            format!("a frame of {len} bytes (at most {MAX_FRAME})"),
        ));
    }
    let mut sealed = vec![0u8; len];
    input.read_exact(&mut sealed).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => BackupError::Truncated(0),
        _ => BackupError::Io(e),
    })?;
    Ok(Some((head[4], sealed)))
}

/// Writes a raw frame as read by [`read_frame`].
pub fn write_frame(out: &mut impl Write, kind: u8, bytes: &[u8]) -> io::Result<()> {
    out.write_all(&(bytes.len() as u32).to_le_bytes())?;
    out.write_all(&[kind])?;
    out.write_all(bytes)
}

struct Load<'a> {
    tx: &'a WriteTransaction,
    table: &'a str,
    entries: &'a [(Vec<u8>, Vec<u8>)],
    found: bool,
}

/// Whether `bytes` can stand for a value of type `T` (redb's decoders trust their input).
fn fits<T: Value>(bytes: &[u8]) -> bool {
    match T::fixed_width() {
        Some(w) => bytes.len() == w,
        None => T::type_name().name() != <&str as Value>::type_name().name() || std::str::from_utf8(bytes).is_ok(),
    }
}

impl EachTable for Load<'_> {
    fn table<K: Key + 'static, V: Value + 'static>(&mut self, def: TableDefinition<'static, K, V>) -> Result<()> {
        if self.found || def.name() != self.table {
            return Ok(());
        }
        self.found = true;
        let mut table = self.tx.open_table(def)?;
        for (k, v) in self.entries {
            if !fits::<K>(k) || !fits::<V>(v) {
                return Err(io_err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("an entry of table {} has the wrong size", self.table),
                )));
            }
            table.insert(K::from_bytes(k), V::from_bytes(v))?;
        }
        Ok(())
    }
}

/// Restores the backup read from `input` into `state_dir`, which must hold no database: into
/// a new database file beside it first, renamed into place once the end frame checked out.
/// Files the backup carries are written where `files` says (name → path) unless one is there.
pub fn restore(
    input: impl Read,
    state_dir: &Path,
    keys: std::sync::Arc<crate::crypto::Keyring>,
    files: &[(&str, &Path)],
) -> std::result::Result<BackupSummary, BackupError> {
    let target = state_dir.join(crate::paths::DB_FILE);
    if target.exists()
        || crate::paths::WAL_FILES.iter().any(|f| state_dir.join(f).exists())
        || state_dir.join(crate::paths::KEY_STORE_FILE).exists()
    {
        return Err(BackupError::NotEmpty(state_dir.to_path_buf()));
    }
    std::fs::create_dir_all(state_dir)?;
    let partial = partial_path(&target);
    let _ = std::fs::remove_file(&partial);
    let result = restore_into(input, &partial, keys, files);
    match result {
        Ok(summary) => {
            std::fs::rename(&partial, &target)?;
            std::fs::File::open(state_dir)?.sync_all()?;
            Ok(summary)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

fn restore_into(
    input: impl Read,
    path: &Path,
    keys: std::sync::Arc<crate::crypto::Keyring>,
    files: &[(&str, &Path)],
) -> std::result::Result<BackupSummary, BackupError> {
    let mut reader = BackupReader::new(io::BufReader::with_capacity(1 << 20, input), &keys)?;
    let db = Database::builder().create(path).map_err(StoreError::from)?;
    let store = Store::with_database(db, path, keys.clone(), path.parent().unwrap_or(Path::new(".")))?;
    let mut summary = BackupSummary::default();
    let mut kept_files = Vec::new();
    while let Some(frame) = reader.next()? {
        summary.frames += 1;
        match frame {
            Frame::Header { created_at, .. } => summary.created_at = created_at,
            Frame::Entries { table, entries } => {
                // One transaction per frame, not synced: the file is not the store until the
                // end, when one synced commit makes all of it durable.
                let tx = store.write(redb::Durability::None)?;
                let mut load = Load {
                    tx: &tx,
                    table: &table,
                    entries: &entries,
                    found: false,
                };
                each_table(&mut load)?;
                if !load.found {
                    return Err(BackupError::Damaged(
                        reader.index - 1,
                        format!("unknown table `{table}`"),
                    ));
                }
                tx.commit().map_err(StoreError::from)?;
                summary.entries += entries.len() as u64;
                if table == "batches" {
                    summary.batches += entries.len() as u64;
                }
            }
            Frame::File { name, bytes } => kept_files.push((name, bytes)),
            Frame::End { .. } => {}
        }
    }
    summary.frames += 1;
    store
        .write(redb::Durability::Immediate)?
        .commit()
        .map_err(StoreError::from)?;
    drop(store);
    let key_store = path.with_file_name(crate::paths::KEY_STORE_FILE);
    let Some((_, bytes)) = kept_files.iter().find(|(n, _)| n == KEY_STORE) else {
        return Err(BackupError::NoKeyStore);
    };
    write_private(&key_store, bytes)?;
    for (name, bytes) in kept_files {
        let Some((_, path)) = files.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        if path.exists() {
            continue;
        }
        write_private(path, &bytes)?;
        summary.files.push(name);
    }
    Ok(summary)
}

fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}
