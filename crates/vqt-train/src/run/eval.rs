//! Evaluation (accuracy of a model on a split, of a saved run) and feature extraction.

use super::batch::{items, Item, TrunkBatcher};
use super::build::prepare;
use super::record::read_record;
use crate::config::ExperimentConfig;
use crate::rundir::RUN_FILE;
use anyhow::{Context, Result};
use burn::data::dataloader::batcher::Batcher;
use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use std::path::Path;
use vqt_models::TrunkModel;

/// Accuracy (%) of `model` on `items`, batched by `batcher`.
pub(crate) fn accuracy(model: &TrunkModel, batcher: &TrunkBatcher, items: &[Item], batch: usize, device: &Device) -> f64 {
    let mut correct = 0usize;
    for chunk in items.chunks(batch) {
        let b = batcher.batch(chunk.to_vec(), device);
        let pred = model.forward(b.input).argmax(1).reshape([chunk.len()]);
        let t = b.targets.to_device(&pred.device());
        correct += pred.equal(t).int().sum().into_scalar::<i64>() as usize;
    }
    100.0 * correct as f64 / items.len() as f64
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
    if let Some(was) = &rec.tuned_from {
        // The earlier run's tensors are this run's frozen backbone: refuse a changed file
        // before anything is built.
        let f = was.run_dir.join(&was.trainable_file);
        let now = vqt_core::hash::sha256_file(&f).map_err(|e| anyhow::anyhow!("{}: tuned_from: {}: {e}", rpath.display(), f.display()))?;
        if now != was.trainable_sha256 {
            anyhow::bail!("{}: tuned_from: {} changed since this run trained on it (sha256 {} then, {now} now)", rpath.display(), f.display(), was.trainable_sha256);
        }
    }
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
