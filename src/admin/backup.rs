//! `smsdrop backup`: a snapshot of the store streamed over the admin socket (the header says
//! `stream`, then frames up to the end frame, then one JSON summary line), and the command's end
//! that writes it to a file.

use std::io;
use std::path::Path;

use super::protocol::{Header, Request};
use super::{AdminContext, AdminError};
use crate::audit::Event;

/// Streams a backup to the admin connection: header, frames, then a summary line. A failure
/// after the header is sent as an error frame, so the other end never takes half a backup for
/// a whole one.
pub(super) fn stream(ctx: &AdminContext, stream: std::os::unix::net::UnixStream, actor: &str) -> io::Result<()> {
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
