use super::attention::Attention;
use super::block::{Block, LayerScale, Mlp};
use super::config::VitConfig;
use super::patch_embed::PatchEmbed;
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
    /// `(K_m, V_m)` for m = 0..L-1.
    pub kv: Vec<(Tensor<4>, Tensor<4>)>,
    /// `LN_final(Z_L)[:, 0]`.
    pub cls: Tensor<2>,
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
                    },
                    ls1: self.layer_scale_init.map(ls),
                    norm2: ln(),
                    mlp: Mlp {
                        fc1: LinearConfig::new(d, self.mlp_hidden()).init(device),
                        fc2: LinearConfig::new(self.mlp_hidden(), d).init(device),
                    },
                    ls2: self.layer_scale_init.map(ls),
                }
            })
            .collect();
        Vit {
            patch_embed: PatchEmbed::new(self.in_chans, d, self.patch_size, device),
            cls_token: small.init([1, 1, d], device),
            pos_embed: small.init([1, self.num_tokens(), d], device),
            blocks,
            norm: ln(),
            head: (self.num_classes > 0).then(|| LinearConfig::new(d, self.num_classes).init(device)),
        }
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

    /// `[B, C, H, W]` -> `[CLS ; patches] + pos`, `[B, N, D]`.
    pub fn embed(&self, images: Tensor<4>) -> Tensor<3> {
        let patches = self.patch_embed.forward(images);
        let [b, n, d] = patches.dims();
        assert_eq!(
            n + 1,
            self.num_tokens(),
            "input gives {n} patches but the position embeddings cover {}: build the model for this image size",
            self.num_tokens() - 1
        );
        let cls = self.cls_token.val().expand([b, 1, d]);
        Tensor::cat(vec![cls, patches], 1) + self.pos_embed.val()
    }

    /// Normalised class token `[B, D]` of the final residual stream.
    pub fn pool(&self, z: Tensor<3>) -> Tensor<2> {
        let [b, _, d] = z.dims();
        self.norm.forward(z.narrow(1, 0, 1)).reshape([b, d])
    }

    /// The class-token feature `LN_final(Z_L)[:, 0]`, `[B, D]`.
    pub fn forward_features(&self, images: Tensor<4>) -> Tensor<2> {
        let z = self.blocks.iter().fold(self.embed(images), |z, b| b.forward(z));
        self.pool(z)
    }

    /// Logits of the classification head. Panics if the model was built without a head.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let head = self.head.as_ref().expect("Vit::forward needs a head (num_classes > 0)");
        head.forward(self.forward_features(images))
    }

    /// Every block's output and the final class token.
    pub fn forward_trace(&self, images: Tensor<4>) -> VitTrace {
        let mut z = self.embed(images);
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            z = b.forward(z);
            blocks.push(z.clone());
        }
        VitTrace { blocks, cls: self.pool(z) }
    }

    /// The trunk pass the query side needs: each layer's K/V and the final class token.
    /// Run it on non-autodiff tensors (`model.valid()`, `images.without_autodiff()`) so no tape
    /// is recorded.
    pub fn forward_kv(&self, images: Tensor<4>) -> TrunkKv {
        let mut z = self.embed(images);
        let mut kv = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let (next, k, v) = b.forward_kv(z);
            kv.push((k, v));
            z = next;
        }
        TrunkKv { kv, cls: self.pool(z) }
    }
}
