//! Checking one line against the tenant's rules (docs/batch-format.md): phone number, text, template,
//! segments, sender, schedule. Pure and thread-safe, so lines are checked in parallel; the rules
//! that depend on earlier lines or on the store (`duplicate_recipient`, `blocklisted`) are
//! applied afterwards, in file order, by the ingest pipeline.

use std::borrow::Cow;
use std::collections::HashMap;

use jiff::Timestamp;

use crate::batch::parse::{RawRecord, Records};
use crate::config::Tenant;
use crate::crypto::TenantKeys;
use crate::sms::codes::LineReason;
use crate::sms::columns::ColumnMap;
use crate::sms::gsm;
use crate::sms::message::Message;
use crate::sms::phone::parse_phone;

/// A field longer than this is not something an ERP meant to send (a text that long is
/// `message_too_long`, any other field `bad_line`).
const MAX_FIELD_BYTES: usize = 8192;
/// How far back a `send_at` may lie before it is taken as a mistake rather than "now".
const SCHEDULE_PAST_SECS: i64 = 24 * 3600;
/// How far ahead a `send_at` may lie.
const SCHEDULE_AHEAD_SECS: i64 = 366 * 24 * 3600;

/// A line that passed every per-line rule.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub message: Message,
    pub phone_hash: [u8; 16],
    /// Same number and same text give the same value (for `duplicate_recipient`).
    pub dedupe: u64,
    /// The destination's region (ISO 3166 alpha-2), when the number has one.
    pub country: Option<rlibphonenumber::Region>,
}

/// What one line came to.
#[derive(Debug, Clone)]
pub struct Checked {
    pub line: u64,
    pub reference: String,
    /// E.164 when it could be normalised, else as written.
    pub phone: String,
    pub outcome: Result<Accepted, LineReason>,
}

/// Everything a line check needs, shared by all lines of one batch.
pub struct LineRules<'a> {
    pub tenant: &'a Tenant,
    pub keys: &'a TenantKeys,
    pub columns: &'a ColumnMap,
    pub encoding: &'static encoding_rs::Encoding,
    pub utf8_fields: bool,
    pub now: Timestamp,
}

/// The hosts of the links in `text`: with a scheme, or a bare domain whose suffix is a known
/// top-level domain (so `10h.Merci` or `file.txt` are not links, `bit.ly/x` and `shop.fr` are).
pub fn link_hosts(text: &str) -> Vec<String> {
    let mut finder = linkify::LinkFinder::new();
    finder.url_must_have_scheme(false);
    finder.kinds(&[linkify::LinkKind::Url]);
    finder
        .links(text)
        .filter_map(|link| {
            let lower = link.as_str().to_ascii_lowercase();
            let (has_scheme, rest) = match lower.split_once("://") {
                Some((_, rest)) => (true, rest.to_string()),
                None => (false, lower.clone()),
            };
            let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
            let host = authority.rsplit('@').next().unwrap_or("");
            let host = host.split(':').next().unwrap_or("").trim_end_matches('.').to_string();
            let known = psl::suffix(host.as_bytes()).is_some_and(|s| s.is_known());
            (!host.is_empty() && (has_scheme || known)).then_some(host)
        })
        .collect()
}

/// Whether `host` is one of `domains` or below one of them.
pub fn is_host_allowed(host: &str, domains: &[String]) -> bool {
    domains
        .iter()
        .any(|d| host == d || host.strip_suffix(d.as_str()).is_some_and(|p| p.ends_with('.')))
}

impl LineRules<'_> {
    fn field<'r>(&self, record: &'r RawRecord, index: Option<usize>) -> Result<Cow<'r, str>, LineReason> {
        let Some(bytes) = index.and_then(|i| record.get(i)) else {
            return Ok(Cow::Borrowed(""));
        };
        if bytes.len() > MAX_FIELD_BYTES {
            // A text that long is a message too long; any other field that long is a broken line.
            return Err(if index.is_some() && index == self.columns.message {
                LineReason::MessageTooLong
            } else {
                LineReason::BadLine
            });
        }
        Records::decode(self.utf8_fields, self.encoding, bytes).ok_or(LineReason::BadEncoding)
    }

    /// Checks one record.
    pub fn check(&self, record: &RawRecord) -> Checked {
        // What can be shown of the line even when it is rejected.
        let shown = |i: Option<usize>| -> String {
            i.and_then(|i| record.get(i))
                .and_then(|b| Records::decode(self.utf8_fields, self.encoding, b))
                .map(|s| s.trim().chars().take(64).collect())
                .unwrap_or_default()
        };
        let mut checked = Checked {
            line: record.line,
            reference: shown(self.columns.reference),
            phone: shown(self.columns.phone),
            outcome: Err(LineReason::BadLine),
        };
        checked.outcome = self.accept(record, &mut checked.phone);
        checked
    }

    fn accept(&self, record: &RawRecord, phone_shown: &mut String) -> Result<Accepted, LineReason> {
        let width = self.columns.width;
        // Trailing empty fields (a delimiter at the end of each line) are tolerated.
        if record.oversized || record.len() < width || record.iter().skip(width).any(|f| !f.is_empty()) {
            return Err(LineReason::BadLine);
        }
        let phone_raw = self.field(record, self.columns.phone)?;
        let text_raw = self.field(record, self.columns.message)?;
        let sender_raw = self.field(record, self.columns.sender)?;
        let send_at_raw = self.field(record, self.columns.send_at)?;
        let reference = self.field(record, self.columns.reference)?;

        let (phone, region) = parse_phone(&phone_raw, self.tenant.default_region).ok_or(LineReason::InvalidPhone)?;
        phone_shown.clone_from(&phone);
        if let Some(allowed) = &self.tenant.policy.allowed_countries {
            if !region.is_some_and(|r| allowed.contains(&r)) {
                return Err(LineReason::CountryNotAllowed);
            }
        }

        let text = match &self.tenant.batch.template {
            Some(template) => {
                let mut vars = HashMap::with_capacity(self.columns.vars.len());
                for (name, i) in &self.columns.vars {
                    vars.insert(name.clone(), self.field(record, Some(*i))?.into_owned());
                }
                template
                    .render(&vars)
                    .map_err(|_| LineReason::TemplateVariableMissing)?
            }
            None => text_raw.into_owned(),
        };
        let text = if text.contains('\r') {
            text.replace("\r\n", "\n")
        } else {
            text
        };
        if text.trim().is_empty() {
            return Err(LineReason::EmptyMessage);
        }
        if let Some(domains) = &self.tenant.policy.url_allowlist {
            if link_hosts(&text).iter().any(|h| !is_host_allowed(h, domains)) {
                return Err(LineReason::UrlNotAllowed);
            }
        }
        let encoded = gsm::encode(&text);
        if encoded.parts > usize::from(self.tenant.batch.max_parts) {
            return Err(LineReason::MessageTooLong);
        }

        let sender_raw = sender_raw.trim();
        let sender = if sender_raw.is_empty() {
            self.tenant.batch.sender.clone().ok_or(LineReason::SenderNotAllowed)?
        } else if self.tenant.is_sender_allowed(sender_raw) {
            sender_raw.to_string()
        } else {
            return Err(LineReason::SenderNotAllowed);
        };

        let send_at = match send_at_raw.trim() {
            "" => None,
            s => self.schedule(s).ok_or(LineReason::ScheduleInvalid)?,
        };

        let phone_hash = self.keys.phone_hash(&phone);
        let mut h = blake3::Hasher::new();
        h.update(&phone_hash);
        h.update(text.as_bytes());
        let digest = h.finalize();
        let dedupe = u64::from_le_bytes(digest.as_bytes()[..8].try_into().unwrap_or([0; 8]));
        Ok(Accepted {
            message: Message {
                line: record.line,
                reference: reference.trim().to_string(),
                phone,
                sender,
                text,
                coding: encoded.coding,
                parts: encoded.parts as u8,
                send_at,
            },
            phone_hash,
            dedupe,
            country: region,
        })
    }

    /// Parses a `send_at`: ISO 8601 with an offset, or a civil date and time in the tenant's time
    /// zone. Returns `Some(None)` for a time already past (send now), `None` when invalid.
    fn schedule(&self, s: &str) -> Option<Option<i64>> {
        let at = match s.parse::<Timestamp>() {
            Ok(ts) => ts,
            Err(_) => {
                let civil: jiff::civil::DateTime = s.parse().ok()?;
                civil.to_zoned_datetime(self.tenant.timezone.clone()).ok()?.timestamp()
            }
        };
        let (at, now) = (at.as_second(), self.now.as_second());
        if at < now - SCHEDULE_PAST_SECS || at > now + SCHEDULE_AHEAD_SECS {
            None
        } else if at <= now {
            Some(None)
        } else {
            Some(Some(at))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_and_their_hosts() {
        let cases: &[(&str, &[&str])] = &[
            ("Visit bit.ly/abc now", &["bit.ly"]),
            ("See https://user@Shop.Example.com:8443/x?y", &["shop.example.com"]),
            ("www.acme.fr.", &["www.acme.fr"]),
            ("Rdv demain 10h.Merci, file.txt", &[]),
            ("Total 5.50€, version 2.0", &[]),
            ("http://intranet/x", &["intranet"]),
        ];
        for (text, hosts) in cases {
            assert_eq!(link_hosts(text), *hosts, "{text}");
        }
        let allow = vec!["acme.fr".to_string()];
        assert!(is_host_allowed("acme.fr", &allow));
        assert!(is_host_allowed("www.acme.fr", &allow));
        assert!(!is_host_allowed("evilacme.fr", &allow));
        assert!(!is_host_allowed("bit.ly", &allow), "a shortener is its own domain");
    }
}
