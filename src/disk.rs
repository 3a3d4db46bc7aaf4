//! A full disk is an expected state, not a crash: free space under `state_dir` is watched, and
//! below `min_free_space` new work is refused before it can fail half-way.
//!
//! [`DiskWatch::run`] looks every [`EVERY`]. While space under `state_dir` is low, no new file
//! is taken from an inbox (files wait where they are; a file already being ingested finishes),
//! SFTP uploads are refused when opened ("server storage is low"), `/readyz` answers 503, and a
//! `disk_low` alert goes out once per episode. An SFTP upload is also refused when the inbox's own
//! file system is low. Everything resumes by itself when space comes back, which is logged.
//! Uploads whose writes fail anyway are never published (`sftp::world`).
//!
//! The same look also heals the store: a write that failed for want of space latches redb's
//! database into refusing every later transaction, and [`Store::recover`] opens it again (once
//! space allows), so nothing waits for a restart.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::alert::{Alert, AlertKind, Alerter};
use crate::reload::Live;
use crate::store::{Recovery, Store};

/// How often free space is looked at.
pub const EVERY: Duration = Duration::from_secs(1);

static LOW: AtomicBool = AtomicBool::new(false);
/// The store failed and is not open again yet.
static HEALING: AtomicBool = AtomicBool::new(false);
static FREE: AtomicU64 = AtomicU64::new(u64::MAX);

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
    } else if crate::audit::backlogged() {
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

/// Watches `state_dir` until `shutdown`.
pub struct DiskWatch {
    pub config: Live,
    pub store: Store,
    pub alerts: Alerter,
}

impl DiskWatch {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    self.look();
                    let store = self.store.clone();
                    if let Ok(Recovery::Waiting) = tokio::task::spawn_blocking(move || store.recover()).await {
                        HEALING.store(true, Ordering::Release);
                    } else {
                        HEALING.store(false, Ordering::Release);
                    }
                }
            }
        }
    }

    fn look(&self) {
        let config = self.config.get();
        let min = config.min_free_space;
        let free = match free_bytes(&config.state_dir) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read free space under state_dir");
                return;
            }
        };
        FREE.store(free, Ordering::Release);
        let low = min > 0 && free < min;
        let was = LOW.swap(low, Ordering::AcqRel);
        let mib = |b: u64| b / (1 << 20);
        if low && !was {
            let what = format!(
                "Free space under {} is {} MiB, below min_free_space ({} MiB): new files and uploads wait.",
                config.state_dir.display(),
                mib(free),
                mib(min)
            );
            self.alerts.raise(
                Alert::new(AlertKind::DiskLow, None, what)
                    .detail("state_dir", config.state_dir.display())
                    .detail("free", format!("{} MiB", mib(free)))
                    .detail("min_free_space", format!("{} MiB", mib(min)))
                    .action("Free space on that file system (old backups, logs) or grow it. Nothing accepted is lost: files wait in the inboxes, uploads are refused with a clear message, and everything resumes by itself once space is back."),
            );
        } else if was && !low {
            tracing::info!(
                free_mib = mib(free),
                "free space under state_dir is back above min_free_space; taking files again"
            );
        }
    }
}
