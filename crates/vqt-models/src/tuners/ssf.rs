//! SSF (Lian et al., NeurIPS 2022): a per-channel scale and shift `x ⊙ γ + β` after each
//! operation of the frozen backbone (methods.md §5.5).

use burn::module::{Initializer, Module, Param};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// SSF settings. Insertion sites are fixed by the method: after the patch embedding, LN1, the
/// fused qkv output, the attention projection, LN2, fc1 (before GELU), fc2 and the final LN.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsfConfig {
    /// Standard deviation of the init around γ = 1, β = 0 (SSF code: 0.02).
    #[serde(default = "default_std")]
    pub init_std: f64,
}

fn default_std() -> f64 {
    0.02
}

impl Default for SsfConfig {
    fn default() -> Self {
        Self { init_std: default_std() }
    }
}

/// One scale-shift pair over the last dimension.
#[derive(Module, Debug)]
pub struct Ssf {
    /// Scale γ `[C]`.
    pub gamma: Param<Tensor<1>>,
    /// Shift β `[C]`.
    pub beta: Param<Tensor<1>>,
}

impl SsfConfig {
    /// γ ~ N(1, std), β ~ N(0, std) over `channels`.
    pub fn init(&self, channels: usize, device: &Device) -> Ssf {
        Ssf {
            gamma: Initializer::Normal { mean: 1.0, std: self.init_std }.init([channels], device),
            beta: Initializer::Normal { mean: 0.0, std: self.init_std }.init([channels], device),
        }
    }
}

impl Ssf {
    /// The identity (γ = 1, β = 0), for tests and as a neutral element.
    pub fn identity(channels: usize, device: &Device) -> Ssf {
        Ssf { gamma: Initializer::Ones.init([channels], device), beta: Initializer::Zeros.init([channels], device) }
    }

    /// `x ⊙ γ + β` on the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_part(x, 0)
    }

    /// `x ⊙ γ[start..start+C] + β[..]` where C is x's last dimension (one third of a fused qkv).
    pub fn forward_part<const D: usize>(&self, x: Tensor<D>, start: usize) -> Tensor<D> {
        let c = x.dims()[D - 1];
        let g = self.gamma.val().narrow(0, start, c).unsqueeze::<D>();
        let b = self.beta.val().narrow(0, start, c).unsqueeze::<D>();
        x * g + b
    }
}

/// Applies an optional SSF.
pub fn maybe<const D: usize>(ssf: &Option<Ssf>, x: Tensor<D>) -> Tensor<D> {
    match ssf {
        Some(s) => s.forward(x),
        None => x,
    }
}
