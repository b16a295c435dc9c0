use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::{Device, Tensor};

/// Non-overlapping p×p patches -> D-dim tokens: a p×p conv with stride p, flattened row-major.
#[derive(Module, Debug)]
pub struct PatchEmbed {
    /// Conv weight `[D, C, p, p]` (PyTorch layout), bias `[D]`.
    pub proj: Conv2d,
}

impl PatchEmbed {
    /// A randomly initialised patch embedding (PyTorch's default conv init).
    pub fn new(in_chans: usize, embed_dim: usize, patch_size: usize, device: &Device) -> Self {
        let proj = Conv2dConfig::new([in_chans, embed_dim], [patch_size, patch_size])
            .with_stride([patch_size, patch_size])
            .init(device);
        Self { proj }
    }

    /// `[B, C, H, W]` -> `[B, (H/p)·(W/p), D]`, patches in row-major order.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<3> {
        let x = self.proj.forward(images); // [B, D, Gh, Gw]
        let [b, d, gh, gw] = x.dims();
        x.reshape([b, d, gh * gw]).swap_dims(1, 2)
    }
}
