//! GSM 03.38 / UCS-2 encoding and segmenting: any text is encoded in the parts `encode` counted,
//! each fits one SMS, and the parts put together read back as the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smsdrop::sms::gsm::{encode, from_gsm7, segment_payloads, to_gsm7};
use smsdrop::sms::message::TextCoding;

fuzz_target!(|text: &str| {
    let encoded = encode(text);
    let parts = segment_payloads(text, encoded.coding);
    assert_eq!(parts.len(), encoded.parts.max(1), "parts as counted");
    let whole: Vec<u8> = parts.concat();
    match encoded.coding {
        TextCoding::Gsm7 => {
            assert!(parts.iter().all(|p| p.len() <= 160), "a GSM part over 160 septets");
            assert_eq!(from_gsm7(&whole), text, "GSM round trip");
            assert_eq!(to_gsm7(text).as_deref(), Some(whole.as_slice()));
        }
        TextCoding::Ucs2 => {
            assert!(parts.iter().all(|p| p.len() <= 140 && p.len() % 2 == 0), "a UCS-2 part over 140 bytes");
            let units: Vec<u16> = whole.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
            assert_eq!(String::from_utf16(&units).ok().as_deref(), Some(text), "UCS-2 round trip");
        }
    }
});
