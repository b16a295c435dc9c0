use serde::{Deserialize, Serialize};

/// Shape of a Vision Transformer. Every timm variant used here is a field, not a subclass.
///
/// Defaults are timm's for a plain ViT: qkv bias on, LayerNorm eps 1e-6, no LayerScale, MLP ratio 4.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    /// Input height and width in pixels (square). Must be a multiple of `patch_size`.
    pub img_size: usize,
    /// Patch side p (the patch embedding is a p×p conv with stride p).
    pub patch_size: usize,
    /// Input channels (3 for RGB).
    #[serde(default = "default_in_chans")]
    pub in_chans: usize,
    /// Token width D.
    pub embed_dim: usize,
    /// Number of transformer blocks L.
    pub depth: usize,
    /// Attention heads H (D must be divisible by H).
    pub num_heads: usize,
    /// MLP hidden width as a multiple of D.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Whether the fused qkv projection has a bias.
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    /// LayerNorm epsilon of every backbone norm (1e-6 for timm/JAX/DINOv2 ViTs).
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// LayerScale init value (DINOv2: 1e-5); `None` means no LayerScale.
    #[serde(default)]
    pub layer_scale_init: Option<f64>,
    /// Classes of the optional classification head on the class token; 0 means no head.
    #[serde(default)]
    pub num_classes: usize,
}

fn default_in_chans() -> usize {
    3
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_true() -> bool {
    true
}
fn default_eps() -> f64 {
    1e-6
}

/// Named backbone shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VitPreset {
    /// ViT-Ti/16 (timm `vit_tiny_patch16_224`).
    TinyPatch16,
    /// ViT-S/16 (timm `vit_small_patch16_224`).
    SmallPatch16,
    /// ViT-B/16 (timm `vit_base_patch16_224`, Google `ViT-B_16.npz`).
    BasePatch16,
    /// ViT-L/16 (timm `vit_large_patch16_224`).
    LargePatch16,
    /// ViT-H/14 (timm `vit_huge_patch14_224`).
    HugePatch14,
    /// ViT-S/14 DINOv2 (timm `vit_small_patch14_dinov2`, HF `Dinov2Model` small), native 518 px.
    SmallPatch14Dinov2,
}

impl VitPreset {
    /// Every preset with its config name.
    pub const ALL: [(&'static str, VitPreset); 6] = [
        ("vit-ti16", VitPreset::TinyPatch16),
        ("vit-s16", VitPreset::SmallPatch16),
        ("vit-b16", VitPreset::BasePatch16),
        ("vit-l16", VitPreset::LargePatch16),
        ("vit-h14", VitPreset::HugePatch14),
        ("vit-s14-dinov2", VitPreset::SmallPatch14Dinov2),
    ];

    /// Looks a preset up by name; the error lists the valid names.
    pub fn from_name(name: &str) -> Result<Self, String> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, p)| *p).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|(n, _)| *n).collect();
            format!("unknown backbone preset `{name}` (known: {})", names.join(", "))
        })
    }

    /// The preset's config at its native resolution, without a head.
    pub fn config(self) -> VitConfig {
        let (img_size, patch_size, embed_dim, depth, num_heads, ls) = match self {
            VitPreset::TinyPatch16 => (224, 16, 192, 12, 3, None),
            VitPreset::SmallPatch16 => (224, 16, 384, 12, 6, None),
            VitPreset::BasePatch16 => (224, 16, 768, 12, 12, None),
            VitPreset::LargePatch16 => (224, 16, 1024, 24, 16, None),
            VitPreset::HugePatch14 => (224, 14, 1280, 32, 16, None),
            VitPreset::SmallPatch14Dinov2 => (518, 14, 384, 12, 6, Some(1e-5)),
        };
        VitConfig {
            img_size,
            patch_size,
            in_chans: 3,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio: 4.0,
            qkv_bias: true,
            layer_norm_eps: 1e-6,
            layer_scale_init: ls,
            num_classes: 0,
        }
    }
}

impl VitConfig {
    /// Checks the invariants the model relies on; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("img_size", self.img_size),
            ("patch_size", self.patch_size),
            ("in_chans", self.in_chans),
            ("embed_dim", self.embed_dim),
            ("depth", self.depth),
            ("num_heads", self.num_heads),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("backbone.{name} must be positive"));
        }
        if self.img_size % self.patch_size != 0 {
            return Err(format!(
                "backbone.img_size {} is not a multiple of backbone.patch_size {}",
                self.img_size, self.patch_size
            ));
        }
        if self.embed_dim % self.num_heads != 0 {
            return Err(format!(
                "backbone.embed_dim {} is not divisible by backbone.num_heads {}",
                self.embed_dim, self.num_heads
            ));
        }
        if !(self.mlp_ratio > 0.0) || !self.mlp_ratio.is_finite() {
            return Err("backbone.mlp_ratio must be a positive number".into());
        }
        if !(self.layer_norm_eps > 0.0) {
            return Err("backbone.layer_norm_eps must be positive".into());
        }
        Ok(())
    }

    /// Patches per side G.
    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }

    /// Tokens N = 1 + G².
    pub fn num_tokens(&self) -> usize {
        1 + self.grid() * self.grid()
    }

    /// MLP hidden width (timm: `int(D * mlp_ratio)`).
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// Per-head width Dh.
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    /// This config at another input size (position embeddings are resampled at load time).
    pub fn with_img_size(mut self, img_size: usize) -> Self {
        self.img_size = img_size;
        self
    }

    /// This config with a classification head of `num_classes` outputs.
    pub fn with_num_classes(mut self, num_classes: usize) -> Self {
        self.num_classes = num_classes;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_named() {
        for (name, p) in VitPreset::ALL {
            assert_eq!(VitPreset::from_name(name).unwrap(), p);
            p.config().validate().unwrap();
        }
        let err = VitPreset::from_name("vit-x99").unwrap_err();
        assert!(err.starts_with("unknown backbone preset `vit-x99` (known: vit-ti16,"), "{err}");
    }

    #[test]
    fn dinov2_small_shape() {
        let c = VitPreset::SmallPatch14Dinov2.config();
        assert_eq!((c.grid(), c.num_tokens(), c.mlp_hidden(), c.head_dim()), (37, 1370, 1536, 64));
        assert_eq!(c.clone().with_img_size(224).num_tokens(), 257);
    }

    #[test]
    fn validation_names_fields() {
        let mut c = VitPreset::BasePatch16.config();
        c.img_size = 225;
        assert!(c.validate().unwrap_err().contains("backbone.img_size 225"));
        let mut c = VitPreset::BasePatch16.config();
        c.num_heads = 5;
        assert!(c.validate().unwrap_err().contains("backbone.num_heads"));
    }
}
