//! Building a run from its config: data splits, input pipeline, backbone (checkpoint loaded,
//! tuners injected) and the query-side method.

use super::batch::TrunkBatcher;
use super::data::load_data;
use super::eval::EvalSplit;
use super::record::{read_record, CheckpointRecord, TunedFromRecord};
use crate::config::ExperimentConfig;
use anyhow::Result;
use burn::module::Module;
use burn::tensor::Device;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use vqt_core::data::files::Skipped;
use vqt_core::data::preprocess::Preprocess;
use vqt_core::data::Sample;
use vqt_models::vit::load::default_resample;
use vqt_models::vit::TrunkNoise;
use vqt_models::TrunkModel;

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
    /// The earlier run whose tuned backbone this one builds on (`backbone.tuned_from`).
    pub tuned_from: Option<TunedFromRecord>,
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

    /// Batches of the images of split `s` (no augmentation).
    pub(crate) fn image_batcher(&self, s: &Arc<Vec<Sample>>, threads: usize) -> TrunkBatcher {
        TrunkBatcher::Images { samples: s.clone(), pre: self.pre.clone(), augment_seed: None, threads }
    }
}

/// Loads the data and builds the model of `cfg` (seeded by `train.seed`).
pub fn prepare(cfg: &ExperimentConfig, device: &Device) -> Result<Prepared> {
    let plain = device.clone().without_autodiff();
    let ad = plain.clone().autodiff();
    plain.seed(cfg.train.seed);
    ad.seed(cfg.train.seed);

    // An add-on run's earlier run, checked before anything is loaded.
    let earlier = cfg.backbone.tuned_from.as_ref().map(|from| check_tuned_from(cfg, from).map(|r| (from, r))).transpose()?;

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

    // An add-on run: the earlier run's tuned backbone, frozen.
    let mut tuned_from = None;
    if let Some((from, rec)) = &earlier {
        let (tuned, record) = tuned_backbone(from, rec, vit, num_classes, &ad)?;
        vit = tuned;
        tuned_from = Some(record);
    }

    // Tuners and method, as the registry builds them.
    let model = cfg.model_spec().build(vit, num_classes).map_err(anyhow::Error::msg)?;
    let noise = TrunkNoise { embed_dropout: cfg.train.trunk_embed_dropout, drop_path: cfg.train.trunk_drop_path };
    let model = model.with_noise(noise);
    Ok(Prepared { train_set, val_set, test_set, pre, model, checkpoint, num_classes, skipped, tuned_from })
}

/// Checks the earlier run in `from` (`backbone.tuned_from`) before anything is loaded: one line
/// naming the key for a run that is not complete, tuned nothing, or read another checkpoint,
/// backbone shape, data or input pipeline.
fn check_tuned_from(cfg: &ExperimentConfig, from: &Path) -> Result<super::record::RunRecord> {
    let here = |what: String| anyhow::anyhow!("backbone.tuned_from = \"{}\": {what}", from.display());
    let rec = read_record(from).map_err(|e| here(format!("not a finished run ({e})")))?;
    let earlier = &rec.config;
    if earlier.tuners.is_empty() {
        return Err(here(format!("that run ({}) tuned no backbone tensor, so there is nothing to build on", rec.method)));
    }
    let mine = match &cfg.backbone.checkpoint {
        Some(p) => Some(vqt_core::hash::sha256_file(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?),
        None => None,
    };
    match (mine.as_deref(), rec.checkpoint.as_ref().map(|c| c.sha256.as_str())) {
        (Some(a), Some(b)) if a == b => {}
        (None, _) | (_, None) => return Err(here("both runs must load the same backbone.checkpoint (a random backbone cannot be rebuilt)".into())),
        (Some(a), Some(b)) => return Err(here(format!("that run loaded a checkpoint with sha256 {b}, this one {a}"))),
    }
    if earlier.vit_config() != cfg.vit_config() {
        return Err(here("that run's backbone shape or img_size differs from backbone.preset/custom/img_size here".into()));
    }
    let (p, q) = (earlier.preprocess(), cfg.preprocess());
    if (p.img_size, p.resize, p.normalization, p.resize_size) != (q.img_size, q.resize, q.normalization, q.resize_size) {
        return Err(here("that run's input pipeline (backbone.resize, normalization or resize_size) differs from this one's".into()));
    }
    if serde_json::to_value(&earlier.data)? != serde_json::to_value(&cfg.data)? {
        return Err(here("that run read another [data] section (its splits must be this run's, or its backbone has seen this run's validation or test images)".into()));
    }
    Ok(rec)
}

/// The tuned backbone of the earlier run `rec` (checked by [`check_tuned_from`]), rebuilt on
/// `vit` (this run's loaded checkpoint) with that run's tuners and trained tensors, LoRA merged
/// into the weights, on plain tensors; frozen by the caller's trunk-path model.
fn tuned_backbone(from: &Path, rec: &super::record::RunRecord, vit: vqt_models::Vit, num_classes: usize, ad: &Device) -> Result<(vqt_models::Vit, TunedFromRecord)> {
    let here = |what: String| anyhow::anyhow!("backbone.tuned_from = \"{}\": {what}", from.display());
    let earlier = &rec.config;
    let file = from.join(&rec.trainable_file);
    let trainable_sha256 = vqt_core::hash::sha256_file(&file).map_err(|e| here(format!("{}: {e}", file.display())))?;
    let model = earlier.model_spec().build(vit, num_classes).map_err(here)?;
    let model = vqt_models::tuners::load_trainable(model.fork(ad), &file).map_err(|e| here(e.to_string()))?;
    let lora_merged = earlier.tuners.lora.is_some();
    // Plain tensors, off the tape (a merged LoRA weight is then a leaf like any other).
    let mut backbone = model.backbone.valid();
    if lora_merged {
        backbone = backbone.merge_lora();
    }
    let record = TunedFromRecord {
        run_dir: from.to_path_buf(),
        method: rec.method.clone(),
        trainable_file: rec.trainable_file.clone(),
        trainable_sha256,
        val_accuracy: rec.val_accuracy,
        test_accuracy: rec.test_accuracy,
        lora_merged,
    };
    Ok((backbone, record))
}
