//! Partner health: when a partner leaves its routes and when it comes back (docs/partners.md).
//!
//! A partner measures its own submissions into its [`Meter`] (the SMPP partner times each
//! `submit_sm` from the moment it goes on the wire, so queueing for the window or the `tps` cap
//! never counts as slowness). The dispatcher reads the meters and keeps one [`Health`] per
//! partner:
//! - **up**: routes use it. It goes down when, over its last [`SAMPLES`] submissions (at least
//!   [`MIN_SAMPLES`]), `max_error_percent` of them failed transiently (time-outs, lost
//!   connections, system errors, full queues; throttling is not an error, it is answered by
//!   slowing down) or their median latency passed `max_latency`; or when it has had no
//!   connection for [`NO_CONNECTION`].
//! - **down**: routes skip it and send to the next partner. Every `probe_interval`, once it is
//!   connected again, it is given [`PROBES`] real messages; when all of them are answered
//!   without error and within `max_latency` it is up again, else it waits another interval.
//!   Real messages are the only honest probe: a slow SMSC answers `enquire_link` fast.
//!
//! When every partner of a route is down, the route's first partner still gets its messages:
//! they wait there, retried with back-off, rather than nowhere.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::HealthPolicy;

/// Submissions a partner is judged on.
pub const SAMPLES: usize = 20;
/// Submissions needed before a partner is judged on them.
pub const MIN_SAMPLES: usize = 5;
/// Messages a partner that is down gets per probe.
pub const PROBES: usize = 3;
/// A partner with no connection this long is down.
pub const NO_CONNECTION: Duration = Duration::from_secs(3);

/// One submission as the partner saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub latency: Duration,
    pub ok: bool,
}

/// Where a partner's own measurements gather until the dispatcher reads them.
#[derive(Debug, Default)]
pub struct Meter {
    samples: Mutex<Vec<Sample>>,
    /// Every latency also goes to the partner's `smsdrop_submit_latency_seconds`.
    histogram: Option<prometheus_client::metrics::histogram::Histogram>,
}

impl Meter {
    /// The meter of partner `id`.
    pub fn of(id: &str) -> Meter {
        Meter {
            samples: Mutex::default(),
            histogram: Some(crate::metrics::events().submit_latency(id)),
        }
    }

    /// Records one submission: `ok` unless it failed in a way that says the partner is unwell.
    pub fn record(&self, latency: Duration, ok: bool) {
        if let Some(h) = &self.histogram {
            h.observe(latency.as_secs_f64());
        }
        if let Ok(mut s) = self.samples.lock() {
            if s.len() < 4 * SAMPLES {
                s.push(Sample { latency, ok });
            } else {
                // the dispatcher has not read for a while: keep the newest
                s.remove(0);
                s.push(Sample { latency, ok });
            }
        }
    }

    fn take(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
    }
}

/// A partner's state as routes see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Up,
    Down {
        /// Why it went down.
        reason: String,
        /// When the next probe may go.
        next_probe: Instant,
        /// Probe messages handed to it since `next_probe`.
        probes_sent: usize,
        /// Probe answers that came back good.
        probes_ok: usize,
    },
}

crate::sms::codes::wire_enum!(
    /// How a partner stands, as `smsdrop status` and `/metrics` show it (`probing`: down, with
    /// probe messages out).
    PartnerState {
        Up => "up",
        Down => "down",
        Probing => "probing",
    }
);

/// How a partner stands, for `smsdrop status` and `/metrics` (the health board).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartnerView {
    pub state: PartnerState,
    /// Unix seconds of the last move.
    pub since: i64,
    /// Why it is down.
    pub reason: String,
    pub connected: bool,
    /// Messages handed to it and not yet recorded, and its window.
    pub in_flight: usize,
    pub window: usize,
    /// Median submit latency and transient failures over its last submissions.
    pub latency_ms: u64,
    pub failed: usize,
    pub samples: usize,
}

/// Every partner's [`PartnerView`], kept by the dispatcher.
pub type HealthBoard = std::sync::Arc<std::sync::RwLock<std::collections::BTreeMap<String, PartnerView>>>;

/// A move of a partner in or out of its routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Down(String),
    Up,
}

/// One partner's health.
#[derive(Debug)]
pub struct Health {
    policy: HealthPolicy,
    recent: VecDeque<Sample>,
    state: State,
    disconnected_since: Option<Instant>,
    /// Unix seconds of the last change, for `status`.
    pub since: i64,
}

fn median(samples: &VecDeque<Sample>) -> Duration {
    let mut l: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    l.sort();
    l.get(l.len() / 2).copied().unwrap_or_default()
}

impl Health {
    pub fn new(policy: HealthPolicy) -> Health {
        Health {
            policy,
            recent: VecDeque::with_capacity(SAMPLES),
            state: State::Up,
            disconnected_since: None,
            since: crate::clock::now(),
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn is_up(&self) -> bool {
        self.state == State::Up
    }

    /// How many probe messages it may take now (0 when up: it takes everything).
    pub fn probe_room(&self, now: Instant) -> usize {
        match &self.state {
            State::Down {
                next_probe,
                probes_sent,
                ..
            } if now >= *next_probe && self.disconnected_since.is_none() => PROBES.saturating_sub(*probes_sent),
            _ => 0,
        }
    }

    /// Counts a message handed to it as a probe.
    pub fn probe_sent(&mut self) {
        if let State::Down { probes_sent, .. } = &mut self.state {
            *probes_sent += 1;
        }
    }

    /// The median latency of its last submissions, and how many of them failed.
    pub fn summary(&self) -> (Duration, usize, usize) {
        (
            median(&self.recent),
            self.recent.iter().filter(|s| !s.ok).count(),
            self.recent.len(),
        )
    }

    /// Reads the partner's meter and its connection state; returns a move, if one is due.
    pub fn observe(&mut self, meter: &Meter, connected: bool, now: Instant) -> Option<Change> {
        let samples = meter.take();
        if connected {
            self.disconnected_since = None;
        } else {
            self.disconnected_since.get_or_insert(now);
        }
        let change = match &mut self.state {
            State::Up => {
                for s in samples {
                    if self.recent.len() == SAMPLES {
                        self.recent.pop_front();
                    }
                    self.recent.push_back(s);
                }
                self.judge(now)
            }
            State::Down {
                next_probe,
                probes_sent,
                probes_ok,
                ..
            } => {
                let mut change = None;
                // Answers only count once probing began: stragglers sent before the fall do not.
                if now >= *next_probe {
                    for s in samples {
                        if s.ok && s.latency <= self.policy.max_latency {
                            *probes_ok += 1;
                        } else {
                            *next_probe = now + self.policy.probe_interval;
                            *probes_sent = 0;
                            *probes_ok = 0;
                            break;
                        }
                    }
                    if *probes_ok >= PROBES {
                        change = Some(Change::Up);
                    }
                }
                change
            }
        };
        match &change {
            Some(Change::Up) => {
                self.state = State::Up;
                self.recent.clear();
            }
            Some(Change::Down(reason)) => {
                self.state = State::Down {
                    reason: reason.clone(),
                    next_probe: now + self.policy.probe_interval,
                    probes_sent: 0,
                    probes_ok: 0,
                };
                self.recent.clear();
            }
            None => {}
        }
        if change.is_some() {
            self.since = crate::clock::now();
        }
        change
    }

    fn judge(&self, now: Instant) -> Option<Change> {
        if let Some(since) = self.disconnected_since {
            if now.duration_since(since) >= NO_CONNECTION {
                return Some(Change::Down(format!(
                    "no connection for {} s",
                    now.duration_since(since).as_secs()
                )));
            }
        }
        if self.recent.len() < MIN_SAMPLES {
            return None;
        }
        let (latency, failed, n) = self.summary();
        if failed * 100 >= usize::from(self.policy.max_error_percent) * n {
            return Some(Change::Down(format!(
                "{failed} of its last {n} submissions failed (max_error_percent = {})",
                self.policy.max_error_percent
            )));
        }
        if latency > self.policy.max_latency {
            return Some(Change::Down(format!(
                "median submit latency {} ms over its last {n} submissions (max_latency = {} ms)",
                latency.as_millis(),
                self.policy.max_latency.as_millis()
            )));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HealthPolicy {
        HealthPolicy {
            max_latency: Duration::from_secs(1),
            max_error_percent: 50,
            probe_interval: Duration::from_secs(10),
        }
    }

    fn feed(meter: &Meter, n: usize, ms: u64, ok: bool) {
        for _ in 0..n {
            meter.record(Duration::from_millis(ms), ok);
        }
    }

    #[test]
    fn a_slow_partner_goes_down_and_comes_back_after_good_probes() {
        let (meter, mut h, t0) = (Meter::default(), Health::new(policy()), Instant::now());
        feed(&meter, 10, 50, true);
        assert_eq!(h.observe(&meter, true, t0), None);
        feed(&meter, 20, 1500, true);
        assert!(matches!(h.observe(&meter, true, t0), Some(Change::Down(r)) if r.contains("latency")));
        assert_eq!(h.probe_room(t0), 0, "no probe before probe_interval");
        // A fast straggler sent before the fall does not bring it back.
        feed(&meter, 5, 10, true);
        assert_eq!(h.observe(&meter, true, t0 + Duration::from_secs(1)), None);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(h.probe_room(t1), PROBES);
        h.probe_sent();
        feed(&meter, 1, 2000, true);
        assert_eq!(h.observe(&meter, true, t1), None, "a slow probe: wait again");
        assert_eq!(h.probe_room(t1), 0);
        let t2 = t1 + Duration::from_secs(10);
        for _ in 0..PROBES {
            h.probe_sent();
        }
        feed(&meter, PROBES, 20, true);
        assert_eq!(h.observe(&meter, true, t2), Some(Change::Up));
        assert!(h.is_up());
    }

    #[test]
    fn errors_and_a_lost_connection_take_it_down() {
        let (meter, mut h, t0) = (Meter::default(), Health::new(policy()), Instant::now());
        feed(&meter, 4, 10, false);
        assert_eq!(h.observe(&meter, true, t0), None, "too few to judge");
        feed(&meter, 4, 10, false);
        feed(&meter, 2, 10, true);
        assert!(matches!(h.observe(&meter, true, t0), Some(Change::Down(r)) if r.contains("8 of its last 10")));

        let mut h = Health::new(policy());
        assert_eq!(h.observe(&meter, false, t0), None);
        assert!(
            matches!(h.observe(&meter, false, t0 + NO_CONNECTION), Some(Change::Down(r)) if r.contains("no connection"))
        );
        assert_eq!(
            h.probe_room(t0 + Duration::from_secs(20)),
            0,
            "no probe while unconnected"
        );
        h.observe(&meter, true, t0 + Duration::from_secs(20));
        assert_eq!(h.probe_room(t0 + Duration::from_secs(20)), PROBES);
    }
}
