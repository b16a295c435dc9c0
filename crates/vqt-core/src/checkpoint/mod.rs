//! Checkpoint readers: every supported file becomes one canonical [`TensorMap`].
//!
//! | format | reader | naming converted |
//! |---|---|---|
//! | `.safetensors` | [`safetensors`](https://docs.rs/safetensors) | timm, HF `ViTModel`, HF `Dinov2Model` |
//! | `.pth` / `.pt` / `.bin` | burn-store's `PytorchReader` (pickle + zip, no TorchScript) | timm, HF |
//! | `.npz` | [`raw::read_npz`]: zip + npy header | Google vit_jax / big_vision ([`jax_npz`]) |
//!
//! [`raw`] reads containers; [`timm`], [`hf`] and [`jax_npz`] convert source names and layouts
//! and depend on `raw` only for its [`RawTensors`] (never the other way round).
//!
//! Errors are one line naming the file (and key where there is one).

pub mod hf;
pub mod jax_npz;
pub mod raw;
pub mod timm;

use crate::tensor_map::{Provenance, SourceNaming, TensorMap};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use raw::RawTensors;

/// How to read a checkpoint file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointFormat {
    /// Decide from the extension, then from the key names.
    #[default]
    Auto,
    /// timm state dict (safetensors or pickle).
    Timm,
    /// Google JAX `.npz`.
    JaxNpz,
    /// HuggingFace `ViTModel` / `ViTForImageClassification`.
    HfVit,
    /// HuggingFace `Dinov2Model`.
    HfDinov2,
}

/// Why a checkpoint could not be read or converted.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be opened or read.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// The container is damaged or not what the extension says (truncated, bad header...).
    #[error("{path}: not a readable {container} file: {msg}")]
    Container {
        /// The file.
        path: PathBuf,
        /// `safetensors`, `PyTorch pickle` or `npz`.
        container: &'static str,
        /// What the container parser said.
        msg: String,
    },
    /// A tensor has a dtype we cannot convert to f32.
    #[error("{path}: tensor `{key}` has unsupported dtype {dtype}")]
    Dtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        key: String,
        /// Its dtype.
        dtype: String,
    },
    /// The key names fit none of the known conventions.
    #[error("{path}: cannot tell the checkpoint's naming ({hint}); pass the format explicitly (timm, jax-npz, hf-vit, hf-dinov2)")]
    UnknownNaming {
        /// The file.
        path: PathBuf,
        /// A few of its keys.
        hint: String,
    },
    /// A tensor the conversion needs is absent.
    #[error("{path}: missing tensor `{key}` (needed for {needed_for})")]
    Missing {
        /// The file.
        path: PathBuf,
        /// The source key.
        key: String,
        /// The canonical tensor it feeds.
        needed_for: String,
    },
    /// A source tensor has a shape the conversion cannot use.
    #[error("{path}: tensor `{key}` has shape {found:?}, expected {expected}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// The source key.
        key: String,
        /// What was found.
        found: Vec<usize>,
        /// What was expected, in words.
        expected: String,
    },
}

impl CheckpointError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        CheckpointError::Io { path: path.to_path_buf(), error: source }
    }
}

/// Reads `path` and converts it to the canonical tensor map.
pub fn load_checkpoint(path: &Path, format: CheckpointFormat) -> Result<TensorMap, CheckpointError> {
    let meta = std::fs::metadata(path).map_err(|e| CheckpointError::io(path, e))?;
    if !meta.is_file() {
        return Err(CheckpointError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    let raw = raw::read_raw(path, format)?;
    let naming = match format {
        CheckpointFormat::Auto => detect_naming(path, &raw)?,
        CheckpointFormat::Timm => SourceNaming::Timm,
        CheckpointFormat::JaxNpz => SourceNaming::JaxNpz,
        CheckpointFormat::HfVit => SourceNaming::HfVit,
        CheckpointFormat::HfDinov2 => SourceNaming::HfDinov2,
    };
    let casts = raw.casts_summary();
    let non_float = raw.non_float.iter().map(|(k, d)| (k.strip_prefix("module.").unwrap_or(k).to_string(), d.clone())).collect();
    let mut dropped = BTreeMap::new();
    let tensors = match naming {
        SourceNaming::Timm => timm::convert(path, raw, &mut dropped)?,
        SourceNaming::JaxNpz => jax_npz::convert(path, raw, &mut dropped)?,
        SourceNaming::HfVit | SourceNaming::HfDinov2 => hf::convert(path, raw, naming, &mut dropped)?,
    };
    let sha256 = crate::hash::sha256_file(path).map_err(|e| CheckpointError::io(path, e))?;
    Ok(TensorMap {
        tensors,
        provenance: Provenance { path: path.to_path_buf(), sha256, naming, dropped, casts, non_float },
    })
}

/// Guesses the naming convention from the keys.
pub fn detect_naming(path: &Path, raw: &RawTensors) -> Result<SourceNaming, CheckpointError> {
    let has = |needle: &str| raw.tensors.keys().any(|k| k.contains(needle));
    if has("Transformer/encoderblock_") || has("embedding/kernel") {
        Ok(SourceNaming::JaxNpz)
    } else if has("blocks.0.") || (has("patch_embed.proj") && has("cls_token")) {
        Ok(SourceNaming::Timm)
    } else if has("encoder.layer.0.layernorm_before") {
        Ok(SourceNaming::HfVit)
    } else if has("encoder.layer.0.norm1") {
        Ok(SourceNaming::HfDinov2)
    } else {
        let hint: Vec<&str> = raw.tensors.keys().take(3).map(|s| s.as_str()).collect();
        let hint = if hint.is_empty() { "no tensors".to_string() } else { format!("keys like {}", hint.join(", ")) };
        Err(CheckpointError::UnknownNaming { path: path.to_path_buf(), hint })
    }
}
