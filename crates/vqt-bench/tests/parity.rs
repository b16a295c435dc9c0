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

/// The tests of this file run one at a time: the wgpu-on-CPU check once deadlocked inside
/// cubecl's autotune while the CPU was saturated by the other checks running beside it.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn check_all(device: Device, name: &str) {
    let _one_at_a_time = serial();
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
    let _one_at_a_time = serial();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-a");
    let r = vqt_bench::parity::run(&dir, &Device::flex()).unwrap();
    assert!(r.unsupported.is_empty(), "{:?}", r.unsupported);
    let n_vit = r.lines.iter().filter(|l| l.check == "vit").count();
    let n_vqt = r.lines.iter().filter(|l| l.check == "vqt").count();
    assert_eq!((n_vit, n_vqt), (6, 10));
}

#[test]
fn tuner_fixtures_check_every_trainable_gradient() {
    let _one_at_a_time = serial();
    // tiny-g LoRA, tiny-h AdaptFormer, tiny-i VQT + LoRA + AdaptFormer (tools/gen_tuner_fixtures.py).
    for (name, grads) in [("tiny-g", 12 + 2), ("tiny-h", 12 + 2), ("tiny-i", 12 + 12 + 3)] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name);
        let r = vqt_bench::parity::run(&dir, &Device::flex()).unwrap();
        assert!(r.passed(), "{name}");
        let n = r.lines.iter().filter(|l| l.check == "tuned" && l.tensor.starts_with("tuned.grad.")).count();
        assert_eq!(n, grads, "{name}");
    }
}
