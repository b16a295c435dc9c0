//! The ViT exactly as timm's `VisionTransformer` builds it (pre-norm, fused qkv, exact GELU,
//! optional LayerScale, class token, learned absolute position embeddings).

mod attention;
mod block;
mod config;
pub mod load;
mod model;
mod patch_embed;
pub mod pos_embed;

pub use attention::{Attention, KeepKv, merge_heads, split_heads};
pub use block::{Block, LayerScale, Mlp};
pub use config::{VitConfig, VitPreset};
pub use load::{LoadError, LoadReport};
pub use model::{TrunkKv, TrunkNoise, Vit, VitTrace};
pub use patch_embed::PatchEmbed;
