//! Container readers: file bytes -> named f32 tensors with their source names and layouts.

use super::{CheckpointError, CheckpointFormat};
use crate::tensor_map::HostTensor;
use std::collections::BTreeMap;
use std::path::Path;

/// Tensors as stored in the file (source names, source layouts), converted to f32.
#[derive(Debug, Default)]
pub struct RawTensors {
    /// Tensors by source name.
    pub tensors: BTreeMap<String, HostTensor>,
    /// How many tensors were cast from each non-f32 dtype.
    pub casts: BTreeMap<String, usize>,
    /// Integer and boolean tensors (buffers such as HF `position_ids`, not weights), by source
    /// name, with their dtype: skipped, but named if the model asks for one of them.
    pub non_float: BTreeMap<String, String>,
}

impl RawTensors {
    pub(crate) fn casts_summary(&self) -> Vec<String> {
        self.casts.iter().map(|(d, n)| format!("{d} -> f32: {n} tensors")).collect()
    }

    /// Removes and returns a tensor, or a `Missing` error naming what it was needed for.
    pub fn take(&mut self, path: &Path, key: &str, needed_for: &str) -> Result<HostTensor, CheckpointError> {
        if let Some(dtype) = self.non_float.get(key) {
            return Err(CheckpointError::Dtype { path: path.to_path_buf(), key: key.to_string(), dtype: not_a_weight(dtype) });
        }
        self.tensors.remove(key).ok_or_else(|| CheckpointError::Missing {
            path: path.to_path_buf(),
            key: key.to_string(),
            needed_for: needed_for.to_string(),
        })
    }
}

/// How a weight stored as an integer or boolean tensor is described.
pub fn not_a_weight(dtype: &str) -> String {
    format!("{dtype} (an integer/boolean tensor; weights must be f32, f16, bf16 or f64)")
}

/// Reads the container named by the extension (or the format, for `.npz`).
pub fn read_raw(path: &Path, format: CheckpointFormat) -> Result<RawTensors, CheckpointError> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "safetensors" => read_safetensors(path),
        "npz" => super::jax_npz::read_npz(path),
        "pth" | "pt" | "bin" | "ckpt" => read_pickle(path),
        _ if format == CheckpointFormat::JaxNpz => super::jax_npz::read_npz(path),
        _ => Err(CheckpointError::Container {
            path: path.to_path_buf(),
            container: "checkpoint",
            msg: format!("unknown extension `.{ext}` (expected .safetensors, .pth, .pt, .bin or .npz)"),
        }),
    }
}

/// Little-endian bytes of `dtype` -> f32 values.
pub(crate) fn bytes_to_f32(dtype: &str, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        "f32" => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        "f64" => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        "f16" => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        "bf16" => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => return None,
    })
}

fn read_safetensors(path: &Path) -> Result<RawTensors, CheckpointError> {
    use safetensors::{Dtype, SafeTensors};
    let bytes = std::fs::read(path).map_err(|e| CheckpointError::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| CheckpointError::Container {
        path: path.to_path_buf(),
        container: "safetensors",
        msg: e.to_string(),
    })?;
    let mut out = RawTensors::default();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            Dtype::F32 => "f32",
            Dtype::F64 => "f64",
            Dtype::F16 => "f16",
            Dtype::BF16 => "bf16",
            // Integer tensors (e.g. HF `position_ids` buffers) are not weights: skip them.
            Dtype::I64 | Dtype::I32 | Dtype::I16 | Dtype::I8 | Dtype::U8 | Dtype::BOOL => {
                out.non_float.insert(name, format!("{:?}", view.dtype()));
                continue;
            }
            other => {
                return Err(CheckpointError::Dtype {
                    path: path.to_path_buf(),
                    key: name,
                    dtype: format!("{other:?}"),
                });
            }
        };
        if dtype != "f32" {
            *out.casts.entry(dtype.to_string()).or_default() += 1;
        }
        let data = bytes_to_f32(dtype, view.data()).expect("known float dtype");
        out.tensors.insert(name, HostTensor::new(view.shape().to_vec(), data));
    }
    Ok(out)
}

fn read_pickle(path: &Path) -> Result<RawTensors, CheckpointError> {
    use burn::store::pytorch::PytorchReader;
    use burn::store::pytorch_reader::DType;
    let container = |e: &dyn std::fmt::Display| CheckpointError::Container {
        path: path.to_path_buf(),
        container: "PyTorch pickle",
        msg: e.to_string(),
    };
    // State dicts are often nested under `model` or `state_dict` (MAE, DeiT, training scripts).
    let mut reader = PytorchReader::new(path).map_err(|e| container(&e))?;
    let keys = reader.keys();
    let nested = ["model", "state_dict", "module"]
        .into_iter()
        .find(|k| keys.iter().any(|key| key.starts_with(&format!("{k}."))) && !keys.iter().any(|key| key.starts_with("blocks.")));
    if let Some(top) = nested {
        reader = PytorchReader::with_top_level_key(path, top).map_err(|e| container(&e))?;
    }
    let mut out = RawTensors::default();
    for (name, t) in reader.into_tensors() {
        let dtype = match t.dtype() {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            other @ (DType::I64 | DType::I32 | DType::I16 | DType::I8 | DType::U8 | DType::U16 | DType::U32 | DType::U64 | DType::Bool) => {
                out.non_float.insert(name, format!("{other:?}"));
                continue;
            }
        };
        let bytes = t.read().map_err(|e| container(&e))?;
        if dtype != "f32" {
            *out.casts.entry(dtype.to_string()).or_default() += 1;
        }
        // The reader yields native-endian bytes; every platform we target is little-endian.
        let data = bytes_to_f32(dtype, &bytes).expect("known float dtype");
        out.tensors.insert(name, HostTensor::new(t.shape().to_vec(), data));
    }
    Ok(out)
}
