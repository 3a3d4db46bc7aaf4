//! The configuration in force, which a reload swaps whole.
//!
//! Readers take [`Live::get`] when they begin a unit of work (a login, a batch, a dispatch turn,
//! a report, a sweep), so a change applies from the next one; those that keep state built from
//! it [`Live::subscribe`] to the changes.

use std::fmt;
use std::sync::Arc;

use tokio::sync::watch;

use super::Config;

/// The configuration in force, swapped whole by a reload.
#[derive(Clone)]
pub struct Live(Arc<watch::Sender<Arc<Config>>>);

impl Live {
    pub fn new(config: Arc<Config>) -> Live {
        Live(Arc::new(watch::Sender::new(config)))
    }

    /// The configuration now.
    pub fn get(&self) -> Arc<Config> {
        self.0.borrow().clone()
    }

    /// Notified at each reload that took.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        self.0.subscribe()
    }

    /// Swaps the configuration in force (a reload that took).
    pub fn replace(&self, config: Arc<Config>) {
        self.0.send_replace(config);
    }
}

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Live").field(&self.get().path).finish()
    }
}
