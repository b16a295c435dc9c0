//! Container readers: file bytes -> named f32 tensors with their source names and layouts
//! (safetensors, PyTorch pickles, and `.npz` archives: a zip of `.npy` members, whose headers
//! [`parse_npy`] reads; format v1/v2/v3, little-endian floats, C order). Naming conventions
//! (timm, HF, JAX) are applied afterwards by the sibling modules.

use super::{CheckpointError, CheckpointFormat};
use crate::tensor_map::HostTensor;
use std::collections::BTreeMap;
use std::io::Read;
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
        "npz" => read_npz(path),
        "pth" | "pt" | "bin" | "ckpt" => read_pickle(path),
        _ if format == CheckpointFormat::JaxNpz => read_npz(path),
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

/// Reads every float member of an `.npz` archive.
pub fn read_npz(path: &Path) -> Result<RawTensors, CheckpointError> {
    let container = |msg: String| CheckpointError::Container { path: path.to_path_buf(), container: "npz", msg };
    let file = std::fs::File::open(path).map_err(|e| CheckpointError::io(path, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| container(e.to_string()))?;
    let mut out = RawTensors::default();
    for i in 0..zip.len() {
        let mut member = zip.by_index(i).map_err(|e| container(e.to_string()))?;
        let name = member.name().map_err(|e| container(e.to_string()))?.to_string();
        let Some(key) = name.strip_suffix(".npy") else { continue };
        let mut bytes = Vec::with_capacity(member.size() as usize);
        member.read_to_end(&mut bytes).map_err(|e| container(format!("member `{name}`: {e}")))?;
        let (descr, shape, data) = parse_npy(&bytes).map_err(|e| container(format!("member `{name}`: {e}")))?;
        let dtype = match descr.as_str() {
            "<f4" => "f32",
            "<f8" => "f64",
            "<f2" => "f16",
            // Step counters and similar integer leaves are not weights.
            d if d.contains('i') || d.contains('u') || d.contains('b') => continue,
            other => {
                return Err(CheckpointError::Dtype { path: path.to_path_buf(), key: key.to_string(), dtype: other.to_string() });
            }
        };
        if dtype != "f32" {
            *out.casts.entry(dtype.to_string()).or_default() += 1;
        }
        let values = bytes_to_f32(dtype, data).expect("known dtype");
        out.tensors.insert(key.to_string(), HostTensor::new(shape, values));
    }
    Ok(out)
}

/// Parses one `.npy` buffer into (descr, shape, data bytes). Fortran order is rejected.
pub fn parse_npy(bytes: &[u8]) -> Result<(String, Vec<usize>, &[u8]), String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("missing the \\x93NUMPY magic".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(format!("unsupported npy version {v}")),
    };
    let header = bytes.get(start..start + header_len).ok_or("truncated npy header")?;
    let header = std::str::from_utf8(header).map_err(|_| "npy header is not UTF-8")?;
    let field = |name: &str| -> Result<&str, String> {
        let at = header.find(&format!("'{name}'")).ok_or(format!("npy header lacks `{name}`"))?;
        Ok(header[at + name.len() + 2..].trim_start().trim_start_matches(':').trim_start())
    };
    let descr_rest = field("descr")?;
    let descr = descr_rest.trim_start_matches('\'').split('\'').next().unwrap_or("").to_string();
    if field("fortran_order")?.starts_with("True") {
        return Err("Fortran-ordered arrays are not supported".into());
    }
    let shape_rest = field("shape")?;
    let inner = shape_rest.trim_start_matches('(').split(')').next().unwrap_or("");
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad npy shape `{inner}`")))
        .collect::<Result<_, _>>()?;
    let item = match descr.as_bytes().last() {
        Some(b'8') => 8,
        Some(b'4') => 4,
        Some(b'2') => 2,
        Some(b'1') => 1,
        _ => return Err(format!("unsupported npy dtype `{descr}`")),
    };
    let need = shape.iter().product::<usize>() * item;
    let data = bytes.get(start + header_len..start + header_len + need).ok_or("truncated npy data")?;
    Ok((descr, shape, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn parses_v1_headers() {
        let data: Vec<u8> = [1f32, 2., 3., 4., 5., 6.].iter().flat_map(|v| v.to_le_bytes()).collect();
        let buf = npy("<f4", "(2, 3)", &data);
        let (descr, shape, bytes) = parse_npy(&buf).unwrap();
        assert_eq!((descr.as_str(), shape), ("<f4", vec![2, 3]));
        assert_eq!(bytes.len(), 24);
        let scalar = npy("<f4", "()", &1f32.to_le_bytes());
        assert_eq!(parse_npy(&scalar).unwrap().1, Vec::<usize>::new());
        let one = npy("<f4", "(3,)", &data[..12]);
        assert_eq!(parse_npy(&one).unwrap().1, vec![3]);
    }

    #[test]
    fn rejects_truncated_and_fortran() {
        let data: Vec<u8> = [1f32, 2.].iter().flat_map(|v| v.to_le_bytes()).collect();
        let buf = npy("<f4", "(2, 3)", &data);
        assert_eq!(parse_npy(&buf).unwrap_err(), "truncated npy data");
        let mut f = npy("<f4", "(2,)", &data);
        let at = f.windows(5).position(|w| w == b"False").unwrap();
        f[at..at + 5].copy_from_slice(b"True ");
        assert!(parse_npy(&f).unwrap_err().contains("Fortran"));
        assert!(parse_npy(b"not numpy at all").unwrap_err().contains("magic"));
    }
}
