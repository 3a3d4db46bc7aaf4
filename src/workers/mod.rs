//! Background work that runs beside the pipeline for the daemon's whole life.
//!
//! - [`disk`]: the disk watch (free space under `state_dir`, the store's healing).

pub mod disk;
