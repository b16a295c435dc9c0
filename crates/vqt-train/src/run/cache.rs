//! The feature cache of a run: its validity key, building it (one trunk pass) and opening a
//! cache file.

use super::batch::TrunkBatcher;
use super::build::{prepare, Prepared};
use super::record::CacheRecord;
use crate::config::ExperimentConfig;
use anyhow::Result;
use burn::tensor::{Device, Tensor, TensorData};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use vqt_core::data::preprocess::Preprocess;
use vqt_models::cache::{CacheKind, FeatureCache};

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
    /// `sha256:<hex>` of the earlier run's trained tensors when the backbone is that run's tuned
    /// one (`backbone.tuned_from`); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tuned_from: Option<String>,
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
        tuned_from: prep.tuned_from.as_ref().map(|t| format!("sha256:{}", t.trainable_sha256)),
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

pub(crate) fn cache_batcher(prep: &Prepared, cfg: &ExperimentConfig, plain: &Device) -> Result<Option<(TrunkBatcher, CacheRecord)>> {
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
