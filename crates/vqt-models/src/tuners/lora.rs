//! LoRA (Hu et al., ICLR 2022) on the fused qkv projection, per output third (methods.md §5.2).
//!
//! For each adapted part t ∈ {q, k, v}: `QKV[..., t] += (α/r)·(A·A_t)·B_t` with `A_t: [D, r]`
//! kaiming-uniform (a = √5, i.e. U(±1/√D)) and `B_t: [r, D] = 0`, so the model starts as the
//! backbone. After training [`LoraQkv::merge_into`] folds the update into the plain weight.
//! Burn's built-in `apply_lora` adapts the whole fused weight (q, k and v) and is not used.

use burn::module::{Initializer, Module, Param};
use burn::nn::Linear;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// LoRA settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank r (V-PETL's 0.29 M for ViT-B/16 is r = 8).
    pub rank: usize,
    /// α; the update is scaled by α/r. Defaults to r (scale 1).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Which thirds of the fused qkv to adapt: any of "q", "k", "v" (default q and v).
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
}

fn default_targets() -> Vec<String> {
    vec!["q".into(), "v".into()]
}

/// One low-rank pair `A: [D, r]`, `B: [r, D]` (Burn `[in, out]` layout).
#[derive(Module, Debug)]
pub struct LoraPair {
    /// Down projection A.
    pub a: Param<Tensor<2>>,
    /// Up projection B (zero at init).
    pub b: Param<Tensor<2>>,
}

/// LoRA on the q, k and/or v thirds of one block's fused projection.
#[derive(Module, Debug)]
pub struct LoraQkv {
    /// Update of the query third.
    pub q: Option<LoraPair>,
    /// Update of the key third.
    pub k: Option<LoraPair>,
    /// Update of the value third.
    pub v: Option<LoraPair>,
    /// α/r.
    pub scale: f64,
}

impl LoraConfig {
    /// Checks rank and targets.
    pub fn validate(&self) -> Result<(), String> {
        if self.rank == 0 {
            return Err("tuners.lora.rank must be at least 1".into());
        }
        if self.targets.is_empty() {
            return Err("tuners.lora.targets is empty: list any of \"q\", \"k\", \"v\"".into());
        }
        if let Some(a) = self.alpha {
            if !(a.is_finite() && a > 0.0) {
                return Err(format!("tuners.lora.alpha = {a} must be a finite value > 0"));
            }
        }
        for t in &self.targets {
            if !["q", "k", "v"].contains(&t.as_str()) {
                return Err(format!("tuners.lora.targets: `{t}` is not one of \"q\", \"k\", \"v\""));
            }
        }
        Ok(())
    }

    /// Fresh LoRA for a width-`d` block.
    pub fn init(&self, d: usize, device: &Device) -> LoraQkv {
        let bound = 1.0 / (d as f64).sqrt();
        let pair = |t: &str| {
            self.targets.iter().any(|x| x == t).then(|| LoraPair {
                a: Initializer::Uniform { min: -bound, max: bound }.init([d, self.rank], device),
                b: Initializer::Zeros.init([self.rank, d], device),
            })
        };
        LoraQkv { q: pair("q"), k: pair("k"), v: pair("v"), scale: self.alpha.unwrap_or(self.rank as f64) / self.rank as f64 }
    }
}

impl LoraQkv {
    fn pair(&self, part: usize) -> Option<&LoraPair> {
        [&self.q, &self.k, &self.v][part].as_ref()
    }

    /// Adds the update of third `part` (0 = q, 1 = k, 2 = v) for the normalised tokens `a`.
    pub fn apply(&self, part: usize, a: Tensor<3>, out: Tensor<3>) -> Tensor<3> {
        match self.pair(part) {
            Some(p) => out + crate::ops::linear(crate::ops::linear(a, p.a.val(), None), p.b.val(), None).mul_scalar(self.scale),
            None => out,
        }
    }

    /// The fused projection's output `qkv: [B, N, 3·D]` of tokens `a` with every adapted
    /// third's update added at once: `qkv + (a·[A_t ...])·B̂`, where `B̂: [r·T, 3·D]` holds
    /// `(α/r)·B_t` in third t's columns and zeros elsewhere (T adapted thirds). The same sum as
    /// [`LoraQkv::apply`] per third, as two products and one add on the fused tensor, so
    /// attention can read the heads where they are (and hand back one gradient for them).
    pub fn apply_fused(&self, a: Tensor<3>, qkv: Tensor<3>) -> Tensor<3> {
        let d = qkv.dims()[2] / 3;
        match self.factors(d) {
            Some((down, up)) => crate::ops::add(qkv, crate::ops::linear(crate::ops::linear(a, down, None), up, None)),
            None => qkv,
        }
    }

    /// The whole update of a width-`d` block's fused weight, `[A_t ...]·B̂: [D, 3·D]` (see
    /// [`LoraQkv::apply_fused`]); `None` without adapted thirds. Inference adds it to the frozen
    /// weight for each batch, [`crate::vit::Attention`].
    pub fn update(&self, d: usize) -> Option<Tensor<2>> {
        self.factors(d).map(|(down, up)| down.matmul(up))
    }

    /// `[A_t ...]: [D, r·T]` and `B̂: [r·T, 3·D]` of [`LoraQkv::apply_fused`].
    fn factors(&self, d: usize) -> Option<(Tensor<2>, Tensor<2>)> {
        let pairs: Vec<(usize, &LoraPair)> = (0..3).filter_map(|t| self.pair(t).map(|p| (t, p))).collect();
        if pairs.is_empty() {
            return None;
        }
        let down = Tensor::cat(pairs.iter().map(|(_, p)| p.a.val()).collect(), 1);
        let up = Tensor::cat(
            pairs
                .iter()
                .map(|(t, p)| {
                    let b = p.b.val().mul_scalar(self.scale);
                    let [r, _] = b.dims();
                    let device = b.device();
                    let zeros = |n: usize| Tensor::<2>::zeros([r, n], &device);
                    match t {
                        0 => Tensor::cat(vec![b, zeros(2 * d)], 1),
                        1 => Tensor::cat(vec![zeros(d), b, zeros(d)], 1),
                        _ => Tensor::cat(vec![zeros(2 * d), b], 1),
                    }
                })
                .collect(),
            0,
        );
        Some((down, up))
    }

    /// `qkv` with `(α/r)·A_t·B_t` added to the columns of each adapted third ([`LoraQkv::update`]):
    /// the same outputs as the unmerged model, as one plain `Linear` for inference.
    pub fn merge_into(&self, qkv: Linear) -> Linear {
        let w = qkv.weight.val();
        let merged = match self.update(w.dims()[0]) {
            Some(u) => w + u,
            None => w,
        };
        Linear { weight: Param::from_tensor(merged).set_require_grad(false), bias: qkv.bias }
    }
}
