//! How a text goes on the air: GSM 03.38 7-bit default alphabet where every character has a
//! code (3GPP TS 23.038 §6.2.1, with its extension table, where a character costs two septets),
//! else UCS-2; and how many segments it takes.
//!
//! A single SMS carries 160 septets or 70 UCS-2 code units. Concatenated, each part loses six
//! octets to the UDH: 153 septets or 67 code units, and a part never splits an escape pair or a
//! surrogate pair (3GPP TS 23.040 §9.2.3.24.1).

use crate::sms::message::TextCoding;

/// The basic GSM 03.38 table, by septet value (0x1B, the escape, is never a character).
const BASIC: [char; 128] = [
    '@', '£', '$', '¥', 'è', 'é', 'ù', 'ì', 'ò', 'Ç', '\n', 'Ø', 'ø', '\r', 'Å', 'å', //
    'Δ', '_', 'Φ', 'Γ', 'Λ', 'Ω', 'Π', 'Ψ', 'Σ', 'Θ', 'Ξ', '\u{1b}', 'Æ', 'æ', 'ß', 'É', //
    ' ', '!', '"', '#', '¤', '%', '&', '\'', '(', ')', '*', '+', ',', '-', '.', '/', //
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', ':', ';', '<', '=', '>', '?', //
    '¡', 'A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I', 'J', 'K', 'L', 'M', 'N', 'O', //
    'P', 'Q', 'R', 'S', 'T', 'U', 'V', 'W', 'X', 'Y', 'Z', 'Ä', 'Ö', 'Ñ', 'Ü', '§', //
    '¿', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm', 'n', 'o', //
    'p', 'q', 'r', 's', 't', 'u', 'v', 'w', 'x', 'y', 'z', 'ä', 'ö', 'ñ', 'ü', 'à', //
];

/// The extension table: (character, septet after the escape).
const EXTENSION: [(char, u8); 10] = [
    ('\u{0c}', 0x0A),
    ('^', 0x14),
    ('{', 0x28),
    ('}', 0x29),
    ('\\', 0x2F),
    ('[', 0x3C),
    ('~', 0x3D),
    (']', 0x3E),
    ('|', 0x40),
    ('€', 0x65),
];

/// Septets a character costs in GSM 7-bit: 1, 2 (extension table) or `None` (not codable).
pub fn gsm_septets(c: char) -> Option<u8> {
    if c == '\u{1b}' {
        return None;
    }
    if let Some(&(_, _)) = EXTENSION.iter().find(|(e, _)| *e == c) {
        return Some(2);
    }
    if c.is_ascii() {
        // Every printable ASCII character except the extension ones and ` (0x60) is basic.
        return match c {
            '`' => None,
            c if (c as u32) < 0x20 && c != '\n' && c != '\r' => None,
            '\u{7f}' => None,
            _ => Some(1),
        };
    }
    BASIC.contains(&c).then_some(1)
}

/// The GSM 03.38 septets of `text` (unpacked, escapes included), or `None` when some character
/// has no GSM code.
pub fn to_gsm7(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        let (code, n) = gsm7_char(c)?;
        out.extend_from_slice(&code[..n]);
    }
    Some(out)
}

/// One character's septets (the escape and its extension code, or one basic code) and how many.
type Septets = ([u8; 2], usize);

/// The septets of `c`, if GSM-7 has it.
fn gsm7_char(c: char) -> Option<Septets> {
    /// ASCII, looked up once: the dispatcher encodes every message it sends.
    static ASCII: std::sync::LazyLock<[Option<Septets>; 128]> =
        std::sync::LazyLock::new(|| std::array::from_fn(|i| gsm7_lookup(char::from(i as u8))));
    match ASCII.get(c as usize) {
        Some(code) => *code,
        None => gsm7_lookup(c),
    }
}

fn gsm7_lookup(c: char) -> Option<Septets> {
    if let Some(&(_, code)) = EXTENSION.iter().find(|(e, _)| *e == c) {
        return Some(([0x1b, code], 2));
    }
    let code = BASIC.iter().position(|b| *b == c && c != '\u{1b}')?;
    Some(([code as u8, 0], 1))
}

/// Reads unpacked GSM 03.38 septets back into text (an incoming message with `data_coding` 0).
/// A septet with no character, or an escape before an unknown code, reads as a space, as the
/// standard asks of a receiving entity (3GPP TS 23.038 §6.2.1.1).
pub fn from_gsm7(septets: &[u8]) -> String {
    let mut out = String::with_capacity(septets.len());
    let mut escaped = false;
    for &b in septets {
        let b = b & 0x7f;
        if escaped {
            escaped = false;
            out.push(
                EXTENSION
                    .iter()
                    .find(|(_, code)| *code == b)
                    .map(|(c, _)| *c)
                    .unwrap_or(' '),
            );
        } else if b == 0x1b {
            escaped = true;
        } else {
            out.push(BASIC[b as usize]);
        }
    }
    out
}

/// A text's coding and the number of segments it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoded {
    pub coding: TextCoding,
    pub parts: usize,
}

/// Chooses the coding and counts segments.
pub fn encode(text: &str) -> Encoded {
    let gsm: Option<Vec<u8>> = text.chars().map(gsm_septets).collect();
    match gsm {
        Some(costs) => Encoded {
            coding: TextCoding::Gsm7,
            parts: segments(costs.into_iter(), 160, 153),
        },
        None => Encoded {
            coding: TextCoding::Ucs2,
            parts: segments(text.chars().map(|c| c.len_utf16() as u8), 70, 67),
        },
    }
}

/// Segments needed for characters of the given unit costs, never splitting a character.
fn segments(costs: impl Iterator<Item = u8> + Clone, single: usize, part: usize) -> usize {
    let total: usize = costs.clone().map(usize::from).sum();
    if total <= single {
        return 1;
    }
    let mut parts = 1;
    let mut used = 0usize;
    for cost in costs {
        let cost = usize::from(cost);
        if used + cost > part {
            parts += 1;
            used = 0;
        }
        used += cost;
    }
    parts
}

/// The payload of each segment of `text` as it goes on the wire: GSM 03.38 septets unpacked one
/// per byte (SMPP `data_coding` 0), or UCS-2 big-endian (`data_coding` 8). One segment when it
/// fits in 160 septets or 70 units, else segments of 153 septets or 67 units (room for the
/// concatenation header), never splitting an escape pair or a surrogate pair. The number of
/// segments is the one [`encode`] counted.
pub fn segment_payloads(text: &str, coding: TextCoding) -> Vec<Vec<u8>> {
    // Bytes per septet or unit, and the sizes in them.
    let (unit, single, part) = match coding {
        TextCoding::Gsm7 => (1, 160, 153),
        TextCoding::Ucs2 => (2, 70, 67),
    };
    let mut bytes = Vec::with_capacity(text.len() * unit);
    // Where each character's bytes end: segments are cut only there.
    let mut ends = Vec::with_capacity(text.len());
    for c in text.chars() {
        match coding {
            TextCoding::Gsm7 => match gsm7_char(c) {
                Some((code, n)) => bytes.extend_from_slice(&code[..n]),
                None => bytes.push(0x3f),
            },
            TextCoding::Ucs2 => {
                for u in c.encode_utf16(&mut [0u16; 2]) {
                    bytes.extend_from_slice(&u.to_be_bytes());
                }
            }
        }
        ends.push(bytes.len());
    }
    if bytes.len() <= single * unit {
        return vec![bytes];
    }
    let mut out = Vec::new();
    let (mut start, mut previous) = (0, 0);
    for end in ends {
        if end - start > part * unit {
            out.push(bytes[start..previous].to_vec());
            start = previous;
        }
        previous = end;
    }
    out.push(bytes[start..].to_vec());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(text: &str) -> (TextCoding, usize) {
        let e = encode(text);
        (e.coding, e.parts)
    }

    #[test]
    fn segment_payloads_match_the_count_and_the_text() {
        for text in [
            "a".repeat(160),
            "a".repeat(161),
            format!("{}€{}", "a".repeat(152), "a".repeat(10)),
            "€".repeat(457),
            "é".repeat(71),
            format!("{}😀{}", "й".repeat(66), "й".repeat(10)),
        ] {
            let e = encode(&text);
            let parts = segment_payloads(&text, e.coding);
            assert_eq!(parts.len(), e.parts, "{text}");
            match e.coding {
                TextCoding::Gsm7 => {
                    assert!(parts.iter().all(|p| p.len() <= if e.parts == 1 { 160 } else { 153 }));
                    assert!(parts.iter().all(|p| p.last() != Some(&0x1b)), "an escape is never cut");
                    assert_eq!(parts.concat(), to_gsm7(&text).unwrap());
                }
                TextCoding::Ucs2 => {
                    let units: Vec<u16> = parts
                        .concat()
                        .chunks(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .collect();
                    assert_eq!(String::from_utf16(&units).unwrap(), text);
                    for p in &parts {
                        let p: Vec<u16> = p.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
                        assert!(String::from_utf16(&p).is_ok(), "a surrogate pair is never cut");
                    }
                }
            }
        }
    }

    #[test]
    fn segment_boundaries() {
        use TextCoding::*;
        let cases: &[(String, (TextCoding, usize))] = &[
            ("".into(), (Gsm7, 1)),
            ("a".repeat(160), (Gsm7, 1)),
            ("a".repeat(161), (Gsm7, 2)),
            ("a".repeat(306), (Gsm7, 2)),
            ("a".repeat(307), (Gsm7, 3)),
            ("a".repeat(918), (Gsm7, 6)),
            ("a".repeat(919), (Gsm7, 7)),
            ("€".repeat(80), (Gsm7, 1)),
            ("€".repeat(456), (Gsm7, 6)),
            ("€".repeat(457), (Gsm7, 7)),
            (format!("{}€", "a".repeat(916)), (Gsm7, 6)),
            (format!("{}€", "a".repeat(917)), (Gsm7, 7)),
            (format!("{}€", "a".repeat(159)), (Gsm7, 2)),
            // an escape pair is never split: 152 + € does not fit in 153
            (format!("{}€{}", "a".repeat(152), "a".repeat(10)), (Gsm7, 2)),
            ("é".repeat(160), (Gsm7, 1)),
            ("ж".repeat(70), (Ucs2, 1)),
            ("ж".repeat(71), (Ucs2, 2)),
            ("ж".repeat(402), (Ucs2, 6)),
            ("ж".repeat(403), (Ucs2, 7)),
            ("😀".repeat(35), (Ucs2, 1)),
            ("😀".repeat(36), (Ucs2, 2)),
            (format!("{}😀", "ж".repeat(66)), (Ucs2, 1)),
            (format!("{}😀{}", "ж".repeat(66), "ж".repeat(3)), (Ucs2, 2)),
        ];
        for (text, want) in cases {
            assert_eq!(
                parts(text),
                *want,
                "{} chars of {:?}",
                text.chars().count(),
                text.chars().next()
            );
        }
    }

    #[test]
    fn gsm_septets_read_back_to_the_text() {
        for text in [
            "STOP",
            "Arret? non: è é ù @ £ €",
            "{[~]}|^\\",
            "Ça coute 5€",
            "Ç@£$¥èéùìòØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ",
        ] {
            let septets = to_gsm7(text).unwrap_or_else(|| panic!("{text:?} is GSM 03.38"));
            assert_eq!(from_gsm7(&septets), text);
        }
        // Texts outside the table have no septets at all (they go as UCS-2).
        for text in ["ça", "naïve", "Arrêt", "coûte", "Привет", "😀"] {
            assert_eq!(to_gsm7(text), None, "{text:?}");
        }
        assert_eq!(from_gsm7(&[0x1b, 0x65, 0x41]), "€A");
        assert_eq!(from_gsm7(&[0x1b, 0x01]), " ", "an unknown escape reads as a space");
    }

    #[test]
    fn gsm_table_membership() {
        for c in ['@', '£', 'Δ', 'ß', '¿', 'à', '\n', 'é', 'ù', 'Ç'] {
            assert_eq!(gsm_septets(c), Some(1), "{c}");
        }
        for c in ['€', '[', '^', '|', '~', '\\', '{', '}', ']'] {
            assert_eq!(gsm_septets(c), Some(2), "{c}");
        }
        for c in ['ç', 'ê', 'â', '`', '\t', '\u{1b}', 'ж', '😀'] {
            assert_eq!(gsm_septets(c), None, "{c}");
        }
    }

    #[test]
    fn septets_of_a_text() {
        assert_eq!(to_gsm7("A€@"), Some(vec![0x41, 0x1b, 0x65, 0x00]));
        assert_eq!(to_gsm7("ç"), None);
    }

    proptest::proptest! {
        /// Any text is cut into the parts `encode` counted, each fits one SMS, and the parts
        /// put together read back as the text.
        #[test]
        fn any_text_is_cut_into_the_parts_counted_and_reads_back(text in "\\PC{0,400}") {
            round_trip(&text)?;
        }

        /// Texts of the GSM alphabet, its escaped characters (`€ [ ] { } | ~ ^ \\`) included,
        /// stay GSM and never have an escape pair cut between two parts.
        #[test]
        fn gsm_texts_stay_gsm_and_read_back(text in "[a-zA-Z0-9 @£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ!#%&()*+,./:;<=>?¡ÄÖÑÜ§¿äöñüà€{}~|^\\[\\]\\\\-]{0,500}") {
            proptest::prop_assert_eq!(encode(&text).coding, TextCoding::Gsm7);
            round_trip(&text)?;
        }
    }

    fn round_trip(text: &str) -> Result<(), proptest::test_runner::TestCaseError> {
        let e = encode(text);
        let parts = segment_payloads(text, e.coding);
        proptest::prop_assert_eq!(parts.len(), e.parts.max(1));
        let whole = parts.concat();
        match e.coding {
            TextCoding::Gsm7 => {
                proptest::prop_assert!(parts.iter().all(|p| p.len() <= 160));
                if parts.len() > 1 {
                    proptest::prop_assert!(parts.iter().all(|p| p.len() <= 153));
                    // no part ends on the escape of a pair
                    proptest::prop_assert!(parts.iter().all(|p| p.last() != Some(&0x1b)));
                }
                proptest::prop_assert_eq!(from_gsm7(&whole), text);
            }
            TextCoding::Ucs2 => {
                proptest::prop_assert!(parts.iter().all(|p| p.len() <= 140 && p.len() % 2 == 0));
                let units: Vec<u16> = whole
                    .chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                let back = String::from_utf16(&units).ok();
                proptest::prop_assert_eq!(back.as_deref(), Some(text));
            }
        }
        Ok(())
    }
}
