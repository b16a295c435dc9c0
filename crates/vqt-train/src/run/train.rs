//! A whole run: checks what the output directory holds, builds the run, trains its stage(s),
//! evaluates once and writes `run.json`; and the idempotent form sweeps use.

use super::batch::{items, TrunkBatcher};
use super::build::prepare;
use super::cache::cache_batcher;
use super::eval::accuracy;
use super::record::{git_revision, read_record, Head2ToeRecord, RunRecord};
use super::stages::Stages;
use crate::checkpoint::TrainableCheckpointer;
use crate::config::{ExperimentConfig, OptimizerKind};
use crate::rundir::{RunState, RUN_FILE};
use anyhow::{Context, Result};
use burn::module::Module;
use burn::tensor::Device;
use std::path::Path;
use std::time::Instant;
use vqt_models::QueryMethod;

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
    /// `--ddp`: with `devices`, burn-train's `DistributedDataParallel` strategy instead of
    /// `MultiDevice` (gradients summed by an all-reduce during the backward pass, one optimizer
    /// per device). Burn 0.22 implements the all-reduce only for CUDA (NCCL); the binary
    /// refuses it on other backends.
    pub ddp: bool,
}

/// Where the Head2Toe stages keep their checkpoints, metrics and trainable files (under the run
/// directory).
pub const HEAD2TOE_DIR: &str = "head2toe";

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
        data_parallel: (opts.devices.len() > 1).then(|| if opts.ddp { "ddp" } else { "multi-device" }.to_string()),
        checkpoint: prep.checkpoint,
        // An add-on is named for both stages (`vqt-on-adaptformer`).
        method: match &prep.tuned_from {
            Some(t) => format!("{}-on-{}", cfg.method_name(), t.method),
            None => cfg.method_name(),
        },
        path: if eval_model.full_path { "full" } else { "trunk" }.into(),
        normalization: format!("{:?}", cfg.backbone.normalization).to_lowercase(),
        trainable_params: trainable,
        total_params: total,
        split_sizes: [prep.train_set.len(), prep.val_set.len(), prep.test_set.len()],
        data_skipped: prep.skipped.clone(),
        cache: cache_record,
        epochs,
        head2toe,
        tuned_from: prep.tuned_from.clone(),
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
