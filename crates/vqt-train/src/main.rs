//! `vqt-train`: train a query-side method (linear probe, VQT, SynQT) on a frozen ViT.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use vqt_core::{BackendKind, make_device};

#[derive(Parser)]
#[command(name = "vqt-train", version, about = "Parameter-efficient ViT adaptation (VQT, SynQT) on Burn")]
struct Cli {
    /// Backend: cpu (Flex), ndarray, wgpu, wgpu-cpu, cuda (feature `cuda`).
    #[arg(long, global = true, default_value = "cpu")]
    backend: String,
    /// Device index (GPU backends).
    #[arg(long, global = true)]
    device: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

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
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let backend: BackendKind = cli.backend.parse()?;
    match cli.command {
        Command::Train { config, mut overrides, out, seed } => {
            if let Some(s) = seed {
                overrides.push(format!("train.seed={s}"));
            }
            let cfg = vqt_train::config::load(&config, &overrides)?;
            let device = make_device(backend, cli.device)?;
            let r = vqt_train::run::train(&cfg, backend.name(), &device, &out)?;
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
            Ok(())
        }
    }
}
