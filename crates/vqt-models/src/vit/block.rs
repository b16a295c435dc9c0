use super::attention::Attention;
use burn::module::{Module, Param};
use burn::nn::{LayerNorm, Linear};
use crate::ops::gelu;
use burn::tensor::Tensor;

/// Per-channel scale of a residual branch (DINOv2's `ls1`/`ls2`, HF's `layer_scale.lambda1`).
#[derive(Module, Debug)]
pub struct LayerScale {
    /// The trained per-channel vector `[D]`.
    pub gamma: Param<Tensor<1>>,
}

impl LayerScale {
    /// `x ⊙ γ` on the last dimension.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        x * self.gamma.val().unsqueeze::<3>()
    }
}

/// The transformer MLP: `fc2(GELU(fc1(x)))` with the exact (erf) GELU.
#[derive(Module, Debug)]
pub struct Mlp {
    /// `Linear(D, hidden)`.
    pub fc1: Linear,
    /// `Linear(hidden, D)`.
    pub fc2: Linear,
}

impl Mlp {
    /// Applies the MLP per token.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.fc2.forward(gelu(self.fc1.forward(x)))
    }
}

/// A pre-norm ViT block: `Z += ls1(attn(LN1(Z)))`, then `Z += ls2(MLP(LN2(Z)))`.
#[derive(Module, Debug)]
pub struct Block {
    /// LN before attention.
    pub norm1: LayerNorm,
    /// Multi-head self-attention.
    pub attn: Attention,
    /// Optional LayerScale of the attention branch.
    pub ls1: Option<LayerScale>,
    /// LN before the MLP.
    pub norm2: LayerNorm,
    /// The MLP.
    pub mlp: Mlp,
    /// Optional LayerScale of the MLP branch.
    pub ls2: Option<LayerScale>,
}

fn scale(ls: &Option<LayerScale>, x: Tensor<3>) -> Tensor<3> {
    match ls {
        Some(ls) => ls.forward(x),
        None => x,
    }
}

impl Block {
    /// The block applied to the residual stream `z: [B, N, D]`.
    pub fn forward(&self, z: Tensor<3>) -> Tensor<3> {
        self.forward_kv(z).0
    }

    /// The block's output plus the keys and values (`[B, H, N, Dh]`) of its normalised input.
    pub fn forward_kv(&self, z: Tensor<3>) -> (Tensor<3>, Tensor<4>, Tensor<4>) {
        let (o, k, v) = self.attn.forward_kv(self.norm1.forward(z.clone()));
        let z = z + scale(&self.ls1, o);
        let z = z.clone() + self.mlp_branch(z);
        (z, k, v)
    }

    /// `ls2(MLP(LN2(u)))`: the MLP residual branch for any tokens.
    pub fn mlp_branch(&self, u: Tensor<3>) -> Tensor<3> {
        scale(&self.ls2, self.mlp.forward(self.norm2.forward(u)))
    }

    /// The attention residual branch for query tokens `p: [B, Q, D]` that read given trunk
    /// keys/values and are not keys themselves: `ls1(proj(softmax(q(LN1 p)·Kᵀ/√Dh)·V))`.
    pub fn query_attn_branch(&self, p: Tensor<3>, k: Tensor<4>, v: Tensor<4>) -> Tensor<3> {
        scale(&self.ls1, self.attn.cross(self.norm1.forward(p), k, v))
    }

    /// Query tokens through this frozen block (VQT): they attend only to the trunk keys/values
    /// `k, v` of this layer, then take both residuals and the MLP like any token.
    pub fn query_forward(&self, p: Tensor<3>, k: Tensor<4>, v: Tensor<4>) -> Tensor<3> {
        let u = p.clone() + self.query_attn_branch(p, k, v);
        u.clone() + self.mlp_branch(u)
    }
}
