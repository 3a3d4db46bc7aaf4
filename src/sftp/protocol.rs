//! The SFTP packet loop of one channel (draft-ietf-secsh-filexfer-02, the version OpenSSH
//! speaks): read a packet, hand it to the [`World`](super::world::World), write the answer.
//!
//! russh-sftp's own loop logs a warning and goes on reading after a packet it cannot take, so a
//! client that sends one over-long or malformed packet gets no answer, desynchronises the
//! stream and can fill the log. Here every request gets an answer with its own id: a packet that
//! does not parse is answered `SSH_FX_BAD_MESSAGE` (its whole length was read, so the stream stays
//! in step); a length over the limit, or one too short to hold a request id, ends the channel
//! after the answer, because nothing after it can be trusted. After [`MAX_BAD`] malformed packets
//! the channel is closed too.

use std::net::SocketAddr;

use hyper::body::Bytes;
use russh_sftp::protocol::{Packet, Status, StatusCode};
use russh_sftp::server::{Handler, StatusReply};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest packet a client may send: OpenSSH writes up to 256 KiB of data per request.
pub const MAX_PACKET: u32 = 512 * 1024;
/// Malformed packets tolerated on one channel.
const MAX_BAD: u32 = 16;

/// Warnings about one address's malformed packets: at most one line a minute.
static WARNINGS: crate::limits::Throttle = crate::limits::Throttle::new(std::time::Duration::from_secs(60));

/// Runs the packet loop until the client closes the channel, an I/O error, or a packet that
/// breaks the framing.
pub async fn serve<S, H>(mut stream: S, mut handler: H, peer: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    H: Handler + Send,
{
    let mut bad = 0u32;
    // An error reading the length is the end of the stream.
    while let Ok(length) = stream.read_u32().await {
        if !(5..=MAX_PACKET).contains(&length) {
            // Answer with the id if it is there, then end: the framing cannot be trusted.
            let mut head = [0u8; 5];
            let id = if length >= 5 && stream.read_exact(&mut head).await.is_ok() {
                u32::from_be_bytes([head[1], head[2], head[3], head[4]])
            } else {
                0
            };
            if let Some(held) = WARNINGS.allow(&peer.ip().to_string()) {
                tracing::warn!(peer = %peer, length, held_back = held, "SFTP packet length out of bounds; channel closed");
            }
            let message = format!("packet length {length} out of bounds (5 to {MAX_PACKET})");
            let _ = answer(
                &mut stream,
                Packet::status(id, StatusCode::BadMessage, &message, "en-US"),
            )
            .await;
            break;
        }
        let mut buf = vec![0u8; length as usize];
        if stream.read_exact(&mut buf).await.is_err() {
            break;
        }
        // The request id follows the type byte in every request but INIT (whose place holds
        // the version, which is also what its answer carries).
        let id = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        let mut bytes = Bytes::from(buf);
        let response = match Packet::try_from(&mut bytes) {
            Ok(request) => dispatch(request, &mut handler).await,
            Err(e) => {
                bad += 1;
                if let Some(held) = WARNINGS.allow(&peer.ip().to_string()) {
                    tracing::warn!(peer = %peer, error = %e, held_back = held, "malformed SFTP packet answered BAD_MESSAGE");
                }
                Packet::status(id, StatusCode::BadMessage, "malformed packet", "en-US")
            }
        };
        if answer(&mut stream, response).await.is_err() || bad >= MAX_BAD {
            break;
        }
    }
    let _ = stream.shutdown().await;
}

async fn answer<S: AsyncWrite + Unpin>(stream: &mut S, packet: Packet) -> std::io::Result<()> {
    let bytes = Bytes::try_from(packet).map_err(|e| std::io::Error::other(e.to_string()))?;
    stream.write_all(&bytes).await?;
    stream.flush().await
}

/// A handler's error as the status packet answering request `id`.
fn failed(id: u32, err: impl Into<StatusReply>) -> Packet {
    let StatusReply {
        status_code,
        error_message,
        language_tag,
    } = err.into();
    Packet::Status(Status {
        id,
        status_code,
        error_message: error_message.unwrap_or_else(|| status_code.to_string()),
        language_tag: language_tag.unwrap_or_else(|| "en-US".to_string()),
    })
}

/// Calls the handler method a request names; a request a server never receives (a reply type)
/// is answered `SSH_FX_BAD_MESSAGE`.
async fn dispatch<H: Handler + Send>(packet: Packet, h: &mut H) -> Packet {
    macro_rules! call {
        ($id:expr, $call:expr) => {
            match $call.await {
                Ok(p) => p.into(),
                Err(e) => failed($id, e),
            }
        };
    }
    match packet {
        Packet::Init(p) => call!(p.version, h.init(p.version, p.extensions)),
        Packet::Open(p) => call!(p.id, h.open(p.id, p.filename, p.pflags, p.attrs)),
        Packet::Close(p) => call!(p.id, h.close(p.id, p.handle)),
        Packet::Read(p) => call!(p.id, h.read(p.id, p.handle, p.offset, p.len)),
        Packet::Write(p) => call!(p.id, h.write(p.id, p.handle, p.offset, p.data)),
        Packet::Lstat(p) => call!(p.id, h.lstat(p.id, p.path)),
        Packet::Fstat(p) => call!(p.id, h.fstat(p.id, p.handle)),
        Packet::SetStat(p) => call!(p.id, h.setstat(p.id, p.path, p.attrs)),
        Packet::FSetStat(p) => call!(p.id, h.fsetstat(p.id, p.handle, p.attrs)),
        Packet::OpenDir(p) => call!(p.id, h.opendir(p.id, p.path)),
        Packet::ReadDir(p) => call!(p.id, h.readdir(p.id, p.handle)),
        Packet::Remove(p) => call!(p.id, h.remove(p.id, p.filename)),
        Packet::MkDir(p) => call!(p.id, h.mkdir(p.id, p.path, p.attrs)),
        Packet::RmDir(p) => call!(p.id, h.rmdir(p.id, p.path)),
        Packet::RealPath(p) => call!(p.id, h.realpath(p.id, p.path)),
        Packet::Stat(p) => call!(p.id, h.stat(p.id, p.path)),
        Packet::Rename(p) => call!(p.id, h.rename(p.id, p.oldpath, p.newpath)),
        Packet::ReadLink(p) => call!(p.id, h.readlink(p.id, p.path)),
        Packet::Symlink(p) => call!(p.id, h.symlink(p.id, p.linkpath, p.targetpath)),
        Packet::Extended(p) => call!(p.id, h.extended(p.id, p.request, p.data)),
        other => Packet::status(other.get_request_id(), StatusCode::BadMessage, "not a request", "en-US"),
    }
}
