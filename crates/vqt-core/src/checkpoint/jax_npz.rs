//! Google vit_jax / big_vision `.npz` checkpoints (the `ViT-B_16.npz` VPT, VQT and SynQT use).
//!
//! The archive itself (a zip of `.npy` members) is read by [`super::raw::read_npz`], like every
//! other container; this module only names and lays out what it holds: [`convert`] applies the
//! per-tensor transforms of timm's `_load_weights`.

use super::{CheckpointError, RawTensors};
use crate::tensor_map::HostTensor;
use std::collections::BTreeMap;
use std::path::Path;

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
