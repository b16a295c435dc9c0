//! vqt-bench: parity checks against reference fixtures, and (later) memory/speed comparisons.

pub mod parity;
pub mod bench;
