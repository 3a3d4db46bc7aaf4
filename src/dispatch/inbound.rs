//! What partners send back on their own: delivery receipts and incoming messages (MO), put into
//! the next dispatch step and acknowledged only once it is durable.

use super::outcome::Pending;
use super::partner::{Inbound, Incoming};
use super::{Dispatcher, mo};
use crate::store::{IncomingMo, MoOutcome};

impl Dispatcher {
    /// Puts a receipt or an incoming message into the next commit.
    pub(super) fn take_inbound(&self, inbound: Inbound, pending: &mut Pending) {
        match inbound.what {
            Incoming::Receipt(r) => pending.step.receipts.push((inbound.partner, r)),
            Incoming::Message(m) => pending.step.mos.push(IncomingMo {
                candidates: mo::candidates(&self.config, &m),
                partner: inbound.partner,
                mo: m,
            }),
        }
        pending.acks.push(inbound.ack);
    }
}

/// Logs where an incoming message went, without its number or text.
pub(super) fn log_mo(mo: &IncomingMo, outcome: &MoOutcome) {
    match outcome {
        MoOutcome::Kept {
            tenant,
            answers,
            optout,
        } => {
            tracing::info!(partner = %mo.partner, tenant = %tenant, answers = ?answers, "incoming message kept for the replies file");
            if let Some(word) = optout {
                tracing::info!(partner = %mo.partner, tenant = %tenant, keyword = %word, "opt-out: the sender is on the tenant's blocklist");
            }
        }
        MoOutcome::Unmatched => tracing::warn!(
            partner = %mo.partner, candidates = mo.candidates.len(),
            "incoming message matches no tenant (no sender of its address, nor a message sent to its number); dropped"
        ),
    }
}
