//! Checkpoint loading: reports, and one-line errors for every kind of bad checkpoint.

use burn::tensor::Device;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vqt_core::checkpoint::{CheckpointFormat, load_checkpoint};
use vqt_models::vit::pos_embed::PosResample;
use vqt_models::VitConfig;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

fn tiny_a() -> VitConfig {
    VitConfig {
        img_size: 32,
        patch_size: 8,
        in_chans: 3,
        embed_dim: 64,
        depth: 4,
        num_heads: 4,
        mlp_ratio: 4.0,
        qkv_bias: true,
        layer_norm_eps: 1e-6,
        layer_scale_init: None,
        num_classes: 5,
    }
}

fn tmp(tag: &str) -> vqt_core::testing::TestDir {
    vqt_core::testing::TestDir::new(&format!("load-{tag}"))
}

fn load_err(cfg: &VitConfig, path: &Path, format: CheckpointFormat) -> String {
    let map = match load_checkpoint(path, format) {
        Ok(m) => m,
        Err(e) => return e.to_string(),
    };
    match cfg.init(&Device::flex()).load_tensor_map(map, PosResample::TimmBicubicAntialias) {
        Ok(_) => panic!("loading {} should have failed", path.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites a safetensors file with `edit` applied to its (name -> (shape, f32 data)) map.
fn rewrite(src: &Path, dst: &Path, edit: impl FnOnce(&mut BTreeMap<String, (Vec<usize>, Vec<f32>)>)) {
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut map: BTreeMap<String, (Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let data = v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            (k, (v.shape().to_vec(), data))
        })
        .collect();
    edit(&mut map);
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = map
        .into_iter()
        .map(|(k, (s, d))| (k, s, d.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = raw
        .iter()
        .map(|(k, s, b)| (k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, dst).unwrap();
}

#[test]
fn loads_timm_checkpoint_with_report() {
    let path = fixture("tiny-a/vit.safetensors");
    let map = load_checkpoint(&path, CheckpointFormat::Auto).unwrap();
    let (_vit, report) = tiny_a().init(&Device::flex()).load_tensor_map(map, PosResample::TimmBicubicAntialias).unwrap();
    // 4 backbone-level + 4 blocks x 12 + 2 norm + 2 head
    assert_eq!(report.applied.len(), 4 + 4 * 12 + 2 + 2, "{report}");
    assert!(report.head_loaded);
    assert!(report.ignored.is_empty() && report.pos_embed_resampled.is_none());
    assert_eq!(report.provenance.sha256, vqt_core::hash::sha256_file(&path).unwrap());
    assert_eq!(report.provenance.sha256.len(), 64);
}

#[test]
fn other_task_head_is_fresh_and_reported() {
    let map = load_checkpoint(&fixture("tiny-a/vit.safetensors"), CheckpointFormat::Timm).unwrap();
    let (_, report) = tiny_a().with_num_classes(3).init(&Device::flex()).load_tensor_map(map, PosResample::Bicubic).unwrap();
    assert!(!report.head_loaded);
    assert!(report.ignored["head.*"].contains("the task needs 3 classes"), "{report}");
    let map = load_checkpoint(&fixture("tiny-a/vit.safetensors"), CheckpointFormat::Timm).unwrap();
    let (_, report) = tiny_a().with_num_classes(0).init(&Device::flex()).load_tensor_map(map, PosResample::Bicubic).unwrap();
    assert!(report.ignored.contains_key("head.weight"), "{report}");
}

#[test]
fn position_table_is_resampled_for_other_sizes() {
    let map = load_checkpoint(&fixture("tiny-a/vit.safetensors"), CheckpointFormat::Timm).unwrap();
    let (vit, report) = tiny_a().with_img_size(48).init(&Device::flex()).load_tensor_map(map, PosResample::TimmBicubicAntialias).unwrap();
    assert_eq!(report.pos_embed_resampled.as_deref(), Some("resampled 4x4 -> 6x6 with timm-bicubic-antialias"));
    assert_eq!(vit.num_tokens(), 37);
}

#[test]
fn another_architecture_is_rejected_naming_file_and_key() {
    let path = fixture("tiny-a/vit.safetensors");
    let mut shallow = tiny_a();
    shallow.depth = 3;
    let e = load_err(&shallow, &path, CheckpointFormat::Auto);
    assert!(e.ends_with("vit.safetensors: checkpoint has 4 blocks, the model has 3 (another architecture?)"), "{e}");

    let mut narrow = tiny_a();
    narrow.embed_dim = 32;
    let e = load_err(&narrow, &path, CheckpointFormat::Auto);
    assert!(e.contains("vit.safetensors: tensor `patch_embed.proj.weight` has shape [64, 3, 8, 8], the model needs [32, 3, 8, 8]"), "{e}");

    let mut no_bias = tiny_a();
    no_bias.qkv_bias = false;
    let e = load_err(&no_bias, &path, CheckpointFormat::Auto);
    assert!(e.contains("unexpected tensor `blocks.0.attn.qkv.bias` and 3 more"), "{e}");

    let mut ls = tiny_a();
    ls.layer_scale_init = Some(1e-5);
    let e = load_err(&ls, &path, CheckpointFormat::Auto);
    assert!(e.contains("missing tensor `blocks.0.ls1.gamma` (expected shape [64])"), "{e}");
    assert_eq!(e.lines().count(), 1);
}

#[test]
fn wrong_shaped_and_missing_tensors_are_named() {
    let d = tmp("shape");
    let bad = d.join("bad.safetensors");
    rewrite(&fixture("tiny-a/vit.safetensors"), &bad, |m| {
        let (s, _) = m.get_mut("blocks.2.mlp.fc1.weight").unwrap();
        *s = vec![64, 256];
    });
    let e = load_err(&tiny_a(), &bad, CheckpointFormat::Auto);
    assert!(e.contains("bad.safetensors: tensor `blocks.2.mlp.fc1.weight` has shape [64, 256], the model needs [256, 64]"), "{e}");

    let gone = d.join("gone.safetensors");
    rewrite(&fixture("tiny-a/vit.safetensors"), &gone, |m| {
        m.remove("norm.bias");
    });
    let e = load_err(&tiny_a(), &gone, CheckpointFormat::Auto);
    assert!(e.contains("gone.safetensors: missing tensor `norm.bias`"), "{e}");

    // A weight stored as int32 is named with its dtype, not called missing.
    let int = d.join("int.safetensors");
    {
        let bytes = std::fs::read(fixture("tiny-a/vit.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(k, v)| {
                let dtype = if k == "norm.bias" { safetensors::Dtype::I32 } else { v.dtype() };
                (k, dtype, v.shape().to_vec(), v.data().to_vec())
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> =
            owned.iter().map(|(k, t, s, b)| (k.clone(), safetensors::tensor::TensorView::new(*t, s.clone(), b).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &int).unwrap();
    }
    let e = load_err(&tiny_a(), &int, CheckpointFormat::Auto);
    assert!(e.contains("int.safetensors: tensor `norm.bias` has dtype I32 (an integer/boolean tensor; weights must be"), "{e}");

    let alien = d.join("alien.safetensors");
    rewrite(&fixture("tiny-a/vit.safetensors"), &alien, |m| {
        *m = [("encoder.conv1.weight".to_string(), (vec![2], vec![1.0, 2.0]))].into_iter().collect();
    });
    let e = load_err(&tiny_a(), &alien, CheckpointFormat::Auto);
    assert!(e.contains("alien.safetensors: cannot tell the checkpoint's naming (keys like encoder.conv1.weight)"), "{e}");
}

#[test]
fn missing_and_truncated_files() {
    let e = load_err(&tiny_a(), Path::new("/no/such/vit.safetensors"), CheckpointFormat::Auto);
    assert!(e.starts_with("/no/such/vit.safetensors: "), "{e}");

    let d = tmp("trunc");
    for (name, src) in [("t.safetensors", "tiny-a/vit.safetensors"), ("t.npz", "tiny-c/ViT-tiny.npz"), ("t.pth", "tiny-b/vit.pth")] {
        let bytes = std::fs::read(fixture(src)).unwrap();
        let p = d.join(name);
        std::fs::write(&p, &bytes[..bytes.len() * 2 / 3]).unwrap();
        let e = load_err(&tiny_a(), &p, CheckpointFormat::Auto);
        assert!(e.contains(&format!("{name}: not a readable")), "{name}: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
    let p = d.join("weights.onnx");
    std::fs::write(&p, b"xx").unwrap();
    let e = load_err(&tiny_a(), &p, CheckpointFormat::Auto);
    assert!(e.contains("weights.onnx: not a readable checkpoint file: unknown extension `.onnx`"), "{e}");
}

#[test]
fn hf_checkpoint_missing_source_key_is_named() {
    let d = tmp("hf");
    let p = d.join("model.safetensors");
    rewrite(&fixture("tiny-d/model.safetensors"), &p, |m| {
        m.remove("encoder.layer.1.norm2.weight");
    });
    let cfg = VitConfig { img_size: 28, patch_size: 7, embed_dim: 48, depth: 2, num_heads: 4, layer_scale_init: Some(1.0), num_classes: 0, ..tiny_a() };
    let e = load_err(&cfg, &p, CheckpointFormat::Auto);
    assert!(e.contains("model.safetensors: missing tensor `encoder.layer.1.norm2.weight` (needed for blocks.1.norm2.weight)"), "{e}");
}
