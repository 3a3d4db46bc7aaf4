//! The product's wire vocabulary: line and file reason codes and message statuses (docs/reply-files.md).
//!
//! Every code has exactly one wire string, defined here and nowhere else. The enums are what the
//! rest of the code passes around; the strings are what reply files, logs and the CLI show.

/// An enum whose every variant has one wire string: `as_str`, `parse`, `ALL` and `Display`.
macro_rules! wire_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $wire:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The code as written in reply files and shown to operators.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $wire),+ }
            }

            /// Parses a wire string; `None` for an unknown code.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($wire => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use wire_enum;

wire_enum!(
    /// Why one line of a batch was rejected (docs/reply-files.md).
    LineReason {
        InvalidPhone => "invalid_phone",
        EmptyMessage => "empty_message",
        MessageTooLong => "message_too_long",
        BadLine => "bad_line",
        BadEncoding => "bad_encoding",
        SenderNotAllowed => "sender_not_allowed",
        ScheduleInvalid => "schedule_invalid",
        Blocklisted => "blocklisted",
        DuplicateRecipient => "duplicate_recipient",
        CountryNotAllowed => "country_not_allowed",
        UrlNotAllowed => "url_not_allowed",
        TemplateVariableMissing => "template_variable_missing",
    }
);

wire_enum!(
    /// Why a whole batch was rejected; no line of it is queued (docs/reply-files.md).
    FileReason {
        DuplicateFile => "duplicate_file",
        Unreadable => "unreadable",
        MissingColumn => "missing_column",
        TooLarge => "too_large",
        TooManyLines => "too_many_lines",
        Strict => "strict",
        QuotaExceeded => "quota_exceeded",
    }
);

wire_enum!(
    /// Where one message stands (docs/reply-files.md).
    MessageStatus {
        Queued => "queued",
        Held => "held",
        Submitted => "submitted",
        Delivered => "delivered",
        Undeliverable => "undeliverable",
        Expired => "expired",
        Rejected => "rejected",
        Failed => "failed",
        Canceled => "canceled",
    }
);

impl MessageStatus {
    /// A final status never changes again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MessageStatus::Delivered
                | MessageStatus::Undeliverable
                | MessageStatus::Expired
                | MessageStatus::Rejected
                | MessageStatus::Failed
                | MessageStatus::Canceled
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire strings are what ERPs parse: pinned here, written out by hand as docs/reply-files.md
    /// documents them, so that a renamed variant or a changed literal fails.
    #[test]
    fn wire_strings_are_the_documented_ones() {
        let lines: Vec<&str> = LineReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            lines,
            [
                "invalid_phone",
                "empty_message",
                "message_too_long",
                "bad_line",
                "bad_encoding",
                "sender_not_allowed",
                "schedule_invalid",
                "blocklisted",
                "duplicate_recipient",
                "country_not_allowed",
                "url_not_allowed",
                "template_variable_missing",
            ]
        );
        let files: Vec<&str> = FileReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            files,
            [
                "duplicate_file",
                "unreadable",
                "missing_column",
                "too_large",
                "too_many_lines",
                "strict",
                "quota_exceeded",
            ]
        );
        let statuses: Vec<&str> = MessageStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            statuses,
            [
                "queued",
                "held",
                "submitted",
                "delivered",
                "undeliverable",
                "expired",
                "rejected",
                "failed",
                "canceled",
            ]
        );
    }

    #[test]
    fn wire_strings_round_trip() {
        for r in LineReason::ALL {
            assert_eq!(LineReason::parse(r.as_str()), Some(*r));
        }
        for r in FileReason::ALL {
            assert_eq!(FileReason::parse(r.as_str()), Some(*r));
        }
        for s in MessageStatus::ALL {
            assert_eq!(MessageStatus::parse(s.as_str()), Some(*s));
        }
        assert_eq!(LineReason::parse("nope"), None);
    }

    #[test]
    fn final_statuses() {
        let finals: Vec<_> = MessageStatus::ALL.iter().filter(|s| s.is_final()).collect();
        assert_eq!(finals.len(), 6);
        assert!(!MessageStatus::Submitted.is_final());
    }
}
