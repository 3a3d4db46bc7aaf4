//! The admin socket's protocol: one JSON request line ([`Request`]), answered by one JSON header
//! line ([`Header`]) and, for answers with a body, that many raw bytes (a backup is a stream of
//! frames instead: [`super::backup`]). The socket is mode 0600; requests are at most
//! [`MAX_REQUEST`] bytes.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::{AdminContext, AdminError};

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

/// A command, as sent over the socket: `{"cmd": "batch-show", "id": 7}`. Its name on the wire
/// is its name in the audit log (`admin.batch-show`).
#[derive(Debug, Clone, Serialize, Deserialize, strum::IntoStaticStr)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
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
    pub(super) fn reads_only(&self) -> bool {
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

    /// The command's name on the wire and in the audit log.
    pub fn name(&self) -> &'static str {
        self.into()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Header {
    pub ok: bool,
    pub error: Option<String>,
    pub len: usize,
    /// The body is a backup stream: frames up to the end frame, then one JSON summary line.
    #[serde(default)]
    pub stream: bool,
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
            return tokio::task::spawn_blocking(move || super::backup::stream(&ctx, stream, &actor))
                .await
                .map_err(io::Error::other)?;
        }
        Ok(Request::Reload) if ctx.reloader.is_some() => reload(&ctx, &actor).await,
        Ok(request) => tokio::task::spawn_blocking(move || super::handle(&ctx, &request, &actor))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commands_audit_name_is_its_name_on_the_wire() {
        let requests = [
            Request::Status,
            Request::BlocklistAdd {
                tenant: None,
                phone: "+33612345678".into(),
            },
            Request::SubjectErase {
                phone: "+33612345678".into(),
                tenant: Some("acme".into()),
                block: true,
            },
            Request::KeyReload {
                action: KeyChange::Rotate,
                version: 2,
                key: None,
            },
            Request::AuditVerify,
            Request::TenantPurge { tenant: "old".into() },
        ];
        let names: Vec<&str> = requests.iter().map(Request::name).collect();
        assert_eq!(
            names,
            [
                "status",
                "blocklist-add",
                "subject-erase",
                "key-reload",
                "audit-verify",
                "tenant-purge"
            ]
        );
        for r in &requests {
            let wire = serde_json::to_value(r).expect("json");
            assert_eq!(wire["cmd"], r.name(), "{r:?}");
        }
    }
}
