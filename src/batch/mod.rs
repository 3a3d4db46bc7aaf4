//! The batch: a CSV file turned into checked messages (docs/batch-format.md).
//!
//! `parse` reads records, `validate` checks lines (with the domain's rules from [`crate::sms`]:
//! columns, templates, phone numbers, GSM-7 or UCS-2 and segments), and `file` runs them over a
//! whole file, handing each line to a sink. Pure: no store, no alert, no file written;
//! `crate::ingest` joins it to the queue.

pub mod file;
pub mod parse;
pub mod validate;
