//! `smsdrop key rotate|check|retire|status` (as `key-reload` and `key-status`) and
//! `smsdrop tenant purge`.

use std::fmt::Write as _;

use super::protocol::KeyChange;
use super::{AdminError, Call};
use crate::store::Store;

/// `key-reload`: the key file changed (`action`: `rotate` to a new version, `check` before one
/// is retired, or `retire`); read it again and re-seal the tenant key store under its newest
/// version. `key` is the key file as the command read it: under systemd `serve` cannot read the
/// file (root's), only the credential copy it was started with.
pub(super) fn reload(
    call: &mut Call,
    action: KeyChange,
    version: u8,
    key: Option<&crate::crypto::KeyFileText>,
) -> Result<Vec<u8>, AdminError> {
    call.event.push("action", action);
    call.event.push("version", version);
    let (ctx, config) = (call.ctx, call.config);
    let (store, event) = (&ctx.store, &mut *call.event);
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
    if action == KeyChange::Rotate {
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

/// `smsdrop key status`.
pub(super) fn status(call: &mut Call) -> Result<Vec<u8>, AdminError> {
    Ok(key_status(&call.ctx.store).into_bytes())
}

/// `smsdrop tenant purge`: every record of a tenant no longer in the configuration, then its keys.
pub(super) fn purge(call: &mut Call, tenant: &str) -> Result<Vec<u8>, AdminError> {
    call.event.set_tenant(tenant);
    let (store, config) = (&call.ctx.store, call.config);
    let event = &mut *call.event;
    if config.tenants.contains_key(tenant) {
        return Err(AdminError::StillConfigured(tenant.to_string()));
    }
    if tenant.starts_with('@') {
        return Err(AdminError::NoTenant(tenant.to_string()));
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
