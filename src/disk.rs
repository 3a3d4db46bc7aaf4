//! A full disk is an expected state, not a crash: free space under `state_dir` is watched, and
//! below `min_free_space` new work is refused before it can fail half-way.
//!
//! The disk watch (`crate::workers::disk`) looks every [`EVERY`] and records here what it saw;
//! everything else reads it. While space under `state_dir` is low, no new file
//! is taken from an inbox (files wait where they are; a file already being ingested finishes),
//! SFTP uploads are refused when opened ("server storage is low"), `/readyz` answers 503, and a
//! `disk_low` alert goes out once per episode. An SFTP upload is also refused when the inbox's own
//! file system is low. Everything resumes by itself when space comes back, which is logged.
//! Uploads whose writes fail anyway are never published (`sftp::world`).
//!
//! The same look also heals the store: a write that failed for want of space latches redb's
//! database into refusing every later transaction, and `Store::recover` opens it again (once
//! space allows), so nothing waits for a restart. Audit events that wait for the store hold new
//! work too ([`set_audit_backlog`]).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How often free space is looked at.
pub const EVERY: Duration = Duration::from_secs(1);

static LOW: AtomicBool = AtomicBool::new(false);
/// The store failed and is not open again yet.
static HEALING: AtomicBool = AtomicBool::new(false);
static FREE: AtomicU64 = AtomicU64::new(u64::MAX);
/// Audit events wait for the store.
static AUDIT_BACKLOG: AtomicBool = AtomicBool::new(false);

/// Bytes free for an unprivileged writer on the file system of `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Whether space under `state_dir` is below `min_free_space` (as last looked at), the store
/// failed for want of it and is not open again yet, or audit events wait for the store: in each
/// case no new work is taken.
pub fn is_low() -> bool {
    why_paused().is_some()
}

/// Why new work waits, if it does.
pub fn why_paused() -> Option<&'static str> {
    if LOW.load(Ordering::Acquire) {
        Some("disk low: free space under state_dir is below min_free_space")
    } else if HEALING.load(Ordering::Acquire) {
        Some("the store had an I/O error and is not open again yet")
    } else if AUDIT_BACKLOG.load(Ordering::Acquire) {
        Some("audit events wait for the store to take writes")
    } else {
        None
    }
}

/// Whether the store has failed and is waiting to be opened again: work that needs it waits.
pub fn store_failed() -> bool {
    HEALING.load(Ordering::Acquire)
}

/// Free bytes under `state_dir`, as last looked at.
pub fn free() -> u64 {
    FREE.load(Ordering::Acquire)
}

/// Whether an upload into `inbox` may start: space under `state_dir` is not low, and the inbox's
/// own file system has `min` free.
pub fn upload_allowed(inbox: &Path, min: u64) -> bool {
    !is_low() && (min == 0 || free_bytes(inbox).map(|f| f >= min).unwrap_or(true))
}

/// Records a look at free space under `state_dir`; returns whether space was low before it.
pub fn record_free(free: u64, low: bool) -> bool {
    FREE.store(free, Ordering::Release);
    LOW.swap(low, Ordering::AcqRel)
}

/// Records whether the store has failed and waits to be opened again.
pub fn set_store_failed(failed: bool) {
    HEALING.store(failed, Ordering::Release);
}

/// Records whether audit events wait for the store; returns whether they did before.
pub fn set_audit_backlog(waiting: bool) -> bool {
    AUDIT_BACKLOG.swap(waiting, Ordering::AcqRel)
}
