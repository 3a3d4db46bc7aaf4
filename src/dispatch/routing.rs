//! Routing and failover: a message goes to the first partner of its route (longest prefix)
//! that is up, or that a probe is due on; partners leave their routes and come back as their
//! health says, with alerts; a reload routes every waiting message again.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use super::health::{self, Change, Health, PartnerState, PartnerView};
use super::outcome::{Pick, final_status, settle};
use super::run::Run;
use super::{Dispatcher, now};
use crate::alert::{Alert, AlertKind};
use crate::config;
use crate::sms::codes::MessageStatus;

impl Run {
    /// Takes a reloaded configuration and partner set: partners that were replaced start with a
    /// fresh health record, and every message waiting for a partner is routed again under the
    /// new routes (one left without a route ends `failed` with `no_route`, as at any other time).
    pub(super) fn reconfigure(&mut self) {
        let d = &mut self.d;
        let before = d.partners.clone();
        d.config = d.live.borrow_and_update().clone();
        d.partners = d.fleet.borrow_and_update().clone();
        self.health
            .retain(|id, _| matches!((before.get(id), d.partners.get(id)), (Some(a), Some(b)) if Arc::ptr_eq(a, b)));
        for (id, p) in &d.config.partners {
            if let (Some(policy), false) = (p.health(), self.health.contains_key(id)) {
                self.health.insert(id.clone(), Health::new(policy));
            }
        }
        if let Ok(mut board) = d.board.write() {
            board.retain(|id, _| d.partners.contains_key(id));
        }
        let at = std::time::Instant::now();
        let t = now();
        let waiting: Vec<Pick> = self.ready.drain().flat_map(|(_, q)| q).collect();
        let moved = waiting.len();
        for p in waiting {
            self.route(p, at, t);
        }
        self.receipt_timeout = self.d.receipt_timeout();
        tracing::info!(
            partners = self.d.partners.len(),
            routes = self.d.config.routes.len(),
            routed_again = moved,
            "dispatcher took the reloaded configuration"
        );
    }

    /// Puts a message in the queue of the partner its route chooses; one without a route ends
    /// `failed` (`no_route`).
    pub(super) fn route(&mut self, p: Pick, at: std::time::Instant, t: i64) {
        match self.d.choose(&p.message.phone, &mut self.health, at) {
            Some(partner) => self.ready.entry(partner).or_default().push_back(p),
            None => {
                self.pending
                    .step
                    .outcomes
                    .push((p.id, final_status(MessageStatus::Failed, "", "no_route", p.attempts, t)));
                settle(&p, &mut self.pending);
            }
        }
    }
}

impl Dispatcher {
    /// Reads every partner's meter; moves partners out of their routes and back, with alerts;
    /// messages waiting for a partner that went down go to the next one of their route.
    pub(super) fn check_health(
        &self,
        health: &mut HashMap<String, Health>,
        ready: &mut HashMap<String, VecDeque<Pick>>,
        outstanding: &HashMap<String, usize>,
    ) {
        let now = std::time::Instant::now();
        let mut fallen = Vec::new();
        for (id, h) in health.iter_mut() {
            let Some(partner) = self.partners.get(id) else { continue };
            let Some(meter) = partner.meter() else { continue };
            let Some(policy) = self.config.partners.get(id).and_then(config::Partner::health) else {
                continue;
            };
            match h.observe(meter, partner.is_connected(), now) {
                Some(Change::Down(reason)) => {
                    tracing::warn!(partner = %id, %reason, "partner down: its routes use the next partner");
                    let alert = Alert::new(AlertKind::PartnerDown, None, format!("Partner {id} is down: {reason}."))
                        .detail("partner", id)
                        .detail("reason", &reason)
                        .detail("routes", self.routes_of(id))
                        .action(format!(
                            "Nothing is lost: its traffic goes to the next partner of each route. smsdrop probes it every {} and takes it back when it answers well; if it stays down, ask the partner.",
                            humantime::format_duration(policy.probe_interval)
                        ));
                    self.raise(alert);
                    fallen.push(id.clone());
                }
                Some(Change::Up) => {
                    tracing::info!(partner = %id, "partner up again: back in its routes");
                    let alert = Alert::new(AlertKind::PartnerUp, None, format!("Partner {id} is up again."))
                        .detail("partner", id)
                        .detail("routes", self.routes_of(id))
                        .action("None: it has its traffic back.");
                    self.raise(alert);
                }
                None => {}
            }
        }
        for id in fallen {
            let Some(queue) = ready.remove(&id) else { continue };
            for p in queue {
                match self.choose(&p.message.phone, health, now) {
                    Some(target) => ready.entry(target).or_default().push_back(p),
                    None => ready.entry(id.clone()).or_default().push_back(p),
                }
            }
        }
        if let Ok(mut board) = self.board.write() {
            for (id, partner) in self.partners.iter() {
                let (state, since, reason, latency, failed, samples) = match health.get(id) {
                    Some(h) => {
                        let (latency, failed, samples) = h.summary();
                        let (state, reason) = match h.state() {
                            health::State::Up => (PartnerState::Up, String::new()),
                            health::State::Down {
                                reason, probes_sent, ..
                            } => (
                                if *probes_sent > 0 {
                                    PartnerState::Probing
                                } else {
                                    PartnerState::Down
                                },
                                reason.clone(),
                            ),
                        };
                        (state, h.since, reason, latency, failed, samples)
                    }
                    None => (PartnerState::Up, 0, String::new(), Duration::ZERO, 0, 0),
                };
                board.insert(
                    id.clone(),
                    PartnerView {
                        state,
                        since,
                        reason,
                        connected: partner.is_connected(),
                        in_flight: outstanding.get(id).copied().unwrap_or(0),
                        window: partner.window(),
                        latency_ms: latency.as_millis() as u64,
                        failed,
                        samples,
                    },
                );
            }
        }
    }

    fn routes_of(&self, partner: &str) -> String {
        let prefixes: Vec<String> = self
            .config
            .routes
            .iter()
            .filter(|r| r.partners.iter().any(|p| p == partner))
            .map(|r| {
                if r.prefix.is_empty() {
                    "(default)".to_string()
                } else {
                    r.prefix.clone()
                }
            })
            .collect();
        prefixes.join(" ")
    }

    /// Raises an alert off the async threads (it writes the mail queue).
    fn raise(&self, alert: Alert) {
        let alerts = self.alerts.clone();
        tokio::task::spawn_blocking(move || alerts.raise(alert));
    }

    /// The partner a message goes to: the first of its route that is up, or that a probe is due
    /// on; when every one is down, the first. `None`: no route.
    pub(super) fn choose(
        &self,
        phone: &str,
        health: &mut HashMap<String, Health>,
        now: std::time::Instant,
    ) -> Option<String> {
        let route = self.config.route_for(phone)?;
        let mut known = route.partners.iter().filter(|p| self.partners.contains_key(*p));
        let first = known.clone().next()?;
        for p in known.by_ref() {
            match health.get_mut(p) {
                None => return Some(p.clone()),
                Some(h) if h.is_up() => return Some(p.clone()),
                Some(h) if h.probe_room(now) > 0 => {
                    h.probe_sent();
                    return Some(p.clone());
                }
                Some(_) => {}
            }
        }
        Some(first.clone())
    }

    /// Whether a message that failed on `failing` has another partner up in its route.
    pub(super) fn has_alternative(&self, phone: &str, failing: &str, health: &HashMap<String, Health>) -> bool {
        self.config.route_for(phone).is_some_and(|r| {
            r.partners
                .iter()
                .any(|p| p != failing && self.partners.contains_key(p) && health.get(p).is_none_or(Health::is_up))
        })
    }
}
