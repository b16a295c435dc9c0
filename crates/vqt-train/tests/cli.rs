//! `vqt-train` end to end through the binary: real training on a small generated IDX dataset,
//! `run.json`, and one-line errors for bad input.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vqt-train"))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vqt-train-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn idx(path: &Path, dims: &[u32], data: &[u8]) {
    let mut out = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(&out).unwrap();
    std::fs::write(path, e.finish().unwrap()).unwrap();
}

/// 3 classes of 28x28 images: a bright band in the top, middle or bottom third, plus noise.
fn dataset(dir: &Path, n: usize, name: &str) {
    let mut px = Vec::with_capacity(n * 784);
    let mut labels = Vec::with_capacity(n);
    let mut state = 12345u64 + n as u64;
    for i in 0..n {
        let class = i % 3;
        labels.push(class as u8);
        for r in 0..28 {
            for _ in 0..28 {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let noise = (state >> 58) as u8; // 0..63
                let band = r / 10 == class;
                px.push(if band { 180 + noise } else { noise });
            }
        }
    }
    idx(&dir.join(format!("{name}-images.gz")), &[n as u32, 28, 28], &px);
    idx(&dir.join(format!("{name}-labels.gz")), &[n as u32], &labels);
}

fn config(dir: &Path, method: &str, cache: &str) -> PathBuf {
    dataset(dir, 60, "train");
    dataset(dir, 30, "test");
    let ckpt = root().join("fixtures/tiny-a/vit.safetensors");
    let text = format!(
        r#"
[backbone]
img_size = 32
checkpoint = "{ckpt}"
[backbone.custom]
img_size = 32
patch_size = 8
embed_dim = 64
depth = 4
num_heads = 4

[method]
{method}

[data]
kind = "idx"
train_images = "{d}/train-images.gz"
train_labels = "{d}/train-labels.gz"
test_images = "{d}/test-images.gz"
test_labels = "{d}/test-labels.gz"
num_classes = 3
train_range = [0, 48]
val_range = [48, 60]

[train]
epochs = 20
batch_size = 16
lr = 0.01
warmup_epochs = 1
cache = "{cache}"
num_workers = 1
"#,
        ckpt = ckpt.display(),
        d = dir.display()
    );
    let p = dir.join("exp.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn train_ok(tag: &str, method: &str, cache: &str, backend: &str, extra: &[&str]) -> serde_json::Value {
    let d = tmp(tag);
    let cfg = config(&d, method, cache);
    let out = d.join("run");
    let o = bin().args(["train", "--backend", backend, "--config"]).arg(&cfg).arg("--out").arg(&out).args(extra).output().unwrap();
    assert!(o.status.success(), "{tag}: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let rec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(rec["split_sizes"], serde_json::json!([48, 12, 30]));
    assert_eq!(rec["backend"], backend);
    assert_eq!(rec["checkpoint"]["sha256"].as_str().unwrap().len(), 64);
    assert!(rec["config"]["train"]["epochs"].as_u64().unwrap() > 0);
    rec
}

#[test]
fn vqt_trains_from_the_cache_on_cpu_and_learns() {
    let rec = train_ok("vqt-cpu", "kind = \"vqt\"\nnum_queries = 2", "kv", "cpu", &[]);
    assert_eq!(rec["method"], "vqt");
    assert_eq!(rec["trainable_params"], 4 * 2 * 64 + (64 * (1 + 4 * 2) + 1) * 3);
    assert_eq!(rec["cache"]["mode"], "kv");
    // The band position is trivially separable: a working pipeline beats chance (33%) by far.
    assert!(rec["test_accuracy"].as_f64().unwrap() > 60.0, "{rec}");
}

#[test]
fn synqt_trains_without_cache_on_wgpu() {
    let rec = train_ok(
        "synqt-wgpu",
        "kind = \"synqt\"\nnum_tokens = 1\nfeat_scale = 0.1\nattn_scale = 0.1\nffn_scale = 0.1",
        "off",
        "wgpu-cpu",
        &["--set", "train.epochs=2"],
    );
    assert_eq!(rec["config"]["train"]["epochs"], 2);
    assert_eq!(rec["method"], "synqt");
    assert!(rec["cache"].is_null());
    assert!(rec["test_accuracy"].as_f64().unwrap() >= 0.0);
}

fn err_of(args: &[&str]) -> String {
    let o = bin().args(args).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{args:?}");
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(e.trim_end().lines().count(), 1, "not one line: {e}");
    e
}

#[test]
fn bad_input_is_one_line_with_exit_code_2() {
    let d = tmp("bad");
    let cfg = config(&d, "kind = \"linear\"", "kv");
    let cfg_s = cfg.to_str().unwrap();
    let e = err_of(&["train", "--config", "/nope/exp.toml"]);
    assert!(e.contains("/nope/exp.toml: "), "{e}");
    let e = err_of(&["train", "--backend", "tpu", "--config", cfg_s]);
    assert!(e.contains("unknown backend `tpu`"), "{e}");
    #[cfg(not(feature = "cuda"))]
    {
        let e = err_of(&["train", "--backend", "cuda", "--config", cfg_s]);
        assert!(e.contains("rebuild with `--features cuda`"), "{e}");
    }
    let e = err_of(&["train", "--config", cfg_s, "--set", "train.epochz=3"]);
    assert!(e.contains("exp.toml") && e.contains("epochz"), "{e}");
    let e = err_of(&["train", "--config", cfg_s, "--set", "train.epochs=\"three\""]);
    assert!(e.contains("exp.toml") && e.contains("invalid type"), "{e}");
    let e = err_of(&["train", "--config", cfg_s, "--set", "data.train_images=/nope/train.gz"]);
    assert!(e.contains("/nope/train.gz: "), "{e}");
    let e = err_of(&["train", "--config", cfg_s, "--set", "backbone.custom.depth=3"]);
    assert!(e.contains("vit.safetensors: checkpoint has 4 blocks, the model has 3"), "{e}");
    let e = err_of(&["train", "--config", cfg_s, "--set", "train.cache=\"kv\"", "--set", "train.trunk_drop_path=0.1"]);
    assert!(e.contains("set train.cache = \\\"off\\\"") || e.contains("set train.cache = \"off\""), "{e}");
    let e = err_of(&["train", "--config", cfg_s, "--set", "data.train_range=[0, 500]"]);
    assert!(e.contains("data.train_range [0, 500] exceeds the 60 images"), "{e}");
}
