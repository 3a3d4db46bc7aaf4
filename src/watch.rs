//! The way in from folders (docs/pipeline.md, docs/batch-format.md): watches every tenant's inbox, decides when a file is
//! complete, and claims it by an atomic rename into the spool under `state_dir`.
//!
//! A file is complete when no writer has it open (a close-after-write event was seen, or no write
//! was ever seen) and its size and modification time have not changed for the tenant's `settle`;
//! or, for a tenant with `require_trigger`, when `<name>.ok` exists beside it. inotify events make
//! this quick; a periodic rescan finds files present at start-up and events that were missed.
//! Hidden names and `.part`, `.tmp`, `.ok` names are never taken, nor anything but regular files.
//!
//! Names are data from outside. A file is left where it is, logged (its name escaped) and audited
//! once as `inbox.refused` when its name is not UTF-8, holds control characters or is too long,
//! when it is not a regular file (a symbolic link, a FIFO, a device, a folder), when it has more
//! than one link (a hard link would let whoever placed it make smsdrop read, and echo, a file it
//! points to), or when it is owned by none of the service's user, root and the inbox's owner. The
//! link count and owner are checked again just before the claim.
//!
//! This module hands claimed files on; it never reads their content.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;

use crate::audit::{Audit, Event};
use crate::config::Live;
use crate::config::Tenant;
use crate::limits;

/// A file moved into the spool, waiting for ingest.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub tenant: String,
    pub spool: PathBuf,
    pub claim: String,
    pub file_name: String,
    /// Found in the spool at start-up: it may have been half processed before a stop.
    pub recovered: bool,
}

/// Longest file name taken: the reply files add up to 11 bytes to the name's stem.
const MAX_NAME_BYTES: usize = 200;

/// Names that are never batches (and are not worth a word: temporary names of writers).
pub fn is_ignored_name(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with(".part")
        || name.ends_with(".tmp")
        || name.ends_with(".ok")
        // WinSCP uploads as `name.filepart` and renames when done.
        || name.ends_with(".filepart")
}

/// Why a file in an inbox is refused, if it is: its name, its kind, its links or its owner.
fn refusal(name: &str, meta: &fs::Metadata, inbox_owner: Option<u32>) -> Option<String> {
    if limits::has_unsafe_chars(name) {
        return Some("control characters in the name".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Some(format!("name longer than {MAX_NAME_BYTES} bytes"));
    }
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_symlink() {
            "a symbolic link"
        } else if kind.is_dir() {
            "a folder"
        } else {
            "a special file"
        };
        return Some(format!("not a regular file ({what})"));
    }
    if meta.nlink() > 1 {
        return Some(format!("a hard link ({} links)", meta.nlink()));
    }
    // SAFETY: geteuid cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 && Some(meta.uid()) != inbox_owner {
        return Some(format!(
            "owned by uid {}, neither smsdrop's, root's nor the inbox's owner",
            meta.uid()
        ));
    }
    None
}

/// A spool file's name: `<claim>~<original name>`.
fn spool_name(claim: &str, file_name: &str) -> String {
    format!("{claim}~{file_name}")
}

/// Splits a spool file name back into claim and original name.
pub fn parse_spool_name(name: &str) -> Option<(&str, &str)> {
    let (claim, file) = name.split_once('~')?;
    (claim.starts_with('c') && !file.is_empty()).then_some((claim, file))
}

fn new_claim() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    format!("c{nanos:x}{}", r.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Moves `path` into the tenant's spool atomically. Falls back to copy, sync and remove when the
/// inbox is on another file system.
fn claim(path: &Path, tenant: &Tenant, spool: &Path) -> io::Result<Claimed> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other("file name is not UTF-8"))?
        .to_string();
    let claim = new_claim();
    let target = spool.join(spool_name(&claim, &file_name));
    match fs::rename(path, &target) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            // Hide it first so that a crash mid-copy does not make it a batch twice.
            let hidden = path.with_file_name(format!(".smsdrop-claim-{}", spool_name(&claim, &file_name)));
            fs::rename(path, &hidden)?;
            copy_into_spool(&hidden, &target)?;
        }
        Err(e) => return Err(e),
    }
    fs::File::open(spool)?.sync_all()?;
    if tenant.folders.require_trigger {
        let _ = fs::remove_file(trigger_path(path));
    }
    Ok(Claimed {
        tenant: tenant.id.clone(),
        spool: target,
        claim,
        file_name,
        recovered: false,
    })
}

fn copy_into_spool(hidden: &Path, target: &Path) -> io::Result<()> {
    let part = target.with_extension("part-copy");
    fs::copy(hidden, &part)?;
    fs::File::open(&part)?.sync_all()?;
    fs::rename(&part, target)?;
    fs::remove_file(hidden)
}

fn trigger_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".ok");
    path.with_file_name(name)
}

/// What the watcher knows of a file it has seen in an inbox.
struct Candidate {
    tenant: String,
    size: u64,
    modified: Option<SystemTime>,
    changed_at: Instant,
    /// A write was seen and no close-after-write since.
    writing: bool,
    /// Complete, and said to wait for disk space (said once).
    waits_for_space: bool,
}

/// Files with no close event are still taken after this many `settle` periods of quiet.
const QUIET_FACTOR: u32 = 10;

/// Lines about inboxes, at most one a minute per tenant and kind: a tenant who drops ten
/// thousand files while the disk is low, or an inbox that cannot be listed at each rescan, does
/// not fill the log.
static INBOX_LINES: limits::Throttle = limits::Throttle::new(Duration::from_secs(60));

/// Told after each full rescan of the inboxes: `Err` names the inboxes that could not be listed.
pub type OnScan = Box<dyn Fn(Result<(), String>) + Send + Sync>;

/// Watches all inboxes and sends claimed files to `claimed`; follows reloads (a new tenant's
/// inbox is watched, a removed one's no longer).
pub struct InboxWatcher {
    pub config: Live,
    pub claimed: mpsc::UnboundedSender<Claimed>,
    pub audit: Audit,
    /// The server counts rescans on the workers' board (`inbox-watch` in `smsdrop status`).
    pub scanned: OnScan,
    /// Files refused and already reported, with the inode and reason reported: reported again
    /// only when that changes. Forgotten when the file goes.
    pub refused: Mutex<HashMap<PathBuf, (u64, String)>>,
}

/// Refused files remembered at most (past it, the memory starts over).
const MAX_REFUSED: usize = 10_000;

impl InboxWatcher {
    /// Lists the spool for files claimed before a stop; they go first.
    pub fn recover(&self) -> Vec<Claimed> {
        let mut out = Vec::new();
        let config = self.config.get();
        for tenant in config.tenants.values() {
            let dir = crate::paths::spool_dir(&config.state_dir, &tenant.id);
            // Half-finished copies from another file system are done again from the inbox copy.
            if let Ok(entries) = fs::read_dir(&tenant.folders.inbox) {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if let Some(spooled) = name.strip_prefix(".smsdrop-claim-") {
                        let target = dir.join(spooled);
                        let res = if target.exists() {
                            fs::remove_file(e.path())
                        } else {
                            copy_into_spool(&e.path(), &target)
                        };
                        if let Err(err) = res {
                            tracing::error!(file = %e.path().display(), error = %err, "cannot finish an interrupted claim");
                        }
                    }
                }
            }
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            let mut found: Vec<Claimed> = entries
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_str()?.to_string();
                    let (claim, file_name) = parse_spool_name(&name)?;
                    Some(Claimed {
                        tenant: tenant.id.clone(),
                        spool: e.path(),
                        claim: claim.to_string(),
                        file_name: file_name.to_string(),
                        recovered: true,
                    })
                })
                .collect();
            found.sort_by(|a, b| a.claim.cmp(&b.claim));
            out.extend(found);
        }
        out
    }

    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let (event_tx, mut events) = mpsc::unbounded_channel::<notify::Event>();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(event) => {
                let _ = event_tx.send(event);
            }
            Err(e) => tracing::warn!(error = %e, "inbox watcher error; the periodic rescan covers it"),
        });
        let mut watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "no file-system events; relying on the periodic rescan");
                None
            }
        };
        let mut reloads = self.config.subscribe();
        let mut by_dir: HashMap<PathBuf, String> = HashMap::new();
        let mut watched: HashSet<PathBuf> = HashSet::new();
        self.rewatch(&mut watcher, &mut watched, &mut by_dir);
        let mut candidates: HashMap<PathBuf, Candidate> = HashMap::new();
        let mut rescan = tokio::time::interval(self.config.get().rescan_interval);
        let mut reloads_open = true;
        let mut check = tokio::time::interval(Duration::from_millis(100));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(event) = events.recv() => self.on_event(event, &by_dir, &mut candidates),
                _ = rescan.tick() => self.rescan(&mut candidates),
                _ = check.tick() => self.take_ready(&mut candidates),
                changed = reloads.changed(), if reloads_open => match changed {
                    Ok(()) => {
                        self.rewatch(&mut watcher, &mut watched, &mut by_dir);
                        self.rescan(&mut candidates);
                    }
                    Err(_) => reloads_open = false,
                },
            }
        }
        drop(watcher);
    }

    /// Watches the inboxes of the configuration in force, and only those.
    fn rewatch(
        &self,
        watcher: &mut Option<notify::RecommendedWatcher>,
        watched: &mut HashSet<PathBuf>,
        by_dir: &mut HashMap<PathBuf, String>,
    ) {
        let config = self.config.get();
        by_dir.clear();
        let wanted: HashSet<PathBuf> = config.tenants.values().map(|t| t.folders.inbox.clone()).collect();
        for t in config.tenants.values() {
            by_dir.insert(t.folders.inbox.clone(), t.id.clone());
            if let Ok(real) = fs::canonicalize(&t.folders.inbox) {
                by_dir.insert(real, t.id.clone());
            }
        }
        let Some(w) = watcher else { return };
        for dir in watched.difference(&wanted) {
            let _ = w.unwatch(dir);
        }
        watched.retain(|d| wanted.contains(d));
        for t in config.tenants.values() {
            if watched.contains(&t.folders.inbox) {
                continue;
            }
            match w.watch(&t.folders.inbox, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(t.folders.inbox.clone());
                }
                Err(e) => {
                    tracing::warn!(tenant = %t.id, inbox = %t.folders.inbox.display(), error = %e, "cannot watch the inbox; relying on the periodic rescan")
                }
            }
        }
    }

    fn on_event(
        &self,
        event: notify::Event,
        by_dir: &HashMap<PathBuf, String>,
        candidates: &mut HashMap<PathBuf, Candidate>,
    ) {
        tracing::trace!(kind = ?event.kind, paths = ?event.paths, "inbox event");
        for path in event.paths {
            let Some(dir) = path.parent() else { continue };
            let tenant = match by_dir.get(dir) {
                Some(t) => t,
                None => match fs::canonicalize(dir).ok().and_then(|d| by_dir.get(&d)) {
                    Some(t) => t,
                    None => continue,
                },
            };
            let writing = match event.kind {
                EventKind::Access(notify::event::AccessKind::Close(notify::event::AccessMode::Write)) => Some(false),
                EventKind::Modify(notify::event::ModifyKind::Data(_)) | EventKind::Create(_) => Some(true),
                _ => None,
            };
            self.observe(&path, tenant, writing, candidates);
        }
    }

    /// Notes a file's current size and time; `writing` is what an event said about writers.
    fn observe(&self, path: &Path, tenant: &str, writing: Option<bool>, candidates: &mut HashMap<PathBuf, Candidate>) {
        let Some(raw) = path.file_name() else {
            return;
        };
        let Some(name) = raw.to_str() else {
            if let Ok(meta) = fs::symlink_metadata(path) {
                self.refuse(path, tenant, &meta, "the name is not UTF-8".into());
            }
            return;
        };
        let path = match name.strip_suffix(".ok") {
            // A trigger file: look at the file it announces.
            Some(base) => path.with_file_name(base),
            None => path.to_path_buf(),
        };
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            return;
        };
        if is_ignored_name(name) {
            return;
        }
        let Ok(meta) = fs::symlink_metadata(&path) else {
            candidates.remove(&path);
            return;
        };
        let inbox_owner = path.parent().and_then(|d| fs::metadata(d).ok()).map(|m| m.uid());
        if let Some(why) = refusal(name, &meta, inbox_owner) {
            candidates.remove(&path);
            self.refuse(&path, tenant, &meta, why);
            return;
        }
        let modified = meta.modified().ok();
        let now = Instant::now();
        let c = candidates.entry(path).or_insert_with(|| Candidate {
            tenant: tenant.to_string(),
            size: meta.len(),
            modified,
            changed_at: now,
            writing: false,
            waits_for_space: false,
        });
        if c.size != meta.len() || c.modified != modified {
            c.size = meta.len();
            c.modified = modified;
            c.changed_at = now;
        }
        if let Some(w) = writing {
            c.writing = w;
            if w {
                c.changed_at = now;
            }
        }
    }

    /// Leaves a file in the inbox, reported once (log line with the name escaped, and an
    /// `inbox.refused` audit event).
    fn refuse(&self, path: &Path, tenant: &str, meta: &fs::Metadata, why: String) {
        let Ok(mut refused) = self.refused.lock() else { return };
        let seen = (meta.ino(), why);
        if refused.get(path) == Some(&seen) {
            return;
        }
        if refused.len() >= MAX_REFUSED {
            refused.clear();
        }
        let name = limits::shown(&path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
        tracing::warn!(tenant, file = %name, reason = %seen.1, "file in the inbox left alone");
        Event::new("inbox.refused", "watcher")
            .tenant(tenant)
            .detail("file", &name)
            .detail("reason", &seen.1)
            .record(&self.audit);
        refused.insert(path.to_path_buf(), seen);
    }

    fn rescan(&self, candidates: &mut HashMap<PathBuf, Candidate>) {
        if let Ok(mut refused) = self.refused.lock() {
            refused.retain(|p, _| fs::symlink_metadata(p).is_ok());
        }
        let mut unlisted = Vec::new();
        for t in self.config.get().tenants.values() {
            let entries = match fs::read_dir(&t.folders.inbox) {
                Ok(e) => e,
                Err(e) => {
                    if let Some(held) = INBOX_LINES.allow(&format!("unlisted {}", t.id)) {
                        tracing::warn!(tenant = %t.id, inbox = %t.folders.inbox.display(), error = %e, held_back = held, "cannot list the inbox");
                    }
                    unlisted.push(format!("{}: {e}", t.folders.inbox.display()));
                    continue;
                }
            };
            for e in entries.flatten() {
                self.observe(&e.path(), &t.id, None, candidates);
            }
        }
        (self.scanned)(match unlisted.is_empty() {
            true => Ok(()),
            false => Err(format!("cannot list {}", unlisted.join("; "))),
        });
    }

    /// Claims the files that are complete. Below `min_free_space` they wait in their inbox until
    /// space is back ([`crate::disk`]); the log says so, naming a file (once per file, at most a
    /// line a minute per tenant, with how many more were held back).
    fn take_ready(&self, candidates: &mut HashMap<PathBuf, Candidate>) {
        let low = crate::disk::is_low();
        let now = Instant::now();
        let mut ready = Vec::new();
        let mut refresh = Vec::new();
        let config = self.config.get();
        // Each inbox's owner, looked up once per look rather than once per file.
        let mut owners: HashMap<&str, Option<u32>> = HashMap::new();
        for (path, c) in candidates.iter_mut() {
            let Some(tenant) = config.tenants.get(&c.tenant) else {
                ready.push((path.clone(), None)); // its tenant was removed by a reload
                continue;
            };
            // Refresh: a write with no event (network file systems) still counts as a change.
            match fs::symlink_metadata(path) {
                Ok(meta)
                    if refusal(
                        path.file_name().and_then(|n| n.to_str()).unwrap_or(""),
                        &meta,
                        *owners
                            .entry(tenant.id.as_str())
                            .or_insert_with(|| fs::metadata(&tenant.folders.inbox).ok().map(|m| m.uid())),
                    )
                    .is_some() =>
                {
                    // Became a link (or changed owner) since it was seen: observe reports it.
                    refresh.push((path.clone(), tenant.id.clone()));
                    continue;
                }
                Ok(meta) if meta.len() != c.size || meta.modified().ok() != c.modified => {
                    c.size = meta.len();
                    c.modified = meta.modified().ok();
                    c.changed_at = now;
                    continue;
                }
                Ok(_) => {}
                Err(_) => {
                    ready.push((path.clone(), None));
                    continue;
                }
            }
            let quiet = now.duration_since(c.changed_at);
            let complete = if tenant.folders.require_trigger {
                trigger_path(path).exists()
            } else {
                quiet >= tenant.folders.settle
                    && (!c.writing || quiet >= tenant.folders.settle.max(Duration::from_secs(3)) * QUIET_FACTOR)
            };
            if complete {
                ready.push((path.clone(), Some(tenant.clone())));
            }
        }
        for (path, tenant) in refresh {
            self.observe(&path, &tenant, None, candidates);
        }
        for (path, tenant) in ready {
            let Some(tenant) = tenant else {
                candidates.remove(&path);
                continue;
            };
            if low {
                if let Some(c) = candidates.get_mut(&path).filter(|c| !c.waits_for_space) {
                    c.waits_for_space = true;
                    if let Some(held) = INBOX_LINES.allow(&format!("waiting {}", tenant.id)) {
                        let name = limits::shown(&path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
                        tracing::info!(tenant = %tenant.id, file = %name, held_back = held, "file complete; it waits in the inbox until the disk is above min_free_space");
                    }
                }
                continue;
            }
            candidates.remove(&path);
            let spool = crate::paths::spool_dir(&config.state_dir, &tenant.id);
            match claim(&path, &tenant, &spool) {
                Ok(claimed) => {
                    tracing::info!(tenant = %tenant.id, file = %claimed.file_name, claim = %claimed.claim, "file taken");
                    let _ = self.claimed.send(claimed);
                }
                Err(e) => {
                    tracing::error!(tenant = %tenant.id, file = %limits::shown(&path.display().to_string()), error = %e, "cannot take the file; it stays in the inbox")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignored_names() {
        for n in [
            ".hidden.csv",
            "a.csv.part",
            "a.tmp",
            "a.csv.ok",
            ".smsdrop-claim-x",
            "a.csv.filepart",
        ] {
            assert!(is_ignored_name(n), "{n}");
        }
        for n in ["a.csv", "batch", "ok.csv", "part.csv"] {
            assert!(!is_ignored_name(n), "{n}");
        }
    }

    #[test]
    fn refused_names_and_files() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("f");
        std::fs::write(&file, "x").expect("write");
        let meta = fs::symlink_metadata(&file).expect("meta");
        let me = Some(meta.uid());
        assert_eq!(refusal("a.csv", &meta, me), None);
        assert!(refusal("a\n.csv", &meta, me).expect("refused").contains("control"));
        assert!(
            refusal(&"x".repeat(201), &meta, me)
                .expect("refused")
                .contains("longer")
        );
        std::fs::hard_link(&file, dir.path().join("g")).expect("link");
        let meta = fs::symlink_metadata(&file).expect("meta");
        assert_eq!(refusal("a.csv", &meta, me).as_deref(), Some("a hard link (2 links)"));
        let meta = fs::symlink_metadata(dir.path()).expect("meta");
        assert_eq!(
            refusal("d", &meta, me).as_deref(),
            Some("not a regular file (a folder)")
        );
    }

    #[test]
    fn spool_names_round_trip() {
        let c = new_claim();
        let name = spool_name(&c, "june~1.csv");
        assert_eq!(parse_spool_name(&name), Some((c.as_str(), "june~1.csv")));
        assert_eq!(parse_spool_name("garbage"), None);
    }
}
