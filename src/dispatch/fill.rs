//! Reading ahead: due scheduled messages and the next turns of fresh ones, read from their
//! chunks and put in the queue of the partner their route chooses.

use std::collections::HashMap;
use std::sync::Arc;

use super::outcome::{Pick, final_status, settle};
use super::run::Run;
use super::{Dispatcher, now};
use crate::sms::codes::MessageStatus;
use crate::sms::message::Message;
use crate::store::StoreError;
use crate::store::records::{CHUNK_MESSAGES, message_id, split_message_id};

impl Run {
    /// Takes due and fresh messages into the per-partner queues. Returns how many were taken.
    pub(super) async fn fill(&mut self, room: usize) -> Result<usize, StoreError> {
        let t = now();
        let skip: Vec<u64> = self.scheduled_open.iter().copied().collect();
        let due: Vec<(i64, u64)> = self
            .d
            .blocking(move |s| s.due_scheduled(t, room / 4 + skip.len()))
            .await?
            .into_iter()
            .filter(|(_, id)| !self.scheduled_open.contains(id))
            .take(room / 4)
            .collect();
        let fresh = self.rotation.take(room - due.len());
        if due.is_empty() && fresh.is_empty() {
            return Ok(0);
        }
        for (batch, _, index) in &fresh {
            let c = self.taken.entry(*batch).or_default();
            *c = (*c).max(index + 1);
            self.open.entry(*batch).or_default().insert(*index);
        }
        for (_, id) in &due {
            self.scheduled_open.insert(*id);
        }
        let n = due.len() + fresh.len();
        let (picks, already, blocked) = self.d.load(due, fresh).await?;
        let pending = &mut self.pending;
        // Fresh messages that already have a status were handled before a restart.
        for id in already {
            pending.settled.push(split_message_id(id));
        }
        for p in blocked {
            tracing::debug!(message = p.id, tenant = %p.tenant, "number blocklisted since it was queued: canceled");
            pending.step.outcomes.push((
                p.id,
                final_status(MessageStatus::Canceled, "", "blocklisted", p.attempts, t),
            ));
            settle(&p, pending);
        }
        let mut route = Vec::with_capacity(picks.len());
        for p in picks {
            if let (Some(at), None) = (p.message.send_at, p.scheduled) {
                if at > t {
                    pending.step.schedule.push((at, p.id));
                    settle(&p, pending);
                    continue;
                }
            }
            if p.message.phone.is_empty() {
                // erased (`subject erase`) after it was queued: nothing left to send
                pending
                    .step
                    .outcomes
                    .push((p.id, final_status(MessageStatus::Canceled, "", "erased", p.attempts, t)));
                settle(&p, pending);
                continue;
            }
            route.push(p);
        }
        let at = std::time::Instant::now();
        for p in route {
            self.route(p, at, t);
        }
        Ok(n)
    }
}

impl Dispatcher {
    /// Reads the picked messages from their chunks; fresh ones that already have a status are
    /// returned apart.
    pub(super) async fn load(
        &self,
        due: Vec<(i64, u64)>,
        fresh: Vec<(u64, String, u64)>,
    ) -> Result<(Vec<Pick>, Vec<u64>, Vec<Pick>), StoreError> {
        self.blocking(move |store| {
            let mut chunks: HashMap<(u64, u32), Arc<Vec<Message>>> = HashMap::new();
            let mut tenants: HashMap<u64, Option<String>> = HashMap::new();
            let mut picks = Vec::with_capacity(due.len() + fresh.len());
            let mut wanted: Vec<(u64, String, u64, Option<i64>)> = Vec::new();
            for (at, id) in due {
                let (batch, index) = split_message_id(id);
                let tenant = match tenants.entry(batch) {
                    std::collections::hash_map::Entry::Occupied(e) => e.get().clone(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(store.batch(batch)?.map(|b| b.tenant)).clone()
                    }
                };
                if let Some(tenant) = tenant {
                    wanted.push((batch, tenant, index, Some(at)));
                }
            }
            let fresh_ids: Vec<u64> = fresh.iter().map(|(b, _, i)| message_id(*b, *i)).collect();
            let recorded = store.recorded(&fresh_ids)?;
            let already: Vec<u64> = fresh_ids.iter().copied().filter(|id| recorded.contains(id)).collect();
            wanted.extend(
                fresh
                    .into_iter()
                    .filter(|(b, _, i)| !recorded.contains(&message_id(*b, *i)))
                    .map(|(b, t, i)| (b, t, i, None)),
            );
            for (batch, tenant, index, scheduled) in wanted {
                let chunk_no = (index / CHUNK_MESSAGES) as u32;
                let chunk = match chunks.get(&(batch, chunk_no)) {
                    Some(c) => c.clone(),
                    None => {
                        let c = Arc::new(store.load_chunk(&tenant, batch, chunk_no)?);
                        chunks.insert((batch, chunk_no), c.clone());
                        c
                    }
                };
                let Some(message) = chunk.get((index % CHUNK_MESSAGES) as usize) else {
                    continue;
                };
                let id = message_id(batch, index);
                let attempts = if scheduled.is_some() {
                    let batch_rec = store.batch(batch)?;
                    batch_rec
                        .map(|b| store.statuses(&b, index, index + 1))
                        .transpose()?
                        .and_then(|m| m.get(&index).map(|s| s.attempts))
                        .unwrap_or(0)
                } else {
                    0
                };
                picks.push(Pick {
                    id,
                    tenant,
                    message: message.clone(),
                    scheduled,
                    attempts,
                });
            }
            // A number put on the blocklist after its message was queued is never sent to.
            let targets: Vec<(&str, &str)> = picks
                .iter()
                .map(|p| (p.tenant.as_str(), p.message.phone.as_str()))
                .collect();
            let blocked = store.blocked_among(&targets)?;
            let (mut send, mut canceled) = (Vec::with_capacity(picks.len()), Vec::new());
            for (p, b) in picks.into_iter().zip(blocked) {
                if b { canceled.push(p) } else { send.push(p) }
            }
            Ok((send, already, canceled))
        })
        .await
    }
}
