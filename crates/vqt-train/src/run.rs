//! One training run: load data and backbone, optionally build the feature cache, train the
//! query-side method with burn-train's `SupervisedTraining`, evaluate, write `run.json`.

use crate::config::{DataConfig, ExperimentConfig, MethodConfig, OptimizerKind};
use anyhow::{Context, Result};
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::nn::LinearConfig;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::optim::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::optim::lr_scheduler::sequential::SequentialLrSchedulerConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, AdamWConfig, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn::train::metric::{AccuracyMetric, LossMetric};
use burn::train::{Learner, SupervisedTraining};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use vqt_core::data::preprocess::Preprocess;
use vqt_core::data::Sample;
use vqt_models::cache::FeatureCache;
use vqt_models::vit::load::default_resample;
use vqt_models::vit::TrunkNoise;
use vqt_models::{QueryMethod, TrunkBatch, TrunkInput, TrunkModel, Vit};

/// One dataset row: its index into the split and its label.
#[derive(Clone, Debug)]
pub struct Item {
    /// Row within the split (and within its cache, when cached).
    pub row: usize,
    /// Class id.
    pub label: usize,
}

/// Builds trunk-path batches from images (decoded and preprocessed in the loader workers) or
/// from a feature cache.
#[derive(Clone)]
pub enum TrunkBatcher {
    /// Images of a split.
    Images {
        /// The split's samples.
        samples: Arc<Vec<Sample>>,
        /// Preprocessing.
        pre: Preprocess,
    },
    /// Rows of a feature cache.
    Cached {
        /// The cache.
        cache: Arc<FeatureCache>,
        /// The frozen backbone (hidden caches recompute K/V with it).
        vit: Arc<Vit>,
    },
}

impl Batcher<Item, TrunkBatch> for TrunkBatcher {
    fn batch(&self, items: Vec<Item>, device: &Device) -> TrunkBatch {
        let labels: Vec<i64> = items.iter().map(|i| i.label as i64).collect();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(labels, [items.len()]), device);
        let input = match self {
            TrunkBatcher::Images { samples, pre } => {
                let imgs: Vec<_> = items.iter().map(|i| &samples[i.row].image).collect();
                let (values, shape) = pre.batch(&imgs);
                TrunkInput::Images(Tensor::from_data(TensorData::new(values, shape), &device.clone().without_autodiff()))
            }
            TrunkBatcher::Cached { cache, vit } => {
                let rows: Vec<usize> = items.iter().map(|i| i.row).collect();
                TrunkInput::Cached(cache.batch(vit, &rows, device))
            }
        };
        TrunkBatch { input, targets }
    }
}

/// What `run.json` holds.
#[derive(Debug, Serialize)]
pub struct RunRecord {
    /// The resolved configuration.
    pub config: ExperimentConfig,
    /// Backend name.
    pub backend: String,
    /// Checkpoint identity (absent for a random backbone).
    pub checkpoint: Option<CheckpointRecord>,
    /// Method name.
    pub method: String,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// All parameters (backbone + method).
    pub total_params: usize,
    /// Images per split.
    pub split_sizes: [usize; 3],
    /// Feature cache: mode, dtype, bytes, build seconds.
    pub cache: Option<CacheRecord>,
    /// Validation accuracy (%) at the last epoch.
    pub val_accuracy: f64,
    /// Test accuracy (%) at the last epoch (scored once, after training).
    pub test_accuracy: f64,
    /// Process peak resident memory (bytes), Linux only.
    pub peak_rss_bytes: Option<u64>,
    /// Wall time of the whole run (seconds).
    pub wall_seconds: f64,
    /// `git rev-parse HEAD` of the working directory, if available.
    pub git_revision: Option<String>,
}

/// Checkpoint identity for the record.
#[derive(Debug, Serialize)]
pub struct CheckpointRecord {
    /// File.
    pub path: PathBuf,
    /// sha256.
    pub sha256: String,
    /// Detected naming.
    pub naming: String,
    /// How the position table was resampled, if it was.
    pub pos_embed_resampled: Option<String>,
}

/// Feature-cache facts for the record.
#[derive(Debug, Serialize)]
pub struct CacheRecord {
    /// `kv` or `hidden`.
    pub mode: String,
    /// `f32` or `f16`.
    pub dtype: String,
    /// Host bytes.
    pub bytes: usize,
    /// Seconds to build (one trunk pass over the training split).
    pub build_seconds: f64,
}

fn split(samples: &[Sample], range: [usize; 2], what: &str, path: &Path) -> Result<Vec<Sample>> {
    anyhow::ensure!(
        range[1] <= samples.len(),
        "{}: data.{what} {range:?} exceeds the {} images in the file",
        path.display(),
        samples.len()
    );
    Ok(samples[range[0]..range[1]].to_vec())
}

fn git_revision() -> Option<String> {
    let out = std::process::Command::new("git").args(["rev-parse", "HEAD"]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn accuracy(model: &TrunkModel, batcher: &TrunkBatcher, items: &[Item], batch: usize, device: &Device) -> f64 {
    let mut correct = 0usize;
    for chunk in items.chunks(batch) {
        let b = batcher.batch(chunk.to_vec(), device);
        let pred = model.forward(b.input).argmax(1).reshape([chunk.len()]);
        let t = b.targets.to_device(&pred.device());
        correct += pred.equal(t).int().sum().into_scalar::<i64>() as usize;
    }
    100.0 * correct as f64 / items.len() as f64
}


/// Runs the experiment; artifacts (learner logs, `run.json`) go to `out`.
pub fn train(cfg: &ExperimentConfig, backend: &str, device: &Device, out: &Path) -> Result<RunRecord> {
    let t0 = Instant::now();
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    let plain = device.clone().without_autodiff();
    let ad = plain.clone().autodiff();
    plain.seed(cfg.train.seed);
    ad.seed(cfg.train.seed);

    // Data.
    let DataConfig::Idx { train_images, train_labels, test_images, test_labels, num_classes, train_range, val_range, test_limit } = &cfg.data;
    let all_train = vqt_core::data::idx::read_idx_pair(train_images, train_labels, *num_classes)?;
    let train_set = Arc::new(split(&all_train, *train_range, "train_range", train_images)?);
    let val_set = Arc::new(split(&all_train, *val_range, "val_range", train_images)?);
    let mut test = vqt_core::data::idx::read_idx_pair(test_images, test_labels, *num_classes)?;
    if let Some(n) = test_limit {
        test.truncate(*n);
    }
    let test_set = Arc::new(test);
    let items = |s: &[Sample]| s.iter().enumerate().map(|(row, x)| Item { row, label: x.label }).collect::<Vec<_>>();
    let pre = Preprocess { img_size: cfg.backbone.img_size, resize: cfg.backbone.resize, normalization: cfg.backbone.normalization };

    // Backbone.
    let vcfg = cfg.vit_config();
    vcfg.validate().map_err(anyhow::Error::msg)?;
    let mut vit = vcfg.init(&plain);
    let mut checkpoint = None;
    if let Some(path) = &cfg.backbone.checkpoint {
        let map = vqt_core::load_checkpoint(path, cfg.backbone.format)?;
        let resample = default_resample(map.provenance.naming);
        let (loaded, report) = vit.load_tensor_map(map, resample)?;
        eprint!("{report}");
        vit = loaded;
        checkpoint = Some(CheckpointRecord {
            path: path.clone(),
            sha256: report.provenance.sha256.clone(),
            naming: format!("{:?}", report.provenance.naming),
            pos_embed_resampled: report.pos_embed_resampled.clone(),
        });
    }
    let constant_trunk = cfg.trunk_is_constant();
    let vit = if cfg.tuners.is_empty() { vit.freeze() } else { cfg.tuners.inject(vit).map_err(anyhow::Error::msg)? };

    // Method.
    let (d, depth, p) = (vit.embed_dim(), vit.depth(), vcfg.patch_size);
    let method = match &cfg.method {
        MethodConfig::Linear => QueryMethod::Linear(LinearConfig::new(d, *num_classes).init(&ad)),
        MethodConfig::Vqt(v) => QueryMethod::Vqt(v.init(depth, d, p, *num_classes, &ad)),
        MethodConfig::Synqt(s) => QueryMethod::Synqt(s.init(&vit, *num_classes, &ad)),
    };
    let noise = TrunkNoise { embed_dropout: cfg.train.trunk_embed_dropout, drop_path: cfg.train.trunk_drop_path };

    // Feature cache over the training split.
    let image_batcher = |s: &Arc<Vec<Sample>>| TrunkBatcher::Images { samples: s.clone(), pre: pre.clone() };
    let (train_batcher, cache_record) = match cfg.train.cache.kind(constant_trunk) {
        None => (image_batcher(&train_set), None),
        Some(kind) => {
            let bar = indicatif::ProgressBar::new(train_set.len() as u64).with_message("feature cache");
            bar.set_style(indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} images, {elapsed} (eta {eta})").expect("template"));
            let tc = Instant::now();
            let batches = train_set.chunks(cfg.train.batch_size).map(|c| {
                let imgs: Vec<_> = c.iter().map(|s| &s.image).collect();
                let (values, shape) = pre.batch(&imgs);
                Tensor::<4>::from_data(TensorData::new(values, shape), &plain)
            });
            let cache = FeatureCache::build(&vit, batches, kind, cfg.train.cache_dtype, |n| bar.inc(n as u64));
            bar.finish();
            let rec = CacheRecord {
                mode: format!("{:?}", kind).to_lowercase(),
                dtype: format!("{:?}", cfg.train.cache_dtype).to_lowercase(),
                bytes: cache.bytes(),
                build_seconds: tc.elapsed().as_secs_f64(),
            };
            (TrunkBatcher::Cached { cache: Arc::new(cache), vit: Arc::new(vit.clone()) }, Some(rec))
        }
    };
    let model = TrunkModel::tuned(vit, &cfg.tuners, method).with_noise(noise);
    let (trainable, total) = vqt_models::tuners::param_counts(&model.clone().fork(&ad));

    let loader_train = DataLoaderBuilder::new(train_batcher)
        .batch_size(cfg.train.batch_size)
        .shuffle(cfg.train.seed)
        .num_workers(cfg.train.num_workers)
        .build(InMemDataset::new(items(&train_set)));
    let val_batcher = image_batcher(&val_set);
    let loader_valid = DataLoaderBuilder::new(val_batcher.clone())
        .batch_size(cfg.train.batch_size)
        .num_workers(cfg.train.num_workers)
        .build(InMemDataset::new(items(&val_set)));

    // Optimiser and schedule (per iteration: linear warm-up, then cosine to 0).
    let t = &cfg.train;
    let optim = match t.optimizer {
        OptimizerKind::Adamw => AdamWConfig::new().with_epsilon(1e-8).with_weight_decay(t.weight_decay as f32).init(),
        OptimizerKind::Adam => AdamConfig::new().with_epsilon(1e-8).with_weight_decay((t.weight_decay > 0.0).then(|| WeightDecayConfig::new(t.weight_decay as f32))).init(),
        OptimizerKind::Sgd => SgdConfig::new()
            .with_momentum(Some(MomentumConfig::new().with_momentum(0.9)))
            .with_weight_decay((t.weight_decay > 0.0).then(|| WeightDecayConfig::new(t.weight_decay as f32)))
            .init(),
    };
    let iters_per_epoch = train_set.len().div_ceil(t.batch_size);
    let total_iters = iters_per_epoch * t.epochs;
    let warmup = (iters_per_epoch * t.warmup_epochs).min(total_iters.saturating_sub(1));
    let cosine = CosineAnnealingLrSchedulerConfig::new(t.lr, (total_iters - warmup).max(1));
    let scheduler = if warmup > 0 {
        SequentialLrSchedulerConfig::new(
            vec![LinearLrSchedulerConfig::new(t.lr / warmup as f64, t.lr, warmup).into(), cosine.into()],
            vec![warmup],
        )
        .init()
    } else {
        cosine.init()
    }
    .map_err(|e| anyhow::anyhow!("learning-rate schedule: {e}"))?;

    let result = SupervisedTraining::new(out, loader_train, loader_valid)
        .metrics((AccuracyMetric::new(), LossMetric::new()))
        .num_epochs(t.epochs)
        .with_application_logger(None)
        .launch(Learner::new(model.fork(&ad), optim, scheduler));
    if let Some(e) = result.error {
        anyhow::bail!("training failed: {e}");
    }
    let model = result.model;

    // Final evaluation: validation and test once, at the last epoch.
    let val_accuracy = accuracy(&model, &val_batcher, &items(&val_set), t.batch_size, &plain);
    let test_accuracy = accuracy(&model, &image_batcher(&test_set), &items(&test_set), t.batch_size, &plain);
    let record = RunRecord {
        config: cfg.clone(),
        backend: backend.to_string(),
        checkpoint,
        method: cfg.method_name(),
        trainable_params: trainable,
        total_params: total,
        split_sizes: [train_set.len(), val_set.len(), test_set.len()],
        cache: cache_record,
        val_accuracy,
        test_accuracy,
        peak_rss_bytes: vqt_core::mem::proc_status_bytes("VmHWM"),
        wall_seconds: t0.elapsed().as_secs_f64(),
        git_revision: git_revision(),
    };
    let path = out.join("run.json");
    vqt_core::fs::write_atomic(&path, serde_json::to_string_pretty(&record)?.as_bytes()).with_context(|| path.display().to_string())?;
    Ok(record)
}
