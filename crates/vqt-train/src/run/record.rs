//! The run record (`run.json`) and its parts.

use crate::config::ExperimentConfig;
use crate::progress::EpochMetrics;
use crate::rundir::RUN_FILE;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vqt_core::data::files::Skipped;

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
    /// burn-train's data-parallel strategy with several devices: `multi-device` (gradients
    /// moved to the first device and summed there) or `ddp` (all-reduced); absent for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_parallel: Option<String>,
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
    /// The earlier run whose tuned backbone this run trained on (`backbone.tuned_from`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tuned_from: Option<TunedFromRecord>,
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
    /// The commit the binary was built from (`-dirty` when its sources differed from it), if
    /// it was built inside a git checkout.
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

/// The earlier run an add-on run built on (`backbone.tuned_from`): the chain of a two-stage
/// result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TunedFromRecord {
    /// The earlier run's directory, as configured.
    pub run_dir: PathBuf,
    /// Its method name (`adaptformer`, `lora`, …).
    pub method: String,
    /// Its trained tensors (relative to its directory) and their sha256: the identity of the
    /// frozen backbone this run read.
    pub trainable_file: String,
    /// sha256 of that file.
    pub trainable_sha256: String,
    /// Its validation and test accuracy (%).
    pub val_accuracy: f64,
    /// Test accuracy (%) of the earlier run.
    pub test_accuracy: f64,
    /// Whether LoRA was folded into the qkv weights.
    pub lora_merged: bool,
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

fn f32_name() -> String {
    "f32".into()
}

/// The commit this binary was built from, `-dirty` when its sources differed from it (embedded
/// by build.rs; `None` outside a git checkout). Not the working directory's `HEAD` at run time,
/// which may have moved on since the build.
pub(crate) fn git_revision() -> Option<String> {
    option_env!("VQT_BUILD_REVISION").map(str::to_string)
}

/// Reads `<run_dir>/run.json`.
pub fn read_record(run_dir: &Path) -> Result<RunRecord> {
    let rpath = run_dir.join(RUN_FILE);
    let text = std::fs::read_to_string(&rpath).with_context(|| rpath.display().to_string())?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", rpath.display()))
}
