//! Visual Query Tuning (Tu et al., CVPR 2023), on the trunk path.
//!
//! Per layer m, Q learnable queries `P[m]` pass the frozen block m: they attend only to that
//! layer's class+patch keys/values (never to each other), take both residuals and the MLP, and
//! leave the residual stream. The head reads the L2-normalised groups
//! `[LN_final(Z_L)[:,0], flat(out[0]), …, flat(out[L−1])]` (methods.md §3).
//!
//! The trunk keys/values come from [`Vit::forward_kv`] run without autodiff; this module only
//! ever puts queries, their outputs and the head on the tape.

use crate::head::{feature_scores, group_lasso, select_columns, select_top};
use crate::vit::{TrunkKv, Vit};
use burn::module::{Initializer, Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// VQT hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqtConfig {
    /// Queries per layer Q (the demo uses 1, 10 or 20 per task).
    pub num_queries: usize,
    /// Dropout on the query tokens in training (official code: 0.1).
    #[serde(default = "default_query_dropout")]
    pub query_dropout: f64,
}

fn default_query_dropout() -> f64 {
    0.1
}

impl VqtConfig {
    /// Range checks; the error names the key (`method.<field>`).
    pub fn validate(&self) -> Result<(), String> {
        if self.num_queries == 0 {
            return Err("method.num_queries must be at least 1".into());
        }
        crate::check::probability("method.query_dropout", self.query_dropout)
    }
}

/// Learnable queries plus the concat-L2 linear head.
#[derive(Module, Debug)]
pub struct Vqt {
    /// Queries `[L, Q, D]`.
    pub queries: Param<Tensor<3>>,
    /// Linear head `F -> C` with `F = D·(1 + L·Q)`.
    pub head: Linear,
    /// Query dropout (train only).
    pub dropout: Dropout,
    /// Head2Toe selection: the head reads only these feature indices (stage B and after).
    pub selection: Option<Vec<usize>>,
    /// Group-lasso weight λ added to the loss (stage A, "compress"); 0 otherwise.
    pub lasso: f64,
}

/// `v / max(‖v‖₂, eps)` along dim 1 of `[B, F]`.
pub fn l2_normalize(v: Tensor<2>, eps: f64) -> Tensor<2> {
    let norm = v.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(eps);
    v / norm
}

impl VqtConfig {
    /// Head input width `F = D·(1 + L·Q)`.
    pub fn feature_dim(&self, depth: usize, embed_dim: usize) -> usize {
        embed_dim * (1 + depth * self.num_queries)
    }

    /// Fresh queries (`U(−a, a)`, `a = √(6/(3p² + D))`, the VPT prompt init) and head
    /// (`W ~ N(0, √(2/C))`, `b = −ln 99`), as the official code initialises them.
    pub fn init(&self, depth: usize, embed_dim: usize, patch_size: usize, num_classes: usize, device: &Device) -> Vqt {
        let a = (6.0 / (3.0 * (patch_size * patch_size) as f64 + embed_dim as f64)).sqrt();
        let queries = Initializer::Uniform { min: -a, max: a }.init([depth, self.num_queries, embed_dim], device);
        let head = vqt_head(self.feature_dim(depth, embed_dim), num_classes, device);
        Vqt { queries, head, dropout: DropoutConfig::new(self.query_dropout).init(), selection: None, lasso: 0.0 }
    }
}

/// The official VQT head init: `W ~ N(0, √(2/C))` (kaiming-normal, fan_out), `b = −ln 99`.
pub fn vqt_head(features: usize, num_classes: usize, device: &Device) -> Linear {
    let head = LinearConfig::new(features, num_classes)
        .with_initializer(Initializer::Normal { mean: 0.0, std: (2.0 / num_classes as f64).sqrt() })
        .init(device);
    Linear { bias: Some(Initializer::Constant { value: -(99f64).ln() }.init([num_classes], device)), ..head }
}

impl Vqt {
    /// Queries per layer Q.
    pub fn num_queries(&self) -> usize {
        self.queries.dims()[1]
    }

    /// Each layer's query outputs `[B, Q, D]` (not normalised), given the trunk's K/V.
    pub fn query_outputs(&self, backbone: &Vit, trunk: &TrunkKv) -> Vec<Tensor<3>> {
        let depth = self.queries.dims()[0];
        assert_eq!(depth, backbone.depth(), "VQT has {depth} query sets for a {}-block backbone", backbone.depth());
        let b = trunk.cls.dims()[0];
        (0..depth).map(|m| self.query_output(backbone, m, b, trunk.kv[m].0.clone(), trunk.kv[m].1.clone(), trunk.rows())).collect()
    }

    /// Layer m's query outputs `[B, Q, D]` for a batch of `b` images, given its keys and values
    /// (the rows `rows` of them where given, [`TrunkKv::rows`]).
    pub fn query_output(&self, backbone: &Vit, m: usize, b: usize, k: Tensor<4>, v: Tensor<4>, rows: Option<&[usize]>) -> Tensor<3> {
        backbone.blocks[m].query_forward(self.layer_queries(m, b), k, v, rows)
    }

    /// Layer m's queries for a batch of `b` images, `[B, Q, D]`, through the query dropout.
    fn layer_queries(&self, m: usize, b: usize) -> Tensor<3> {
        let [_, q, d] = self.queries.dims();
        crate::ops::dropout(&self.dropout, self.queries.val().narrow(0, m, 1).expand([b, q, d]))
    }

    /// Logits of `images` with the query side of each layer run as soon as the trunk's block
    /// has produced its keys and values ([`Vit::trunk_pass_each`]), which are dropped then:
    /// the same logits as [`Vqt::forward`] over [`Vit::trunk_pass`], holding one layer's keys
    /// and values at a time (training on the trunk path; the attention's backward keeps
    /// gradient maps instead of them where smaller, [`crate::ops::flex_attention`]).
    pub fn forward_streaming(&self, backbone: &Vit, images: Tensor<4>, noise: crate::vit::TrunkNoise) -> Tensor<2> {
        let depth = self.queries.dims()[0];
        assert_eq!(depth, backbone.depth(), "VQT has {depth} query sets for a {}-block backbone", backbone.depth());
        let [b, q, d] = [images.dims()[0], self.queries.dims()[1], self.queries.dims()[2]];
        // Where the attention keeps gradient maps (at least the backbone's own tokens as keys),
        // nothing holds the keys and values after their layer: views of each block's fused
        // projection then spare the copies; otherwise the attention keeps them, as copies.
        let dh = d / backbone.blocks.first().map_or(1, |b| b.attn.num_heads);
        let views = crate::ops::attention_keeps_maps(q, backbone.num_tokens(), dh, dh);
        let keep = if views { crate::vit::KeepKv::Views } else { crate::vit::KeepKv::Copies };
        let mut outs = Vec::with_capacity(depth);
        let cls = backbone.trunk_pass_each(images, noise, 0, keep, &mut |m, k, v| outs.push(self.query_output(backbone, m, b, k, v, None)));
        self.logits(cls, &outs)
    }

    /// The head's input: L2-normalised groups `[cls, flat(out[0]), …]`, `[B, F]`.
    pub fn features(cls: Tensor<2>, outs: &[Tensor<3>]) -> Tensor<2> {
        let mut groups = vec![l2_normalize(cls, 1e-12)];
        for o in outs {
            let [b, q, d] = o.dims();
            groups.push(l2_normalize(o.clone().reshape([b, q * d]), 1e-12));
        }
        Tensor::cat(groups, 1)
    }

    /// Logits from the trunk's K/V and class token.
    pub fn forward(&self, backbone: &Vit, trunk: &TrunkKv) -> Tensor<2> {
        let outs = self.query_outputs(backbone, trunk);
        self.logits(trunk.cls.clone(), &outs)
    }

    /// Logits of `images` with the queries riding along in the trunk's products
    /// ([`Vit::forward_with_queries`]): the same function as [`Vqt::forward`] over
    /// [`Vit::forward_kv`] (to rounding), without copying out or keeping any layer's keys and
    /// values. Inference only: on an autodiff device the queries' gradients would run back
    /// through the trunk's products.
    pub fn forward_images(&self, backbone: &Vit, images: Tensor<4>) -> Tensor<2> {
        let depth = self.queries.dims()[0];
        assert_eq!(depth, backbone.depth(), "VQT has {depth} query sets for a {}-block backbone", backbone.depth());
        let (cls, outs) = backbone.forward_with_queries(images, |m, b| self.layer_queries(m, b));
        self.logits(cls, &outs)
    }

    /// The head over the class token and the query outputs (through the selection, if any).
    fn logits(&self, cls: Tensor<2>, outs: &[Tensor<3>]) -> Tensor<2> {
        let feats = Self::features(cls, outs);
        let feats = match &self.selection {
            Some(ids) => select_columns(feats, ids),
            None => feats,
        };
        crate::ops::apply(&self.head, feats)
    }

    /// `λ·Σ_j ‖W_j‖₂` in the compress stage, `None` otherwise.
    pub fn penalty(&self) -> Option<Tensor<1>> {
        (self.lasso > 0.0).then(|| group_lasso(self.head.weight.val(), 1e-12).mul_scalar(self.lasso))
    }

    /// Stage A ("compress"): this trained VQT with its head discarded, a fresh head of the same
    /// init, frozen queries (query dropout stays active, as in the official code) and the
    /// group-lasso weight `lambda` (official: 1e-4).
    pub fn into_compress_stage(self, lambda: f64) -> Self {
        let [f, c] = self.head.weight.dims();
        let device = self.queries.device();
        Vqt { queries: self.queries.set_require_grad(false), head: vqt_head(f, c, &device), selection: None, lasso: lambda, ..self }
    }

    /// Stage B ("featselect"): keeps the `int(F·keep)` features with the largest stage-A row
    /// norms (highest first) and trains a fresh head on them, without penalty.
    pub fn into_featselect_stage(self, keep: f64) -> Result<Self, String> {
        if self.selection.is_some() {
            return Err("feature selection was already applied".into());
        }
        let ids = select_top(&feature_scores(self.head.weight.val()), keep)?;
        self.into_selected(ids)
    }

    /// The stage-B model for a given selection (feature indices into the full head input, as
    /// stage B chose them): frozen queries, a fresh head `Linear(ids.len(), C)`, no penalty.
    /// [`Self::into_featselect_stage`] ends here; evaluation rebuilds a saved run with it.
    pub fn into_selected(self, ids: Vec<usize>) -> Result<Self, String> {
        if self.selection.is_some() {
            return Err("feature selection was already applied".into());
        }
        let [f, c] = self.head.weight.dims();
        if ids.is_empty() {
            return Err("the feature selection is empty".into());
        }
        if let Some(bad) = ids.iter().find(|&&i| i >= f) {
            return Err(format!("feature index {bad} is out of range for a head of {f} features"));
        }
        let device = self.queries.device();
        let head = vqt_head(ids.len(), c, &device);
        Ok(Vqt { queries: self.queries.set_require_grad(false), head, selection: Some(ids), lasso: 0.0, ..self })
    }
}
