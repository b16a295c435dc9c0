//! The canonical host-side tensor map.
//!
//! Every checkpoint reader converts its file into one [`TensorMap`]: timm `VisionTransformer`
//! naming (`blocks.{i}.attn.qkv.weight`, ...), PyTorch layouts (`Linear.weight` is `[out, in]`,
//! conv weights `[out, in, kh, kw]`), f32 values. Loading into a Burn model happens from this
//! single representation, so every format shares one validated code path.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// A dense, row-major f32 tensor on the host.
#[derive(Clone, PartialEq)]
pub struct HostTensor {
    /// Extents, outermost first.
    pub shape: Vec<usize>,
    /// Row-major values; `data.len() == shape.iter().product()`.
    pub data: Vec<f32>,
}

impl fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostTensor{:?}", self.shape)
    }
}

impl HostTensor {
    /// A tensor from its shape and values. Panics if they disagree (a programming error: readers
    /// check sizes before building tensors).
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "HostTensor shape/data mismatch");
        Self { shape, data }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The same values under another shape with the same element count.
    pub fn reshaped(mut self, shape: Vec<usize>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), self.data.len(), "reshape changes numel");
        self.shape = shape;
        self
    }

    /// Transpose of a 2-D tensor.
    pub fn transpose2(&self) -> Self {
        assert_eq!(self.shape.len(), 2, "transpose2 needs a 2-D tensor");
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut out = vec![0f32; r * c];
        for i in 0..r {
            for j in 0..c {
                out[j * r + i] = self.data[i * c + j];
            }
        }
        Self::new(vec![c, r], out)
    }

    /// General axis permutation: output axis `k` is input axis `perm[k]`.
    pub fn permute(&self, perm: &[usize]) -> Self {
        let rank = self.shape.len();
        assert_eq!(perm.len(), rank, "permute rank mismatch");
        let out_shape: Vec<usize> = perm.iter().map(|&p| self.shape[p]).collect();
        let mut in_strides = vec![1usize; rank];
        for k in (0..rank.saturating_sub(1)).rev() {
            in_strides[k] = in_strides[k + 1] * self.shape[k + 1];
        }
        let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
        let mut out = Vec::with_capacity(self.data.len());
        let mut idx = vec![0usize; rank];
        for _ in 0..self.data.len() {
            let off: usize = idx.iter().zip(&strides).map(|(i, s)| i * s).sum();
            out.push(self.data[off]);
            for k in (0..rank).rev() {
                idx[k] += 1;
                if idx[k] < out_shape[k] {
                    break;
                }
                idx[k] = 0;
            }
        }
        Self::new(out_shape, out)
    }

    /// Concatenation along axis 0 (all other extents must agree).
    pub fn cat0(parts: &[&HostTensor]) -> Self {
        let first = parts.first().expect("cat0 of nothing");
        let rest = &first.shape[1..];
        let mut rows = 0;
        let mut data = Vec::new();
        for p in parts {
            assert_eq!(&p.shape[1..], rest, "cat0 extent mismatch");
            rows += p.shape[0];
            data.extend_from_slice(&p.data);
        }
        let mut shape = vec![rows];
        shape.extend_from_slice(rest);
        Self::new(shape, data)
    }
}

/// Which file layout a checkpoint came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceNaming {
    /// timm `VisionTransformer` state dict.
    Timm,
    /// Google vit_jax / big_vision `.npz`.
    JaxNpz,
    /// HuggingFace `ViTModel` (or `ViTForImageClassification` with a `vit.` prefix).
    HfVit,
    /// HuggingFace `Dinov2Model`.
    HfDinov2,
}

/// Where a tensor map came from: enough to identify it in a run record.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Provenance {
    /// The file read.
    pub path: PathBuf,
    /// Hex sha256 of the file's bytes.
    pub sha256: String,
    /// The naming convention detected or requested.
    pub naming: SourceNaming,
    /// Source keys dropped on purpose during conversion (classification heads, pre-logits,
    /// poolers, mask tokens), as `source key -> reason`.
    pub dropped: BTreeMap<String, String>,
    /// Dtypes converted to f32 (e.g. `f16: 74 tensors`).
    pub casts: Vec<String>,
    /// Integer/boolean tensors skipped as non-weights (name -> dtype); a model that needs one of
    /// them reports its dtype instead of calling it missing.
    pub non_float: BTreeMap<String, String>,
}

/// Canonical tensors (timm naming, PyTorch layout, f32) plus where they came from.
#[derive(Clone, Debug)]
pub struct TensorMap {
    /// Tensors by timm name.
    pub tensors: BTreeMap<String, HostTensor>,
    /// Origin of the tensors.
    pub provenance: Provenance,
}

impl TensorMap {
    /// Number of leading `blocks.{i}.` indices present (0 if none).
    pub fn depth(&self) -> usize {
        let mut depth = 0;
        while self.tensors.keys().any(|k| k.starts_with(&format!("blocks.{depth}."))) {
            depth += 1;
        }
        depth
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_matches_index_arithmetic() {
        let t = HostTensor::new(vec![2, 3, 4], (0..24).map(|x| x as f32).collect());
        let p = t.permute(&[2, 0, 1]);
        assert_eq!(p.shape, vec![4, 2, 3]);
        // p[k][i][j] = t[i][j][k]
        for k in 0..4 {
            for i in 0..2 {
                for j in 0..3 {
                    assert_eq!(p.data[k * 6 + i * 3 + j], t.data[i * 12 + j * 4 + k]);
                }
            }
        }
        assert_eq!(t.transpose2_like_check(), ());
    }

    impl HostTensor {
        fn transpose2_like_check(&self) {
            let m = HostTensor::new(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]);
            assert_eq!(m.transpose2(), m.permute(&[1, 0]));
            assert_eq!(m.transpose2().data, vec![1., 4., 2., 5., 3., 6.]);
        }
    }
}

impl HostTensor {
    /// Uploads to `device` as a rank-`D` f32 tensor. Panics if the rank differs (a programming error).
    pub fn to_tensor<const D: usize>(&self, device: &burn::tensor::Device) -> burn::tensor::Tensor<D> {
        assert_eq!(self.shape.len(), D, "rank {} tensor requested as rank {D}", self.shape.len());
        burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(self.data.clone(), self.shape.clone()), device)
    }

    /// Downloads a tensor (any backend, any float dtype) to the host as f32.
    pub fn from_tensor<const D: usize>(t: burn::tensor::Tensor<D>) -> Self {
        let shape = t.dims().to_vec();
        let data = t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data");
        Self::new(shape, data)
    }

    /// Largest absolute elementwise difference; `None` if the shapes differ.
    pub fn max_abs_diff(&self, other: &HostTensor) -> Option<f32> {
        if self.shape != other.shape {
            return None;
        }
        let mut max = 0f32;
        for (a, b) in self.data.iter().zip(&other.data) {
            let d = (a - b).abs();
            if d.is_nan() {
                return Some(f32::NAN); // a NaN anywhere must fail any tolerance
            }
            max = max.max(d);
        }
        Some(max)
    }
}
