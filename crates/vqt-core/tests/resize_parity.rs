//! Resizing against the references of fixtures/resize (tools/gen_resize_fixture.py):
//! `tf-bilinear` against TensorFlow's `tf.image.resize(bilinear, antialias=False)` to 1e-4, and
//! the `image`-crate filters against PIL (what timm/torchvision feed models) to PIL's rounding (bilinear within one 8-bit level).

use safetensors::SafeTensors;
use std::sync::Arc;
use vqt_core::data::preprocess::{Normalization, Preprocess, ResizeFilter};
use vqt_core::data::RawImage;

fn fixture() -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/resize/resize.safetensors");
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn f32s(t: &SafeTensors, name: &str) -> Vec<f32> {
    let v = t.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    match v.dtype() {
        safetensors::Dtype::F32 => v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        safetensors::Dtype::U8 => v.data().iter().map(|&b| b as f32).collect(),
        d => panic!("{name}: {d:?}"),
    }
}

/// The fixture's inputs; `grey28` as a 1-channel image (the fixture holds it replicated), so the
/// grey -> RGB path is covered too.
fn input(t: &SafeTensors, name: &str) -> RawImage {
    let v = t.tensor(&format!("in_{name}")).unwrap();
    let (h, w) = (v.shape()[0], v.shape()[1]);
    if name.starts_with("grey") {
        let px: Vec<u8> = v.data().chunks_exact(3).map(|p| p[0]).collect();
        RawImage { height: h, width: w, channels: 1, pixels: Arc::from(px) }
    } else {
        RawImage { height: h, width: w, channels: 3, pixels: Arc::from(v.data().to_vec()) }
    }
}

/// Our output in the fixture's HWC layout and 0..255 scale.
fn ours(img: &RawImage, s: usize, filter: ResizeFilter) -> Vec<f32> {
    let (chw, _) = Preprocess::new(s, filter, Normalization::None).batch(&[img]);
    let mut hwc = vec![0.0; chw.len()];
    for c in 0..3 {
        for i in 0..s * s {
            hwc[i * 3 + c] = chw[c * s * s + i] * 255.0;
        }
    }
    hwc
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

const CASES: [(&str, [usize; 2]); 3] = [("grey28", [112, 20]), ("rgb37x23", [64, 16]), ("rgb180x120", [96, 56])];

#[test]
fn tf_bilinear_matches_tensorflow() {
    let bytes = fixture();
    let t = SafeTensors::deserialize(&bytes).unwrap();
    for (name, sizes) in CASES {
        let img = input(&t, name);
        for s in sizes {
            let d = max_diff(&ours(&img, s, ResizeFilter::TfBilinear), &f32s(&t, &format!("tf_{name}_{s}")));
            // 1e-4 of the [0, 1] range the model sees, stated in 8-bit units.
            assert!(d <= 255.0 * 1e-4, "{name} -> {s}: max |ours - tf| = {d} (of 255)");
        }
    }
}

#[test]
fn image_bilinear_is_tf_bilinear_when_enlarging() {
    let bytes = fixture();
    let t = SafeTensors::deserialize(&bytes).unwrap();
    for (name, s) in [("grey28", 112), ("rgb37x23", 64)] {
        let img = input(&t, name);
        let d = max_diff(&ours(&img, s, ResizeFilter::Bilinear), &f32s(&t, &format!("tf_{name}_{s}")));
        assert!(d <= 255.0 * 1e-4, "{name} -> {s}: max |bilinear - tf| = {d}");
    }
    // Shrinking, the antialiased filter averages more pixels: it must differ from TF's.
    let img = input(&t, "rgb180x120");
    let d = max_diff(&ours(&img, 56, ResizeFilter::Bilinear), &f32s(&t, "tf_rgb180x120_56"));
    assert!(d > 1.0, "antialiased shrink equals TF's two-tap bilinear (max diff {d})");
}

#[test]
fn image_filters_match_pil_within_rounding() {
    // PIL works in fixed point and rounds to u8 after each of its two passes. Bilinear stays
    // within one level of it everywhere. Bicubic's horizontal pass overshoots and PIL clamps it
    // to 0..255 before the vertical pass, while we clamp once at the end: on this noisy input
    // that moves a few pixels by up to ~5 levels, with a mean difference under half a level.
    let bytes = fixture();
    let t = SafeTensors::deserialize(&bytes).unwrap();
    for (filter, key, max_tol, mean_tol) in [(ResizeFilter::Bilinear, "pil", 1.0f32, 0.5f32), (ResizeFilter::Bicubic, "pilcubic", 6.0, 0.5)] {
        for (name, sizes) in CASES {
            let img = input(&t, name);
            for s in sizes {
                let (a, b) = (ours(&img, s, filter), f32s(&t, &format!("{key}_{name}_{s}")));
                let (d, mean) = (max_diff(&a, &b), a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32);
                eprintln!("{filter:?} {name} -> {s}: |ours - PIL| max {d:.3}, mean {mean:.3} (of 255)");
                assert!(d <= max_tol + 1e-3 && mean <= mean_tol, "{filter:?} {name} -> {s}: |ours - PIL| max {d}, mean {mean} (of 255)");
            }
        }
    }
}
