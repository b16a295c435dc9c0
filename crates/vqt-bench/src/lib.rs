//! vqt-bench: parity checks against reference fixtures, memory/speed measurements per method,
//! and reports aggregated from training run records.

#![deny(missing_docs)]

pub mod bench;
pub mod compare;
pub mod gpu_check;
pub mod kernels;
pub mod parity;
pub mod report;
