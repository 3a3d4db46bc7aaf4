//! The dispatcher's log: each dispatch step made durable by one synchronous append,
//! applied to the database later in larger transactions.
//!
//! A partner's window slot, and the acknowledgement of a receipt or an incoming message, wait
//! for their step to be durable. A database commit costs several hundred microseconds however
//! small it is; an append to this log costs one synchronous write of a few pages. So the
//! dispatcher appends here, gets its slots back, and [`Store::apply_logged`] folds many steps into one
//! transaction that also records the last step it applied (`meta.wal_applied`). At start-up
//! the steps after that one are applied before anything else reads the queue.
//!
//! Format: records of `length (u32 LE) ‖ step number (u64 LE) ‖ sealed step`, sealed with the
//! system key bound to the step number, so nothing in it is readable on disk and a record moved
//! or changed does not open. A record cut short by a crash was never acknowledged (its write
//! had not returned): reading stops there.
//!
//! The file is opened `O_DSYNC`: each record's write returns once it is on the disk, without
//! a separate `fdatasync` (which also walks the page cache: 130 µs a record here, against
//! 210 µs for write and `fdatasync`). It is written full of zeros once ([`PREALLOC_BYTES`]) and
//! records overwrite it in place: a synchronous write that must also commit a new file size or
//! extent costs the file system a journal commit (about 0.8 ms here, against 0.08 ms without).
//! Once every step in it is applied and it holds more than [`RESET_BYTES`], writing starts again
//! at the beginning; step numbers only grow, so reading stops at the first record whose number
//! does not (what is left of the previous round).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::crypto::TenantKeys;

/// The log's file inside `state_dir`.
pub const WAL_FILE: &str = "dispatch.wal";
/// Writing starts again at the beginning, once everything is applied, past this.
pub const RESET_BYTES: u64 = 32 << 20;
/// The zeros the file is made of before the first record.
pub const PREALLOC_BYTES: u64 = 64 << 20;
/// A record larger than this is not one of ours.
const MAX_RECORD: usize = 256 << 20;

/// Steps read back from the log: (step number, plain bytes), in order.
pub type LoggedSteps = Vec<(u64, Vec<u8>)>;

pub struct Wal {
    file: File,
    path: PathBuf,
    keys: Arc<TenantKeys>,
    /// Told each step number before it is sealed (the re-sealer keeps the generation it was
    /// sealed under until it is applied).
    announce: Box<dyn Fn(u64) + Send>,
    /// The last step appended.
    pub last: u64,
    bytes: u64,
}

impl Wal {
    /// Opens the log and reads the steps in it: (step number, plain bytes), in order.
    pub fn open(
        state_dir: &Path,
        keys: Arc<TenantKeys>,
        announce: Box<dyn Fn(u64) + Send>,
    ) -> io::Result<(Wal, LoggedSteps)> {
        let path = state_dir.join(WAL_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_DSYNC)
            .open(&path)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        if (data.len() as u64) < PREALLOC_BYTES {
            let zeros = vec![0u8; 1 << 20];
            let mut at = data.len() as u64;
            while at < PREALLOC_BYTES {
                file.write_all_at(&zeros, at)?;
                at += zeros.len() as u64;
            }
            file.sync_all()?;
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        let mut steps: LoggedSteps = Vec::new();
        let mut at = 0usize;
        while let Some(header) = data.get(at..at + 12) {
            let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
            let mut seq_bytes = [0u8; 8];
            seq_bytes.copy_from_slice(&header[4..12]);
            let seq = u64::from_le_bytes(seq_bytes);
            if len == 0 || steps.last().is_some_and(|(last, _)| seq <= *last) {
                break; // zeros, or what is left of the previous round
            }
            let Some(sealed) = data.get(at + 12..at + 12 + len).filter(|_| len <= MAX_RECORD) else {
                break;
            };
            let Ok(plain) = keys.open("wal", &seq.to_be_bytes(), sealed) else {
                break; // cut short by a crash: never acknowledged
            };
            steps.push((seq, plain));
            at += 12 + len;
        }
        let last = steps.last().map(|(s, _)| *s).unwrap_or(0);
        Ok((
            Wal {
                file,
                path,
                keys,
                announce,
                last,
                bytes: at as u64,
            },
            steps,
        ))
    }

    /// Appends one step and waits for the disk (the file is `O_DSYNC`). After an error nothing
    /// has moved: the same step may be appended again, at the same place.
    pub fn append(&mut self, seq: u64, plain: &[u8]) -> io::Result<()> {
        (self.announce)(seq);
        let sealed = self.keys.seal("wal", &seq.to_be_bytes(), plain);
        let mut record = Vec::with_capacity(12 + sealed.len());
        record.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        record.extend_from_slice(&seq.to_le_bytes());
        record.extend_from_slice(&sealed);
        self.file.write_all_at(&record, self.bytes)?;
        self.last = seq;
        self.bytes += record.len() as u64;
        Ok(())
    }

    /// Starts writing at the beginning again if every step in the log is applied (`applied`)
    /// and it holds more than [`RESET_BYTES`], or `always`. Nothing needs to be erased: the next
    /// record's larger step number ends what is left of this round.
    pub fn reset_if_applied(&mut self, applied: u64, always: bool) {
        if applied >= self.last && (always || self.bytes > RESET_BYTES) && self.bytes > 0 {
            self.bytes = 0;
            tracing::debug!(path = %self.path.display(), "dispatch log starts a new round");
        }
    }
}
