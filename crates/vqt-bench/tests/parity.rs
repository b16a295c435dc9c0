//! Every committed fixture must pass on every CPU-reachable backend: Flex and ndarray in this
//! process, wgpu (Mesa's CPU adapter) through the `vqt-bench parity` binary in a child process
//! with a time limit, so a GPU runtime that hangs fails the test with its last output instead of
//! holding the test run forever. Vulkan (`parity_vulkan`) is ignored by default, see there.

use burn::tensor::Device;
use std::path::PathBuf;
use std::process::Command;

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

/// The tests of this file run one at a time (each check already uses both cores).
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

/// `fixtures` on a GPU-runtime backend, each fixture in its own `vqt-bench parity` child within
/// `VQT_GPU_CHECK_LIMIT_S` (default 600 s); each JSON report must pass every tensor.
fn check_gpu(backend: &str, dirs: &[PathBuf]) {
    let _one_at_a_time = serial();
    let limit = vqt_core::process::gpu_check_limit(600);
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let tmp = vqt_core::testing::TestDir::new("parity");
        let json = tmp.join(format!("{backend}-{name}.json"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vqt-bench"));
        cmd.arg("parity").arg(dir).args(["--backend", backend, "--json"]).arg(&json);
        let t = std::time::Instant::now();
        let o = vqt_core::process::output_within(&mut cmd, limit).unwrap_or_else(|e| panic!("parity {name} on {backend}: {e}"));
        let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "parity {name} on {backend} failed:\n{out}\n{err}");
        let reports: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(reports.len(), 1, "{name} on {backend}: one report");
        let lines = reports[0]["lines"].as_array().unwrap();
        let ok = lines.iter().all(|l| l["ok"] == true) && reports[0]["unsupported"].as_array().unwrap().is_empty();
        assert!(!lines.is_empty() && ok, "{name} on {backend}: {}", reports[0]);
        eprintln!("parity {name} on {backend}: {} tensors passed in {:.0} s", lines.len(), t.elapsed().as_secs_f64());
    }
}

/// tiny-i (VQT + LoRA + AdaptFormer, forward and every gradient) on wgpu-cpu: Mesa's llvmpipe
/// spends more than 400 s compiling one of cubecl's autotune candidates for its fused matmuls (a
/// double-buffered `MatmulEntry<FusedMatmulArgs, ..>`, inside LLVM 15's coroutine splitting;
/// measured, docs/guide/backends.md), so it runs only on request. tiny-g and tiny-h check the same
/// LoRA and AdaptFormer gradients on wgpu by default; tiny-i passes on cpu and ndarray.
const SLOW_ON_LLVMPIPE: &[&str] = &["tiny-i"];

#[test]
fn parity_wgpu() {
    let dirs: Vec<PathBuf> = fixtures()
        .into_iter()
        .filter(|d| !SLOW_ON_LLVMPIPE.contains(&d.file_name().unwrap().to_str().unwrap()))
        .collect();
    assert_eq!(dirs.len(), 8);
    check_gpu("wgpu-cpu", &dirs);
}

#[test]
#[ignore = "llvmpipe takes minutes to compile one fused-matmul autotune candidate of tiny-i; run with --ignored"]
fn parity_wgpu_tiny_i() {
    let dirs: Vec<PathBuf> = fixtures().into_iter().filter(|d| d.ends_with("tiny-i")).collect();
    check_gpu("wgpu-cpu", &dirs);
}

/// Not run by default: Mesa's lavapipe (the only Vulkan device without a GPU) segfaults inside
/// `vkCreateComputePipelines` on cubecl's SPIR-V matmul kernels (Mesa 22.3.6 and 25.0.7, LLVM 15;
/// see docs/guide/backends.md). On a machine with a working Vulkan driver:
/// `cargo test --workspace --locked --all-targets -- --ignored vulkan`.
#[test]
#[ignore = "needs a Vulkan driver that compiles cubecl's SPIR-V (lavapipe crashes); run with --ignored"]
fn parity_vulkan() {
    check_gpu("vulkan-cpu", &fixtures());
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
