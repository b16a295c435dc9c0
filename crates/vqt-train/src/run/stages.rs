//! One training stage with burn-train's learner: loaders, optimizer, schedule, checkpoints,
//! per-epoch metrics, resuming. A run has one stage, or three with Head2Toe.

use super::batch::{EpochShuffled, Item, SeededBatcher, TrunkBatcher};
use super::eval::accuracy;
use super::train::TrainOptions;
use crate::checkpoint::{StateCheckpointer, TrainableCheckpointer};
use crate::config::{ExperimentConfig, OptimizerKind};
use crate::progress::{EpochMetrics, EpochRenderer, RunLog};
use anyhow::{Context, Result};
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::optim::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::optim::lr_scheduler::sequential::SequentialLrSchedulerConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, AdamWConfig, SgdConfig};
use burn::tensor::Device;
use burn::train::checkpoint::KeepLastNCheckpoints;
use burn::train::metric::{AccuracyMetric, LearningRateMetric, LossMetric};
use burn::train::renderer::MetricsRenderer;
use burn::train::{ExecutionStrategy, Learner, MultiDeviceOptim, SupervisedTraining};
use std::path::Path;
use std::sync::{Arc, Mutex};
use vqt_models::TrunkModel;

/// The file per-epoch metrics are kept in while a run is in progress (for `--resume`).
const EPOCHS_FILE: &str = "epochs.json";

/// What every training stage shares: batchers, items, options.
pub(crate) struct Stages<'a> {
    pub(crate) cfg: &'a ExperimentConfig,
    pub(crate) opts: &'a TrainOptions,
    pub(crate) train_batcher: TrunkBatcher,
    pub(crate) val_batcher: TrunkBatcher,
    pub(crate) train_items: Vec<Item>,
    pub(crate) val_items: Vec<Item>,
    pub(crate) ad: Device,
}

/// A trained stage: the model on the autodiff device (with that stage's trainability) and its
/// per-epoch metrics.
pub(crate) struct Trained {
    pub(crate) model: TrunkModel,
    pub(crate) epochs: Vec<EpochMetrics>,
    pub(crate) resumed_from: Option<usize>,
}

impl Stages<'_> {
    /// The epoch the stage in `dir` continues after with `--resume` (`None`: from scratch;
    /// `Some(train.epochs)`: it is complete and is only reloaded).
    pub(crate) fn start(&self, dir: &Path) -> Option<usize> {
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
    pub(crate) fn run(&self, model: TrunkModel, dir: &Path, lr: f64, start: Option<usize>) -> Result<Trained> {
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
    pub(crate) fn val_accuracy(&self, model: &TrunkModel) -> f64 {
        accuracy(&model.valid(), &self.val_batcher, &self.val_items, self.cfg.train.batch_size, &self.ad.clone().without_autodiff())
    }
}

/// burn-train's terminal UI when stdout is a terminal; `None` (line-per-epoch logs) otherwise.
fn tui_renderer(interrupter: burn::train::Interrupter, checkpoint: Option<usize>) -> Option<Box<dyn MetricsRenderer>> {
    use std::io::IsTerminal;
    std::io::stdout()
        .is_terminal()
        .then(|| Box::new(burn::train::renderer::tui::TuiMetricsRendererWrapper::new(interrupter, checkpoint)) as Box<dyn MetricsRenderer>)
}
