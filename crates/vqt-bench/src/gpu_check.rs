//! `vqt-bench gpu-check`: the one-command check of a machine's GPU backends.
//!
//! Made for a machine with a GPU but no Rust toolchain (see `scripts/gpu-bundle.sh`): it lists the
//! adapters every graphics API sees, then, for each backend asked for (or every one with an
//! adapter), runs in child processes, each within a time limit:
//! 1. every parity fixture (`vqt-bench parity`),
//! 2. `vqt-bench memory` for linear, VQT (uncached and cached), SynQT, LoRA, AdaptFormer and
//!    full fine-tuning, with the device memory pool's peak,
//! 3. a short training on the DINOv2 demo task, when its assets are in the folder,
//!
//! and writes one report, `<out>/gpu-check.md` and `<out>/gpu-check.json`.

use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vqt_core::BackendKind;

/// One adapter a graphics API reports (not opened).
#[derive(Debug, Clone, Serialize)]
pub struct Adapter {
    /// Graphics API (Vulkan, Gl, Metal, Dx12) or `cuda`.
    pub api: String,
    /// The adapter's name.
    pub name: String,
    /// DiscreteGpu, IntegratedGpu, VirtualGpu, Cpu or Other.
    pub device_type: String,
    /// Driver name and version, as reported.
    pub driver: String,
}

/// Every adapter wgpu's native APIs see, without opening any (no driver call can panic here).
pub fn adapters() -> Vec<Adapter> {
    use burn::tensor::wgpu::wgpu;
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::all(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let mut out: Vec<Adapter> = futures_lite::future::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
        .into_iter()
        .map(|a| {
            let i = a.get_info();
            Adapter {
                api: format!("{:?}", i.backend),
                name: i.name,
                device_type: format!("{:?}", i.device_type),
                driver: format!("{} {}", i.driver, i.driver_info).trim().to_string(),
            }
        })
        .collect();
    out.extend(cuda_adapters());
    out
}

#[cfg(feature = "cuda")]
fn cuda_adapters() -> Vec<Adapter> {
    use burn::tensor::{Device, DeviceType};
    (0..Device::enumerate(DeviceType::Cuda).into_vec().len())
        .map(|i| Adapter { api: "cuda".into(), name: format!("CUDA device {i}"), device_type: "DiscreteGpu".into(), driver: String::new() })
        .collect()
}

#[cfg(not(feature = "cuda"))]
fn cuda_adapters() -> Vec<Adapter> {
    Vec::new()
}

/// The backends worth checking on a machine with these adapters: CUDA and Vulkan on a real GPU
/// where one exists, wgpu (automatic API) on a real GPU, and the CPU-adapter variants only where
/// there is no GPU at all (so the check can be tried without one).
pub fn default_backends(adapters: &[Adapter]) -> Vec<BackendKind> {
    let gpu = |a: &&Adapter| a.device_type != "Cpu";
    let has = |api: &str, real: bool| adapters.iter().filter(|a| !real || gpu(a)).any(|a| a.api.eq_ignore_ascii_case(api));
    let mut b = Vec::new();
    if BackendKind::Cuda.is_compiled() && has("cuda", true) {
        b.push(BackendKind::Cuda);
    }
    if has("vulkan", true) {
        b.push(BackendKind::Vulkan);
    }
    if adapters.iter().any(|a| gpu(&a) && a.api != "cuda") {
        b.push(BackendKind::Wgpu);
    }
    if b.is_empty() {
        if has("vulkan", false) {
            b.push(BackendKind::VulkanCpu);
        }
        if !adapters.is_empty() {
            b.push(BackendKind::WgpuCpu);
        }
    }
    b
}

/// What `gpu-check` runs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Backends to check (empty: [`default_backends`]).
    pub backends: Vec<BackendKind>,
    /// Folder of parity fixtures (every subfolder with a manifest.json).
    pub fixtures: PathBuf,
    /// The `vqt-bench memory` shape: preset, image size, batch.
    pub preset: String,
    /// Input size of the memory step.
    pub img_size: usize,
    /// Batch of the memory step.
    pub batch: usize,
    /// Methods of the memory step.
    pub methods: String,
    /// The training config (its assets must exist, else the step is skipped, and says why).
    pub train_config: PathBuf,
    /// Epochs of the short training.
    pub train_epochs: usize,
    /// Limit of each child process.
    pub limit: Duration,
    /// Report folder.
    pub out: PathBuf,
}

/// One step of the check.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    /// Backend.
    pub backend: String,
    /// `parity:<fixture>`, `memory` or `train`.
    pub step: String,
    /// passed, failed, timed-out or skipped.
    pub status: String,
    /// Wall seconds.
    pub seconds: f64,
    /// One-line summary (or the reason it failed or was skipped).
    pub summary: String,
    /// The step's own JSON output, where it wrote one.
    pub details: Option<serde_json::Value>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct GpuReport {
    /// `vqt-bench` version.
    pub version: String,
    /// The host's name and OS.
    pub host: String,
    /// Adapters seen.
    pub adapters: Vec<Adapter>,
    /// Steps, in order.
    pub steps: Vec<StepResult>,
}

impl GpuReport {
    /// True when no step failed or timed out.
    pub fn passed(&self) -> bool {
        self.steps.iter().all(|s| s.status == "passed" || s.status == "skipped")
    }
}

fn sibling(exe: &str) -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let p = me.with_file_name(exe);
    anyhow::ensure!(p.is_file(), "{}: not found beside {}", p.display(), me.display());
    Ok(p)
}

fn read_json(p: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

/// Runs one child within the plan's limit and turns its outcome into a [`StepResult`].
fn step(plan: &Plan, backend: BackendKind, name: &str, cmd: &mut Command, json: Option<&Path>, summarize: impl Fn(&serde_json::Value) -> String) -> StepResult {
    eprintln!("gpu-check: {backend} {name} ...");
    let t = Instant::now();
    let mut r = StepResult { backend: backend.to_string(), step: name.into(), status: String::new(), seconds: 0.0, summary: String::new(), details: None };
    match vqt_core::process::output_within(cmd, plan.limit) {
        Ok(o) => {
            r.details = json.and_then(read_json);
            if o.status.success() {
                r.status = "passed".into();
                r.summary = r.details.as_ref().map(&summarize).unwrap_or_default();
            } else {
                r.status = "failed".into();
                let err = String::from_utf8_lossy(&o.stderr);
                r.summary = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output").trim().to_string();
            }
        }
        Err(e @ vqt_core::process::LimitedError::TimedOut { .. }) => {
            r.status = "timed-out".into();
            r.summary = e.to_string().lines().next().unwrap_or_default().to_string();
        }
        Err(e) => {
            r.status = "failed".into();
            r.summary = e.to_string();
        }
    }
    r.seconds = t.elapsed().as_secs_f64();
    eprintln!("gpu-check: {backend} {name}: {} ({:.0} s) {}", r.status, r.seconds, r.summary);
    r
}

fn skipped(backend: BackendKind, name: &str, why: String) -> StepResult {
    StepResult { backend: backend.to_string(), step: name.into(), status: "skipped".into(), seconds: 0.0, summary: why, details: None }
}

/// The assets a training config names that are missing (checkpoint and data files).
fn missing_assets(config: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(config).with_context(|| config.display().to_string())?;
    let v: toml::Value = toml::from_str(&text).with_context(|| config.display().to_string())?;
    let mut paths = vec![v.get("backbone").and_then(|b| b.get("checkpoint"))];
    for k in ["train_images", "train_labels", "test_images", "test_labels"] {
        paths.push(v.get("data").and_then(|d| d.get(k)));
    }
    Ok(paths.into_iter().flatten().filter_map(|p| p.as_str()).filter(|p| !Path::new(p).is_file()).map(String::from).collect())
}

/// Runs the plan and writes the report; returns it.
pub fn run(plan: &Plan) -> Result<GpuReport> {
    std::fs::create_dir_all(&plan.out).with_context(|| plan.out.display().to_string())?;
    let bench = std::env::current_exe()?;
    let adapters = adapters();
    let backends = if plan.backends.is_empty() { default_backends(&adapters) } else { plan.backends.clone() };
    anyhow::ensure!(!backends.is_empty(), "no graphics adapter found (wgpu sees none): install the GPU's Vulkan driver, or pass --backends");
    let mut fixtures: Vec<PathBuf> = std::fs::read_dir(&plan.fixtures)
        .with_context(|| plan.fixtures.display().to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    fixtures.sort();
    anyhow::ensure!(!fixtures.is_empty(), "{}: no parity fixture (no subfolder with a manifest.json)", plan.fixtures.display());
    let missing = missing_assets(&plan.train_config)?;
    let mut steps = Vec::new();
    for &b in &backends {
        // One child per fixture: a fixture that is slow on this device (e.g. tiny-i on a CPU
        // adapter) times out alone and the others still report.
        for fx in &fixtures {
            let name = fx.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            let json = plan.out.join(format!("parity-{b}-{name}.json"));
            let mut cmd = Command::new(&bench);
            cmd.arg("parity").arg(fx).args(["--backend", b.name(), "--json"]).arg(&json);
            steps.push(step(plan, b, &format!("parity:{name}"), &mut cmd, Some(&json), |v| {
                let r = v.as_array().map(Vec::as_slice).unwrap_or_default();
                let lines: Vec<serde_json::Value> = r.iter().flat_map(|f| f["lines"].as_array().cloned().unwrap_or_default()).collect();
                let worst = lines.iter().filter_map(|l| l["max_abs_diff"].as_f64()).fold(0.0f64, f64::max);
                format!("{} tensors within tolerance, largest |diff| {worst:.2e}", lines.len())
            }));
        }

        let prefix = plan.out.join(format!("memory-{b}"));
        let mut cmd = Command::new(&bench);
        cmd.args(["memory", "--methods", &plan.methods, "--preset", &plan.preset, "--backend", b.name()])
            .args(["--img-size", &plan.img_size.to_string(), "--batch", &plan.batch.to_string(), "--out"])
            .arg(&prefix);
        steps.push(step(plan, b, "memory", &mut cmd, Some(&prefix.with_extension("json")), |v| {
            let rows = v.as_array().map(Vec::as_slice).unwrap_or_default();
            rows.iter()
                .map(|r| {
                    let mib = r["device_peak_bytes"].as_f64().map_or("n/a".into(), |b| format!("{:.0} MiB", b / 1048576.0));
                    format!("{} {:.0} ms {mib}", r["method"].as_str().unwrap_or("?"), r["step_ms_median"].as_f64().unwrap_or(f64::NAN))
                })
                .collect::<Vec<_>>()
                .join("; ")
        }));

        if !missing.is_empty() {
            steps.push(skipped(b, "train", format!("assets missing: {}", missing.join(", "))));
            continue;
        }
        let train = match sibling("vqt-train") {
            Ok(t) => t,
            Err(e) => {
                steps.push(skipped(b, "train", e.to_string()));
                continue;
            }
        };
        let run_dir = plan.out.join(format!("train-{b}"));
        let mut cmd = Command::new(train);
        cmd.args(["train", "--backend", b.name(), "--overwrite", "--config"])
            .arg(&plan.train_config)
            .arg("--out")
            .arg(&run_dir)
            .args(["--set", &format!("train.epochs={}", plan.train_epochs), "--set", "train.warmup_epochs=0"]);
        steps.push(step(plan, b, "train", &mut cmd, Some(&run_dir.join("run.json")), |v| {
            format!(
                "{} on the demo task, {} epochs: test {:.2}% in {:.0} s",
                v["method"].as_str().unwrap_or("?"),
                v["epochs"].as_array().map_or(0, Vec::len),
                v["test_accuracy"].as_f64().unwrap_or(f64::NAN),
                v["wall_seconds"].as_f64().unwrap_or(f64::NAN)
            )
        }));
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
    let report = GpuReport { version: env!("CARGO_PKG_VERSION").into(), host: format!("{host} ({})", std::env::consts::OS), adapters, steps };
    vqt_core::fs::write_atomic(&plan.out.join("gpu-check.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    vqt_core::fs::write_atomic(&plan.out.join("gpu-check.md"), markdown(&report, plan).as_bytes())?;
    Ok(report)
}

/// The report as markdown.
pub fn markdown(r: &GpuReport, plan: &Plan) -> String {
    let mut s = format!("# GPU check\n\nvqt-bench {} on {}. Each step ran in its own process, limit {} s.\n\n", r.version, r.host, plan.limit.as_secs());
    s += "## Adapters\n\n| API | adapter | type | driver |\n|---|---|---|---|\n";
    for a in &r.adapters {
        s += &format!("| {} | {} | {} | {} |\n", a.api, a.name, a.device_type, a.driver);
    }
    if r.adapters.is_empty() {
        s += "| - | none found | | |\n";
    }
    s += &format!(
        "\n## Steps\n\nmemory: {} at {} px, batch {} (device memory pool peak).\n\n| backend | step | status | s | summary |\n|---|---|---|---|---|\n",
        plan.preset, plan.img_size, plan.batch
    );
    for st in &r.steps {
        s += &format!("| {} | {} | {} | {:.0} | {} |\n", st.backend, st.step, st.status, st.seconds, st.summary.replace('|', "/"));
    }
    s += &format!("\nOverall: {}.\n", if r.passed() { "passed" } else { "FAILED" });
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(api: &str, t: &str) -> Adapter {
        Adapter { api: api.into(), name: "x".into(), device_type: t.into(), driver: String::new() }
    }

    #[test]
    fn default_backends_prefer_real_gpus_and_fall_back_to_cpu_adapters() {
        let gpu = [a("Vulkan", "DiscreteGpu"), a("Gl", "DiscreteGpu"), a("Vulkan", "Cpu")];
        assert_eq!(default_backends(&gpu), vec![BackendKind::Vulkan, BackendKind::Wgpu]);
        let cpu = [a("Vulkan", "Cpu"), a("Gl", "Cpu")];
        assert_eq!(default_backends(&cpu), vec![BackendKind::VulkanCpu, BackendKind::WgpuCpu]);
        let gl = [a("Gl", "Cpu")];
        assert_eq!(default_backends(&gl), vec![BackendKind::WgpuCpu]);
        assert!(default_backends(&[]).is_empty());
    }
}
