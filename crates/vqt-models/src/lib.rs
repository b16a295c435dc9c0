//! vqt-models: the Vision Transformer, the query side and the heads, defined once for every
//! Burn backend (the backend is chosen by the [`burn::tensor::Device`] at run time).

pub mod cache;
pub mod drop_path;
pub mod head;
pub mod model;
pub mod ops;
pub mod query;
pub mod tuners;
pub mod vit;

pub use model::{QueryMethod, TrunkBatch, TrunkInput, TrunkModel};
pub use vit::{Vit, VitConfig, VitPreset};
