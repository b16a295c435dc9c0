//! vqt-train: configuration, data wiring and burn-train learner setup for the `vqt-train` binary.

pub mod config;
pub mod run;
