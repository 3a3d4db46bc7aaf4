//! smsdrop: a self-hosted appliance that takes batches of SMS from business systems and delivers
//! them through telecom partners.
//!
//! # Layout
//!
//! Data flows one way, and the modules follow it:
//!
//! - [`watch`]: the way in from folders. Watches each tenant's inbox and claims complete files
//!   into the spool by an atomic rename.
//! - [`batch`]: the batch. Parses CSV, checks every line, encodes texts, and runs the ingest
//!   pipeline that seals accepted messages into the store and writes the result file.
//! - [`store`]: the encrypted durable queue (redb), the only module that sees the database.
//! - [`dispatch`]: the way out. Takes due messages fairly, routes them and hands them to
//!   partners (one file per partner kind).
//! - [`reply`]: what goes back: result and delivery-report files in the tenant's outbox.
//!
//! Around them: [`config`] (the TOML file, validated), [`crypto`] (master key, per-tenant keys,
//! sealing, keyed hashes), [`codes`] (reason and status codes), [`limits`] (what clients may
//! take: descriptors, counts per address and tenant, throttled warnings), [`disk`] (free space and
//! what waits while it is low), [`admin`] (the admin socket and the commands it serves),
//! [`server`] (starting and stopping everything) and [`cli`].

pub mod admin;
pub mod alert;
pub mod audit;
pub mod batch;
pub mod cli;
pub mod clock;
pub mod codes;
pub mod config;
pub mod crypto;
pub mod disk;
pub mod dispatch;
pub mod httpd;
pub mod limits;
pub mod metrics;
pub mod reload;
pub mod reply;
pub mod server;
pub mod service;
pub mod sftp;
pub mod store;
pub mod watch;
