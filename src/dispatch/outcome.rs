//! A flight of messages to one partner, and what its answers become: outcomes waiting for their
//! durable commit, retries with growing delays, failover within a second when the partner is
//! down and another of the route is up.

use std::collections::HashMap;
use std::sync::Arc;

use super::health::Health;
use super::partner::{Outbound, Partner, PartnerError, Submitted};
use super::{Dispatcher, now};
use crate::sms::codes::MessageStatus;
use crate::sms::message::Message;
use crate::store::records::{StatusRecord, split_message_id};
use crate::store::{DispatchCommit, SentTo};

/// Transient failures are retried this many times, with growing delays, before `failed`.
const MAX_ATTEMPTS: u32 = 12;

/// One message picked to send.
pub(super) struct Pick {
    pub id: u64,
    pub tenant: String,
    pub message: Message,
    /// It came from the scheduled set, with this due time.
    pub scheduled: Option<i64>,
    pub attempts: u32,
}

/// Submissions handed to one partner call, and what the partner answered.
pub(super) struct Flight {
    partner: String,
    picks: Vec<Pick>,
    results: Vec<Result<Submitted, PartnerError>>,
}

/// Outcomes waiting for their durable commit, and what they hold.
#[derive(Default)]
pub(super) struct Pending {
    pub step: DispatchCommit,
    /// Window slots each partner gets back once this is durable.
    pub release: HashMap<String, usize>,
    /// (batch, index) of fresh messages this settles.
    pub settled: Vec<(u64, u64)>,
    /// Scheduled message ids this settles.
    pub scheduled: Vec<u64>,
    /// Partners wait for these to be durable before acknowledging the receipts.
    pub acks: Vec<tokio::sync::oneshot::Sender<bool>>,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.step.outcomes.is_empty()
            && self.step.schedule.is_empty()
            && self.step.unschedule.is_empty()
            && self.settled.is_empty()
            && self.step.receipts.is_empty()
            && self.step.mos.is_empty()
            && self.step.sent.is_empty()
    }
}

/// A flight runs as its own task, so that building and sending PDUs for thousands of messages a
/// second does not share one thread with the dispatcher's bookkeeping. `None` only if the task
/// died, which a panic (it aborts the process) cannot cause.
pub(super) type Landing = futures_util::future::BoxFuture<'static, Option<Flight>>;

impl Dispatcher {
    /// When a message stops being worth delivering: its send time (`send_at`, or now when it has
    /// none) plus its tenant's `validity`. Both the SMPP `validity_period` and the retry limit
    /// use it.
    fn valid_until(&self, p: &Pick, now: i64) -> i64 {
        let validity = self
            .config
            .tenants
            .get(&p.tenant)
            .map(|c| c.batch.validity.as_secs() as i64)
            .unwrap_or(48 * 3600);
        p.message.send_at.unwrap_or(now).min(now) + validity
    }

    /// Hands `picks` to a partner in a task of their own (on the [`Lane`]); lands as a [`Flight`].
    pub(super) fn launch(&self, partner: Arc<dyn Partner>, partner_id: String, picks: Vec<Pick>) -> Landing {
        let t = now();
        let valid_until: Vec<i64> = picks.iter().map(|p| self.valid_until(p, t)).collect();
        let task = tokio::spawn(async move {
            let results = {
                let outbound: Vec<Outbound<'_>> = picks
                    .iter()
                    .zip(&valid_until)
                    .map(|(p, &valid_until)| Outbound {
                        id: p.id,
                        tenant: &p.tenant,
                        batch: split_message_id(p.id).0,
                        message: &p.message,
                        valid_until,
                    })
                    .collect();
                partner.submit(&outbound).await
            };
            Flight {
                partner: partner_id,
                picks,
                results,
            }
        });
        Box::pin(async move {
            task.await
                .map_err(|e| tracing::error!(error = %e, "a partner submission task died"))
                .ok()
        })
    }

    /// Turns a partner's answers into outcomes waiting for commit. A transient failure is
    /// retried with growing delays, or within a second when its partner is down and another
    /// partner of its route is up (failover).
    pub(super) fn land(&self, flight: Flight, pending: &mut Pending, health: &HashMap<String, Health>) {
        let done = now();
        let partner_id = flight.partner;
        *pending.release.entry(partner_id.clone()).or_default() += flight.picks.len();
        let mut results = flight.results.into_iter();
        for p in flight.picks {
            let result = results.next().unwrap_or_else(|| {
                Err(PartnerError::Transient {
                    detail: "no answer from the partner".into(),
                })
            });
            let attempts = p.attempts + 1;
            let valid_until = self.valid_until(&p, done);
            let status = match result {
                Ok(Submitted::Delivered { partner_id: pid }) => StatusRecord {
                    status: MessageStatus::Delivered,
                    partner: partner_id.clone(),
                    partner_id: pid,
                    submitted_at: Some(done),
                    done_at: Some(done),
                    error: String::new(),
                    attempts,
                },
                Ok(Submitted::Accepted { partner_id: pid }) => StatusRecord {
                    status: MessageStatus::Submitted,
                    partner: partner_id.clone(),
                    partner_id: pid,
                    submitted_at: Some(done),
                    done_at: None,
                    error: String::new(),
                    attempts,
                },
                Err(PartnerError::Permanent { detail }) => {
                    final_status(MessageStatus::Rejected, &partner_id, &detail, attempts, done)
                }
                Err(PartnerError::Transient { detail }) if attempts >= MAX_ATTEMPTS => {
                    final_status(MessageStatus::Failed, &partner_id, &detail, attempts, done)
                }
                Err(PartnerError::Transient { detail }) => {
                    let failing_down = health.get(&partner_id).is_some_and(|h| !h.is_up());
                    let delay = if failing_down && self.has_alternative(&p.message.phone, &partner_id, health) {
                        1
                    } else {
                        (5i64 << attempts.min(7)).min(600)
                    };
                    if done + delay > valid_until {
                        final_status(MessageStatus::Expired, &partner_id, &detail, attempts, done)
                    } else {
                        pending.step.schedule.push((done + delay, p.id));
                        tracing::debug!(message = p.id, partner = %partner_id, attempts, "transient failure: {detail}");
                        let mut s = StatusRecord::queued();
                        s.partner = partner_id.clone();
                        s.error = detail;
                        s.attempts = attempts;
                        s
                    }
                }
            };
            if status.status == MessageStatus::Submitted || status.status == MessageStatus::Delivered {
                pending.step.sent.push(SentTo {
                    tenant: p.tenant.clone(),
                    phone: p.message.phone.clone(),
                    message_id: p.id,
                });
            }
            pending.step.outcomes.push((p.id, status));
            settle(&p, pending);
        }
    }
}

/// Marks a pick as settled by the next commit.
pub(super) fn settle(p: &Pick, pending: &mut Pending) {
    match p.scheduled {
        Some(due) => {
            pending.step.unschedule.push((due, p.id));
            pending.scheduled.push(p.id);
        }
        None => pending.settled.push(split_message_id(p.id)),
    }
}

pub(super) fn final_status(status: MessageStatus, partner: &str, error: &str, attempts: u32, at: i64) -> StatusRecord {
    StatusRecord {
        status,
        partner: partner.to_string(),
        partner_id: String::new(),
        submitted_at: None,
        done_at: Some(at),
        error: error.to_string(),
        attempts,
    }
}
