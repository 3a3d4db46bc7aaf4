//! The admin socket: how commands reach a running `serve` (docs/cli.md).
//!
//! redb lets one process open the database, so while `serve` runs, commands that need the data
//! ask it over a Unix socket (mode 0600, `[admin] socket`). The protocol is one JSON request line,
//! answered by one JSON header line and, for answers with a body, that many raw bytes. When no
//! `serve` answers, commands open the store themselves. Both paths run the same functions here.
//!
//! - [`protocol`]: the request enum, the header, the socket's server and client ends;
//! - one file per command group, each command one handler that also says what goes on the
//!   audit log: [`batch`] (and `validate`), [`blocklist`], [`subject`], [`keys`] (and
//!   `tenant purge`), [`audit`], [`status`], [`backup`] (a stream rather than one answer).
//!
//! A new command is one [`Request`] variant, one handler and one line in [`answer`] (and its
//! command line in `cli`).

pub mod audit;
pub mod backup;
pub mod batch;
pub mod blocklist;
pub mod keys;
pub mod protocol;
pub mod status;
pub mod subject;

use std::io;
use std::sync::Arc;

pub use backup::ask_backup;
pub use protocol::{KeyChange, Request, ask, bind, serve};

use crate::audit::{Audit, Event};
use crate::config::Config;
use crate::ingest;
use crate::store::{Store, StoreError};

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

/// One command being answered: what it works on, its audit event, and the time it came.
pub(crate) struct Call<'a> {
    pub ctx: &'a AdminContext,
    pub config: &'a Config,
    pub event: &'a mut Event,
    pub now: i64,
}

/// Maps each request to its handler.
fn answer(ctx: &AdminContext, request: &Request, event: &mut Event) -> Result<Vec<u8>, AdminError> {
    let config = ctx.live.get();
    let call = &mut Call {
        ctx,
        config: &config,
        event,
        now: crate::clock::now(),
    };
    match request {
        Request::Status => status::status(call),
        Request::Validate { tenant, path } => batch::validate(call, tenant, path),
        Request::BatchList { tenant } => batch::list(call, tenant.as_deref()),
        Request::BatchShow { id } => batch::show(call, *id),
        Request::BatchRelease { id } => batch::release(call, *id),
        Request::BatchCancel { id } => batch::cancel(call, *id),
        Request::BlocklistAdd { tenant, phone } => blocklist::add(call, tenant.as_deref(), phone),
        Request::BlocklistRemove { tenant, phone } => blocklist::remove(call, tenant.as_deref(), phone),
        Request::BlocklistList { tenant } => blocklist::list(call, tenant.as_deref()),
        Request::BlocklistImport { tenant, path } => blocklist::import(call, tenant.as_deref(), path),
        Request::SubjectExport { phone, tenant } => subject::export(call, phone, tenant.as_deref()),
        Request::SubjectErase { phone, tenant, block } => subject::erase(call, phone, tenant.as_deref(), *block),
        Request::KeyReload { action, version, key } => keys::reload(call, *action, *version, key.as_ref()),
        Request::KeyStatus => keys::status(call),
        Request::TenantPurge { tenant } => keys::purge(call, tenant),
        Request::AuditVerify => audit::verify(call),
        Request::AuditExport { since, tenant } => audit::export(call, *since, tenant.as_deref()),
        // Inside `serve` a reload is answered by the connection; here no serve is running.
        Request::Reload => Err(AdminError::NotServing),
        Request::Backup => Err(AdminError::Remote(
            "a backup is streamed to the command that asks for it (smsdrop backup FILE)".into(),
        )),
    }
}

/// A number as the audit log shows it: the tenant's keyed hash, hex.
fn number_hash(store: &Store, tenant: &str, e164: &str) -> String {
    crate::store::retention::hex(&store.keys().tenant(tenant).phone_hash(e164))
}

/// A time as commands print it: UTC, to the second.
pub(crate) fn time_text(t: i64) -> String {
    jiff::Timestamp::from_second(t)
        .map(|ts| ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}
