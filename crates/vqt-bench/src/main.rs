//! `vqt-bench`: parity against reference fixtures (more subcommands: see README).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use vqt_core::{BackendKind, make_device};
use vqt_models::PresetOn;

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
        /// Backend: cpu, ndarray, wgpu, wgpu-cpu, vulkan, vulkan-cpu, cuda.
        #[arg(long, default_value = "cpu")]
        backend: String,
        /// Device index (GPU backends).
        #[arg(long)]
        device: Option<usize>,
        /// Also write the reports as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Measure peak memory, training step time and inference throughput of methods, each in its
    /// own child process (alias `speed`);
    /// writes `<out>.json` and `<out>.md` (ratios to full fine-tuning).
    #[command(visible_alias = "speed")]
    Memory {
        /// Comma-separated methods: linear, vqt, synqt, vqt-cached, full-ft, lora, adaptformer,
        /// vpt-deep, bitfit, ssf, houlsby, pfeiffer, vqt-adaptformer, vqt-addon; a tuned one on
        /// chosen blocks with `@lastK`, `@A-B` or `@A,B` (`adaptformer@last4`).
        #[arg(long, default_value = "linear,vqt,vqt-cached,synqt,lora,adaptformer,vpt-deep,bitfit,ssf,houlsby,pfeiffer,vqt-adaptformer,full-ft")]
        methods: String,
        #[command(flatten)]
        shape: Shape,
        /// Output path prefix (`.json` and `.md` are appended).
        #[arg(long, default_value = "docs/results/memory")]
        out: PathBuf,
    },
    /// Aggregate `vqt-train` run records (run.json, found under the given paths) per method over
    /// seeds; writes `<out>.md`, `<out>.json` and `<out>.svg` (accuracy vs peak memory) and
    /// prints the table.
    Report {
        /// Run directories or parents of them.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Output path prefix.
        #[arg(long)]
        out: PathBuf,
        /// Heading of the markdown table.
        #[arg(long)]
        title: Option<String>,
        /// A `vqt-bench memory` JSON: plot test accuracy against each method's training-step
        /// memory from it (matched by method name, or by `--match`) instead of process RSS.
        #[arg(long)]
        memory: Option<PathBuf>,
        /// `RUN_METHOD=BENCH_METHOD`: the memory-report row of a run method whose name differs
        /// (e.g. `vqt=vqt-cached`; repeatable).
        #[arg(long = "match")]
        matches: Vec<String>,
    },
    /// Measure methods with vqt-rs and with the PyTorch reference script (torch + timm on the
    /// CPU), interleaved, each in its own process; writes `<out>.json` and `<out>.md` with the
    /// ratios ours / PyTorch and the targets.
    Compare {
        /// Comma-separated vqt-rs methods: linear, full-ft, lora, adaptformer, vpt-deep, vqt
        /// (against PyTorch's official-style and trunk-style VQT), synqt (no PyTorch row).
        #[arg(long, default_value = "linear,full-ft,lora,adaptformer,vpt-deep,vqt,synqt")]
        methods: String,
        /// Python with torch and timm.
        #[arg(long, default_value = "python3")]
        python: String,
        /// The reference script.
        #[arg(long, default_value = "tools/torch_bench.py")]
        script: PathBuf,
        /// The official SynQT `synqt.py` (taolinzhang/SynQT; not committed): with it, synqt is
        /// compared with the official code; without it, synqt has no PyTorch row.
        #[arg(long)]
        synqt_py: Option<PathBuf>,
        /// Rounds: every round measures each method (ours, then PyTorch's), and the report
        /// gives the median of each figure over the rounds and every round's time ratio (this
        /// VM's step times swing by 10-20% between runs; one round can mislead).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
        rounds: u32,
        #[command(flatten)]
        shape: Shape,
        /// Output path prefix.
        #[arg(long, default_value = "bench-compare")]
        out: PathBuf,
    },
    /// The backend's matmul GFLOP/s at the products that dominate a ViT step (the block's
    /// linear layers forward and backward, the attention products), formed as the model forms
    /// them, beside PyTorch's for the same shapes and threads (`--python`; `--no-torch` skips
    /// it); writes `<out>.json` and `<out>.md`.
    Kernels {
        /// Python with torch.
        #[arg(long, default_value = "python3")]
        python: String,
        /// The reference script.
        #[arg(long, default_value = "tools/torch_bench.py")]
        script: PathBuf,
        /// Measure ours only.
        #[arg(long)]
        no_torch: bool,
        /// Timed repetitions of each product.
        #[arg(long, default_value_t = 20)]
        reps: usize,
        #[command(flatten)]
        shape: Shape,
        /// Output path prefix.
        #[arg(long, default_value = "bench-kernels")]
        out: PathBuf,
    },
    /// List the adapters every graphics API sees (nothing is opened).
    Devices,
    /// The one-command GPU check (scripts/gpu-check.sh): adapters, every parity fixture, memory
    /// and speed per method, and a short training on the DINOv2 demo task where its assets are
    /// present, on each backend, each step in a child process with a time limit; writes
    /// `<out>/gpu-check.md` and `.json` and exits 1 if a step failed.
    GpuCheck {
        /// Comma-separated backends (default: CUDA and Vulkan where a GPU exists, and wgpu; the
        /// CPU adapters `vulkan-cpu,wgpu-cpu` where there is no GPU).
        #[arg(long, default_value = "")]
        backends: String,
        /// Folder holding the parity fixtures.
        #[arg(long, default_value = "fixtures")]
        fixtures: PathBuf,
        /// Backbone preset of the memory step.
        #[arg(long, default_value = "vit-b16")]
        preset: String,
        /// Input size of the memory step.
        #[arg(long, default_value_t = 224)]
        img_size: usize,
        /// Batch of the memory step.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Methods of the memory step.
        #[arg(long, default_value = "linear,vqt,vqt-cached,synqt,lora,adaptformer,full-ft")]
        methods: String,
        /// Training config of the short training (skipped, with the reason, if its checkpoint or
        /// data files are missing).
        #[arg(long, default_value = "configs/experiments/fmnist-dinov2s-vqt.toml")]
        train_config: PathBuf,
        /// Epochs of the short training.
        #[arg(long, default_value_t = 2)]
        train_epochs: usize,
        /// Time limit of each step, seconds.
        #[arg(long, default_value_t = 240)]
        limit_s: u64,
        /// Report folder.
        #[arg(long, default_value = "gpu-report")]
        out: PathBuf,
    },
    /// Measure one method in this process and print one JSON line (used by `memory`).
    Step {
        /// The method (a name of the registry's presets, as in `memory --methods`).
        #[arg(long)]
        method: PresetOn,
        /// A/B switch for the `cpu` backend: `burn` runs Burn's own GELU (one thread, scalar
        /// erf) instead of vqt-models' threaded, vectorised one.
        #[arg(long, value_parser = ["ours", "burn"], default_value = "ours")]
        flex_gelu: String,
        /// A/B switch for the `cpu` backend: `burn` runs attention through Burn's ops (its fused
        /// `attention` without autodiff; matmul, softmax and matmul with it) instead of
        /// vqt-models' per-head extension with its own backward.
        #[arg(long, value_parser = ["ours", "burn"], default_value = "ours")]
        flex_attention: String,
        /// A/B switch for the `cpu` backend: `burn` runs every linear layer through Burn's
        /// `linear` (a matmul into a zeroed output, then a bias add) instead of vqt-models'
        /// bias-initialised single gemm with its own backward.
        #[arg(long, value_parser = ["ours", "burn"], default_value = "ours")]
        flex_linear: String,
        /// A/B switch for the `cpu` backend: `burn` runs AdamW as Burn's composed tensor ops
        /// instead of vqt-models' fused, threaded pass (the same values, bit for bit).
        #[arg(long, value_parser = ["ours", "burn"], default_value = "ours")]
        flex_adamw: String,
        /// A/B switch for the `cpu` backend: `gemm` runs each large product of vqt-models' linear
        /// layers on gemm's own rayon parallelism (as Flex's matmul does) instead of one
        /// single-threaded gemm call per thread on its own block of output rows or columns.
        #[arg(long, value_parser = ["split", "gemm"], default_value = "split")]
        flex_gemm: String,
        /// A/B switch for the `cpu` backend: `burn` runs LayerNorm through the module's own
        /// forward (under autodiff Burn's composed element-wise ops) instead of vqt-models'
        /// row-parallel extension with its own backward.
        #[arg(long, value_parser = ["ours", "burn"], default_value = "ours")]
        flex_layer_norm: String,
        /// A/B switch for the `cpu` backend: `split` copies each block's fused qkv output apart
        /// into q, k and v (timm's split) before attention, instead of attention reading the
        /// heads in place with one gradient for the fused output.
        #[arg(long, value_parser = ["packed", "split"], default_value = "packed")]
        flex_qkv: String,
        /// A/B switch for `vqt-cached` on the `cpu` backend: `gather` copies each batch's keys and
        /// values out of the feature cache into batch tensors, instead of the query side's
        /// attention reading them in place.
        #[arg(long, value_parser = ["in-place", "gather"], default_value = "in-place")]
        cache_read: String,
        #[command(flatten)]
        shape: Shape,
    },
}

/// Backbone, input and step counts of a measurement.
#[derive(clap::Args, Clone, Debug)]
struct Shape {
    /// Backbone preset (vit-ti16, vit-s16, vit-b16, vit-l16, vit-h14, vit-s14-dinov2).
    #[arg(long, default_value = "vit-s14-dinov2")]
    preset: String,
    /// Input size in pixels (position table sized for it).
    #[arg(long, default_value_t = 112)]
    img_size: usize,
    /// Batch size.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Classes of the head.
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Warm-up steps (not timed).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Backend: cpu, ndarray, wgpu, wgpu-cpu, vulkan, vulkan-cpu, cuda.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Device index (GPU backends).
    #[arg(long)]
    device: Option<usize>,
    /// Storage of the `vqt-cached` feature cache: f32 or f16.
    #[arg(long, default_value = "f32")]
    cache_dtype: String,
}

impl Shape {
    fn options(&self) -> Result<vqt_bench::bench::StepOptions> {
        let preset = vqt_models::VitPreset::from_name(&self.preset).map_err(anyhow::Error::msg)?;
        let vit = preset.config().with_img_size(self.img_size);
        vit.validate().map_err(anyhow::Error::msg)?;
        anyhow::ensure!(self.batch > 0 && self.steps > 0, "--batch and --steps must be positive");
        let cache_dtype = match self.cache_dtype.as_str() {
            "f32" => vqt_models::cache::CacheDtype::F32,
            "f16" => vqt_models::cache::CacheDtype::F16,
            other => anyhow::bail!("--cache-dtype `{other}`: expected f32 or f16"),
        };
        Ok(vqt_bench::bench::StepOptions {
            cache_dtype,
            vit,
            backbone: self.preset.clone(),
            batch: self.batch,
            classes: self.classes,
            warmup: self.warmup,
            steps: self.steps,
            backend: self.backend.clone(),
        })
    }

    fn args(&self) -> Vec<String> {
        let mut a = vec![
            "--preset".into(), self.preset.clone(),
            "--img-size".into(), self.img_size.to_string(),
            "--batch".into(), self.batch.to_string(),
            "--classes".into(), self.classes.to_string(),
            "--warmup".into(), self.warmup.to_string(),
            "--steps".into(), self.steps.to_string(),
            "--backend".into(), self.backend.clone(),
            "--cache-dtype".into(), self.cache_dtype.clone(),
        ];
        if let Some(d) = self.device {
            a.extend(["--device".into(), d.to_string()]);
        }
        a
    }
}

fn write_atomic(path: &std::path::Path, text: &str) -> Result<()> {
    vqt_core::fs::write_atomic(path, text.as_bytes()).with_context(|| path.display().to_string())
}

/// The comma-separated `--methods`, each parsed by the method registry before anything runs.
fn method_list(methods: &str) -> Result<Vec<PresetOn>> {
    vqt_models::registry::parse_presets(methods).map_err(|e| anyhow::anyhow!("--methods: {e}"))
}

/// One method measured by `vqt-bench step` in a child process (so peaks never mix).
fn step_in_child(method: &PresetOn, shape: &Shape) -> Result<vqt_bench::bench::StepReport> {
    let child = std::process::Command::new(std::env::current_exe()?).args(["step", "--method", &method.name()]).args(shape.args()).output()?;
    anyhow::ensure!(child.status.success(), "{method}: child failed: {}", String::from_utf8_lossy(&child.stderr).lines().last().unwrap_or("no output"));
    serde_json::from_str(String::from_utf8_lossy(&child.stdout).trim()).with_context(|| format!("{method}: bad child output"))
}

/// Runs the PyTorch reference `script` with `args` and parses the last line it prints as JSON;
/// a failure is one line naming the script, `what` it was asked and its last error line.
fn run_reference<T: serde::de::DeserializeOwned>(python: &str, script: &std::path::Path, args: &[std::ffi::OsString], what: &str) -> Result<T> {
    let child = std::process::Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .with_context(|| format!("{python}: cannot run the PyTorch reference"))?;
    anyhow::ensure!(
        child.status.success(),
        "{} {what}: {}",
        script.display(),
        String::from_utf8_lossy(&child.stderr).lines().last().unwrap_or("no output")
    );
    let out = String::from_utf8_lossy(&child.stdout);
    serde_json::from_str(out.trim().lines().last().unwrap_or("")).with_context(|| format!("{} {what}: bad output", script.display()))
}

/// The threads both sides of a comparison use: `RAYON_NUM_THREADS`, else every core.
fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

fn main() {
    vqt_core::mem::tune_allocator();
    vqt_core::process::exit_on_runtime_deadlock();
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
                write_atomic(&path, &serde_json::to_string_pretty(&reports)?)?;
            }
            let failed = reports.iter().filter(|r| !r.passed()).count();
            if failed > 0 {
                eprintln!("parity FAILED for {failed} of {} fixture(s) on {backend}", reports.len());
                std::process::exit(1);
            }
            println!("parity passed for {} fixture(s) on {backend}", reports.len());
            Ok(())
        }
        Command::Kernels { python, script, no_torch, reps, shape, out } => {
            let opts = shape.options()?;
            anyhow::ensure!(reps > 0, "--reps must be positive");
            let threads = rayon_threads();
            let shapes = vqt_bench::kernels::vit_shapes(&opts.vit, opts.batch);
            let torch = if no_torch {
                None
            } else {
                anyhow::ensure!(script.is_file(), "{}: the PyTorch reference script is missing (or pass --no-torch)", script.display());
                let spec = serde_json::to_string(&shapes)?;
                let args = ["--kernels", &spec, "--reps", &reps.to_string(), "--threads", &threads.to_string()].map(std::ffi::OsString::from);
                let (framework, results): (String, Vec<vqt_bench::kernels::KernelResult>) = run_reference(&python, &script, &args, "--kernels")?;
                anyhow::ensure!(results.len() == shapes.len(), "{} --kernels: {} results for {} shapes", script.display(), results.len(), shapes.len());
                Some((framework, results))
            };
            let device = make_device(shape.backend.parse()?, shape.device)?;
            let mut rows = Vec::new();
            for (i, s) in shapes.iter().enumerate() {
                let ours = vqt_bench::kernels::measure(s, reps, &device).map_err(anyhow::Error::msg)?;
                rows.push(vqt_bench::kernels::KernelRow { ours, torch: torch.as_ref().map(|(_, t)| t[i].clone()) });
            }
            let meta = vqt_bench::kernels::KernelsMeta {
                backbone: shape.preset.clone(),
                img_size: opts.vit.img_size,
                batch: opts.batch,
                backend: shape.backend.clone(),
                threads,
                torch: torch.map(|(f, _)| f),
                cpu: vqt_bench::kernels::cpu_description(),
            };
            let profile = vqt_bench::kernels::block_profile(&opts.vit, opts.batch, reps, &device).map_err(anyhow::Error::msg)?;
            let train_attention = vqt_bench::kernels::train_attention(&opts.vit, opts.batch, reps, &device).map_err(anyhow::Error::msg)?;
            let train_layer_norm = vqt_bench::kernels::train_layer_norm(&opts.vit, opts.batch, reps, &device).map_err(anyhow::Error::msg)?;
            let train_linear = vqt_bench::kernels::train_linear(&opts.vit, opts.batch, reps, &device).map_err(anyhow::Error::msg)?;
            let gemm_split = vqt_bench::kernels::gemm_split(&opts.vit, opts.batch, reps, &device).map_err(anyhow::Error::msg)?;
            let train_adamw = vqt_bench::kernels::train_adamw(&opts.vit, reps, &device).map_err(anyhow::Error::msg)?;
            let vit_params = { use burn::module::Module as _; opts.vit.clone().with_num_classes(10).init(&device.clone().without_autodiff()).num_params() };
            let md = vqt_bench::kernels::markdown(&meta, &rows)
                + &vqt_bench::kernels::profile_markdown(&profile)
                + &vqt_bench::kernels::train_attention_markdown(&train_attention)
                + &vqt_bench::kernels::train_ops_markdown(&train_layer_norm, &train_linear)
                + &vqt_bench::kernels::gemm_split_markdown(&gemm_split)
                + &vqt_bench::kernels::train_adamw_markdown(&train_adamw, vit_params);
            write_atomic(
                &out.with_extension("json"),
                &serde_json::to_string_pretty(&serde_json::json!({ "meta": meta, "rows": rows, "block_profile": profile, "train_attention": train_attention, "train_layer_norm": train_layer_norm, "train_linear": train_linear, "gemm_split": gemm_split, "train_adamw": train_adamw }))?,
            )?;
            write_atomic(&out.with_extension("md"), &md)?;
            print!("{md}");
            Ok(())
        }
        Command::Devices => {
            let adapters = vqt_bench::gpu_check::adapters();
            for a in &adapters {
                println!("{:<7} {:<12} {}  [{}]", a.api, a.device_type, a.name, a.driver);
            }
            if adapters.is_empty() {
                println!("no adapter found (install a Vulkan driver, e.g. Debian `mesa-vulkan-drivers` for the CPU)");
            }
            println!("compiled backends: {}", BackendKind::compiled().iter().map(|b| b.name()).collect::<Vec<_>>().join(", "));
            Ok(())
        }
        Command::GpuCheck { backends, fixtures, preset, img_size, batch, methods, train_config, train_epochs, limit_s, out } => {
            let backends = backends
                .split(',')
                .map(str::trim)
                .filter(|b| !b.is_empty())
                .map(|b| b.parse::<BackendKind>())
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(b) = backends.iter().find(|b| !b.is_gpu_runtime()) {
                anyhow::bail!("--backends: `{b}` is not a GPU-runtime backend (wgpu, wgpu-cpu, vulkan, vulkan-cpu, cuda)");
            }
            method_list(&methods)?;
            anyhow::ensure!(limit_s > 0 && train_epochs > 0 && batch > 0, "--limit-s, --train-epochs and --batch must be positive");
            let plan = vqt_bench::gpu_check::Plan {
                backends,
                fixtures,
                preset,
                img_size,
                batch,
                methods,
                train_config,
                train_epochs,
                limit: std::time::Duration::from_secs(limit_s),
                out: out.clone(),
            };
            let report = vqt_bench::gpu_check::run(&plan)?;
            print!("{}", vqt_bench::gpu_check::markdown(&report, &plan));
            println!("report: {}", out.join("gpu-check.md").display());
            if !report.passed() {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Report { runs, out, title, memory, matches } => {
            let paths = vqt_bench::report::find_runs(&runs).map_err(anyhow::Error::msg)?;
            let mut rows = vqt_bench::report::aggregate(&paths).map_err(anyhow::Error::msg)?;
            let axis = match &memory {
                Some(m) => {
                    let text = std::fs::read_to_string(m).with_context(|| m.display().to_string())?;
                    let reports: Vec<vqt_bench::bench::StepReport> = serde_json::from_str(&text).with_context(|| format!("{}: not a vqt-bench memory report", m.display()))?;
                    let missing = vqt_bench::report::attach_step_memory(&mut rows, &reports, &matches).map_err(anyhow::Error::msg)?;
                    if !missing.is_empty() {
                        eprintln!("note: no step memory in {} for {} (not plotted; --match RUN=BENCH names its row)", m.display(), missing.join(", "));
                    }
                    vqt_bench::report::MemoryAxis::Step
                }
                None => {
                    anyhow::ensure!(matches.is_empty(), "--match needs --memory");
                    vqt_bench::report::MemoryAxis::ProcessRss
                }
            };
            let md = vqt_bench::report::markdown(&rows, title.as_deref());
            let plot = vqt_bench::report::svg(&rows, title.as_deref().unwrap_or("accuracy vs memory"), axis).map_err(anyhow::Error::msg)?;
            write_atomic(&out.with_extension("json"), &serde_json::to_string_pretty(&rows)?)?;
            write_atomic(&out.with_extension("svg"), &plot)?;
            write_atomic(&out.with_extension("md"), &md)?;
            print!("{md}");
            Ok(())
        }
        Command::Compare { methods, python, script, synqt_py, rounds, shape, out } => {
            shape.options()?;
            let backend: BackendKind = shape.backend.parse()?;
            anyhow::ensure!(matches!(backend, BackendKind::Cpu | BackendKind::Ndarray), "compare measures CPU memory and time against PyTorch on the CPU: use --backend cpu or ndarray");
            anyhow::ensure!(script.is_file(), "{}: the PyTorch reference script is missing", script.display());
            if let Some(p) = &synqt_py {
                anyhow::ensure!(p.is_file(), "{}: the official SynQT source is missing (--synqt-py)", p.display());
            }
            let threads = rayon_threads();
            let methods = method_list(&methods)?;
            let mut by_round: Vec<Vec<vqt_bench::compare::CompareRow>> = Vec::new();
            for round in 1..=rounds {
                let mut rows = Vec::new();
                for method in &methods {
                    eprintln!("round {round}/{rounds}: measuring {method} (vqt-rs) ...");
                    let ours = step_in_child(method, &shape)?;
                    let counterparts = if method.layers.is_some() { Vec::new() } else { vqt_bench::compare::torch_counterparts(method.preset, synqt_py.is_some()) };
                    if counterparts.is_empty() {
                        rows.push(vqt_bench::compare::CompareRow { ours, torch: None, round_time_ratios: Vec::new() });
                        continue;
                    }
                    for t in counterparts {
                        eprintln!("measuring {t} (PyTorch) ...");
                        let mut args: Vec<std::ffi::OsString> = [
                            "--method", t, "--preset", &shape.preset, "--img-size", &shape.img_size.to_string(), "--batch", &shape.batch.to_string(),
                            "--classes", &shape.classes.to_string(), "--warmup", &shape.warmup.to_string(), "--steps", &shape.steps.to_string(),
                            "--threads", &threads.to_string(),
                        ]
                        .map(std::ffi::OsString::from)
                        .into();
                        args.extend(synqt_py.iter().flat_map(|p| [std::ffi::OsString::from("--synqt-py"), p.clone().into_os_string()]));
                        let torch: vqt_bench::compare::TorchReport = run_reference(&python, &script, &args, &format!("--method {t}"))?;
                        rows.push(vqt_bench::compare::CompareRow { ours: ours.clone(), torch: Some(torch), round_time_ratios: Vec::new() });
                    }
                }
                by_round.push(rows);
            }
            let rows: Vec<vqt_bench::compare::CompareRow> =
                (0..by_round[0].len()).map(|i| vqt_bench::compare::merge_rounds(&by_round.iter().map(|r| r[i].clone()).collect::<Vec<_>>())).collect();
            let cpu = vqt_bench::kernels::cpu_description();
            let md = vqt_bench::compare::markdown(&rows, &cpu);
            let targets = vqt_bench::compare::targets(&rows);
            write_atomic(&out.with_extension("json"), &serde_json::to_string_pretty(&serde_json::json!({ "cpu": cpu, "rows": rows, "targets": targets }))?)?;
            write_atomic(&out.with_extension("md"), &md)?;
            print!("{md}");
            Ok(())
        }
        Command::Step { method, flex_gelu, flex_attention, flex_linear, flex_adamw, flex_gemm, flex_layer_norm, flex_qkv, cache_read, shape } => {
            vqt_models::ops::linear::use_gemm_own_threads(flex_gemm == "gemm");
            vqt_models::cache::use_gathered_batches(cache_read == "gather");
            vqt_models::ops::use_split_qkv(flex_qkv == "split");
            vqt_models::ops::use_burn_flex_layer_norm(flex_layer_norm == "burn");
            vqt_models::ops::use_burn_flex_gelu(flex_gelu == "burn");
            vqt_models::ops::use_burn_flex_attention(flex_attention == "burn");
            vqt_models::ops::use_burn_flex_linear(flex_linear == "burn");
            vqt_models::ops::adamw::use_burn_flex_adamw(flex_adamw == "burn");
            let opts = shape.options()?;
            let device = make_device(shape.backend.parse()?, shape.device)?;
            let r = vqt_bench::bench::measure(&method, &opts, &device).map_err(anyhow::Error::msg)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Command::Memory { methods, shape, out } => {
            shape.options()?; // validate before spawning anything
            let _: BackendKind = shape.backend.parse()?;
            let mut reports = Vec::new();
            for method in method_list(&methods)? {
                eprintln!("measuring {method} ...");
                reports.push(step_in_child(&method, &shape)?);
            }
            let md = vqt_bench::bench::markdown(&reports);
            write_atomic(&out.with_extension("json"), &serde_json::to_string_pretty(&reports)?)?;
            write_atomic(&out.with_extension("md"), &md)?;
            print!("{md}");
            Ok(())
        }
    }
}

