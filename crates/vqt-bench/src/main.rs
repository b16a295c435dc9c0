//! `vqt-bench`: parity against reference fixtures (more subcommands: see README).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use vqt_core::{BackendKind, make_device};

#[derive(Parser)]
#[command(name = "vqt-bench", version, about = "vqt-rs benchmarks and parity checks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every check of one or more `vqt-parity/1` fixture directories; exit 1 on any failure.
    Parity {
        /// Fixture directories (each with a manifest.json).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Backend: cpu, ndarray, wgpu, wgpu-cpu, cuda.
        #[arg(long, default_value = "cpu")]
        backend: String,
        /// Device index (GPU backends).
        #[arg(long)]
        device: Option<usize>,
        /// Also write the reports as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

fn run() -> Result<()> {
    match Cli::parse().command {
        Command::Parity { dirs, backend, device, json } => {
            let backend: BackendKind = backend.parse()?;
            let device = make_device(backend, device)?;
            let mut reports = Vec::new();
            for dir in &dirs {
                let r = vqt_bench::parity::run(dir, &device)?;
                vqt_bench::parity::print_report(&r);
                reports.push(r);
            }
            if let Some(path) = json {
                let text = serde_json::to_string_pretty(&reports)?;
                let tmp = path.with_extension("json.tmp");
                std::fs::write(&tmp, text).with_context(|| format!("{}", tmp.display()))?;
                std::fs::rename(&tmp, &path).with_context(|| format!("{}", path.display()))?;
            }
            let failed = reports.iter().filter(|r| !r.passed()).count();
            if failed > 0 {
                eprintln!("parity FAILED for {failed} of {} fixture(s) on {backend}", reports.len());
                std::process::exit(1);
            }
            println!("parity passed for {} fixture(s) on {backend}", reports.len());
            Ok(())
        }
    }
}

