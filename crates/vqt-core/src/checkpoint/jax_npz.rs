//! Google vit_jax / big_vision `.npz` checkpoints (the `ViT-B_16.npz` VPT, VQT and SynQT use).
//!
//! An npz is a zip of `.npy` members. Burn has no npz reader, so the zip crate opens the archive
//! and [`parse_npy`] reads each member's header (format v1/v2/v3, little-endian floats, C order).
//! [`convert`] applies the per-tensor transforms of timm's `_load_weights`.

use super::{CheckpointError, RawTensors};
use crate::tensor_map::HostTensor;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

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
        let values = super::raw::bytes_to_f32(dtype, data).expect("known dtype");
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

/// JAX names -> timm names with PyTorch layouts (see formats.md §1.2).
pub fn convert(
    path: &Path,
    mut raw: RawTensors,
    dropped: &mut BTreeMap<String, String>,
) -> Result<BTreeMap<String, HostTensor>, CheckpointError> {
    // Some exports prefix every key with `opt/target/`, which timm strips.
    if raw.tensors.keys().all(|k| k.starts_with("opt/target/")) {
        raw.tensors = std::mem::take(&mut raw.tensors)
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("opt/target/").to_string(), v))
            .collect();
    }
    let shape_err = |key: &str, t: &HostTensor, expected: &str| CheckpointError::Shape {
        path: path.to_path_buf(),
        key: key.to_string(),
        found: t.shape.clone(),
        expected: expected.to_string(),
    };
    let mut out = BTreeMap::new();
    let kernel = raw.take(path, "embedding/kernel", "patch_embed.proj.weight")?;
    if kernel.shape.len() != 4 {
        return Err(shape_err("embedding/kernel", &kernel, "4-D HWIO [p, p, C, D]"));
    }
    let d = kernel.shape[3];
    out.insert("patch_embed.proj.weight".into(), kernel.permute(&[3, 2, 0, 1]));
    out.insert("patch_embed.proj.bias".into(), raw.take(path, "embedding/bias", "patch_embed.proj.bias")?);
    out.insert("cls_token".into(), raw.take(path, "cls", "cls_token")?);
    out.insert(
        "pos_embed".into(),
        raw.take(path, "Transformer/posembed_input/pos_embedding", "pos_embed")?,
    );
    let mut i = 0;
    while raw.tensors.contains_key(&format!("Transformer/encoderblock_{i}/LayerNorm_0/scale")) {
        let b = format!("Transformer/encoderblock_{i}");
        let t = format!("blocks.{i}");
        let mut take = |k: &str, canon: &str| raw.take(path, &format!("{b}/{k}"), &format!("{t}.{canon}"));
        out.insert(format!("{t}.norm1.weight"), take("LayerNorm_0/scale", "norm1.weight")?);
        out.insert(format!("{t}.norm1.bias"), take("LayerNorm_0/bias", "norm1.bias")?);
        out.insert(format!("{t}.norm2.weight"), take("LayerNorm_2/scale", "norm2.weight")?);
        out.insert(format!("{t}.norm2.bias"), take("LayerNorm_2/bias", "norm2.bias")?);
        let mha = "MultiHeadDotProductAttention_1";
        let mut qkv_w = Vec::new();
        let mut qkv_b = Vec::new();
        for part in ["query", "key", "value"] {
            let key = format!("{b}/{mha}/{part}/kernel");
            let k = take(&format!("{mha}/{part}/kernel"), "attn.qkv.weight")?;
            if k.shape.len() != 3 || k.shape[0] != d || k.shape[1] * k.shape[2] != d {
                return Err(shape_err(&key, &k, &format!("[{d}, heads, {d}/heads]")));
            }
            // (D, H, Dh) -> [in, out] -> PyTorch [out, in]
            qkv_w.push(k.reshaped(vec![d, d]).transpose2());
            let bias = take(&format!("{mha}/{part}/bias"), "attn.qkv.bias")?;
            let n = bias.numel();
            qkv_b.push(bias.reshaped(vec![n]));
        }
        out.insert(format!("{t}.attn.qkv.weight"), HostTensor::cat0(&qkv_w.iter().collect::<Vec<_>>()));
        out.insert(format!("{t}.attn.qkv.bias"), HostTensor::cat0(&qkv_b.iter().collect::<Vec<_>>()));
        let o = take(&format!("{mha}/out/kernel"), "attn.proj.weight")?;
        if o.numel() != d * d {
            return Err(shape_err(&format!("{b}/{mha}/out/kernel"), &o, &format!("[heads, {d}/heads, {d}]")));
        }
        out.insert(format!("{t}.attn.proj.weight"), o.reshaped(vec![d, d]).transpose2());
        out.insert(format!("{t}.attn.proj.bias"), take(&format!("{mha}/out/bias"), "attn.proj.bias")?);
        for (j, fc) in [(0, "fc1"), (1, "fc2")] {
            let k = take(&format!("MlpBlock_3/Dense_{j}/kernel"), &format!("mlp.{fc}.weight"))?;
            if k.shape.len() != 2 {
                return Err(shape_err(&format!("{b}/MlpBlock_3/Dense_{j}/kernel"), &k, "2-D [in, out]"));
            }
            out.insert(format!("{t}.mlp.{fc}.weight"), k.transpose2());
            out.insert(format!("{t}.mlp.{fc}.bias"), take(&format!("MlpBlock_3/Dense_{j}/bias"), &format!("mlp.{fc}.bias"))?);
        }
        i += 1;
    }
    out.insert("norm.weight".into(), raw.take(path, "Transformer/encoder_norm/scale", "norm.weight")?);
    out.insert("norm.bias".into(), raw.take(path, "Transformer/encoder_norm/bias", "norm.bias")?);
    // The classification head, as timm converts it; the model loader uses it only when the
    // task has the same classes.
    if let (Some(k), Some(b)) = (raw.tensors.remove("head/kernel"), raw.tensors.remove("head/bias")) {
        if k.shape.len() != 2 {
            return Err(shape_err("head/kernel", &k, "2-D [D, classes]"));
        }
        out.insert("head.weight".into(), k.transpose2());
        out.insert("head.bias".into(), b);
    }
    for (key, t) in std::mem::take(&mut raw.tensors) {
        if key.starts_with("head/") {
            dropped.insert(key, "incomplete classification head".into());
        } else if key.starts_with("pre_logits/") {
            dropped.insert(key, "pre-logits layer (not part of the feature extractor)".into());
        } else {
            // Unknown: kept under its source name so the model loader reports it as unexpected.
            out.insert(key, t);
        }
    }
    Ok(out)
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
