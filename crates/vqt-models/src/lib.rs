//! vqt-models: the Vision Transformer, the query side and the heads, defined once for every
//! Burn backend (the backend is chosen by the [`burn::tensor::Device`] at run time).

#![deny(missing_docs)]

pub mod cache;
pub mod check;
pub mod drop_path;
pub mod head;
pub mod model;
pub mod ops;
pub mod query;
pub mod registry;
pub mod tuners;
pub mod vit;

pub use model::{QueryMethod, TrunkBatch, TrunkInput, TrunkModel};
pub use registry::{MethodSpec, ModelSpec, Preset, PresetOn};
pub use vit::{Vit, VitConfig, VitPreset};

/// Draws every lazily initialised parameter of `module` now, in module order. Burn initialises a
/// parameter on its first use, so without this a seeded random model depends on which tensors
/// the program happens to touch first (a training run that builds a feature cache and an `eval`
/// that does not would get different random backbones from the same seed).
pub fn materialize<M: burn::module::Module>(module: &M) {
    struct Touch;
    impl burn::module::ModuleVisitor for Touch {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::tensor::Tensor<D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Touch);
}
