//! The query side: modules that *read* the frozen backbone and never change it (VQT, SynQT).

pub mod synqt;
pub mod vqt;

pub use synqt::{Synqt, SynqtConfig, SynqtTrace};
pub use vqt::{Vqt, VqtConfig, l2_normalize};
