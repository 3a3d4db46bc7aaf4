//! The defender (docs/sftp.md): every refused attempt scores against its source address; passing
//! `score_limit` within `window` bans the address for `ban`, twice as long for each earlier ban
//! (at most 30 days). A banned address's connections are dropped before the SSH handshake. Bans
//! are kept in the store, so a restart does not lift them.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;

use tokio::time::Instant;

use crate::alert::{Alert, AlertKind, Alerter};
use crate::audit::{Audit, Event};
use crate::config;
use crate::store::{Ban, Store};

/// Longest ban, however often an address comes back.
const MAX_BAN_SECS: i64 = 30 * 86400;

/// Points a refusal scores: guessing user names is worse than a wrong key.
pub fn points(reason: &str) -> u32 {
    match reason {
        "unknown user" => 3,
        "password authentication is not allowed" | "keyboard-interactive authentication is not allowed" => 2,
        "IP not allowed" => 2,
        "too many sessions" => 0,
        _ => 1,
    }
}

#[derive(Default)]
struct Record {
    events: VecDeque<(Instant, u32)>,
    bans: u32,
    until: i64,
    last_drop_alert: Option<Instant>,
}

pub struct Defender {
    cfg: config::Defender,
    store: Store,
    alerts: Alerter,
    audit: Audit,
    state: Mutex<HashMap<IpAddr, Record>>,
}

fn now() -> i64 {
    crate::clock::now()
}

impl Defender {
    /// Starts with the bans on record.
    pub fn load(cfg: config::Defender, store: Store, alerts: Alerter, audit: Audit) -> Defender {
        let mut state = HashMap::new();
        match store.bans() {
            Ok(bans) => {
                for b in bans {
                    if let Ok(ip) = b.ip.parse::<IpAddr>() {
                        state.insert(
                            ip,
                            Record {
                                bans: b.count,
                                until: b.until,
                                ..Record::default()
                            },
                        );
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the bans on record"),
        }
        Defender {
            cfg,
            store,
            alerts,
            audit,
            state: Mutex::new(state),
        }
    }

    /// Whether connections from `ip` are dropped now. A dropped connection is itself a refusal:
    /// logged, and alerted at most once a minute per address.
    pub fn is_banned(&self, ip: IpAddr, port: u16) -> bool {
        let Ok(mut state) = self.state.lock() else { return false };
        let Some(r) = state.get_mut(&ip) else { return false };
        if r.until <= now() {
            return false;
        }
        let alert = r.last_drop_alert.is_none_or(|t| t.elapsed().as_secs() >= 60);
        if alert {
            r.last_drop_alert = Some(Instant::now());
        }
        let until = r.until;
        drop(state);
        tracing::info!(peer = %ip, reason = "banned IP", "SFTP connection dropped");
        self.audit.record(
            Event::new("sftp.refused", crate::audit::sftp_actor((ip, port).into()))
                .detail("reason", "banned IP")
                .detail("banned_until", until),
        );
        if alert {
            self.alerts.raise(
                Alert::new(AlertKind::AuthRejected, None, format!("SFTP connection from banned address {ip} dropped"))
                    .detail("source", format!("{ip}:{port}"))
                    .detail("reason", "banned IP")
                    .detail("banned until", jiff::Timestamp::from_second(until).map(|t| t.to_string()).unwrap_or_default())
                    .action("Nothing to do: the ban lifts by itself. Further drops from this address are counted, not mailed, for a minute."),
            );
        }
        true
    }

    /// Scores a refusal; bans the address past the limit.
    pub fn score(&self, ip: IpAddr, reason: &str) {
        let points = points(reason);
        if points == 0 {
            return;
        }
        let Ok(mut state) = self.state.lock() else { return };
        let r = state.entry(ip).or_default();
        let t = Instant::now();
        r.events.push_back((t, points));
        while r
            .events
            .front()
            .is_some_and(|(at, _)| t.duration_since(*at) > self.cfg.window)
        {
            r.events.pop_front();
        }
        let total: u32 = r.events.iter().map(|(_, p)| p).sum();
        if total < self.cfg.score_limit || r.until > now() {
            return;
        }
        let secs = (self.cfg.ban.as_secs() as i64)
            .saturating_mul(1 << r.bans.min(20))
            .min(MAX_BAN_SECS);
        r.bans += 1;
        r.until = now() + secs;
        r.events.clear();
        let ban = Ban {
            ip: ip.to_string(),
            until: r.until,
            count: r.bans,
            reason: reason.to_string(),
        };
        drop(state);
        if let Err(e) = self.store.put_ban(&ban) {
            tracing::error!(error = %e, "cannot record a ban; it holds until the next restart");
        }
        tracing::warn!(peer = %ip, ban_s = secs, bans = ban.count, "SFTP source address banned");
        self.audit.record(
            Event::new("sftp.ban", "defender")
                .detail("source", ip)
                .detail("seconds", secs)
                .detail("bans", ban.count)
                .detail("last_reason", reason),
        );
        self.alerts.raise(
            Alert::new(AlertKind::IpBanned, None, format!("address {ip} banned from SFTP for {}", humantime::format_duration(std::time::Duration::from_secs(secs as u64))))
                .detail("source", ip)
                .detail("last reason", reason)
                .detail("score limit", self.cfg.score_limit)
                .detail("window", humantime::format_duration(self.cfg.window))
                .detail("bans of this address", ban.count)
                .detail("banned until", jiff::Timestamp::from_second(ban.until).map(|t| t.to_string()).unwrap_or_default())
                .action("Its connections are dropped before the SSH handshake until then. If it is a customer's ERP, fix its key or user name; the ban lifts by itself."),
        );
    }
}

/// Bans in force, for `smsdrop status`.
pub fn active_bans(store: &Store) -> Vec<Ban> {
    let t = now();
    store
        .bans()
        .unwrap_or_default()
        .into_iter()
        .filter(|b| b.until > t)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config::{Config, Live};
    use crate::crypto::{Keyring, MasterKeys};

    fn defender(dir: &std::path::Path) -> Defender {
        let key = dir.join("master.key");
        MasterKeys::generate(&key).expect("key");
        let keys = Keyring::open(MasterKeys::load(&key).expect("load"), dir).expect("keyring");
        let store = Store::open(dir, Arc::new(keys)).expect("store");
        let config = Config::parse(&dir.join("c.toml"), "[tenant.acme]\n").expect("config");
        let alerts = Alerter::new(store.clone(), Live::new(Arc::new(config)), Arc::default());
        let cfg = config::Defender {
            score_limit: 3,
            window: Duration::from_secs(60),
            ban: Duration::from_secs(10),
        };
        Defender::load(cfg, store.clone(), alerts, Audit::direct(store))
    }

    #[tokio::test(start_paused = true)]
    async fn bans_double_at_each_return_and_lift_by_themselves() {
        let dir = tempfile::tempdir().expect("dir");
        let d = defender(dir.path());
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        let mut lengths: Vec<u64> = Vec::new();
        for _ in 0..4 {
            for _ in 0..3 {
                assert!(!d.is_banned(ip, 2222), "not banned below the score limit");
                d.score(ip, "wrong key");
            }
            assert!(d.is_banned(ip, 2222), "banned at the score limit");
            let mut secs = 0u64;
            while d.is_banned(ip, 2222) {
                tokio::time::advance(Duration::from_secs(1)).await;
                secs += 1;
            }
            lengths.push(secs);
        }
        // Bans are kept to the second; the real clock may cross a second while the test runs.
        for (secs, want) in lengths.iter().zip([10u64, 20, 40, 80]) {
            assert!(secs.abs_diff(want) <= 1, "twice as long at each return: {lengths:?}");
        }
        let on_record = d.store.bans().expect("bans");
        assert_eq!(on_record.len(), 1);
        assert_eq!(
            on_record[0].count, 4,
            "the store keeps the count, so a restart keeps the escalation"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_older_than_the_window_no_longer_count() {
        let dir = tempfile::tempdir().expect("dir");
        let d = defender(dir.path());
        let ip: IpAddr = "192.0.2.8".parse().expect("ip");
        d.score(ip, "wrong key");
        d.score(ip, "wrong key");
        tokio::time::advance(Duration::from_secs(61)).await;
        d.score(ip, "wrong key");
        assert!(
            !d.is_banned(ip, 2222),
            "two of the three refusals fell out of the window"
        );
        d.score(ip, "unknown user");
        assert!(d.is_banned(ip, 2222), "an unknown user scores 3 points");
    }
}
