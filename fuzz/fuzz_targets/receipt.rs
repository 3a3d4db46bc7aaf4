//! Delivery receipts as partners write them: the text parser with its TLVs, and the id forms a
//! receipt may be matched under. Nothing panics; every candidate is non-empty.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smsdrop::sms::receipt::{IdForm, early_keys, normal_id, parse, receipt_candidates};

fuzz_target!(|input: (&str, Option<&str>, Option<u8>, Option<&str>, u8)| {
    let (text, tlv_id, tlv_state, tlv_error, form) = input;
    if let Some(r) = parse(text, tlv_id, tlv_state, tlv_error) {
        let _ = normal_id(&r.id);
        let settled = IdForm::from_u8(form);
        for (candidate, _) in receipt_candidates(&r.id, settled) {
            assert!(!candidate.is_empty() || r.id.is_empty());
        }
        let _ = early_keys(&r.id, settled);
    }
});
