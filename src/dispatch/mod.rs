//! The way out: takes due messages from the queue in a fair order, routes them, hands them to
//! partners and records what became of them (docs/partners.md).
//!
//! Each step's outcomes and the batches' cursors are made durable in the dispatch log after the
//! partner answered, and only then does a window slot come back: a crash can resend at most
//! what was in flight, never lose an outcome. One file per idea:
//! - [`run`]: the loop, as a struct whose state is its fields;
//! - [`rotation`]: fairness between tenants and between a tenant's batches;
//! - [`fill`]: reading ahead (due scheduled messages, then the next turns);
//! - [`routing`]: routes, failover, partners leaving and rejoining their routes;
//! - [`outcome`]: a flight to a partner and what its answers become (retries, final statuses);
//! - [`inbound`]: receipts and incoming messages from partners;
//! - [`log`]: the dispatch log's writer thread and its applier;
//! - [`signal`]: the doorbell batches ring, and how far the log is applied;
//! - [`lane`]: the dispatcher's own thread;
//! - [`health`]: each partner's health, and the board `status` and `/metrics` read;
//! - [`fleet`], [`partner`], [`sink`], [`smpp`], [`http`]: the partners; [`mo`]: which tenant
//!   an incoming message may belong to.

mod fill;
pub mod fleet;
pub mod health;
pub mod http;
mod inbound;
pub mod lane;
mod log;
pub mod mo;
mod outcome;
pub mod partner;
pub mod rotation;
mod routing;
mod run;
pub mod signal;
pub mod sink;
pub mod smpp;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::alert::Alerter;
use crate::config::{self, Config};
use crate::reply::ReportRequests;
use crate::store::{Store, StoreError};
pub use health::{HealthBoard, PartnerState, PartnerView};
pub use lane::Lane;
pub use rotation::QUANTUM;
pub use signal::Signal;

/// Sends queued messages through partners.
pub struct Dispatcher {
    pub store: Store,
    /// The configuration of this turn, taken from `live` when a reload changed it.
    pub config: Arc<Config>,
    pub live: tokio::sync::watch::Receiver<Arc<Config>>,
    /// The partners of this turn, taken from `fleet` when a reload changed them.
    pub partners: fleet::PartnerMap,
    pub fleet: tokio::sync::watch::Receiver<fleet::PartnerMap>,
    /// Poked when batches change.
    pub wake: Arc<Signal>,
    pub reports: ReportRequests,
    /// Receipts from partners, committed with the dispatch outcomes.
    pub incoming: tokio::sync::mpsc::UnboundedReceiver<partner::Inbound>,
    /// `partner_down` and `partner_up` go here.
    pub alerts: Alerter,
    /// Partner health, published for `status`.
    pub board: HealthBoard,
}

/// The dispatcher's wall time: `send_at`, retries, validity and receipt timeouts read it.
fn now() -> i64 {
    crate::clock::now()
}

impl Dispatcher {
    /// Starts the dispatch loop ([`run`]) on the [`Lane`]; it runs until `shutdown` and every
    /// logged step is applied. Messages flow continuously: picked in fair order, routed, handed
    /// to their partner within its window, and their outcomes committed in groups. A partner's window slot comes back only when the outcome
    /// is durable, so after a crash at most `window` messages per partner were sent and not
    /// recorded (and are sent again).
    ///
    /// The loop runs on the [`Lane`] with the SMPP partners' connections and the submissions.
    /// Each turn of the loop that landed something hands one step to the dispatch log's own
    /// thread ([`log_writer`]), which writes every step waiting for it in one synchronous write
    /// (a group commit) while the loop goes on landing answers and handing out what the
    /// windows allow.
    ///
    /// The receiver it returns says whether the dispatch log opened at the first try (and what
    /// a crash left in it was applied): `serve` says it is serving only then.
    pub fn spawn(
        self,
        tracker: &tokio_util::task::TaskTracker,
        lane: &Lane,
        shutdown: CancellationToken,
    ) -> tokio::sync::oneshot::Receiver<Result<(), String>> {
        let (opened_tx, opened) = tokio::sync::oneshot::channel();
        tracker.spawn_on(run::Run::run(self, shutdown, opened_tx), &lane.handle);
        opened
    }

    /// Batches waiting only for receipts are closed after the longest `receipt_timeout`.
    fn receipt_timeout(&self) -> Option<Duration> {
        self.config
            .partners
            .values()
            .filter_map(config::Partner::receipt_timeout)
            .max()
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.store.blocking(f).await
    }
}
