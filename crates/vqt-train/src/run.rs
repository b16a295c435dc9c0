//! One training run: load data and backbone, optionally build the feature cache, train the
//! query-side method with burn-train's `SupervisedTraining`, evaluate, write `run.json`.

use crate::config::{DataConfig, ExperimentConfig, MethodConfig, OptimizerKind};
use anyhow::{Context, Result};
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::transform::ShuffledDataset;
use burn::data::dataset::{Dataset, InMemDataset};
use burn::module::Module;
use burn::nn::LinearConfig;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::optim::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::optim::lr_scheduler::sequential::SequentialLrSchedulerConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, AdamWConfig, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn::train::checkpoint::KeepLastNCheckpoints;
use burn::train::metric::{AccuracyMetric, LearningRateMetric, LossMetric};
use burn::train::renderer::MetricsRenderer;
use burn::train::{ExecutionStrategy, Learner, MultiDeviceOptim, SupervisedTraining};
use crate::checkpoint::{StateCheckpointer, TrainableCheckpointer};
use crate::rundir::{RunState, RUN_FILE};
use crate::progress::{EpochMetrics, EpochRenderer, RunLog};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vqt_core::data::files::Skipped;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vqt_core::data::preprocess::{augment_seed as augment_seed_for, Preprocess};
use vqt_core::data::Sample;
use vqt_models::cache::{CacheKind, FeatureCache};
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
    /// The epoch it is served in (training; 0 elsewhere): seeds its augmentation.
    pub epoch: usize,
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
        /// `Some(run seed)`: apply the training augmentation, seeded per (seed, epoch, row).
        augment_seed: Option<u64>,
        /// Threads preprocessing one batch (`train.num_workers`); the result does not depend on it.
        threads: usize,
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
            TrunkBatcher::Images { samples, pre, augment_seed, threads } => {
                let (values, shape) = match augment_seed {
                    Some(seed) => {
                        let imgs: Vec<_> = items.iter().map(|i| (&samples[i.row].image, augment_seed_for(*seed, i.epoch, i.row))).collect();
                        pre.batch_train_on(&imgs, *threads)
                    }
                    None => pre.batch_on(&items.iter().map(|i| &samples[i.row].image).collect::<Vec<_>>(), *threads),
                };
                TrunkInput::Images(Tensor::from_data(TensorData::new(values, shape), &device.clone().without_autodiff()))
            }
            TrunkBatcher::Cached { cache, vit } => {
                let rows: Vec<usize> = items.iter().map(|i| i.row).collect();
                TrunkInput::Cached(cache.batch(vit, &rows, device))
            }
        };
        TrunkBatch { input, targets, rng_seed: None }
    }
}

/// The training batcher: a [`TrunkBatcher`] whose batches carry a device seed derived from the
/// run seed, the epoch and the batch's rows (see [`TrunkBatch::rng_seed`]), so dropout and
/// drop-path masks repeat exactly in a resumed run.
#[derive(Clone)]
pub struct SeededBatcher {
    /// Builds the batch.
    pub inner: TrunkBatcher,
    /// The run seed.
    pub seed: u64,
}

impl Batcher<Item, TrunkBatch> for SeededBatcher {
    fn batch(&self, items: Vec<Item>, device: &Device) -> TrunkBatch {
        let epoch = items.first().map_or(0, |i| i.epoch);
        let rows = items.iter().fold(0x5EED_u64, |h, i| augment_seed_for(h, epoch, i.row));
        let seed = augment_seed_for(self.seed ^ 0xD0_0D_F00D, epoch, rows as usize);
        TrunkBatch { rng_seed: Some(seed), ..self.inner.batch(items, device) }
    }
}

/// The training split in a fresh, seeded order every epoch, where epoch e's order depends only on
/// `(seed, e)`. burn's loader-level shuffle draws from an RNG that a resumed run cannot restore;
/// this order can be, so a resumed run sees the same batches as an uninterrupted one.
///
/// The loader asks for every row exactly once per epoch, so the epoch is the number of rows
/// served so far divided by the split size (plus the epoch the run started at).
pub struct EpochShuffled {
    items: Arc<Vec<Item>>,
    seed: u64,
    start_epoch: usize,
    served: std::sync::atomic::AtomicUsize,
    orders: Mutex<Vec<(usize, Arc<ShuffledDataset<InMemDataset<usize>, usize>>)>>,
}

impl EpochShuffled {
    /// Rows `items`, shuffled per epoch from `seed`, starting at epoch index `start_epoch`.
    pub fn new(items: Vec<Item>, seed: u64, start_epoch: usize) -> Self {
        Self { items: Arc::new(items), seed, start_epoch, served: Default::default(), orders: Mutex::new(Vec::new()) }
    }

    fn order(&self, epoch: usize) -> Arc<ShuffledDataset<InMemDataset<usize>, usize>> {
        let mut orders = self.orders.lock().expect("orders");
        if let Some((_, o)) = orders.iter().find(|(e, _)| *e == epoch) {
            return o.clone();
        }
        let ids = InMemDataset::new((0..self.items.len()).collect());
        let o = Arc::new(ShuffledDataset::new(ids, self.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64)));
        orders.retain(|(e, _)| *e + 1 >= epoch); // keep the current and previous epoch only
        orders.push((epoch, o.clone()));
        o
    }
}

impl Dataset<Item> for EpochShuffled {
    fn get(&self, index: usize) -> Result<Item, burn::data::dataset::DatasetError> {
        let n = self.served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let epoch = self.start_epoch + n / self.items.len().max(1);
        let row = self.order(epoch).get(index)?;
        Ok(Item { epoch, ..self.items[row].clone() })
    }

    fn len(&self) -> usize {
        self.items.len()
    }
}

/// What `run.json` holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunRecord {
    /// The resolved configuration.
    pub config: ExperimentConfig,
    /// Backend name.
    pub backend: String,
    /// Device index, if one was given.
    pub device_index: Option<usize>,
    /// Float precision of every tensor (`--precision`).
    #[serde(default = "f32_name")]
    pub precision: String,
    /// Device indices of a data-parallel run (`--devices`); empty for one device.
    #[serde(default)]
    pub devices: Vec<usize>,
    /// Checkpoint identity (absent for a random backbone).
    pub checkpoint: Option<CheckpointRecord>,
    /// Method name (`vqt`, `linear+lora`, `vqt+adaptformer`, …).
    pub method: String,
    /// `trunk` (frozen backbone without autodiff) or `full` (tuned backbone on the tape).
    pub path: String,
    /// Normalisation preset of the inputs.
    pub normalization: String,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// All parameters (backbone + tuners + method).
    pub total_params: usize,
    /// Images per split.
    pub split_sizes: [usize; 3],
    /// Items `skip_bad` skipped, per split (empty when nothing was skipped).
    #[serde(default)]
    pub data_skipped: BTreeMap<String, Skipped>,
    /// Feature cache: mode, dtype, bytes, build seconds.
    pub cache: Option<CacheRecord>,
    /// End-of-epoch training and validation metrics (loss, accuracy, lr).
    pub epochs: Vec<EpochMetrics>,
    /// Head2Toe feature selection (`head2toe` in the config): the selection and the earlier
    /// stages. With it, `epochs` and the accuracies are stage B's, and `trainable_params` counts
    /// the final model's learned tensors (the VQT stage's queries and stage B's head).
    #[serde(default)]
    pub head2toe: Option<Head2ToeRecord>,
    /// The epoch this run resumed from, if it did (the VQT stage's, with Head2Toe).
    pub resumed_from_epoch: Option<usize>,
    /// Validation accuracy (%) at the last epoch.
    pub val_accuracy: f64,
    /// Test accuracy (%) at the last epoch (scored once, after training).
    pub test_accuracy: f64,
    /// Trainable parameters of the final model (safetensors, relative to the run directory).
    pub trainable_file: String,
    /// Process peak resident memory (bytes), Linux only.
    pub peak_rss_bytes: Option<u64>,
    /// Wall time of this invocation (seconds).
    pub wall_seconds: f64,
    /// The allocator settings the process ran with (they change speed, not results).
    #[serde(default)]
    pub allocator: String,
    /// `git rev-parse HEAD` of the working directory, if available.
    pub git_revision: Option<String>,
}

/// Checkpoint identity for the record.
#[derive(Debug, Serialize, Deserialize)]
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
#[derive(Debug, Serialize, Deserialize)]
pub struct CacheRecord {
    /// `kv` or `hidden`.
    pub mode: String,
    /// `f32` or `f16`.
    pub dtype: String,
    /// Host bytes.
    pub bytes: usize,
    /// Seconds to build (one trunk pass over the training split), or to open and verify a
    /// cache file.
    pub build_seconds: f64,
    /// True when the cache was read from `train.cache_file` (built by an earlier run or
    /// `vqt-train cache`), false when this run built it.
    #[serde(default)]
    pub from_file: bool,
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


/// Everything a run needs before training: data splits, input pipeline and the model.
pub struct Prepared {
    /// Training split.
    pub train_set: Arc<Vec<Sample>>,
    /// Validation split.
    pub val_set: Arc<Vec<Sample>>,
    /// Test split.
    pub test_set: Arc<Vec<Sample>>,
    /// Preprocessing.
    pub pre: Preprocess,
    /// The model as built (tuners injected, method initialised), not yet trained.
    pub model: TrunkModel,
    /// Checkpoint identity.
    pub checkpoint: Option<CheckpointRecord>,
    /// Number of classes.
    pub num_classes: usize,
    /// What `skip_bad` skipped, per split (`train`, `val`, `test`).
    pub skipped: BTreeMap<String, Skipped>,
}

type Splits = (Vec<Sample>, Vec<Sample>, Vec<Sample>, usize, BTreeMap<String, Skipped>);

/// Reads the three splits of `data` (decoding images on `threads` threads).
pub fn load_data(data: &DataConfig, threads: usize) -> Result<Splits> {
    use vqt_core::data::files;
    let decode = |entries: Vec<files::Entry>, classes: usize, skip: bool, name: &str, skipped: &mut BTreeMap<String, Skipped>| -> Result<Vec<Sample>> {
        let (samples, s) = files::load(&entries, classes, skip, threads)?;
        if s.total() > 0 {
            eprintln!("{name}: skipped {} bad item(s): {} missing, {} corrupt, {} label out of range", s.total(), s.missing, s.corrupt, s.bad_label);
            skipped.insert(name.to_string(), s);
        }
        Ok(samples)
    };
    let mut skipped = BTreeMap::new();
    match data {
        DataConfig::Idx { train_images, train_labels, test_images, test_labels, num_classes, train_range, val_range, test_limit } => {
            let all_train = vqt_core::data::idx::read_idx_pair(train_images, train_labels, *num_classes)?;
            let train = split(&all_train, *train_range, "train_range", train_images)?;
            let val = split(&all_train, *val_range, "val_range", train_images)?;
            let mut test = vqt_core::data::idx::read_idx_pair(test_images, test_labels, *num_classes)?;
            if let Some(n) = test_limit {
                anyhow::ensure!(
                    *n <= test.len(),
                    "{}: data.test_limit = {n} exceeds the {} images in the file",
                    test_images.display(),
                    test.len()
                );
                test.truncate(*n);
            }
            Ok((train, val, test, *num_classes, skipped))
        }
        DataConfig::Vtab { root, task, train_split, val_split, test_split, check_counts, skip_bad, .. } => {
            let (_, classes) = files::vtab_task(task).map_err(anyhow::Error::msg)?;
            let mut read = |split: &str| -> Result<Vec<Sample>> {
                let entries = files::read_vtab_split(root, task, split, *check_counts)?;
                decode(entries, classes, *skip_bad, split, &mut skipped)
            };
            let (train, val, test) = (read(train_split)?, read(val_split)?, read(test_split)?);
            Ok((train, val, test, classes, skipped))
        }
        DataConfig::Fgvc { root, image_root, num_classes, skip_bad } => {
            let ([train, val, test], found) = files::read_fgvc(root, image_root)?;
            anyhow::ensure!(found == *num_classes, "{}: the splits hold {found} classes, but data.num_classes = {num_classes}", root.display());
            let train = decode(train, found, *skip_bad, "train", &mut skipped)?;
            let val = decode(val, found, *skip_bad, "val", &mut skipped)?;
            let test = decode(test, found, *skip_bad, "test", &mut skipped)?;
            Ok((train, val, test, found, skipped))
        }
        DataConfig::ImageFolder { train, val, test, num_classes, skip_bad } => {
            let mut out = Vec::new();
            let mut names: Option<Vec<String>> = None;
            for (name, dir) in [("train", train), ("val", val), ("test", test)] {
                let (entries, classes) = files::read_image_folder(dir)?;
                anyhow::ensure!(classes.len() == *num_classes, "{}: {} class folders, but data.num_classes = {num_classes}", dir.display(), classes.len());
                if let Some(n) = &names {
                    anyhow::ensure!(*n == classes, "{}: class folders differ from the training tree's", dir.display());
                }
                names = Some(classes);
                out.push(decode(entries, *num_classes, *skip_bad, name, &mut skipped)?);
            }
            let test = out.pop().expect("3");
            let val = out.pop().expect("3");
            let train = out.pop().expect("3");
            Ok((train, val, test, *num_classes, skipped))
        }
    }
}

fn items(s: &[Sample]) -> Vec<Item> {
    s.iter().enumerate().map(|(row, x)| Item { row, label: x.label, epoch: 0 }).collect()
}

impl Prepared {
    /// The samples of `split`.
    pub fn split(&self, split: EvalSplit) -> &Arc<Vec<Sample>> {
        match split {
            EvalSplit::Train => &self.train_set,
            EvalSplit::Val => &self.val_set,
            EvalSplit::Test => &self.test_set,
        }
    }

    fn image_batcher(&self, s: &Arc<Vec<Sample>>, threads: usize) -> TrunkBatcher {
        TrunkBatcher::Images { samples: s.clone(), pre: self.pre.clone(), augment_seed: None, threads }
    }
}

/// Loads the data and builds the model of `cfg` (seeded by `train.seed`).
pub fn prepare(cfg: &ExperimentConfig, device: &Device) -> Result<Prepared> {
    let plain = device.clone().without_autodiff();
    let ad = plain.clone().autodiff();
    plain.seed(cfg.train.seed);
    ad.seed(cfg.train.seed);

    // Data.
    let (train_set, val_set, test_set, num_classes, skipped) = load_data(&cfg.data, cfg.train.num_workers.max(1))?;
    let (train_set, val_set, test_set) = (Arc::new(train_set), Arc::new(val_set), Arc::new(test_set));
    let pre = cfg.preprocess();

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
    let vit = if cfg.tuners.is_empty() { vit.freeze() } else { cfg.tuners.inject(vit).map_err(anyhow::Error::msg)? };

    // Method.
    let (d, depth, p) = (vit.embed_dim(), vit.depth(), vcfg.patch_size);
    let method = match &cfg.method {
        MethodConfig::Linear => QueryMethod::Linear(LinearConfig::new(d, num_classes).init(&ad)),
        MethodConfig::Vqt(v) => QueryMethod::Vqt(v.init(depth, d, p, num_classes, &ad)),
        MethodConfig::Synqt(s) => QueryMethod::Synqt(s.init(&vit, num_classes, &ad)),
    };
    let noise = TrunkNoise { embed_dropout: cfg.train.trunk_embed_dropout, drop_path: cfg.train.trunk_drop_path };
    let model = TrunkModel::tuned(vit, &cfg.tuners, method).with_noise(noise);
    Ok(Prepared { train_set, val_set, test_set, pre, model, checkpoint, num_classes, skipped })
}

/// What a feature cache is valid for, one field per input; [`FeatureCache::open`] compares them
/// field by field and names the first that differs. Serialised as JSON into the cache header
/// (never `Debug` output, which is not a stable format).
#[derive(Serialize)]
pub struct CacheKey<'a> {
    /// `sha256:<hex>` of the checkpoint file, or `random-init-seed:<seed>` for a random backbone.
    pub checkpoint: String,
    /// The backbone's shape at this input size.
    pub backbone: vqt_models::VitConfig,
    /// sha256 of the decoded training split (every image's pixels and label, in order): a data
    /// file changed in place changes it, a moved one does not.
    pub train_data_sha256: String,
    /// Images in the training split.
    pub train_images: usize,
    /// The input pipeline.
    pub preprocess: &'a Preprocess,
    /// `kv` or `hidden`.
    pub kind: CacheKind,
    /// Storage dtype.
    pub dtype: vqt_models::cache::CacheDtype,
}

/// The cache key of `cfg`'s training split (hashes the decoded split: a fraction of a second per
/// thousand 224-px images).
pub fn cache_key(cfg: &ExperimentConfig, prep: &Prepared, kind: CacheKind) -> serde_json::Value {
    let checkpoint = match &prep.checkpoint {
        Some(c) => format!("sha256:{}", c.sha256),
        None => format!("random-init-seed:{}", cfg.train.seed),
    };
    let key = CacheKey {
        checkpoint,
        backbone: cfg.vit_config(),
        train_data_sha256: vqt_core::hash::sha256_samples(&prep.train_set),
        train_images: prep.train_set.len(),
        preprocess: &prep.pre,
        kind,
        dtype: cfg.train.cache_dtype,
    };
    serde_json::to_value(&key).expect("cache key serialises")
}

/// Builds the feature cache of the training split (one trunk pass, with a progress bar).
fn build_cache(prep: &Prepared, cfg: &ExperimentConfig, kind: CacheKind, plain: &Device) -> FeatureCache {
    let bar = indicatif::ProgressBar::new(prep.train_set.len() as u64).with_message("feature cache");
    bar.set_style(indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} images, {elapsed} (eta {eta})").expect("template"));
    let batches = prep.train_set.chunks(cfg.train.batch_size).map(|c| {
        let imgs: Vec<_> = c.iter().map(|s| &s.image).collect();
        let (values, shape) = prep.pre.batch(&imgs);
        Tensor::<4>::from_data(TensorData::new(values, shape), plain)
    });
    let cache = FeatureCache::build(&prep.model.backbone, batches, kind, cfg.train.cache_dtype, |n| bar.inc(n as u64));
    bar.finish();
    cache
}

fn cache_batcher(prep: &Prepared, cfg: &ExperimentConfig, plain: &Device) -> Result<Option<(TrunkBatcher, CacheRecord)>> {
    let Some(kind) = cfg.train.cache.kind(cfg.trunk_is_constant()) else { return Ok(None) };
    let tc = Instant::now();
    let (cache, from_file) = match &cfg.train.cache_file {
        Some(path) if path.exists() => (FeatureCache::open(path, &cache_key(cfg, prep, kind))?, true),
        Some(path) => {
            let c = build_cache(prep, cfg, kind, plain);
            c.save(path, &cache_key(cfg, prep, kind))?;
            (c, false)
        }
        None => (build_cache(prep, cfg, kind, plain), false),
    };
    let rec = CacheRecord {
        mode: format!("{:?}", kind).to_lowercase(),
        dtype: format!("{:?}", cfg.train.cache_dtype).to_lowercase(),
        bytes: cache.bytes(),
        build_seconds: tc.elapsed().as_secs_f64(),
        from_file,
    };
    Ok(Some((TrunkBatcher::Cached { cache: Arc::new(cache), vit: Arc::new(prep.model.backbone.clone()) }, rec)))
}

/// `vqt-train cache`: builds the training split's feature cache into `path` (atomically, with
/// its validity key) so later runs of the same backbone/data/preprocessing skip the trunk pass.
pub fn build_cache_file(cfg: &ExperimentConfig, device: &Device, path: &Path) -> Result<(usize, usize)> {
    let kind = cfg
        .train
        .cache
        .kind(cfg.trunk_is_constant())
        .ok_or_else(|| anyhow::anyhow!("train.cache: this config's trunk is not frozen and deterministic (tuners or faithful-mode noise), so it has no feature cache"))?;
    let prep = prepare(cfg, device)?;
    let cache = build_cache(&prep, cfg, kind, &device.clone().without_autodiff());
    cache.save(path, &cache_key(cfg, &prep, kind))?;
    Ok((cache.len(), cache.bytes()))
}

/// `vqt-train extract`: per-layer features of a split to safetensors, for analysis: for every
/// block i, `layer.{i}.cls` (the class token of the residual stream after block i) and
/// `layer.{i}.patch_mean` (mean over patch tokens), `final.cls` (after the final LayerNorm),
/// all `[images, D]` f32, and `labels` `[images]` i64. Returns the number of images.
pub fn extract(cfg: &ExperimentConfig, device: &Device, split: EvalSplit, path: &Path) -> Result<usize> {
    let prep = prepare(cfg, device)?;
    let plain = device.clone().without_autodiff();
    let vit = prep.model.backbone.valid();
    let set = prep.split(split);
    let depth = vit.depth();
    let mut cls: Vec<Vec<f32>> = vec![Vec::new(); depth];
    let mut mean: Vec<Vec<f32>> = vec![Vec::new(); depth];
    let mut fin: Vec<f32> = Vec::new();
    for chunk in set.chunks(cfg.train.batch_size) {
        let imgs: Vec<_> = chunk.iter().map(|s| &s.image).collect();
        let (values, shape) = prep.pre.batch(&imgs);
        let trace = vit.forward_trace(Tensor::<4>::from_data(TensorData::new(values, shape), &plain));
        for (i, z) in trace.blocks.iter().enumerate() {
            let [b, n, d] = z.dims();
            cls[i].extend(vqt_core::HostTensor::from_tensor(z.clone().narrow(1, 0, 1).reshape([b, d])).data);
            mean[i].extend(vqt_core::HostTensor::from_tensor(z.clone().narrow(1, 1, n - 1).mean_dim(1).reshape([b, d])).data);
        }
        fin.extend(vqt_core::HostTensor::from_tensor(trace.cls).data);
    }
    let (n, d) = (set.len(), vit.embed_dim());
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let labels: Vec<u8> = set.iter().flat_map(|s| (s.label as i64).to_le_bytes()).collect();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for i in 0..depth {
        owned.push((format!("layer.{i}.cls"), safetensors::Dtype::F32, vec![n, d], bytes(&cls[i])));
        owned.push((format!("layer.{i}.patch_mean"), safetensors::Dtype::F32, vec![n, d], bytes(&mean[i])));
    }
    owned.push(("final.cls".into(), safetensors::Dtype::F32, vec![n, d], bytes(&fin)));
    owned.push(("labels".into(), safetensors::Dtype::I64, vec![n], labels));
    let views = owned
        .iter()
        .map(|(k, dt, s, b)| Ok((k.clone(), safetensors::tensor::TensorView::new(*dt, s.clone(), b)?)))
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let meta = std::collections::HashMap::from([("split".to_string(), format!("{split:?}").to_lowercase())]);
    let data = safetensors::serialize(views, Some(meta))?;
    vqt_core::fs::write_atomic(path, &data).with_context(|| path.display().to_string())?;
    Ok(n)
}

/// The file per-epoch metrics are kept in while a run is in progress (for `--resume`).
const EPOCHS_FILE: &str = "epochs.json";
/// The final trainable parameters.
pub const TRAINABLE_FILE: &str = "trainable.safetensors";

/// How to start training.
#[derive(Clone, Debug, Default)]
pub struct TrainOptions {
    /// Continue from the latest usable checkpoint in `<out>/checkpoint` (the run's recorded
    /// settings must match).
    pub resume: bool,
    /// Replace whatever run `out` holds (completed or interrupted) with a fresh one.
    pub overwrite: bool,
    /// Device index, for the record.
    pub device_index: Option<usize>,
    /// The precision the device was configured with, for the record and the f16 checks.
    pub precision: vqt_core::device::Precision,
    /// `--devices`: with two or more (plain) devices, data-parallel training through
    /// burn-train's `MultiDevice` strategy (the first device holds the optimizer); their indices
    /// go into the record.
    pub devices: Vec<(usize, Device)>,
}

fn f32_name() -> String {
    "f32".into()
}

/// Where the Head2Toe stages keep their checkpoints, metrics and trainable files (under the run
/// directory).
pub const HEAD2TOE_DIR: &str = "head2toe";

/// What the Head2Toe stages add to `run.json` (the run's top-level `epochs`, `val_accuracy` and
/// `test_accuracy` are stage B's; its `trainable_file` holds the VQT stage's queries and head).
#[derive(Debug, Serialize, Deserialize)]
pub struct Head2ToeRecord {
    /// Width F of the full head input `[cls, every layer's query outputs]`.
    pub features: usize,
    /// Kept feature indices into it, highest stage-A score first (`int(F·keep)` of them).
    pub selection: Vec<usize>,
    /// Validation accuracy (%) of the VQT stage at its last epoch.
    pub vqt_val_accuracy: f64,
    /// Per-epoch metrics of the VQT stage.
    pub vqt_epochs: Vec<EpochMetrics>,
    /// Validation accuracy (%) of stage A (compress) at its last epoch.
    pub compress_val_accuracy: f64,
    /// Per-epoch metrics of stage A.
    pub compress_epochs: Vec<EpochMetrics>,
    /// Stage B's head (safetensors, relative to the run directory).
    pub featselect_file: String,
}

/// What every training stage shares: batchers, items, options.
struct Stages<'a> {
    cfg: &'a ExperimentConfig,
    opts: &'a TrainOptions,
    train_batcher: TrunkBatcher,
    val_batcher: TrunkBatcher,
    train_items: Vec<Item>,
    val_items: Vec<Item>,
    ad: Device,
}

/// A trained stage: the model on the autodiff device (with that stage's trainability) and its
/// per-epoch metrics.
struct Trained {
    model: TrunkModel,
    epochs: Vec<EpochMetrics>,
    resumed_from: Option<usize>,
}

impl Stages<'_> {
    /// The epoch the stage in `dir` continues after with `--resume` (`None`: from scratch;
    /// `Some(train.epochs)`: it is complete and is only reloaded).
    fn start(&self, dir: &Path) -> Option<usize> {
        self.opts.resume.then(|| Self::usable(&dir.join("checkpoint"))).flatten()
    }

    /// The newest usable checkpoint in `ckpt_dir`; newer damaged ones are reported in one line
    /// each and skipped.
    fn usable(ckpt_dir: &Path) -> Option<usize> {
        let scan = TrainableCheckpointer::scan(ckpt_dir);
        for (epoch, why) in &scan.damaged {
            let fallback = scan.usable.map_or("no earlier usable checkpoint".to_string(), |e| format!("falling back to epoch {e}"));
            eprintln!("warning: {}: the checkpoint of epoch {epoch} is unusable ({why}); {fallback}", ckpt_dir.display());
        }
        scan.usable
    }

    /// Trains `model` for `train.epochs` epochs at peak rate `lr` with burn-train's learner;
    /// checkpoints go to `<dir>/checkpoint`, per-epoch metrics to `<dir>/epochs.json`.
    fn run(&self, model: TrunkModel, dir: &Path, lr: f64, start: Option<usize>) -> Result<Trained> {
        let t = &self.cfg.train;
        let ckpt_dir = dir.join("checkpoint");
        let epochs_path = dir.join(EPOCHS_FILE);
        // The model on the autodiff device, as the learner trains it: trainability is visible there.
        let template = model.clone().fork(&self.ad);
        let previous = |done: usize| -> Result<Vec<EpochMetrics>> {
            let mut previous: Vec<EpochMetrics> = match std::fs::read_to_string(&epochs_path) {
                Ok(text) => serde_json::from_str(&text).with_context(|| epochs_path.display().to_string())?,
                Err(_) => Vec::new(),
            };
            previous.retain(|e| e.epoch <= done);
            Ok(previous)
        };
        if start == Some(t.epochs) {
            // Completed before an interruption of a later stage: reload it.
            let model = vqt_models::tuners::load_trainable(template, &TrainableCheckpointer::path(&ckpt_dir, t.epochs))?;
            return Ok(Trained { model, epochs: previous(t.epochs)?, resumed_from: start });
        }

        // One loader thread, so batches arrive in the order of the epoch's shuffle: burn's
        // multi-worker loader hands each worker a slice of the split and delivers whichever batch
        // is ready first, which made the update order (and the results) vary from run to run.
        // `train.num_workers` threads preprocess the images of each batch instead (in order).
        let loader_train = DataLoaderBuilder::new(SeededBatcher { inner: self.train_batcher.clone(), seed: t.seed })
            .batch_size(t.batch_size)
            .num_workers(1)
            .build(EpochShuffled::new(self.train_items.clone(), t.seed, start.unwrap_or(0)));
        let loader_valid = DataLoaderBuilder::new(self.val_batcher.clone())
            .batch_size(t.batch_size)
            .num_workers(1)
            .build(InMemDataset::new(self.val_items.clone()));

        // Optimiser and schedule (per iteration: linear warm-up, then cosine to 0).
        let optim = match t.optimizer {
            OptimizerKind::Adamw => AdamWConfig::new().with_epsilon(t.adam_epsilon as f32).with_weight_decay(t.weight_decay as f32).init(),
            OptimizerKind::Adam => AdamConfig::new().with_epsilon(t.adam_epsilon as f32).with_weight_decay((t.weight_decay > 0.0).then(|| WeightDecayConfig::new(t.weight_decay as f32))).init(),
            OptimizerKind::Sgd => SgdConfig::new()
                .with_momentum(Some(MomentumConfig::new().with_momentum(0.9)))
                .with_weight_decay((t.weight_decay > 0.0).then(|| WeightDecayConfig::new(t.weight_decay as f32)))
                .init(),
        };
        // The schedule advances once per optimizer step (after `grad_accumulation` batches; with N
        // devices each step takes one batch per device, each device reading 1/N of the split).
        let workers = self.opts.devices.len().max(1);
        let iters_per_epoch = self.train_items.len().div_ceil(workers).div_ceil(t.batch_size).div_ceil(t.grad_accumulation);
        let total_iters = iters_per_epoch * t.epochs;
        let warmup = (iters_per_epoch * t.warmup_epochs).min(total_iters.saturating_sub(1));
        let cosine = CosineAnnealingLrSchedulerConfig::new(lr, (total_iters - warmup).max(1));
        let scheduler = if warmup > 0 {
            SequentialLrSchedulerConfig::new(vec![LinearLrSchedulerConfig::new(lr / warmup as f64, lr, warmup).into(), cosine.into()], vec![warmup]).init()
        } else {
            cosine.init()
        }
        .map_err(|e| anyhow::anyhow!("learning-rate schedule: {e}"))?;

        // Per-epoch metrics survive an interruption in epochs.json.
        let earlier = match start {
            Some(done) => previous(done)?,
            None => Vec::new(),
        };
        let log = Arc::new(Mutex::new(RunLog { epochs: earlier, non_finite: None, persist: Some(epochs_path.clone()) }));

        let mut training = SupervisedTraining::new(dir, loader_train, loader_valid)
            .metrics((AccuracyMetric::new(), LossMetric::new()))
            .metric_train_numeric(LearningRateMetric::new())
            .num_epochs(t.epochs)
            .with_application_logger(None)
            .with_custom_checkpointers(
                TrainableCheckpointer::new(&ckpt_dir, template.clone()),
                StateCheckpointer::new(&ckpt_dir, crate::checkpoint::OPTIM),
                StateCheckpointer::new(&ckpt_dir, crate::checkpoint::SCHEDULER),
            )
            .with_checkpointing_strategy(KeepLastNCheckpoints::new(2));
        if t.grad_accumulation > 1 {
            training = training.grads_accumulation(t.grad_accumulation);
        }
        if self.opts.devices.len() > 1 {
            let devices = self.opts.devices.iter().map(|(_, d)| d.clone().without_autodiff().autodiff()).collect();
            training = training.with_training_strategy(ExecutionStrategy::MultiDevice(devices, MultiDeviceOptim::OptimMainDevice).into());
        }
        if let Some(n_epochs) = t.early_stopping_patience {
            use burn::train::metric::store::{Aggregate, Direction, Split};
            training = training.early_stopping(burn::train::MetricEarlyStoppingStrategy::new(
                &LossMetric::new(),
                Aggregate::Mean,
                Direction::Lowest,
                Split::Valid,
                burn::train::StoppingCondition::NoImprovementSince { n_epochs },
            ));
        }
        if let Some(epoch) = start {
            eprintln!("resuming from the checkpoint of epoch {epoch} in {}", ckpt_dir.display());
            training = training.checkpoint(epoch);
        }
        let tui = tui_renderer(training.interrupter(), start);
        let renderer = EpochRenderer::new(log.clone(), training.interrupter(), tui);
        let result = training.renderer(Box::new(renderer)).launch(Learner::new(model.fork(&self.ad), optim, scheduler));
        let log = std::mem::take(&mut *log.lock().expect("run log"));
        if let Some((epoch, iteration, value)) = log.non_finite {
            let kept = TrainableCheckpointer::latest(&ckpt_dir)
                .map(|e| format!("the last good checkpoint is epoch {e} ({})", TrainableCheckpointer::path(&ckpt_dir, e).display()))
                .unwrap_or_else(|| "no epoch completed, so no checkpoint was kept".into());
            anyhow::bail!("training stopped: loss is {value} at epoch {epoch}, iteration {iteration}; {kept}");
        }
        if let Some(e) = result.error {
            anyhow::bail!("training failed: {e}");
        }
        // The learner hands back the model without autodiff; trainability is read from the model
        // as built, with the trained values applied.
        let model = template.try_load_record(result.model.into_record()).map_err(|e| anyhow::anyhow!("trained model: {e}"))?;
        Ok(Trained { model, epochs: log.epochs, resumed_from: start })
    }

    /// Validation accuracy (%) of a trained stage.
    fn val_accuracy(&self, model: &TrunkModel) -> f64 {
        accuracy(&model.valid(), &self.val_batcher, &self.val_items, self.cfg.train.batch_size, &self.ad.clone().without_autodiff())
    }
}

/// Runs the experiment; artifacts (checkpoints, learner logs, `run.json`) go to `out`.
pub fn train(cfg: &ExperimentConfig, backend: &str, device: &Device, out: &Path, opts: TrainOptions) -> Result<RunRecord> {
    let t0 = Instant::now();
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    let plain = device.clone().without_autodiff();
    let ad = plain.clone().autodiff();
    let t = &cfg.train;
    let h2t_dir = out.join(HEAD2TOE_DIR);
    let (compress_dir, featselect_dir) = (h2t_dir.join("compress"), h2t_dir.join("featselect"));
    let _lock = crate::rundir::lock(out)?;
    let identity = crate::rundir::RunIdentity::new(cfg, backend, opts.precision.name(), opts.devices.len());
    let stage_dirs = [h2t_dir.clone()];
    match (crate::rundir::state(out), opts.resume) {
        (RunState::Complete, true) => anyhow::bail!(
            "{}: the run already completed all {} epochs{} ({})",
            out.display(),
            t.epochs,
            if cfg.head2toe.is_some() { format!(" of its last stage, {}", featselect_dir.display()) } else { String::new() },
            out.join(RUN_FILE).display()
        ),
        (RunState::Empty, true) => anyhow::bail!("{}: --resume found no complete checkpoint to continue from", out.join("checkpoint").display()),
        (RunState::Interrupted, true) => {
            identity.check_resume(out)?;
            // Every stage's checkpoint folder is checked when it starts; the first one must
            // hold a usable epoch, or there is nothing to resume.
            let ckpt_dir = out.join("checkpoint");
            let scan = TrainableCheckpointer::scan(&ckpt_dir);
            if scan.usable.is_none() {
                let why = scan.damaged.first().map(|(e, w)| format!(" (epoch {e}: {w})")).unwrap_or_default();
                anyhow::bail!("{}: --resume found no complete checkpoint to continue from{why}; start afresh with --overwrite", ckpt_dir.display());
            }
        }
        (RunState::Complete, false) if !opts.overwrite => anyhow::bail!(
            "{}: holds a completed run ({}): pass --overwrite to replace it, or another --out",
            out.display(),
            out.join(RUN_FILE).display()
        ),
        (RunState::Interrupted, false) if !opts.overwrite => anyhow::bail!(
            "{}: holds an interrupted run: pass --resume to continue it, or --overwrite to start afresh",
            out.display()
        ),
        (_, false) => {}
    }
    if opts.precision == vqt_core::device::Precision::F16
        && matches!(t.optimizer, OptimizerKind::Adam | OptimizerKind::Adamw)
        && t.adam_epsilon < 1e-7
    {
        anyhow::bail!(
            "train.adam_epsilon = {:e} underflows to 0 in f16 (the first Adam update divides by zero): set train.adam_epsilon = 1e-4 with --precision f16, or use --precision bf16",
            t.adam_epsilon
        );
    }
    let prep = prepare(cfg, device)?;

    let (train_batcher, cache_record) = match cache_batcher(&prep, cfg, &plain)? {
        Some((b, r)) => (b, Some(r)),
        None => (
            TrunkBatcher::Images {
                samples: prep.train_set.clone(),
                pre: prep.pre.clone(),
                augment_seed: prep.pre.is_random().then_some(t.seed),
                threads: t.num_workers,
            },
            None,
        ),
    };
    if !opts.resume {
        // A fresh run: nothing of an earlier one may be picked up. Recorded only now that the
        // data, the model and the cache are ready, so a run that fails before training leaves
        // nothing behind.
        crate::rundir::clear(out, &stage_dirs)?;
        identity.write(out)?;
    }
    let stages = Stages {
        cfg,
        opts: &opts,
        train_batcher,
        val_batcher: prep.image_batcher(&prep.val_set, t.num_workers),
        train_items: items(&prep.train_set),
        val_items: items(&prep.val_set),
        ad: ad.clone(),
    };
    let trained = stages.run(prep.model.clone(), out, t.lr, stages.start(out))?;
    let resumed_from = trained.resumed_from;
    let trainable_path = out.join(TRAINABLE_FILE);
    vqt_models::tuners::save_trainable(&trained.model, &trainable_path)?;
    let (mut trainable, total) = vqt_models::tuners::param_counts(&trained.model);

    let (model, epochs, head2toe) = match &cfg.head2toe {
        None => (trained.model, trained.epochs, None),
        Some(h) => {
            // Stage A (compress) from the trained queries, then stage B (featselect).
            let vqt_val_accuracy = stages.val_accuracy(&trained.model);
            let lr = t.lr * h.lr_scale;
            let a = trained.model.map_vqt(|v| Ok(v.into_compress_stage(h.lambda))).map_err(anyhow::Error::msg)?;
            let a = stages.run(a, &compress_dir, lr, stages.start(&compress_dir))?;
            let compress_val_accuracy = stages.val_accuracy(&a.model);
            let features = match &a.model.method {
                QueryMethod::Vqt(v) => v.head.weight.dims()[0],
                _ => unreachable!("map_vqt checked the method"),
            };
            let b = a.model.map_vqt(|v| v.into_featselect_stage(h.keep)).map_err(anyhow::Error::msg)?;
            let b = stages.run(b, &featselect_dir, lr, stages.start(&featselect_dir))?;
            let featselect_file = format!("{HEAD2TOE_DIR}/featselect/{TRAINABLE_FILE}");
            vqt_models::tuners::save_trainable(&b.model, &out.join(&featselect_file))?;
            let QueryMethod::Vqt(v) = &b.model.method else { unreachable!("map_vqt checked the method") };
            // The final model's learned parameters: the VQT stage's queries and stage B's head.
            trainable = vqt_models::tuners::param_counts(&b.model).0 + v.queries.val().shape().num_elements();
            let record = Head2ToeRecord {
                features,
                selection: v.selection.clone().expect("stage B selects"),
                vqt_val_accuracy,
                vqt_epochs: trained.epochs,
                compress_val_accuracy,
                compress_epochs: a.epochs,
                featselect_file,
            };
            (b.model, b.epochs, Some(record))
        }
    };

    // Final evaluation: validation and test once, at the last epoch.
    let eval_model = model.valid();
    let val_accuracy = stages.val_accuracy(&model);
    let test_accuracy = accuracy(&eval_model, &prep.image_batcher(&prep.test_set, t.num_workers), &items(&prep.test_set), t.batch_size, &plain);
    let record = RunRecord {
        config: cfg.clone(),
        backend: backend.to_string(),
        device_index: opts.device_index,
        precision: opts.precision.name().into(),
        devices: opts.devices.iter().map(|(i, _)| *i).collect(),
        checkpoint: prep.checkpoint,
        method: cfg.method_name(),
        path: if eval_model.full_path { "full" } else { "trunk" }.into(),
        normalization: format!("{:?}", cfg.backbone.normalization).to_lowercase(),
        trainable_params: trainable,
        total_params: total,
        split_sizes: [prep.train_set.len(), prep.val_set.len(), prep.test_set.len()],
        data_skipped: prep.skipped.clone(),
        cache: cache_record,
        epochs,
        head2toe,
        resumed_from_epoch: resumed_from,
        val_accuracy,
        test_accuracy,
        trainable_file: TRAINABLE_FILE.into(),
        peak_rss_bytes: vqt_core::mem::proc_status_bytes("VmHWM"),
        wall_seconds: t0.elapsed().as_secs_f64(),
        allocator: vqt_core::mem::allocator_in_effect().into(),
        git_revision: git_revision(),
    };
    let path = out.join(RUN_FILE);
    vqt_core::fs::write_atomic(&path, serde_json::to_string_pretty(&record)?.as_bytes()).with_context(|| path.display().to_string())?;
    Ok(record)
}

/// Runs the experiment as an idempotent job: a complete run in `out` (same settings, checked
/// like `--resume`) is read back, not retrained; an interrupted one is resumed from its newest
/// usable checkpoint, or restarted if it has none; an empty `out` starts a fresh run. `out` is
/// the job's only state, so a job can be run any number of times, in any order.
pub fn train_or_reuse(cfg: &ExperimentConfig, backend: &str, device: &Device, out: &Path, opts: TrainOptions) -> Result<RunRecord> {
    let identity = crate::rundir::RunIdentity::new(cfg, backend, opts.precision.name(), opts.devices.len());
    match crate::rundir::state(out) {
        RunState::Complete => {
            identity.check_resume(out)?;
            read_record(out)
        }
        RunState::Interrupted => {
            // `train` reports damaged checkpoints when it resumes; here only whether one is usable.
            let resumable = TrainableCheckpointer::latest(&out.join("checkpoint")).is_some();
            train(cfg, backend, device, out, TrainOptions { resume: resumable, overwrite: !resumable, ..opts })
        }
        RunState::Empty => train(cfg, backend, device, out, TrainOptions { resume: false, ..opts }),
    }
}

/// Reads `<run_dir>/run.json`.
pub fn read_record(run_dir: &Path) -> Result<RunRecord> {
    let rpath = run_dir.join(RUN_FILE);
    let text = std::fs::read_to_string(&rpath).with_context(|| rpath.display().to_string())?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", rpath.display()))
}

/// burn-train's terminal UI when stdout is a terminal; `None` (line-per-epoch logs) otherwise.
fn tui_renderer(interrupter: burn::train::Interrupter, checkpoint: Option<usize>) -> Option<Box<dyn MetricsRenderer>> {
    use std::io::IsTerminal;
    std::io::stdout()
        .is_terminal()
        .then(|| Box::new(burn::train::renderer::tui::TuiMetricsRendererWrapper::new(interrupter, checkpoint)) as Box<dyn MetricsRenderer>)
}

/// Which split `eval` scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EvalSplit {
    /// Training split.
    Train,
    /// Validation split.
    Val,
    /// Test split.
    Test,
}

/// Accuracy (%) of the saved run in `run_dir` (its `run.json` config and trainable parameters)
/// on `split`.
pub fn evaluate(run_dir: &Path, split: EvalSplit, device: &Device) -> Result<(f64, usize)> {
    let rpath = run_dir.join(RUN_FILE);
    let rec = read_record(run_dir)?;
    let cfg = rec.config;
    cfg.validate().map_err(|e| anyhow::anyhow!("{}: {e}", rpath.display()))?;
    let prep = prepare(&cfg, device)?;
    let ad = device.clone().without_autodiff().autodiff();
    let mut model = vqt_models::tuners::load_trainable(prep.model.clone().fork(&ad), &run_dir.join(&rec.trainable_file))?;
    if let Some(h) = &rec.head2toe {
        let selected = model.map_vqt(|v| v.into_selected(h.selection.clone())).map_err(|e| anyhow::anyhow!("{}: head2toe.selection: {e}", rpath.display()))?;
        model = vqt_models::tuners::load_trainable(selected, &run_dir.join(&h.featselect_file))?;
    }
    let set = prep.split(split);
    let plain = device.clone().without_autodiff();
    let acc = accuracy(&model.valid(), &prep.image_batcher(set, cfg.train.num_workers), &items(set), cfg.train.batch_size, &plain);
    Ok((acc, set.len()))
}
