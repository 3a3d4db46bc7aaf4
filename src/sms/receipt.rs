//! Delivery receipts: what a partner says became of a message, from SMPP TLVs or from the text
//! form `id:… sub:… dlvrd:… submit date:… done date:… stat:DELIVRD err:000 text:…`, and the
//! partner's message ids in every way partners write them.
//!
//! The most common receipt bug of SMS gateways is an id that does not match: `submit_sm_resp`
//! says `0001A2F3` and the receipt says `107251` (the same number in decimal), or `1a2f3`, or
//! `0001a2f3`. [`normal_id`] takes care of case and zeros; the other base is a matter of the
//! partner: some write their receipts' ids in the other base, most in the same.
//!
//! A number made of digits only reads in both bases, so trying both for every receipt would let
//! a receipt settle a message that is not its own (hex `1536` is decimal `5430`), and a report
//! that says `delivered` must be true. Each partner's [`IdForm`] is therefore learned from the
//! receipts that find their message (see `store::receipts`); once settled, only that form is
//! tried. [`receipt_candidates`] gives the ids a receipt may stand for under what is known, and
//! [`early_keys`] the ids a kept receipt may be waiting under for a submitted id: a kept
//! receipt never matches by a change of base until the partner's form is settled.

use crate::sms::codes::MessageStatus;

/// What a receipt says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Receipt {
    /// The partner's message id, as the receipt writes it.
    pub id: String,
    /// `None` for states that are not final (`ENROUTE`, `ACCEPTD`): nothing changes.
    pub status: Option<MessageStatus>,
    /// The partner's state word (`DELIVRD`, `UNDELIV`, …) and error code, for the report.
    pub state: String,
    pub error: String,
}

/// The final status a `stat:` word or `message_state` means.
pub fn status_of_word(word: &str) -> Option<MessageStatus> {
    match word.to_ascii_uppercase().as_str() {
        "DELIVRD" | "DELIVERED" => Some(MessageStatus::Delivered),
        "EXPIRED" => Some(MessageStatus::Expired),
        "UNDELIV" | "UNDELIVERABLE" | "DELETED" | "UNKNOWN" => Some(MessageStatus::Undeliverable),
        "REJECTD" | "REJECTED" => Some(MessageStatus::Rejected),
        _ => None,
    }
}

/// The state word of an SMPP `message_state` value.
pub fn state_word(state: u8) -> &'static str {
    match state {
        1 => "ENROUTE",
        2 => "DELIVRD",
        3 => "EXPIRED",
        4 => "DELETED",
        5 => "UNDELIV",
        6 => "ACCEPTD",
        7 => "UNKNOWN",
        8 => "REJECTD",
        9 => "SKIPPED",
        _ => "UNKNOWN",
    }
}

/// The value of `key:` in a receipt text (case-insensitive key; the value runs to the next
/// space, except `text:` which is not read).
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let lower = text.to_ascii_lowercase();
    let mut from = 0;
    while let Some(at) = lower[from..].find(key) {
        let start = from + at;
        // a key starts the text or follows a space ("submit date:" must not match "date:")
        if start == 0 || text.as_bytes()[start - 1] == b' ' {
            let value = &text[start + key.len()..];
            return Some(value.split(' ').next().unwrap_or(""));
        }
        from = start + key.len();
    }
    None
}

/// Reads a receipt. TLV values (`receipted_message_id`, `message_state`, `network_error_code`)
/// win over the text where both are present. `None` when no id can be found.
pub fn parse(text: &str, tlv_id: Option<&str>, tlv_state: Option<u8>, tlv_error: Option<&str>) -> Option<Receipt> {
    let id = tlv_id
        .map(str::to_string)
        .or_else(|| field(text, "id:").map(str::to_string))
        // An id that is only blanks is no id (it would be looked up as "" and could settle a
        // message whose partner gave it no id: found by `make fuzz`, target `receipt`).
        .filter(|id| !normal_id(id).is_empty())?;
    let state = match tlv_state {
        Some(s) => state_word(s).to_string(),
        None => field(text, "stat:").unwrap_or("").to_string(),
    };
    let error = tlv_error
        .map(str::to_string)
        .or_else(|| field(text, "err:").map(str::to_string))
        .unwrap_or_default();
    Some(Receipt {
        id,
        status: status_of_word(&state),
        state: state.to_ascii_uppercase(),
        error,
    })
}

/// An id as a receipt is looked up by: trimmed, lower case, without leading zeros.
pub fn normal_id(id: &str) -> String {
    let lower = id.trim().to_ascii_lowercase();
    let trimmed = lower.trim_start_matches('0');
    if trimmed.is_empty() && !lower.is_empty() {
        "0".to_string()
    } else {
        trimmed.to_string()
    }
}

/// How a partner's receipts write the ids its `submit_sm_resp` gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdForm {
    /// The same id (up to case and leading zeros).
    Same = 1,
    /// Hexadecimal ids, decimal receipts.
    DecimalReceipts = 2,
    /// Decimal ids, hexadecimal receipts.
    HexReceipts = 3,
}

impl IdForm {
    pub fn from_u8(b: u8) -> Option<IdForm> {
        match b {
            1 => Some(IdForm::Same),
            2 => Some(IdForm::DecimalReceipts),
            3 => Some(IdForm::HexReceipts),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            IdForm::Same => "same",
            IdForm::DecimalReceipts => "decimal receipts",
            IdForm::HexReceipts => "hexadecimal receipts",
        }
    }
}

/// A decimal number's hexadecimal form (lower case), if `n` is one.
fn hex_of_decimal(n: &str) -> Option<String> {
    (!n.is_empty() && n.len() <= 38 && n.bytes().all(|b| b.is_ascii_digit()))
        .then(|| n.parse::<u128>().ok().map(|v| format!("{v:x}")))
        .flatten()
}

/// A hexadecimal number's decimal form, if `n` is one.
fn decimal_of_hex(n: &str) -> Option<String> {
    (!n.is_empty() && n.len() <= 32 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u128::from_str_radix(n, 16).ok().map(|v| v.to_string()))
        .flatten()
}

/// The submitted ids (normalised) a receipt's id may stand for, each with the form a match
/// shows: under a settled form, that form only (an id that cannot be written in it is taken as
/// it is); while the form is not settled, the id itself first, then its other-base readings.
pub fn receipt_candidates(id: &str, settled: Option<IdForm>) -> Vec<(String, IdForm)> {
    let n = normal_id(id);
    let as_decimal_receipt = || hex_of_decimal(&n).map(|h| (h, IdForm::DecimalReceipts));
    let as_hex_receipt = || decimal_of_hex(&n).map(|d| (d, IdForm::HexReceipts));
    let mut out = match settled {
        Some(IdForm::Same) => Vec::new(),
        Some(IdForm::DecimalReceipts) => as_decimal_receipt().into_iter().collect(),
        Some(IdForm::HexReceipts) => as_hex_receipt().into_iter().collect(),
        None => {
            let mut all = vec![(n.clone(), IdForm::Same)];
            all.extend(as_decimal_receipt());
            all.extend(as_hex_receipt());
            let mut seen = std::collections::HashSet::new();
            all.retain(|(k, _)| seen.insert(k.clone()));
            return all;
        }
    };
    if out.is_empty() {
        out.push((n, IdForm::Same));
    }
    out
}

/// The ids a kept (early) receipt for submitted id `submitted` is kept under: the id itself
/// while the partner's form is not settled, else the id as that form writes it.
pub fn early_keys(submitted: &str, settled: Option<IdForm>) -> Vec<String> {
    let n = normal_id(submitted);
    let converted = match settled {
        Some(IdForm::DecimalReceipts) => decimal_of_hex(&n),
        Some(IdForm::HexReceipts) => hex_of_decimal(&n),
        _ => None,
    };
    vec![converted.unwrap_or(n)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_of_blanks_is_no_id() {
        // The input `make fuzz` found (target `receipt`): an id of white space only.
        assert!(parse("", Some(" \n"), Some(2), None).is_none());
        assert!(parse("id:\t stat:DELIVRD err:000", None, None, None).is_none());
        assert_eq!(
            parse("", Some(" 00 "), Some(2), None).map(|r| normal_id(&r.id)),
            Some("0".into())
        );
    }

    #[test]
    fn the_text_form_is_read_whatever_its_case() {
        let r = parse(
            "id:0001A2F3 sub:001 dlvrd:001 submit date:2611251200 done date:2611251201 stat:DELIVRD err:000 text:hello id:x",
            None,
            None,
            None,
        )
        .unwrap();
        assert_eq!(r.id, "0001A2F3");
        assert_eq!(r.status, Some(MessageStatus::Delivered));
        assert_eq!(r.error, "000");
        let r = parse(
            "ID:77 SUB:001 DLVRD:000 SUBMIT DATE:2611251200 DONE DATE:2611251201 STAT:undeliv ERR:001 TEXT:",
            None,
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            (r.id.as_str(), r.status, r.error.as_str()),
            ("77", Some(MessageStatus::Undeliverable), "001")
        );
        let r = parse("id:5 stat:EXPIRED err:000", None, None, None).unwrap();
        assert_eq!(r.status, Some(MessageStatus::Expired));
        let r = parse("id:5 stat:ENROUTE err:000", None, None, None).unwrap();
        assert_eq!(r.status, None, "not final");
        assert!(parse("no receipt here", None, None, None).is_none());
    }

    #[test]
    fn tlvs_win_over_the_text() {
        let r = parse("id:1 stat:DELIVRD err:000", Some("abc"), Some(5), Some("030001")).unwrap();
        assert_eq!(r.id, "abc");
        assert_eq!(r.status, Some(MessageStatus::Undeliverable));
        assert_eq!(r.error, "030001");
        let r = parse("", Some("abc"), Some(8), None).unwrap();
        assert_eq!(r.status, Some(MessageStatus::Rejected));
    }

    #[test]
    fn a_settled_form_never_matches_by_a_coincidence_of_bases() {
        let keys = |id: &str, f| {
            receipt_candidates(id, f)
                .into_iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
        };
        // Not settled: the id itself first, then the other bases.
        assert_eq!(keys("5430", None), ["5430", "1536", "21552"]);
        assert_eq!(keys("00012AB", None), ["12ab", "4779"]);
        // Settled: only that form.
        assert_eq!(keys("5430", Some(IdForm::Same)), ["5430"]);
        assert_eq!(keys("5430", Some(IdForm::DecimalReceipts)), ["1536"]);
        assert_eq!(keys("1536", Some(IdForm::HexReceipts)), ["5430"]);
        assert_eq!(keys("msg-7", Some(IdForm::DecimalReceipts)), ["msg-7"]);
        // A kept receipt waits under the id itself until the form is settled.
        assert_eq!(early_keys("1536", None), ["1536"]);
        assert_eq!(early_keys("1536", Some(IdForm::DecimalReceipts)), ["5430"]);
        assert_eq!(early_keys("5430", Some(IdForm::HexReceipts)), ["1536"]);
        assert_eq!(early_keys("0001A2F3", Some(IdForm::Same)), ["1a2f3"]);
        for b in 1..=3 {
            assert_eq!(IdForm::from_u8(b).map(|f| f as u8), Some(b));
        }
        assert_eq!(IdForm::from_u8(0), None);
    }

    #[test]
    fn ids_match_in_hex_decimal_case_and_zeros() {
        // submit_sm_resp said 0001A2F3; receipts may say any of these
        let finds = |receipt: &str, submitted: &str| {
            receipt_candidates(receipt, None)
                .iter()
                .any(|(k, _)| *k == normal_id(submitted))
        };
        for receipt in ["0001A2F3", "1a2f3", "0001a2f3", "107251", "00107251"] {
            assert!(finds(receipt, "0001A2F3"), "{receipt}");
        }
        // a decimal id and its hexadecimal receipt
        assert!(finds("1A2F3", "107251"));
        assert_eq!(normal_id("000"), "0");
        assert_eq!(
            receipt_candidates("msg-7f", None),
            [("msg-7f".to_string(), IdForm::Same)]
        );
    }
}
