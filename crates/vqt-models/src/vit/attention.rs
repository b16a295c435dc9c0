use crate::tuners::lora::LoraQkv;
use crate::tuners::ssf::{self, Ssf};
use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::softmax;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::Tensor;

/// timm's multi-head self-attention with a fused qkv projection.
///
/// `qkv.weight` is `[D, 3D]` (Burn's `[in, out]` layout): columns `[0, D)` produce q, `[D, 2D)` k
/// and `[2D, 3D)` v; inside each third, head h owns columns `h·Dh .. (h+1)·Dh`.
#[derive(Module, Debug)]
pub struct Attention {
    /// Fused q/k/v projection, `Linear(D, 3D)`.
    pub qkv: Linear,
    /// Output projection, `Linear(D, D)`.
    pub proj: Linear,
    /// Number of heads H.
    pub num_heads: usize,
    /// LoRA on the fused projection (tuner; `None` in the plain backbone).
    pub lora: Option<LoraQkv>,
    /// SSF after the fused qkv output, `3D` wide (tuner).
    pub ssf_qkv: Option<Ssf>,
    /// SSF after the output projection (tuner).
    pub ssf_proj: Option<Ssf>,
}

/// How a self-attention hands over its keys and values (`[B, H, N, Dh]` each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepKv {
    /// As copies out of the fused projection (held alone, without its query third).
    Copies,
    /// As views of the fused projection where the backend allows (plain Flex f32,
    /// [`crate::ops::flex_kv_views`]), else copies: no copy, but a holder holds the whole
    /// projection. For a consumer that is done with them at once.
    Views,
}

/// `[B, N, D]` -> `[B, H, N, Dh]`.
pub fn split_heads(x: Tensor<3>, num_heads: usize) -> Tensor<4> {
    let [b, n, d] = x.dims();
    x.reshape([b, n, num_heads, d / num_heads]).swap_dims(1, 2)
}

/// `[B, H, N, Dh]` -> `[B, N, D]`.
pub fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [b, h, n, dh] = x.dims();
    x.swap_dims(1, 2).reshape([b, n, h * dh])
}

impl Attention {
    /// Token width D.
    pub fn width(&self) -> usize {
        self.proj.weight.dims()[0]
    }

    /// Columns `[start, start+len)` of the fused projection applied to `a`.
    fn project_part(&self, a: Tensor<3>, start: usize, len: usize) -> Tensor<3> {
        let w = self.qkv.weight.val().narrow(1, start, len);
        let b = self.qkv.bias.as_ref().map(|b| b.val().narrow(0, start, len));
        crate::ops::linear(a, w, b)
    }

    /// Third `part` (0 = q, 1 = k, 2 = v) of the fused projection `out` of tokens `a`, with the
    /// tuners that act on it: LoRA's low-rank update, then SSF's scale-shift.
    fn tune_part(&self, part: usize, a: &Tensor<3>, out: Tensor<3>) -> Tensor<3> {
        let out = match &self.lora {
            Some(l) => l.apply(part, a.clone(), out),
            None => out,
        };
        match &self.ssf_qkv {
            Some(s) => s.forward_part(out, part * self.width()),
            None => out,
        }
    }

    /// The fused projection of tokens `a` with the tuners that act on it (LoRA's low-rank
    /// update of its thirds, then SSF's scale-shift over its whole width): `[B, N, 3·D]`.
    ///
    /// Without autodiff (inference) LoRA's update is added to the frozen weight for the call
    /// (`W + [A_t ...]·B̂`, a `[D, 3·D]` product of rank r·T): one product of the tokens, as a
    /// merged model runs ([`crate::Vit::merge_lora`]), instead of two thin ones and an add over
    /// the whole fused output; the same outputs to rounding.
    fn fused(&self, a: Tensor<3>) -> Tensor<3> {
        let update = match &self.lora {
            Some(l) if !a.device().is_autodiff() => l.update(self.width()),
            _ => None,
        };
        let qkv = match (update, &self.lora) {
            (Some(u), _) => crate::ops::linear(a, self.qkv.weight.val() + u, self.qkv.bias.as_ref().map(|b| b.val())),
            (None, Some(l)) => l.apply_fused(a.clone(), crate::ops::apply(&self.qkv, a)),
            (None, None) => crate::ops::apply(&self.qkv, a),
        };
        ssf::maybe(&self.ssf_qkv, qkv)
    }

    /// q, k, v of the (already normalised) tokens `a: [B, N, D]`, each `[B, H, N, Dh]`.
    pub fn qkv(&self, a: Tensor<3>) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        self.split(self.fused(a))
    }

    /// timm's split of a fused output `[B, N, 3·D]`: `[B, N, 3, H, Dh]` -> `[3, B, H, N, Dh]`
    /// (views), then one copy per part into a contiguous `[B, H, N, Dh]`.
    fn split(&self, qkv: Tensor<3>) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let n = qkv.dims()[1];
        let [q, k, v] = self.split_parts(qkv, [true; 3], n);
        (q.expect("asked"), k.expect("asked"), v.expect("asked"))
    }

    /// The parts of [`Attention::split`] that `want` names (q, k, v), each copied only then;
    /// the keys and values only of the first `keys` rows.
    fn split_parts(&self, qkv: Tensor<3>, want: [bool; 3], keys: usize) -> [Option<Tensor<4>>; 3] {
        let [b, n, width] = qkv.dims();
        let (h, dh) = (self.num_heads, width / (3 * self.num_heads));
        let parts = qkv.reshape([b, n, 3, h, dh]).permute([2, 0, 3, 1, 4]);
        [0, 1, 2].map(|i| {
            let rows = if i == 0 { n } else { keys };
            want[i].then(|| parts.clone().narrow(0, i, 1).narrow(3, 0, rows).reshape([b, h, rows, dh]))
        })
    }

    /// The attention output (heads merged, before the output projection) of a fused
    /// projection `qkv: [B, N, 3·D]` (tuners applied) whose first `keys` rows are the keys and
    /// values (`N` for self-attention; fewer where query tokens ride along after the trunk's
    /// tokens, [`Attention::forward_keys`]), and those keys and values as `keep` says. On Flex
    /// in f32 the attention reads the heads of `qkv` in place
    /// ([`crate::ops::flex_attention_packed`]): nothing is copied apart for it, and under
    /// autodiff its backward returns one gradient for the fused output. Kept keys and values
    /// are copies (the query third is not held).
    fn attend_fused(&self, qkv: Tensor<3>, keys: usize, keep: Option<KeepKv>) -> (Tensor<3>, Option<(Tensor<4>, Tensor<4>)>) {
        let h = self.num_heads;
        let kv = |qkv: Tensor<3>| {
            let qkv = match keep {
                Some(KeepKv::Views) => match crate::ops::flex_kv_views(qkv, h, keys) {
                    Ok(kv) => return kv,
                    Err(qkv) => qkv,
                },
                _ => qkv,
            };
            let [_, k, v] = self.split_parts(qkv, [false, true, true], keys);
            (k.expect("asked"), v.expect("asked"))
        };
        let keep_kv = keep.is_some();
        match crate::ops::flex_attention_packed(qkv, h, keys) {
            Ok((o, qkv)) => (merge_heads(o), keep_kv.then(|| kv(qkv))),
            Err(qkv) => {
                let [q, k, v] = self.split_parts(qkv, [true; 3], keys);
                let (q, k, v) = (q.expect("asked"), k.expect("asked"), v.expect("asked"));
                let o = Self::attend(q, k.clone(), v.clone());
                (o, keep_kv.then_some((k, v)))
            }
        }
    }

    /// Only the query third of the fused projection (for query tokens that are not keys).
    pub fn q(&self, a: Tensor<3>) -> Tensor<4> {
        let q = self.tune_part(0, &a, self.project_part(a.clone(), 0, self.width()));
        split_heads(q, self.num_heads)
    }

    /// Only the key and value thirds (for trunk tokens whose queries are not needed).
    pub fn kv(&self, a: Tensor<3>) -> (Tensor<4>, Tensor<4>) {
        let d = self.width();
        let kv = self.project_part(a.clone(), d, 2 * d);
        let k = self.tune_part(1, &a, kv.clone().narrow(2, 0, d));
        let v = self.tune_part(2, &a, kv.narrow(2, d, d));
        (split_heads(k, self.num_heads), split_heads(v, self.num_heads))
    }

    /// The output projection (plus its SSF, if tuned).
    pub fn project_out(&self, o: Tensor<3>) -> Tensor<3> {
        ssf::maybe(&self.ssf_proj, crate::ops::apply(&self.proj, o))
    }

    /// `softmax(q·kᵀ/√Dh)·v` with heads merged: `[B, H, Nq, Dh]` x `[B, H, Nk, Dh]` -> `[B, Nq, D]`.
    ///
    /// On Flex in f32 (the `cpu` backend, with or without autodiff) this is
    /// [`crate::ops::attention::FastAttention`]: per (image, head) one task running both products
    /// on the strided head views (`gemm` calls from 16 query rows per head, vector loops below:
    /// VQT's queries), the softmax in place, and a backward node of its own.
    /// Elsewhere: Burn's fused `attention` op without autodiff, and under autodiff the same
    /// arithmetic composed from matmul and softmax (which is what Burn's autodiff does with
    /// `attention` anyway).
    pub fn attend(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<3> {
        let (q, k, v) = match crate::ops::flex_attention(q, k, v) {
            Ok(o) => return merge_heads(o),
            Err(qkv) => qkv,
        };
        let device = q.device();
        if !device.is_autodiff() && crate::ops::is_flex(&device) {
            return merge_heads(attention(q, k, v, None, None, AttentionModuleOptions::default()));
        }
        let dh = q.dims()[3];
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / (dh as f64).sqrt());
        merge_heads(softmax(scores, 3).matmul(v))
    }

    /// Self-attention of `a: [B, N, D]`, also returning its keys and values (copies, or views of
    /// the fused projection on Flex with [`KeepKv::Views`]).
    pub fn forward_kv(&self, a: Tensor<3>, keep: KeepKv) -> (Tensor<3>, Tensor<4>, Tensor<4>) {
        let n = a.dims()[1];
        let (o, kv) = self.attend_fused(self.fused(a), n, Some(keep));
        let (k, v) = kv.expect("kept when asked");
        (self.project_out(o), k, v)
    }

    /// Self-attention of `a: [B, N, D]` (its keys and values not needed afterwards).
    pub fn forward(&self, a: Tensor<3>) -> Tensor<3> {
        let n = a.dims()[1];
        self.forward_keys(a, n)
    }

    /// Attention of every token of `a: [B, N, D]` over the first `keys` of them only (their
    /// keys and values), through the output projection: rows after `keys` are query tokens
    /// that read the trunk's tokens without being read by them (VQT's queries riding along in
    /// the trunk's products, [`crate::vit::Block::forward_riding`]).
    pub fn forward_keys(&self, a: Tensor<3>, keys: usize) -> Tensor<3> {
        self.project_out(self.attend_fused(self.fused(a), keys, None).0)
    }

    /// [`Attention::attend`] where `rows` is given: `k, v: [N, H, Nk, ·]` hold more images than
    /// the batch (the feature cache's whole layer) and image `b` reads their row `rows[b]`. On
    /// Flex in f32 they are read in place; elsewhere the rows are gathered first.
    pub fn attend_rows(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, rows: Option<&[usize]>) -> Tensor<3> {
        let Some(rows) = rows else {
            return Self::attend(q, k, v);
        };
        match crate::ops::flex_attention_rows(q, k, v, rows) {
            Ok(o) => merge_heads(o),
            Err((q, k, v)) => {
                let (k, v) = gather_rows(k, v, rows);
                Self::attend(q, k, v)
            }
        }
    }

    /// Queries `q_tokens: [B, Q, D]` (already normalised) attending to given keys/values (the
    /// rows `rows` of them where given, [`Attention::attend_rows`]), through the output
    /// projection.
    pub fn cross(&self, q_tokens: Tensor<3>, k: Tensor<4>, v: Tensor<4>, rows: Option<&[usize]>) -> Tensor<3> {
        self.project_out(Self::attend_rows(self.q(q_tokens), k, v, rows))
    }
}

/// Rows `rows` of the leading (image) dim of `k` and `v` (a feature cache layer's batch), as new
/// tensors.
pub(crate) fn gather_rows(k: Tensor<4>, v: Tensor<4>, rows: &[usize]) -> (Tensor<4>, Tensor<4>) {
    let data = burn::tensor::TensorData::new(rows.iter().map(|&r| r as i64).collect::<Vec<_>>(), [rows.len()]);
    let idx = Tensor::<1, burn::tensor::Int>::from_data(data, &k.device());
    (k.select(0, idx.clone()), v.select(0, idx))
}
