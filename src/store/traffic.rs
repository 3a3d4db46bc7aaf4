//! What a tenant usually sends: destination countries seen and messages per hour, for the
//! `anomaly` alert. Counts only; no number or text.

use redb::{Durability, ReadableTable, TableDefinition, WriteTransaction};

use super::{Result, Store, encode, open_record, tenant_key, tenant_range};

/// tenant ‖ 0 ‖ region → sealed first-seen unix seconds.
pub(super) const COUNTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("countries");
/// tenant ‖ 0 ‖ hour number (unix seconds / 3600, big-endian) → sealed messages queued.
pub(super) const HOURLY: TableDefinition<&[u8], &[u8]> = TableDefinition::new("hourly");

/// Hours of history the usual rate is taken over.
const WINDOW_HOURS: u64 = 7 * 24;
/// Hours of history needed before a volume can be called unusual.
const MIN_HISTORY_HOURS: u64 = 24;

pub(super) fn create_tables(tx: &WriteTransaction) -> Result<()> {
    tx.open_table(COUNTRIES)?;
    tx.open_table(HOURLY)?;
    Ok(())
}

/// A tenant's traffic after a batch was queued.
#[derive(Debug, Clone, PartialEq)]
pub struct Traffic {
    /// Countries this batch sends to that the tenant never sent to before (empty for a tenant's
    /// very first batch: everything is new then).
    pub new_countries: Vec<String>,
    /// Messages queued in the current hour, this batch included.
    pub hour_count: u64,
    /// Messages per hour over the last week, once there is a day of history.
    pub usual_per_hour: Option<f64>,
}

impl Traffic {
    /// Whether this hour is more than `factor` times the usual and at least `min_messages`.
    pub fn is_volume_anomaly(&self, factor: u32, min_messages: u64) -> bool {
        match self.usual_per_hour {
            Some(usual) => {
                self.hour_count >= min_messages && self.hour_count as f64 > f64::from(factor) * usual.max(1.0)
            }
            None => false,
        }
    }
}

fn hour_key(tenant: &str, hour: u64) -> Vec<u8> {
    tenant_key(tenant, &hour.to_be_bytes())
}

impl Store {
    /// Records a queued batch's countries and volume; returns what is new or unusual.
    pub fn note_traffic(&self, tenant: &str, countries: &[String], messages: u64, now: i64) -> Result<Traffic> {
        let keys = self.keys.tenant(tenant);
        let hour = (now.max(0) as u64) / 3600;
        let (start, end) = tenant_range(tenant);
        let tx = self.write(Durability::Immediate)?;
        let mut new_countries = Vec::new();
        {
            let mut table = tx.open_table(COUNTRIES)?;
            let had_history = table.range(start.as_slice()..end.as_slice())?.next().is_some();
            for c in countries {
                let key = tenant_key(tenant, c.as_bytes());
                if table.get(key.as_slice())?.is_none() {
                    table.insert(key.as_slice(), keys.seal("countries", &key, &encode(&now)).as_slice())?;
                    if had_history {
                        new_countries.push(c.clone());
                    }
                }
            }
        }
        let (hour_count, usual_per_hour) = {
            let mut table = tx.open_table(HOURLY)?;
            let key = hour_key(tenant, hour);
            let current: u64 = match table.get(key.as_slice())? {
                Some(v) => open_record(&keys, "hourly", &key, v.value())?,
                None => 0,
            };
            let hour_count = current + messages;
            table.insert(
                key.as_slice(),
                keys.seal("hourly", &key, &encode(&hour_count)).as_slice(),
            )?;
            // Forget what is older than the window (and a day).
            let old = hour_key(tenant, hour.saturating_sub(WINDOW_HOURS + 24));
            table
                .extract_from_if(start.as_slice()..old.as_slice(), |_, _| true)?
                .for_each(drop);
            let first = table
                .range(start.as_slice()..end.as_slice())?
                .next()
                .transpose()?
                .and_then(|(k, _)| <[u8; 8]>::try_from(&k.value()[start.len()..]).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(hour);
            let history = hour - first;
            let usual = if history >= MIN_HISTORY_HOURS {
                let from = hour_key(tenant, hour.saturating_sub(WINDOW_HOURS));
                let mut sum = 0u64;
                for entry in table.range(from.as_slice()..key.as_slice())? {
                    let (k, v) = entry?;
                    sum += open_record::<u64>(&keys, "hourly", k.value(), v.value())?;
                }
                Some(sum as f64 / history.min(WINDOW_HOURS) as f64)
            } else {
                None
            };
            (hour_count, usual)
        };
        tx.commit()?;
        Ok(Traffic {
            new_countries,
            hour_count,
            usual_per_hour,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_anomaly_needs_history_a_factor_and_a_floor() {
        let t = |hour_count, usual_per_hour| Traffic {
            new_countries: Vec::new(),
            hour_count,
            usual_per_hour,
        };
        assert!(!t(50_000, None).is_volume_anomaly(10, 1000), "no history, no verdict");
        assert!(t(50_000, Some(100.0)).is_volume_anomaly(10, 1000));
        assert!(!t(900, Some(1.0)).is_volume_anomaly(10, 1000), "below the floor");
        assert!(!t(5_000, Some(1000.0)).is_volume_anomaly(10, 1000), "within the factor");
        assert!(
            t(1_000, Some(0.0)).is_volume_anomaly(10, 1000),
            "a silent tenant suddenly sending"
        );
    }
}
