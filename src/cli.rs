//! The command line (docs/cli.md): parses arguments and runs one command.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::admin::{self, KeyChange, Request};
use crate::config::{self, Config, LogFormat};
use crate::crypto::{KeyFileText, MasterKeys};
use crate::server;
use crate::store::StoreError;

#[derive(Debug, Parser)]
#[command(
    name = "smsdrop",
    version,
    about = "Takes batches of SMS from business systems and delivers them through telecom partners"
)]
pub struct Cli {
    /// The configuration file.
    #[arg(long, global = true, env = "SMSDROP_CONFIG", default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the appliance.
    Serve,
    /// Write the man page (smsdrop.8) and shell completions (bash, zsh, fish) into DIR, from
    /// this command line's own definition (used by `make deb`).
    #[command(hide = true)]
    Generate { dir: PathBuf },
    /// Validate the configuration; exits non-zero with the reasons.
    CheckConfig,
    /// Make the running `serve` read its configuration again (as SIGHUP does) and print what
    /// changed; a configuration with errors is refused and the running one kept.
    Reload,
    /// Write a new master key (refuses to overwrite one).
    Keygen {
        /// Where to write it (default: the configuration's `key_file`).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Dry run: print the result file a batch would get; queues nothing.
    Validate {
        #[arg(long)]
        tenant: String,
        file: PathBuf,
    },
    /// Queue depth by tenant and status.
    Status,
    /// Batches: list, show, release a held one, cancel what is not sent.
    Batch {
        #[command(subcommand)]
        action: BatchAction,
    },
    /// Opt-out lists: numbers that are never sent to.
    Blocklist {
        #[command(subcommand)]
        action: BlocklistAction,
    },
    /// A data subject's requests: everything held about a number, or its erasure.
    Subject {
        #[command(subcommand)]
        action: SubjectAction,
    },
    /// The audit log: check its hash chain, or export it.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
    /// Write a consistent, encrypted snapshot of the store to FILE (also while `serve` runs).
    Backup {
        /// Where to write it; an existing file is never overwritten.
        file: PathBuf,
    },
    /// Restore a backup into the configuration's `state_dir`, which must hold no store.
    Restore { file: PathBuf },
    /// Master key versions: add one, destroy an old one, or show them.
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Tenants no longer configured: delete everything they left, and their keys.
    Tenant {
        #[command(subcommand)]
        action: TenantAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyAction {
    /// Add a new master key version to the key file; the tenant key store and new backups are
    /// sealed under it from now on.
    Rotate,
    /// Destroy an old master key version: backups taken under it no longer open.
    Retire {
        #[arg(long)]
        version: u8,
    },
    /// The versions in the key file and what uses them.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum TenantAction {
    /// Delete every record of a tenant removed from the configuration, then destroy its keys.
    Purge { tenant: String },
}

#[derive(Debug, Subcommand)]
pub enum SubjectAction {
    /// Print, as JSON, every message, status, reply and blocklist entry held for the number.
    Export {
        #[arg(long)]
        phone: String,
        /// Only this tenant (default: every tenant, each under its id).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Erase all of it; messages not yet sent are canceled.
    Erase {
        #[arg(long)]
        phone: String,
        #[arg(long)]
        tenant: Option<String>,
        /// Then put the number on the blocklist (as its keyed hash only).
        #[arg(long)]
        block: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditAction {
    /// Check that no entry was changed, removed or reordered; exits non-zero naming the first bad one.
    Verify,
    /// Print entries as JSON lines, oldest first.
    Export {
        /// From when: an RFC 3339 time (`2026-11-25T08:00:00Z`), a date (`2026-11-25`, UTC) or a
        /// duration back from now (`24h`, `30d`). Default: everything.
        #[arg(long, value_parser = parse_since)]
        since: Option<i64>,
        /// Only this tenant's entries.
        #[arg(long)]
        tenant: Option<String>,
    },
}

/// `--since` as unix milliseconds.
fn parse_since(s: &str) -> Result<i64, String> {
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t.as_millisecond());
    }
    if let Ok(d) = s.parse::<jiff::civil::Date>() {
        return jiff::tz::TimeZone::UTC
            .to_timestamp(d.to_datetime(jiff::civil::Time::midnight()))
            .map(|t| t.as_millisecond())
            .map_err(|e| e.to_string());
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(crate::clock::now_ms() - d.as_millis().min(i64::MAX as u128) as i64),
        Err(_) => Err(format!(
            "`{s}` is neither a time (2026-11-25T08:00:00Z), a date (2026-11-25) nor a duration (24h)"
        )),
    }
}

#[derive(Debug, Subcommand)]
pub enum BatchAction {
    /// Every batch, or one tenant's.
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// One batch in detail: counts by reason and by status.
    Show { id: u64 },
    /// Queue a held batch's messages for sending.
    Release { id: u64 },
    /// Cancel what a batch has not sent yet.
    Cancel { id: u64 },
}

/// Which opt-out list: a tenant's, or the global one across tenants.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct ListChoice {
    #[arg(long)]
    tenant: Option<String>,
    /// The global list, which every tenant's batches are checked against (numbers in
    /// international form: `+33612345678`).
    #[arg(long)]
    global: bool,
}

#[derive(Debug, Subcommand)]
pub enum BlocklistAction {
    /// Put a number on a blocklist (stored as a keyed hash only).
    Add {
        #[command(flatten)]
        list: ListChoice,
        #[arg(long)]
        phone: String,
    },
    /// Take a number off a blocklist.
    Remove {
        #[command(flatten)]
        list: ListChoice,
        #[arg(long)]
        phone: String,
    },
    /// List a blocklist's entries (number hashes; the numbers themselves are not stored).
    List {
        #[command(flatten)]
        list: ListChoice,
    },
    /// Put every number of a file (one per line; `#` comments) on a blocklist.
    Import {
        #[command(flatten)]
        list: ListChoice,
        file: PathBuf,
    },
}

/// Runs the parsed command; the process exit code follows the result.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let path = cli.config.as_path();
    match cli.command {
        Command::Generate { dir } => generate(&dir),
        Command::CheckConfig => check_config(path),
        Command::Keygen { out } => keygen(path, out),
        Command::Serve => serve(path),
        Command::Reload => reload(path),
        Command::Backup { file } => backup(path, &file),
        Command::Restore { file } => restore(path, &file),
        Command::Validate { tenant, file } => send(path, |_| {
            let file = std::fs::canonicalize(&file).with_context(|| format!("{}", file.display()))?;
            Ok(Request::Validate { tenant, path: file })
        }),
        Command::Status => send(path, |_| Ok(Request::Status)),
        Command::Batch { action } => send(path, |_| Ok(batch_request(action))),
        Command::Blocklist { action } => send(path, |_| blocklist_request(action)),
        Command::Subject { action } => send(path, |_| Ok(subject_request(action))),
        Command::Key { action } => send(path, |config| key_request(path, config, action)),
        Command::Tenant {
            action: TenantAction::Purge { tenant },
        } => send(path, |_| Ok(Request::TenantPurge { tenant })),
        Command::Audit { action } => send(path, |_| Ok(audit_request(action))),
    }
}

/// Reads the configuration, makes the command's request, runs it (through a running `serve`
/// or on the store) and prints the answer.
fn send(path: &Path, request: impl FnOnce(&Config) -> anyhow::Result<Request>) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let request = request(&config)?;
    let out = with_store(config, request)?;
    std::io::stdout().write_all(&out)?;
    Ok(())
}

/// `smsdrop check-config`.
fn check_config(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    if !config.routes.iter().any(|r| r.prefix.is_empty()) && !config.tenants.is_empty() {
        eprintln!("warning: no route with prefix \"\": numbers no route matches will fail");
    }
    println!(
        "{}: ok ({} tenants, {} partners, {} routes)",
        path.display(),
        config.tenants.len(),
        config.partners.len(),
        config.routes.len()
    );
    Ok(())
}

/// `smsdrop keygen`: to `--out`, or to the configuration's `key_file`.
fn keygen(config: &Path, out: Option<PathBuf>) -> anyhow::Result<()> {
    let path = match out {
        Some(p) => p,
        None => Config::load(config)
            .map(|c| c.key_file)
            .context("no --out given and the configuration cannot be read for `key_file`")?,
    };
    MasterKeys::generate(&path)?;
    println!(
        "wrote a new master key to {} (mode 0600): back it up, it opens every record",
        path.display()
    );
    Ok(())
}

/// `smsdrop reload`: only a running `serve` can.
fn reload(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path).context("the running configuration is kept")?;
    match admin::ask(&config.admin_socket, &Request::Reload)? {
        Some(out) => {
            std::io::stdout().write_all(&out)?;
            Ok(())
        }
        None => Err(admin::AdminError::NotServing.into()),
    }
}

fn batch_request(action: BatchAction) -> Request {
    match action {
        BatchAction::List { tenant } => Request::BatchList { tenant },
        BatchAction::Show { id } => Request::BatchShow { id },
        BatchAction::Release { id } => Request::BatchRelease { id },
        BatchAction::Cancel { id } => Request::BatchCancel { id },
    }
}

fn blocklist_request(action: BlocklistAction) -> anyhow::Result<Request> {
    Ok(match action {
        BlocklistAction::Add { list, phone } => Request::BlocklistAdd {
            tenant: list.tenant,
            phone,
        },
        BlocklistAction::Remove { list, phone } => Request::BlocklistRemove {
            tenant: list.tenant,
            phone,
        },
        BlocklistAction::List { list } => Request::BlocklistList { tenant: list.tenant },
        BlocklistAction::Import { list, file } => Request::BlocklistImport {
            tenant: list.tenant,
            path: std::fs::canonicalize(&file).with_context(|| format!("{}", file.display()))?,
        },
    })
}

fn subject_request(action: SubjectAction) -> Request {
    match action {
        SubjectAction::Export { phone, tenant } => Request::SubjectExport { phone, tenant },
        SubjectAction::Erase { phone, tenant, block } => Request::SubjectErase { phone, tenant, block },
    }
}

fn audit_request(action: AuditAction) -> Request {
    match action {
        AuditAction::Verify => Request::AuditVerify,
        AuditAction::Export { since, tenant } => Request::AuditExport {
            since: since.unwrap_or(i64::MIN),
            tenant,
        },
    }
}

/// `smsdrop key status|rotate|retire`: the key file changes here (the command runs as the
/// key's owner), then `serve` (or the store) is told.
fn key_request(path: &Path, config: &Config, action: KeyAction) -> anyhow::Result<Request> {
    Ok(match action {
        KeyAction::Status => Request::KeyStatus,
        KeyAction::Rotate => {
            let mut masters = MasterKeys::load(&config.key_file)?;
            let version = masters.add_version()?;
            masters.save(&config.key_file)?;
            println!("master key version {version} added to {}", config.key_file.display());
            Request::KeyReload {
                action: KeyChange::Rotate,
                version,
                key: Some(KeyFileText::read(&config.key_file)?),
            }
        }
        KeyAction::Retire { version } => {
            // Everything in state_dir under the newest version first, then the old one goes.
            with_store(
                Config::load(path)?,
                Request::KeyReload {
                    action: KeyChange::Check,
                    version,
                    key: Some(KeyFileText::read(&config.key_file)?),
                },
            )?;
            let mut masters = MasterKeys::load(&config.key_file)?;
            masters.retire(version)?;
            masters.save(&config.key_file)?;
            println!(
                "master key version {version} destroyed in {}: backups taken under it no longer open",
                config.key_file.display()
            );
            Request::KeyReload {
                action: KeyChange::Retire,
                version,
                key: Some(KeyFileText::read(&config.key_file)?),
            }
        }
    })
}

/// `smsdrop backup FILE`: streamed by a running `serve`, or taken from the store.
fn backup(path: &Path, file: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    if file.exists() {
        bail!("{} exists: a backup never overwrites a file", file.display());
    }
    let summary = match admin::ask_backup(&config.admin_socket, file)? {
        Some(summary) => summary,
        None => {
            let store = offline_store(&config)?;
            let now = jiff::Timestamp::now().as_second();
            let result = store.backup_to_file(file, &config.backup_files(), now);
            let mut event = crate::audit::Event::new("admin.backup", cli_actor()?);
            event.push("result", if result.is_ok() { "ok" } else { "failed" });
            if let Ok(s) = &result {
                event.push("entries", s.entries);
                event.push("bytes", s.bytes);
            }
            event.record(&crate::audit::Audit::direct(store));
            result?
        }
    };
    println!(
        "backup written to {}: {} batches, {} records, {} bytes (sealed under the master key: keep the key apart)",
        file.display(),
        summary.batches,
        summary.entries,
        summary.bytes
    );
    Ok(())
}

/// `smsdrop restore FILE`: into an empty `state_dir`, then the audit chain checked.
fn restore(path: &Path, file: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let keys = Arc::new(crate::crypto::Keyring::in_memory(MasterKeys::load(&config.key_file)?));
    let input = std::fs::File::open(file).with_context(|| format!("{}", file.display()))?;
    let summary = crate::store::backup::restore(input, &config.state_dir, keys, &config.backup_files())
        .with_context(|| format!("restoring {}", file.display()))?;
    let store = offline_store(&config)?;
    let chain = store.audit_verify()?;
    crate::audit::Event::new("backup.restore", cli_actor()?)
        .detail("file", file.display())
        .detail("batches", summary.batches)
        .detail("entries", summary.entries)
        .record(&crate::audit::Audit::direct(store));
    let taken = jiff::Timestamp::from_second(summary.created_at)
        .map(|t| t.to_string())
        .unwrap_or_default();
    println!(
        "restored {} into {}: backup of {taken}, {} batches, {} records{}",
        file.display(),
        config.state_dir.display(),
        summary.batches,
        summary.entries,
        if summary.files.is_empty() {
            String::new()
        } else {
            format!(", files: {}", summary.files.join(", "))
        }
    );
    match chain {
        crate::store::ChainCheck::Intact { entries } => println!("audit log intact: {entries} entries"),
        crate::store::ChainCheck::Broken { seq, reason } => {
            bail!("the restored audit log is broken at entry {seq}: {reason}")
        }
    }
    Ok(())
}

fn offline_store(config: &Config) -> anyhow::Result<crate::store::Store> {
    match server::open_store(config) {
        Ok(s) => Ok(s),
        Err(server::ServeError::Store(StoreError::Locked)) => {
            bail!(
                "the database is in use but {} does not answer",
                config.admin_socket.display()
            )
        }
        Err(e) => Err(e.into()),
    }
}

/// Who runs this command, for the audit log.
fn cli_actor() -> anyhow::Result<String> {
    let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?);
    Ok(format!("cli uid {uid}"))
}

/// Runs a request through a running `serve`, or against the store directly when none runs.
fn with_store(config: Config, request: Request) -> anyhow::Result<Vec<u8>> {
    if let Some(out) = admin::ask(&config.admin_socket, &request)? {
        return Ok(out);
    }
    let store = offline_store(&config)?;
    let ctx = admin::AdminContext {
        audit: crate::audit::Audit::direct(store.clone()),
        store,
        live: crate::config::Live::new(Arc::new(config)),
        dispatch: None,
        reports: None,
        partners: None,
        workers: None,
        reloader: None,
    };
    Ok(admin::handle(&ctx, &request, &cli_actor()?)?)
}

/// Logs to stderr: `RUST_LOG` if set, else the configuration's `log_filter`. Under systemd
/// (`JOURNAL_STREAM` set) text lines carry no time stamp and no colour: the journal stamps them.
fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!journal && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match (format, journal) {
        (LogFormat::Json, _) => builder.json().init(),
        (LogFormat::Text, true) => builder.without_time().init(),
        (LogFormat::Text, false) => builder.init(),
    }
}

/// The man page and completions, generated from the clap definition so they never drift.
fn generate(dir: &Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    let cmd = Cli::command().long_about(
        "smsdrop takes CSV batches of SMS from business systems (over its own SFTP server or a \
         watched folder), validates them line by line, queues accepted messages in an encrypted \
         store and delivers them through telecom partners over SMPP or HTTP, writing result, \
         delivery-report and reply files back for the sender. The configuration is \
         /etc/smsdrop/smsdrop.toml; the service runs as `smsdrop.service`.",
    );
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).section("8").render(&mut page)?;
    std::fs::write(dir.join("smsdrop.8"), page)?;
    for (shell, name) in [
        (clap_complete::Shell::Bash, "smsdrop"),
        (clap_complete::Shell::Zsh, "_smsdrop"),
        (clap_complete::Shell::Fish, "smsdrop.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "smsdrop", &mut out);
        std::fs::write(dir.join(name), out)?;
    }
    Ok(())
}

fn serve(path: &Path) -> anyhow::Result<()> {
    let config = Arc::new(Config::load(path)?);
    init_logging(config.log_format, &config.log_filter);
    // A half-dead daemon is worse than a restarted one: log the panic, then abort.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!("panic: {info}");
        default_hook(info);
        std::process::abort();
    }));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        use tokio::signal::unix::{SignalKind, signal};
        // Listened for before anything starts: SIGHUP's default action would end the daemon.
        let signals = |kind| signal(kind).map_err(server::ServeError::Signals);
        let (mut term, mut hup) = (signals(SignalKind::terminate())?, signals(SignalKind::hangup())?);
        let (reload_tx, reloads) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                    _ = hup.recv() => {
                        tracing::info!("SIGHUP received: reading the configuration again");
                        let _ = reload_tx.send(());
                        continue;
                    }
                }
                trigger.cancel();
                return;
            }
        });
        server::run(config, shutdown, reloads).await
    })?;
    Ok(())
}
