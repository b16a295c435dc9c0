//! Experiment configuration (TOML). Unknown keys are errors; `--set key=value` overrides any
//! field; the resolved config is written into `run.json`.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use vqt_core::data::preprocess::{Augment, Normalization, Preprocess, ResizeFilter};
use vqt_models::cache::{CacheDtype, CacheKind};
use vqt_models::registry::ModelSpec;

/// A whole experiment.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// The backbone.
    pub backbone: BackboneConfig,
    /// The query-side method and head (`linear` for the plain head of the backbone tuners).
    pub method: MethodConfig,
    /// Backbone tuners (LoRA, AdaptFormer, VPT, SSF, BitFit, adapters, full fine-tuning), any
    /// combination, trained jointly with `method`. Absent: the backbone stays frozen.
    #[serde(default)]
    pub tuners: vqt_models::tuners::TunersConfig,
    /// The dataset.
    pub data: DataConfig,
    /// Optimisation.
    pub train: TrainConfig,
    /// VQT only: Head2Toe-style feature selection after the VQT stage (absent: none).
    #[serde(default)]
    pub head2toe: Option<Head2ToeConfig>,
    /// How `vqt-train tune --executor slurm` submits this sweep's jobs (`[slurm]`; flags
    /// override it). Not part of a run: never written into a run's record or a sweep's
    /// `base.toml`.
    #[serde(default, skip_serializing)]
    pub slurm: Option<SlurmConfig>,
}

/// SLURM settings of a sweep (`[slurm]` in the config, or `tune` flags of the same names).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmConfig {
    /// `--partition`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// `--time` of each job (SLURM's formats, e.g. `2:00:00` or `1-00:00:00`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// `--cpus-per-task`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus_per_task: Option<u32>,
    /// `--gpus-per-task`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus_per_task: Option<u32>,
    /// More `sbatch` arguments for every job (e.g. `["--account=lab", "--qos=short"]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sbatch_args: Vec<String>,
    /// Submit one phase only, without the follow-up job that `--dependency=afterok` chains
    /// onto it (then run `tune --run DIR --executor slurm` again once the array has finished).
    #[serde(default)]
    pub no_chain: bool,
}

impl SlurmConfig {
    /// Range checks; messages name the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.cpus_per_task == Some(0) || self.gpus_per_task == Some(0) {
            return Err("slurm.cpus_per_task and slurm.gpus_per_task must be at least 1 (leave them out for SLURM's default)".into());
        }
        for (key, v) in [("slurm.partition", &self.partition), ("slurm.time", &self.time)] {
            if v.as_deref().is_some_and(|v| v.trim().is_empty() || v.contains(char::is_whitespace)) {
                return Err(format!("{key} = {:?} must be one word", v.as_deref().unwrap_or("")));
            }
        }
        if let Some(a) = self.sbatch_args.iter().find(|a| !a.starts_with('-')) {
            return Err(format!("slurm.sbatch_args: `{a}` is not an sbatch option (expected e.g. `--account=lab`)"));
        }
        Ok(())
    }

    /// `self`, with every field `over` sets taking its place.
    pub fn merged(&self, over: &SlurmConfig) -> SlurmConfig {
        SlurmConfig {
            partition: over.partition.clone().or_else(|| self.partition.clone()),
            time: over.time.clone().or_else(|| self.time.clone()),
            cpus_per_task: over.cpus_per_task.or(self.cpus_per_task),
            gpus_per_task: over.gpus_per_task.or(self.gpus_per_task),
            sbatch_args: if over.sbatch_args.is_empty() { self.sbatch_args.clone() } else { over.sbatch_args.clone() },
            no_chain: over.no_chain || self.no_chain,
        }
    }

    /// The `sbatch` arguments of a job array.
    pub fn sbatch_args(&self) -> Vec<String> {
        let mut a = self.sbatch_args_without_resources();
        a.extend(self.cpus_per_task.map(|c| format!("--cpus-per-task={c}")));
        a.extend(self.gpus_per_task.map(|g| format!("--gpus-per-task={g}")));
        a
    }

    /// The `sbatch` arguments of a follow-up job (selection, report): no CPUs or GPUs asked.
    pub fn sbatch_args_without_resources(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        a.extend(self.partition.as_ref().map(|p| format!("--partition={p}")));
        a.extend(self.time.as_ref().map(|t| format!("--time={t}")));
        a.extend(self.sbatch_args.iter().cloned());
        a
    }

    /// The `vqt-train tune` flags that give these settings (for the chained follow-up job).
    pub fn cli_args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        a.extend(self.partition.as_ref().map(|p| format!("--partition={p}")));
        a.extend(self.time.as_ref().map(|t| format!("--time={t}")));
        a.extend(self.cpus_per_task.map(|c| format!("--cpus-per-task={c}")));
        a.extend(self.gpus_per_task.map(|g| format!("--gpus-per-task={g}")));
        a.extend(self.sbatch_args.iter().map(|s| format!("--sbatch-arg={s}")));
        if self.no_chain {
            a.push("--no-chain".into());
        }
        a
    }
}

/// VQT's two-stage Head2Toe feature selection (methods.md §3.4), run after the VQT stage from
/// its trained queries (frozen; query dropout stays active) with the head discarded:
/// stage A ("compress") trains a fresh head with the group-lasso penalty `lambda·Σ_j ‖W_j‖₂`;
/// stage B ("featselect") keeps the `int(F·keep)` features with the largest stage-A row norms
/// and trains a fresh head on them without penalty. Both stages repeat the VQT stage's epochs
/// and schedule at `lr_scale × train.lr`, same weight decay; the run's accuracies are stage B's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head2ToeConfig {
    /// Fraction of the head's input features kept (the VQT demo: 0.7 for its Q = 1 tasks).
    pub keep: f64,
    /// Group-lasso weight of stage A (official: 1e-4).
    #[serde(default = "default_lasso")]
    pub lambda: f64,
    /// Both stages' LR relative to `train.lr` (official: 0.5).
    #[serde(default = "default_lr_scale")]
    pub lr_scale: f64,
}

fn default_lasso() -> f64 {
    1e-4
}

fn default_lr_scale() -> f64 {
    0.5
}

/// Backbone shape, weights and input pipeline.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneConfig {
    /// Preset name (vit-ti16, vit-s16, vit-b16, vit-l16, vit-h14, vit-s14-dinov2); ignored when
    /// `custom` is given.
    #[serde(default)]
    pub preset: Option<String>,
    /// A fully custom shape instead of a preset.
    #[serde(default)]
    pub custom: Option<vqt_models::VitConfig>,
    /// Input size in pixels; position embeddings are resampled to it at load time.
    pub img_size: usize,
    /// Checkpoint file (timm safetensors/.pth, JAX .npz, HF safetensors). Without one the
    /// backbone is randomly initialised (smoke tests only).
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    /// Checkpoint format: auto, timm, jax-npz, hf-vit, hf-dinov2.
    #[serde(default)]
    pub format: vqt_core::CheckpointFormat,
    /// Resize filter for the images (default bilinear).
    #[serde(default)]
    pub resize: ResizeFilter,
    /// Normalisation preset (default imagenet).
    #[serde(default)]
    pub normalization: Normalization,
    /// Square resize side before cropping `img_size` (FGVC recipe: 256, with `img_size` 224):
    /// center crop at evaluation, random crop in training with `augment = "crop-flip"`. Absent:
    /// a straight resize to `img_size`.
    #[serde(default)]
    pub resize_size: Option<usize>,
    /// Training augmentation: `none` (VTAB recipes), `crop-flip` (VPT's FGVC recipe),
    /// `random-resized-crop` (timm/torchvision). Seeded per (seed, epoch, image), so resumed runs
    /// see the same crops. Makes the trunk input random: no feature cache.
    #[serde(default)]
    pub augment: Augment,
    /// Build on the tuned backbone of an earlier run (its output directory, e.g.
    /// `runs/adaptformer/seed-42`): that run's tuners are rebuilt, its trained tensors loaded
    /// (LoRA merged into the weights), everything frozen, and this run trains its query side on
    /// the trunk path (the feature cache applies). The earlier run must have tuned the backbone
    /// and read the same checkpoint, backbone shape, data and input pipeline (`augment` aside);
    /// `[tuners]` must be empty here. Recorded in `run.json` as `tuned_from`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tuned_from: Option<PathBuf>,
}

/// The tuning method (`kind = "linear" | "vqt" | "synqt"`): the registry's
/// [`vqt_models::registry::MethodSpec`].
pub use vqt_models::registry::MethodSpec as MethodConfig;

/// Where the data comes from.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DataConfig {
    /// IDX files (MNIST / Fashion-MNIST). Train and validation are index ranges of the train
    /// files; the test split is the first `test_limit` images of the test files.
    Idx {
        /// Training images (IDX, optionally gzipped).
        train_images: PathBuf,
        /// Training labels.
        train_labels: PathBuf,
        /// Test images.
        test_images: PathBuf,
        /// Test labels.
        test_labels: PathBuf,
        /// Number of classes.
        num_classes: usize,
        /// `[start, end)` of the training split within the train files.
        train_range: [usize; 2],
        /// `[start, end)` of the validation split within the train files.
        val_range: [usize; 2],
        /// Use only the first N test images (all if absent).
        #[serde(default)]
        test_limit: Option<usize>,
        /// `[start, end)` of the test files instead of their first `test_limit` images (the
        /// tuning protocol points the test split at the validation range of the train files, so
        /// the grid runs never read the test files).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        test_range: Option<[usize; 2]>,
    },
    /// A VTAB-1k task in the NOAH layout (`<root>/<task>/{train800,val200,train800val200,test}.txt`
    /// + `images/`), or its SynQT JSON variant (`<split>.json`).
    Vtab {
        /// The folder holding the task folders.
        root: PathBuf,
        /// Task name or alias (`cifar100`, `pets`, `pcam`, …).
        task: String,
        /// Classes; defaults to the task's (a different value is an error).
        #[serde(default)]
        num_classes: Option<usize>,
        /// Training split (`train800` to tune, `train800val200` for final runs).
        #[serde(default = "default_train_split")]
        train_split: String,
        /// Validation split.
        #[serde(default = "default_val_split")]
        val_split: String,
        /// Test split.
        #[serde(default = "default_test_split")]
        test_split: String,
        /// Enforce the VTAB-1k split sizes (800 / 200 / 1000).
        #[serde(default = "yes")]
        check_counts: bool,
        /// Skip (and count in run.json) missing/corrupt images and out-of-range labels instead
        /// of stopping (`--skip-bad`).
        #[serde(default)]
        skip_bad: bool,
    },
    /// A VTAB-1k task read straight from a TensorFlow Datasets data directory, as the official
    /// VQT/VPT code reads it (task_adaptation's splits and labels; docs/design/vtab-tfds.md).
    Tfds {
        /// The TFDS data dir (`~/tensorflow_datasets` layout: `<dataset>[/<config>]/<version>/`).
        root: PathBuf,
        /// Task name or alias (the same as `kind = "vtab"`).
        task: String,
        /// Classes; defaults to the task's (a different value is an error).
        #[serde(default)]
        num_classes: Option<usize>,
        /// Training split (`train800` to tune, `train800val200` for final runs).
        #[serde(default = "default_train_split")]
        train_split: String,
        /// Validation split.
        #[serde(default = "default_val_split")]
        val_split: String,
        /// Test split.
        #[serde(default = "default_test_split")]
        test_split: String,
        /// Leave out (and count in run.json) records with a bad CRC, truncated shards, images
        /// that do not decode and out-of-range labels instead of stopping (`--skip-bad`).
        #[serde(default)]
        skip_bad: bool,
    },
    /// FGVC in the VPT convention: `<root>/{train,val,test}.json` objects `{"relpath": class}`,
    /// images under `<root>/<image_root>`; class ids made contiguous by sorting.
    Fgvc {
        /// Dataset folder.
        root: PathBuf,
        /// Image folder relative to `root` (CUB/NABirds: `images`, Dogs: `Images`, Cars and
        /// Flowers: `.`).
        #[serde(default = "dot")]
        image_root: PathBuf,
        /// Classes (must match the ids found).
        num_classes: usize,
        /// Skip and count bad images/labels instead of stopping.
        #[serde(default)]
        skip_bad: bool,
    },
    /// One ImageFolder tree per split (`<dir>/<class>/*.jpg|png|…`, class = sorted folder index).
    ImageFolder {
        /// Training tree.
        train: PathBuf,
        /// Validation tree.
        val: PathBuf,
        /// Test tree.
        test: PathBuf,
        /// Classes (must match the folders found).
        num_classes: usize,
        /// Skip and count bad images instead of stopping.
        #[serde(default)]
        skip_bad: bool,
    },
}

fn default_train_split() -> String {
    "train800".into()
}
fn default_val_split() -> String {
    "val200".into()
}
fn default_test_split() -> String {
    "test".into()
}
fn yes() -> bool {
    true
}
fn dot() -> PathBuf {
    PathBuf::from(".")
}

impl DataConfig {
    /// Sets `skip_bad` (`--skip-bad`); IDX files have no per-image failure to skip.
    pub fn set_skip_bad(&mut self) -> Result<(), String> {
        match self {
            DataConfig::Idx { .. } => Err("--skip-bad applies to image datasets (vtab, fgvc, image-folder), not IDX files".into()),
            DataConfig::Vtab { skip_bad, .. } | DataConfig::Tfds { skip_bad, .. } | DataConfig::Fgvc { skip_bad, .. } | DataConfig::ImageFolder { skip_bad, .. } => {
                *skip_bad = true;
                Ok(())
            }
        }
    }
}

/// Optimiser.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// AdamW (decoupled weight decay), β (0.9, 0.999), eps 1e-8.
    Adamw,
    /// Adam with coupled L2 weight decay (the VQT recipe), eps 1e-8.
    Adam,
    /// SGD with momentum 0.9.
    Sgd,
}

/// Whether and how trunk features are cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheMode {
    /// Per-layer keys/values.
    Kv,
    /// Per-layer hidden states (half the bytes; K/V recomputed per batch).
    Hidden,
    /// No cache: the trunk runs on every step (required for faithful-mode trunk noise and for
    /// backbone tuners).
    Off,
    /// `kv` when the trunk is frozen and deterministic, `off` otherwise (the default).
    Auto,
}

/// Optimisation settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Epochs.
    pub epochs: usize,
    /// Batch size (the last partial batch is kept).
    pub batch_size: usize,
    /// Optimiser.
    #[serde(default = "default_optim")]
    pub optimizer: OptimizerKind,
    /// Peak learning rate (linear warm-up, then cosine to 0, stepped every iteration).
    pub lr: f64,
    /// Weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// Adam/AdamW epsilon (PyTorch's default 1e-8). Under `--precision f16` it underflows to
    /// 0 and the first update divides by zero: use 1e-4 there (or bf16).
    #[serde(default = "default_adam_epsilon")]
    pub adam_epsilon: f64,
    /// Warm-up epochs.
    #[serde(default)]
    pub warmup_epochs: usize,
    /// Seed for initialisation and shuffling.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Feature cache (query methods only).
    #[serde(default = "default_cache")]
    pub cache: CacheMode,
    /// Cache storage dtype.
    #[serde(default = "default_cache_dtype")]
    pub cache_dtype: CacheDtype,
    /// Keep the feature cache in this file (memory-mapped): opened when it exists and was built
    /// for this backbone, data and preprocessing (`vqt-train cache` builds it ahead of time),
    /// otherwise built and written there. Absent: the cache lives in RAM for the run only.
    #[serde(default)]
    pub cache_file: Option<PathBuf>,
    /// Threads that preprocess (resize, crop, normalise) the images of each batch, and decode the
    /// dataset files at load time. Batches are prepared in order by one loader thread, so a
    /// run's numbers do not depend on this value.
    #[serde(default = "default_workers")]
    pub num_workers: usize,
    /// Accumulate gradients over this many batches before each optimizer step (1 = off).
    /// burn-train sums (does not average) the accumulated gradients: scale `lr` accordingly.
    #[serde(default = "default_accum")]
    pub grad_accumulation: usize,
    /// Stop when the validation loss has not improved for this many epochs (absent: train all
    /// epochs, as the VTAB protocol does).
    #[serde(default)]
    pub early_stopping_patience: Option<usize>,
    /// Faithful mode: VQT embedding dropout in the trunk (official 0.1); needs `cache = "off"`.
    #[serde(default)]
    pub trunk_embed_dropout: f64,
    /// Faithful mode: maximum trunk drop-path (SynQT official 0.1); needs `cache = "off"`.
    #[serde(default)]
    pub trunk_drop_path: f64,
    /// Per-group learning rate and weight decay (`[train.groups]`); absent groups train at
    /// `lr` and `weight_decay`.
    #[serde(default, skip_serializing_if = "GroupsConfig::is_empty")]
    pub groups: GroupsConfig,
}

/// Separate optimisation of the parts of a jointly trained model (`[train.groups]`), e.g.
/// `tuners = { lr = 1e-3 }` and `method = { lr = 0.05, weight_decay = 1e-4 }`. Each group has
/// its own warm-up + cosine schedule peaking at its `lr`, and its own optimizer (the run's
/// `train.optimizer`) with its `weight_decay`; a field left out takes the run's value. In a
/// Head2Toe stage every rate is scaled by the stage's `lr_scale`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupsConfig {
    /// Every trainable backbone tensor: the tuner modules, BitFit's biases, full fine-tuning's
    /// weights (paths `backbone.*`).
    #[serde(default)]
    pub tuners: Option<GroupConfig>,
    /// The query side (VQT's queries, SynQT's modules), and its head unless `head` is given
    /// (paths `method.*`).
    #[serde(default)]
    pub method: Option<GroupConfig>,
    /// The classification head (VQT's and SynQT's `method.head.*`; the linear probe's whole
    /// method).
    #[serde(default)]
    pub head: Option<GroupConfig>,
}

/// One group's optimisation (`[train.groups]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Peak learning rate (default `train.lr`).
    #[serde(default)]
    pub lr: Option<f64>,
    /// Weight decay (default `train.weight_decay`).
    #[serde(default)]
    pub weight_decay: Option<f64>,
}

impl GroupsConfig {
    /// True when no group is set (one optimizer and schedule for every tensor).
    pub fn is_empty(&self) -> bool {
        self.tuners.is_none() && self.method.is_none() && self.head.is_none()
    }

    /// The set groups, in precedence order (a later group wins for a tensor both match).
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &GroupConfig)> {
        [("tuners", &self.tuners), ("method", &self.method), ("head", &self.head)].into_iter().filter_map(|(n, g)| g.as_ref().map(|g| (n, g)))
    }
}

fn default_optim() -> OptimizerKind {
    OptimizerKind::Adamw
}
fn default_adam_epsilon() -> f64 {
    1e-8
}
fn default_accum() -> usize {
    1
}
fn default_seed() -> u64 {
    42
}
fn default_cache() -> CacheMode {
    CacheMode::Auto
}
fn default_cache_dtype() -> CacheDtype {
    CacheDtype::F32
}
fn default_workers() -> usize {
    2
}

impl CacheMode {
    /// The cache kind, if any, once `auto` is resolved for a trunk that is (or is not) frozen
    /// and deterministic.
    pub fn kind(self, trunk_is_constant: bool) -> Option<CacheKind> {
        match self {
            CacheMode::Kv => Some(CacheKind::Kv),
            CacheMode::Hidden => Some(CacheKind::Hidden),
            CacheMode::Off => None,
            CacheMode::Auto => trunk_is_constant.then_some(CacheKind::Kv),
        }
    }
}

/// Reads a config file and applies `key=value` overrides (dotted keys, TOML values; a value
/// that is not valid TOML is taken as a string).
pub fn load(path: &Path, overrides: &[String]) -> anyhow::Result<ExperimentConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut value: toml::Table = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), one_line(&e.to_string())))?;
    for o in overrides {
        let (key, raw) = o.split_once('=').ok_or_else(|| anyhow::anyhow!("--set `{o}`: expected key=value"))?;
        let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_string()));
        let mut table = &mut value;
        let parts: Vec<&str> = key.trim().split('.').collect();
        for p in &parts[..parts.len() - 1] {
            table = table
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .ok_or_else(|| anyhow::anyhow!("--set `{o}`: `{p}` is not a table"))?;
        }
        table.insert(parts[parts.len() - 1].to_string(), parsed);
    }
    let cfg: ExperimentConfig = toml::Value::Table(value)
        .try_into()
        .map_err(|e: toml::de::Error| anyhow::anyhow!("{}: {}", path.display(), one_line(&e.to_string())))?;
    cfg.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(cfg)
}

fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^' || c == ' ')).collect::<Vec<_>>().join(" ")
}

impl ExperimentConfig {
    /// Cross-field checks; messages name the keys.
    pub fn validate(&self) -> Result<(), String> {
        let t = &self.train;
        if t.epochs == 0 || t.batch_size == 0 || t.grad_accumulation == 0 {
            return Err("train.epochs, train.batch_size and train.grad_accumulation must be positive".into());
        }
        if t.early_stopping_patience == Some(0) {
            return Err("train.early_stopping_patience must be at least 1 epoch".into());
        }
        if !(t.lr > 0.0 && t.lr <= 1.0) {
            return Err(format!("train.lr {} must be in (0, 1]", t.lr));
        }
        if !(t.weight_decay >= 0.0 && t.weight_decay.is_finite()) {
            return Err(format!("train.weight_decay = {} must be a finite value >= 0", t.weight_decay));
        }
        if !(t.adam_epsilon > 0.0 && t.adam_epsilon.is_finite()) {
            return Err(format!("train.adam_epsilon = {} must be a finite value > 0", t.adam_epsilon));
        }
        for (name, g) in t.groups.iter() {
            if let Some(lr) = g.lr {
                if !(lr > 0.0 && lr <= 1.0) {
                    return Err(format!("train.groups.{name}.lr {lr} must be in (0, 1]"));
                }
            }
            if let Some(wd) = g.weight_decay {
                if !(wd >= 0.0 && wd.is_finite()) {
                    return Err(format!("train.groups.{name}.weight_decay = {wd} must be a finite value >= 0"));
                }
            }
        }
        if t.groups.tuners.is_some() && self.tuners.is_empty() {
            return Err("train.groups.tuners: no tuner is selected (the [tuners] table is empty), so there is no backbone tensor to train".into());
        }
        if t.num_workers == 0 {
            return Err("train.num_workers must be at least 1 (threads preprocessing each batch)".into());
        }
        vqt_models::check::probability("train.trunk_embed_dropout", t.trunk_embed_dropout)?;
        vqt_models::check::probability("train.trunk_drop_path", t.trunk_drop_path)?;
        self.method.validate()?;
        let noisy = t.trunk_embed_dropout > 0.0 || t.trunk_drop_path > 0.0;
        if matches!(t.cache, CacheMode::Kv | CacheMode::Hidden) && noisy {
            return Err("train.trunk_embed_dropout / train.trunk_drop_path make the trunk random: set train.cache = \"off\"".into());
        }
        self.preprocess().validate().map_err(|e| format!("backbone.{e}"))?;
        if matches!(t.cache, CacheMode::Kv | CacheMode::Hidden) && self.backbone.augment != Augment::None {
            return Err(format!(
                "backbone.augment = \"{}\" makes every epoch's trunk input different: set train.cache = \"off\" (or \"auto\")",
                serde_json::to_value(self.backbone.augment).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
            ));
        }
        self.tuners.validate()?;
        if let Some(s) = &self.slurm {
            s.validate()?;
        }
        if self.backbone.tuned_from.is_some() && !self.tuners.is_empty() {
            return Err(format!(
                "backbone.tuned_from: this run trains the query side on the earlier run's frozen backbone, so [tuners] must be empty (found tuners.{})",
                self.tuners.names().join(", tuners.")
            ));
        }
        if let Some(h) = &self.head2toe {
            if !matches!(self.method, MethodConfig::Vqt(_)) {
                return Err("head2toe: feature selection needs method.kind = \"vqt\"".into());
            }
            if !self.tuners.is_empty() {
                return Err(format!("head2toe: feature selection runs on a frozen backbone, but tuners.{} change it", self.tuners.names().join(", tuners.")));
            }
            if !(h.keep > 0.0 && h.keep <= 1.0) {
                return Err(format!("head2toe.keep {} must be in (0, 1]", h.keep));
            }
            if !(h.lambda >= 0.0 && h.lambda.is_finite()) {
                return Err(format!("head2toe.lambda {} must be a finite value >= 0", h.lambda));
            }
            if !(h.lr_scale > 0.0 && t.lr * h.lr_scale <= 1.0) {
                return Err(format!("head2toe.lr_scale {} must be positive, with head2toe.lr_scale × train.lr in (0, 1]", h.lr_scale));
            }
        }
        if matches!(t.cache, CacheMode::Kv | CacheMode::Hidden) && !self.tuners.is_empty() {
            return Err(format!(
                "train.cache = \"{}\" needs a frozen trunk, but tuners.{} change it: set train.cache = \"off\" (or \"auto\")",
                if t.cache == CacheMode::Kv { "kv" } else { "hidden" },
                self.tuners.names().join(", tuners.")
            ));
        }
        if noisy && !self.tuners.is_empty() {
            return Err("train.trunk_embed_dropout / train.trunk_drop_path (faithful mode) apply to the frozen trunk only, not with tuners".into());
        }
        if self.backbone.preset.is_none() && self.backbone.custom.is_none() {
            return Err("backbone: give `preset` or `custom`".into());
        }
        if let Some(p) = &self.backbone.preset {
            vqt_models::VitPreset::from_name(p).map_err(|e| format!("backbone.preset: {e}"))?;
        }
        if let Some(c) = &self.backbone.custom {
            c.validate().map_err(|e| e.replace("backbone.", "backbone.custom."))?;
        }
        self.vit_config().validate()?;
        match &self.data {
            DataConfig::Idx { train_range, val_range, num_classes, test_limit, test_range, .. } => {
                if *num_classes < 2 {
                    return Err("data.num_classes must be at least 2".into());
                }
                for (name, r) in [("train_range", train_range), ("val_range", val_range)] {
                    if r[0] >= r[1] {
                        return Err(format!("data.{name} {r:?} is empty"));
                    }
                }
                if train_range[0] < val_range[1] && val_range[0] < train_range[1] {
                    return Err(format!(
                        "data.train_range {train_range:?} and data.val_range {val_range:?} overlap: validation images would also be trained on"
                    ));
                }
                if *test_limit == Some(0) {
                    return Err("data.test_limit must be at least 1 (leave it out to use the whole test file)".into());
                }
                if let Some(r) = test_range {
                    if test_limit.is_some() {
                        return Err("data.test_range and data.test_limit both choose the test images: give one".into());
                    }
                    if r[0] >= r[1] {
                        return Err(format!("data.test_range {r:?} is empty"));
                    }
                }
            }
            DataConfig::Vtab { task, num_classes, .. } | DataConfig::Tfds { task, num_classes, .. } => {
                let (_, c) = vqt_core::data::files::vtab_task(task).map_err(|e| format!("data.task: {e}"))?;
                if let Some(n) = num_classes {
                    if *n != c {
                        return Err(format!("data.num_classes = {n}, but VTAB task `{task}` has {c} classes"));
                    }
                }
            }
            DataConfig::Fgvc { num_classes, .. } | DataConfig::ImageFolder { num_classes, .. } => {
                if *num_classes < 2 {
                    return Err("data.num_classes must be at least 2".into());
                }
            }
        }
        Ok(())
    }

    /// True when the trunk is frozen and deterministic, so its features can be cached.
    pub fn trunk_is_constant(&self) -> bool {
        self.tuners.is_empty() && self.train.trunk_embed_dropout == 0.0 && self.train.trunk_drop_path == 0.0 && self.backbone.augment == Augment::None
    }

    /// The input pipeline of `backbone`.
    pub fn preprocess(&self) -> Preprocess {
        let b = &self.backbone;
        Preprocess { img_size: b.img_size, resize: b.resize, normalization: b.normalization, resize_size: b.resize_size, augment: b.augment }
    }

    /// The model this config trains: its method and tuners, as the registry builds them.
    pub fn model_spec(&self) -> ModelSpec {
        ModelSpec { method: self.method.clone(), tuners: self.tuners.clone() }
    }

    /// Short method name for logs and records: the query method, then the tuners
    /// (`vqt+adaptformer`, `linear+lora`, `full-ft`; `vqt+head2toe` with feature selection).
    pub fn method_name(&self) -> String {
        if self.head2toe.is_some() {
            return "vqt+head2toe".into();
        }
        self.model_spec().name()
    }

    /// The backbone shape at `img_size`.
    pub fn vit_config(&self) -> vqt_models::VitConfig {
        let base = match (&self.backbone.custom, &self.backbone.preset) {
            (Some(c), _) => c.clone(),
            (None, Some(p)) => vqt_models::VitPreset::from_name(p).expect("validated").config(),
            (None, None) => unreachable!("validated"),
        };
        base.with_img_size(self.backbone.img_size).with_num_classes(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every committed config parses and validates with the real loader, so configs/ cannot
    /// drift from the code.
    #[test]
    fn every_committed_config_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/experiments");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().and_then(|e| e.to_str()) == Some("toml") {
                let cfg = load(&p, &[]).unwrap_or_else(|e| panic!("{e}"));
                cfg.vit_config().validate().unwrap();
                n += 1;
            }
        }
        assert!(n >= 3, "expected the committed experiment configs, found {n}");
    }

    #[test]
    fn overrides_are_typed_and_dotted() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/experiments/fmnist-smoke.toml");
        let cfg = load(&p, &["train.epochs=3".into(), "method.num_queries=4".into(), "train.cache=\"off\"".into()]).unwrap();
        assert_eq!(cfg.train.epochs, 3);
        assert_eq!(cfg.train.cache, CacheMode::Off);
        match cfg.method {
            MethodConfig::Vqt(v) => assert_eq!(v.num_queries, 4),
            other => panic!("{other:?}"),
        }
        let e = load(&p, &["method.num_querys=4".into()]).unwrap_err().to_string();
        assert!(e.contains("fmnist-smoke.toml") && e.contains("num_querys"), "{e}");
        let e = load(&p, &["train.epochs".into()]).unwrap_err().to_string();
        assert!(e.contains("expected key=value"), "{e}");
    }

    #[test]
    fn augmentation_turns_the_auto_cache_off_and_is_recorded_in_the_pipeline() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/experiments/fmnist-smoke.toml");
        let cfg = load(&p, &[]).unwrap();
        assert!(cfg.trunk_is_constant());
        let cfg = load(&p, &["backbone.augment=\"random-resized-crop\"".into(), "train.cache=\"auto\"".into()]).unwrap();
        assert!(!cfg.trunk_is_constant());
        assert_eq!(cfg.train.cache.kind(cfg.trunk_is_constant()), None);
        assert_eq!(cfg.preprocess().augment, Augment::RandomResizedCrop);
        let fgvc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/experiments/fgvc-cub-vitb16-adaptformer.toml");
        let pre = load(&fgvc, &[]).unwrap().preprocess();
        assert_eq!((pre.img_size, pre.resize_size, pre.augment), (224, Some(256), Augment::CropFlip));
    }
}
