//! Stochastic depth: drop a whole residual branch per sample.

use burn::module::{Flag, Module, Param};
use burn::tensor::{Distribution, Tensor};

/// Per-sample residual-branch dropout (timm `DropPath`): in training, each sample's branch is
/// zeroed with probability `prob` and survivors are scaled by `1/(1−prob)`. Identity in eval,
/// on non-autodiff tensors, or with `prob = 0`.
#[derive(Module, Debug)]
pub struct DropPath {
    /// Drop probability.
    pub prob: f64,
    /// Training flag (cleared by `freeze`, as for burn's `Dropout`).
    pub training: Param<Flag>,
}

impl DropPath {
    /// A drop-path of rate `prob` (must be in [0, 1)).
    pub fn new(prob: f64) -> Self {
        assert!((0.0..1.0).contains(&prob), "drop-path rate {prob} outside [0, 1)");
        Self { prob, training: Param::from_bool(true) }
    }

    /// Applies it to `x: [B, ...]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if !self.training.is_enabled() || !x.device().is_autodiff() || self.prob == 0.0 {
            return x;
        }
        let keep = 1.0 - self.prob;
        let mut shape = [1usize; D];
        shape[0] = x.dims()[0];
        let mask = Tensor::<D>::random(shape, Distribution::Bernoulli(keep), &x.device());
        x * mask.mul_scalar(1.0 / keep)
    }
}
