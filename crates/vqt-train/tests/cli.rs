//! `vqt-train` end to end through the binary: real training on a small generated IDX dataset,
//! `run.json`, and one-line errors for bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{bin, config, dataset, root, tmp, vtab_task_tree};


/// Trains in a fresh temp dir (returned with the run record; its run is `dir/run`).
fn train_ok(tag: &str, method: &str, cache: &str, backend: &str, extra: &[&str]) -> (vqt_core::testing::TestDir, serde_json::Value) {
    let d = tmp(tag);
    let cfg = config(&d, method, cache);
    let rec = train_in(tag, &cfg, &d.join("run"), backend, extra);
    assert_eq!(rec["split_sizes"], serde_json::json!([48, 12, 30]));
    (d, rec)
}

/// Runs the binary; on a GPU-runtime backend within `VQT_GPU_CHECK_LIMIT_S` (default 900 s), so a
/// hung runtime fails the test with its last output.
fn run_on(backend: &str, cmd: &mut Command) -> std::process::Output {
    let gpu = backend.parse::<vqt_core::BackendKind>().map(|b| b.is_gpu_runtime()).unwrap_or(false);
    if !gpu {
        return cmd.output().unwrap();
    }
    vqt_core::process::output_within(cmd, vqt_core::process::gpu_check_limit(900)).unwrap_or_else(|e| panic!("{backend}: {e}"))
}

fn train_in(tag: &str, cfg: &Path, out: &Path, backend: &str, extra: &[&str]) -> serde_json::Value {
    let o = run_on(backend, bin().args(["train", "--backend", backend, "--config"]).arg(cfg).arg("--out").arg(out).args(extra));
    assert!(o.status.success(), "{tag}: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let rec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(rec["backend"], backend);
    assert_eq!(rec["checkpoint"]["sha256"].as_str().unwrap().len(), 64);
    assert!(rec["config"]["train"]["epochs"].as_u64().unwrap() > 0);
    rec
}

#[test]
fn vqt_trains_from_the_cache_on_cpu_and_learns() {
    let (_dir, rec) = train_ok("vqt-cpu", "kind = \"vqt\"\nnum_queries = 2", "kv", "cpu", &[]);
    assert_eq!(rec["method"], "vqt");
    assert_eq!(rec["trainable_params"], 4 * 2 * 64 + (64 * (1 + 4 * 2) + 1) * 3);
    assert_eq!(rec["cache"]["mode"], "kv");
    // The band position is trivially separable: a working pipeline beats chance (33%) by far.
    assert!(rec["test_accuracy"].as_f64().unwrap() > 60.0, "{rec}");
    // The record names the commit the binary was built from, when built in a git checkout
    // (cargo rebuilds the binary when HEAD or the index change, so it is this HEAD).
    let head = Command::new("git").arg("-C").arg(root()).args(["rev-parse", "HEAD"]).output().ok().filter(|o| o.status.success());
    if let Some(head) = head {
        let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
        let rev = rec["git_revision"].as_str().unwrap_or_else(|| panic!("no git_revision in a git checkout at {head}: {rec}"));
        assert!(rev.starts_with(&head), "git_revision {rev} is not HEAD {head}");
    }
}

#[test]
fn synqt_trains_without_cache_on_wgpu() {
    let (dir, rec) = train_ok(
        "synqt-wgpu",
        "kind = \"synqt\"\nnum_tokens = 1\nfeat_scale = 0.1\nattn_scale = 0.1\nffn_scale = 0.1",
        "off",
        "wgpu-cpu",
        &["--set", "train.epochs=2"],
    );
    assert_eq!(rec["config"]["train"]["epochs"], 2);
    assert_eq!(rec["method"], "synqt");
    assert!(rec["cache"].is_null());
    // The recorded accuracy is a real score of the saved model: `eval` on the same backend
    // rebuilds the model from run.json and the trainable file and gets the same number.
    let acc = rec["test_accuracy"].as_f64().unwrap();
    let run = dir.join("run");
    let o = run_on("wgpu-cpu", bin().args(["eval", "--backend", "wgpu-cpu", "--run"]).arg(&run));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = format!("Test accuracy {acc:.2}% (30 images)");
    assert!(String::from_utf8_lossy(&o.stdout).contains(&want), "{} lacks {want}", String::from_utf8_lossy(&o.stdout));
}

fn err_of(args: &[&str]) -> String {
    // In a fresh working directory, so the default `--out runs/latest` of one test never meets
    // another test's run.
    let cwd = tmp("cwd");
    let o = bin().current_dir(&cwd).args(args).output().unwrap();
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
    let e = err_of(&["train", "--config", cfg_s, "--set", "backbone.augment=\"crop-flip\"", "--set", "backbone.resize_size=40"]);
    assert!(e.contains("exp.toml") && e.contains("backbone.augment = \"crop-flip\"") && e.contains("train.cache"), "{e}");
    let e = err_of(&["train", "--config", cfg_s, "--set", "backbone.resize_size=28"]);
    assert!(e.contains("exp.toml: backbone.resize_size 28 is smaller than img_size 32"), "{e}");
    let e = err_of(&["train", "--config", cfg_s, "--set", "backbone.augment=\"mixup\""]);
    assert!(e.contains("exp.toml") && e.contains("mixup"), "{e}");
    let e = err_of(&["train", "--config", cfg_s, "--set", "data.train_range=[0, 500]", "--set", "data.val_range=[500, 510]"]);
    assert!(e.contains("data.train_range [0, 500] exceeds the 60 images"), "{e}");
}

/// `vqt-train --backend X` without a subcommand is the default demo run; without its config or
/// its assets it says what to do in one line (and fetches nothing).
#[test]
fn no_subcommand_is_the_default_run_and_names_what_is_missing() {
    let e = err_of(&["--backend", "cpu"]);
    assert!(e.contains("configs/experiments/fmnist-dinov2s-vqt.toml not found: run vqt-train from the repository root"), "{e}");
    let cwd = tmp("default-run");
    std::fs::create_dir_all(cwd.join("configs/experiments")).unwrap();
    std::fs::copy(root().join("configs/experiments/fmnist-dinov2s-vqt.toml"), cwd.join("configs/experiments/fmnist-dinov2s-vqt.toml")).unwrap();
    let o = bin().current_dir(&cwd).args(["--backend", "cpu"]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "not one line: {e}");
    assert!(e.contains("assets-cache/dinov2-s14/model.safetensors: missing: run `bash scripts/fetch-assets.sh` first"), "{e}");
    assert!(!cwd.join("assets-cache").exists() && !cwd.join("runs").exists(), "nothing is fetched or written");
}

const ADAPTFORMER: &str = "kind = \"linear\"\n[tuners.adaptformer]\nbottleneck = 4\nscale = 0.1\ndropout = 0.0";

/// A tuned method (AdaptFormer, full path) and VQT from the feature cache (trunk path) through
/// the binary on a GPU-runtime backend.
fn tuned_and_cached_vqt_train_on(backend: &str) {
    let (_dir, rec) = train_ok(&format!("af-{backend}"), ADAPTFORMER, "auto", backend, &["--set", "train.epochs=2"]);
    assert_eq!(rec["method"], "adaptformer");
    assert_eq!(rec["path"], "full");
    assert!(rec["cache"].is_null(), "a tuned trunk cannot be cached");
    // 4 blocks x (64*4 + 4 + 4*64 + 64) adapter params + the 64x3 head.
    assert_eq!(rec["trainable_params"], 4 * (64 * 4 + 4 + 4 * 64 + 64) + 64 * 3 + 3);
    assert_eq!(rec["epochs"].as_array().unwrap().len(), 2);
    let (_dir, rec) = train_ok(&format!("vqt-{backend}"), "kind = \"vqt\"\nnum_queries = 1", "auto", backend, &["--set", "train.epochs=2"]);
    assert_eq!((rec["method"].as_str(), rec["path"].as_str(), rec["cache"]["mode"].as_str()), (Some("vqt"), Some("trunk"), Some("kv")));
    assert!(rec["test_accuracy"].as_f64().is_some_and(f64::is_finite), "{rec}");
}

#[test]
fn adaptformer_and_vqt_train_on_wgpu_through_the_binary() {
    tuned_and_cached_vqt_train_on("wgpu-cpu");
}

/// Ignored by default for the reason `parity_vulkan` (crates/vqt-bench/tests/parity.rs) gives.
#[test]
#[ignore = "needs a Vulkan driver that compiles cubecl's SPIR-V (lavapipe crashes); run with --ignored"]
fn adaptformer_and_vqt_train_on_vulkan_through_the_binary() {
    tuned_and_cached_vqt_train_on("vulkan-cpu");
}

fn epoch_losses(rec: &serde_json::Value) -> Vec<(f64, f64)> {
    rec["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["train"]["loss"].as_f64().unwrap(), e["valid"]["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn an_interrupted_augmented_adaptformer_run_resumes_to_the_same_result_and_evaluates() {
    let d = tmp("resume");
    let cfg = config(&d, ADAPTFORMER, "auto");
    let out = d.join("run");
    // With FGVC-style augmentation (resize 40, random 32 crop, flip) and adapter dropout 0.1:
    // crops are seeded per (seed, epoch, image) and dropout masks per (seed, epoch, batch), so
    // the resumed run must see the same ones.
    let aug = ["--set", "train.epochs=4", "--set", "backbone.resize_size=40", "--set", "backbone.augment=\"crop-flip\"", "--set", "tuners.adaptformer.dropout=0.1"];
    let full = train_in("resume-full", &cfg, &out, "cpu", &aug);
    // The same run without augmentation (and nothing else changed) sees other training batches.
    let plain = train_in("resume-plain", &cfg, &d.join("plain"), "cpu", &[&aug[..4], &aug[6..]].concat());
    assert_eq!(plain["config"]["backbone"]["augment"], "none");
    assert_eq!(full["config"]["tuners"], plain["config"]["tuners"]);
    assert_ne!(epoch_losses(&plain)[0].0, epoch_losses(&full)[0].0, "augmentation changes the training batches");
    let epochs = full["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 4);
    assert!(epochs[0]["train"]["lr"].as_f64().is_some() && epochs[3]["valid"]["accuracy"].as_f64().is_some(), "{}", full["epochs"]);
    // Checkpoints hold the trainable tensors only: a few KB, not the backbone.
    let ckpt = out.join("checkpoint");
    let size = std::fs::metadata(ckpt.join("trainable-4.safetensors")).unwrap().len();
    let trainable = full["trainable_params"].as_u64().unwrap();
    assert!(size < trainable * 4 + 8192 && trainable * 10 < full["total_params"].as_u64().unwrap(), "{size} bytes");

    // Simulate a crash during epoch 4: its checkpoint and the run record were never written.
    for f in ["trainable-4.safetensors", "optim-4.bpk", "scheduler-4.bpk"] {
        std::fs::remove_file(ckpt.join(f)).unwrap();
    }
    std::fs::remove_file(out.join("run.json")).unwrap();
    let resumed = train_in("resume-rest", &cfg, &out, "cpu", &[&aug[..], &["--resume"]].concat());
    assert_eq!(resumed["resumed_from_epoch"], 3);
    let (a, b) = (epoch_losses(&full), epoch_losses(&resumed));
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x.0 - y.0).abs() < 1e-6 && (x.1 - y.1).abs() < 1e-6, "epoch {}: {x:?} vs {y:?}", i + 1);
    }
    assert_eq!(full["test_accuracy"], resumed["test_accuracy"]);
    assert_eq!(full["val_accuracy"], resumed["val_accuracy"]);

    // `eval` scores the saved run from its record and trainable parameters.
    let o = bin().args(["eval", "--run"]).arg(&out).args(["--split", "test"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    let want = format!("Test accuracy {:.2}% (30 images)", resumed["test_accuracy"].as_f64().unwrap());
    assert!(text.contains(&want), "{text} lacks {want}");

    // Nothing left to resume is an error, as is resuming a directory without checkpoints.
    let e = err_of(&[&["train", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()][..], &aug[..], &["--resume"]].concat());
    assert!(e.contains("already completed all 4 epochs"), "{e}");
    let e = err_of(&["train", "--config", cfg.to_str().unwrap(), "--out", d.join("empty").to_str().unwrap(), "--resume"]);
    assert!(e.contains("found no complete checkpoint"), "{e}");
}

#[test]
fn a_non_finite_loss_stops_with_a_one_line_error_and_no_run_record() {
    // A checkpoint whose final LayerNorm scale is infinite: the very first loss is NaN.
    let d = tmp("nan");
    let src = std::fs::read(root().join("fixtures/tiny-a/vit.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&src).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, v) in st.tensors() {
        let mut bytes = v.data().to_vec();
        if name == "norm.weight" {
            bytes = bytes.chunks(4).flat_map(|_| f32::INFINITY.to_le_bytes()).collect();
        }
        tensors.push((name, v.shape().to_vec(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> =
        tensors.iter().map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())).collect();
    let bad = d.join("inf.safetensors");
    safetensors::serialize_to_file(views, None, &bad).unwrap();
    let cfg = config(&d, ADAPTFORMER, "auto");
    let out = d.join("run");
    let o = bin()
        .args(["train", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .args(["--set", &format!("backbone.checkpoint=\"{}\"", bad.display())])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    let last = e.trim_end().lines().last().unwrap();
    assert!(last.contains("training stopped: loss is NaN at epoch 1, iteration 1; no epoch completed"), "{e}");
    assert!(!out.join("run.json").exists());
}

#[test]
fn gradient_accumulation_and_early_stopping_are_wired() {
    let (_dir, rec) = train_ok(
        "accum",
        "kind = \"linear\"",
        "auto",
        "cpu",
        &["--set", "train.grad_accumulation=2", "--set", "train.early_stopping_patience=1", "--set", "train.epochs=30", "--set", "train.lr=0.5"],
    );
    let epochs = rec["epochs"].as_array().unwrap().len();
    // lr 0.5 on a linear head overshoots quickly: validation loss stops improving long before 30.
    assert!((2..30).contains(&epochs), "early stopping did not stop: {epochs} epochs");
    assert_eq!(rec["config"]["train"]["grad_accumulation"], 2);
    let d = tmp("accum-bad");
    let cfg = config(&d, "kind = \"linear\"", "auto");
    let e = err_of(&["train", "--config", cfg.to_str().unwrap(), "--set", "train.early_stopping_patience=0"]);
    assert!(e.contains("train.early_stopping_patience must be at least 1"), "{e}");
}

#[test]
fn cache_subcommand_builds_a_file_that_training_reuses_and_extract_writes_features() {
    let d = tmp("cachefile");
    let cfg = config(&d, "kind = \"vqt\"\nnum_queries = 1", "kv");
    let cache = d.join("train.kvcache");
    let set = format!("train.cache_file=\"{}\"", cache.display());
    let o = bin().args(["cache", "--config"]).arg(&cfg).args(["--set", &set]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("feature cache of 48 images"));
    let built = std::fs::read(&cache).unwrap();
    let mtime = std::fs::metadata(&cache).unwrap().modified().unwrap();
    let rec = train_in("cachefile-train", &cfg, &d.join("run"), "cpu", &["--set", &set, "--set", "train.epochs=2"]);
    assert_eq!(rec["cache"]["mode"], "kv");
    assert_eq!(rec["cache"]["bytes"].as_u64().unwrap() as usize, 48 * (4 * 2 * 17 * 64 + 64) * 4);
    // The run read the file (it did not rebuild or rewrite it) and trains exactly as a run that
    // builds its own cache in memory.
    assert_eq!(rec["cache"]["from_file"], true);
    assert_eq!(std::fs::metadata(&cache).unwrap().modified().unwrap(), mtime);
    assert_eq!(std::fs::read(&cache).unwrap(), built);
    let own = train_in("cachefile-own", &cfg, &d.join("own"), "cpu", &["--set", "train.epochs=2"]);
    assert_eq!(own["cache"]["from_file"], false);
    assert_eq!(epoch_losses(&own), epoch_losses(&rec));
    let last = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).trim_end().lines().last().unwrap_or("").to_string();
    // A cache built for another preprocessing is refused with a one-line error naming the file
    // and the differing field (after the checkpoint's load report on stderr).
    let o = bin().args(["train", "--config"]).arg(&cfg).args(["--set", &set, "--set", "backbone.resize=\"nearest\"", "--out"]).arg(d.join("nearest")).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e = last(&o);
    assert!(e.starts_with("error: ") && e.contains("train.kvcache: cache was built for another `preprocess`") && e.contains("nearest"), "{e}");
    // A training file changed in place (same path, other images) no longer matches the cache.
    dataset(&d, 61, "train"); // other pixels, same first 60 labels' layout
    let o = bin().args(["train", "--config"]).arg(&cfg).args(["--set", &set, "--out"]).arg(d.join("changed")).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e = last(&o);
    assert!(e.contains("cache was built for another `train_data_sha256`"), "{e}");
    dataset(&d, 60, "train"); // the original files again
    // Zeros over the second half of the file (a valid header, the right length): the payload's
    // checksum refuses it.
    let mut zeroed = built.clone();
    let n = zeroed.len();
    zeroed[n / 2..n - 8].fill(0);
    std::fs::write(&cache, &zeroed).unwrap();
    let o = bin().args(["train", "--config"]).arg(&cfg).args(["--set", &set, "--out"]).arg(d.join("zeroed")).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(last(&o).contains("the payload does not match its CRC-32"), "{}", last(&o));
    std::fs::write(&cache, &built).unwrap();
    // A tuned trunk has no cache to build.
    let e = err_of(&["cache", "--config", cfg.to_str().unwrap(), "--out", "/tmp/x", "--set", "train.cache=\"auto\"", "--set", "tuners.bitfit=true"]);
    assert!(e.contains("not frozen and deterministic"), "{e}");

    let feats = d.join("feats.safetensors");
    let o = bin().args(["extract", "--config"]).arg(&cfg).args(["--split", "test", "--out"]).arg(&feats).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&feats).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("layer.3.cls").unwrap().shape(), &[30, 64]);
    assert_eq!(st.tensor("layer.0.patch_mean").unwrap().shape(), &[30, 64]);
    assert_eq!(st.tensor("final.cls").unwrap().shape(), &[30, 64]);
    let labels = st.tensor("labels").unwrap();
    assert_eq!((labels.dtype(), labels.shape()), (safetensors::Dtype::I64, &[30usize][..]));
    assert_eq!(&labels.data()[..16], &[0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
}

/// A tiny VTAB task in the NOAH layout (eurosat, 10 classes; classes 0..3 used), 24 train /
/// 6 val / 9 test images: a bright band whose position gives the class.
fn vtab_tree(root: &Path) {
    vtab_task_tree(root, "eurosat");
}

#[test]
fn vtab_noah_data_trains_and_bad_images_stop_or_are_skipped() {
    let d = tmp("vtab");
    let cfg = config(&d, "kind = \"linear\"", "auto");
    vtab_tree(&d.join("vtab"));
    let data = format!("data={{kind=\"vtab\",root=\"{}\",task=\"EuroSAT\",check_counts=false}}", d.join("vtab").display());
    let rec = train_in("vtab-ok", &cfg, &d.join("run"), "cpu", &["--set", &data, "--set", "train.epochs=2"]);
    assert_eq!(rec["split_sizes"], serde_json::json!([24, 6, 9]));
    assert_eq!(rec["data_skipped"], serde_json::json!({}));

    // A corrupt image stops the run with one line naming it and the list line.
    std::fs::write(d.join("vtab/eurosat/images/train800/000005.png"), b"garbage").unwrap();
    let e = err_of(&["train", "--config", cfg.to_str().unwrap(), "--set", &data]);
    assert!(e.contains("000005.png: cannot decode image") && e.contains("train800.txt:6)"), "{e}");
    // --skip-bad skips it and records the count.
    let rec = train_in("vtab-skip", &cfg, &d.join("run2"), "cpu", &["--set", &data, "--set", "train.epochs=1", "--skip-bad"]);
    assert_eq!(rec["data_skipped"]["train800"]["corrupt"], 1);
    assert_eq!(rec["split_sizes"][0], 23);
    // Class count mismatch, and the split-size invariant.
    let bad = data.replace("check_counts=false", "check_counts=false,num_classes=5");
    let e = err_of(&["train", "--config", cfg.to_str().unwrap(), "--set", &bad]);
    assert!(e.contains("data.num_classes = 5, but VTAB task `EuroSAT` has 10 classes"), "{e}");
    let strict = data.replace(",check_counts=false", "");
    let e = err_of(&["train", "--config", cfg.to_str().unwrap(), "--set", &strict]);
    assert!(e.contains("train800.txt: 24 lines, but VTAB-1k's train800 has 800"), "{e}");
    // IDX data has nothing to skip.
    let e = err_of(&["train", "--config", cfg.to_str().unwrap(), "--skip-bad"]);
    assert!(e.contains("--skip-bad applies to image datasets"), "{e}");
}

#[test]
fn tune_runs_the_vtab_protocol_and_reports_both_averages() {
    let d = tmp("tune");
    let cfg = config(&d, "kind = \"linear\"", "auto");
    vtab_task_tree(&d.join("vtab"), "eurosat");
    vtab_task_tree(&d.join("vtab"), "dtd");
    let data = format!("data={{kind=\"vtab\",root=\"{}\",task=\"eurosat\",check_counts=false}}", d.join("vtab").display());
    let out = d.join("tune");
    let o = bin()
        .args(["tune", "--config"])
        .arg(&cfg)
        .args(["--set", &data, "--set", "train.epochs=1", "--tasks", "eurosat,dtd", "--grid", "train.lr=[0.001,0.05]", "--seeds", "42,43", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(out.join("tune.md")).unwrap();
    assert!(md.contains("| eurosat | Specialized | train.lr=") && md.contains("| dtd | Natural | train.lr="), "{md}");
    // Every grid setting's val200 accuracy is listed beside the choice.
    assert!(md.contains("| train.lr=0.001: ") && md.contains("; train.lr=0.05: "), "{md}");
    assert!(md.contains("Mean over the 2 tasks") && md.contains("Mean of the 2 group means"), "{md}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("tune.json")).unwrap()).unwrap();
    assert_eq!(r["tasks"][0]["grid"].as_array().unwrap().len(), 2);
    assert_eq!(r["tasks"][1]["test"].as_array().unwrap().len(), 2);
    // Grid runs train on train800 and never read the test split; final runs train on
    // train800val200 and score test.
    let grid: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("eurosat/grid-0/run.json")).unwrap()).unwrap();
    assert_eq!(grid["split_sizes"], serde_json::json!([24, 6, 6]));
    assert_eq!(grid["config"]["data"]["test_split"], "val200");
    let fin: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("dtd/final-seed-43/run.json")).unwrap()).unwrap();
    assert_eq!(fin["split_sizes"], serde_json::json!([30, 6, 9]));
    assert_eq!(fin["config"]["train"]["seed"], 43);
    let (a, b) = (r["group_means"][0][1].as_f64().unwrap(), r["group_means"][1][1].as_f64().unwrap());
    assert!((r["group_mean"].as_f64().unwrap() - (a + b) / 2.0).abs() < 1e-9);
}

#[test]
fn precision_flag_trains_in_bf16_records_it_and_refuses_what_cannot_work() {
    let d = tmp("precision");
    let cfg = config(&d, "kind = \"vqt\"\nnum_queries = 1\nquery_dropout = 0.0", "auto");
    let out = d.join("run");
    let rec = train_in("bf16", &cfg, &out, "cpu", &["--precision", "bf16", "--set", "train.epochs=3"]);
    assert_eq!(rec["precision"], "bf16");
    let losses = epoch_losses(&rec);
    assert!(losses.iter().all(|(t, v)| t.is_finite() && v.is_finite()), "{losses:?}");
    // The trainable file is bf16; `eval` reproduces the recorded accuracy in bf16, and an f32
    // evaluation of the same run loads it by casting.
    let bytes = std::fs::read(out.join("trainable.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
    assert!(header.contains("\"BF16\"") && !header.contains("\"F32\""), "{header}");
    let eval = |extra: &[&str]| {
        let o = bin().args(extra).args(["eval", "--run"]).arg(&out).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let want = format!("Test accuracy {:.2}% (30 images)", rec["test_accuracy"].as_f64().unwrap());
    let text = eval(&["--precision", "bf16"]);
    assert!(text.contains(&want), "{text} lacks {want}");
    assert!(eval(&[]).contains("Test accuracy"));

    let cfg_s = cfg.to_str().unwrap();
    let e = err_of(&["--backend", "ndarray", "--precision", "f16", "train", "--config", cfg_s]);
    assert!(e.contains("backend `ndarray` does not support --precision f16"), "{e}");
    let e = err_of(&["--precision", "f16", "train", "--config", cfg_s, "--out", d.join("f16").to_str().unwrap()]);
    assert!(e.contains("train.adam_epsilon = 1e-8 underflows to 0 in f16"), "{e}");
    let e = err_of(&["--precision", "f64", "train", "--config", cfg_s]);
    assert!(e.contains("unknown precision `f64`"), "{e}");
}

#[test]
fn a_random_backbone_is_the_same_in_train_and_eval() {
    // No checkpoint: the backbone comes from the seed. Training builds a feature cache (touching
    // the backbone first), eval does not; both must draw the same weights.
    let d = tmp("random-backbone");
    let cfg = config(&d, "kind = \"vqt\"\nnum_queries = 1\nquery_dropout = 0.0", "auto");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text: String = text.lines().filter(|l| !l.starts_with("checkpoint =")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&cfg, text).unwrap();
    let out = d.join("run");
    let o = bin().args(["train", "--config"]).arg(&cfg).arg("--out").arg(&out).args(["--set", "train.epochs=2"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert!(rec["checkpoint"].is_null());
    let o = bin().args(["eval", "--run"]).arg(&out).args(["--split", "val"]).output().unwrap();
    let want = format!("Val accuracy {:.2}% (12 images)", rec["val_accuracy"].as_f64().unwrap());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains(&want), "{text} lacks {want}");
}

#[test]
fn devices_flag_trains_data_parallel_through_burn_train() {
    // The CPU backend has one device: `--devices 0,1` runs burn-train's MultiDevice strategy
    // with two workers on it. Each optimizer step takes one batch per worker, so an epoch of 48
    // images in batches of 16 is two steps (not three).
    let d = tmp("devices");
    let cfg = config(&d, ADAPTFORMER, "auto");
    let rec = train_in("devices", &cfg, &d.join("run"), "cpu", &["--devices", "0,1", "--set", "train.epochs=3", "--set", "train.warmup_epochs=0"]);
    assert_eq!(rec["devices"], serde_json::json!([0, 1]));
    // burn-train logs one learning rate per batch: 4 batches (2 per worker), in 2 steps that
    // share their rate.
    let lrs: Vec<f64> = std::fs::read_to_string(d.join("run/train/epoch-1/Learning_Rate.log"))
        .unwrap()
        .lines()
        .filter(|l| !l.ends_with("final"))
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(lrs.len(), 4, "{lrs:?}");
    assert!(lrs[0] == lrs[1] && lrs[2] == lrs[3] && lrs[1] > lrs[2], "{lrs:?}");
    let losses = epoch_losses(&rec);
    assert_eq!(losses.len(), 3);
    assert!(losses.iter().all(|(t, v)| t.is_finite() && v.is_finite()), "{losses:?}");
    assert!(rec["test_accuracy"].as_f64().unwrap() > 0.0);
    assert_eq!(rec["data_parallel"], "multi-device");
    let e = err_of(&["--device", "0", "--devices", "0,1", "train", "--config", cfg.to_str().unwrap()]);
    assert!(e.contains("give --device N or --devices N,M,..., not both"), "{e}");
    // DistributedDataParallel's all-reduce exists on CUDA only in Burn 0.22 (Flex would panic
    // when the strategy starts): refused in one line, before anything is built.
    let e = err_of(&["--ddp", "--devices", "0,1", "train", "--config", cfg.to_str().unwrap()]);
    assert!(e.contains("--ddp") && e.contains("CUDA only") && e.contains("MultiDevice"), "{e}");
    let e = err_of(&["--ddp", "train", "--config", cfg.to_str().unwrap()]);
    assert!(e.contains("--ddp trains one run on several devices"), "{e}");
}

#[test]
fn head2toe_selects_features_in_two_stages_resumes_and_evaluates() {
    let d = tmp("h2t");
    let cfg = config(&d, "kind = \"vqt\"\nnum_queries = 1", "auto");
    let out = d.join("run");
    let h2t = ["--set", "train.epochs=3", "--set", "head2toe.keep=0.5", "--set", "head2toe.lambda=0.001"];
    let full = train_in("h2t", &cfg, &out, "cpu", &h2t);
    assert_eq!(full["method"], "vqt+head2toe");
    assert_eq!(full["cache"]["mode"], "kv", "all three stages train from one cache");
    let h = &full["head2toe"];
    // F = 64 * (1 + 4 layers * 1 query) = 320 features; keep 0.5 -> 160, distinct, in range.
    assert_eq!(h["features"], 320);
    let sel: Vec<u64> = h["selection"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(sel.len(), 160);
    assert!(sel.iter().all(|&i| i < 320) && sel.iter().collect::<std::collections::BTreeSet<_>>().len() == 160, "{sel:?}");
    // The final model learned the queries [4, 1, 64] and a 160 -> 3 head.
    assert_eq!(full["trainable_params"], 4 * 64 + 160 * 3 + 3);
    // Every stage ran the whole schedule; A and B at head2toe.lr_scale (0.5) times the VQT rate.
    let lrs = |k: &serde_json::Value| -> Vec<f64> { k.as_array().unwrap().iter().map(|e| e["train"]["lr"].as_f64().unwrap()).collect() };
    let (v, a, b) = (lrs(&h["vqt_epochs"]), lrs(&h["compress_epochs"]), lrs(&full["epochs"]));
    assert_eq!((v.len(), a.len(), b.len()), (3, 3, 3));
    for i in 0..3 {
        assert!((a[i] - 0.5 * v[i]).abs() < 1e-9 && (b[i] - a[i]).abs() < 1e-12, "epoch {}: {v:?} {a:?} {b:?}", i + 1);
    }
    assert!(h["vqt_val_accuracy"].as_f64().is_some() && h["compress_val_accuracy"].as_f64().is_some());
    assert!(out.join("head2toe/featselect/trainable.safetensors").is_file());

    // `eval` rebuilds the selected head from the record and scores the same accuracy.
    let o = bin().args(["eval", "--run"]).arg(&out).args(["--split", "test"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = format!("Test accuracy {:.2}% (30 images)", full["test_accuracy"].as_f64().unwrap());
    assert!(String::from_utf8_lossy(&o.stdout).contains(&want), "{} lacks {want}", String::from_utf8_lossy(&o.stdout));

    // A crash during stage A's last epoch: resuming reloads the VQT stage, finishes stage A from
    // its epoch-2 checkpoint and reruns stage B, to the same selection and result.
    let ckpt = out.join("head2toe/compress/checkpoint");
    for f in ["trainable-3.safetensors", "optim-3.bpk", "scheduler-3.bpk"] {
        std::fs::remove_file(ckpt.join(f)).unwrap();
    }
    std::fs::remove_dir_all(out.join("head2toe/featselect")).unwrap();
    std::fs::remove_file(out.join("run.json")).unwrap();
    let resumed = train_in("h2t-resume", &cfg, &out, "cpu", &[&h2t[..], &["--resume"]].concat());
    assert_eq!(resumed["head2toe"]["selection"], h["selection"]);
    assert_eq!(epoch_losses(&resumed), epoch_losses(&full));
    assert_eq!((&resumed["val_accuracy"], &resumed["test_accuracy"]), (&full["val_accuracy"], &full["test_accuracy"]));
    let e = err_of(&[&["train", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()][..], &h2t[..], &["--resume"]].concat());
    assert!(e.contains("already completed all 3 epochs") && e.contains("featselect"), "{e}");

    // Head2Toe needs VQT on a frozen backbone and a keep fraction in (0, 1].
    let c = cfg.to_str().unwrap();
    let e = err_of(&["train", "--config", c, "--set", "method={kind=\"linear\"}", "--set", "head2toe.keep=0.5"]);
    assert!(e.contains("head2toe") && e.contains("vqt"), "{e}");
    let e = err_of(&["train", "--config", c, "--set", "head2toe.keep=0"]);
    assert!(e.contains("head2toe.keep 0 must be in (0, 1]"), "{e}");
    let e = err_of(&["train", "--config", c, "--set", "head2toe.keep=0.5", "--set", "tuners={lora={rank=2}}"]);
    assert!(e.contains("head2toe") && e.contains("tuners.lora"), "{e}");
    let e = err_of(&["train", "--config", c, "--set", "head2toe.keep=0.5", "--set", "head2toe.lam=1"]);
    assert!(e.contains("lam"), "{e}");
}

/// `(every trainable tensor's name and bytes, epochs.json text)` of a finished run.
fn run_bytes(out: &Path) -> (Vec<(String, Vec<u8>)>, String) {
    let bytes = std::fs::read(out.join("trainable.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<u8>)> = st.tensors().into_iter().map(|(k, v)| (k, v.data().to_vec())).collect();
    tensors.sort();
    assert!(!tensors.is_empty());
    (tensors, std::fs::read_to_string(out.join("epochs.json")).unwrap())
}

#[test]
fn the_same_seed_gives_the_same_bytes_whatever_num_workers_is() {
    // A tuned method with adapter dropout and augmentation (randomness in the loader and in the
    // step) and a cached query method; three runs with the default workers, one with a single
    // worker and one with three: identical trainable tensors and per-epoch metrics.
    let d = tmp("determinism");
    let af = config(&d.join("af"), ADAPTFORMER, "auto");
    let vqt = config(&d.join("vqt"), "kind = \"vqt\"\nnum_queries = 2", "kv");
    let af_sets = ["--set", "tuners.adaptformer.dropout=0.1", "--set", "backbone.resize_size=40", "--set", "backbone.augment=\"crop-flip\""];
    for (name, cfg, extra) in [("af", &af, &af_sets[..]), ("vqt", &vqt, &[][..])] {
        let mut seen = Vec::new();
        for (i, workers) in ["2", "2", "2", "1", "3"].iter().enumerate() {
            let out = d.join(format!("{name}-{i}"));
            let w = format!("train.num_workers={workers}");
            train_in(name, cfg, &out, "cpu", &[extra, &["--set", "train.epochs=3", "--set", &w]].concat());
            seen.push(run_bytes(&out));
        }
        for (i, s) in seen.iter().enumerate().skip(1) {
            assert!(s.0 == seen[0].0, "{name}: run {i} trained other tensors than run 0");
            assert_eq!(s.1, seen[0].1, "{name}: run {i} has other epoch metrics than run 0");
        }
    }
}

#[test]
fn config_values_that_would_reach_a_burn_assert_are_one_line_errors() {
    let d = tmp("ranges");
    const SYNQT: &str = "kind = \"synqt\"\nnum_tokens = 1\nfeat_scale = 0.1\nattn_scale = 0.1\nffn_scale = 0.1";
    const VQT: &str = "kind = \"vqt\"\nnum_queries = 1";
    let lin = config(&d.join("lin"), "kind = \"linear\"", "auto");
    let vqt = config(&d.join("vqt"), VQT, "auto");
    let synqt = config(&d.join("synqt"), SYNQT, "off");
    let af = config(&d.join("af"), ADAPTFORMER, "auto");
    let cases: &[(&Path, &str, &str)] = &[
        (&vqt, "method.num_queries=0", "method.num_queries must be at least 1"),
        (&vqt, "method.query_dropout=1.0", "method.query_dropout = 1 must be in [0, 1)"),
        (&vqt, "method.query_dropout=-0.1", "method.query_dropout = -0.1 must be in [0, 1)"),
        (&synqt, "method.num_tokens=0", "method.num_tokens must be at least 1"),
        (&synqt, "method.dropout=1.5", "method.dropout = 1.5 must be in [0, 1)"),
        (&synqt, "method.head_drop_path=1.0", "method.head_drop_path = 1 must be in [0, 1)"),
        (&synqt, "method.kem_drop_path=2.0", "method.kem_drop_path = 2 must be in [0, 1)"),
        (&synqt, "method.feat_scale=inf", "method.feat_scale = inf must be a finite number"),
        (&af, "tuners.adaptformer.dropout=1.0", "tuners.adaptformer.dropout = 1 must be in [0, 1)"),
        (&af, "tuners.adaptformer.scale=nan", "tuners.adaptformer.scale = NaN must be a finite number"),
        (&af, "tuners.adaptformer.bottleneck=0", "tuners.adaptformer.bottleneck must be at least 1"),
        (&lin, "tuners.vpt={num_tokens = 2, dropout = -0.5}", "tuners.vpt.dropout = -0.5 must be in [0, 1)"),
        (&lin, "tuners.vpt={num_tokens = 0}", "tuners.vpt.num_tokens must be at least 1"),
        (&lin, "tuners.lora={rank = 2, alpha = 0.0, targets = [\"q\"]}", "tuners.lora.alpha = 0 must be a finite value > 0"),
        (&lin, "tuners.lora={rank = 0, targets = [\"q\"]}", "tuners.lora.rank must be at least 1"),
        (&lin, "tuners.ssf={init_std = -1.0}", "tuners.ssf.init_std = -1 must be a finite value >= 0"),
        (&lin, "tuners.adapter={kind = \"houlsby\", bottleneck = 0}", "tuners.adapter.bottleneck must be at least 1"),
        (&lin, "train.weight_decay=-0.1", "train.weight_decay = -0.1 must be a finite value >= 0"),
        (&lin, "train.adam_epsilon=0.0", "train.adam_epsilon = 0 must be a finite value > 0"),
        (&lin, "train.num_workers=0", "train.num_workers must be at least 1"),
        (&lin, "train.trunk_embed_dropout=1.0", "train.trunk_embed_dropout = 1 must be in [0, 1)"),
        (&lin, "train.trunk_drop_path=-1.0", "train.trunk_drop_path = -1 must be in [0, 1)"),
        (&lin, "train.batch_size=0", "train.batch_size and train.grad_accumulation must be positive"),
        (&lin, "train.lr=0.0", "train.lr 0 must be in (0, 1]"),
        (&lin, "backbone.custom.img_size=0", "backbone.custom.img_size must be positive"),
        (&lin, "backbone.img_size=0", "backbone.img_size must be positive"),
        (&lin, "backbone.custom.num_heads=0", "backbone.custom.num_heads must be positive"),
        (&lin, "data.test_limit=0", "data.test_limit must be at least 1"),
        (&lin, "data.val_range=[40, 52]", "data.train_range [0, 48] and data.val_range [40, 52] overlap"),
        (&lin, "head2toe={keep = 1.5}", "head2toe: feature selection needs method.kind = \"vqt\""),
        (&vqt, "head2toe={keep = 1.5}", "head2toe.keep 1.5 must be in (0, 1]"),
    ];
    for (cfg, set, want) in cases {
        let e = err_of(&["train", "--config", cfg.to_str().unwrap(), "--set", set, "--out", d.join("never").to_str().unwrap()]);
        assert!(e.contains("exp.toml: ") && e.contains(want), "--set {set}: {e}");
    }
    assert!(!d.join("never").exists(), "a refused config started a run");
    // Values checked against the data itself, and flags.
    let lin_s = lin.to_str().unwrap();
    let e = err_of(&["train", "--config", lin_s, "--set", "data.test_limit=31"]);
    assert!(e.contains("test-images.gz: data.test_limit = 31 exceeds the 30 images in the file"), "{e}");
    let e = err_of(&["--device", "5", "train", "--config", lin_s]);
    assert!(e.contains("--device 5: the `cpu` backend has one device, index 0"), "{e}");
    let e = err_of(&["--devices", "0,0", "train", "--config", lin_s]);
    assert!(e.contains("--devices lists device 0 twice"), "{e}");
    let o = bin().args(["train", "--config", lin_s, "--resume", "--overwrite"]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(2) && e.contains("'--resume' cannot be used with '--overwrite'"), "{e}");
}

#[test]
fn an_output_dir_holds_one_run_and_resume_checks_what_it_resumes() {
    let d = tmp("rundir");
    let cfg = config(&d, "kind = \"linear\"", "auto");
    let cfg_s = cfg.to_str().unwrap();
    let out = d.join("run");
    let out_s = out.to_str().unwrap();
    let first = train_in("rundir-1", &cfg, &out, "cpu", &["--set", "train.epochs=2"]);
    // A completed run is not replaced silently, nor resumed.
    let e = err_of(&["train", "--config", cfg_s, "--out", out_s, "--set", "train.epochs=2"]);
    assert!(e.contains("holds a completed run") && e.contains("--overwrite"), "{e}");
    let e = err_of(&["train", "--config", cfg_s, "--out", out_s, "--set", "train.epochs=2", "--resume"]);
    assert!(e.contains("the run already completed all 2 epochs"), "{e}");
    let again = train_in("rundir-2", &cfg, &out, "cpu", &["--set", "train.epochs=2", "--overwrite"]);
    assert_eq!(epoch_losses(&first), epoch_losses(&again));

    // A second writer is refused while the first holds the directory.
    let busy = d.join("busy");
    let mut child = bin()
        .args(["train", "--config", cfg_s, "--set", "train.epochs=100000", "--out"])
        .arg(&busy)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    // Any sealed checkpoint will do: epochs of this tiny run take milliseconds, so by the time
    // the directory is looked at, epoch 1's may already have been rotated out (two are kept).
    let sealed = |dir: &Path| {
        std::fs::read_dir(dir).ok().is_some_and(|entries| {
            entries.flatten().any(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with("trainable-") && n.ends_with(".safetensors.sha256")
            })
        })
    };
    while !sealed(&busy.join("checkpoint")) {
        assert!(t0.elapsed().as_secs() < 120, "the background run did not reach its first checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let busy_s = busy.to_str().unwrap();
    let e = err_of(&["train", "--config", cfg_s, "--set", "train.epochs=100000", "--out", busy_s, "--resume"]);
    assert!(e.contains("another vqt-train process is writing a run here"), "{e}");
    child.kill().unwrap();
    child.wait().unwrap();
    // Now it is an interrupted run: training into it needs --resume or --overwrite, and
    // --resume refuses other settings, naming the first differing key.
    let e = err_of(&["train", "--config", cfg_s, "--set", "train.epochs=100000", "--out", busy_s]);
    assert!(e.contains("holds an interrupted run: pass --resume to continue it, or --overwrite"), "{e}");
    for (extra, key) in [
        (&["--set", "train.lr=0.02"][..], "train.lr is 0.02 here, but the run"),
        (&["--seed", "7"][..], "train.seed is 7 here"),
        (&["--set", "data.train_range=[0, 40]"][..], "data.train_range is [0,40] here"),
        (&["--set", "method={kind = \"vqt\", num_queries = 1}"][..], "method.kind is \"vqt\" here"),
        (&["--set", "train.epochs=5"][..], "train.epochs is 5 here, but the run"),
        (&["--backend", "ndarray"][..], "--backend is \"ndarray\" here"),
    ] {
        let args = [&["train", "--config", cfg_s, "--set", "train.epochs=100000", "--out", busy_s, "--resume"][..], extra].concat();
        let e = err_of(&args);
        assert!(e.contains(key) && e.contains("started.json"), "{extra:?}: {e}");
    }
}

/// The crash tests: `full` trains 4 epochs uninterrupted; `crashed` is killed (aborted, as by
/// SIGKILL) in the middle of epoch 3, optionally has a checkpoint file damaged, and is resumed.
/// Every epoch's metrics, the trainable tensors and the accuracies must equal the full run's.
fn crash_and_resume(tag: &str, method: &str, extra: &[&str], damage: Option<&str>, resumes_from: u64) {
    let d = tmp(tag);
    let cfg = config(&d, method, "auto");
    // Batches of 8: six iterations per epoch, so the abort lands well inside epoch 3, after
    // epoch 2's checkpoint was written by burn-train's checkpointer thread.
    let sets = [extra, &["--set", "train.epochs=4", "--set", "train.batch_size=8"]].concat();
    let full = train_in(tag, &cfg, &d.join("full"), "cpu", &sets);
    let out = d.join("crashed");
    let o = bin().args(["train", "--config"]).arg(&cfg).arg("--out").arg(&out).args(&sets).env("VQT_TEST_ABORT_AT", "3:5").output().unwrap();
    assert!(!o.status.success(), "{tag}: the run was not aborted");
    assert!(String::from_utf8_lossy(&o.stderr).contains("aborting at epoch 3, iteration 5"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out.join("run.json").exists());
    let ckpt = out.join("checkpoint");
    assert!(ckpt.join("trainable-2.safetensors").exists() && !ckpt.join("trainable-3.safetensors").exists());
    if let Some(file) = damage {
        let p = ckpt.join(file);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    }
    let o = bin().args(["train", "--config"]).arg(&cfg).arg("--out").arg(&out).args(&sets).arg("--resume").output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{tag}: {stderr}");
    if let Some(file) = damage {
        let want = format!("the checkpoint of epoch 2 is unusable ({file} does not match its sha256 seal (truncated or damaged)); falling back to epoch 1");
        assert!(stderr.contains(&want), "{tag}: {stderr}");
    }
    let resumed: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(resumed["resumed_from_epoch"], resumes_from, "{tag}");
    assert_eq!(resumed["epochs"], full["epochs"], "{tag}: per-epoch metrics differ from the uninterrupted run");
    assert_eq!((&resumed["val_accuracy"], &resumed["test_accuracy"]), (&full["val_accuracy"], &full["test_accuracy"]), "{tag}");
    assert!(run_bytes(&out).0 == run_bytes(&d.join("full")).0, "{tag}: trainable tensors differ from the uninterrupted run");
}

#[test]
fn a_query_method_killed_mid_epoch_resumes_to_the_uninterrupted_result() {
    crash_and_resume("crash-vqt", "kind = \"vqt\"\nnum_queries = 2\nquery_dropout = 0.1", &[], None, 2);
    crash_and_resume("crash-vqt-damaged", "kind = \"vqt\"\nnum_queries = 2\nquery_dropout = 0.1", &[], Some("trainable-2.safetensors"), 1);
}

#[test]
fn a_tuned_method_killed_mid_epoch_resumes_to_the_uninterrupted_result() {
    let noise = ["--set", "tuners.adaptformer.dropout=0.1"];
    crash_and_resume("crash-af", ADAPTFORMER, &noise, None, 2);
    crash_and_resume("crash-af-damaged", ADAPTFORMER, &noise, Some("optim-2.bpk"), 1);
}

#[test]
fn failed_writes_leave_no_partial_files_and_a_run_that_can_be_finished() {
    let d = tmp("writes");
    let cfg = config(&d, ADAPTFORMER, "auto");
    let out = d.join("run");
    // A file-size limit (as a full disk does) makes every checkpoint write fail.
    let o = Command::new("sh")
        .args(["-c", "trap '' XFSZ; ulimit -f 16; exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_vqt-train"))
        .args(["train", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .args(["--set", "train.epochs=2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.trim_end().lines().last().unwrap().starts_with("error: training failed"), "{stderr}");
    let mut leftovers = Vec::new();
    let mut stack = vec![out.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(".partial") || p.to_string_lossy().ends_with(".tmp") {
                leftovers.push(p);
            }
        }
    }
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(!out.join("run.json").exists());
    // Nothing usable to resume from: one line; --overwrite starts afresh.
    let e = err_of(&["train", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap(), "--set", "train.epochs=2", "--resume"]);
    assert!(e.contains("found no complete checkpoint to continue from") && e.contains("start afresh with --overwrite"), "{e}");
    let rec = train_in("writes-fresh", &cfg, &out, "cpu", &["--set", "train.epochs=2", "--overwrite"]);

    // The final outputs failed after the last epoch's checkpoint (run.json and
    // trainable.safetensors absent): --resume finishes the run from that checkpoint.
    std::fs::remove_file(out.join("run.json")).unwrap();
    std::fs::remove_file(out.join("trainable.safetensors")).unwrap();
    let done = train_in("writes-finish", &cfg, &out, "cpu", &["--set", "train.epochs=2", "--resume"]);
    assert_eq!(done["resumed_from_epoch"], 2);
    assert_eq!((&done["epochs"], &done["test_accuracy"]), (&rec["epochs"], &rec["test_accuracy"]));
    let o = bin().args(["eval", "--run"]).arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `backbone.tuned_from`: VQT trained on the frozen backbone of an earlier AdaptFormer (and
/// LoRA) run, on the trunk path with the cache; the chain in run.json; refusals in one line.
#[test]
fn an_add_on_trains_the_query_side_on_an_earlier_runs_tuned_backbone() {
    let d = tmp("addon");
    let af = config(&d, "kind = \"linear\"\n\n[tuners.adaptformer]\nbottleneck = 4\ndropout = 0.0", "off");
    let fast = ["--set", "train.epochs=3"];
    let first = train_in("addon-af", &af, &d.join("af"), "cpu", &fast);
    assert_eq!((first["method"].as_str(), first["path"].as_str()), (Some("adaptformer"), Some("full")));
    let vqt = d.join("vqt.toml");
    let text = std::fs::read_to_string(&af).unwrap().replace("kind = \"linear\"\n\n[tuners.adaptformer]\nbottleneck = 4\ndropout = 0.0", "kind = \"vqt\"\nnum_queries = 2");
    std::fs::write(&vqt, text.replace("cache = \"off\"", "cache = \"kv\"")).unwrap();
    let on = |run: &str| format!("backbone.tuned_from=\"{}\"", d.join(run).display());
    let rec = train_in("addon-vqt", &vqt, &d.join("addon"), "cpu", &["--set", "train.epochs=3", "--set", &on("af")]);
    assert_eq!(rec["path"], "trunk", "the add-on takes the trunk path");
    assert_eq!(rec["method"], "vqt-on-adaptformer");
    assert_eq!(rec["cache"]["mode"], "kv", "and the feature cache");
    assert_eq!(rec["trainable_params"], 4 * 2 * 64 + (64 * (1 + 4 * 2) + 1) * 3, "only the query side trains");
    let plain = train_in("addon-plain", &vqt, &d.join("plain"), "cpu", &["--set", "train.epochs=3"]);
    let adapter_params = 4 * (64 * 4 + 4 + 4 * 64 + 64);
    assert_eq!(rec["total_params"].as_u64().unwrap(), plain["total_params"].as_u64().unwrap() + adapter_params, "the frozen adapters are part of the model");
    let t = &rec["tuned_from"];
    assert_eq!((t["method"].as_str(), t["lora_merged"].as_bool()), (Some("adaptformer"), Some(false)));
    assert_eq!(t["trainable_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(t["test_accuracy"], first["test_accuracy"]);
    assert_ne!(rec["val_accuracy"].as_f64(), None);
    // A different backbone gives different features: the add-on is not the plain VQT run.
    let loss = |r: &serde_json::Value| r["epochs"][0]["train"]["loss"].as_f64().unwrap();
    assert_ne!(loss(&rec), loss(&plain), "the add-on read the tuned backbone");

    // `eval` rebuilds the chain; a changed earlier run is refused.
    let o = bin().args(["eval", "--run"]).arg(d.join("addon")).args(["--split", "test"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = d.join("af").join(first["trainable_file"].as_str().unwrap());
    let keep = std::fs::read(&f).unwrap();
    let o = train_in("addon-af2", &af, &d.join("af2"), "cpu", &["--set", "train.epochs=2"]);
    std::fs::copy(d.join("af2").join(o["trainable_file"].as_str().unwrap()), &f).unwrap();
    let e = err_of(&["eval", "--run", d.join("addon").to_str().unwrap(), "--split", "test"]);
    assert!(e.contains("tuned_from") && e.contains("changed since this run trained on it"), "{e}");
    std::fs::write(&f, keep).unwrap();

    // LoRA is merged into the frozen weights.
    let lora = config(&d.join("l"), "kind = \"linear\"\n\n[tuners.lora]\nrank = 2", "off");
    train_in("addon-lora", &lora, &d.join("lora"), "cpu", &fast);
    let vqt_l = d.join("l").join("vqt.toml");
    std::fs::write(&vqt_l, std::fs::read_to_string(&lora).unwrap().replace("kind = \"linear\"\n\n[tuners.lora]\nrank = 2", "kind = \"vqt\"\nnum_queries = 2")).unwrap();
    let rec = train_in("addon-vqt-lora", &vqt_l, &d.join("addon-lora"), "cpu", &["--set", "train.epochs=2", "--set", &on("lora")]);
    assert_eq!(rec["tuned_from"]["lora_merged"], true);
    assert_eq!(rec["total_params"], plain["total_params"], "merged LoRA adds no tensor");

    // Refusals.
    let v = vqt.to_str().unwrap();
    let e = err_of(&["train", "--config", v, "--set", &on("plain"), "--out", d.join("x1").to_str().unwrap()]);
    assert!(e.contains("backbone.tuned_from") && e.contains("tuned no backbone tensor"), "{e}");
    let e = err_of(&["train", "--config", v, "--set", &on("af"), "--set", "data.train_range=[0, 40]", "--out", d.join("x2").to_str().unwrap()]);
    assert!(e.contains("backbone.tuned_from") && e.contains("[data]"), "{e}");
    let e = err_of(&["train", "--config", v, "--set", &on("af"), "--set", "backbone.normalization=\"inception\"", "--out", d.join("x3").to_str().unwrap()]);
    assert!(e.contains("backbone.tuned_from") && e.contains("input pipeline"), "{e}");
    let e = err_of(&["train", "--config", v, "--set", &on("nothing-here"), "--out", d.join("x4").to_str().unwrap()]);
    assert!(e.contains("backbone.tuned_from") && e.contains("not a finished run"), "{e}");
    let e = err_of(&["train", "--config", af.to_str().unwrap(), "--set", &on("af"), "--out", d.join("x5").to_str().unwrap()]);
    assert!(e.contains("backbone.tuned_from") && e.contains("[tuners] must be empty"), "{e}");
}

/// `[train.groups]`: per-group rates reach the optimizer (a jointly trained VQT + AdaptFormer
/// run records them and trains), and bad values are one-line errors.
#[test]
fn per_group_rates_train_and_bad_groups_are_refused() {
    let d = tmp("groups");
    let cfg = config(&d, "kind = \"vqt\"\nnum_queries = 2\n\n[tuners.adaptformer]\nbottleneck = 4", "off");
    let rec = train_in(
        "groups",
        &cfg,
        &d.join("run"),
        "cpu",
        &["--set", "train.epochs=2", "--set", "train.groups.tuners={ lr = 0.001 }", "--set", "train.groups.method={ lr = 0.05, weight_decay = 0.0001 }"],
    );
    assert_eq!(rec["config"]["train"]["groups"]["tuners"]["lr"], 0.001);
    assert_eq!(rec["config"]["train"]["groups"]["method"]["weight_decay"], 0.0001);
    let c = cfg.to_str().unwrap();
    let e = err_of(&["train", "--config", c, "--set", "train.groups.tuners={ lr = 2.0 }"]);
    assert!(e.contains("train.groups.tuners.lr"), "{e}");
    let e = err_of(&["train", "--config", c, "--set", "train.groups.tunerz={ lr = 0.1 }"]);
    assert!(e.contains("tunerz"), "{e}");
    let plain = config(&d.join("p"), "kind = \"vqt\"\nnum_queries = 2", "off");
    let e = err_of(&["train", "--config", plain.to_str().unwrap(), "--set", "train.groups.tuners={ lr = 0.001 }"]);
    assert!(e.contains("train.groups.tuners") && e.contains("no tuner"), "{e}");
}

/// `tune` on an IDX task (train_range = train800, val_range = val200): grid runs score the
/// validation range as their test split (read from the train files), final runs train on both
/// ranges; `--on-tune` chains an add-on tune onto the runs the earlier tune chose.
#[test]
fn tune_runs_the_protocol_on_idx_data_and_chains_an_add_on() {
    let d = tmp("tune-idx");
    let af = config(&d, "kind = \"linear\"\n\n[tuners.adaptformer]\nbottleneck = 4\ndropout = 0.0", "off");
    dataset(&d, 84, "train"); // 48 train + 12 val, then 12 for the final runs' unused validation
    let tune = |cfg: &Path, out: &Path, extra: &[&str]| {
        let o = bin()
            .args(["tune", "--config"])
            .arg(cfg)
            .args(["--set", "train.epochs=1", "--tasks", "bands", "--grid", "train.lr=[0.001,0.01]", "--seeds", "42,43", "--out"])
            .arg(out)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("tune.json")).unwrap()).unwrap();
        r
    };
    let first = tune(&af, &d.join("t-af"), &[]);
    let best = first["tasks"][0]["best_run"].as_str().unwrap().to_string();
    let md = std::fs::read_to_string(d.join("t-af/tune.md")).unwrap();
    assert!(md.contains("| bands | - |") && md.contains("Mean over the 1 tasks") && !md.contains("group means"), "{md}");
    let read = |p: PathBuf| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p.join("run.json")).unwrap()).unwrap() };
    let grid = read(d.join("t-af/bands/grid-0"));
    assert_eq!(grid["split_sizes"], serde_json::json!([48, 12, 12]));
    assert_eq!(grid["config"]["data"]["test_range"], serde_json::json!([48, 60]));
    assert_eq!(grid["config"]["data"]["test_images"], grid["config"]["data"]["train_images"], "grid runs never read the test files");
    let fin = read(d.join("t-af/bands/final-seed-43"));
    assert_eq!(fin["split_sizes"], serde_json::json!([60, 12, 30]));
    assert_eq!(fin["config"]["data"]["train_range"], serde_json::json!([0, 60]));

    // The add-on tune: VQT on the AdaptFormer tune's runs, from the cache.
    let vqt = d.join("vqt.toml");
    std::fs::write(&vqt, std::fs::read_to_string(&af).unwrap().replace("kind = \"linear\"\n\n[tuners.adaptformer]\nbottleneck = 4\ndropout = 0.0", "kind = \"vqt\"\nnum_queries = 2").replace("cache = \"off\"", "cache = \"kv\"")).unwrap();
    let on = d.join("t-af");
    let second = tune(&vqt, &d.join("t-vqt"), &["--on-tune", on.to_str().unwrap()]);
    assert_eq!(second["tasks"][0]["test"].as_array().unwrap().len(), 2);
    let g = read(d.join("t-vqt/bands/grid-1"));
    assert_eq!(g["tuned_from"]["run_dir"], serde_json::json!(on.join("bands").join(&best)), "grid add-ons build on the chosen grid run");
    assert_eq!(g["path"], "trunk");
    let f = read(d.join("t-vqt/bands/final-seed-43"));
    assert_eq!(f["tuned_from"]["run_dir"], serde_json::json!(on.join("bands/final-seed-43")), "final add-ons build on the same seed's final run");
    // Rerunning reuses every finished run.
    let again = tune(&vqt, &d.join("t-vqt"), &["--on-tune", on.to_str().unwrap()]);
    assert_eq!(again["tasks"][0]["test"], second["tasks"][0]["test"]);
    // An add-on tune needs a seed the earlier tune ran.
    let o = bin()
        .args(["tune", "--config"])
        .arg(&vqt)
        .args(["--set", "train.epochs=1", "--tasks", "bands", "--seeds", "7", "--out"])
        .arg(d.join("t-bad"))
        .args(["--on-tune", on.to_str().unwrap()])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("final-seed-7") && e.contains("not a finished final run"), "{e}");
}

/// `[data] kind = "tfds"`: a VTAB-1k task read straight from a TFDS data dir (the fixture written
/// by the real tensorflow_datasets writer): the splits task_adaptation defines, training and
/// scoring, tune's phases, and one-line errors.
#[test]
fn tfds_data_trains_with_the_task_adaptation_splits() {
    let d = tmp("tfds");
    let cfg = config(&d, "kind = \"vqt\"\nnum_queries = 1", "auto");
    let tfds = root().join("fixtures/tfds");
    let data = |task: &str| format!("data={{kind=\"tfds\",root=\"{}\",task=\"{task}\"}}", tfds.display());
    let rec = train_in("tfds", &cfg, &d.join("run"), "cpu", &["--set", &data("cifar100"), "--set", "train.epochs=1"]);
    assert_eq!(rec["split_sizes"], serde_json::json!([800, 200, 100]), "train800 / val200 / test of the fixture");
    let rec = train_in("tfds-clevr", &cfg, &d.join("clevr"), "cpu", &["--set", &data("clevr_dist"), "--set", "data.train_split=\"train800val200\"", "--set", "train.epochs=1"]);
    assert_eq!(rec["split_sizes"], serde_json::json!([1000, 200, 100]), "clevr's VTAB test is its TFDS validation split");
    let e = err_of(&["train", "--config", cfg.to_str().unwrap(), "--set", &data("dtd")]);
    assert!(e.contains("no TFDS dataset `dtd` here"), "{e}");
    let e = err_of(&["train", "--config", cfg.to_str().unwrap(), "--set", &data("cifar100").replace("}", ",num_classes=10}")]);
    assert!(e.contains("data.num_classes = 10") && e.contains("100 classes"), "{e}");
    let bad = format!("data={{kind=\"tfds\",root=\"{}\",task=\"cifar100\"}}", root().join("fixtures/tfds-corrupt/crc").display());
    let e = err_of(&["train", "--config", cfg.to_str().unwrap(), "--set", &bad, "--set", "data.train_split=\"test\""]);
    assert!(e.contains("cifar100-test.tfrecord-00001-of-00004") && e.contains("CRC"), "{e}");
}
