//! The batch: a CSV file turned into checked messages (README: How a file flows).
//!
//! `parse` reads records, `columns` maps headers, `validate` checks lines, `encode` decides GSM-7
//! or UCS-2 and counts segments, `template` fills message templates, and `ingest` runs them as a
//! pipeline into the store and the result file.

pub mod columns;
pub mod encode;
pub mod ingest;
pub mod parse;
pub mod template;
pub mod validate;
