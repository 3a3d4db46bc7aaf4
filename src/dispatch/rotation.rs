//! Fairness: tenants take turns, and within a tenant its batches take turns, each turn at most
//! [`QUANTUM`] messages. A tenant's million-line batch therefore delays another tenant's ten
//! lines by one turn, not by a million messages, and the same holds between one tenant's urgent
//! and bulk batches.

use std::collections::{HashMap, VecDeque};

use crate::store::records::BatchRecord;

/// Messages one batch may send per turn.
pub const QUANTUM: u64 = 32;

/// A batch with messages not yet taken.
#[derive(Debug, Clone)]
struct Turn {
    id: u64,
    tenant: String,
    cursor: u64,
    accepted: u64,
}

/// Tenants in turn, and each tenant's batches in turn.
#[derive(Debug, Default)]
pub(super) struct Rotation {
    tenants: VecDeque<String>,
    batches: HashMap<String, VecDeque<Turn>>,
}

impl Rotation {
    pub(super) fn rebuild(&mut self, active: Vec<BatchRecord>) {
        let previous: Vec<String> = self.tenants.drain(..).collect();
        self.batches.clear();
        for b in active.into_iter().filter(|b| b.cursor < b.accepted) {
            self.batches.entry(b.tenant.clone()).or_default().push_back(Turn {
                id: b.id,
                tenant: b.tenant,
                cursor: b.cursor,
                accepted: b.accepted,
            });
        }
        // Keep the order tenants had, so a rebuild does not favour anyone.
        for t in previous {
            if self.batches.contains_key(&t) {
                self.tenants.push_back(t);
            }
        }
        let mut new: Vec<&String> = self.batches.keys().filter(|t| !self.tenants.contains(t)).collect();
        new.sort();
        let new: Vec<String> = new.into_iter().cloned().collect();
        self.tenants.extend(new);
    }

    /// Takes up to `budget` (batch, index) pairs, turn by turn.
    pub(super) fn take(&mut self, mut budget: usize) -> Vec<(u64, String, u64)> {
        let mut picks = Vec::new();
        while budget > 0 {
            let Some(tenant) = self.tenants.pop_front() else { break };
            let Some(queue) = self.batches.get_mut(&tenant) else {
                continue;
            };
            let Some(mut turn) = queue.pop_front() else {
                self.batches.remove(&tenant);
                continue;
            };
            let n = QUANTUM.min(turn.accepted - turn.cursor).min(budget as u64);
            for i in turn.cursor..turn.cursor + n {
                picks.push((turn.id, turn.tenant.clone(), i));
            }
            turn.cursor += n;
            budget -= n as usize;
            if turn.cursor < turn.accepted {
                queue.push_back(turn);
            }
            if queue.is_empty() {
                self.batches.remove(&tenant);
            } else {
                self.tenants.push_back(tenant);
            }
        }
        picks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(id: u64, tenant: &str, accepted: u64) -> BatchRecord {
        let mut b = BatchRecord::new(id, tenant, "f.csv", "", 0, Default::default());
        b.state = crate::store::records::BatchState::Queued;
        b.accepted = accepted;
        b
    }

    #[test]
    fn a_small_batch_is_not_held_behind_a_big_one() {
        let mut r = Rotation::default();
        r.rebuild(vec![batch(1, "big", 1_000_000), batch(2, "small", 10)]);
        let picks = r.take(256);
        let small: Vec<_> = picks.iter().filter(|p| p.1 == "small").collect();
        assert_eq!(small.len(), 10, "the small tenant's whole batch goes in the first step");
        assert_eq!(picks.len(), 256);
    }

    #[test]
    fn batches_of_one_tenant_take_turns() {
        let mut r = Rotation::default();
        r.rebuild(vec![batch(1, "t", 1000), batch(2, "t", 1000)]);
        let picks = r.take(4 * QUANTUM as usize);
        let first: usize = picks.iter().filter(|p| p.0 == 1).count();
        assert_eq!(first, 2 * QUANTUM as usize);
        // the cursor moves on: nothing is taken twice
        let again = r.take(QUANTUM as usize);
        assert_eq!(again[0], (1, "t".to_string(), 2 * QUANTUM));
    }
}
