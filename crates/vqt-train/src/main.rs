//! `vqt-train`: train and evaluate PETL methods (linear probe, VQT, SynQT, backbone tuners and
//! their combinations) on a ViT, with the backend chosen at launch.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use vqt_core::device::{configure_precision, Precision};
use vqt_core::{BackendKind, make_device};

#[derive(Parser)]
#[command(name = "vqt-train", version, about = "Parameter-efficient ViT adaptation (VQT, SynQT) on Burn")]
struct Cli {
    /// Backend: cpu (Flex), ndarray, wgpu, wgpu-cpu, vulkan, vulkan-cpu, cuda (feature `cuda`).
    #[arg(long, global = true, default_value = "cpu")]
    backend: String,
    /// Device index (GPU backends).
    #[arg(long, global = true)]
    device: Option<usize>,
    /// Data-parallel training on these device indices, e.g. `0,1` (burn-train's multi-device
    /// strategy: one batch per device per step, gradients summed on the first). CPU backends
    /// have one device: there it runs that many workers on it (tests the path, no speed-up).
    #[arg(long, global = true, value_delimiter = ',')]
    devices: Vec<usize>,
    /// With `--devices` on `cuda`: burn-train's DistributedDataParallel strategy (gradients
    /// all-reduced through NCCL during the backward pass, one optimizer per device) instead of
    /// MultiDevice (gradients gathered and summed on the first device). Same update; Burn 0.22
    /// has the all-reduce on CUDA only, so other backends refuse it.
    #[arg(long, global = true)]
    ddp: bool,
    /// Float precision of every tensor: f32, f16 or bf16 (where the backend supports it; pure
    /// reduced precision, not mixed).
    #[arg(long, global = true, default_value = "f32")]
    precision: String,
    /// What to do; without one, the default demo run: VQT (one query per layer, from the K/V
    /// feature cache) on the real DINOv2 ViT-S/14 + Fashion-MNIST task of
    /// configs/experiments/fmnist-dinov2s-vqt.toml, into runs/default-vqt (reused if complete).
    #[command(subcommand)]
    command: Option<Command>,
}

/// The default run's config, its output and the demo's VQT recipe (scripts/demo.sh).
const DEFAULT_CONFIG: &str = "configs/experiments/fmnist-dinov2s-vqt.toml";
const DEFAULT_OUT: &str = "runs/default-vqt";
const DEFAULT_OVERRIDES: [&str; 2] = ["train.optimizer=\"adam\"", "train.lr=0.05"];

#[derive(Subcommand)]
enum Command {
    /// Train one run and write `<out>/run.json`.
    Train {
        /// Experiment config (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Override a config field, e.g. `--set train.epochs=3` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Output directory (learner logs and run.json).
        #[arg(long, default_value = "runs/latest")]
        out: PathBuf,
        /// Seed (overrides train.seed).
        #[arg(long)]
        seed: Option<u64>,
        /// Skip (and count in run.json) missing/corrupt images and out-of-range labels instead of
        /// stopping at the first (image datasets).
        #[arg(long)]
        skip_bad: bool,
        /// Continue an interrupted run from the latest complete checkpoint in `<out>/checkpoint`
        /// (same config, seed, backend and precision: a difference is refused, naming the key).
        #[arg(long, conflicts_with = "overwrite")]
        resume: bool,
        /// Replace the run `--out` already holds (completed or interrupted) with a fresh one.
        #[arg(long)]
        overwrite: bool,
        /// Idempotent: if `--out` holds this run complete (same settings), do nothing but print
        /// it; if interrupted, resume it (or start afresh when no checkpoint survived); else
        /// train. What every sweep job runs.
        #[arg(long, conflicts_with_all = ["resume", "overwrite"])]
        reuse: bool,
    },
    /// Build the training split's feature cache ahead of time into a file (memory-mapped by
    /// later runs whose config sets `train.cache_file` to it).
    Cache {
        /// Experiment config (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Override a config field (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Cache file (default: the config's `train.cache_file`).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Per-layer features (class token and mean patch token of every block, final class token)
    /// of a split, with labels, to a safetensors file for analysis.
    Extract {
        /// Experiment config (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Override a config field (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Which split.
        #[arg(long, value_enum, default_value = "train")]
        split: vqt_train::run::EvalSplit,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
    /// The VTAB-1k protocol: grid on train800 -> val200 (final epoch), best setting retrained on
    /// train800val200 per seed, test scored once; writes `<out>/tune.{json,md}`. The sweep is a
    /// set of jobs in a plan directory (`plan.json`, `base.toml`, `grid.jsonl` and, after the
    /// selection, `final.jsonl`; docs/guide/sweeps.md), run by an executor: `local` (N worker
    /// processes) or `slurm` (one job array per phase); or plan only (`--plan DIR`) and run
    /// `DIR/grid.commands` with `xargs -P`. Rerunning reuses every finished run (same settings)
    /// and resumes interrupted ones.
    Tune {
        /// Base config with `[data] kind = "vtab"` or `kind = "idx"` (train_range = train800,
        /// val_range = val200); an optional `[slurm]` section sets the SLURM flags below.
        #[arg(long, required_unless_present_any = ["collect", "run"])]
        config: Option<PathBuf>,
        /// Override a config field (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Tasks (names or aliases), comma-separated; with an IDX config, one name labelling
        /// its task.
        #[arg(long, value_delimiter = ',', required_unless_present_any = ["collect", "run"])]
        tasks: Vec<String>,
        /// A grid axis `key=[v1,v2,...]` (repeatable; list smaller learning rates first: ties
        /// keep the earlier setting).
        #[arg(long = "grid")]
        grid: Vec<vqt_train::tune::Axis>,
        /// Seeds of the final runs, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "42,44,82,100,800")]
        seeds: Vec<u64>,
        /// Output directory: the plan and every run, then executed.
        #[arg(long, default_value = "runs/tune")]
        out: PathBuf,
        /// Only write the plan into this directory (no run starts); run it later with
        /// `tune --run DIR`, or `xargs -P N -d '\n' -I{} sh -c {} < DIR/grid.commands` then
        /// `tune --collect DIR` and the same for final.commands.
        #[arg(long, conflicts_with_all = ["collect", "run"])]
        plan: Option<PathBuf>,
        /// Execute the sweep planned in this directory (the phases not finished yet).
        #[arg(long, conflicts_with = "collect")]
        run: Option<PathBuf>,
        /// From the sweep's run directories: choose each task's setting once its grid is
        /// finished (writing `final.jsonl`), and write `tune.{json,md}` listing every job that
        /// has not finished (exit code 1 while any has not).
        #[arg(long)]
        collect: Option<PathBuf>,
        /// Who runs the jobs.
        #[arg(long, value_enum, default_value = "local")]
        executor: Executor,
        /// Local executor: jobs run at once, each its own process (mind the cores: each job
        /// uses RAYON_NUM_THREADS threads).
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// SLURM executor: wait in the foreground, phase by phase (`sbatch --wait`), and write
        /// the report; without it the phases chain through `--dependency=afterok` and this
        /// command returns after submitting.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        slurm: SlurmArgs,
        /// Make every run an add-on (`backbone.tuned_from`) to an earlier, finished tune in
        /// this directory: grid runs build on its chosen grid run, final runs on its final run
        /// of the same seed.
        #[arg(long)]
        on_tune: Option<PathBuf>,
    },
    /// Run job N (0-based) of a sweep's job file (`grid.jsonl`, `final.jsonl`): its exact
    /// `vqt-train train ... --reuse` command, in its directory. What a SLURM array task runs
    /// (`--index $SLURM_ARRAY_TASK_ID`).
    Job {
        /// The job file.
        #[arg(long)]
        file: PathBuf,
        /// The job's line, 0-based.
        #[arg(long)]
        index: usize,
    },
    /// Score a saved run (its run.json and trainable parameters) on a split.
    Eval {
        /// The run directory (holds run.json and trainable.safetensors).
        #[arg(long)]
        run: PathBuf,
        /// Which split.
        #[arg(long, value_enum, default_value = "test")]
        split: vqt_train::run::EvalSplit,
    },
}

/// Who runs a sweep's jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Executor {
    /// Child processes on this machine (`--workers`).
    Local,
    /// SLURM job arrays (`sbatch`), one per phase.
    Slurm,
}

/// SLURM flags of `tune` (each overrides the config's `[slurm]` field of the same name).
#[derive(clap::Args, Debug, Default)]
struct SlurmArgs {
    /// SLURM partition.
    #[arg(long)]
    partition: Option<String>,
    /// SLURM time limit of each job (e.g. `2:00:00`).
    #[arg(long)]
    time: Option<String>,
    /// CPUs per job.
    #[arg(long)]
    cpus_per_task: Option<u32>,
    /// GPUs per job.
    #[arg(long)]
    gpus_per_task: Option<u32>,
    /// Another sbatch argument for every job (repeatable), e.g. `--sbatch-arg=--account=lab`.
    #[arg(long = "sbatch-arg", allow_hyphen_values = true)]
    sbatch_args: Vec<String>,
    /// Submit one phase only, without the follow-up job chained by `--dependency=afterok`.
    #[arg(long)]
    no_chain: bool,
}

impl SlurmArgs {
    fn config(&self) -> vqt_train::config::SlurmConfig {
        vqt_train::config::SlurmConfig {
            partition: self.partition.clone(),
            time: self.time.clone(),
            cpus_per_task: self.cpus_per_task,
            gpus_per_task: self.gpus_per_task,
            sbatch_args: self.sbatch_args.clone(),
            no_chain: self.no_chain,
        }
    }
}

fn main() {
    vqt_core::mem::tune_allocator();
    vqt_core::process::exit_on_runtime_deadlock();
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

/// `vqt-train --backend X` with no subcommand: the demo's VQT run, after checking (without
/// fetching anything) that its config and assets are here.
fn default_run(backend: BackendKind, index: Option<usize>, precision: Precision, devices: Vec<(usize, burn::tensor::Device)>, ddp: bool) -> Result<()> {
    let config = PathBuf::from(DEFAULT_CONFIG);
    anyhow::ensure!(
        config.is_file(),
        "{DEFAULT_CONFIG} not found: run vqt-train from the repository root (or give a subcommand; see --help)"
    );
    let overrides: Vec<String> = DEFAULT_OVERRIDES.iter().map(|s| s.to_string()).collect();
    let cfg = vqt_train::config::load(&config, &overrides)?;
    let mut needed: Vec<PathBuf> = cfg.backbone.checkpoint.iter().cloned().collect();
    if let vqt_train::config::DataConfig::Idx { train_images, train_labels, test_images, test_labels, .. } = &cfg.data {
        needed.extend([train_images, train_labels, test_images, test_labels].map(|p| p.clone()));
    }
    if let Some(missing) = needed.iter().find(|p| !p.is_file()) {
        anyhow::bail!(
            "{}: missing: run `bash scripts/fetch-assets.sh` first (it installs the DINOv2 ViT-S/14 weights and Fashion-MNIST, offline), then `vqt-train --backend {backend}` again",
            missing.display()
        );
    }
    let out = PathBuf::from(DEFAULT_OUT);
    eprintln!(
        "no subcommand: the default demo run, VQT on DINOv2 ViT-S/14 + Fashion-MNIST ({DEFAULT_CONFIG} with {}) -> {} (see --help for the subcommands)",
        DEFAULT_OVERRIDES.join(" "),
        out.display()
    );
    let device = device(backend, index, precision)?;
    let opts = vqt_train::run::TrainOptions { resume: false, overwrite: false, device_index: index, precision, devices, ddp };
    let r = vqt_train::run::train_or_reuse(&cfg, backend.name(), &device, &out, opts)?;
    print_result(&r, &out);
    Ok(())
}

fn print_result(r: &vqt_train::run::RunRecord, out: &std::path::Path) {
    println!(
        "{} on {}: val {:.2}%, test {:.2}% ({} test images), {} trainable / {} params, {:.1}s -> {}",
        r.method,
        r.backend,
        r.val_accuracy,
        r.test_accuracy,
        r.split_sizes[2],
        r.trainable_params,
        r.total_params,
        r.wall_seconds,
        out.join("run.json").display()
    );
}

/// The plain device of `backend`, in the requested precision.
fn device(backend: BackendKind, index: Option<usize>, precision: Precision) -> Result<burn::tensor::Device> {
    let mut d = make_device(backend, index)?;
    configure_precision(&mut d, backend, precision)?;
    Ok(d)
}

fn run() -> Result<()> {
    execute(Cli::parse())
}

fn execute(cli: Cli) -> Result<()> {
    if let Some(Command::Job { file, index }) = &cli.command {
        let job = vqt_train::tune::job_at(file, *index)?;
        std::env::set_current_dir(&job.cwd).map_err(|e| anyhow::anyhow!("job {}: cd {}: {e}", job.id, job.cwd.display()))?;
        eprintln!("job {}: {}", job.id, job.command);
        let inner = Cli::try_parse_from(&job.argv).map_err(|e| anyhow::anyhow!("{}: job {}: {}", file.display(), job.id, e.to_string().lines().next().unwrap_or("")))?;
        anyhow::ensure!(matches!(inner.command, Some(Command::Train { reuse: true, .. })), "{}: job {} is not a `vqt-train train ... --reuse` command", file.display(), job.id);
        return execute(inner);
    }
    let launch_flags = {
        let mut g = vec!["--backend".to_string(), cli.backend.clone(), "--precision".into(), cli.precision.clone()];
        if let Some(i) = cli.device {
            g.extend(["--device".to_string(), i.to_string()]);
        }
        if !cli.devices.is_empty() {
            g.extend(["--devices".to_string(), cli.devices.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")]);
        }
        if cli.ddp {
            g.push("--ddp".into());
        }
        g
    };
    let backend: BackendKind = cli.backend.parse()?;
    let precision: Precision = cli.precision.parse().map_err(anyhow::Error::msg)?;
    let index = cli.device;
    anyhow::ensure!(cli.device.is_none() || cli.devices.is_empty(), "give --device N or --devices N,M,..., not both");
    vqt_core::device::check_indices(backend, cli.device, &cli.devices).map_err(anyhow::Error::msg)?;
    let ddp = cli.ddp;
    if ddp {
        anyhow::ensure!(cli.devices.len() > 1, "--ddp trains one run on several devices: give them with --devices 0,1,...");
        anyhow::ensure!(
            backend == BackendKind::Cuda,
            "--ddp: Burn 0.22 has the all-reduce of DistributedDataParallel on CUDA only (NCCL); on `{}` use --devices alone (burn-train's MultiDevice strategy)",
            backend.name()
        );
    }
    let mut devices = Vec::new();
    for &i in &cli.devices {
        devices.push((i, device(backend, Some(i), precision)?));
    }
    let index = index.or(cli.devices.first().copied());
    let Some(command) = cli.command else {
        return default_run(backend, index, precision, devices, ddp);
    };
    match command {
        Command::Cache { config, overrides, out } => {
            let cfg = vqt_train::config::load(&config, &overrides)?;
            let path = out
                .or_else(|| cfg.train.cache_file.clone())
                .ok_or_else(|| anyhow::anyhow!("{}: give --out or set train.cache_file", config.display()))?;
            let device = device(backend, index, precision)?;
            let (n, bytes) = vqt_train::run::build_cache_file(&cfg, &device, &path)?;
            println!("{}: feature cache of {n} images, {:.1} MiB", path.display(), bytes as f64 / 1048576.0);
            Ok(())
        }
        Command::Extract { config, overrides, split, out } => {
            let cfg = vqt_train::config::load(&config, &overrides)?;
            let device = device(backend, index, precision)?;
            let n = vqt_train::run::extract(&cfg, &device, split, &out)?;
            println!("{}: per-layer features of {n} {split:?} images", out.display());
            Ok(())
        }
        Command::Tune { config, overrides, tasks, grid, seeds, out, plan, run, collect, executor, workers, wait, slurm, on_tune } => {
            use vqt_train::tune;
            let finish = |dir: &std::path::Path, r: &tune::TuneReport| -> Result<()> {
                print!("{}", tune::markdown(r));
                anyhow::ensure!(r.missing.is_empty(), "{}: {} job(s) have not finished (listed in {})", dir.display(), r.missing.len(), dir.join("tune.md").display());
                Ok(())
            };
            if let Some(dir) = collect {
                let r = tune::collect(&dir)?;
                return finish(&dir, &r);
            }
            let dir = run.clone().or(plan.clone()).unwrap_or(out);
            if run.is_none() {
                let config = config.ok_or_else(|| anyhow::anyhow!("tune: give --config"))?;
                let launch = tune::Launch { exe: std::env::current_exe()?, global: launch_flags };
                let req = tune::PlanRequest { config: &config, overrides: &overrides, tasks: &tasks, axes: &grid, seeds: &seeds, on_tune: on_tune.as_deref(), launch };
                let p = tune::plan(&req, &dir)?;
                let n = tune::read_jobs(&tune::Phase::Grid.jobs_file(&dir))?.len();
                eprintln!("planned {n} grid jobs ({} tasks x {} settings; then {} seeds per task) in {}", p.tasks.len(), p.grid.len(), p.seeds.len(), dir.display());
                if plan.is_some() {
                    println!(
                        "{d}: planned. Run it with `vqt-train tune --run {d} [--executor local --workers N | --executor slurm]`, or run {d}/grid.commands with any executor (e.g. `xargs -P 4 -d '\\n' -I{{}} sh -c {{}} < {d}/grid.commands`), then `vqt-train tune --collect {d}` (writes final.commands), the same for final.commands, and `--collect` again for the table.",
                        d = dir.display()
                    );
                    return Ok(());
                }
            }
            match executor {
                Executor::Local => {
                    let r = tune::execute_local(&dir, workers)?;
                    finish(&dir, &r)
                }
                Executor::Slurm => {
                    let s = tune::read_plan(&dir)?.slurm.merged(&slurm.config());
                    s.validate().map_err(anyhow::Error::msg)?;
                    match tune::execute_slurm(&dir, &s, wait)? {
                        tune::SlurmOutcome::Submitted { phase, array, follow_up } if follow_up.is_empty() => {
                            println!("{}: submitted the {} phase as SLURM job array {array} (no chain: run `vqt-train tune --run {} --executor slurm` again when it has finished)", dir.display(), phase.name(), dir.display());
                            Ok(())
                        }
                        tune::SlurmOutcome::Submitted { phase, array, follow_up } => {
                            println!(
                                "{}: submitted the {} phase as SLURM job array {array}, and job {follow_up} after it (--dependency=afterok) to {}; tune.json appears when the chain has run (`squeue`, logs in {})",
                                dir.display(),
                                phase.name(),
                                if phase == tune::Phase::Grid { "choose the settings and submit the final phase" } else { "write the report" },
                                dir.join("logs").display()
                            );
                            Ok(())
                        }
                        tune::SlurmOutcome::Done(r) => finish(&dir, &r),
                    }
                }
            }
        }
        Command::Job { .. } => unreachable!("handled before the device is set up"),
        Command::Eval { run, split } => {
            let device = device(backend, index, precision)?;
            let (acc, n) = vqt_train::run::evaluate(&run, split, &device)?;
            println!("{}: {split:?} accuracy {acc:.2}% ({n} images) on {}", run.display(), backend.name());
            Ok(())
        }
        Command::Train { config, mut overrides, out, seed, resume, overwrite, skip_bad, reuse } => {
            if let Some(s) = seed {
                overrides.push(format!("train.seed={s}"));
            }
            let mut cfg = vqt_train::config::load(&config, &overrides)?;
            if skip_bad {
                cfg.data.set_skip_bad().map_err(anyhow::Error::msg)?;
            }
            let device = device(backend, index, precision)?;
            let opts = vqt_train::run::TrainOptions { resume, overwrite, device_index: index, precision, devices, ddp };
            let r = if reuse { vqt_train::run::train_or_reuse(&cfg, backend.name(), &device, &out, opts)? } else { vqt_train::run::train(&cfg, backend.name(), &device, &out, opts)? };
            print_result(&r, &out);
            Ok(())
        }
    }
}
