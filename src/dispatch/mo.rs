//! Which tenants an incoming message may belong to: the dispatcher asks the configuration
//! (the store cannot see it) and hands the candidates to the store, which picks one in the same
//! transaction that keeps the reply (see [`crate::sms::mo`]).

use crate::config::Config;
use crate::sms::mo::{Mo, MoCandidate, optout_keyword, same_address};
use crate::sms::phone::normalize_phone;

/// The tenants an MO may belong to (see [`crate::sms::mo`]).
pub fn candidates(config: &Config, mo: &Mo) -> Vec<MoCandidate> {
    let by_sender: Vec<_> = config
        .tenants
        .values()
        .filter(|t| {
            t.batch
                .sender
                .iter()
                .chain(t.batch.senders.iter())
                .any(|s| same_address(s, &mo.to))
        })
        .collect();
    let pool: Vec<_> = if by_sender.is_empty() {
        config.tenants.values().collect()
    } else {
        by_sender
    };
    pool.into_iter()
        .filter_map(|t| {
            let from = normalize_phone(&mo.from, t.default_region)?;
            Some(MoCandidate {
                tenant: t.id.clone(),
                from,
                optout: optout_keyword(&mo.text, &t.replies.optout_keywords),
            })
        })
        .collect()
}
