//! Scheduled backups (`[backup]`): a backup every `every` into `dir`, the newest `keep` kept.
//! The first one is due `every` after the newest already there (at once when there is none); a
//! failed one is tried again after a tenth of `every` (at least 10 s, at most an hour).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{Failed, Next, Worker};
use crate::audit::{Audit, Event};
use crate::config::{BackupSchedule, Config};
use crate::store::{Mark, Store};

pub struct Backups {
    pub store: Store,
    pub config: Arc<Config>,
    pub schedule: BackupSchedule,
    pub audit: Audit,
    /// When the next backup is due (unix seconds); `None` before the first round looked.
    pub next: Option<i64>,
}

/// Scheduled backups in `dir`, oldest first: (taken at, path).
pub fn scheduled(dir: &Path) -> Vec<(i64, PathBuf)> {
    let mut out: Vec<(i64, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stamp = name.strip_prefix("smsdrop-")?.strip_suffix(".backup")?;
            let civil = jiff::fmt::strtime::parse("%Y%m%dT%H%M%SZ", stamp)
                .ok()?
                .to_datetime()
                .ok()?;
            let at = jiff::tz::TimeZone::UTC.to_timestamp(civil).ok()?.as_second();
            Some((at, e.path()))
        })
        .collect();
    out.sort();
    out
}

impl Backups {
    /// The first round: the folder made, what a crash left removed, the first backup's time.
    fn start(&self) -> Result<i64, Failed> {
        let dir = &self.schedule.dir;
        fs::create_dir_all(dir).map_err(|e| Failed::new(format!("cannot make {}: {e}", dir.display())))?;
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().ends_with(".backup.partial") {
                let _ = fs::remove_file(e.path()); // cut short by a crash
            }
        }
        let every = self.schedule.every.as_secs() as i64;
        Ok(scheduled(dir).last().map(|(at, _)| at + every).unwrap_or(0))
    }

    /// Deletes the scheduled backups beyond the newest `keep`.
    fn prune(&self) {
        let keep = self.schedule.keep;
        let all = scheduled(&self.schedule.dir);
        for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
            match fs::remove_file(old) {
                Ok(()) => tracing::info!(file = %old.display(), "old backup deleted (keep = {keep})"),
                Err(e) => tracing::warn!(file = %old.display(), error = %e, "cannot delete an old backup"),
            }
        }
    }
}

impl Worker for Backups {
    fn name(&self) -> &'static str {
        "backups"
    }

    async fn work(&mut self) -> Result<Next, Failed> {
        let next = match self.next {
            Some(next) => next,
            None => *self.next.insert(self.start()?),
        };
        let now = jiff::Timestamp::now().as_second();
        if next > now {
            return Ok(Next::Idle(Duration::from_secs((next - now) as u64)));
        }
        let every = self.schedule.every.as_secs() as i64;
        let name = jiff::Timestamp::from_second(now)
            .map(|t| t.strftime("smsdrop-%Y%m%dT%H%M%SZ.backup").to_string())
            .unwrap_or_else(|_| format!("smsdrop-{now}.backup"));
        let path = self.schedule.dir.join(name);
        let (target, config) = (path.clone(), self.config.clone());
        let result = self
            .store
            .blocking(move |s| s.backup_to_file(&target, &config.backup_files(), now))
            .await;
        let mut event = Event::new("backup.scheduled", "smsdrop").detail("file", path.display());
        let outcome = match result {
            Ok(summary) => {
                tracing::info!(file = %path.display(), entries = summary.entries, bytes = summary.bytes, "scheduled backup written");
                event.push("entries", summary.entries);
                event.push("bytes", summary.bytes);
                event.push("result", "ok");
                let _ = self
                    .store
                    .blocking(move |s| s.set_mark(Mark::BackupAt, now.max(0) as u64))
                    .await;
                self.prune();
                self.next = Some(now + every);
                Ok(Next::Idle(Duration::from_secs(every.max(1) as u64)))
            }
            Err(e) => {
                let retry = (every / 10).clamp(10, 3600);
                event.push("result", "failed");
                self.next = Some(now + retry);
                Err(Failed {
                    error: format!("scheduled backup {} failed: {e}", path.display()),
                    retry_in: Some(Duration::from_secs(retry as u64)),
                })
            }
        };
        self.audit.record(event);
        outcome
    }
}
