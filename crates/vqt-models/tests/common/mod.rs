//! Shared fixtures of the vqt-models integration tests: a tiny ViT shape (with LayerScale),
//! random images and cyclic class targets.

use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use vqt_models::VitConfig;

pub const CLASSES: usize = 4;

pub fn tiny() -> VitConfig {
    VitConfig {
        img_size: 16,
        patch_size: 4,
        in_chans: 3,
        embed_dim: 24,
        depth: 3,
        num_heads: 3,
        mlp_ratio: 2.0,
        qkv_bias: true,
        layer_norm_eps: 1e-6,
        layer_scale_init: Some(0.5),
        num_classes: 0,
    }
}

pub fn images(device: &Device, n: usize, seed: u64) -> Tensor<4> {
    device.seed(seed);
    Tensor::random([n, 3, 16, 16], Distribution::Normal(0.0, 1.0), device)
}

pub fn targets(n: usize, device: &Device) -> Tensor<1, Int> {
    let t: Vec<i64> = (0..n as i64).map(|i| i % CLASSES as i64).collect();
    Tensor::from_data(TensorData::new(t, [n]), device)
}
