//! `smsdrop status`.

use std::fmt::Write as _;

use super::{AdminError, Call};
use crate::config::Config;
use crate::sms::codes::MessageStatus;
use crate::store::records::BatchState;
use crate::store::{Store, StoreError};

/// `smsdrop status` through the socket or the store.
pub(super) fn status(call: &mut Call) -> Result<Vec<u8>, AdminError> {
    let ctx = call.ctx;
    Ok(text(&ctx.store, call.config, ctx.partners.as_ref(), ctx.workers.as_ref())?.into_bytes())
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
            Some((at, why)) => format!("{} {why}", super::time_text(*at)),
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
fn text(
    store: &Store,
    config: &Config,
    partners: Option<&crate::dispatch::HealthBoard>,
    workers: Option<&crate::workers::Workers>,
) -> Result<String, StoreError> {
    let mut out = String::new();
    partners_text(&mut out, partners);
    out.push('\n');
    workers_text(&mut out, workers);
    out.push('\n');
    sftp_text(&mut out, store, config);
    mail_text(&mut out, store, config)?;
    tenants_text(&mut out, store, config)?;
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

/// Partner health, as the running dispatcher sees it.
fn partners_text(out: &mut String, partners: Option<&crate::dispatch::HealthBoard>) {
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
}

/// The SFTP server's address and host key, and the bans in force.
fn sftp_text(out: &mut String, store: &Store, config: &Config) {
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
}

/// The mail queue: mails not yet taken by the SMTP server, alerts held for a digest.
fn mail_text(out: &mut String, store: &Store, config: &Config) -> Result<(), StoreError> {
    if config.email.is_some() {
        let _ = writeln!(
            out,
            "mail: {} queued, {} alerts held for a digest\n",
            store.pending_mails()?,
            store.digest_lines()?
        );
    }
    Ok(())
}

/// Batches and messages by tenant and status.
fn tenants_text(out: &mut String, store: &Store, config: &Config) -> Result<(), StoreError> {
    let statuses = MessageStatus::ALL;
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
    Ok(())
}
