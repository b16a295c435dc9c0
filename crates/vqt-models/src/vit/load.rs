//! Loading a canonical [`TensorMap`] (timm names, PyTorch layouts) into a [`Vit`], with a load
//! report and one-line errors that name the file and the tensor.

use super::model::Vit;
use super::pos_embed::{PosResample, resample_pos_embed};
use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use vqt_core::tensor_map::{Provenance, SourceNaming};
use vqt_core::{HostTensor, TensorMap};

/// Source tensors that may be present and are not part of the backbone.
const IGNORABLE: [(&str, &str); 3] = [
    ("head.", "classification head of another task"),
    ("fc_norm.", "pooling norm of a global-pool head (not used with class-token pooling)"),
    ("pre_logits.", "pre-logits layer (not part of the feature extractor)"),
];

/// Why a tensor map does not fit the model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A tensor the model needs is absent.
    #[error("{path}: missing tensor `{key}` (expected shape {expected:?})")]
    Missing {
        /// The checkpoint.
        path: PathBuf,
        /// The timm name.
        key: String,
        /// The shape the model needs.
        expected: Vec<usize>,
    },
    /// A tensor the model needs is stored with an integer or boolean dtype.
    #[error("{path}: tensor `{key}` has dtype {dtype}")]
    NotFloat {
        /// The checkpoint.
        path: PathBuf,
        /// The timm name.
        key: String,
        /// Its dtype, explained.
        dtype: String,
    },
    /// A tensor has the wrong shape for this model.
    #[error("{path}: tensor `{key}` has shape {found:?}, the model needs {expected:?}")]
    Shape {
        /// The checkpoint.
        path: PathBuf,
        /// The timm name.
        key: String,
        /// The checkpoint's shape.
        found: Vec<usize>,
        /// The model's shape.
        expected: Vec<usize>,
    },
    /// The checkpoint has a different number of blocks.
    #[error("{path}: checkpoint has {found} blocks, the model has {expected} (another architecture?)")]
    Depth {
        /// The checkpoint.
        path: PathBuf,
        /// Blocks in the checkpoint.
        found: usize,
        /// Blocks in the model.
        expected: usize,
    },
    /// The checkpoint has tensors this model has no place for.
    #[error("{path}: unexpected tensor `{key}`{more} (another architecture or a variant this config does not enable?)")]
    Unexpected {
        /// The checkpoint.
        path: PathBuf,
        /// The first unexpected timm name.
        key: String,
        /// ` and N more`, or empty.
        more: String,
    },
    /// The position table cannot be resampled.
    #[error("{path}: tensor `pos_embed`: {msg}")]
    PosEmbed {
        /// The checkpoint.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
}

/// What a load did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LoadReport {
    /// Origin (path, sha256, naming, tensors dropped by the format converter, dtype casts).
    pub provenance: Provenance,
    /// Canonical tensors written into the model.
    pub applied: Vec<String>,
    /// Tensors present but not used, with the reason.
    pub ignored: BTreeMap<String, String>,
    /// `None` if the stored grid matched; otherwise how it was resampled.
    pub pos_embed_resampled: Option<String>,
    /// Whether the classification head came from the checkpoint (false: freshly initialised).
    pub head_loaded: bool,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.provenance;
        writeln!(f, "checkpoint {} ({:?}, sha256 {})", p.path.display(), p.naming, p.sha256)?;
        writeln!(f, "  applied {} tensors; head {}", self.applied.len(), if self.head_loaded { "loaded" } else { "fresh" })?;
        if let Some(r) = &self.pos_embed_resampled {
            writeln!(f, "  pos_embed {r}")?;
        }
        for c in &p.casts {
            writeln!(f, "  cast {c}")?;
        }
        for (k, why) in p.dropped.iter().chain(&self.ignored) {
            writeln!(f, "  ignored {k}: {why}")?;
        }
        Ok(())
    }
}

/// The resampling a checkpoint's own lineage uses: HF DINOv2 exports use plain bicubic,
/// everything read through timm uses timm's antialiased bicubic.
pub fn default_resample(naming: SourceNaming) -> PosResample {
    match naming {
        SourceNaming::HfDinov2 => PosResample::Bicubic,
        _ => PosResample::TimmBicubicAntialias,
    }
}

struct Loader {
    tensors: BTreeMap<String, HostTensor>,
    non_float: BTreeMap<String, String>,
    path: PathBuf,
    applied: Vec<String>,
    device: Device,
}

impl Loader {
    fn host(&mut self, key: &str, expected: &[usize]) -> Result<HostTensor, LoadError> {
        if let Some(dtype) = self.non_float.get(key) {
            return Err(LoadError::NotFloat { path: self.path.clone(), key: key.to_string(), dtype: vqt_core::checkpoint::raw::not_a_weight(dtype) });
        }
        let t = self.tensors.remove(key).ok_or_else(|| LoadError::Missing {
            path: self.path.clone(),
            key: key.to_string(),
            expected: expected.to_vec(),
        })?;
        if t.shape != expected {
            return Err(LoadError::Shape { path: self.path.clone(), key: key.to_string(), found: t.shape, expected: expected.to_vec() });
        }
        self.applied.push(key.to_string());
        Ok(t)
    }

    fn tensor<const D: usize>(&self, t: HostTensor) -> Param<Tensor<D>> {
        Param::from_tensor(Tensor::from_data(TensorData::new(t.data, t.shape), &self.device))
    }

    /// A PyTorch-layout tensor straight into a parameter of the same layout.
    fn param<const D: usize>(&mut self, key: &str, expected: &[usize]) -> Result<Param<Tensor<D>>, LoadError> {
        let t = self.host(key, expected)?;
        Ok(self.tensor(t))
    }

    /// A PyTorch `[out, in]` Linear weight into Burn's `[in, out]` layout.
    fn linear_weight(&mut self, key: &str, d_in: usize, d_out: usize) -> Result<Param<Tensor<2>>, LoadError> {
        let t = self.host(key, &[d_out, d_in])?.transpose2();
        Ok(self.tensor(t))
    }

    fn linear(&mut self, prefix: &str, lin: &mut burn::nn::Linear) -> Result<(), LoadError> {
        let [d_in, d_out] = lin.weight.dims();
        lin.weight = self.linear_weight(&format!("{prefix}.weight"), d_in, d_out)?;
        if lin.bias.is_some() {
            lin.bias = Some(self.param(&format!("{prefix}.bias"), &[d_out])?);
        }
        Ok(())
    }

    fn layer_norm(&mut self, prefix: &str, ln: &mut burn::nn::LayerNorm) -> Result<(), LoadError> {
        let d = ln.gamma.dims()[0];
        ln.gamma = self.param(&format!("{prefix}.weight"), &[d])?;
        if ln.beta.is_some() {
            ln.beta = Some(self.param(&format!("{prefix}.bias"), &[d])?);
        }
        Ok(())
    }
}

impl Vit {
    /// Writes the checkpoint's tensors into this model (built with the intended config, on the
    /// intended device). Position embeddings are resampled with `resample` if the stored grid
    /// differs. Fails on any missing, mis-shaped or unexpected backbone tensor.
    pub fn load_tensor_map(mut self, map: TensorMap, resample: PosResample) -> Result<(Self, LoadReport), LoadError> {
        let TensorMap { tensors, provenance } = map;
        let path = provenance.path.clone();
        let found_depth = {
            let mut n = 0;
            while tensors.keys().any(|k| k.starts_with(&format!("blocks.{n}."))) {
                n += 1;
            }
            n
        };
        if found_depth != self.depth() {
            return Err(LoadError::Depth { path, found: found_depth, expected: self.depth() });
        }
        let device = self.cls_token.device();
        let mut l = Loader { tensors, non_float: provenance.non_float.clone(), path: path.clone(), applied: Vec::new(), device };
        let d = self.embed_dim();

        let w = self.patch_embed.proj.weight.dims();
        self.patch_embed.proj.weight = l.param("patch_embed.proj.weight", &w)?;
        if self.patch_embed.proj.bias.is_some() {
            self.patch_embed.proj.bias = Some(l.param("patch_embed.proj.bias", &[d])?);
        }
        self.cls_token = l.param("cls_token", &[1, 1, d])?;

        let n = self.num_tokens();
        let pos = l.tensors.remove("pos_embed").ok_or_else(|| LoadError::Missing {
            path: path.clone(),
            key: "pos_embed".into(),
            expected: vec![1, n, d],
        })?;
        let mut pos_embed_resampled = None;
        let pos = if pos.shape == [1, n, d] {
            pos
        } else {
            if pos.shape.len() != 3 || pos.shape[2] != d {
                return Err(LoadError::Shape { path, key: "pos_embed".into(), found: pos.shape, expected: vec![1, n, d] });
            }
            let g1 = ((n - 1) as f64).sqrt().round() as usize;
            let g0 = ((pos.shape[1].saturating_sub(1)) as f64).sqrt().round() as usize;
            let out = resample_pos_embed(&pos, g1, resample).map_err(|msg| LoadError::PosEmbed { path: path.clone(), msg })?;
            pos_embed_resampled = Some(format!("resampled {g0}x{g0} -> {g1}x{g1} with {}", resample.name()));
            out
        };
        l.applied.push("pos_embed".into());
        self.pos_embed = l.tensor(pos);

        for (i, b) in self.blocks.iter_mut().enumerate() {
            let p = format!("blocks.{i}");
            l.layer_norm(&format!("{p}.norm1"), &mut b.norm1)?;
            l.linear(&format!("{p}.attn.qkv"), &mut b.attn.qkv)?;
            l.linear(&format!("{p}.attn.proj"), &mut b.attn.proj)?;
            l.layer_norm(&format!("{p}.norm2"), &mut b.norm2)?;
            l.linear(&format!("{p}.mlp.fc1"), &mut b.mlp.fc1)?;
            l.linear(&format!("{p}.mlp.fc2"), &mut b.mlp.fc2)?;
            for (name, ls) in [("ls1", &mut b.ls1), ("ls2", &mut b.ls2)] {
                if let Some(ls) = ls {
                    ls.gamma = l.param(&format!("{p}.{name}.gamma"), &[d])?;
                }
            }
        }
        l.layer_norm("norm", &mut self.norm)?;

        let mut ignored = BTreeMap::new();
        let mut head_loaded = false;
        if let Some(head) = self.head.as_mut() {
            let [_, c] = head.weight.dims();
            match l.tensors.get("head.weight").map(|t| t.shape.clone()) {
                Some(s) if s == [c, d] => {
                    l.linear("head", head)?;
                    head_loaded = true;
                }
                Some(s) => {
                    ignored.insert("head.*".to_string(), format!("checkpoint head has shape {s:?}, the task needs {c} classes: initialised fresh"));
                }
                None => {}
            }
        }
        let leftover: Vec<String> = std::mem::take(&mut l.tensors).into_keys().collect();
        let mut unexpected = Vec::new();
        for key in leftover {
            match IGNORABLE.iter().find(|(p, _)| key.starts_with(p)) {
                Some((_, why)) => {
                    ignored.entry(key).or_insert_with(|| why.to_string());
                }
                None => unexpected.push(key),
            }
        }
        if let Some(key) = unexpected.first() {
            let more = if unexpected.len() > 1 { format!(" and {} more", unexpected.len() - 1) } else { String::new() };
            return Err(LoadError::Unexpected { path, key: key.clone(), more });
        }
        let report = LoadReport { provenance, applied: l.applied, ignored, pos_embed_resampled, head_loaded };
        Ok((self, report))
    }
}
