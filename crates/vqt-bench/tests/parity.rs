//! Every committed fixture must pass on every CPU-reachable backend (wgpu runs on Mesa llvmpipe).

use burn::tensor::{Device, DeviceKind};
use std::path::PathBuf;

fn fixtures() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("fixtures/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 9, "expected the committed fixtures tiny-a..tiny-i, found {dirs:?}");
    dirs
}

fn check_all(device: Device, name: &str) {
    let mut failures = Vec::new();
    for dir in fixtures() {
        let r = vqt_bench::parity::run(&dir, &device).unwrap_or_else(|e| panic!("{name}: {e}"));
        vqt_bench::parity::print_report(&r);
        if !r.passed() {
            failures.push(dir.display().to_string());
        }
    }
    assert!(failures.is_empty(), "{name}: parity failed for {failures:?}");
}

#[test]
fn parity_cpu_flex() {
    check_all(Device::flex(), "cpu");
}

#[allow(deprecated)]
#[test]
fn parity_ndarray() {
    check_all(Device::ndarray(), "ndarray");
}

#[test]
fn parity_wgpu() {
    check_all(Device::wgpu(DeviceKind::Cpu), "wgpu");
}

#[test]
fn tiny_a_runs_both_vit_and_vqt_checks() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-a");
    let r = vqt_bench::parity::run(&dir, &Device::flex()).unwrap();
    assert!(r.unsupported.is_empty(), "{:?}", r.unsupported);
    let n_vit = r.lines.iter().filter(|l| l.check == "vit").count();
    let n_vqt = r.lines.iter().filter(|l| l.check == "vqt").count();
    assert_eq!((n_vit, n_vqt), (6, 10));
}

#[test]
fn tuner_fixtures_check_every_trainable_gradient() {
    // tiny-g LoRA, tiny-h AdaptFormer, tiny-i VQT + LoRA + AdaptFormer (tools/gen_tuner_fixtures.py).
    for (name, grads) in [("tiny-g", 12 + 2), ("tiny-h", 12 + 2), ("tiny-i", 12 + 12 + 3)] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name);
        let r = vqt_bench::parity::run(&dir, &Device::flex()).unwrap();
        assert!(r.passed(), "{name}");
        let n = r.lines.iter().filter(|l| l.check == "tuned" && l.tensor.starts_with("tuned.grad.")).count();
        assert_eq!(n, grads, "{name}");
    }
}
