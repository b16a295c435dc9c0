//! Helpers shared by the binary's end-to-end tests: the binary, temp dirs, a small generated
//! IDX dataset with its config, and generated VTAB task trees (NOAH layout).

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The `vqt-train` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vqt-train"))
}

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh temp directory for one test (`tag`), removed when dropped unless the test fails.
pub fn tmp(tag: &str) -> vqt_core::testing::TestDir {
    vqt_core::testing::TestDir::new(&format!("train-cli-{tag}"))
}

/// Writes a gzip IDX file (`dims`, u8 `data`).
pub fn idx(path: &Path, dims: &[u32], data: &[u8]) {
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
pub fn dataset(dir: &Path, n: usize, name: &str) {
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

/// A config in `dir` for the tiny fixture ViT (`fixtures/tiny-a`, 32 px) on a generated IDX
/// dataset (48 train / 12 val of 60, 30 test), with `method` as the `[method]` body.
pub fn config(dir: &Path, method: &str, cache: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
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

/// A VTAB-1k task tree in the NOAH layout with 24/6/30/9 images (3 classes of bands).
pub fn vtab_task_tree(root: &Path, folder: &str) {
    let task = root.join(folder);
    for (split, n) in [("train800", 24), ("val200", 6), ("train800val200", 30), ("test", 9)] {
        let mut lines = String::new();
        for i in 0..n {
            let class = i % 3;
            let img = image::GrayImage::from_fn(28, 28, |_, y| image::Luma([if y as usize / 10 == class { 220 } else { 20 + (i * 7 % 30) as u8 }]));
            let rel = format!("images/{split}/{i:06}.png");
            std::fs::create_dir_all(task.join(format!("images/{split}"))).unwrap();
            img.save(task.join(&rel)).unwrap();
            lines += &format!("{rel} {class}\n");
        }
        std::fs::write(task.join(format!("{split}.txt")), lines).unwrap();
    }
}

