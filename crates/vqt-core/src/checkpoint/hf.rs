//! HuggingFace `ViTModel` and `Dinov2Model` safetensors / pickles -> timm naming.
//!
//! Both keep q, k and v as separate `[out, in]` Linears; timm (and our model) fuse them into one
//! `qkv` whose rows are `[q; k; v]`.

use super::{CheckpointError, RawTensors};
use crate::tensor_map::{HostTensor, SourceNaming};
use std::collections::BTreeMap;
use std::path::Path;

/// Converts HF ViT / DINOv2 names to timm names.
pub fn convert(
    path: &Path,
    mut raw: RawTensors,
    naming: SourceNaming,
    dropped: &mut BTreeMap<String, String>,
) -> Result<BTreeMap<String, HostTensor>, CheckpointError> {
    // ViTForImageClassification / Dinov2ForImageClassification wrap the backbone.
    for prefix in ["vit.", "dinov2.", "backbone."] {
        if raw.tensors.keys().any(|k| k.starts_with(prefix)) {
            let (inner, outer): (BTreeMap<_, _>, BTreeMap<_, _>) =
                std::mem::take(&mut raw.tensors).into_iter().partition(|(k, _)| k.starts_with(prefix));
            for (k, _) in outer {
                dropped.insert(k, "outside the backbone (task head)".into());
            }
            raw.tensors = inner.into_iter().map(|(k, v)| (k[prefix.len()..].to_string(), v)).collect();
        }
    }
    let mut out = BTreeMap::new();
    let mut take = |k: &str, canon: &str| raw.take(path, k, canon);
    out.insert("cls_token".into(), take("embeddings.cls_token", "cls_token")?);
    out.insert("pos_embed".into(), take("embeddings.position_embeddings", "pos_embed")?);
    let pe = "embeddings.patch_embeddings.projection";
    out.insert("patch_embed.proj.weight".into(), take(&format!("{pe}.weight"), "patch_embed.proj.weight")?);
    out.insert("patch_embed.proj.bias".into(), take(&format!("{pe}.bias"), "patch_embed.proj.bias")?);
    let (n1, n2, fc1, fc2) = match naming {
        SourceNaming::HfVit => ("layernorm_before", "layernorm_after", "intermediate.dense", "output.dense"),
        _ => ("norm1", "norm2", "mlp.fc1", "mlp.fc2"),
    };
    let mut i = 0;
    while raw.tensors.contains_key(&format!("encoder.layer.{i}.{n1}.weight")) {
        let l = format!("encoder.layer.{i}");
        let t = format!("blocks.{i}");
        let mut take = |k: &str, canon: &str| raw.take(path, &format!("{l}.{k}"), &format!("{t}.{canon}"));
        for p in ["weight", "bias"] {
            out.insert(format!("{t}.norm1.{p}"), take(&format!("{n1}.{p}"), &format!("norm1.{p}"))?);
            out.insert(format!("{t}.norm2.{p}"), take(&format!("{n2}.{p}"), &format!("norm2.{p}"))?);
            let q = take(&format!("attention.attention.query.{p}"), &format!("attn.qkv.{p}"))?;
            let k = take(&format!("attention.attention.key.{p}"), &format!("attn.qkv.{p}"))?;
            let v = take(&format!("attention.attention.value.{p}"), &format!("attn.qkv.{p}"))?;
            if q.shape != k.shape || q.shape != v.shape {
                return Err(CheckpointError::Shape {
                    path: path.to_path_buf(),
                    key: format!("{l}.attention.attention.key.{p}"),
                    found: k.shape.clone(),
                    expected: format!("{:?} (the query's shape)", q.shape),
                });
            }
            out.insert(format!("{t}.attn.qkv.{p}"), HostTensor::cat0(&[&q, &k, &v]));
            out.insert(format!("{t}.attn.proj.{p}"), take(&format!("attention.output.dense.{p}"), &format!("attn.proj.{p}"))?);
            out.insert(format!("{t}.mlp.fc1.{p}"), take(&format!("{fc1}.{p}"), &format!("mlp.fc1.{p}"))?);
            out.insert(format!("{t}.mlp.fc2.{p}"), take(&format!("{fc2}.{p}"), &format!("mlp.fc2.{p}"))?);
        }
        if naming == SourceNaming::HfDinov2 {
            out.insert(format!("{t}.ls1.gamma"), take("layer_scale1.lambda1", "ls1.gamma")?);
            out.insert(format!("{t}.ls2.gamma"), take("layer_scale2.lambda1", "ls2.gamma")?);
        }
        i += 1;
    }
    out.insert("norm.weight".into(), raw.take(path, "layernorm.weight", "norm.weight")?);
    out.insert("norm.bias".into(), raw.take(path, "layernorm.bias", "norm.bias")?);
    for (key, t) in std::mem::take(&mut raw.tensors) {
        if key.starts_with("pooler.") {
            dropped.insert(key, "tanh pooler (not part of the feature extractor)".into());
        } else if key.starts_with("embeddings.mask_token") {
            dropped.insert(key, "masked-image-modelling token (training only)".into());
        } else {
            // Unknown: kept under its source name so the model loader reports it as unexpected.
            out.insert(key, t);
        }
    }
    Ok(out)
}
