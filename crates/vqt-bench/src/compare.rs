//! `vqt-bench compare`: the same methods measured by vqt-rs and by the PyTorch reference script
//! (`tools/torch_bench.py`, torch + timm on the CPU), interleaved in one invocation, as a table
//! of ratios ours / PyTorch.

use crate::bench::StepReport;
use serde::{Deserialize, Serialize};

/// What the PyTorch script prints for one method.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TorchReport {
    /// Its method name (`vqt-official`, `vqt-trunk`, or the same name as ours).
    pub method: String,
    /// torch / timm versions and threads.
    pub framework: String,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// All parameters.
    pub total_params: usize,
    /// Median training-step time (ms).
    pub step_ms_median: f64,
    /// Images per second.
    pub train_images_per_s: f64,
    /// Peak RSS minus the RSS before the first step (bytes).
    pub rss_train_bytes: u64,
}

/// The PyTorch methods that a vqt-rs method is compared with. VQT has two: the official code's
/// form (queries concatenated with the tokens: the target) and the trunk form. SynQT has the
/// official SynQT code when its source file is at hand (`official_synqt`).
pub fn torch_counterparts(method: &str, official_synqt: bool) -> Vec<&'static str> {
    match method {
        "synqt" if official_synqt => vec!["synqt"],
        "linear" => vec!["linear"],
        "full-ft" => vec!["full-ft"],
        "lora" => vec!["lora"],
        "adaptformer" => vec!["adaptformer"],
        "vpt-deep" => vec!["vpt-deep"],
        "vqt" => vec!["vqt-official", "vqt-trunk"],
        _ => vec![],
    }
}

/// One comparison row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareRow {
    /// Our measurement.
    pub ours: StepReport,
    /// PyTorch's, if the method has a counterpart.
    pub torch: Option<TorchReport>,
}

impl CompareRow {
    /// Our step time over PyTorch's.
    pub fn time_ratio(&self) -> Option<f64> {
        self.torch.as_ref().map(|t| self.ours.step_ms_median / t.step_ms_median)
    }

    /// Our training memory over PyTorch's.
    pub fn memory_ratio(&self) -> Option<f64> {
        let t = self.torch.as_ref()?;
        let ours = self.ours.rss_train_bytes? as f64;
        (t.rss_train_bytes > 0).then(|| ours / t.rss_train_bytes as f64)
    }
}

fn mib(b: Option<u64>) -> String {
    b.map(|b| format!("{:.0}", b as f64 / 1048576.0)).unwrap_or_else(|| "–".into())
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "–".into())
}

/// The markdown table, with the targets of the issue stated beside the VQT rows.
pub fn markdown(rows: &[CompareRow]) -> String {
    let mut s = String::new();
    if let (Some(r), Some(t)) = (rows.first(), rows.iter().find_map(|r| r.torch.as_ref())) {
        s += &format!(
            "Backbone {} at {}px, batch {}; vqt-rs backend `{}` vs {}; random weights; each measurement in its own process, \
             ours then PyTorch's per method; median step (forward, backward, optimizer) after warm-up; memory = peak RSS \
             minus RSS before the first step.\n\n",
            r.ours.backbone, r.ours.img_size, r.ours.batch, r.ours.backend, t.framework
        );
    }
    s += "| method (ours) | PyTorch method | step ms ours | step ms PyTorch | time ours/PyTorch | train MiB ours | train MiB PyTorch | memory ours/PyTorch | trainable ours / PyTorch |\n";
    s += "|---|---|---:|---:|---:|---:|---:|---:|---|\n";
    for r in rows {
        let (tname, tms, tmem, tparams) = match &r.torch {
            Some(t) => (t.method.clone(), format!("{:.1}", t.step_ms_median), mib(Some(t.rss_train_bytes)), t.trainable_params.to_string()),
            None => ("(none)".into(), "–".into(), "–".into(), "–".into()),
        };
        s += &format!(
            "| {} | {} | {:.1} | {} | {} | {} | {} | {} | {} / {} |\n",
            r.ours.method,
            tname,
            r.ours.step_ms_median,
            tms,
            opt(r.time_ratio(), 2),
            mib(r.ours.rss_train_bytes),
            tmem,
            opt(r.memory_ratio(), 2),
            r.ours.trainable_params,
            tparams
        );
    }
    if let Some(v) = rows.iter().find(|r| r.ours.method == "vqt" && r.torch.as_ref().is_some_and(|t| t.method == "vqt-official")) {
        let met = |x: Option<f64>, target: f64| match x {
            Some(x) if x <= target => format!("{x:.2} (met)"),
            Some(x) => format!("{x:.2} (NOT met)"),
            None => "–".into(),
        };
        s += &format!(
            "\nTargets: VQT step time ≤ 0.5× PyTorch's official-style VQT: {}; peak training memory ≤ 0.3×: {}.\n",
            met(v.time_ratio(), 0.5),
            met(v.memory_ratio(), 0.3)
        );
    }
    if let Some(f) = rows.iter().find(|r| r.ours.method == "full-ft") {
        let x = f.time_ratio();
        s += &format!(
            "Full fine-tuning step time ≤ 1.2× PyTorch's: {}.\n",
            match x {
                Some(x) if x <= 1.2 => format!("{x:.2} (met)"),
                Some(x) => format!("{x:.2} (NOT met)"),
                None => "–".into(),
            }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(method: &str, ms: f64, mem: u64) -> StepReport {
        serde_json::from_value(serde_json::json!({
            "method": method, "backend": "cpu", "backbone": "vit-s14-dinov2", "img_size": 112, "batch": 32,
            "trainable_params": 10, "total_params": 100, "step_ms_median": ms, "train_images_per_s": 1.0,
            "rss_baseline_bytes": 0, "rss_peak_bytes": mem, "rss_train_bytes": mem, "device_peak_bytes": null,
            "cache_build_ms": null, "cache_100_epochs_over_inference": null, "cache_dtype": null, "cache_images": null,
            "cache_bytes": null, "load_avg": null
        }))
        .unwrap()
    }

    fn torch(method: &str, ms: f64, mem: u64) -> TorchReport {
        TorchReport { method: method.into(), framework: "torch x".into(), trainable_params: 10, total_params: 100, step_ms_median: ms, train_images_per_s: 1.0, rss_train_bytes: mem }
    }

    #[test]
    fn ratios_and_targets_are_reported_honestly() {
        let rows = vec![
            CompareRow { ours: ours("vqt", 40.0, 100 << 20), torch: Some(torch("vqt-official", 100.0, 200 << 20)) },
            CompareRow { ours: ours("vqt", 40.0, 100 << 20), torch: Some(torch("vqt-trunk", 50.0, 100 << 20)) },
            CompareRow { ours: ours("full-ft", 130.0, 1 << 30), torch: Some(torch("full-ft", 100.0, 1 << 30)) },
            CompareRow { ours: ours("synqt", 10.0, 1 << 20), torch: None },
        ];
        assert_eq!(rows[0].time_ratio(), Some(0.4));
        assert_eq!(rows[0].memory_ratio(), Some(0.5));
        let md = markdown(&rows);
        assert!(md.contains("≤ 0.5× PyTorch's official-style VQT: 0.40 (met)"), "{md}");
        assert!(md.contains("≤ 0.3×: 0.50 (NOT met)"), "{md}");
        assert!(md.contains("Full fine-tuning step time ≤ 1.2× PyTorch's: 1.30 (NOT met)"), "{md}");
        assert!(md.contains("| synqt | (none) |"), "{md}");
        assert_eq!(torch_counterparts("vqt", false), ["vqt-official", "vqt-trunk"]);
        assert!(torch_counterparts("synqt", false).is_empty());
        assert_eq!(torch_counterparts("synqt", true), ["synqt"]);
    }
}
