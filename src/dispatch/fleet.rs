//! The running partners, and what a reload changes in them.
//!
//! Each partner runs under its own stop token (a child of the service's): a reload stops the
//! partners it removes or changes (an SMPP partner unbinds cleanly) and starts the new ones, and
//! leaves every other partner, its binds and its window, alone. The dispatcher takes the new set
//! at its next turn; messages handed to a stopped partner come back as transient failures and go
//! to the next partner of their route.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::http::{HttpPartner, HttpSetupError};
use super::partner::{Inbound, Partner};
use super::{sink, smpp};
use crate::config;

/// The partners the dispatcher sends through, by id.
pub type PartnerMap = Arc<HashMap<String, Arc<dyn Partner>>>;

/// A webhook address the partner being replaced still holds is waited for this long.
const REBIND_WAIT: Duration = Duration::from_secs(5);

struct Running {
    partner: Arc<dyn Partner>,
    config: config::Partner,
    stop: CancellationToken,
}

/// A partner made and not started yet.
enum Made {
    Sink(Arc<sink::SinkPartner>),
    Smpp(Arc<smpp::SmppPartner>),
    Http(Arc<HttpPartner>),
}

/// What [`Fleet::apply`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FleetChange {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    /// Partners that could not start (their routes use the next partner), with why.
    pub failed: Vec<(String, String)>,
}

/// The partners of the running configuration, with their connections and listeners.
pub struct Fleet {
    running: BTreeMap<String, Running>,
    incoming: mpsc::UnboundedSender<Inbound>,
    tracker: TaskTracker,
    /// Where SMPP connections run: the dispatcher's thread ([`super::Lane`]).
    lane: tokio::runtime::Handle,
    shutdown: CancellationToken,
    published: watch::Sender<PartnerMap>,
}

impl Fleet {
    /// Starts every partner of `partners`. At start-up a partner that cannot start is an error.
    pub async fn start(
        partners: &BTreeMap<String, config::Partner>,
        incoming: mpsc::UnboundedSender<Inbound>,
        tracker: TaskTracker,
        lane: tokio::runtime::Handle,
        shutdown: CancellationToken,
    ) -> Result<Fleet, HttpSetupError> {
        let (published, _) = watch::channel(PartnerMap::default());
        let mut fleet = Fleet {
            running: BTreeMap::new(),
            incoming,
            tracker,
            lane,
            shutdown,
            published,
        };
        for (id, cfg) in partners {
            let made = fleet.make(id, cfg)?;
            fleet.launch(id, cfg, made).await?;
        }
        fleet.publish();
        Ok(fleet)
    }

    /// The partner set, now and after each change.
    pub fn subscribe(&self) -> watch::Receiver<PartnerMap> {
        self.published.subscribe()
    }

    /// Brings the running partners in line with `partners`. Everything that can fail without
    /// touching the network (the HTTP client, its token) is done first: an error there changes
    /// nothing. A partner that then cannot start (its webhook address is taken) is reported in
    /// [`FleetChange::failed`] and left out.
    pub async fn apply(&mut self, partners: &BTreeMap<String, config::Partner>) -> Result<FleetChange, HttpSetupError> {
        let mut change = FleetChange::default();
        let mut made = Vec::new();
        for (id, cfg) in partners {
            match self.running.get(id) {
                Some(r) if r.config == *cfg => {}
                Some(_) => {
                    made.push((id, cfg, self.make(id, cfg)?));
                    change.changed.push(id.clone());
                }
                None => {
                    made.push((id, cfg, self.make(id, cfg)?));
                    change.added.push(id.clone());
                }
            }
        }
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|id| !partners.contains_key(*id))
            .cloned()
            .collect();
        for id in gone.iter().chain(&change.changed) {
            if let Some(r) = self.running.remove(id) {
                r.stop.cancel();
                tracing::info!(partner = %id, "partner stopped by a reload");
            }
        }
        change.removed = gone;
        for (id, cfg, m) in made {
            if let Err(e) = self.launch(id, cfg, m).await {
                tracing::error!(partner = %id, error = %e, "partner cannot start; its routes use the next partner");
                change.failed.push((id.clone(), e.to_string()));
            }
        }
        self.publish();
        Ok(change)
    }

    fn make(&self, id: &str, cfg: &config::Partner) -> Result<Made, HttpSetupError> {
        Ok(match cfg {
            config::Partner::Sink { path } => Made::Sink(Arc::new(sink::SinkPartner::new(id, path))),
            config::Partner::Smpp(c) => Made::Smpp(smpp::SmppPartner::new(id, c.clone(), self.incoming.clone())),
            config::Partner::Http(c) => Made::Http(HttpPartner::new(id, c.clone(), self.incoming.clone())?),
        })
    }

    async fn launch(&mut self, id: &str, cfg: &config::Partner, made: Made) -> Result<(), HttpSetupError> {
        let stop = self.shutdown.child_token();
        let partner: Arc<dyn Partner> = match made {
            Made::Sink(s) => s,
            Made::Smpp(s) => {
                s.start(&self.tracker, &self.lane, stop.clone());
                s
            }
            Made::Http(h) => {
                // The partner this one replaces lets go of its webhook address as it stops.
                let deadline = tokio::time::Instant::now() + REBIND_WAIT;
                loop {
                    match h.start(&self.tracker, stop.clone()).await {
                        Ok(()) => break,
                        Err(HttpSetupError::Listen { cause: source, .. })
                            if source.kind() == std::io::ErrorKind::AddrInUse
                                && tokio::time::Instant::now() < deadline =>
                        {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
                h
            }
        };
        self.running.insert(
            id.to_string(),
            Running {
                partner,
                config: cfg.clone(),
                stop,
            },
        );
        Ok(())
    }

    fn publish(&self) {
        let map: HashMap<String, Arc<dyn Partner>> = self
            .running
            .iter()
            .map(|(id, r)| (id.clone(), r.partner.clone()))
            .collect();
        self.published.send_replace(Arc::new(map));
    }
}
