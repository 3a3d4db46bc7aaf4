//! `smsdrop audit verify|export`.

use super::{AdminError, Call};
use crate::store::ChainCheck;

/// `smsdrop audit verify`: the chain checked from the first entry.
pub(super) fn verify(call: &mut Call) -> Result<Vec<u8>, AdminError> {
    match call.ctx.store.audit_verify()? {
        ChainCheck::Intact { entries } => {
            Ok(format!("audit log intact: {entries} entries, chain unbroken\n").into_bytes())
        }
        ChainCheck::Broken { seq, reason } => Err(AdminError::ChainBroken { seq, reason }),
    }
}

/// `smsdrop audit export`: entries from `since` (unix milliseconds), of one tenant or all, one
/// JSON object a line.
pub(super) fn export(call: &mut Call, since: i64, tenant: Option<&str>) -> Result<Vec<u8>, AdminError> {
    call.event.push("since", since);
    if let Some(t) = tenant {
        call.event.set_tenant(t);
    }
    let store = &call.ctx.store;
    let mut out = String::new();
    for entry in store.audit_entries(since, tenant)? {
        let line = match entry {
            Ok(entry) => crate::audit::entry_json(&entry),
            Err((seq, error)) => serde_json::json!({ "seq": seq, "damaged": error }).to_string(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out.into_bytes())
}
