//! smsdrop: a self-hosted appliance that takes batches of SMS from business systems and delivers
//! them through telecom partners.
//!
//! # Layout
//!
//! Data flows one way, and the modules follow it; each may use only modules listed before it
//! (`docs/layers.md` is the table, and `tests/layers.rs` holds the code to it).
//!
//! The ground every stage stands on:
//! - [`clock`]: the time every decision reads.
//! - [`sms`]: the domain's own words, pure: reason and status codes, phone numbers, senders,
//!   GSM 03.38 and UCS-2, columns, templates, the message record, receipts, incoming messages.
//! - [`paths`]: where things are kept under `state_dir`.
//! - [`limits`]: what clients may take (descriptors, counts per address and tenant) and
//!   throttled warnings.
//! - [`crypto`]: master keys, tenant keys, sealing, keyed hashes.
//! - [`config`]: the TOML file checked into a `Config`, and the configuration in force.
//! - [`metrics`]: event counters, counted as things happen.
//! - [`disk`]: free space and what waits while it is low.
//!
//! The queue and what records around it:
//! - [`store`]: the encrypted durable queue (redb), the only module that sees the database.
//! - [`audit`]: the chained audit trail. [`alert`]: alerts, digests, the daily report, mail.
//! - [`reply`]: result, delivery-report and reply files in the tenant's outbox.
//!
//! The pipeline:
//! - [`batch`]: a batch file parsed and checked line by line, pure.
//! - [`watch`] and [`sftp`]: the ways in, from folders and over SFTP ([`httpd`] serves the
//!   partners' webhooks and the metrics).
//! - [`ingest`]: a claimed file through [`batch`] into the store, then its result file.
//! - [`dispatch`]: the way out: due messages taken fairly, routed and handed to partners.
//!
//! Running it: [`workers`] (background work beside the pipeline), [`reload`] (a new
//! configuration swapped in), [`exporter`] (`/metrics`, `/healthz`, `/readyz`), [`service`]
//! (what systemd sees), [`admin`] (the admin socket and its commands), [`server`] (starting
//! and stopping everything) and [`cli`].
//!
//! # Errors
//!
//! Our error types write their cause into their own message and do not hand it on as
//! `source()`: a log line's `error = %e` says everything, and `{e:#}` says nothing twice
//! (`tests/errors.rs` holds every type to it).

pub mod admin;
pub mod alert;
pub mod audit;
pub mod batch;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod disk;
pub mod dispatch;
pub mod exporter;
pub mod httpd;
pub mod ingest;
pub mod limits;
pub mod metrics;
pub mod paths;
pub mod reload;
pub mod reply;
pub mod server;
pub mod service;
pub mod sftp;
pub mod sms;
pub mod store;
pub mod watch;
pub mod workers;
