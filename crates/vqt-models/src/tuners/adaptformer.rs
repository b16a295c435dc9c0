//! AdaptFormer (Chen et al., NeurIPS 2022): a scaled bottleneck in parallel with the MLP,
//! reading the residual stream (not normalised), outside DropPath (methods.md §5.1):
//! `Z = Z + MLP(LN2(Z)) + s·(dropout(relu(Z·W_dn + b_dn))·W_up + b_up)`.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// AdaptFormer settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptFormerConfig {
    /// Bottleneck width (VTAB baselines: 8; official full-data setting: 64).
    pub bottleneck: usize,
    /// Fixed output scale s (official: 0.1).
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// Dropout inside the adapter in training (official: 0.1).
    #[serde(default = "default_dropout")]
    pub dropout: f64,
}

fn default_scale() -> f64 {
    0.1
}
fn default_dropout() -> f64 {
    0.1
}

/// The parallel adapter of one block.
#[derive(Module, Debug)]
pub struct AdaptFormer {
    /// `Linear(D, b)`: kaiming-uniform (a = √5) weight, zero bias.
    pub down: Linear,
    /// `Linear(b, D)`: zero weight and bias, so the block starts as the backbone's.
    pub up: Linear,
    /// Dropout after the ReLU.
    pub dropout: Dropout,
    /// Output scale s.
    pub scale: f64,
}

impl AdaptFormerConfig {
    /// Checks the sizes.
    pub fn validate(&self) -> Result<(), String> {
        if self.bottleneck == 0 {
            return Err("tuners.adaptformer.bottleneck must be at least 1".into());
        }
        crate::check::finite("tuners.adaptformer.scale", self.scale)?;
        crate::check::probability("tuners.adaptformer.dropout", self.dropout)
    }

    /// A fresh adapter for width `d`.
    pub fn init(&self, d: usize, device: &Device) -> AdaptFormer {
        let (down, up) = super::zero_up_bottleneck(d, self.bottleneck, device);
        AdaptFormer { down, up, dropout: DropoutConfig::new(self.dropout).init(), scale: self.scale }
    }
}

impl AdaptFormer {
    /// `s·(dropout(relu(z·W_dn + b_dn))·W_up + b_up)`, computed as `h·(s·W_up) + s·b_up`: the
    /// scale multiplies the `[r, D]` weight and the bias, not the `[B, N, D]` output (one pass
    /// over the output, and one more in the backward, saved per block).
    pub fn forward(&self, z: Tensor<3>) -> Tensor<3> {
        let h = crate::ops::dropout(&self.dropout, relu(crate::ops::apply(&self.down, z)));
        let s = self.scale;
        crate::ops::linear(h, self.up.weight.val().mul_scalar(s), self.up.bias.as_ref().map(|b| b.val().mul_scalar(s)))
    }
}
