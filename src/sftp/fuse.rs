//! A socket that can be cut from outside: once its token is cancelled, every read and write
//! fails at once. russh runs a connection on a task of its own and acts on a disconnect request
//! only between key exchanges, so a client that sends its banner and then stays silent inside
//! the key exchange would otherwise hold its socket until the inactivity timeout.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// `S`, cut when its token is cancelled.
pub struct Fused<S> {
    inner: S,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<S> Fused<S> {
    pub fn new(inner: S, cut: CancellationToken) -> Fused<S> {
        Fused {
            inner,
            cut: Box::pin(cut.cancelled_owned()),
        }
    }

    /// `Err` once cut; registers the task to be woken when it is.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.cut.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(io::ErrorKind::ConnectionAborted, "connection cut")),
            Poll::Pending => Ok(()),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Fused<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Fused<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_cut_ends_a_pending_read() {
        let (a, mut b) = tokio::io::duplex(64);
        let cut = CancellationToken::new();
        let mut fused = Fused::new(a, cut.clone());
        b.write_all(b"x").await.expect("write");
        let mut one = [0u8; 1];
        fused.read_exact(&mut one).await.expect("read before the cut");
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 1];
            fused.read(&mut buf).await
        });
        tokio::task::yield_now().await;
        cut.cancel();
        let read = reader.await.expect("join");
        assert_eq!(read.expect_err("cut").kind(), io::ErrorKind::ConnectionAborted);
        drop(b);
    }
}
