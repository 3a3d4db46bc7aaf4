//! `smsdrop serve`: wires the parts together and tears them down in order.
//!
//! Start: state folders, master key, store, spool recovery, then the workers (ingest, dispatcher,
//! report writer, admin socket) and last the inbox watcher. Stop (the `shutdown` token): the
//! watcher stops taking files, the batch being ingested is cut short (it is redone from the spool
//! at next start), the dispatcher finishes and commits its step, then the store is closed.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::alert::Alerter;
use crate::alert::mailer::{Mailer, MailerError};
use crate::audit::{Audit, Event};
use crate::config::Config;
use crate::config::Live;
use crate::crypto::{KeyError, Keyring, MasterKeys};
use crate::dispatch::fleet::Fleet;
use crate::dispatch::{self, Dispatcher};
use crate::ingest::{IngestError, Ingestor};
use crate::reload::Reloader;
use crate::reply::ReportWriter;
use crate::store::{Store, StoreError};
use crate::watch::{Claimed, InboxWatcher};
use crate::workers::{Pace, Workers};

/// How long workers get to finish at shutdown.
const STOP_DEADLINE: Duration = Duration::from_secs(20);

/// Why the appliance could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("opening the store: {0}")]
    Store(StoreError),
    #[error("{what} {}: {cause}", path.display())]
    Folder {
        what: &'static str,
        path: std::path::PathBuf,
        cause: io::Error,
    },
    #[error("admin socket: {0}")]
    Admin(io::Error),
    #[error("metrics: cannot listen on {addr}: {cause}")]
    Metrics {
        addr: std::net::SocketAddr,
        cause: io::Error,
    },
    #[error("cannot listen for signals: {0}")]
    Signals(io::Error),
    #[error("the dispatch log cannot be opened: {0}")]
    DispatchLog(String),
    #[error("{}: {problem}; run `{fix}`", path.display())]
    Unsafe {
        path: std::path::PathBuf,
        problem: String,
        fix: String,
    },
    #[error("mail: {0}")]
    Mailer(MailerError),
    #[error("SFTP: {0}")]
    Sftp(crate::sftp::SftpError),
    #[error("partner: {0}")]
    Partner(crate::dispatch::http::HttpSetupError),
    #[error("cannot start the dispatcher's runtime: {0}")]
    Dispatcher(io::Error),
}

impl From<StoreError> for ServeError {
    fn from(e: StoreError) -> Self {
        ServeError::Store(e)
    }
}

impl From<MailerError> for ServeError {
    fn from(e: MailerError) -> Self {
        ServeError::Mailer(e)
    }
}

impl From<crate::sftp::SftpError> for ServeError {
    fn from(e: crate::sftp::SftpError) -> Self {
        ServeError::Sftp(e)
    }
}

impl From<crate::dispatch::http::HttpSetupError> for ServeError {
    fn from(e: crate::dispatch::http::HttpSetupError) -> Self {
        ServeError::Partner(e)
    }
}

pub(crate) fn make_dir(path: &Path, mode: u32, what: &'static str) -> Result<(), ServeError> {
    let err = |source| ServeError::Folder {
        what,
        path: path.to_path_buf(),
        cause: source,
    };
    crate::paths::make_dir(path, mode).map_err(err)
}

/// Refuses a `state_dir` that others could change (or, for `serve`, that another user owns):
/// whoever can write there can swap the store or the key store under the daemon.
fn check_state_dir(path: &Path, serving: bool) -> Result<(), ServeError> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).map_err(|source| ServeError::Folder {
        what: "state_dir",
        path: path.to_path_buf(),
        cause: source,
    })?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(ServeError::Unsafe {
            path: path.to_path_buf(),
            problem: format!("state_dir is writable by group or others (mode {mode:o})"),
            fix: format!("chmod go-w {}", path.display()),
        });
    }
    // /proc/self belongs to the process's effective uid.
    let me = fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(meta.uid());
    if serving && meta.uid() != me {
        return Err(ServeError::Unsafe {
            path: path.to_path_buf(),
            problem: format!(
                "state_dir belongs to uid {}, not to the uid smsdrop runs as ({me})",
                meta.uid()
            ),
            fix: format!("chown -R {me} {}", path.display()),
        });
    }
    Ok(())
}

/// Opens the store of `config` (for `serve` and for commands run without it).
pub fn open_store(config: &Config) -> Result<Store, ServeError> {
    make_dir(&config.state_dir, 0o700, "state_dir")?;
    check_state_dir(&config.state_dir, false)?;
    let masters = MasterKeys::load(&crate::service::key_path(config))?;
    let keys = Keyring::open(masters, &config.state_dir)?;
    let tenants: Vec<&str> = config.tenants.keys().map(String::as_str).collect();
    keys.ensure(&tenants)?;
    Ok(Store::open(&config.state_dir, Arc::new(keys))?)
}

/// Runs the appliance until `shutdown` is cancelled; each message on `reloads` (SIGHUP) reads
/// the configuration again ([`crate::reload`]).
pub async fn run(
    config: Arc<Config>,
    shutdown: CancellationToken,
    mut reloads: mpsc::UnboundedReceiver<()>,
) -> Result<(), ServeError> {
    make_dir(&config.state_dir, 0o700, "state_dir")?;
    check_state_dir(&config.state_dir, true)?;
    let fds = crate::limits::descriptors();
    tracing::info!(
        limit = fds.limit,
        clients = fds.budget,
        "file descriptors: clients may hold {} of {}, the rest is kept for the store, the watcher, the admin socket and the log",
        fds.budget,
        fds.limit
    );
    let store = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || open_store(&config))
            .await
            .map_err(|e| ServeError::Admin(io::Error::other(e)))??
    };
    for t in config.tenants.values() {
        make_dir(&t.inbox, 0o770, "inbox")?;
        make_dir(&t.outbox, 0o770, "outbox")?;
        make_dir(&crate::paths::spool_dir(&config.state_dir, &t.id), 0o700, "spool")?;
    }

    let (audit, audit_writer) = Audit::queued(store.clone());
    let audit_stop = CancellationToken::new();
    let audit_task = tokio::spawn(audit_writer.run(audit_stop.clone()));
    audit.record(Event::new("service.start", "smsdrop").detail("version", env!("CARGO_PKG_VERSION")));

    let tracker = TaskTracker::new();
    let workers = CancellationToken::new();
    let cancel_ingest = Arc::new(AtomicBool::new(false));
    // Set while a batch is being ingested: the sweeper gives way.
    let ingesting = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(dispatch::Signal::default());
    let (claimed_tx, claimed_rx) = mpsc::unbounded_channel::<Claimed>();
    let (reports_tx, reports_rx) = mpsc::unbounded_channel::<u64>();
    let board = dispatch::HealthBoard::default();
    let worker_board = Workers::default();
    let live = Live::new(config.clone());
    let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
    let lane = dispatch::Lane::start().map_err(ServeError::Dispatcher)?;
    let fleet = Fleet::start(
        &config.partners,
        incoming_tx,
        tracker.clone(),
        lane.handle(),
        workers.clone(),
    )
    .await?;
    let partners = fleet.subscribe();
    let reloader = Arc::new(Reloader::new(
        live.clone(),
        store.clone(),
        audit.clone(),
        fleet,
        wake.clone(),
    ));

    {
        let path = config.admin_socket.clone();
        let ctx = crate::admin::AdminContext {
            store: store.clone(),
            live: live.clone(),
            dispatch: Some(wake.clone()),
            reports: Some(reports_tx.clone()),
            audit: audit.clone(),
            partners: Some(board.clone()),
            workers: Some(worker_board.clone()),
            reloader: Some(reloader.clone()),
        };
        let stop = workers.clone();
        // Bound before anything else starts: `READY=1` means commands reach this serve.
        let listener = crate::admin::bind(&path).map_err(ServeError::Admin)?;
        tracker.spawn(async move {
            if let Err(e) = crate::admin::serve(listener, path, Arc::new(ctx), stop).await {
                tracing::error!(error = %e, "admin socket failed; commands will not reach this serve");
            }
        });
    }

    let watcher = InboxWatcher {
        config: live.clone(),
        claimed: claimed_tx,
        audit: audit.clone(),
        refused: Default::default(),
    };
    let recovered = watcher.recover();
    forget_stale_claims(&store, &recovered);
    if config.sftp.is_some() {
        for tenant in config.tenants.values() {
            let removed = crate::sftp::world::remove_stale_uploads(&tenant.inbox);
            if removed > 0 {
                tracing::info!(tenant = %tenant.id, files = removed, "uploads cut short by the last stop removed (never acknowledged)");
            }
        }
    }
    if !recovered.is_empty() {
        tracing::info!(files = recovered.len(), "resuming files claimed before the last stop");
    }
    let mail_wake = Arc::new(tokio::sync::Notify::new());
    let alerter = Alerter::new(store.clone(), live.clone(), mail_wake.clone());
    let mailer = match config.email {
        Some(_) => Some(Mailer::new(
            store.clone(),
            live.clone(),
            alerter.clone(),
            mail_wake.clone(),
        )?),
        None => None,
    };
    let background = Background {
        store: store.clone(),
        live: live.clone(),
        audit: audit.clone(),
        alerts: alerter.clone(),
        ingesting: ingesting.clone(),
    };
    background.start(&tracker, &worker_board, mailer, &workers);
    // The ingest worker: one batch at a time, on a blocking thread.
    {
        let (store, live, cancel, wake) = (store.clone(), live.clone(), cancel_ingest.clone(), wake.clone());
        let busy = ingesting.clone();
        let alerter = alerter.clone();
        let audit = audit.clone();
        let mut claimed_rx = claimed_rx;
        tracker.spawn_blocking(move || {
            let ingestor = Ingestor {
                store: &store,
                cancel: &cancel,
                alerts: &alerter,
                audit: &audit,
            };
            let mut queue: std::collections::VecDeque<Claimed> = recovered.into();
            let mut later = Retries::default();
            let runtime = tokio::runtime::Handle::current();
            loop {
                let next = match queue.pop_front().or_else(|| later.due()) {
                    Some(c) => c,
                    None => {
                        let wait = later.wait();
                        match runtime.block_on(tokio::time::timeout(wait, claimed_rx.recv())) {
                            Ok(Some(c)) => c,
                            Ok(None) => break,
                            Err(_) => continue, // a retry is due
                        }
                    }
                };
                if cancel.load(Ordering::Relaxed) {
                    break;
                }
                busy.store(true, Ordering::Relaxed);
                let failed = !ingest_one(&ingestor, &live.get(), &next);
                busy.store(false, Ordering::Relaxed);
                if failed {
                    later.push(next);
                } else {
                    later.done(&next.claim);
                }
                wake.poke();
            }
        });
    }
    let log_opened = {
        let first = partners.borrow().clone();
        let dispatcher = Dispatcher {
            store: store.clone(),
            config: config.clone(),
            live: live.subscribe(),
            partners: first,
            fleet: partners,
            wake: wake.clone(),
            reports: reports_tx,
            incoming: incoming_rx,
            alerts: alerter.clone(),
            board: board.clone(),
        };
        Some(dispatcher.spawn(&tracker, &lane, workers.clone()))
    };
    {
        let writer = ReportWriter {
            store: store.clone(),
            config: live.clone(),
        };
        tracker.spawn(writer.run(reports_rx, workers.clone()));
    }
    let intake = CancellationToken::new();
    tracker.spawn(watcher.run(intake.clone()));
    if let Some(sftp) = crate::sftp::SftpServer::new(live.clone(), store.clone(), alerter.clone(), audit.clone())? {
        let listener = sftp.bind().await?;
        tracker.spawn(sftp.run(listener, intake.clone()));
    }
    if let Some(addr) = config.metrics_listen {
        let listener = crate::exporter::Exporter::bind(addr)
            .await
            .map_err(|source| ServeError::Metrics { addr, cause: source })?;
        let exporter = crate::exporter::Exporter {
            store: store.clone(),
            config: live.clone(),
            partners: board.clone(),
            workers: worker_board.clone(),
        };
        tracing::info!(%addr, "metrics listening (/metrics, /healthz, /readyz)");
        tracker.spawn(exporter.run(listener, workers.clone()));
    }
    tracker.spawn(crate::service::watchdog(store.clone(), workers.clone()));
    {
        let stop = workers.clone();
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    got = reloads.recv() => if got.is_none() { return },
                }
                crate::service::reloading();
                let _ = reloader.reload("SIGHUP").await;
                crate::service::ready("serving");
            }
        });
    }
    tracker.close();
    // Serving means the dispatch log is open: without it nothing could be sent.
    let failure = match log_opened {
        Some(opened) => tokio::select! {
            r = opened => match r {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some("the dispatcher stopped before its log opened".to_string()),
            },
            _ = shutdown.cancelled() => None,
        },
        None => None,
    };
    if let Some(e) = &failure {
        tracing::error!(error = %e, "not serving: the dispatch log cannot be opened; stopping");
        shutdown.cancel();
    }
    if failure.is_none() {
        tracing::info!(
            tenants = config.tenants.len(),
            partners = config.partners.len(),
            admin = %config.admin_socket.display(),
            "smsdrop is serving"
        );
        crate::service::ready(&format!(
            "serving {} tenants through {} partners",
            config.tenants.len(),
            config.partners.len()
        ));
    }

    shutdown.cancelled().await;
    crate::service::stopping();
    tracing::info!("stopping: no new files are taken");
    intake.cancel();
    cancel_ingest.store(true, Ordering::Relaxed);
    workers.cancel();
    if tokio::time::timeout(STOP_DEADLINE, tracker.wait()).await.is_err() {
        tracing::warn!("some workers did not stop in time; what they had not committed is redone at next start");
    }
    lane.finish();
    // Last: the audit writer appends what the others recorded on their way out.
    audit.record(Event::new("service.stop", "smsdrop"));
    drop(audit);
    audit_stop.cancel();
    let _ = audit_task.await;
    drop(store);
    tracing::info!("stopped");
    match failure {
        Some(e) => Err(ServeError::DispatchLog(e)),
        None => Ok(()),
    }
}

/// What the background workers ([`crate::workers`]) work on.
struct Background {
    store: Store,
    live: Live,
    audit: Audit,
    alerts: Alerter,
    /// Set while a batch is being ingested: the sweeper and the re-sealer give way.
    ingesting: Arc<AtomicBool>,
}

impl Background {
    /// Starts the disk watch, the sweeper, the re-sealer, the scheduled backups (with
    /// `[backup]`), the mailer and the daily report (with `[email]`), on `board`.
    fn start(self, tracker: &TaskTracker, board: &Workers, mailer: Option<Mailer>, stop: &CancellationToken) {
        use crate::workers::{backup, disk, mail, reseal, spawn, sweep};
        let config = self.live.get();
        let pace = |every, budget| Pace {
            every,
            budget,
            ingesting: self.ingesting.clone(),
        };
        let disk = disk::DiskWatch {
            config: self.live.clone(),
            store: self.store.clone(),
            alerts: self.alerts.clone(),
        };
        spawn(tracker, board, disk, stop.clone());
        if crate::clock::skew() != 0 {
            tracing::warn!(
                skew_seconds = crate::clock::skew(),
                "{} is set: retention runs on a moved clock",
                crate::clock::SKEW_VAR
            );
        }
        let sweeper = sweep::Sweeper {
            store: self.store.clone(),
            config: self.live.clone(),
            audit: self.audit.clone(),
            pace: pace(sweep::EVERY, sweep::STEPS),
            last_mark: 0,
        };
        spawn(tracker, board, sweeper, stop.clone());
        let resealer = reseal::Resealer {
            store: self.store.clone(),
            audit: self.audit.clone(),
            pace: pace(reseal::EVERY, reseal::STEPS),
            cursor: Default::default(),
        };
        spawn(tracker, board, resealer, stop.clone());
        if let Some(schedule) = config.backup.clone() {
            let backups = backup::Backups {
                store: self.store.clone(),
                config: config.clone(),
                schedule,
                audit: self.audit.clone(),
                next: None,
            };
            spawn(tracker, board, backups, stop.clone());
        }
        if let Some(mailer) = mailer {
            spawn(
                tracker,
                board,
                mail::MailWorker { mailer, started: false },
                stop.clone(),
            );
            if config.email.as_ref().is_some_and(|e| e.daily_report_at.is_some()) {
                let daily = mail::DailyReport {
                    store: self.store,
                    config: self.live,
                    alerts: self.alerts,
                };
                spawn(tracker, board, daily, stop.clone());
            }
        }
    }
}

/// Claims whose spool file is gone: the batch finished (or a partial one was abandoned by hand).
fn forget_stale_claims(store: &Store, recovered: &[Claimed]) {
    let Ok(claims) = store.claims() else { return };
    for claim in claims.iter().filter(|c| !recovered.iter().any(|r| &r.claim == *c)) {
        let result = store.batch_by_claim(claim).and_then(|batch| match batch {
            Some(b) if b.state == crate::store::records::BatchState::Ingesting => store.discard_batch(&b),
            _ => store.forget_claim(claim),
        });
        if let Err(e) = result {
            tracing::warn!(claim = %claim, error = %e, "cannot forget a stale claim");
        }
    }
}

/// Spool files whose ingest failed (the store or the outbox could not be written: a full disk,
/// say), taken again later, each after 5 s, then twice as long each time up to a minute. Taken
/// again as after a crash: a batch cut short is discarded, a committed one only published.
#[derive(Default)]
struct Retries {
    waiting: Vec<(tokio::time::Instant, Claimed)>,
    delays: std::collections::HashMap<String, Duration>,
}

impl Retries {
    const FIRST: Duration = Duration::from_secs(5);
    const MAX: Duration = Duration::from_secs(60);

    fn push(&mut self, mut claimed: Claimed) {
        let delay = self.delays.entry(claimed.claim.clone()).or_insert(Self::FIRST / 2);
        *delay = (*delay * 2).min(Self::MAX);
        tracing::warn!(
            tenant = %claimed.tenant, file = %claimed.file_name,
            "the file stays in the spool and is taken again in {} s", delay.as_secs()
        );
        claimed.recovered = true;
        self.waiting.push((tokio::time::Instant::now() + *delay, claimed));
    }

    fn done(&mut self, claim: &str) {
        self.delays.remove(claim);
    }

    /// The first retry that is due, if any.
    fn due(&mut self) -> Option<Claimed> {
        let now = tokio::time::Instant::now();
        let i = self.waiting.iter().position(|(at, _)| *at <= now)?;
        Some(self.waiting.swap_remove(i).1)
    }

    /// How long until the next retry is due (a long nap when none waits).
    fn wait(&self) -> Duration {
        let now = tokio::time::Instant::now();
        self.waiting
            .iter()
            .map(|(at, _)| at.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(3600))
    }
}

/// Ingests one claimed file; `false` when it failed and should be taken again later.
fn ingest_one(ingestor: &Ingestor<'_>, config: &Config, claimed: &Claimed) -> bool {
    let Some(tenant) = config.tenants.get(&claimed.tenant) else {
        tracing::error!(tenant = %claimed.tenant, file = %claimed.file_name, "spool file of a tenant no longer configured; left in place");
        return true;
    };
    let result = if claimed.recovered {
        ingestor.recover_claim(tenant, &claimed.spool, &claimed.claim, &claimed.file_name)
    } else {
        ingestor.ingest_claimed(tenant, &claimed.spool, &claimed.claim, &claimed.file_name)
    };
    match result {
        Ok(batch) => crate::metrics::events().batch(&crate::metrics::BatchCounts {
            tenant: &batch.tenant,
            file_reason: batch.file_reason,
            accepted: batch.accepted,
            rejected: batch.rejected,
            reasons: &batch.reasons,
        }),
        Err(IngestError::Cancelled) => {
            tracing::info!(tenant = %tenant.id, file = %claimed.file_name, "ingest cut short by shutdown; resumed at next start")
        }
        Err(e) => {
            tracing::error!(tenant = %tenant.id, file = %claimed.file_name, error = %e, "cannot ingest the file");
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimed(claim: &str) -> Claimed {
        Claimed {
            tenant: "acme".into(),
            spool: std::path::PathBuf::from("/nonexistent"),
            claim: claim.into(),
            file_name: "june.csv".into(),
            recovered: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_file_is_retried_after_5_s_then_twice_as_long_up_to_a_minute() {
        let mut retries = Retries::default();
        let mut waits = Vec::new();
        for _ in 0..6 {
            retries.push(claimed("c1"));
            let wait = retries.wait();
            waits.push(wait.as_secs());
            tokio::time::advance(wait - Duration::from_millis(1)).await;
            assert!(retries.due().is_none(), "not due a millisecond early");
            tokio::time::advance(Duration::from_millis(1)).await;
            let due = retries.due().expect("due on time");
            assert!(due.recovered, "a retry is taken as after a crash");
        }
        assert_eq!(waits, [5, 10, 20, 40, 60, 60]);
        // Once the file went through, its next failure starts again at 5 s; others keep theirs.
        retries.push(claimed("c2"));
        retries.done("c1");
        retries.push(claimed("c1"));
        assert_eq!(retries.wait(), Duration::from_secs(5));
        assert_eq!(retries.waiting.len(), 2);
        assert_eq!(
            Retries::default().wait(),
            Duration::from_secs(3600),
            "a long nap when none waits"
        );
    }
}
