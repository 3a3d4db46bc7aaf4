//! Incoming messages: the user data header (concatenation references) and the text in every
//! data coding. The body is always a suffix of the payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smsdrop::sms::mo::{decode_text, optout_keyword, strip_udh};

fuzz_target!(|input: (u8, &[u8])| {
    let (coding, payload) = input;
    let (body, concat) = strip_udh(payload);
    assert!(payload.ends_with(body));
    if let Some((_, total, seq)) = concat {
        let _ = (total, seq);
    }
    let text = decode_text(coding, body);
    let _ = optout_keyword(&text, &["STOP".to_string(), "ARRET".to_string()]);
});
