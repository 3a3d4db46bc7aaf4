//! The disk watch: looks at free space under `state_dir` every [`EVERY`], records it in
//! [`crate::disk`], raises `disk_low` once per episode, and opens the store again after a write
//! that failed for want of space latched it ([`Store::recover`]).

use crate::alert::{Alert, AlertKind, Alerter};
use crate::config::Live;
use crate::disk::EVERY;
use crate::store::{Recovery, Store};

/// Watches `state_dir` until `shutdown`.
pub struct DiskWatch {
    pub config: Live,
    pub store: Store,
    pub alerts: Alerter,
}

impl super::Worker for DiskWatch {
    fn name(&self) -> &'static str {
        "disk-watch"
    }

    async fn work(&mut self) -> Result<super::Next, super::Failed> {
        self.look();
        let store = self.store.clone();
        let waiting = matches!(
            tokio::task::spawn_blocking(move || store.recover()).await,
            Ok(Recovery::Waiting)
        );
        crate::disk::set_store_failed(waiting);
        Ok(super::Next::Idle(EVERY))
    }
}

impl DiskWatch {
    fn look(&self) {
        let config = self.config.get();
        let min = config.min_free_space;
        let free = match crate::disk::free_bytes(&config.state_dir) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read free space under state_dir");
                return;
            }
        };
        let low = min > 0 && free < min;
        let was = crate::disk::record_free(free, low);
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
