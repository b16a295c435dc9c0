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
    /// train800val200 per seed, test scored once; writes `<out>/tune.{json,md}`. Rerunning it
    /// reuses every finished run (same settings) and resumes interrupted ones.
    Tune {
        /// Base config with `[data] kind = "vtab"`.
        #[arg(long)]
        config: PathBuf,
        /// Override a config field (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Tasks (names or aliases), comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        tasks: Vec<String>,
        /// A grid axis `key=[v1,v2,...]` (repeatable; list smaller learning rates first: ties
        /// keep the earlier setting).
        #[arg(long = "grid")]
        grid: Vec<vqt_train::tune::Axis>,
        /// Seeds of the final runs, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "42,44,82,100,800")]
        seeds: Vec<u64>,
        /// Output directory.
        #[arg(long, default_value = "runs/tune")]
        out: PathBuf,
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

fn main() {
    vqt_core::mem::tune_allocator();
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

/// `vqt-train --backend X` with no subcommand: the demo's VQT run, after checking (without
/// fetching anything) that its config and assets are here.
fn default_run(backend: BackendKind, index: Option<usize>, precision: Precision, devices: Vec<(usize, burn::tensor::Device)>) -> Result<()> {
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
    let opts = vqt_train::run::TrainOptions { resume: false, overwrite: false, device_index: index, precision, devices };
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
    let cli = Cli::parse();
    let backend: BackendKind = cli.backend.parse()?;
    let precision: Precision = cli.precision.parse().map_err(anyhow::Error::msg)?;
    let index = cli.device;
    anyhow::ensure!(cli.device.is_none() || cli.devices.is_empty(), "give --device N or --devices N,M,..., not both");
    vqt_core::device::check_indices(backend, cli.device, &cli.devices).map_err(anyhow::Error::msg)?;
    let mut devices = Vec::new();
    for &i in &cli.devices {
        devices.push((i, device(backend, Some(i), precision)?));
    }
    let index = index.or(cli.devices.first().copied());
    let Some(command) = cli.command else {
        return default_run(backend, index, precision, devices);
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
        Command::Tune { config, overrides, tasks, grid, seeds, out } => {
            let device = device(backend, index, precision)?;
            let r = vqt_train::tune::tune(&config, &overrides, &tasks, &grid, &seeds, backend.name(), &device, &vqt_train::run::TrainOptions { resume: false, overwrite: false, device_index: index, precision, devices: devices.clone() }, &out)?;
            let md = vqt_train::tune::markdown(&r);
            std::fs::create_dir_all(&out)?;
            vqt_core::fs::write_atomic(&out.join("tune.json"), serde_json::to_string_pretty(&r)?.as_bytes())?;
            vqt_core::fs::write_atomic(&out.join("tune.md"), md.as_bytes())?;
            print!("{md}");
            Ok(())
        }
        Command::Eval { run, split } => {
            let device = device(backend, index, precision)?;
            let (acc, n) = vqt_train::run::evaluate(&run, split, &device)?;
            println!("{}: {split:?} accuracy {acc:.2}% ({n} images) on {}", run.display(), backend.name());
            Ok(())
        }
        Command::Train { config, mut overrides, out, seed, resume, overwrite, skip_bad } => {
            if let Some(s) = seed {
                overrides.push(format!("train.seed={s}"));
            }
            let mut cfg = vqt_train::config::load(&config, &overrides)?;
            if skip_bad {
                cfg.data.set_skip_bad().map_err(anyhow::Error::msg)?;
            }
            let device = device(backend, index, precision)?;
            let opts = vqt_train::run::TrainOptions { resume, overwrite, device_index: index, precision, devices };
            let r = vqt_train::run::train(&cfg, backend.name(), &device, &out, opts)?;
            print_result(&r, &out);
            Ok(())
        }
    }
}
