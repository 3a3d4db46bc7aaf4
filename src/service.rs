//! What the service manager sees of the daemon (systemd's `sd_notify(3)` protocol, through the
//! `sd-notify` crate): `READY=1` once every listener is up, `RELOADING=1` and `READY=1` around a
//! reload, `STOPPING=1` at shutdown, `STATUS=` lines for `systemctl status`, and `WATCHDOG=1`
//! from a loop that first checks the store answers, so a daemon whose store is stuck is
//! restarted rather than pinged along. Credentials given with `LoadCredential=` are read from
//! `$CREDENTIALS_DIRECTORY`. Without `NOTIFY_SOCKET` (not under systemd) all of it is silent.

use std::path::PathBuf;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot tell the service manager");
    }
}

/// Every listener is up.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload begins (systemd wants the monotonic time with it).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Shutdown begins.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// A credential passed by the service manager (`LoadCredential=name:…`), if there is one.
pub fn credential(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")?;
    let path = PathBuf::from(dir).join(name);
    path.is_file().then_some(path)
}

/// How long the store may take to answer the watchdog's question.
const STORE_ANSWER: Duration = Duration::from_secs(5);

/// Pings the watchdog at half its interval, each time after the store answered a read; does
/// nothing when the service manager asked for no watchdog.
pub async fn watchdog(store: Store, shutdown: CancellationToken) {
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (timeout / 2).max(Duration::from_millis(100));
    tracing::debug!(?every, "watchdog enabled");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let check = store.blocking(|s| s.mark(crate::store::Mark::WalApplied));
        match tokio::time::timeout(STORE_ANSWER.min(every), check).await {
            Ok(Ok(_)) => send(&[NotifyState::Watchdog]),
            Ok(Err(e)) => tracing::error!(error = %e, "the store does not answer; the watchdog is not pinged"),
            Err(_) => tracing::error!("the store is slow to answer; the watchdog is not pinged"),
        }
    }
}

/// The master key file to read: the credential `master.key` when the service manager passes
/// one (`LoadCredential=`), else the configuration's `key_file`.
pub fn key_path(config: &crate::config::Config) -> std::path::PathBuf {
    credential("master.key").unwrap_or_else(|| config.key_file.clone())
}
