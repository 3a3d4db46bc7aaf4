//! The small HTTP/1 listener the HTTP partner's webhook and the metrics endpoint share: a cap on
//! connections and a smaller one per source address (more are refused, so that one address's
//! slow connections cannot take every slot), a descriptor of the clients' budget per
//! connection, a deadline for the request head, a lifetime per connection, and everything ended
//! at shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How long a client may take to send its request head.
const HEADER_DEADLINE: Duration = Duration::from_secs(10);
/// Connections at once from one source address.
const PER_ADDRESS: usize = 8;
/// How long one connection may stay open.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Repeated warnings of the listeners, at most one line a minute each.
static FAILURES: crate::limits::Throttle = crate::limits::Throttle::new(Duration::from_secs(60));

/// Accepts on `listener` until `shutdown`, at most `limit` connections at once, each request
/// answered by `handler` (given the peer's address). `what` names the listener in logs.
pub async fn serve<H, F>(
    listener: TcpListener,
    limit: usize,
    what: &'static str,
    shutdown: CancellationToken,
    handler: H,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limit));
    let per_ip: Arc<crate::limits::Counter<std::net::IpAddr>> = Arc::default();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                if let Some(held) = FAILURES.allow(what) {
                    tracing::warn!(listener = what, error = %e, held_back = held, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(from_ip) = per_ip.try_take(peer.ip(), PER_ADDRESS.min(limit)) else {
            if let Some(held) = FAILURES.allow(&format!("{what} {}", peer.ip())) {
                tracing::warn!(listener = what, %peer, held_back = held, "too many connections from this address; refused");
            }
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Some(held) = FAILURES.allow(&format!("{what} full")) {
                tracing::warn!(listener = what, %peer, held_back = held, "too many connections; refused");
            }
            continue;
        };
        let Some(descriptor) = crate::limits::descriptors().try_take() else {
            if let Some(held) = FAILURES.allow(&format!("{what} descriptors")) {
                tracing::warn!(listener = what, %peer, held_back = held, "no descriptor left for clients; refused");
            }
            continue;
        };
        let (handler, stop) = (handler.clone(), shutdown.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let answer = handler(req, peer);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_DEADLINE)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(CONNECTION_LIFETIME) => {}
            }
            drop((slot, descriptor, from_ip));
        });
    }
}
