//! Building a run from its config: data splits, input pipeline, backbone (checkpoint loaded,
//! tuners injected) and the query-side method.

use super::batch::TrunkBatcher;
use super::data::load_data;
use super::eval::EvalSplit;
use super::record::CheckpointRecord;
use crate::config::{ExperimentConfig, MethodConfig};
use anyhow::Result;
use burn::module::Module;
use burn::nn::LinearConfig;
use burn::tensor::Device;
use std::collections::BTreeMap;
use std::sync::Arc;
use vqt_core::data::files::Skipped;
use vqt_core::data::preprocess::Preprocess;
use vqt_core::data::Sample;
use vqt_models::vit::load::default_resample;
use vqt_models::vit::TrunkNoise;
use vqt_models::{QueryMethod, TrunkModel};

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
