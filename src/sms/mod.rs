//! The domain's own words, pure: no I/O, nothing else of smsdrop's.
//!
//! - [`codes`]: line and file reason codes and message statuses, each with its wire string.
//! - [`phone`]: phone numbers to E.164 and their regions; [`sender`]: who a message comes from.
//! - [`gsm`]: GSM 03.38 and UCS-2, segments and their payloads.
//! - [`columns`]: a batch's header names; [`template`]: message templates; [`format`]: a
//!   file's delimiter, encoding and byte-order mark.
//! - [`message`]: the message record.
//! - [`receipt`]: delivery receipts and the forms of partners' message ids.
//! - [`mo`]: incoming messages, their user data headers and opt-out keywords.

pub mod codes;
pub mod columns;
pub mod format;
pub mod gsm;
pub mod message;
pub mod mo;
pub mod phone;
pub mod receipt;
pub mod sender;
pub mod template;
