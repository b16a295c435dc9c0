use super::attention::{Attention, KeepKv};
use super::block::{Block, LayerScale, Mlp};
use super::config::VitConfig;
use super::patch_embed::PatchEmbed;
use crate::tuners::ssf::{self, Ssf};
use crate::tuners::vpt::Vpt;
use burn::module::{Initializer, Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, Tensor};

/// timm's `VisionTransformer` (class-token pooling), backend-agnostic.
#[derive(Module, Debug)]
pub struct Vit {
    /// Patch embedding.
    pub patch_embed: PatchEmbed,
    /// Class token `[1, 1, D]`.
    pub cls_token: Param<Tensor<3>>,
    /// Position embeddings `[1, N, D]` for this model's input size (resampled at load time).
    pub pos_embed: Param<Tensor<3>>,
    /// The transformer blocks.
    pub blocks: Vec<Block>,
    /// Final LayerNorm.
    pub norm: LayerNorm,
    /// Optional classification head on the normalised class token.
    pub head: Option<Linear>,
    /// SSF after the patch embedding (tuner).
    pub ssf_patch: Option<Ssf>,
    /// SSF after the final LayerNorm (tuner).
    pub ssf_norm: Option<Ssf>,
    /// Visual prompts (tuner).
    pub vpt: Option<Vpt>,
}

/// Per-block outputs of one forward pass (for parity checks and feature extraction).
#[derive(Debug, Clone)]
pub struct VitTrace {
    /// Residual stream after each block, `[B, N, D]` (before the final norm).
    pub blocks: Vec<Tensor<3>>,
    /// The class token after the final norm, `[B, D]`.
    pub cls: Tensor<2>,
}

/// What the query side reads from the frozen trunk: every layer's keys/values of its normalised
/// input (`[B, H, N, Dh]` each) and the final normalised class token `[B, D]`.
#[derive(Debug, Clone)]
pub struct TrunkKv {
    /// `(K_m, V_m)` for m = 0..L-1; empty from a pass that was told not to keep them
    /// ([`Vit::trunk_pass`] with `keep_kv = false`, for a method that reads the class token only).
    pub kv: Vec<(Tensor<4>, Tensor<4>)>,
    /// `LN_final(Z_L)[:, 0]`.
    pub cls: Tensor<2>,
    /// `None`: `kv` holds the batch's keys and values. `Some(rows)`: `kv` holds a whole feature
    /// cache layer `[N, H, N_tokens, Dh]`, shared with the cache, and image `b` of the batch is
    /// its row `rows[b]` (read in place by the query side's attention, never copied).
    pub rows: Option<std::sync::Arc<Vec<usize>>>,
}

impl TrunkKv {
    /// The batch's rows of the cache layers in `kv`, where `kv` holds whole layers.
    pub fn rows(&self) -> Option<&[usize]> {
        self.rows.as_deref().map(Vec::as_slice)
    }

    /// Layer `m`'s keys and values for the batch, `[B, H, N, Dh]` each (gathered from the whole
    /// cache layer where [`TrunkKv::rows()`] is set, and widened to f32 from an f16 cache).
    pub fn layer(&self, m: usize) -> (Tensor<4>, Tensor<4>) {
        let (k, v) = self.kv[m].clone();
        let f32 = |t: Tensor<4>| if t.dtype() == burn::tensor::DType::F32 { t } else { t.cast(burn::tensor::FloatDType::F32) };
        match self.rows() {
            None => (k, v),
            Some(rows) => {
                let (k, v) = super::attention::gather_rows(k, v, rows);
                (f32(k), f32(v))
            }
        }
    }
}

/// Randomness inside the frozen trunk, for reproducing the official recipes ("faithful" mode,
/// methods.md §8). Applied only in training, on non-autodiff tensors, so the trunk stays off the
/// tape; any non-zero value makes the trunk differ every step, which rules out the feature cache.
#[derive(Module, Debug, Default, PartialEq)]
pub struct TrunkNoise {
    /// Dropout on the embedded tokens (CLS + patches + pos); the official VQT code leaves it
    /// active at 0.1.
    pub embed_dropout: f64,
    /// Maximum stochastic depth on the trunk's residual branches, linearly spaced over the blocks
    /// (`r_max·i/(L−1)`); the official SynQT recipe uses 0.1.
    pub drop_path: f64,
}

impl TrunkNoise {
    /// True when the trunk is deterministic (the feature cache is valid).
    pub fn is_off(&self) -> bool {
        self.embed_dropout == 0.0 && self.drop_path == 0.0
    }
}

/// `x ⊙ Bernoulli(1−p) / (1−p)` with the mask shape `mask_shape` (broadcast over x).
fn random_keep<const D: usize>(x: Tensor<D>, p: f64, mask_shape: [usize; D]) -> Tensor<D> {
    if p <= 0.0 {
        return x;
    }
    let keep = 1.0 - p;
    let mask = Tensor::<D>::random(mask_shape, burn::tensor::Distribution::Bernoulli(keep), &x.device());
    x * mask.mul_scalar(1.0 / keep)
}

impl VitConfig {
    /// A randomly initialised ViT (timm-like inits: trunc-normal-ish position/class tokens,
    /// PyTorch default Linear/conv inits). Real use loads a checkpoint over it.
    pub fn init(&self, device: &Device) -> Vit {
        let d = self.embed_dim;
        let ln = || LayerNormConfig::new(d).with_epsilon(self.layer_norm_eps).init(device);
        let small = Initializer::Normal { mean: 0.0, std: 0.02 };
        let blocks = (0..self.depth)
            .map(|_| {
                let ls = |v: f64| LayerScale { gamma: Initializer::Constant { value: v }.init([d], device) };
                Block {
                    norm1: ln(),
                    attn: Attention {
                        qkv: LinearConfig::new(d, 3 * d).with_bias(self.qkv_bias).init(device),
                        proj: LinearConfig::new(d, d).init(device),
                        num_heads: self.num_heads,
                        lora: None,
                        ssf_qkv: None,
                        ssf_proj: None,
                    },
                    ls1: self.layer_scale_init.map(ls),
                    norm2: ln(),
                    mlp: Mlp {
                        fc1: LinearConfig::new(d, self.mlp_hidden()).init(device),
                        fc2: LinearConfig::new(self.mlp_hidden(), d).init(device),
                        ssf_fc1: None,
                        ssf_fc2: None,
                    },
                    ls2: self.layer_scale_init.map(ls),
                    ssf_norm1: None,
                    ssf_norm2: None,
                    adaptformer: None,
                    adapter_attn: None,
                    adapter_mlp: None,
                }
            })
            .collect();
        let vit = Vit {
            patch_embed: PatchEmbed::new(self.in_chans, d, self.patch_size, device),
            cls_token: small.init([1, 1, d], device),
            pos_embed: small.init([1, self.num_tokens(), d], device),
            blocks,
            norm: ln(),
            head: (self.num_classes > 0).then(|| LinearConfig::new(d, self.num_classes).init(device)),
            ssf_patch: None,
            ssf_norm: None,
            vpt: None,
        };
        crate::materialize(&vit);
        vit
    }
}

impl Vit {
    /// Token width D.
    pub fn embed_dim(&self) -> usize {
        self.cls_token.dims()[2]
    }

    /// Number of blocks L.
    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// Tokens N = 1 + G² this model was built for.
    pub fn num_tokens(&self) -> usize {
        self.pos_embed.dims()[1]
    }

    /// `[B, C, H, W]` -> `[CLS ; patches] + pos`, `[B, N, D]` (with VPT: `[CLS ; prompts ;
    /// patches]`, prompts without position embedding).
    pub fn embed(&self, images: Tensor<4>) -> Tensor<3> {
        let patches = ssf::maybe(&self.ssf_patch, self.patch_embed.forward(images));
        let [b, n, d] = patches.dims();
        assert_eq!(
            n + 1,
            self.num_tokens(),
            "input gives {n} patches but the position embeddings cover {}: build the model for this image size",
            self.num_tokens() - 1
        );
        let cls = self.cls_token.val().expand([b, 1, d]);
        let z = Tensor::cat(vec![cls, patches], 1) + self.pos_embed.val();
        match &self.vpt {
            Some(v) if v.at_embedding() => v.insert(z),
            _ => z,
        }
    }

    /// Whatever happens to the residual stream before block `m` (deep VPT swaps its prompts).
    pub fn before_block(&self, m: usize, z: Tensor<3>) -> Tensor<3> {
        match &self.vpt {
            Some(v) => v.before_block(m, z),
            None => z,
        }
    }

    /// Runs every block over the embedded tokens, calling `each(m, z_in, block)` which returns
    /// the block's output.
    fn run_blocks(&self, z: Tensor<3>, mut each: impl FnMut(usize, &Block, Tensor<3>) -> Tensor<3>) -> Tensor<3> {
        self.blocks.iter().enumerate().fold(z, |z, (m, b)| each(m, b, self.before_block(m, z)))
    }

    /// Normalised class token `[B, D]` of the final residual stream.
    pub fn pool(&self, z: Tensor<3>) -> Tensor<2> {
        let [b, _, d] = z.dims();
        ssf::maybe(&self.ssf_norm, crate::ops::norm(&self.norm, z.narrow(1, 0, 1))).reshape([b, d])
    }

    /// The class-token feature `LN_final(Z_L)[:, 0]`, `[B, D]`.
    pub fn forward_features(&self, images: Tensor<4>) -> Tensor<2> {
        let z = self.run_blocks(self.embed(images), |_, b, z| b.forward(z));
        self.pool(z)
    }

    /// Logits of the classification head. Panics if the model was built without a head.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let head = self.head.as_ref().expect("Vit::forward needs a head (num_classes > 0)");
        crate::ops::apply(head, self.forward_features(images))
    }

    /// Every block's output and the final class token.
    pub fn forward_trace(&self, images: Tensor<4>) -> VitTrace {
        let mut blocks = Vec::with_capacity(self.blocks.len());
        let z = self.run_blocks(self.embed(images), |_, b, z| {
            let z = b.forward(z);
            blocks.push(z.clone());
            z
        });
        VitTrace { blocks, cls: self.pool(z) }
    }

    /// The trunk pass the query side needs: each layer's K/V and the final class token.
    /// Run it on non-autodiff tensors (`model.valid()`, `images.without_autodiff()`) so no tape
    /// is recorded.
    pub fn forward_kv(&self, images: Tensor<4>) -> TrunkKv {
        self.trunk_pass(images, TrunkNoise::default(), 0, true)
    }

    /// The class token `LN_final(Z_L)[:, 0]` and, per block m, the output `[B, Q, D]` of the
    /// query tokens `queries(m, B)` passed through it ([`Block::query_forward`] over block m's
    /// keys and values), with the queries riding along as the last Q rows of the stream
    /// ([`Block::forward_riding`]): no keys or values are copied out or kept, and each block's
    /// queries are written over the previous block's in place. For inference (no autodiff):
    /// training keeps the trunk off the tape and the queries on it, so it runs
    /// [`Vit::forward_kv`] and the query side apart.
    pub fn forward_with_queries(&self, images: Tensor<4>, mut queries: impl FnMut(usize, usize) -> Tensor<3>) -> (Tensor<2>, Vec<Tensor<3>>) {
        let mut x = self.embed(images);
        let [b, _, d] = x.dims();
        let mut outs = Vec::with_capacity(self.blocks.len());
        for (m, block) in self.blocks.iter().enumerate() {
            let p = queries(m, b);
            let q = p.dims()[1];
            x = if m == 0 {
                Tensor::cat(vec![x, p], 1)
            } else {
                let rows = x.dims()[1];
                x.slice_assign([0..b, rows - q..rows, 0..d], p)
            };
            x = self.before_block(m, x);
            let keys = x.dims()[1] - q;
            x = block.forward_riding(x, keys);
            // A copy of the query rows (a view would keep `x` shared, and the next block's
            // queries could then not be written over it in place).
            let rows = Tensor::<1, burn::tensor::Int>::arange(keys as i64..(keys + q) as i64, &x.device());
            outs.push(x.clone().select(1, rows));
        }
        (self.pool(x), outs)
    }

    /// [`Vit::forward_kv`] with training-time trunk randomness (embedding dropout, per-sample
    /// drop-path on each block's two residual branches). Identical to `forward_kv` when
    /// `noise.is_off()`.
    pub fn forward_kv_noisy(&self, images: Tensor<4>, noise: TrunkNoise) -> TrunkKv {
        self.trunk_pass(images, noise, 0, true)
    }

    /// [`Vit::forward_kv_noisy`] with the embedding and the first `prefix` blocks run off the
    /// autodiff tape: on this backbone's plain (non-autodiff) tensors, as the trunk path runs
    /// the whole trunk. For a tuned backbone whose tuners sit in blocks `prefix..` only
    /// (`tuners.layers`), the outputs and gradients equal those of the whole pass on the tape,
    /// while the tape (and training memory) grows with the tuned depth only. The prefix's K/V
    /// are plain tensors (constants for the query side). `prefix = 0`: the whole pass on the
    /// tape.
    pub fn forward_kv_split(&self, images: Tensor<4>, noise: TrunkNoise, prefix: usize) -> TrunkKv {
        self.trunk_pass(images, noise, prefix, true)
    }

    /// [`Vit::forward_kv_split`], keeping each layer's keys and values only when `keep_kv`
    /// (otherwise [`TrunkKv::kv`] is empty): a method that reads the class token alone (the
    /// linear head) leaves them out, so no block copies them out of its fused projection and
    /// none is held until the loss.
    pub fn trunk_pass(&self, images: Tensor<4>, noise: TrunkNoise, prefix: usize, keep_kv: bool) -> TrunkKv {
        let mut kv = Vec::with_capacity(self.blocks.len());
        let mut keep = |_: usize, k: Tensor<4>, v: Tensor<4>| kv.push((k, v));
        let cls = self.pass(images, noise, prefix, KeepKv::Copies, if keep_kv { Some(&mut keep) } else { None });
        TrunkKv { kv, cls, rows: None }
    }

    /// [`Vit::trunk_pass`] handing each layer's keys and values to `each(m, K_m, V_m)` as soon
    /// as block m has produced them, instead of keeping them all to the end: a query side run
    /// layer by layer holds one layer's keys and values at a time (VQT's training step,
    /// [`crate::TrunkModel`]). They come as `keep` says: [`KeepKv::Views`] of each block's
    /// fused projection spares the copies where `each` does not keep them. Returns the class
    /// token `LN_final(Z_L)[:, 0]`.
    pub fn trunk_pass_each(&self, images: Tensor<4>, noise: TrunkNoise, prefix: usize, keep: KeepKv, each: &mut dyn FnMut(usize, Tensor<4>, Tensor<4>)) -> Tensor<2> {
        self.pass(images, noise, prefix, keep, Some(each))
    }

    fn pass(&self, images: Tensor<4>, noise: TrunkNoise, prefix: usize, keep: KeepKv, mut each: Option<&mut dyn FnMut(usize, Tensor<4>, Tensor<4>)>) -> Tensor<2> {
        let depth = self.blocks.len();
        let prefix = prefix.min(depth);
        if prefix == 0 || !self.cls_token.device().is_autodiff() {
            let z = self.embed_noisy(images, &noise);
            return self.pool(self.kv_blocks(z, 0..depth, depth, &noise, keep, each));
        }
        // Only what the prefix reads, without autodiff (cheap: the parameters are shared).
        let head = Vit {
            patch_embed: self.patch_embed.clone(),
            cls_token: self.cls_token.clone(),
            pos_embed: self.pos_embed.clone(),
            blocks: self.blocks[..prefix].to_vec(),
            norm: self.norm.clone(),
            head: None,
            ssf_patch: self.ssf_patch.clone(),
            ssf_norm: None,
            vpt: self.vpt.clone(),
        }
        .valid();
        let z = head.embed_noisy(images.without_autodiff(), &noise);
        let z = head.kv_blocks(z, 0..prefix, depth, &noise, keep, each.as_mut().map(|f| &mut **f as &mut dyn FnMut(usize, Tensor<4>, Tensor<4>)));
        // Back onto the tape for the tuned blocks (a model in eval, already plain, stays plain).
        let z = if self.cls_token.device().is_autodiff() { z.autodiff() } else { z };
        self.pool(self.kv_blocks(z, prefix..depth, depth, &noise, keep, each))
    }

    /// The embedding, with the trunk's embedding dropout when `noise` has it.
    fn embed_noisy(&self, images: Tensor<4>, noise: &TrunkNoise) -> Tensor<3> {
        let z = self.embed(images);
        let [b, n, d] = z.dims();
        random_keep(z, noise.embed_dropout, [b, n, d])
    }

    /// Blocks `range` (the prefix backbone of [`Vit::forward_kv_split`] holds only its blocks),
    /// handing each block's K/V to `kv(m, K, V)`; the drop-path rate of block m is
    /// `drop_path · m / (L − 1)` with L = `full_depth`. Without `kv` the keys and values are
    /// neither kept nor copied.
    fn kv_blocks(&self, z: Tensor<3>, range: std::ops::Range<usize>, full_depth: usize, noise: &TrunkNoise, keep: KeepKv, mut kv: Option<&mut dyn FnMut(usize, Tensor<4>, Tensor<4>)>) -> Tensor<3> {
        range.fold(z, |z, m| {
            let blk = &self.blocks[m];
            let z = self.before_block(m, z);
            if noise.is_off() {
                return match kv.as_deref_mut() {
                    Some(kv) => {
                        let (next, k, v) = blk.forward_kv(z, keep);
                        kv(m, k, v);
                        next
                    }
                    None => blk.forward(z),
                };
            }
            let [b, _, _] = z.dims();
            let rate = if full_depth > 1 { noise.drop_path * m as f64 / (full_depth - 1) as f64 } else { 0.0 };
            let a = blk.norm1_out(z.clone());
            let o = match kv.as_deref_mut() {
                Some(kv) => {
                    let (o, k, v) = blk.attn.forward_kv(a, keep);
                    kv(m, k, v);
                    o
                }
                None => blk.attn.forward(a),
            };
            let z = z + random_keep(blk.attn_out(o), rate, [b, 1, 1]);
            z.clone() + random_keep(blk.mlp_branch(z), rate, [b, 1, 1])
        })
    }
}
