//! The dispatcher's own thread.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The dispatcher's thread: a single-threaded runtime that runs the dispatch loop, the SMPP
/// connections and every submission and receipt, apart from the shared runtime (SFTP, the
/// watcher, HTTP listeners, mail).
///
/// A message's round trip crosses these tasks several times (the loop launches its submission,
/// the connection writes it and reads the answer, the answer lands in the loop, a receipt is
/// handed over and acknowledged once durable). On one thread each hand-over is a queue push; on
/// a pool of workers most were a wake-up of another thread, and on two cores the SMSC, smsdrop's
/// workers and its log writer then took the processors from each other (dispatch benchmark,
/// median of three rounds: 78% of the bare client's rate on the shared pool, 100 to 105% here).
/// What blocks (the database, the dispatch log) runs on threads of its own. smsdrop as a whole
/// spends about 55 µs of CPU per message there, this thread less: at 13,000 messages a second
/// it is not the limit.
pub struct Lane {
    pub(super) handle: tokio::runtime::Handle,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Lane {
    pub fn start() -> std::io::Result<Lane> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let stop = CancellationToken::new();
        let until = stop.clone();
        let thread = std::thread::Builder::new()
            .name("smsdrop-dispatch".into())
            .spawn(move || {
                runtime.block_on(until.cancelled());
                // Whatever is still running on its blocking threads after the service's stop
                // deadline (see `server`) is not waited for without end.
                runtime.shutdown_timeout(Duration::from_secs(5));
            })?;
        Ok(Lane {
            handle,
            stop,
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> tokio::runtime::Handle {
        self.handle.clone()
    }

    /// Ends the thread once the tasks on it have ended (what is left is dropped).
    pub fn finish(mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
