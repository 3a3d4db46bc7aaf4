//! The admin socket: how commands reach a running `serve` (docs/cli.md).
//!
//! redb lets one process open the database, so while `serve` runs, commands that need the data
//! ask it over a Unix socket (mode 0600, `[admin] socket`). The protocol is one JSON request line,
//! answered by one JSON header line and, for answers with a body, that many raw bytes. When no
//! `serve` answers, commands open the store themselves. Both paths run the same functions here.

use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::audit::{Audit, Event};
use crate::config::Config;
use crate::ingest::{self, DryRunSink};
use crate::sms::codes::MessageStatus;
use crate::store::records::BatchState;
use crate::store::{ChainCheck, Store, StoreError};

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 << 10;

/// What a `key-reload` follows: a new master key version, a check before one is retired, or a
/// retired one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyChange {
    Rotate,
    Check,
    Retire,
}

impl KeyChange {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyChange::Rotate => "rotate",
            KeyChange::Check => "check",
            KeyChange::Retire => "retire",
        }
    }
}

impl std::fmt::Display for KeyChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Validate {
        tenant: String,
        path: PathBuf,
    },
    /// `tenant: None` is the global list (across tenants) in these four.
    BlocklistAdd {
        tenant: Option<String>,
        phone: String,
    },
    BlocklistRemove {
        tenant: Option<String>,
        phone: String,
    },
    BlocklistList {
        tenant: Option<String>,
    },
    /// Numbers from a file, one per line (`#` comments and blank lines skipped).
    BlocklistImport {
        tenant: Option<String>,
        path: PathBuf,
    },
    BatchList {
        tenant: Option<String>,
    },
    BatchShow {
        id: u64,
    },
    BatchRelease {
        id: u64,
    },
    BatchCancel {
        id: u64,
    },
    /// Everything held about a number, in one tenant or all.
    SubjectExport {
        phone: String,
        tenant: Option<String>,
    },
    /// Erases it; `block` puts the number's keyed hash on the blocklist afterwards.
    SubjectErase {
        phone: String,
        tenant: Option<String>,
        block: bool,
    },
    AuditVerify,
    /// A snapshot of the store, streamed back (see [`crate::store::backup`]).
    Backup,
    /// The key file changed (`action`: `rotate` to `version`, or `retire` of it): read it again
    /// and re-seal the tenant key store under its newest version.
    KeyReload {
        action: KeyChange,
        version: u8,
        /// The key file as the command read it: under systemd `serve` cannot read the file
        /// (root's), only the credential copy it was started with.
        key: Option<crate::crypto::KeyFileText>,
    },
    KeyStatus,
    /// Reads the configuration file again and applies it (only to a running `serve`).
    Reload,
    /// Deletes every record of a tenant no longer in the configuration, then its keys.
    TenantPurge {
        tenant: String,
    },
    /// Entries from `since` (unix milliseconds), of one tenant or all.
    AuditExport {
        since: i64,
        tenant: Option<String>,
    },
}

impl Request {
    /// Whether the command only reads the store (and may be answered again after a reopening).
    fn reads_only(&self) -> bool {
        matches!(
            self,
            Request::Status
                | Request::BlocklistList { .. }
                | Request::BatchList { .. }
                | Request::BatchShow { .. }
                | Request::SubjectExport { .. }
                | Request::AuditVerify
                | Request::KeyStatus
                | Request::AuditExport { .. }
        )
    }

    /// The command's name in the audit log.
    fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Validate { .. } => "validate",
            Request::BlocklistAdd { .. } => "blocklist-add",
            Request::BlocklistRemove { .. } => "blocklist-remove",
            Request::BlocklistList { .. } => "blocklist-list",
            Request::BlocklistImport { .. } => "blocklist-import",
            Request::BatchList { .. } => "batch-list",
            Request::BatchShow { .. } => "batch-show",
            Request::BatchRelease { .. } => "batch-release",
            Request::BatchCancel { .. } => "batch-cancel",
            Request::SubjectExport { .. } => "subject-export",
            Request::SubjectErase { .. } => "subject-erase",
            Request::AuditVerify => "audit-verify",
            Request::Backup => "backup",
            Request::KeyReload { .. } => "key-reload",
            Request::KeyStatus => "key-status",
            Request::Reload => "reload",
            Request::TenantPurge { .. } => "tenant-purge",
            Request::AuditExport { .. } => "audit-export",
        }
    }
}

/// What commands work on: the store, the configuration, and (inside `serve`) the dispatcher.
pub struct AdminContext {
    pub store: Store,
    /// The configuration in force (a reload swaps it).
    pub live: crate::config::Live,
    pub dispatch: Option<Arc<crate::dispatch::Signal>>,
    /// Asks for a batch's final report (a cancel can finish a batch).
    pub reports: Option<crate::reply::ReportRequests>,
    pub audit: Audit,
    /// Partner health as the running dispatcher sees it.
    pub partners: Option<crate::dispatch::HealthBoard>,
    /// The background workers' board, inside `serve`.
    pub workers: Option<crate::workers::Workers>,
    /// Inside `serve`: applies `reload`.
    pub reloader: Option<Arc<crate::reload::Reloader>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    ok: bool,
    error: Option<String>,
    len: usize,
    /// The body is a backup stream: frames up to the end frame, then one JSON summary line.
    #[serde(default)]
    stream: bool,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no tenant `{0}` in the configuration")]
    NoTenant(String),
    #[error("{0}")]
    Ingest(ingest::IngestError),
    #[error("`{0}` is not a valid phone number for this tenant")]
    InvalidPhone(String),
    #[error("admin socket: {0}")]
    Io(io::Error),
    #[error("serve answered: {0}")]
    Remote(String),
    #[error("the audit log is broken at entry {seq}: {reason}")]
    ChainBroken { seq: u64, reason: String },
    #[error(transparent)]
    Key(#[from] crate::crypto::KeyError),
    #[error("tenant `{0}` is in the configuration: remove it there (and reload) before purging it")]
    StillConfigured(String),
    #[error("the new configuration is refused; the running one is kept: {0}")]
    Refused(crate::reload::Refused),
    #[error("serve is not running: the configuration is read when it starts")]
    NotServing,
}

impl From<ingest::IngestError> for AdminError {
    fn from(e: ingest::IngestError) -> Self {
        AdminError::Ingest(e)
    }
}

impl From<io::Error> for AdminError {
    fn from(e: io::Error) -> Self {
        AdminError::Io(e)
    }
}

impl From<crate::reload::Refused> for AdminError {
    fn from(e: crate::reload::Refused) -> Self {
        AdminError::Refused(e)
    }
}

/// Answers a request against the store, and puts it on the audit log: who (`actor`), what, on
/// which tenant, batch or number (as its keyed hash), and whether it worked.
pub fn handle(ctx: &AdminContext, request: &Request, actor: &str) -> Result<Vec<u8>, AdminError> {
    let mut event = Event::new(&format!("admin.{}", request.name()), actor);
    let mut result = answer(ctx, request, &mut event);
    // A write elsewhere failed for want of space and latched the store: a command that only
    // reads does not wait for the disk watch to open it again.
    if matches!(&result, Err(AdminError::Store(e)) if e.is_latched())
        && request.reads_only()
        && ctx.store.recover() != crate::store::Recovery::Waiting
    {
        let mut again = Event::new(&format!("admin.{}", request.name()), actor);
        result = answer(ctx, request, &mut again);
        event = again;
    }
    event
        .detail("result", if result.is_ok() { "ok" } else { "failed" })
        .record(&ctx.audit);
    result
}

fn answer(ctx: &AdminContext, request: &Request, event: &mut Event) -> Result<Vec<u8>, AdminError> {
    let config = ctx.live.get();
    let (store, config) = (&ctx.store, config.as_ref());
    match request {
        Request::Validate { tenant, path } => {
            event.set_tenant(tenant);
            event.push("file", path.display());
        }
        Request::BlocklistAdd { tenant, .. }
        | Request::BlocklistRemove { tenant, .. }
        | Request::BlocklistList { tenant }
        | Request::BlocklistImport { tenant, .. } => {
            match tenant {
                Some(t) => event.set_tenant(t),
                None => event.push("list", "global"),
            }
            if let Request::BlocklistImport { path, .. } = request {
                event.push("file", path.display());
            }
        }
        Request::BatchList { tenant: Some(t) } => event.set_tenant(t),
        Request::BatchShow { id } | Request::BatchRelease { id } | Request::BatchCancel { id } => {
            event.push("batch", id)
        }
        Request::TenantPurge { tenant } => event.set_tenant(tenant),
        Request::KeyReload { action, version, .. } => {
            event.push("action", action);
            event.push("version", version);
        }
        Request::AuditExport { since, tenant } => {
            event.push("since", since);
            if let Some(t) = tenant {
                event.set_tenant(t);
            }
        }
        _ => {}
    }
    let now = jiff::Timestamp::now().as_second();
    match request {
        Request::BatchList { tenant } => {
            if let Some(t) = tenant {
                config.tenants.get(t).ok_or_else(|| AdminError::NoTenant(t.clone()))?;
            }
            Ok(batch_list(&store.batches(tenant.as_deref())?).into_bytes())
        }
        Request::BatchShow { id } => {
            let batch = store.batch(*id)?.ok_or(StoreError::NoBatch(*id))?;
            Ok(batch_show(&batch).into_bytes())
        }
        Request::BatchRelease { id } => {
            let batch = store.release_batch(*id, now)?;
            if let Some(d) = &ctx.dispatch {
                d.poke();
            }
            tracing::info!(batch = id, tenant = %batch.tenant, "held batch released by an operator");
            Ok(format!("batch {id} released: {} messages queued\n", batch.accepted).into_bytes())
        }
        Request::BatchCancel { id } => {
            // What partners already answered goes into the database first: a message delivered
            // a moment ago stays delivered, not canceled.
            if let Some(d) = &ctx.dispatch {
                if !d.settle(std::time::Duration::from_secs(5)) {
                    tracing::warn!(
                        batch = id,
                        "the dispatch log is not applied yet; canceling from the database's view"
                    );
                }
            }
            let batch = store.cancel_batch(*id, now)?;
            if let Some(d) = &ctx.dispatch {
                d.poke();
            }
            if batch.state == BatchState::Done {
                if let Some(r) = &ctx.reports {
                    let _ = r.send(batch.id);
                }
            }
            let canceled = batch.count(MessageStatus::Canceled);
            tracing::info!(batch = id, tenant = %batch.tenant, canceled, "batch canceled by an operator");
            Ok(format!("batch {id} canceled: {canceled} messages will not be sent\n").into_bytes())
        }
        Request::Status => Ok(status_text(store, config, ctx.partners.as_ref(), ctx.workers.as_ref())?.into_bytes()),
        Request::Validate { tenant, path } => validate(store, config, tenant, path),
        Request::BlocklistAdd { tenant, phone } => {
            let (list, e164) = list_phone(config, tenant.as_deref(), phone)?;
            event.push("number_hash", number_hash(store, list.id, &e164));
            store.blocklist_add(list.id, &e164, "cli", jiff::Timestamp::now().as_second())?;
            Ok(format!("{e164} added to {}\n", list.name).into_bytes())
        }
        Request::BlocklistRemove { tenant, phone } => {
            let (list, e164) = list_phone(config, tenant.as_deref(), phone)?;
            event.push("number_hash", number_hash(store, list.id, &e164));
            let removed = store.blocklist_remove(list.id, &e164)?;
            let what = if removed { "removed from" } else { "was not on" };
            Ok(format!("{e164} {what} {}\n", list.name).into_bytes())
        }
        Request::BlocklistImport { tenant, path } => {
            let list = List::of(config, tenant.as_deref())?;
            let (numbers, bad) = read_numbers(path, list.region)?;
            let added = store.blocklist_add_all(list.id, &numbers, "import", now)?;
            event.push("numbers", numbers.len());
            event.push("refused_lines", bad.len());
            let mut out = format!(
                "{} numbers read, {added} new on {}, {} lines refused\n",
                numbers.len(),
                list.name,
                bad.len()
            );
            for (line, why) in bad.iter().take(100) {
                let _ = writeln!(out, "line {line}: {why}");
            }
            Ok(out.into_bytes())
        }
        Request::BlocklistList { tenant } => {
            let list = List::of(config, tenant.as_deref())?;
            let mut out = String::from("number_hash;added_at;source\n");
            for (hash, entry) in store.blocklist_entries(list.id)? {
                let hex = crate::store::retention::hex(&hash);
                let at = jiff::Timestamp::from_second(entry.added_at)
                    .map(|t| t.to_string())
                    .unwrap_or_default();
                let _ = writeln!(out, "{hex};{at};{}", entry.source);
            }
            Ok(out.into_bytes())
        }
        Request::SubjectExport { phone, tenant } => {
            let mut tenants = serde_json::Map::new();
            let covered = subject_tenants(config, phone, tenant.as_deref())?;
            for (tenant, e164) in &covered {
                event.push(
                    "number_hash",
                    format!("{}:{}", tenant.id, number_hash(store, &tenant.id, e164)),
                );
                let data = store.subject_export(&tenant.id, e164)?;
                tenants.insert(
                    tenant.id.clone(),
                    serde_json::to_value(&data).map_err(|e| AdminError::Remote(e.to_string()))?,
                );
            }
            // The global list, when no tenant was named: the number as the first tenant reads it.
            let mut global = serde_json::Value::Null;
            if let (None, Some((_, e164))) = (tenant, covered.first()) {
                if let Some(entry) = store.blocklist_entry(crate::store::GLOBAL_LIST, e164)? {
                    global = serde_json::to_value(&entry).map_err(|e| AdminError::Remote(e.to_string()))?;
                }
            }
            let doc = serde_json::json!({ "phone": phone, "tenants": tenants, "global_blocklist": global });
            let mut out = serde_json::to_vec_pretty(&doc).map_err(|e| AdminError::Remote(e.to_string()))?;
            out.push(b'\n');
            Ok(out)
        }
        Request::SubjectErase { phone, tenant, block } => {
            let mut out = String::new();
            let covered = subject_tenants(config, phone, tenant.as_deref())?;
            for (tenant, e164) in &covered {
                event.push(
                    "number_hash",
                    format!("{}:{}", tenant.id, number_hash(store, &tenant.id, e164)),
                );
                let erased = store.subject_erase(&tenant.id, e164, *block, now)?;
                event.push(
                    &format!("erased:{}", tenant.id),
                    format!(
                        "{} messages, {} canceled, {} replies",
                        erased.messages, erased.canceled, erased.replies
                    ),
                );
                let _ = writeln!(
                    out,
                    "{}: erased {} messages ({} not yet sent, now canceled), {} replies{}{}",
                    tenant.id,
                    erased.messages,
                    erased.canceled,
                    erased.replies,
                    if erased.blocklist { ", its blocklist entry" } else { "" },
                    if *block {
                        "; the number is on the blocklist (as its keyed hash)"
                    } else {
                        ""
                    }
                );
            }
            // Erasing everywhere takes the number off the global list too (`--block` keeps it).
            if let (None, Some((_, e164))) = (tenant, covered.first()) {
                let global = crate::store::GLOBAL_LIST;
                if store.blocklist_entry(global, e164)?.is_some() {
                    if !*block {
                        store.blocklist_remove(global, e164)?;
                    }
                    let _ = writeln!(
                        out,
                        "the global blocklist: its entry {}",
                        if *block { "kept (as its keyed hash)" } else { "removed" }
                    );
                }
            }
            if let Some(d) = &ctx.dispatch {
                d.poke();
            }
            tracing::info!("subject erased by an operator (number hashes on the audit log)");
            Ok(out.into_bytes())
        }
        Request::KeyReload { action, key, .. } => {
            let masters = match key {
                Some(text) => text.keys(&config.key_file)?,
                None => crate::crypto::MasterKeys::load(&crate::service::key_path(config))?,
            };
            store.keys().rekey(masters)?;
            let (versions, sealed) = store.keys().versions();
            event.push("versions", format!("{versions:?}"));
            tracing::info!(
                ?versions,
                sealed_under = sealed,
                "master key versions read again; tenant key store re-sealed"
            );
            if *action == KeyChange::Rotate {
                // New records under new sealing generations; the old records follow in the
                // background (serve) or here and now (no serve running).
                store.keys().new_generation()?;
                if ctx.dispatch.is_none() {
                    let look = crate::store::reseal::reseal_all(store)?;
                    event.push("resealed", look.resealed);
                }
            }
            Ok(key_status(store).into_bytes())
        }
        Request::KeyStatus => Ok(key_status(store).into_bytes()),
        // Inside `serve` a reload is answered by `connection`; here no serve is running.
        Request::Reload => Err(AdminError::NotServing),
        Request::TenantPurge { tenant } => {
            if config.tenants.contains_key(tenant) {
                return Err(AdminError::StillConfigured(tenant.clone()));
            }
            if tenant.starts_with('@') {
                return Err(AdminError::NoTenant(tenant.clone()));
            }
            let purged = store.purge_tenant(tenant)?;
            let keys = store.keys().forget(tenant)?;
            event.push("batches", purged.batches);
            event.push("messages", purged.messages);
            event.push("entries", purged.entries);
            tracing::info!(tenant = %tenant, batches = purged.batches, messages = purged.messages, "tenant purged");
            let (_, sealed) = store.keys().versions();
            Ok(format!(
                "tenant {tenant} purged: {} batches, {} messages, {} other entries deleted; its keys {}.\n\
                 Backups taken before now still hold its keys, sealed under master key version {sealed} or older:\n\
                 `smsdrop key rotate`, then `smsdrop key retire --version V` for each older version, makes them unreadable.\n",
                purged.batches,
                purged.messages,
                purged.entries,
                if keys { "destroyed" } else { "were not in the key store" },
            )
            .into_bytes())
        }
        Request::Backup => Err(AdminError::Remote(
            "a backup is streamed to the command that asks for it (smsdrop backup FILE)".into(),
        )),
        Request::AuditVerify => match store.audit_verify()? {
            ChainCheck::Intact { entries } => {
                Ok(format!("audit log intact: {entries} entries, chain unbroken\n").into_bytes())
            }
            ChainCheck::Broken { seq, reason } => Err(AdminError::ChainBroken { seq, reason }),
        },
        Request::AuditExport { since, tenant } => {
            let mut out = String::new();
            for entry in store.audit_entries(*since, tenant.as_deref())? {
                let line = match entry {
                    Ok(entry) => crate::audit::entry_json(&entry),
                    Err((seq, error)) => serde_json::json!({ "seq": seq, "damaged": error }).to_string(),
                };
                out.push_str(&line);
                out.push('\n');
            }
            Ok(out.into_bytes())
        }
    }
}

/// A number as the audit log shows it: the tenant's keyed hash, hex.
fn number_hash(store: &Store, tenant: &str, e164: &str) -> String {
    crate::store::retention::hex(&store.keys().tenant(tenant).phone_hash(e164))
}

/// The tenants a subject request covers (one, or every configured one) and the number
/// normalised with each one's region; a number no tenant can read is refused.
fn subject_tenants<'c>(
    config: &'c Config,
    phone: &str,
    tenant: Option<&str>,
) -> Result<Vec<(&'c crate::config::Tenant, String)>, AdminError> {
    let out: Vec<(&crate::config::Tenant, String)> = match tenant {
        Some(t) => vec![tenant_phone(config, t, phone)?],
        None => config
            .tenants
            .values()
            .filter_map(|t| crate::sms::phone::normalize_phone(phone, t.default_region).map(|e| (t.as_ref(), e)))
            .collect(),
    };
    if out.is_empty() {
        return Err(AdminError::InvalidPhone(phone.to_string()));
    }
    Ok(out)
}

/// Most numbers a blocklist import takes, and the largest file.
const IMPORT_MAX_NUMBERS: usize = 1_000_000;
const IMPORT_MAX_BYTES: u64 = 64 << 20;

/// Lines of an import file refused: (line number, why).
type Refused = Vec<(usize, String)>;

/// The numbers of a blocklist import file, normalised with the tenant's region, and the lines
/// refused (line number, why).
fn read_numbers(path: &Path, region: Option<rlibphonenumber::Region>) -> Result<(Vec<String>, Refused), AdminError> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    file.take(IMPORT_MAX_BYTES + 1).read_to_string(&mut text).map_err(|e| {
        AdminError::Io(io::Error::new(
            e.kind(),
            format!("{}: {e} (one number per line, UTF-8)", path.display()),
        ))
    })?;
    if text.len() as u64 > IMPORT_MAX_BYTES {
        return Err(AdminError::Io(io::Error::other(format!(
            "{} is larger than {} MiB: split it",
            path.display(),
            IMPORT_MAX_BYTES >> 20
        ))));
    }
    let (mut numbers, mut bad) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if numbers.len() >= IMPORT_MAX_NUMBERS {
            bad.push((
                i + 1,
                format!("more than {IMPORT_MAX_NUMBERS} numbers: the rest is not read"),
            ));
            break;
        }
        match crate::sms::phone::normalize_phone(line, region) {
            Some(e164) => numbers.push(e164),
            None => bad.push((i + 1, "not a valid phone number".into())),
        }
    }
    Ok((numbers, bad))
}

/// An opt-out list: a tenant's, or the global one (whose numbers are written in international
/// form, `+` or `00` first, as no region applies).
struct List<'c> {
    id: &'c str,
    name: String,
    region: Option<rlibphonenumber::Region>,
}

impl<'c> List<'c> {
    fn of(config: &'c Config, tenant: Option<&str>) -> Result<List<'c>, AdminError> {
        match tenant {
            None => Ok(List {
                id: crate::store::GLOBAL_LIST,
                name: "the global blocklist".into(),
                region: None,
            }),
            Some(t) => {
                let tenant = config
                    .tenants
                    .get(t)
                    .ok_or_else(|| AdminError::NoTenant(t.to_string()))?;
                Ok(List {
                    id: &tenant.id,
                    name: format!("the blocklist of {}", tenant.id),
                    region: tenant.default_region,
                })
            }
        }
    }
}

/// A list and a number normalised for it.
fn list_phone<'c>(config: &'c Config, tenant: Option<&str>, phone: &str) -> Result<(List<'c>, String), AdminError> {
    let list = List::of(config, tenant)?;
    let e164 = crate::sms::phone::normalize_phone(phone, list.region)
        .ok_or_else(|| AdminError::InvalidPhone(phone.to_string()))?;
    Ok((list, e164))
}

/// A configured tenant and a number normalised with its region.
fn tenant_phone<'c>(
    config: &'c Config,
    tenant: &str,
    phone: &str,
) -> Result<(&'c crate::config::Tenant, String), AdminError> {
    let tenant = config
        .tenants
        .get(tenant)
        .ok_or_else(|| AdminError::NoTenant(tenant.to_string()))?;
    let e164 = crate::sms::phone::normalize_phone(phone, tenant.default_region)
        .ok_or_else(|| AdminError::InvalidPhone(phone.to_string()))?;
    Ok((tenant, e164))
}

/// `smsdrop validate`: the result file a batch would get; nothing is queued.
pub fn validate(store: &Store, config: &Config, tenant: &str, path: &Path) -> Result<Vec<u8>, AdminError> {
    let tenant = config
        .tenants
        .get(tenant)
        .ok_or_else(|| AdminError::NoTenant(tenant.to_string()))?;
    let keys = store.keys().tenant(&tenant.id);
    let now = jiff::Timestamp::now().as_second();
    let window = tenant.dedupe_window.as_secs() as i64;
    let seen = |hash: &[u8; 32]| -> Result<bool, ingest::IngestError> {
        Ok(store.seen_file(&tenant.id, hash, now, window)?.is_some())
    };
    let lists = store.blocklists(&tenant.id)?;
    let blocklisted = |hash: &[u8; 16], e164: &str| lists.contains(hash, e164);
    let cancel = AtomicBool::new(false);
    let ctx = crate::batch::file::Context {
        tenant,
        keys: &keys,
        blocklisted: &blocklisted,
        seen: &seen,
        cancel: &cancel,
    };
    let mut sink = DryRunSink::default();
    let summary = crate::batch::file::process(path, &ctx, &mut sink).map_err(ingest::IngestError::from)?;
    Ok(sink.finish(&summary)?)
}

fn time_text(t: i64) -> String {
    jiff::Timestamp::from_second(t)
        .map(|ts| ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// `smsdrop batch list`.
pub fn batch_list(batches: &[crate::store::records::BatchRecord]) -> String {
    let mut out = format!(
        "{:>8} {:<16} {:<9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {:<20}  {}\n",
        "id",
        "tenant",
        "state",
        "lines",
        "accepted",
        "rejected",
        "pending",
        "delivered",
        "failed",
        "received_at",
        "file"
    );
    for b in batches {
        let pending = b.count(MessageStatus::Queued) + b.count(MessageStatus::Held) + b.count(MessageStatus::Submitted);
        let failed = b.finished() - b.count(MessageStatus::Delivered);
        let state = match b.file_reason {
            Some(r) => format!("{}:{r}", b.state.as_str()),
            None => b.state.as_str().to_string(),
        };
        let _ = writeln!(
            out,
            "{:>8} {:<16} {:<9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {:<20}  {}",
            b.id,
            b.tenant,
            state,
            b.lines,
            b.accepted,
            b.rejected,
            pending,
            b.count(MessageStatus::Delivered),
            failed,
            time_text(b.received_at),
            b.file_name
        );
    }
    out
}

/// `smsdrop batch show`.
pub fn batch_show(b: &crate::store::records::BatchRecord) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "batch        {}", b.id);
    let _ = writeln!(out, "tenant       {}", b.tenant);
    let _ = writeln!(out, "file         {}", b.file_name);
    let _ = writeln!(out, "received_at  {}", time_text(b.received_at));
    let _ = writeln!(out, "updated_at   {}", time_text(b.updated_at));
    let _ = writeln!(out, "state        {}", b.state.as_str());
    if let Some(r) = b.file_reason {
        let _ = writeln!(out, "file_reason  {r}");
    }
    let _ = writeln!(out, "lines        {}", b.lines);
    let _ = writeln!(out, "accepted     {}", b.accepted);
    let _ = writeln!(out, "rejected     {}", b.rejected);
    for (reason, n) in &b.reasons {
        let _ = writeln!(out, "  {reason:<24}{n}");
    }
    let _ = writeln!(out, "countries    {}", b.countries.join(" "));
    let _ = writeln!(out, "messages");
    for s in MessageStatus::ALL {
        let _ = writeln!(out, "  {:<24}{}", s.as_str(), b.count(*s));
    }
    out
}

/// The background workers' lines of `smsdrop status`.
fn workers_text(out: &mut String, workers: Option<&crate::workers::Workers>) {
    let Some(workers) = workers else {
        let _ = writeln!(out, "workers: known only while `smsdrop serve` runs");
        return;
    };
    let _ = writeln!(
        out,
        "{:<16} {:<12} {:>8} {:>7}  last error",
        "worker", "state", "rounds", "errors"
    );
    for (name, w) in workers.snapshot() {
        let last = match &w.last_error {
            Some((at, why)) => format!("{} {why}", time_text(*at)),
            None => "-".into(),
        };
        let _ = writeln!(
            out,
            "{name:<16} {:<12} {:>8} {:>7}  {last}",
            w.state.as_str(),
            w.rounds,
            w.errors
        );
    }
}

/// `smsdrop status`: partner health and the background workers (when `serve` runs), bans,
/// queue depth by tenant and status.
pub fn status_text(
    store: &Store,
    config: &Config,
    partners: Option<&crate::dispatch::HealthBoard>,
    workers: Option<&crate::workers::Workers>,
) -> Result<String, StoreError> {
    let mut out = String::new();
    match partners.and_then(|b| b.read().ok().map(|b| b.clone())) {
        Some(board) => {
            let _ = writeln!(
                out,
                "{:<16} {:<8} {:>9} {:>10} {:>10} {:>8}  since / reason",
                "partner", "health", "connected", "in flight", "latency", "failed"
            );
            for (id, v) in &board {
                let since = jiff::Timestamp::from_second(v.since)
                    .ok()
                    .filter(|_| v.since > 0)
                    .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
                    .unwrap_or_else(|| "-".into());
                let _ = writeln!(
                    out,
                    "{:<16} {:<8} {:>9} {:>10} {:>10} {:>8}  {since}{}{}",
                    id,
                    v.state.as_str(),
                    if v.connected { "yes" } else { "no" },
                    format!("{}/{}", v.in_flight, v.window),
                    format!("{} ms", v.latency_ms),
                    format!("{}/{}", v.failed, v.samples),
                    if v.reason.is_empty() { "" } else { "  " },
                    v.reason
                );
            }
        }
        None => {
            let _ = writeln!(out, "partners: health is known only while `smsdrop serve` runs");
        }
    }
    out.push('\n');
    workers_text(&mut out, workers);
    out.push('\n');
    let statuses = MessageStatus::ALL;
    if let Some(sftp) = &config.sftp {
        let key = russh::keys::load_secret_key(&sftp.host_key, None)
            .map(|k| crate::sftp::fingerprint(k.public_key()))
            .unwrap_or_else(|_| "not created yet".into());
        let _ = writeln!(out, "sftp: {} host key {key}", sftp.listen);
        for ban in crate::sftp::defender::active_bans(store) {
            let until = jiff::Timestamp::from_second(ban.until)
                .map(|t| t.to_string())
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "banned: {} until {until} (ban {} of this address; {})",
                ban.ip, ban.count, ban.reason
            );
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "{:<16} {:>8} {:>8}{}",
        "tenant",
        "batches",
        "depth",
        statuses
            .iter()
            .map(|s| format!(" {:>13}", s.as_str()))
            .collect::<String>()
    );
    for tenant in config.tenants.keys() {
        let batches = store.batches(Some(tenant))?;
        let mut counts = [0u64; 9];
        let mut open = 0;
        for b in &batches {
            if matches!(b.state, BatchState::Queued | BatchState::Ingesting) {
                open += 1;
            }
            for (i, c) in b.counts.iter().enumerate() {
                counts[i] += c;
            }
        }
        let depth = counts[MessageStatus::Queued as usize]
            + counts[MessageStatus::Held as usize]
            + counts[MessageStatus::Submitted as usize];
        let _ = write!(
            out,
            "{:<16} {:>8} {:>8}",
            tenant,
            format!("{open}/{}", batches.len()),
            depth
        );
        for s in statuses {
            let _ = write!(out, " {:>13}", counts[*s as usize]);
        }
        out.push('\n');
    }
    let (anonymized, deleted, deleted_batches, at) = store.sweep_totals()?;
    let when = at
        .and_then(|t| jiff::Timestamp::from_second(t as i64).ok())
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| "never".into());
    let _ = writeln!(
        out,
        "\nretention: last sweep {when}; since the store was made {deleted} messages deleted ({deleted_batches} batches), {anonymized} anonymised"
    );
    let reseal = store.reseal_progress();
    if reseal.running || store.keys().has_old_generations() {
        let _ = writeln!(
            out,
            "keys: re-sealing after a rotation, {} records looked at, {} re-sealed (smsdrop key status)",
            reseal.examined, reseal.resealed
        );
    }
    let (file, used) = store.space(&config.state_dir)?;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let _ = writeln!(
        out,
        "store: {:.1} MiB on disk, {:.1} MiB in use (pages freed by deletion are reused; the file does not shrink)",
        mib(file),
        mib(used)
    );
    Ok(out)
}

/// Serves the admin socket until `shutdown`.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    ctx: Arc<AdminContext>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of descriptors, most likely: wait instead of spinning (the
                        // error repeats at once), and say so once a minute at most.
                        static FAILURES: crate::limits::Throttle =
                            crate::limits::Throttle::new(std::time::Duration::from_secs(60));
                        if let Some(held) = FAILURES.allow("accept") {
                            tracing::warn!(error = %e, held_back = held, "admin socket accept failed");
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, ctx).await {
                        tracing::warn!(error = %e, "admin connection failed");
                    }
                });
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// `smsdrop reload`: the reload's summary, or why it was refused (the reload records itself on
/// the audit log).
async fn reload(ctx: &AdminContext, actor: &str) -> Result<Vec<u8>, AdminError> {
    let Some(reloader) = &ctx.reloader else {
        return Err(AdminError::NotServing);
    };
    crate::service::reloading();
    let result = reloader.reload(actor).await;
    crate::service::ready("serving");
    Ok(result?.to_string().into_bytes())
}

/// Binds the admin socket (mode 0600), replacing a stale one a crash left.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if path.exists() {
        // A live serve answers; a stale socket from a crash does not and is replaced.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by another smsdrop", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn connection(stream: UnixStream, ctx: Arc<AdminContext>) -> io::Result<()> {
    let actor = match stream.peer_cred() {
        Ok(cred) => format!("admin uid {}", cred.uid()),
        Err(_) => "admin uid ?".to_string(),
    };
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let result = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Backup) => {
            let stream = reader
                .into_inner()
                .into_inner()
                .reunite(write)
                .map_err(io::Error::other)?;
            let stream = stream.into_std()?;
            stream.set_nonblocking(false)?;
            return tokio::task::spawn_blocking(move || stream_backup(&ctx, stream, &actor))
                .await
                .map_err(io::Error::other)?;
        }
        Ok(Request::Reload) if ctx.reloader.is_some() => reload(&ctx, &actor).await,
        Ok(request) => tokio::task::spawn_blocking(move || handle(&ctx, &request, &actor))
            .await
            .map_err(|e| AdminError::Io(io::Error::other(e)))
            .and_then(|r| r),
        Err(e) => Err(AdminError::Io(io::Error::new(io::ErrorKind::InvalidInput, e))),
    };
    let (header, body) = match result {
        Ok(body) => (
            Header {
                ok: true,
                error: None,
                len: body.len(),
                stream: false,
            },
            body,
        ),
        Err(e) => (
            Header {
                ok: false,
                error: Some(e.to_string()),
                len: 0,
                stream: false,
            },
            Vec::new(),
        ),
    };
    let mut head = serde_json::to_vec(&header).map_err(io::Error::other)?;
    head.push(b'\n');
    write.write_all(&head).await?;
    write.write_all(&body).await?;
    write.shutdown().await
}

/// `smsdrop key status`: the master key versions and what uses them, the sealing generations
/// and the re-sealer's progress.
fn key_status(store: &Store) -> String {
    let (versions, sealed) = store.keys().versions();
    let list: Vec<String> = versions.iter().map(u8::to_string).collect();
    let mut out = format!(
        "master key versions in the key file: {}\nnewest: {sealed} (seals the tenant key store and new backups)\ntenants with keys: {}\n",
        list.join(", "),
        store.keys().known_tenants().len()
    );
    let generations = store.keys().generations();
    let newest = generations
        .values()
        .filter_map(|g| g.last())
        .max()
        .copied()
        .unwrap_or(0);
    let older = generations.values().filter(|g| g.len() > 1).count();
    let progress = store.reseal_progress();
    if older == 0 {
        let _ = writeln!(
            out,
            "record sealing: every record under its tenant's newest generation (up to {newest}), nothing to re-seal"
        );
    } else {
        let _ = writeln!(
            out,
            "record sealing: {older} tenants (with the system's records) still hold an older generation; \
             re-sealer {}: {} records looked at, {} re-sealed{}",
            if progress.running {
                "running"
            } else {
                "waiting for its next pass"
            },
            progress.examined,
            progress.resealed,
            progress
                .waiting
                .as_deref()
                .map(|w| format!(" ({w})"))
                .unwrap_or_default()
        );
    }
    if let Some(at) = progress.finished_at.and_then(|t| jiff::Timestamp::from_second(t).ok()) {
        let _ = writeln!(
            out,
            "last re-seal pass ended {}: {} records re-sealed, {} older generations destroyed{}",
            at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            progress.resealed,
            progress.dropped,
            if progress.damaged > 0 {
                format!(
                    ", {} records did not open (run `smsdrop audit verify`)",
                    progress.damaged
                )
            } else {
                String::new()
            }
        );
    }
    out
}

/// Streams a backup to the admin connection: header, frames, then a summary line. A failure
/// after the header is sent as an error frame, so the other end never takes half a backup for
/// a whole one.
fn stream_backup(ctx: &AdminContext, stream: std::os::unix::net::UnixStream, actor: &str) -> io::Result<()> {
    use std::io::Write;
    let mut out = io::BufWriter::new(stream);
    let header = Header {
        ok: true,
        error: None,
        len: 0,
        stream: true,
    };
    let mut head = serde_json::to_vec(&header).map_err(io::Error::other)?;
    head.push(b'\n');
    out.write_all(&head)?;
    let now = jiff::Timestamp::now().as_second();
    let result = ctx.store.backup(&mut out, &ctx.live.get().backup_files(), now);
    let mut event = Event::new("admin.backup", actor);
    match &result {
        Ok(summary) => {
            event.push("entries", summary.entries);
            event.push("bytes", summary.bytes);
            event.push("result", "ok");
            tracing::info!(
                entries = summary.entries,
                bytes = summary.bytes,
                "backup streamed to an operator"
            );
            let mut line = serde_json::to_vec(summary).map_err(io::Error::other)?;
            line.push(b'\n');
            out.write_all(&line)?;
        }
        Err(e) => {
            event.push("result", "failed");
            tracing::error!(error = %e, "backup failed");
            let _ =
                crate::store::backup::write_frame(&mut out, crate::store::backup::KIND_ERROR, e.to_string().as_bytes());
        }
    }
    event.record(&ctx.audit);
    out.flush()
}

/// Asks a running `serve` for a backup and writes it to `path` (through `path.partial`, never
/// over an existing file). `Ok(None)` when no `serve` answers.
pub fn ask_backup(socket: &Path, path: &Path) -> Result<Option<crate::store::backup::BackupSummary>, AdminError> {
    use crate::store::backup::{self, BackupError, KIND_END, KIND_ERROR};
    use std::io::{BufRead, Read, Write};
    let mut stream = match std::os::unix::net::UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut line = serde_json::to_vec(&Request::Backup).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reader = io::BufReader::with_capacity(1 << 20, stream);
    let mut head = String::new();
    reader.read_line(&mut head)?;
    let header: Header = serde_json::from_str(&head).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if !header.ok || !header.stream {
        return Err(AdminError::Remote(
            header.error.unwrap_or_else(|| "no backup stream".into()),
        ));
    }
    let partial = backup::partial_path(path);
    let failed = |e: String| {
        let _ = std::fs::remove_file(&partial);
        AdminError::Remote(e)
    };
    let file = backup::create_partial(&partial)?;
    let mut out = io::BufWriter::with_capacity(1 << 20, &file);
    let mut start = [0u8; backup::HEAD_LEN];
    reader.read_exact(&mut start).map_err(|e| failed(e.to_string()))?;
    out.write_all(&start)?;
    loop {
        match backup::read_frame(&mut reader) {
            Ok(Some((KIND_ERROR, message))) => return Err(failed(String::from_utf8_lossy(&message).into_owned())),
            Ok(Some((kind, bytes))) => {
                backup::write_frame(&mut out, kind, &bytes)?;
                if kind == KIND_END {
                    break;
                }
            }
            Ok(None) => return Err(failed(BackupError::Truncated(0).to_string())),
            Err(e) => return Err(failed(e.to_string())),
        }
    }
    let mut summary = String::new();
    reader.read_line(&mut summary)?;
    let summary = serde_json::from_str(&summary).map_err(|e| failed(format!("summary line: {e}")))?;
    out.flush()?;
    drop(out);
    file.sync_all()?;
    backup::publish(&partial, path).map_err(|e| failed(format!("{}: {e}", path.display())))?;
    Ok(Some(summary))
}

/// Sends a request to a running `serve`. `Ok(None)` when none answers on `path`.
pub fn ask(path: &Path, request: &Request) -> Result<Option<Vec<u8>>, AdminError> {
    use std::io::{BufRead, Read, Write};
    let mut stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut line = serde_json::to_vec(request).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reader = io::BufReader::new(stream);
    let mut head = String::new();
    reader.read_line(&mut head)?;
    let header: Header = serde_json::from_str(&head).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if !header.ok {
        return Err(AdminError::Remote(header.error.unwrap_or_default()));
    }
    let mut body = vec![0u8; header.len];
    reader.read_exact(&mut body)?;
    Ok(Some(body))
}
