//! SynQT: disentangled, synthesized query tuning (Zhang et al., ECCV 2024), on the trunk path.
//!
//! Per layer i, a query-synthesis module (QSM: bottleneck projection, single-head self-attention
//! over the T query tokens, FFN, learnable scales, chained with the previous layer's output)
//! produces `Ĥ_i`; the frozen block i then reads the trunk's K/V with these queries only
//! (knowledge extraction, KEM), giving `F_att`, `F_ffn` and `H_i`. An instance-conditioned head
//! pools `[H_L, H_1..H_L, F_att_1..L, F_ffn_1..L]` (methods.md §4). Layer structure, inits and
//! dropout sites follow the official `synqt.py`; its dead parameters (`pre_norm`, the unused
//! 37-vector) are not built, so our count is 18,469 lower for ViT-B/16.

use crate::drop_path::DropPath;
use crate::vit::{TrunkKv, Vit};
use burn::module::{Initializer, Module, Param};
use burn::nn::{Dropout, DropoutConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use crate::ops::gelu;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// SynQT hyper-parameters (per-task values in methods.md §4.5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynqtConfig {
    /// Query tokens per layer T (1, 4 or 16 in the official configs).
    pub num_tokens: usize,
    /// Chaining scale s (shared by all layers).
    pub feat_scale: f64,
    /// QSM attention-branch scale ξ (per-layer parameter, this init).
    pub attn_scale: f64,
    /// QSM FFN-branch scale ζ (per-layer parameter, this init).
    pub ffn_scale: f64,
    /// Dropout inside the QSM, on `Ĥ` and in the head (official: 0.1).
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// Drop-path on the head's tokens 1.. (official: 0.3).
    #[serde(default = "default_head_drop_path")]
    pub head_drop_path: f64,
    /// Maximum drop-path on the query stream through the frozen blocks, linearly spaced over the
    /// layers (official faithful mode: 0.1; 0 for the deterministic/cached mode).
    #[serde(default)]
    pub kem_drop_path: f64,
}

fn default_dropout() -> f64 {
    0.1
}

impl SynqtConfig {
    /// Range checks; the error names the key (`method.<field>`).
    pub fn validate(&self) -> Result<(), String> {
        use crate::check::{finite, probability};
        if self.num_tokens == 0 {
            return Err("method.num_tokens must be at least 1".into());
        }
        finite("method.feat_scale", self.feat_scale)?;
        finite("method.attn_scale", self.attn_scale)?;
        finite("method.ffn_scale", self.ffn_scale)?;
        probability("method.dropout", self.dropout)?;
        probability("method.head_drop_path", self.head_drop_path)?;
        probability("method.kem_drop_path", self.kem_drop_path)
    }
}
fn default_head_drop_path() -> f64 {
    0.3
}

/// `x + drop(fc2(drop(GELU(fc1(x)))))`: the residual bottleneck ("Adapter") SynQT uses everywhere.
#[derive(Module, Debug)]
pub struct Bottleneck {
    /// `Linear(D, h)`.
    pub fc1: Linear,
    /// `Linear(h, D)`.
    pub fc2: Linear,
    /// Dropout after the activation and after fc2.
    pub drop: Dropout,
}

impl Bottleneck {
    fn new(d: usize, hidden: usize, drop: f64, device: &Device) -> Self {
        // PyTorch's default Linear init: U(±1/√fan_in) for weight and bias (burn's default matches).
        Self {
            fc1: LinearConfig::new(d, hidden).init(device),
            fc2: LinearConfig::new(hidden, d).init(device),
            drop: DropoutConfig::new(drop).init(),
        }
    }

    /// Applies the bottleneck with its residual.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = crate::ops::dropout(&self.drop, gelu(crate::ops::apply(&self.fc1, x.clone())));
        x + crate::ops::dropout(&self.drop, crate::ops::apply(&self.fc2, h))
    }
}

/// Single-head self-attention over the T query tokens, with bottleneck q/k/v/out projections.
#[derive(Module, Debug)]
pub struct QsmAttention {
    /// LN on the query path.
    pub q_norm: LayerNorm,
    /// LN on the key/value path.
    pub kv_norm: LayerNorm,
    /// q projection, `Bn(8)`.
    pub q_proj: Bottleneck,
    /// k projection, `Bn(8)`.
    pub k_proj: Bottleneck,
    /// v projection, `Bn(8)`.
    pub v_proj: Bottleneck,
    /// Output projection, `Bn(8)`.
    pub proj: Bottleneck,
    /// Dropout on the attention matrix.
    pub attn_drop: Dropout,
    /// Dropout on the output.
    pub proj_drop: Dropout,
}

impl QsmAttention {
    /// `proj_drop(proj(attn_drop(softmax(q·kᵀ/√D))·v))`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let d = x.dims()[2];
        let q = self.q_proj.forward(crate::ops::norm(&self.q_norm, x.clone()));
        let kv_in = crate::ops::norm(&self.kv_norm, x);
        let k = self.k_proj.forward(kv_in.clone());
        let v = self.v_proj.forward(kv_in);
        let attn = softmax(q.matmul(k.swap_dims(1, 2)).mul_scalar(1.0 / (d as f64).sqrt()), 2);
        crate::ops::dropout(&self.proj_drop, self.proj.forward(crate::ops::dropout(&self.attn_drop, attn).matmul(v)))
    }
}

/// One QSM block: `z += ξ·attn(LN_a z)`, then `z += ζ·Bn48(LN_b z)`.
#[derive(Module, Debug)]
pub struct QsmBlock {
    /// Attention branch.
    pub attn: QsmAttention,
    /// FFN branch, `Bn(48)` with its own residual.
    pub mlp: Bottleneck,
    /// `LN_a`.
    pub norm1: LayerNorm,
    /// `LN_b`.
    pub norm2: LayerNorm,
    /// ξ, shape `[1]`.
    pub attn_scale: Param<Tensor<1>>,
    /// ζ, shape `[1]`.
    pub ffn_scale: Param<Tensor<1>>,
}

impl QsmBlock {
    /// Applies the block.
    pub fn forward(&self, z: Tensor<3>) -> Tensor<3> {
        let xi = self.attn_scale.val().unsqueeze::<3>();
        let zeta = self.ffn_scale.val().unsqueeze::<3>();
        let z = z.clone() + self.attn.forward(crate::ops::norm(&self.norm1, z)) * xi;
        z.clone() + self.mlp.forward(crate::ops::norm(&self.norm2, z)) * zeta
    }
}

/// The instance-conditioned head (official `SynQT.forward` + `ConditionCombineBlock` +
/// `head_norm` + classifier).
#[derive(Module, Debug)]
pub struct SynqtHead {
    /// `LN_out`, shared by all tokens.
    pub out_norm: LayerNorm,
    /// `Bn(48)`, shared by all tokens.
    pub mlp: Bottleneck,
    /// Drop-path on tokens 1.. .
    pub drop_path: DropPath,
    /// Token weights from token 0: `Linear(D, n_tokens − 1)`.
    pub get_weight: Linear,
    /// Dropout after GELU in the weight path.
    pub weight_drop: Dropout,
    /// `LN_head` (eps 1e-5), initialised from the backbone's final norm.
    pub head_norm: LayerNorm,
    /// Classifier `Linear(D, C)`.
    pub classifier: Linear,
}

impl SynqtHead {
    /// `tokens: [B, n, D]` -> logits `[B, C]`.
    pub fn forward(&self, tokens: Tensor<3>) -> Tensor<2> {
        let [b, n, d] = tokens.dims();
        let h = tokens.clone() + self.mlp.forward(crate::ops::norm(&self.out_norm, tokens));
        let h0 = h.clone().narrow(1, 0, 1);
        let rest = self.drop_path.forward(h.narrow(1, 1, n - 1));
        let h = Tensor::cat(vec![h0.clone(), rest], 1);
        let w = crate::ops::dropout(&self.weight_drop, gelu(crate::ops::apply(&self.get_weight, h0.reshape([b, d])))).tanh();
        let ones = Tensor::<2>::ones([b, 1], &w.device());
        let w = Tensor::cat(vec![ones, w], 1).reshape([b, n, 1]);
        let f = (h * w).mean_dim(1).reshape([b, d]);
        crate::ops::apply(&self.classifier, crate::ops::norm(&self.head_norm, f))
    }
}

/// Learnable SynQT parameters.
#[derive(Module, Debug)]
pub struct Synqt {
    /// Per-layer prompts `P_i`, `[L, T, D]`, init U(−1, 1).
    pub prompts: Param<Tensor<3>>,
    /// Per-layer projection `Bn(48, 0.1)`.
    pub prompt_ffn: Vec<Bottleneck>,
    /// Per-layer QSM blocks.
    pub qsm_block: Vec<QsmBlock>,
    /// Dropout producing `Ĥ`.
    pub prompt_drop: Dropout,
    /// Chaining scale s, `[1]`.
    pub feat_scale: Param<Tensor<1>>,
    /// Per-layer drop-path on the query stream through the frozen blocks.
    pub kem_drop_path: Vec<DropPath>,
    /// The head.
    pub head: SynqtHead,
}

/// Every intermediate of a SynQT forward pass (for parity checks and analysis).
#[derive(Debug, Clone)]
pub struct SynqtTrace {
    /// `Ĥ_i`, `[B, T, D]`.
    pub h_hat: Vec<Tensor<3>>,
    /// `F_att_i` (token-mean if T > 1), `[B, 1 or T, D]`.
    pub f_att: Vec<Tensor<3>>,
    /// `F_ffn_i` (token-mean if T > 1).
    pub f_ffn: Vec<Tensor<3>>,
    /// `H_i` (token-mean if T > 1).
    pub h: Vec<Tensor<3>>,
    /// Logits `[B, C]`.
    pub logits: Tensor<2>,
}

impl SynqtConfig {
    /// Fresh SynQT for `backbone`. The head norm copies the backbone's final-norm affine.
    pub fn init(&self, backbone: &Vit, num_classes: usize, device: &Device) -> Synqt {
        let (depth, d) = (backbone.depth(), backbone.embed_dim());
        let ln = || LayerNormConfig::new(d).init(device); // SynQT's own norms: eps 1e-5
        let scalar = |v: f64| Initializer::Constant { value: v }.init([1], device);
        let qsm = |_| QsmBlock {
            attn: QsmAttention {
                q_norm: ln(),
                kv_norm: ln(),
                q_proj: Bottleneck::new(d, 8, 0.0, device),
                k_proj: Bottleneck::new(d, 8, 0.0, device),
                v_proj: Bottleneck::new(d, 8, 0.0, device),
                proj: Bottleneck::new(d, 8, 0.0, device),
                attn_drop: DropoutConfig::new(self.dropout).init(),
                proj_drop: DropoutConfig::new(self.dropout).init(),
            },
            mlp: Bottleneck::new(d, 48, self.dropout, device),
            norm1: ln(),
            norm2: ln(),
            attn_scale: scalar(self.attn_scale),
            ffn_scale: scalar(self.ffn_scale),
        };
        let n_tokens = 1 + 3 * depth;
        let mut head_norm = ln();
        head_norm.gamma = Param::from_tensor(backbone.norm.gamma.val().to_device(device));
        head_norm.beta = backbone.norm.beta.as_ref().map(|b| Param::from_tensor(b.val().to_device(device)));
        let rate = |i: usize| if depth > 1 { self.kem_drop_path * i as f64 / (depth - 1) as f64 } else { 0.0 };
        Synqt {
            prompts: Initializer::Uniform { min: -1.0, max: 1.0 }.init([depth, self.num_tokens, d], device),
            prompt_ffn: (0..depth).map(|_| Bottleneck::new(d, 48, self.dropout, device)).collect(),
            qsm_block: (0..depth).map(qsm).collect(),
            prompt_drop: DropoutConfig::new(self.dropout).init(),
            feat_scale: scalar(self.feat_scale),
            kem_drop_path: (0..depth).map(|i| DropPath::new(rate(i))).collect(),
            head: SynqtHead {
                out_norm: ln(),
                mlp: Bottleneck::new(d, 48, self.dropout, device),
                drop_path: DropPath::new(self.head_drop_path),
                get_weight: LinearConfig::new(d, n_tokens - 1).init(device),
                weight_drop: DropoutConfig::new(self.dropout).init(),
                head_norm,
                classifier: LinearConfig::new(d, num_classes).init(device),
            },
        }
    }
}

impl Synqt {
    /// Runs the query stream over the trunk's K/V and returns every intermediate.
    pub fn forward_trace(&self, backbone: &Vit, trunk: &TrunkKv) -> SynqtTrace {
        let [depth, t, d] = self.prompts.dims();
        assert_eq!(depth, backbone.depth(), "SynQT has {depth} prompt sets for a {}-block backbone", backbone.depth());
        let b = trunk.cls.dims()[0];
        let s = self.feat_scale.val().unsqueeze::<3>();
        let mut tr = SynqtTrace { h_hat: vec![], f_att: vec![], f_ffn: vec![], h: vec![], logits: trunk.cls.clone() };
        for (i, (block, (k, v))) in backbone.blocks.iter().zip(&trunk.kv).enumerate() {
            let mut prompt = self.prompts.val().narrow(0, i, 1).expand([b, t, d]);
            if let Some(prev) = tr.h.last() {
                prompt = prompt + prev.clone() * s.clone();
            }
            let z = self.qsm_block[i].forward(self.prompt_ffn[i].forward(prompt));
            let h_hat = crate::ops::dropout(&self.prompt_drop, z);
            let dp = &self.kem_drop_path[i];
            let f_att = dp.forward(block.query_attn_branch(h_hat.clone(), k.clone(), v.clone(), trunk.rows()));
            let p = h_hat.clone() + f_att.clone();
            let f_ffn = dp.forward(block.mlp_branch(p.clone()));
            let h = p + f_ffn.clone();
            let pool = |x: Tensor<3>| if t > 1 { x.mean_dim(1) } else { x };
            tr.h_hat.push(h_hat);
            tr.f_att.push(pool(f_att));
            tr.f_ffn.push(pool(f_ffn));
            tr.h.push(pool(h));
        }
        let mut tokens = vec![tr.h.last().expect("at least one layer").clone()];
        tokens.extend(tr.h.iter().cloned());
        tokens.extend(tr.f_att.iter().cloned());
        tokens.extend(tr.f_ffn.iter().cloned());
        let tokens = Tensor::cat(tokens, 1);
        tr.logits = self.head.forward(tokens);
        tr
    }

    /// Logits from the trunk's K/V.
    pub fn forward(&self, backbone: &Vit, trunk: &TrunkKv) -> Tensor<2> {
        self.forward_trace(backbone, trunk).logits
    }
}

/// A mutable view of one SynQT parameter, for name-based import/export.
pub enum ParamSlot<'a> {
    /// Rank-1 tensor (biases, norms, scales).
    Vector(&'a mut Param<Tensor<1>>),
    /// A Linear weight: stored `[in, out]` here, `[out, in]` in PyTorch files.
    LinearWeight(&'a mut Param<Tensor<2>>),
    /// Rank-3 tensor (the prompts).
    Rank3(&'a mut Param<Tensor<3>>),
}

fn linear_slots<'a>(prefix: &str, l: &'a mut Linear, out: &mut Vec<(String, ParamSlot<'a>)>) {
    out.push((format!("{prefix}.weight"), ParamSlot::LinearWeight(&mut l.weight)));
    if let Some(b) = l.bias.as_mut() {
        out.push((format!("{prefix}.bias"), ParamSlot::Vector(b)));
    }
}

fn norm_slots<'a>(prefix: &str, n: &'a mut LayerNorm, out: &mut Vec<(String, ParamSlot<'a>)>) {
    out.push((format!("{prefix}.weight"), ParamSlot::Vector(&mut n.gamma)));
    if let Some(b) = n.beta.as_mut() {
        out.push((format!("{prefix}.bias"), ParamSlot::Vector(b)));
    }
}

fn bottleneck_slots<'a>(prefix: &str, b: &'a mut Bottleneck, out: &mut Vec<(String, ParamSlot<'a>)>) {
    linear_slots(&format!("{prefix}.mlp.fc1"), &mut b.fc1, out);
    linear_slots(&format!("{prefix}.mlp.fc2"), &mut b.fc2, out);
}

impl Synqt {
    /// Every trainable tensor under the official code's parameter name (`synqt.q`,
    /// `synqt.qsm_block.{i}.attn.q_proj.mlp.fc1.weight`, …, `head.weight`).
    pub fn official_slots(&mut self) -> Vec<(String, ParamSlot<'_>)> {
        let mut out = vec![("synqt.q".to_string(), ParamSlot::Rank3(&mut self.prompts))];
        out.push(("synqt.feat_scale".into(), ParamSlot::Vector(&mut self.feat_scale)));
        for (i, b) in self.prompt_ffn.iter_mut().enumerate() {
            bottleneck_slots(&format!("synqt.prompt_ffn.{i}"), b, &mut out);
        }
        for (i, q) in self.qsm_block.iter_mut().enumerate() {
            let p = format!("synqt.qsm_block.{i}");
            out.push((format!("{p}.attn_scale"), ParamSlot::Vector(&mut q.attn_scale)));
            out.push((format!("{p}.ffn_scale"), ParamSlot::Vector(&mut q.ffn_scale)));
            norm_slots(&format!("{p}.attn.q_norm"), &mut q.attn.q_norm, &mut out);
            norm_slots(&format!("{p}.attn.kv_norm"), &mut q.attn.kv_norm, &mut out);
            for (name, b) in [
                ("q_proj", &mut q.attn.q_proj),
                ("k_proj", &mut q.attn.k_proj),
                ("v_proj", &mut q.attn.v_proj),
                ("proj", &mut q.attn.proj),
            ] {
                bottleneck_slots(&format!("{p}.attn.{name}"), b, &mut out);
            }
            bottleneck_slots(&format!("{p}.mlp"), &mut q.mlp, &mut out);
            norm_slots(&format!("{p}.norm1"), &mut q.norm1, &mut out);
            norm_slots(&format!("{p}.norm2"), &mut q.norm2, &mut out);
        }
        let h = &mut self.head;
        bottleneck_slots("synqt.mlp", &mut h.mlp, &mut out);
        norm_slots("synqt.out_norm", &mut h.out_norm, &mut out);
        linear_slots("synqt.out_combine.get_weight.fc1", &mut h.get_weight, &mut out);
        norm_slots("synqt.head_norm", &mut h.head_norm, &mut out);
        linear_slots("head", &mut h.classifier, &mut out);
        out
    }

    /// Loads tensors named as in the official code (PyTorch layouts). The official code's dead
    /// parameters (`synqt.pre_norm.*`, `synqt.out_combine.weight`) are accepted and ignored;
    /// anything else missing, extra or mis-shaped is an error naming the key.
    pub fn load_official(mut self, tensors: &std::collections::BTreeMap<String, vqt_core::HostTensor>) -> Result<Self, String> {
        let device = self.prompts.device();
        let mut used = std::collections::BTreeSet::new();
        for (name, slot) in self.official_slots() {
            let t = tensors.get(&name).ok_or_else(|| format!("missing tensor `{name}`"))?;
            used.insert(name.clone());
            let shape_err = |want: Vec<usize>| format!("tensor `{name}` has shape {:?}, the model needs {want:?}", t.shape);
            match slot {
                ParamSlot::Vector(p) => {
                    if t.shape != p.dims() {
                        return Err(shape_err(p.dims().to_vec()));
                    }
                    *p = Param::from_tensor(t.to_tensor::<1>(&device));
                }
                ParamSlot::LinearWeight(p) => {
                    let [i, o] = p.dims();
                    if t.shape != [o, i] {
                        return Err(shape_err(vec![o, i]));
                    }
                    *p = Param::from_tensor(t.transpose2().to_tensor::<2>(&device));
                }
                ParamSlot::Rank3(p) => {
                    if t.shape != p.dims() {
                        return Err(shape_err(p.dims().to_vec()));
                    }
                    *p = Param::from_tensor(t.to_tensor::<3>(&device));
                }
            }
        }
        let dead = |k: &str| k.starts_with("synqt.pre_norm.") || k == "synqt.out_combine.weight";
        if let Some(extra) = tensors.keys().find(|k| !used.contains(*k) && !dead(k)) {
            return Err(format!("unexpected tensor `{extra}`"));
        }
        Ok(self)
    }
}
