//! vqt-train: configuration, data wiring and burn-train learner setup for the `vqt-train` binary.

pub mod checkpoint;
pub mod config;
pub mod progress;
pub mod run;
pub mod rundir;
pub mod tune;
