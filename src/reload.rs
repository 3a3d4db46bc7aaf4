//! Live reload (SIGHUP, `smsdrop reload`): the configuration file is read and checked again and,
//! when it is valid, swapped whole for the running one.
//!
//! Workers read the configuration in force ([`Live::get`]) when they begin a unit of work (a
//! login, a batch, a dispatch turn, a report, a sweep), so a change applies from the next one.
//! Those that keep state built from it follow changes: the inbox watcher re-watches, the SFTP
//! server closes the sessions a change takes away (tenant removed, key no longer listed, address
//! no longer allowed, folders moved) and keeps every other, and the partners are diffed
//! ([`Fleet::apply`]): only a removed or changed partner is stopped, every other bind stays up.
//!
//! What a running service cannot take over is kept as it is, and the reload says so: `state_dir`,
//! `key_file`, logging, the admin socket, `[sftp]`, `[email]`, `[metrics]`, `[backup]` and
//! `rescan_interval` change at the next restart. A configuration with errors, or one that
//! removes a tenant that still has open batches or files in its spool, is refused as a whole and
//! the running one kept.

use std::fmt;
use std::sync::Arc;

use tokio::sync::Mutex;

use crate::audit::{Audit, Event};
use crate::config::{Config, Live};
use crate::dispatch::fleet::Fleet;
use crate::store::Store;
use crate::store::records::BatchState;

/// What a reload changed, for the log, the audit trail and `smsdrop reload`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub tenants_added: Vec<String>,
    pub tenants_removed: Vec<String>,
    pub tenants_changed: Vec<String>,
    pub partners_added: Vec<String>,
    pub partners_removed: Vec<String>,
    pub partners_changed: Vec<String>,
    pub partners_failed: Vec<(String, String)>,
    pub routes_changed: bool,
    /// Settings that changed in the file and apply at the next restart.
    pub at_restart: Vec<&'static str>,
}

impl Summary {
    pub fn is_empty(&self) -> bool {
        *self
            == Summary {
                at_restart: self.at_restart.clone(),
                ..Summary::default()
            }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[String]| if v.is_empty() { "-".to_string() } else { v.join(" ") };
        if self.is_empty() {
            writeln!(f, "nothing to change")?;
        } else {
            writeln!(
                f,
                "tenants: added {}; removed {}; changed {}",
                list(&self.tenants_added),
                list(&self.tenants_removed),
                list(&self.tenants_changed)
            )?;
            writeln!(
                f,
                "partners: added {}; removed {}; changed {}",
                list(&self.partners_added),
                list(&self.partners_removed),
                list(&self.partners_changed)
            )?;
            writeln!(
                f,
                "routes: {}",
                if self.routes_changed { "changed" } else { "unchanged" }
            )?;
        }
        for (id, why) in &self.partners_failed {
            writeln!(
                f,
                "partner {id} could not start ({why}); its routes use the next partner"
            )?;
        }
        if !self.at_restart.is_empty() {
            writeln!(f, "at the next restart: {}", self.at_restart.join(" "))?;
        }
        Ok(())
    }
}

/// Why a reload was refused; the running configuration is kept.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(String);

/// Runs reloads, one at a time.
pub struct Reloader {
    live: Live,
    store: Store,
    audit: Audit,
    fleet: Mutex<Fleet>,
    /// Poked after a reload, so the dispatcher takes it at once.
    dispatch: Arc<crate::dispatch::Signal>,
}

impl Reloader {
    pub fn new(
        live: Live,
        store: Store,
        audit: Audit,
        fleet: Fleet,
        dispatch: Arc<crate::dispatch::Signal>,
    ) -> Reloader {
        Reloader {
            live,
            store,
            audit,
            fleet: Mutex::new(fleet),
            dispatch,
        }
    }

    /// Reads the configuration file again and applies it; `by` says who asked (for the audit).
    pub async fn reload(&self, by: &str) -> Result<Summary, Refused> {
        let mut fleet = self.fleet.lock().await;
        let old = self.live.get();
        let result = self.apply(&old, &mut fleet).await;
        let event = Event::new("config.reload", by).detail("file", old.path.display());
        crate::metrics::events().reload(result.is_ok());
        match &result {
            Ok(summary) => {
                let changes = summary.to_string().trim_end().replace('\n', "; ");
                tracing::info!(config = %old.path.display(), by, %changes, "configuration reloaded");
                for key in &summary.at_restart {
                    tracing::warn!(key, "this setting changed; it applies at the next restart");
                }
                self.audit
                    .record(event.detail("result", "applied").detail("changes", changes));
            }
            Err(e) => {
                tracing::error!(config = %old.path.display(), by, error = %e, "the new configuration is refused; the running one is kept");
                self.audit.record(event.detail("result", "refused").detail("error", e));
            }
        }
        result
    }

    async fn apply(&self, old: &Arc<Config>, fleet: &mut Fleet) -> Result<Summary, Refused> {
        let path = old.path.clone();
        let mut new = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| Refused(e.to_string()))?
            .map_err(|e| Refused(e.to_string()))?;
        let mut summary = Summary {
            at_restart: keep_fixed(&mut new, old),
            routes_changed: new.routes != old.routes,
            ..Summary::default()
        };
        for (id, t) in &new.tenants {
            match old.tenants.get(id) {
                None => summary.tenants_added.push(id.clone()),
                // `Tenant` holds keys, templates and time zones that have no `PartialEq`; their
                // debug forms differ exactly when a setting does.
                Some(o) if format!("{o:?}") != format!("{t:?}") => summary.tenants_changed.push(id.clone()),
                Some(_) => {}
            }
        }
        summary.tenants_removed = old
            .tenants
            .keys()
            .filter(|t| !new.tenants.contains_key(*t))
            .cloned()
            .collect();

        let (store, state_dir, removed, added) = (
            self.store.clone(),
            old.state_dir.clone(),
            summary.tenants_removed.clone(),
            summary.tenants_added.clone(),
        );
        let folders: Vec<_> = summary
            .tenants_added
            .iter()
            .chain(&summary.tenants_changed)
            .filter_map(|id| new.tenants.get(id).cloned())
            .collect();
        tokio::task::spawn_blocking(move || prepare_tenants(&store, &state_dir, &removed, &added, &folders))
            .await
            .map_err(|e| Refused(e.to_string()))??;

        let change = fleet
            .apply(&new.partners)
            .await
            .map_err(|e| Refused(format!("partner: {e}")))?;
        summary.partners_added = change.added;
        summary.partners_removed = change.removed;
        summary.partners_changed = change.changed;
        summary.partners_failed = change.failed;
        self.live.replace(Arc::new(new));
        self.dispatch.poke();
        Ok(summary)
    }
}

/// Checks that the removed tenants have nothing in progress, then makes the folders and keys of
/// the new ones (and the folders of changed ones, which may have moved).
fn prepare_tenants(
    store: &Store,
    state_dir: &std::path::Path,
    removed: &[String],
    added: &[String],
    folders: &[Arc<crate::config::Tenant>],
) -> Result<(), Refused> {
    for t in removed {
        let open = store
            .batches(Some(t))
            .map_err(|e| Refused(e.to_string()))?
            .iter()
            .filter(|b| matches!(b.state, BatchState::Ingesting | BatchState::Queued | BatchState::Held))
            .count();
        if open > 0 {
            return Err(Refused(format!(
                "tenant {t} is removed but has {open} open batches: wait for them to finish or cancel them (`smsdrop batch cancel`), then reload"
            )));
        }
        let spooled = std::fs::read_dir(crate::paths::spool_dir(state_dir, t))
            .map(|d| d.count())
            .unwrap_or(0);
        if spooled > 0 {
            return Err(Refused(format!(
                "tenant {t} is removed but {spooled} of its files are still being taken in; reload again in a moment"
            )));
        }
    }
    for t in folders {
        for (dir, mode, what) in [
            (&t.folders.inbox, 0o770, "inbox"),
            (&t.folders.outbox, 0o770, "outbox"),
            (&crate::paths::spool_dir(state_dir, &t.id), 0o700, "spool"),
        ] {
            crate::paths::make_dir(dir, mode)
                .map_err(|e| Refused(format!("tenant {}: {what} {}: {e}", t.id, dir.display())))?;
        }
    }
    let added: Vec<&str> = added.iter().map(String::as_str).collect();
    store
        .keys()
        .ensure(&added)
        .map_err(|e| Refused(format!("tenant keys: {e}")))
}

/// Puts back in `new` what only a restart changes, and names what differed.
fn keep_fixed(new: &mut Config, old: &Config) -> Vec<&'static str> {
    let mut differs = Vec::new();
    macro_rules! keep {
        ($($field:ident => $name:literal),* $(,)?) => {$(
            if new.$field != old.$field {
                differs.push($name);
                new.$field = old.$field.clone();
            }
        )*};
    }
    keep!(
        state_dir => "state_dir",
        key_file => "key_file",
        log_format => "log_format",
        log_filter => "log_filter",
        admin_socket => "admin.socket",
        rescan_interval => "rescan_interval",
        sftp => "sftp",
        email => "email",
        backup => "backup",
        metrics_listen => "metrics.listen",
    );
    differs
}
