//! `smsdrop blocklist add|remove|list|import`: a tenant's opt-out list, or the global one.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use super::{AdminError, Call};
use crate::config::Config;

/// Names the list on the audit event: the tenant, or `list=global`.
fn audit_list(call: &mut Call, tenant: Option<&str>) {
    match tenant {
        Some(t) => call.event.set_tenant(t),
        None => call.event.push("list", "global"),
    }
}

/// `smsdrop blocklist add`.
pub(super) fn add(call: &mut Call, tenant: Option<&str>, phone: &str) -> Result<Vec<u8>, AdminError> {
    audit_list(call, tenant);
    let (list, e164) = list_phone(call.config, tenant, phone)?;
    call.event
        .push("number_hash", super::number_hash(&call.ctx.store, list.id, &e164));
    call.ctx.store.blocklist_add(list.id, &e164, "cli", call.now)?;
    Ok(format!("{e164} added to {}\n", list.name).into_bytes())
}

/// `smsdrop blocklist remove`.
pub(super) fn remove(call: &mut Call, tenant: Option<&str>, phone: &str) -> Result<Vec<u8>, AdminError> {
    audit_list(call, tenant);
    let (list, e164) = list_phone(call.config, tenant, phone)?;
    call.event
        .push("number_hash", super::number_hash(&call.ctx.store, list.id, &e164));
    let removed = call.ctx.store.blocklist_remove(list.id, &e164)?;
    let what = if removed { "removed from" } else { "was not on" };
    Ok(format!("{e164} {what} {}\n", list.name).into_bytes())
}

/// `smsdrop blocklist import`: numbers from a file, one per line.
pub(super) fn import(call: &mut Call, tenant: Option<&str>, path: &Path) -> Result<Vec<u8>, AdminError> {
    audit_list(call, tenant);
    call.event.push("file", path.display());
    let list = List::of(call.config, tenant)?;
    let (numbers, bad) = read_numbers(path, list.region)?;
    let added = call
        .ctx
        .store
        .blocklist_add_all(list.id, &numbers, "import", call.now)?;
    call.event.push("numbers", numbers.len());
    call.event.push("refused_lines", bad.len());
    let mut out = format!(
        "{} numbers read, {added} new on {}, {} lines refused\n",
        numbers.len(),
        list.name,
        bad.len()
    );
    for (line, why) in bad.iter().take(100) {
        let _ = writeln!(out, "line {line}: {why}");
    }
    Ok(out.into_bytes())
}

/// `smsdrop blocklist list`: the entries as keyed hashes (the numbers are not kept in clear).
pub(super) fn list(call: &mut Call, tenant: Option<&str>) -> Result<Vec<u8>, AdminError> {
    audit_list(call, tenant);
    let list = List::of(call.config, tenant)?;
    let mut out = String::from("number_hash;added_at;source\n");
    for (hash, entry) in call.ctx.store.blocklist_entries(list.id)? {
        let hex = crate::store::retention::hex(&hash);
        let at = jiff::Timestamp::from_second(entry.added_at)
            .map(|t| t.to_string())
            .unwrap_or_default();
        let _ = writeln!(out, "{hex};{at};{}", entry.source);
    }
    Ok(out.into_bytes())
}

/// Most numbers a blocklist import takes, and the largest file.
const IMPORT_MAX_NUMBERS: usize = 1_000_000;
const IMPORT_MAX_BYTES: u64 = 64 << 20;

/// Lines of an import file refused: (line number, why).
type Refused = Vec<(usize, String)>;

/// The numbers of a blocklist import file, normalised with the tenant's region, and the lines
/// refused (line number, why).
fn read_numbers(path: &Path, region: Option<rlibphonenumber::Region>) -> Result<(Vec<String>, Refused), AdminError> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    file.take(IMPORT_MAX_BYTES + 1).read_to_string(&mut text).map_err(|e| {
        AdminError::Io(io::Error::new(
            e.kind(),
            format!("{}: {e} (one number per line, UTF-8)", path.display()),
        ))
    })?;
    if text.len() as u64 > IMPORT_MAX_BYTES {
        return Err(AdminError::Io(io::Error::other(format!(
            "{} is larger than {} MiB: split it",
            path.display(),
            IMPORT_MAX_BYTES >> 20
        ))));
    }
    let (mut numbers, mut bad) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if numbers.len() >= IMPORT_MAX_NUMBERS {
            bad.push((
                i + 1,
                format!("more than {IMPORT_MAX_NUMBERS} numbers: the rest is not read"),
            ));
            break;
        }
        match crate::sms::phone::normalize_phone(line, region) {
            Some(e164) => numbers.push(e164),
            None => bad.push((i + 1, "not a valid phone number".into())),
        }
    }
    Ok((numbers, bad))
}

/// An opt-out list: a tenant's, or the global one (whose numbers are written in international
/// form, `+` or `00` first, as no region applies).
struct List<'c> {
    id: &'c str,
    name: String,
    region: Option<rlibphonenumber::Region>,
}

impl<'c> List<'c> {
    fn of(config: &'c Config, tenant: Option<&str>) -> Result<List<'c>, AdminError> {
        match tenant {
            None => Ok(List {
                id: crate::store::GLOBAL_LIST,
                name: "the global blocklist".into(),
                region: None,
            }),
            Some(t) => {
                let tenant = config
                    .tenants
                    .get(t)
                    .ok_or_else(|| AdminError::NoTenant(t.to_string()))?;
                Ok(List {
                    id: &tenant.id,
                    name: format!("the blocklist of {}", tenant.id),
                    region: tenant.default_region,
                })
            }
        }
    }
}

/// A list and a number normalised for it.
fn list_phone<'c>(config: &'c Config, tenant: Option<&str>, phone: &str) -> Result<(List<'c>, String), AdminError> {
    let list = List::of(config, tenant)?;
    let e164 = crate::sms::phone::normalize_phone(phone, list.region)
        .ok_or_else(|| AdminError::InvalidPhone(phone.to_string()))?;
    Ok((list, e164))
}
