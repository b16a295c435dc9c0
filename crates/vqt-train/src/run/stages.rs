//! One training stage with burn-train's learner: loaders, optimizer, schedule, checkpoints,
//! per-epoch metrics, resuming. A run has one stage, or three with Head2Toe.

use super::batch::{EpochShuffled, Item, SeededBatcher, TrunkBatcher};
use super::eval::accuracy;
use super::train::TrainOptions;
use crate::checkpoint::{StateCheckpointer, TrainableCheckpointer};
use crate::config::{ExperimentConfig, OptimizerKind, TrainConfig};
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
use burn::module::ParamGroup;
use burn::optim::lr_scheduler::module_lr_scheduler::{ModuleLrScheduler, ModuleLrSchedulerConfig};
use burn::optim::lr_scheduler::LrSchedulerConfig;
use burn::optim::{AdamConfig, ModuleOptimizer, Optimizer, SgdConfig};
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

        // Optimiser and schedule (per iteration: linear warm-up, then cosine to 0), per group.
        // The schedule advances once per optimizer step (after `grad_accumulation` batches; with N
        // devices each step takes one batch per device, each device reading 1/N of the split).
        let workers = self.opts.devices.len().max(1);
        let iters_per_epoch = self.train_items.len().div_ceil(workers).div_ceil(t.batch_size).div_ceil(t.grad_accumulation);
        let (optim, scheduler) = optimization(t, lr, iters_per_epoch)?;

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
            let devices: Vec<Device> = self.opts.devices.iter().map(|(_, d)| d.clone().without_autodiff().autodiff()).collect();
            let strategy = if self.opts.ddp {
                // The all-reduce sums, so an update equals MultiDevice's (and grad_accumulation's).
                use burn::tensor::distributed::{DistributedConfig, ReduceOperation};
                ExecutionStrategy::ddp(devices, DistributedConfig { all_reduce_op: ReduceOperation::Sum })
            } else {
                ExecutionStrategy::MultiDevice(devices, MultiDeviceOptim::OptimMainDevice)
            };
            training = training.with_training_strategy(strategy.into());
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
        let renderer = EpochRenderer::new(log.clone(), training.interrupter(), tui).with_checkpoints(&ckpt_dir);
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

/// The optimizer and the learning-rate schedule of a stage at peak rate `lr` (`train.lr`, or a
/// Head2Toe stage's scaled rate) with `iters_per_epoch` optimizer steps per epoch: linear
/// warm-up over `train.warmup_epochs`, then cosine to 0, stepped every iteration. Every group of
/// `[train.groups]` gets its own optimizer (its weight decay) and its own schedule (its peak
/// rate, scaled like `lr`), matched by module path: `tuners` = `backbone.*`, `method` =
/// `method.*`, `head` = the method's head.
pub(crate) fn optimization(t: &TrainConfig, lr: f64, iters_per_epoch: usize) -> Result<(ModuleOptimizer, ModuleLrScheduler)> {
    let total_iters = iters_per_epoch * t.epochs;
    let warmup = (iters_per_epoch * t.warmup_epochs).min(total_iters.saturating_sub(1));
    let schedule = |peak: f64| -> LrSchedulerConfig {
        let cosine = CosineAnnealingLrSchedulerConfig::new(peak, (total_iters - warmup).max(1));
        if warmup > 0 {
            SequentialLrSchedulerConfig::new(vec![LinearLrSchedulerConfig::new(peak / warmup as f64, peak, warmup).into(), cosine.into()], vec![warmup]).into()
        } else {
            cosine.into()
        }
    };
    let mut groups = Vec::new();
    let mut sched = ModuleLrSchedulerConfig::new(schedule(lr));
    let scale = lr / t.lr;
    for (name, g) in t.groups.iter() {
        let group = ParamGroup::from_regex(group_pattern(name)).map_err(|e| anyhow::anyhow!("train.groups.{name}: {e:?}"))?;
        groups.push((group.clone(), g.weight_decay.unwrap_or(t.weight_decay)));
        sched = sched.with_group(group, schedule(g.lr.unwrap_or(t.lr) * scale));
    }
    let sched = sched.init().map_err(|e| anyhow::anyhow!("learning-rate schedule: {e}"))?;
    // One optimizer of the run's kind per group, each with its own weight decay.
    fn grouped<O: Optimizer + 'static>(make: impl Fn(f64) -> O, wd: f64, groups: Vec<(ParamGroup, f64)>) -> ModuleOptimizer {
        groups.into_iter().fold(ModuleOptimizer::from(make(wd)), |m, (g, wd)| m.with_group(g, make(wd), None))
    }
    let decay = |wd: f64| (wd > 0.0).then(|| WeightDecayConfig::new(wd as f32));
    let eps = t.adam_epsilon as f32;
    let optim = match t.optimizer {
        // Burn's AdamW, bit for bit, as one threaded pass per parameter on the `cpu` backend.
        OptimizerKind::Adamw => grouped(|wd| vqt_models::ops::adamw::FusedAdamW::new(eps, wd as f32), t.weight_decay, groups),
        OptimizerKind::Adam => grouped(|wd| AdamConfig::new().with_epsilon(eps).with_weight_decay(decay(wd)).build(), t.weight_decay, groups),
        OptimizerKind::Sgd => grouped(
            |wd| SgdConfig::new().with_momentum(Some(MomentumConfig::new().with_momentum(0.9))).with_weight_decay(decay(wd)).build(),
            t.weight_decay,
            groups,
        ),
    };
    Ok((optim, sched))
}

/// The module-path pattern of a `[train.groups]` group, as burn's optimizer sees the paths
/// (enum variants are path segments: `method.Vqt.head.weight`, `method.Linear.weight`).
fn group_pattern(name: &str) -> &'static str {
    match name {
        "tuners" => r"^backbone\.",
        "method" => r"^method\.",
        "head" => r"^method\.(Linear\.(weight|bias)$|(Vqt|Synqt)\.head\.)",
        other => unreachable!("GroupsConfig::iter yields no group `{other}`"),
    }
}

/// burn-train's terminal UI when stdout is a terminal; `None` (line-per-epoch logs) otherwise.
fn tui_renderer(interrupter: burn::train::Interrupter, checkpoint: Option<usize>) -> Option<Box<dyn MetricsRenderer>> {
    use std::io::IsTerminal;
    std::io::stdout()
        .is_terminal()
        .then(|| Box::new(burn::train::renderer::tui::TuiMetricsRendererWrapper::new(interrupter, checkpoint)) as Box<dyn MetricsRenderer>)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GroupConfig, GroupsConfig};
    use burn::optim::GradientsParams;
    use burn::tensor::{Distribution, Int, Tensor, TensorData};
    use std::collections::BTreeMap;
    use vqt_models::{Preset, TrunkBatch, TrunkInput};

    /// Every float tensor's values by module path (the stable names of `named_grads`).
    fn values<M: Module>(m: &M) -> BTreeMap<String, Vec<f32>> {
        vqt_models::tuners::named_values(m).into_iter().map(|(k, t)| (k, t.data)).collect()
    }

    /// The group a stable tensor name belongs to under `[train.groups]`.
    fn group_of(path: &str) -> &'static str {
        if path.starts_with("backbone.") {
            "tuners"
        } else if path.starts_with("method.head.") || path == "method.weight" || path == "method.bias" {
            "head"
        } else {
            "method"
        }
    }

    /// One AdamW step from fresh state moves every element by `lr_g · g/(|g|+ε) + lr_g · wd_g · θ`
    /// with its own group's rate and decay, so each group's update is checked element by element.
    fn check_one_step(preset: Preset, groups: GroupsConfig, expect: &[(&str, f64, f64)]) {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/experiments/fmnist-smoke.toml");
        let mut t = crate::config::load(&p, &[]).unwrap().train;
        (t.optimizer, t.lr, t.weight_decay, t.warmup_epochs, t.epochs, t.adam_epsilon) = (OptimizerKind::Adamw, 0.01, 0.0, 0, 2, 1e-8);
        t.groups = groups;
        let plain = Device::flex();
        let ad = plain.clone().autodiff();
        plain.seed(3);
        let vcfg = vqt_models::VitConfig { depth: 2, ..vqt_models::VitPreset::from_name("vit-ti16").unwrap().config() }.with_img_size(32).with_num_classes(0);
        let model = preset.spec(vcfg.embed_dim).build(vcfg.init(&plain), 3).unwrap().fork(&ad);
        let (mut optim, mut sched) = optimization(&t, t.lr, 4).unwrap();
        let x = Tensor::<4>::random([4, 3, 32, 32], Distribution::Normal(0.0, 1.0), &plain);
        let targets = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1, 2, 1], [4]), &ad);
        let out = model.forward_classification(TrunkBatch { input: TrunkInput::Images(x), targets, rng_seed: None });
        let grads = out.loss.backward();
        let named = vqt_models::tuners::named_grads(&model, &grads);
        let before = values(&model);
        let gp = GradientsParams::from_grads(grads, &model);
        let after = values(&optim.step(sched.step(), model, gp));
        let mut checked: BTreeMap<&str, usize> = BTreeMap::new();
        for (path, g) in &named {
            let group = group_of(path);
            let &(_, lr, wd) = expect.iter().find(|e| e.0 == group).unwrap_or_else(|| panic!("{path}: no expectation for group {group}"));
            for ((&gi, &b), &a) in g.data.iter().zip(&before[path]).zip(&after[path]) {
                if gi.abs() < 1e-5 {
                    continue;
                }
                let want = -lr * (gi as f64 / (gi.abs() as f64 + 1e-8)) - lr * wd * b as f64;
                let got = (a - b) as f64;
                assert!((got - want).abs() < lr * 2e-3, "{preset} {path} ({group}): moved {got}, expected {want} (lr {lr}, wd {wd})");
                *checked.entry(group).or_default() += 1;
            }
        }
        for (g, ..) in expect {
            assert!(checked.get(g).copied().unwrap_or(0) > 0, "{preset}: no element of group {g} was checked ({checked:?})");
        }
    }

    #[test]
    fn each_group_moves_by_its_own_rate_and_decay() {
        let g = |lr: Option<f64>, weight_decay: Option<f64>| Some(GroupConfig { lr, weight_decay });
        // VQT + AdaptFormer: tuners, queries and head each on their own rate.
        check_one_step(
            Preset::VqtAdaptformer,
            GroupsConfig { tuners: g(Some(1e-3), None), method: g(Some(0.05), Some(0.5)), head: g(Some(0.02), None) },
            &[("tuners", 1e-3, 0.0), ("method", 0.05, 0.5), ("head", 0.02, 0.0)],
        );
        // The head follows the method group when it has none of its own; no groups: one rate.
        check_one_step(Preset::Vqt, GroupsConfig { method: g(Some(0.05), None), ..Default::default() }, &[("method", 0.05, 0.0), ("head", 0.05, 0.0)]);
        check_one_step(Preset::Lora, GroupsConfig::default(), &[("tuners", 0.01, 0.0), ("head", 0.01, 0.0)]);
        // The linear probe's whole method is its head.
        check_one_step(Preset::Lora, GroupsConfig { tuners: g(None, Some(0.1)), head: g(Some(0.002), None), ..Default::default() }, &[("tuners", 0.01, 0.1), ("head", 0.002, 0.0)]);
    }

    #[test]
    fn group_rates_follow_the_schedule() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/experiments/fmnist-smoke.toml");
        let mut t = crate::config::load(&p, &[]).unwrap().train;
        (t.lr, t.warmup_epochs, t.epochs) = (0.1, 1, 3);
        t.groups.tuners = Some(GroupConfig { lr: Some(0.01), weight_decay: None });
        // A Head2Toe-style stage at half the run's rate scales every group too.
        let (_, mut sched) = optimization(&t, 0.05, 2).unwrap();
        let id = burn::module::ParamId::new();
        let lrs: Vec<(f64, f64)> = (0..6)
            .map(|_| {
                let m = sched.step();
                (m.lr_from_param(id, Some("backbone.blocks.0.adaptformer.up.weight")), m.lr_from_param(id, Some("method.Vqt.queries")))
            })
            .collect();
        for (i, (tuners, method)) in lrs.iter().enumerate() {
            assert!((tuners / method - 0.1).abs() < 1e-9, "step {i}: {tuners} vs {method}");
        }
        let peak = lrs.iter().map(|l| l.1).fold(0.0, f64::max);
        assert!((peak - 0.05).abs() < 1e-9, "the warm-up ends at the stage's peak: {lrs:?}");
        assert!(lrs[0].1 < peak && lrs[5].1 < peak, "warm-up, then cosine decay: {lrs:?}");
    }
}
