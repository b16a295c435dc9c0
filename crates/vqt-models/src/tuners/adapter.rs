//! Serial bottleneck adapters (methods.md §5.6): `f(x) = x + act(x·W_dn + b_dn)·W_up + b_up`.
//! Houlsby (2019) places one after the attention branch and one after the MLP branch of every
//! block, before the residual adds; Pfeiffer (2021) only after the MLP branch.
//!
//! Init: W_dn kaiming-uniform (a = √5), W_up = 0, biases 0, so each adapter starts as the
//! identity. (The VPT code zero-initialises W_dn too, which leaves b_up as the only parameter
//! with a gradient, forever; we do not copy that.)

use crate::ops::gelu;
use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// Which adapter layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdapterKind {
    /// Two adapters per block (attention and MLP outputs).
    Houlsby,
    /// One adapter per block (MLP output).
    Pfeiffer,
}

/// The adapter's non-linearity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdapterActivation {
    /// Exact GELU.
    #[default]
    Gelu,
    /// ReLU.
    Relu,
}

/// Adapter settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    /// Houlsby or Pfeiffer.
    pub kind: AdapterKind,
    /// Bottleneck width b (Houlsby: typically 8–64; the VPT code's Pfeiffer: 96 for ViT-B).
    pub bottleneck: usize,
    /// Non-linearity (default GELU).
    #[serde(default)]
    pub activation: AdapterActivation,
}

/// One residual bottleneck adapter.
#[derive(Module, Debug)]
pub struct BottleneckAdapter {
    /// `Linear(D, b)`.
    pub down: Linear,
    /// `Linear(b, D)`, zero at init.
    pub up: Linear,
    /// Non-linearity.
    #[module(skip)]
    pub activation: AdapterActivation,
}

impl AdapterConfig {
    /// Checks the sizes.
    pub fn validate(&self) -> Result<(), String> {
        if self.bottleneck == 0 {
            return Err("tuners.adapter.bottleneck must be at least 1".into());
        }
        Ok(())
    }

    /// A fresh identity adapter for width `d`.
    pub fn init(&self, d: usize, device: &Device) -> BottleneckAdapter {
        let (down, up) = super::zero_up_bottleneck(d, self.bottleneck, device);
        BottleneckAdapter { down, up, activation: self.activation }
    }
}

impl BottleneckAdapter {
    /// `x + act(x·W_dn + b_dn)·W_up + b_up`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = crate::ops::apply(&self.down, x.clone());
        let h = match self.activation {
            AdapterActivation::Gelu => gelu(h),
            AdapterActivation::Relu => relu(h),
        };
        x + crate::ops::apply(&self.up, h)
    }
}

/// Applies an optional adapter.
pub fn maybe(adapter: &Option<BottleneckAdapter>, x: Tensor<3>) -> Tensor<3> {
    match adapter {
        Some(a) => a.forward(x),
        None => x,
    }
}
