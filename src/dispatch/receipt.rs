//! Delivery receipts: what a partner says became of a message, from SMPP TLVs or from the text
//! form `id:… sub:… dlvrd:… submit date:… done date:… stat:DELIVRD err:000 text:…`, and the
//! partner's message ids in every way partners write them.
//!
//! The most common receipt bug of SMS gateways is an id that does not match: `submit_sm_resp`
//! says `0001A2F3` and the receipt says `107251` (the same number in decimal), or `1a2f3`, or
//! `0001a2f3`. [`id_forms`] gives every form an id can take and [`normal_id`] the one a receipt
//! is looked up by, so that each of these finds its message.

use crate::codes::MessageStatus;

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
        .filter(|id| !id.is_empty())?;
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

/// Every form of a `submit_sm_resp` id a receipt may use: the id itself (normalised) first, then,
/// when it is a hexadecimal number, its decimal value, and when it is a decimal number, its
/// hexadecimal value.
pub fn id_forms(id: &str) -> Vec<String> {
    let normal = normal_id(id);
    let mut forms = vec![normal.clone()];
    if !normal.is_empty() && normal.len() <= 32 {
        if normal.bytes().all(|b| b.is_ascii_hexdigit()) {
            if let Ok(v) = u128::from_str_radix(&normal, 16) {
                forms.push(v.to_string());
            }
        }
        if normal.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(v) = normal.parse::<u128>() {
                forms.push(format!("{v:x}"));
            }
        }
    }
    forms.dedup();
    forms
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn ids_match_in_hex_decimal_case_and_zeros() {
        // submit_sm_resp said 0001A2F3; receipts may say any of these
        let forms = id_forms("0001A2F3");
        for receipt in ["0001A2F3", "1a2f3", "0001a2f3", "107251", "00107251"] {
            assert!(forms.contains(&normal_id(receipt)), "{receipt} in {forms:?}");
        }
        // a decimal id and its hexadecimal receipt
        let forms = id_forms("107251");
        assert!(forms.contains(&normal_id("1A2F3")));
        assert_eq!(normal_id("000"), "0");
        assert_eq!(id_forms("msg-7f"), vec!["msg-7f".to_string()]);
    }
}
