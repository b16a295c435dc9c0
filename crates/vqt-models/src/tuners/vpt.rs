//! Visual Prompt Tuning (Jia et al., ECCV 2022), shallow and deep (methods.md §5.3).
//!
//! Shallow: Np prompt tokens enter once after the embedding, `[CLS ; dropout(E) ; patches]`, with
//! no position embedding. Deep: before every block m ≥ 1 the Np prompt slots are replaced by
//! fresh `dropout(E_m)`. Prompts are trunk tokens: they are keys/values of every layer (so VQT
//! queries read them) and the head reads the class token as usual.

use burn::module::{Initializer, Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// VPT settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VptConfig {
    /// Prompt tokens per layer Np.
    pub num_tokens: usize,
    /// Deep (a prompt set per layer) or shallow (one set after the embedding).
    #[serde(default = "default_deep")]
    pub deep: bool,
    /// Dropout on the prompts in training (VPT config default 0; README examples 0.1).
    #[serde(default)]
    pub dropout: f64,
}

fn default_deep() -> bool {
    true
}

/// The prompts.
#[derive(Module, Debug)]
pub struct Vpt {
    /// `[S, Np, D]`: one set per entry of `layers`.
    pub prompts: Param<Tensor<3>>,
    /// The block each prompt set goes in before, ascending: `0..L` (deep), `[0]` (shallow), or
    /// the tuned blocks of `tuners.layers` (the first set is inserted before the lowest, each
    /// later set replaces the prompt slots before its block).
    pub layers: Vec<usize>,
    /// Prompt dropout (train only).
    pub dropout: Dropout,
}

impl VptConfig {
    /// Checks the sizes.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_tokens == 0 {
            return Err("tuners.vpt.num_tokens must be at least 1".into());
        }
        crate::check::probability("tuners.vpt.dropout", self.dropout)
    }

    /// Prompts `U(−a, a)`, `a = √(6/(3p² + D))` (the VPT init), in every block of a `depth`-block
    /// backbone.
    pub fn init(&self, depth: usize, d: usize, patch_size: usize, device: &Device) -> Vpt {
        self.init_at(&(0..depth).collect::<Vec<_>>(), d, patch_size, device)
    }

    /// Prompts for the tuned `blocks` (ascending, non-empty): deep, a set before each; shallow,
    /// one set before the lowest.
    pub fn init_at(&self, blocks: &[usize], d: usize, patch_size: usize, device: &Device) -> Vpt {
        let a = (6.0 / (3.0 * (patch_size * patch_size) as f64 + d as f64)).sqrt();
        let layers = if self.deep { blocks.to_vec() } else { blocks[..1].to_vec() };
        Vpt {
            prompts: Initializer::Uniform { min: -a, max: a }.init([layers.len(), self.num_tokens, d], device),
            layers,
            dropout: DropoutConfig::new(self.dropout).init(),
        }
    }
}

impl Vpt {
    /// Prompt tokens per layer.
    pub fn num_tokens(&self) -> usize {
        self.prompts.dims()[1]
    }

    fn set(&self, m: usize, batch: usize) -> Tensor<3> {
        let [_, np, d] = self.prompts.dims();
        crate::ops::dropout(&self.dropout, self.prompts.val().narrow(0, m, 1).expand([batch, np, d]))
    }

    /// Whether the prompts enter with the embedding (`[CLS ; E_0 ; patches]`), i.e. before block 0.
    pub fn at_embedding(&self) -> bool {
        self.layers.first() == Some(&0)
    }

    /// `[CLS ; E_0 ; rest]`: the first set inserted after the class token.
    pub fn insert(&self, z: Tensor<3>) -> Tensor<3> {
        let [b, n, _] = z.dims();
        Tensor::cat(vec![z.clone().narrow(1, 0, 1), self.set(0, b), z.narrow(1, 1, n - 1)], 1)
    }

    /// Before block m: the first set is inserted before its block (when that is not block 0,
    /// where the embedding inserted it); each later set replaces the prompt slots before its
    /// block (deep VPT); other blocks see the stream unchanged.
    pub fn before_block(&self, m: usize, z: Tensor<3>) -> Tensor<3> {
        match self.layers.iter().position(|&l| l == m) {
            Some(0) if m > 0 => self.insert(z),
            Some(i) if i > 0 => {
                // The prompt slots written over in place (Burn's slice_assign: its backward
                // zeroes those slots of the stream's gradient and slices the prompts' out),
                // instead of a concatenation of three narrowed parts, whose backward built
                // three zero-padded full-size gradients and added them (bench.md).
                let [b, _, d] = z.dims();
                let np = self.num_tokens();
                z.slice_assign([0..b, 1..1 + np, 0..d], self.set(i, b))
            }
            _ => z,
        }
    }
}
