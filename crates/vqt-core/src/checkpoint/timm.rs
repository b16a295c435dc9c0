//! timm `VisionTransformer` state dicts: already canonical, up to wrapping prefixes and
//! training-only tensors.

use super::{CheckpointError, RawTensors};
use crate::tensor_map::HostTensor;
use std::collections::BTreeMap;
use std::path::Path;

/// Source-key prefixes that carry nothing for the backbone (MAE decoder, masking token).
const TRAINING_ONLY: [(&str, &str); 3] = [
    ("decoder", "MAE pre-training decoder"),
    ("mask_token", "masked-image-modelling token"),
    ("dist_token", "DeiT distillation token (not supported)"),
];

/// Strips DDP/`model.` prefixes and drops training-only tensors. Everything else is kept under
/// its timm name; the model loader decides what is used.
pub fn convert(
    _path: &Path,
    raw: RawTensors,
    dropped: &mut BTreeMap<String, String>,
) -> Result<BTreeMap<String, HostTensor>, CheckpointError> {
    let mut out = BTreeMap::new();
    for (key, t) in raw.tensors {
        let canon = key.strip_prefix("module.").unwrap_or(&key);
        if let Some((_, why)) = TRAINING_ONLY.iter().find(|(p, _)| canon.starts_with(p)) {
            dropped.insert(key.clone(), why.to_string());
            continue;
        }
        out.insert(canon.to_string(), t);
    }
    Ok(out)
}
