//! Senders: who a message says it comes from.

/// Senders: up to 11 alphanumeric characters, or a number of up to 15 digits.
pub fn is_valid_sender(s: &str) -> bool {
    let digits = s.strip_prefix('+').unwrap_or(s);
    let numeric = !digits.is_empty() && digits.len() <= 15 && digits.bytes().all(|b| b.is_ascii_digit());
    let alpha = !s.trim().is_empty()
        && s.chars().count() <= 11
        && s.chars().all(|c| c.is_ascii_alphanumeric() || " .-_&".contains(c));
    numeric || alpha
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sender_rules() {
        for ok in ["ACME", "Acme Shop", "A.B-C_D&E", "+33612345678", "36111"] {
            assert!(is_valid_sender(ok), "{ok}");
        }
        for bad in [
            "",
            "   ",
            "TwelveChars!",
            "ACME SHOP PARIS",
            "A\u{e9}",
            "+1234567890123456",
        ] {
            assert!(!is_valid_sender(bad), "{bad}");
        }
    }
}
