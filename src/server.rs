//! `smsdrop serve`: wiring only. It starts the parts and stops them in order.
//!
//! Start ([`start`]): the state folders are checked and the store opened, then the admin socket
//! is bound (so `READY=1` means commands reach this serve). Next come what the last stop left
//! (spool files, stale claims, cut uploads), the background workers, the ingest worker, the
//! dispatcher and the report writer. The ways in (the inbox watcher, SFTP) and the exporter
//! start last. The service says it is serving once the dispatch log is open ([`serving`]).
//!
//! Stop ([`Running::stop`]): intake first (no new file is taken), then the batch being ingested
//! is cut short (it is redone from the spool at next start) and every worker stops (the
//! dispatcher commits its step). Then the dispatcher's thread ends, the audit writer appends
//! the last events, and the store closes.

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
    reloads: mpsc::UnboundedReceiver<()>,
) -> Result<(), ServeError> {
    let store = prepare(&config).await?;
    let (audit, audit_writer) = Audit::queued(store.clone());
    let audit_stop = CancellationToken::new();
    let audit_task = tokio::spawn(audit_writer.run(audit_stop.clone()));
    audit.record(Event::new("service.start", "smsdrop").detail("version", env!("CARGO_PKG_VERSION")));

    let (running, log_opened) = start(&config, &store, &audit, reloads).await?;
    // Serving means the dispatch log is open: without it nothing could be sent.
    let failure = serving(&config, log_opened, &shutdown).await;
    shutdown.cancelled().await;
    running.stop().await;
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

/// The state folders checked, the store opened, every tenant's folders made.
async fn prepare(config: &Arc<Config>) -> Result<Store, ServeError> {
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
        make_dir(&t.folders.inbox, 0o770, "inbox")?;
        make_dir(&t.folders.outbox, 0o770, "outbox")?;
        make_dir(&crate::paths::spool_dir(&config.state_dir, &t.id), 0o700, "spool")?;
    }
    Ok(store)
}

/// What every part is wired with.
#[derive(Clone)]
struct Wiring {
    store: Store,
    live: Live,
    audit: Audit,
    alerts: Alerter,
    /// The dispatcher's doorbell.
    wake: Arc<dispatch::Signal>,
    /// Partner health, as the dispatcher publishes it.
    health: dispatch::HealthBoard,
    /// The background workers' board.
    workers: Workers,
    /// Set while a batch is being ingested: the sweeper and the re-sealer give way.
    ingesting: Arc<AtomicBool>,
    /// Batches whose final report is due.
    reports: crate::reply::ReportRequests,
}

/// Everything `serve` started, for an ordered stop.
struct Running {
    tracker: TaskTracker,
    /// Cancelled first: the watcher and the SFTP server take no new file.
    intake: CancellationToken,
    /// Cuts the batch being ingested short (it is redone from the spool at next start).
    cancel_ingest: Arc<AtomicBool>,
    /// Cancelled next: every worker; the dispatcher finishes and commits its step.
    workers: CancellationToken,
    lane: dispatch::Lane,
}

/// Starts every part, the admin socket first and the ways in last. Returns what to stop, and
/// whether the dispatch log opened.
async fn start(
    config: &Arc<Config>,
    store: &Store,
    audit: &Audit,
    reloads: mpsc::UnboundedReceiver<()>,
) -> Result<(Running, LogOpened), ServeError> {
    let running = Running {
        tracker: TaskTracker::new(),
        intake: CancellationToken::new(),
        cancel_ingest: Arc::new(AtomicBool::new(false)),
        workers: CancellationToken::new(),
        lane: dispatch::Lane::start().map_err(ServeError::Dispatcher)?,
    };
    let (tracker, stop) = (&running.tracker, &running.workers);
    let live = Live::new(config.clone());
    let mail_wake = Arc::new(tokio::sync::Notify::new());
    let (reports_tx, reports_rx) = mpsc::unbounded_channel::<u64>();
    let wiring = Wiring {
        store: store.clone(),
        alerts: Alerter::new(store.clone(), live.clone(), mail_wake.clone()),
        live,
        audit: audit.clone(),
        wake: Arc::new(dispatch::Signal::default()),
        health: dispatch::HealthBoard::default(),
        workers: Workers::default(),
        ingesting: Arc::new(AtomicBool::new(false)),
        reports: reports_tx,
    };
    let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
    let fleet = Fleet::start(
        &config.partners,
        incoming_tx,
        tracker.clone(),
        running.lane.handle(),
        stop.clone(),
    )
    .await?;
    let partners = fleet.subscribe();
    let reloader = Arc::new(Reloader::new(
        wiring.live.clone(),
        store.clone(),
        audit.clone(),
        fleet,
        wiring.wake.clone(),
    ));
    // Bound before anything else starts: `READY=1` means commands reach this serve.
    start_admin(config, &wiring, reloader.clone(), tracker, stop)?;

    let (claimed_tx, claimed_rx) = mpsc::unbounded_channel::<Claimed>();
    let board = wiring.workers.clone();
    let watcher = InboxWatcher {
        config: wiring.live.clone(),
        claimed: claimed_tx,
        audit: audit.clone(),
        scanned: Box::new(move |scan| board.record("inbox-watch", scan)),
        refused: Default::default(),
    };
    let recovered = recover_intake(config, store, &watcher);
    let mailer = match config.email {
        Some(_) => Some(Mailer::new(
            store.clone(),
            wiring.live.clone(),
            wiring.alerts.clone(),
            mail_wake,
        )?),
        None => None,
    };
    wiring.start_background(tracker, mailer, stop);
    let ingest = crate::workers::ingest::IngestWorker {
        store: store.clone(),
        live: wiring.live.clone(),
        alerts: wiring.alerts.clone(),
        audit: audit.clone(),
        wake: wiring.wake.clone(),
        ingesting: wiring.ingesting.clone(),
        cancel: running.cancel_ingest.clone(),
    };
    ingest.spawn(tracker, claimed_rx, recovered);
    let first = partners.borrow().clone();
    let dispatcher = Dispatcher {
        store: store.clone(),
        config: config.clone(),
        live: wiring.live.subscribe(),
        partners: first,
        fleet: partners,
        wake: wiring.wake.clone(),
        reports: wiring.reports.clone(),
        incoming: incoming_rx,
        alerts: wiring.alerts.clone(),
        board: wiring.health.clone(),
    };
    let log_opened = dispatcher.spawn(tracker, &running.lane, stop.clone());
    let writer = ReportWriter {
        store: store.clone(),
        config: wiring.live.clone(),
    };
    tracker.spawn(writer.run(reports_rx, stop.clone()));
    tracker.spawn(watcher.run(running.intake.clone()));
    if let Some(sftp) =
        crate::sftp::SftpServer::new(wiring.live.clone(), store.clone(), wiring.alerts.clone(), audit.clone())?
    {
        let listener = sftp.bind().await?;
        tracker.spawn(sftp.run(listener, running.intake.clone()));
    }
    start_exporter(config, &wiring, tracker, stop).await?;
    tracker.spawn(crate::service::watchdog(store.clone(), stop.clone()));
    tracker.spawn(follow_reloads(reloader, reloads, stop.clone()));
    tracker.close();
    Ok((running, log_opened))
}

impl Running {
    /// Stops in order: the ways in first, then the batch being ingested and every worker (the
    /// dispatcher commits its step), then the dispatcher's thread. The store closes after.
    async fn stop(self) {
        crate::service::stopping();
        tracing::info!("stopping: no new files are taken");
        self.intake.cancel();
        self.cancel_ingest.store(true, Ordering::Relaxed);
        self.workers.cancel();
        if tokio::time::timeout(STOP_DEADLINE, self.tracker.wait()).await.is_err() {
            tracing::warn!("some workers did not stop in time; what they had not committed is redone at next start");
        }
        self.lane.finish();
    }
}

/// Whether the dispatch log opened (`Err` with why not).
type LogOpened = tokio::sync::oneshot::Receiver<Result<(), String>>;

/// Waits until the dispatch log is open, then says `serve` is serving (log and systemd). On a
/// log that cannot open, cancels `shutdown` and returns why.
async fn serving(config: &Config, log_opened: LogOpened, shutdown: &CancellationToken) -> Option<String> {
    let failure = tokio::select! {
        r = log_opened => match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some("the dispatcher stopped before its log opened".to_string()),
        },
        _ = shutdown.cancelled() => None,
    };
    match &failure {
        Some(e) => {
            tracing::error!(error = %e, "not serving: the dispatch log cannot be opened; stopping");
            shutdown.cancel();
        }
        None => {
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
    }
    failure
}

/// Binds the admin socket and serves it.
fn start_admin(
    config: &Config,
    wiring: &Wiring,
    reloader: Arc<Reloader>,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) -> Result<(), ServeError> {
    let path = config.admin_socket.clone();
    let ctx = crate::admin::AdminContext {
        store: wiring.store.clone(),
        live: wiring.live.clone(),
        dispatch: Some(wiring.wake.clone()),
        reports: Some(wiring.reports.clone()),
        audit: wiring.audit.clone(),
        partners: Some(wiring.health.clone()),
        workers: Some(wiring.workers.clone()),
        reloader: Some(reloader),
    };
    let listener = crate::admin::bind(&path).map_err(ServeError::Admin)?;
    let stop = stop.clone();
    tracker.spawn(async move {
        if let Err(e) = crate::admin::serve(listener, path, Arc::new(ctx), stop).await {
            tracing::error!(error = %e, "admin socket failed; commands will not reach this serve");
        }
    });
    Ok(())
}

/// What the last stop left: files claimed into the spool (returned, to be ingested first),
/// claims whose file is gone, uploads cut short.
fn recover_intake(config: &Config, store: &Store, watcher: &InboxWatcher) -> Vec<Claimed> {
    let recovered = watcher.recover();
    crate::workers::ingest::forget_stale_claims(store, &recovered);
    if config.sftp.is_some() {
        for tenant in config.tenants.values() {
            let removed = crate::sftp::world::remove_stale_uploads(&tenant.folders.inbox);
            if removed > 0 {
                tracing::info!(tenant = %tenant.id, files = removed, "uploads cut short by the last stop removed (never acknowledged)");
            }
        }
    }
    if !recovered.is_empty() {
        tracing::info!(files = recovered.len(), "resuming files claimed before the last stop");
    }
    recovered
}

/// `[metrics] listen`: the exporter.
async fn start_exporter(
    config: &Config,
    wiring: &Wiring,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) -> Result<(), ServeError> {
    let Some(addr) = config.metrics_listen else {
        return Ok(());
    };
    let listener = crate::exporter::Exporter::bind(addr)
        .await
        .map_err(|source| ServeError::Metrics { addr, cause: source })?;
    let exporter = crate::exporter::Exporter {
        store: wiring.store.clone(),
        config: wiring.live.clone(),
        partners: wiring.health.clone(),
        workers: wiring.workers.clone(),
    };
    // The address bound, not the one asked for: `127.0.0.1:0` takes any free port.
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %bound, "metrics listening (/metrics, /healthz, /readyz)");
    tracker.spawn(exporter.run(listener, stop.clone()));
    Ok(())
}

/// SIGHUP: reads the configuration again, telling systemd while it does.
async fn follow_reloads(reloader: Arc<Reloader>, mut reloads: mpsc::UnboundedReceiver<()>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            got = reloads.recv() => if got.is_none() { return },
        }
        crate::service::reloading();
        let _ = reloader.reload("SIGHUP").await;
        crate::service::ready("serving");
    }
}

impl Wiring {
    /// Starts the disk watch, the sweeper, the re-sealer, the scheduled backups (with
    /// `[backup]`), the mailer and the daily report (with `[email]`), on `board`.
    fn start_background(&self, tracker: &TaskTracker, mailer: Option<Mailer>, stop: &CancellationToken) {
        use crate::workers::{backup, disk, mail, reseal, spawn, sweep};
        let board = &self.workers;
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
                    store: self.store.clone(),
                    config: self.live.clone(),
                    alerts: self.alerts.clone(),
                };
                spawn(tracker, board, daily, stop.clone());
            }
        }
    }
}
