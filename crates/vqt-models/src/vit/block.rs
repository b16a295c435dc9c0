use super::attention::{Attention, KeepKv};
use crate::tuners::adapter::{self, BottleneckAdapter};
use crate::tuners::adaptformer::AdaptFormer;
use crate::tuners::ssf::{self, Ssf};
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
    /// SSF after fc1, before the GELU (tuner).
    pub ssf_fc1: Option<Ssf>,
    /// SSF after fc2 (tuner).
    pub ssf_fc2: Option<Ssf>,
}

impl Mlp {
    /// Applies the MLP per token.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = gelu(ssf::maybe(&self.ssf_fc1, crate::ops::apply(&self.fc1, x)));
        ssf::maybe(&self.ssf_fc2, crate::ops::apply(&self.fc2, h))
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
    /// SSF after LN1 (tuner).
    pub ssf_norm1: Option<Ssf>,
    /// SSF after LN2 (tuner).
    pub ssf_norm2: Option<Ssf>,
    /// AdaptFormer's parallel adapter beside the MLP (tuner).
    pub adaptformer: Option<AdaptFormer>,
    /// Serial adapter on the attention branch output (Houlsby).
    pub adapter_attn: Option<BottleneckAdapter>,
    /// Serial adapter on the MLP branch output (Houlsby, Pfeiffer).
    pub adapter_mlp: Option<BottleneckAdapter>,
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
        let z = self.add_branch(z.clone(), self.attn.forward(self.norm1_out(z)), &self.ls1, &self.adapter_attn);
        self.mlp_residual(z)
    }

    /// `z` plus a residual branch's output `o` after its LayerScale and serial adapter (those
    /// present): with LayerScale and no adapter one fused `z + o ⊙ γ` ([`crate::ops::add_scaled`]).
    fn add_branch(&self, z: Tensor<3>, o: Tensor<3>, ls: &Option<LayerScale>, serial: &Option<BottleneckAdapter>) -> Tensor<3> {
        match (ls, serial) {
            (Some(ls), None) => crate::ops::add_scaled(z, o, ls.gamma.val()),
            _ => crate::ops::add(z, adapter::maybe(serial, scale(ls, o))),
        }
    }

    /// `u` plus [`Block::mlp_branch`]`(u)`, with the LayerScale'd MLP output added by
    /// [`Block::add_branch`] and AdaptFormer's parallel branch added after it.
    fn mlp_residual(&self, u: Tensor<3>) -> Tensor<3> {
        let h = self.mlp_out(u.clone());
        match &self.adaptformer {
            Some(a) => {
                let parallel = a.forward(u.clone());
                crate::ops::add(self.add_branch(u, h, &self.ls2, &self.adapter_mlp), parallel)
            }
            None => self.add_branch(u, h, &self.ls2, &self.adapter_mlp),
        }
    }

    /// `LN1(z)` (plus its SSF, if tuned): the input of the attention projections.
    pub fn norm1_out(&self, z: Tensor<3>) -> Tensor<3> {
        ssf::maybe(&self.ssf_norm1, crate::ops::norm(&self.norm1, z))
    }

    /// What the attention branch adds to the residual stream, from the projected attention
    /// output `o`: `ls1(o)`, through the Houlsby attention adapter if present.
    pub fn attn_out(&self, o: Tensor<3>) -> Tensor<3> {
        adapter::maybe(&self.adapter_attn, scale(&self.ls1, o))
    }

    /// The block's output plus the keys and values (`[B, H, N, Dh]`) of its normalised input,
    /// handed over as `keep` says.
    pub fn forward_kv(&self, z: Tensor<3>, keep: KeepKv) -> (Tensor<3>, Tensor<4>, Tensor<4>) {
        let (o, k, v) = self.attn.forward_kv(self.norm1_out(z.clone()), keep);
        let z = self.add_branch(z, o, &self.ls1, &self.adapter_attn);
        (self.mlp_residual(z), k, v)
    }

    /// `MLP(LN2(u))` (with LN2's SSF, if tuned), before the LayerScale and the adapters.
    fn mlp_out(&self, u: Tensor<3>) -> Tensor<3> {
        self.mlp.forward(ssf::maybe(&self.ssf_norm2, crate::ops::norm(&self.norm2, u)))
    }

    /// Everything the second half of the block adds to `u`: `ls2(MLP(LN2(u)))` (through the
    /// serial MLP adapter if present) plus AdaptFormer's parallel branch if present. For any
    /// tokens, trunk or query.
    pub fn mlp_branch(&self, u: Tensor<3>) -> Tensor<3> {
        let m = scale(&self.ls2, self.mlp_out(u.clone()));
        let m = adapter::maybe(&self.adapter_mlp, m);
        match &self.adaptformer {
            Some(a) => crate::ops::add(m, a.forward(u)),
            None => m,
        }
    }

    /// The attention residual branch for query tokens `p: [B, Q, D]` that read given trunk
    /// keys/values and are not keys themselves: `ls1(proj(softmax(q(LN1 p)·Kᵀ/√Dh)·V))`.
    /// With `rows`, `k` and `v` are the feature cache's whole layer and image `b` reads row
    /// `rows[b]` ([`TrunkKv::rows`](crate::vit::TrunkKv)).
    pub fn query_attn_branch(&self, p: Tensor<3>, k: Tensor<4>, v: Tensor<4>, rows: Option<&[usize]>) -> Tensor<3> {
        self.attn_out(self.attn.cross(self.norm1_out(p), k, v, rows))
    }

    /// The block over tokens `x: [B, N, D]` whose first `keys` rows are the residual stream
    /// and whose last rows are query tokens riding along (inference): every row attends to the
    /// first `keys` rows only, so those rows come out exactly as from [`Block::forward`] over
    /// them alone (to rounding) and the query rows as from [`Block::query_forward`] over this
    /// layer's keys and values, from one set of products instead of a second, small one.
    pub fn forward_riding(&self, x: Tensor<3>, keys: usize) -> Tensor<3> {
        let o = self.attn.forward_keys(self.norm1_out(x.clone()), keys);
        self.mlp_residual(self.add_branch(x, o, &self.ls1, &self.adapter_attn))
    }

    /// Query tokens through this block (VQT): they attend only to the trunk keys/values `k, v`
    /// of this layer, then take both residuals and the MLP like any token (with every per-token
    /// tuner of the block, methods.md §6).
    pub fn query_forward(&self, p: Tensor<3>, k: Tensor<4>, v: Tensor<4>, rows: Option<&[usize]>) -> Tensor<3> {
        let u = self.add_branch(p.clone(), self.attn.cross(self.norm1_out(p), k, v, rows), &self.ls1, &self.adapter_attn);
        self.mlp_residual(u)
    }
}
