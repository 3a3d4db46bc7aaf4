//! Incoming messages (MO): what a handset sent back, which tenant it belongs to, and whether it
//! is an opt-out (docs/partners.md, incoming messages; docs/reply-files.md, `replies-*.csv`).
//!
//! A partner turns its wire form into a [`Mo`]; the dispatcher turns it into [`MoCandidate`]s
//! with the configuration (the store cannot see it), and the store picks the tenant inside the
//! same durable transaction that keeps the reply, before the partner acknowledges it:
//! - the tenants whose `sender` or `senders` include the address the MO was sent to, or every
//!   tenant when none does (a shared short code, a long number that is nobody's sender);
//! - among them, the one that last sent a message to the number the MO comes from; its message
//!   is the one the MO answers (`message_id` in the replies file);
//! - when none of them ever sent to that number, the only candidate, if there is exactly one;
//!   otherwise the MO matches no tenant: it is acknowledged, counted and logged (without the
//!   number), since keeping it from the SMSC would only make it come back forever.
//!
//! An opt-out is a text whose first word, or whole text, is `STOP` or one of the tenant's
//! `optout_keywords`, ignoring case, accents kept, punctuation around it dropped ("Stop.",
//! "STOP 36180", "stop sms" when `optout_keywords` has "STOP SMS"). The number then goes on the
//! tenant's blocklist in the same transaction.

use super::gsm::from_gsm7;

/// The keyword every tenant honours, whatever its `optout_keywords`.
pub const STOP: &str = "STOP";

/// An incoming message as the partner received it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mo {
    /// The handset's number as the partner wrote it, `+` added when its TON was international.
    pub from: String,
    /// The address it was sent to: a sender id, short code or long number.
    pub to: String,
    pub text: String,
    /// Unix milliseconds.
    pub received_at: i64,
}

/// One tenant an MO may belong to, with what it means for that tenant.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MoCandidate {
    pub tenant: String,
    /// The sender's number in E.164, read with the tenant's `default_region`.
    pub from: String,
    /// The opt-out keyword it matched, if any.
    pub optout: Option<String>,
}

/// Decodes a `short_message` or `message_payload` by its SMPP `data_coding` (SMPP 3.4 §5.2.19):
/// 0 the SMSC default alphabet (GSM 03.38, unpacked), 1 IA5/ASCII, 3 Latin-1, 8 UCS-2 (read as
/// UTF-16BE, so surrogate pairs survive); anything else as UTF-8 where it is, else Latin-1.
pub fn decode_text(data_coding: u8, bytes: &[u8]) -> String {
    match data_coding {
        0x00 | 0xf0 => from_gsm7(bytes),
        0x01 => bytes.iter().map(|&b| char::from(b & 0x7f)).collect(),
        0x03 => bytes.iter().map(|&b| char::from(b)).collect(),
        0x08 => {
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16_lossy(&units)
        }
        _ => match std::str::from_utf8(bytes) {
            Ok(s) => s.to_string(),
            Err(_) => bytes.iter().map(|&b| char::from(b)).collect(),
        },
    }
}

/// Strips a user data header (concatenation, ports) from the front of a payload whose
/// `esm_class` has UDHI set (3GPP TS 23.040 §9.2.3.24). Returns the body and, for a concatenated
/// part, (reference, total, sequence).
pub fn strip_udh(payload: &[u8]) -> (&[u8], Option<(u16, u8, u8)>) {
    let Some(&len) = payload.first() else {
        return (payload, None);
    };
    let Some(header) = payload.get(1..1 + len as usize) else {
        return (payload, None);
    };
    let mut concat = None;
    let mut at = 0;
    while at + 2 <= header.len() {
        let (iei, ie_len) = (header[at], header[at + 1] as usize);
        let Some(data) = header.get(at + 2..at + 2 + ie_len) else {
            break;
        };
        match (iei, data) {
            (0x00, [r, t, s]) => concat = Some((u16::from(*r), *t, *s)),
            (0x08, [r1, r2, t, s]) => concat = Some((u16::from_be_bytes([*r1, *r2]), *t, *s)),
            _ => {}
        }
        at += 2 + ie_len;
    }
    (&payload[1 + len as usize..], concat)
}

/// Whether `text` is an opt-out for these keywords (with `STOP` always among them); the keyword
/// it matched.
pub fn optout_keyword(text: &str, keywords: &[String]) -> Option<String> {
    let clean = |s: &str| {
        s.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .trim_matches(|c: char| !c.is_alphanumeric())
            .to_uppercase()
    };
    let whole = clean(text);
    let first = clean(text.split_whitespace().next().unwrap_or(""));
    std::iter::once(STOP.to_string())
        .chain(keywords.iter().map(|k| clean(k)))
        .find(|k| !k.is_empty() && (*k == whole || *k == first))
}

/// The digits of an address, for comparing a sender written `+33612345678` with an MO sent to
/// `33612345678`; other addresses compare as written, ignoring case.
pub fn same_address(a: &str, b: &str) -> bool {
    let digits = |s: &str| {
        let t = s.strip_prefix('+').unwrap_or(s);
        (!t.is_empty() && t.bytes().all(|c| c.is_ascii_digit())).then(|| t.to_string())
    };
    match (digits(a), digits(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a.eq_ignore_ascii_case(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optout_words() {
        let none: Vec<String> = Vec::new();
        let fr = vec!["ARRET".to_string(), "stop sms".to_string()];
        for (text, keywords, want) in [
            ("STOP", &none, Some("STOP")),
            ("  stop. ", &none, Some("STOP")),
            ("Stop 36180", &none, Some("STOP")),
            ("STOPPED", &none, None),
            ("please stop", &none, None),
            ("arret", &fr, Some("ARRET")),
            ("Stop  SMS!", &fr, Some("STOP")),
            ("Oui merci", &fr, None),
        ] {
            assert_eq!(optout_keyword(text, keywords).as_deref(), want, "{text:?}");
        }
    }

    #[test]
    fn texts_by_data_coding() {
        assert_eq!(decode_text(0, &[0x53, 0x54, 0x4f, 0x50]), "STOP");
        assert_eq!(decode_text(0, &[0x1b, 0x65]), "€");
        assert_eq!(decode_text(3, &[0xe9]), "é");
        assert_eq!(decode_text(8, &[0x04, 0x1f, 0xd8, 0x3d, 0xde, 0x00]), "П😀");
    }

    #[test]
    fn user_data_headers() {
        let part = [0x05, 0x00, 0x03, 0x2a, 0x02, 0x01, b'h', b'i'];
        assert_eq!(strip_udh(&part), (&b"hi"[..], Some((0x2a, 2, 1))));
        assert_eq!(
            strip_udh(&[0x09, 0x00]).1,
            None,
            "a header longer than the payload is not read"
        );
    }

    #[test]
    fn addresses_compare_by_digits() {
        assert!(same_address("+33612345678", "33612345678"));
        assert!(same_address("ACME", "acme"));
        assert!(!same_address("36180", "36181"));
    }
}
