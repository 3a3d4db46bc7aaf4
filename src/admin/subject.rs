//! `smsdrop subject export|erase`: everything held about one number, in one tenant or all.

use std::fmt::Write as _;

use super::{AdminError, Call, number_hash};
use crate::config::Config;

/// `smsdrop subject export`.
pub(super) fn export(call: &mut Call, phone: &str, tenant: Option<&str>) -> Result<Vec<u8>, AdminError> {
    let (store, config) = (&call.ctx.store, call.config);
    let event = &mut *call.event;
    let mut tenants = serde_json::Map::new();
    let covered = subject_tenants(config, phone, tenant)?;
    for (tenant, e164) in &covered {
        event.push(
            "number_hash",
            format!("{}:{}", tenant.id, number_hash(store, &tenant.id, e164)),
        );
        let data = store.subject_export(&tenant.id, e164)?;
        tenants.insert(
            tenant.id.clone(),
            serde_json::to_value(&data).map_err(|e| AdminError::Remote(e.to_string()))?,
        );
    }
    // The global list, when no tenant was named: the number as the first tenant reads it.
    let mut global = serde_json::Value::Null;
    if let (None, Some((_, e164))) = (tenant, covered.first()) {
        if let Some(entry) = store.blocklist_entry(crate::store::GLOBAL_LIST, e164)? {
            global = serde_json::to_value(&entry).map_err(|e| AdminError::Remote(e.to_string()))?;
        }
    }
    let doc = serde_json::json!({ "phone": phone, "tenants": tenants, "global_blocklist": global });
    let mut out = serde_json::to_vec_pretty(&doc).map_err(|e| AdminError::Remote(e.to_string()))?;
    out.push(b'\n');
    Ok(out)
}

/// `smsdrop subject erase`; `block` puts the number's keyed hash on the blocklist afterwards.
pub(super) fn erase(call: &mut Call, phone: &str, tenant: Option<&str>, block: bool) -> Result<Vec<u8>, AdminError> {
    let (ctx, config, now) = (call.ctx, call.config, call.now);
    let (store, event) = (&ctx.store, &mut *call.event);
    let mut out = String::new();
    let covered = subject_tenants(config, phone, tenant)?;
    for (tenant, e164) in &covered {
        event.push(
            "number_hash",
            format!("{}:{}", tenant.id, number_hash(store, &tenant.id, e164)),
        );
        let erased = store.subject_erase(&tenant.id, e164, block, now)?;
        event.push(
            &format!("erased:{}", tenant.id),
            format!(
                "{} messages, {} canceled, {} replies",
                erased.messages, erased.canceled, erased.replies
            ),
        );
        let _ = writeln!(
            out,
            "{}: erased {} messages ({} not yet sent, now canceled), {} replies{}{}",
            tenant.id,
            erased.messages,
            erased.canceled,
            erased.replies,
            if erased.blocklist { ", its blocklist entry" } else { "" },
            if block {
                "; the number is on the blocklist (as its keyed hash)"
            } else {
                ""
            }
        );
    }
    // Erasing everywhere takes the number off the global list too (`--block` keeps it).
    if let (None, Some((_, e164))) = (tenant, covered.first()) {
        let global = crate::store::GLOBAL_LIST;
        if store.blocklist_entry(global, e164)?.is_some() {
            if !block {
                store.blocklist_remove(global, e164)?;
            }
            let _ = writeln!(
                out,
                "the global blocklist: its entry {}",
                if block { "kept (as its keyed hash)" } else { "removed" }
            );
        }
    }
    if let Some(d) = &ctx.dispatch {
        d.poke();
    }
    tracing::info!("subject erased by an operator (number hashes on the audit log)");
    Ok(out.into_bytes())
}

/// The tenants a subject request covers (one, or every configured one) and the number
/// normalised with each one's region; a number no tenant can read is refused.
fn subject_tenants<'c>(
    config: &'c Config,
    phone: &str,
    tenant: Option<&str>,
) -> Result<Vec<(&'c crate::config::Tenant, String)>, AdminError> {
    let out: Vec<(&crate::config::Tenant, String)> = match tenant {
        Some(t) => vec![tenant_phone(config, t, phone)?],
        None => config
            .tenants
            .values()
            .filter_map(|t| crate::sms::phone::normalize_phone(phone, t.default_region).map(|e| (t.as_ref(), e)))
            .collect(),
    };
    if out.is_empty() {
        return Err(AdminError::InvalidPhone(phone.to_string()));
    }
    Ok(out)
}

/// A configured tenant and a number normalised with its region.
fn tenant_phone<'c>(
    config: &'c Config,
    tenant: &str,
    phone: &str,
) -> Result<(&'c crate::config::Tenant, String), AdminError> {
    let tenant = config
        .tenants
        .get(tenant)
        .ok_or_else(|| AdminError::NoTenant(tenant.to_string()))?;
    let e164 = crate::sms::phone::normalize_phone(phone, tenant.default_region)
        .ok_or_else(|| AdminError::InvalidPhone(phone.to_string()))?;
    Ok((tenant, e164))
}
