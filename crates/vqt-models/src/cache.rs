//! The feature cache: with a deterministic frozen trunk, every image's trunk outputs are the same
//! every epoch, so they are computed once and training reads them back.
//!
//! * `kv`: per layer, the keys and values of the block's normalised input (`2·N·D` floats per
//!   layer per image) plus the final class token. Training does no trunk work at all.
//! * `hidden`: per layer, the block's input hidden state (`N·D`, half the bytes); each batch
//!   recomputes `LN1` and the K/V projections (2·N·D² MACs per layer) without autodiff.
//!
//! Storage is f32 or f16 (halving memory again; values are rounded once, then widened to f32).

use crate::vit::{TrunkKv, Vit};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

/// What the cache stores per layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheKind {
    /// Keys and values of each block's normalised input.
    Kv,
    /// Each block's input hidden state.
    Hidden,
}

/// Element type of the stored features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheDtype {
    /// 4 bytes per value, exact.
    F32,
    /// 2 bytes per value, rounded to half precision.
    F16,
}

#[derive(Debug)]
enum Store {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
}

impl Store {
    fn new(dtype: CacheDtype) -> Self {
        match dtype {
            CacheDtype::F32 => Store::F32(Vec::new()),
            CacheDtype::F16 => Store::F16(Vec::new()),
        }
    }

    fn extend(&mut self, values: &[f32]) {
        match self {
            Store::F32(v) => v.extend_from_slice(values),
            Store::F16(v) => v.extend(values.iter().map(|&x| half::f16::from_f32(x))),
        }
    }

    fn gather(&self, rows: &[usize], row_len: usize, out: &mut Vec<f32>) {
        for &r in rows {
            let range = r * row_len..(r + 1) * row_len;
            match self {
                Store::F32(v) => out.extend_from_slice(&v[range]),
                Store::F16(v) => out.extend(v[range].iter().map(|x| x.to_f32())),
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Store::F32(v) => v.len() * 4,
            Store::F16(v) => v.len() * 2,
        }
    }
}

/// Trunk outputs of a whole dataset, in host memory, indexed by dataset position.
#[derive(Debug)]
pub struct FeatureCache {
    kind: CacheKind,
    dtype: CacheDtype,
    len: usize,
    heads: usize,
    tokens: usize,
    dim: usize,
    /// Per layer: keys `[len, H, N, Dh]` (kv) or hidden states `[len, N, D]` (hidden).
    layers: Vec<Store>,
    /// Per layer: values `[len, H, N, Dh]` (kv only; empty for hidden).
    values: Vec<Store>,
    /// `[len, D]`.
    cls: Store,
}

fn host(t: Tensor<3>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 tensor data")
}

fn host4(t: Tensor<4>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 tensor data")
}

impl FeatureCache {
    /// Runs the frozen trunk over `batches` (images `[B, C, H, W]`, any device; run without
    /// autodiff) and stores the outputs in order. `progress` is called with each batch's size.
    pub fn build(
        vit: &Vit,
        batches: impl IntoIterator<Item = Tensor<4>>,
        kind: CacheKind,
        dtype: CacheDtype,
        mut progress: impl FnMut(usize),
    ) -> Self {
        let depth = vit.depth();
        let (tokens, dim) = (vit.num_tokens(), vit.embed_dim());
        let heads = vit.blocks.first().map(|b| b.attn.num_heads).unwrap_or(1);
        let mut cache = FeatureCache {
            kind,
            dtype,
            len: 0,
            heads,
            tokens,
            dim,
            layers: (0..depth).map(|_| Store::new(dtype)).collect(),
            values: (0..if kind == CacheKind::Kv { depth } else { 0 }).map(|_| Store::new(dtype)).collect(),
            cls: Store::new(dtype),
        };
        for images in batches {
            let images = images.without_autodiff();
            let b = images.dims()[0];
            let mut z = vit.embed(images);
            for (m, block) in vit.blocks.iter().enumerate() {
                match kind {
                    CacheKind::Hidden => {
                        cache.layers[m].extend(&host(z.clone()));
                        z = block.forward(z);
                    }
                    CacheKind::Kv => {
                        // Stored in the [B, H, N, Dh] layout attention reads, so a batch is
                        // one contiguous upload per tensor.
                        let (next, k, v) = block.forward_kv(z);
                        cache.layers[m].extend(&host4(k));
                        cache.values[m].extend(&host4(v));
                        z = next;
                    }
                }
            }
            cache.cls.extend(&host(vit.pool(z).unsqueeze_dim::<3>(1)));
            cache.len += b;
            progress(b);
        }
        cache
    }

    /// Number of cached images.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What is stored.
    pub fn kind(&self) -> CacheKind {
        self.kind
    }

    /// Storage element type.
    pub fn dtype(&self) -> CacheDtype {
        self.dtype
    }

    /// Host bytes held.
    pub fn bytes(&self) -> usize {
        self.layers.iter().chain(&self.values).map(Store::bytes).sum::<usize>() + self.cls.bytes()
    }

    /// The trunk outputs of dataset rows `rows`, as plain (non-autodiff) tensors on `device`.
    /// For `hidden` caches, K/V are recomputed from the stored states with `vit`'s frozen blocks.
    pub fn batch(&self, vit: &Vit, rows: &[usize], device: &Device) -> TrunkKv {
        assert!(rows.iter().all(|&r| r < self.len), "cache row out of range");
        let device = device.clone().without_autodiff();
        let (b, n, d, h) = (rows.len(), self.tokens, self.dim, self.heads);
        let upload = |store: &Store| {
            let mut buf = Vec::with_capacity(b * n * d);
            store.gather(rows, n * d, &mut buf);
            Tensor::<4>::from_data(TensorData::new(buf, [b, h, n, d / h]), &device)
        };
        let kv = self
            .layers
            .iter()
            .enumerate()
            .zip(&vit.blocks)
            .map(|((m, store), block)| match self.kind {
                CacheKind::Kv => (upload(store), upload(&self.values[m])),
                CacheKind::Hidden => {
                    let mut buf = Vec::with_capacity(b * n * d);
                    store.gather(rows, n * d, &mut buf);
                    let z = Tensor::<3>::from_data(TensorData::new(buf, [b, n, d]), &device);
                    block.attn.kv(block.norm1.forward(z))
                }
            })
            .collect();
        let mut cls = Vec::with_capacity(b * d);
        self.cls.gather(rows, d, &mut cls);
        TrunkKv { kv, cls: Tensor::from_data(TensorData::new(cls, [b, d]), &device) }
    }
}
