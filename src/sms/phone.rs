//! Phone numbers: what a batch writes, turned into E.164 with the region it belongs to (the
//! `rlibphonenumber` crate holds the numbering plans).

/// Normalises a phone number to E.164 with the tenant's region; `None` if it is not a valid
/// number.
pub fn normalize_phone(raw: &str, region: Option<rlibphonenumber::Region>) -> Option<String> {
    parse_phone(raw, region).map(|(e164, _)| e164)
}

/// Like [`normalize_phone`], with the region the number belongs to.
pub fn parse_phone(
    raw: &str,
    region: Option<rlibphonenumber::Region>,
) -> Option<(String, Option<rlibphonenumber::Region>)> {
    let trimmed = raw.trim();
    if trimmed.is_empty() || trimmed.len() > 40 {
        return None;
    }
    // Without a region, "00" is the common international prefix.
    let owned;
    let input = match (region, trimmed.strip_prefix("00")) {
        (None, Some(rest)) => {
            owned = format!("+{rest}");
            owned.as_str()
        }
        _ => trimmed,
    };
    let number = rlibphonenumber::PhoneNumber::parse(input, region).ok()?;
    if !number.is_valid() {
        return None;
    }
    let e164 = number.format_as(rlibphonenumber::PhoneNumberFormat::E164).into_owned();
    Some((e164, number.get_region_code()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rlibphonenumber::Region as Id;

    #[test]
    fn french_number_forms_are_one_number() {
        for raw in [
            "06 12 34 56 78",
            "+33 6 12 34 56 78",
            "0033612345678",
            "06.12.34.56.78",
            "+33612345678",
        ] {
            assert_eq!(
                normalize_phone(raw, Some(Id::FR)).as_deref(),
                Some("+33612345678"),
                "{raw}"
            );
        }
        assert_eq!(normalize_phone("0033612345678", None).as_deref(), Some("+33612345678"));
        assert_eq!(
            normalize_phone("+44 7911 123456", Some(Id::FR)).as_deref(),
            Some("+447911123456")
        );
        for bad in [
            "",
            "12",
            "06 12 34",
            "hello",
            "+33 6 12 34 56 78 90 12",
            "0612345678",
            "06123456789999",
        ] {
            if bad == "0612345678" {
                assert!(normalize_phone(bad, None).is_none(), "no region, national form");
                continue;
            }
            assert!(normalize_phone(bad, Some(Id::FR)).is_none(), "{bad}");
        }
    }
}
