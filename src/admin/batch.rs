//! `smsdrop batch list|show|release|cancel` and `smsdrop validate`.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use super::{AdminError, Call, time_text};
use crate::ingest::{self, DryRunSink};
use crate::sms::codes::MessageStatus;
use crate::store::StoreError;
use crate::store::records::{BatchRecord, BatchState};

/// `smsdrop batch list`.
pub(super) fn list(call: &mut Call, tenant: Option<&str>) -> Result<Vec<u8>, AdminError> {
    if let Some(t) = tenant {
        call.event.set_tenant(t);
        call.config
            .tenants
            .get(t)
            .ok_or_else(|| AdminError::NoTenant(t.to_string()))?;
    }
    Ok(list_text(&call.ctx.store.batches(tenant)?).into_bytes())
}

/// `smsdrop batch show`.
pub(super) fn show(call: &mut Call, id: u64) -> Result<Vec<u8>, AdminError> {
    call.event.push("batch", id);
    let batch = call.ctx.store.batch(id)?.ok_or(StoreError::NoBatch(id))?;
    Ok(show_text(&batch).into_bytes())
}

/// `smsdrop batch release`: a held batch goes out.
pub(super) fn release(call: &mut Call, id: u64) -> Result<Vec<u8>, AdminError> {
    call.event.push("batch", id);
    let batch = call.ctx.store.release_batch(id, call.now)?;
    if let Some(d) = &call.ctx.dispatch {
        d.poke();
    }
    tracing::info!(batch = id, tenant = %batch.tenant, "held batch released by an operator");
    Ok(format!("batch {id} released: {} messages queued\n", batch.accepted).into_bytes())
}

/// `smsdrop batch cancel`: what is not sent yet never will be.
pub(super) fn cancel(call: &mut Call, id: u64) -> Result<Vec<u8>, AdminError> {
    call.event.push("batch", id);
    let ctx = call.ctx;
    // What partners already answered goes into the database first: a message delivered a
    // moment ago stays delivered, not canceled.
    if let Some(d) = &ctx.dispatch {
        if !d.settle(std::time::Duration::from_secs(5)) {
            tracing::warn!(
                batch = id,
                "the dispatch log is not applied yet; canceling from the database's view"
            );
        }
    }
    let batch = ctx.store.cancel_batch(id, call.now)?;
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

/// `smsdrop validate` through the socket or the store.
pub(super) fn validate(call: &mut Call, tenant: &str, path: &Path) -> Result<Vec<u8>, AdminError> {
    call.event.set_tenant(tenant);
    call.event.push("file", path.display());
    dry_run(&call.ctx.store, call.config, tenant, path)
}

/// `smsdrop validate`: the result file a batch would get; nothing is queued.
fn dry_run(
    store: &crate::store::Store,
    config: &crate::config::Config,
    tenant: &str,
    path: &Path,
) -> Result<Vec<u8>, AdminError> {
    let tenant = config
        .tenants
        .get(tenant)
        .ok_or_else(|| AdminError::NoTenant(tenant.to_string()))?;
    let keys = store.keys().tenant(&tenant.id);
    let now = crate::clock::now();
    let window = tenant.batch.dedupe_window.as_secs() as i64;
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

/// `smsdrop batch list`.
fn list_text(batches: &[BatchRecord]) -> String {
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
fn show_text(b: &BatchRecord) -> String {
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
