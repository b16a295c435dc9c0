//! vqt-train: configuration, data wiring and burn-train learner setup for the `vqt-train` binary.

#![deny(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod progress;
pub mod run;
pub mod rundir;
pub mod tune;
