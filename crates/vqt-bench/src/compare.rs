//! `vqt-bench compare`: the same methods measured by vqt-rs and by the PyTorch reference script
//! (`tools/torch_bench.py`, torch + timm on the CPU), interleaved in one invocation, as a table
//! of ratios ours / PyTorch.

use crate::bench::{median, Phases, StepReport};
use serde::{Deserialize, Serialize};
use vqt_models::Preset;

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
    /// Median inference time of one batch (ms; eval mode, no autograd).
    #[serde(default)]
    pub infer_ms_median: Option<f64>,
    /// Inference images per second at that median.
    #[serde(default)]
    pub infer_images_per_s: Option<f64>,
    /// Where its step's time went, phase by phase (forward to the loss, `zero_grad` and
    /// `backward`, `optimizer.step`; medians; absent in older reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phases: Option<Phases>,
}

/// The PyTorch methods that a vqt-rs method is compared with. VQT has two: the official code's
/// form (queries concatenated with the tokens: the target) and the trunk form. SynQT has the
/// official SynQT code when its source file is at hand (`official_synqt`).
pub fn torch_counterparts(method: Preset, official_synqt: bool) -> Vec<&'static str> {
    match method {
        Preset::Synqt if official_synqt => vec!["synqt"],
        Preset::Linear | Preset::FullFt | Preset::Lora | Preset::Adaptformer | Preset::VptDeep => vec![method.name()],
        Preset::Vqt => vec!["vqt-official", "vqt-trunk"],
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
    /// With several rounds (`compare --rounds N`): the step-time ratio ours / PyTorch of each
    /// round, in order (the row's figures are the medians over the rounds).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub round_time_ratios: Vec<f64>,
}

fn median_opt(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Option<Vec<f64>> = v.collect();
    v.filter(|v| !v.is_empty()).map(median)
}

/// Each phase's median over the rounds (`None` unless every round has phases).
fn merge_phases(v: impl Iterator<Item = Option<Phases>>) -> Option<Phases> {
    let v: Option<Vec<Phases>> = v.collect();
    Phases::median_over(&v?)
}

/// One row from the same method's measurements in several rounds: each figure (step time,
/// images/s, memory, ours and PyTorch's alike) is the median over the rounds, the ratios are
/// taken between those medians, and every round's time ratio is kept. Panics on no rounds.
pub fn merge_rounds(rounds: &[CompareRow]) -> CompareRow {
    let first = rounds.first().expect("at least one round").clone();
    if rounds.len() == 1 {
        return first;
    }
    let mut ours = first.ours.clone();
    ours.step_ms_median = median(rounds.iter().map(|r| r.ours.step_ms_median).collect());
    ours.train_images_per_s = ours.batch as f64 * 1000.0 / ours.step_ms_median;
    ours.infer_ms_median = median_opt(rounds.iter().map(|r| r.ours.infer_ms_median));
    ours.infer_images_per_s = median_opt(rounds.iter().map(|r| r.ours.infer_images_per_s));
    ours.rss_train_bytes = median_opt(rounds.iter().map(|r| r.ours.rss_train_bytes.map(|b| b as f64))).map(|b| b.round() as u64);
    ours.phases = merge_phases(rounds.iter().map(|r| r.ours.phases));
    let torch = first.torch.as_ref().map(|t0| {
        let ts: Vec<&TorchReport> = rounds.iter().filter_map(|r| r.torch.as_ref()).collect();
        let mut t = t0.clone();
        t.step_ms_median = median(ts.iter().map(|t| t.step_ms_median).collect());
        t.train_images_per_s = median(ts.iter().map(|t| t.train_images_per_s).collect());
        t.infer_ms_median = median_opt(ts.iter().map(|t| t.infer_ms_median));
        t.infer_images_per_s = median_opt(ts.iter().map(|t| t.infer_images_per_s));
        t.rss_train_bytes = median(ts.iter().map(|t| t.rss_train_bytes as f64).collect()).round() as u64;
        t.phases = merge_phases(ts.iter().map(|t| t.phases));
        t
    });
    let round_time_ratios = rounds.iter().filter_map(|r| r.time_ratio()).collect();
    CompareRow { ours, torch, round_time_ratios }
}

impl CompareRow {
    /// Our step time over PyTorch's.
    pub fn time_ratio(&self) -> Option<f64> {
        self.torch.as_ref().map(|t| self.ours.step_ms_median / t.step_ms_median)
    }

    /// Our inference throughput over PyTorch's (above 1: ours is faster).
    pub fn infer_speed_ratio(&self) -> Option<f64> {
        let t = self.torch.as_ref()?.infer_images_per_s?;
        Some(self.ours.infer_images_per_s? / t)
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

/// One target of the speed issue, checked against a measured ratio.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    /// What is compared, e.g. `vqt / vqt-official step time`.
    pub what: String,
    /// The measured ratio.
    pub ratio: f64,
    /// `<=` or `>=`.
    pub relation: String,
    /// The bound.
    pub bound: f64,
    /// Whether the ratio is within the bound.
    pub met: bool,
}

fn target(what: String, ratio: f64, at_most: bool, bound: f64) -> Target {
    let met = if at_most { ratio <= bound } else { ratio >= bound };
    Target { what, ratio, relation: if at_most { "≤" } else { "≥" }.into(), bound, met }
}

/// The targets: every step at most PyTorch's (VQT at most half the official-style form's and at
/// most the trunk-style form's), inference at least PyTorch's throughput, and VQT's training
/// memory no worse than the 0.18x of official-style VQT measured before the speed work.
pub fn targets(rows: &[CompareRow]) -> Vec<Target> {
    let mut v = Vec::new();
    for r in rows {
        let Some(t) = &r.torch else { continue };
        let pair = format!("{} / {}", r.ours.method, t.method);
        let step_bound = if t.method == "vqt-official" { 0.5 } else { 1.0 };
        if let Some(x) = r.time_ratio() {
            v.push(target(format!("{pair} step time"), x, true, step_bound));
        }
        if t.method == "vqt-official" {
            if let Some(x) = r.memory_ratio() {
                v.push(target(format!("{pair} training memory"), x, true, 0.18));
            }
        }
        // One inference row per vqt-rs method (both VQT rows infer the same way in PyTorch).
        if t.method != "vqt-trunk" {
            if let Some(x) = r.infer_speed_ratio() {
                v.push(target(format!("{pair} inference images/s"), x, false, 1.0));
            }
        }
    }
    v
}

/// Where each step's time goes, ours beside PyTorch's, phase by phase (only rows where both
/// sides report phases; empty if none do).
fn phase_table(rows: &[CompareRow]) -> String {
    let both: Vec<(&CompareRow, Phases, Phases)> =
        rows.iter().filter_map(|r| Some((r, r.ours.phases?, r.torch.as_ref()?.phases?))).collect();
    if both.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "\nWhere the step's time goes (median ms per phase: forward to the loss, backward to the gradients, optimizer update; \
         ours / PyTorch and their ratio):\n\n| method (ours) | PyTorch method | forward ms ours / PyTorch | ratio | backward ms | ratio | optimizer ms | ratio |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let cell = |a: f64, b: f64| format!("{a:.1} / {b:.1} | {:.2}", a / b);
    for (r, o, t) in both {
        s += &format!(
            "| {} | {} | {} | {} | {} |\n",
            r.ours.method,
            r.torch.as_ref().map(|t| t.method.as_str()).unwrap_or("–"),
            cell(o.forward_ms, t.forward_ms),
            cell(o.backward_ms, t.backward_ms),
            cell(o.optimizer_ms, t.optimizer_ms)
        );
    }
    s
}

/// The markdown table, with the targets checked below it.
pub fn markdown(rows: &[CompareRow], cpu: &str) -> String {
    let mut s = String::new();
    if let (Some(r), Some(t)) = (rows.first(), rows.iter().find_map(|r| r.torch.as_ref())) {
        s += &format!(
            "Backbone {} at {}px, batch {}; vqt-rs backend `{}` vs {}; CPU: {cpu}; random weights; each measurement in its own process, \
             ours then PyTorch's per method; median step (forward, backward, optimizer) after warm-up; inference = the trained model \
             in eval mode without autograd, median per batch; memory = peak RSS minus RSS before the first step.\n\n",
            r.ours.backbone, r.ours.img_size, r.ours.batch, r.ours.backend, t.framework
        );
    }
    s += "| method (ours) | PyTorch method | step ms ours | step ms PyTorch | time ours/PyTorch | infer img/s ours | infer img/s PyTorch | infer speed ours/PyTorch | train MiB ours | train MiB PyTorch | memory ours/PyTorch | trainable ours / PyTorch |\n";
    s += "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n";
    for r in rows {
        let t = r.torch.as_ref();
        s += &format!(
            "| {} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |\n",
            r.ours.method,
            t.map(|t| t.method.clone()).unwrap_or_else(|| "(none)".into()),
            r.ours.step_ms_median,
            opt(t.map(|t| t.step_ms_median), 1),
            opt(r.time_ratio(), 2),
            opt(r.ours.infer_images_per_s, 1),
            opt(t.and_then(|t| t.infer_images_per_s), 1),
            opt(r.infer_speed_ratio(), 2),
            mib(r.ours.rss_train_bytes),
            mib(t.map(|t| t.rss_train_bytes)),
            opt(r.memory_ratio(), 2),
            r.ours.trainable_params,
            t.map(|t| t.trainable_params.to_string()).unwrap_or_else(|| "–".into())
        );
    }
    let spread: Vec<String> = rows
        .iter()
        .filter(|r| r.round_time_ratios.len() > 1)
        .map(|r| {
            let t = r.torch.as_ref().map(|t| t.method.as_str()).unwrap_or("–");
            let each: Vec<String> = r.round_time_ratios.iter().map(|x| format!("{x:.2}")).collect();
            format!("{} / {}: {}", r.ours.method, t, each.join(", "))
        })
        .collect();
    if !spread.is_empty() {
        s += &format!(
            "\nEach figure is the median over {} rounds (every round measures each method, ours then PyTorch's, in its own processes); \
             the step-time ratio of each round, in order: {}.\n",
            rows.iter().map(|r| r.round_time_ratios.len()).max().unwrap_or(0),
            spread.join("; ")
        );
    }
    s += &phase_table(rows);
    let ts = targets(rows);
    if !ts.is_empty() {
        s += &format!("\nTargets ({} of {} met):\n\n| ratio | measured | target | met |\n|---|---:|---:|---|\n", ts.iter().filter(|t| t.met).count(), ts.len());
        for t in &ts {
            s += &format!("| {} | {:.2} | {} {:.2} | {} |\n", t.what, t.ratio, t.relation, t.bound, if t.met { "yes" } else { "**no**" });
        }
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
            "cache_bytes": null, "load_avg": null, "infer_ms_median": 40.0, "infer_images_per_s": 800.0
        }))
        .unwrap()
    }

    fn torch(method: &str, ms: f64, mem: u64) -> TorchReport {
        TorchReport {
            method: method.into(),
            framework: "torch x".into(),
            trainable_params: 10,
            total_params: 100,
            step_ms_median: ms,
            train_images_per_s: 1.0,
            rss_train_bytes: mem,
            infer_ms_median: Some(100.0),
            infer_images_per_s: Some(320.0),
            phases: None,
        }
    }

    #[test]
    fn ratios_and_targets_are_reported_honestly() {
        let rows = vec![
            CompareRow { ours: ours("vqt", 40.0, 100 << 20), torch: Some(torch("vqt-official", 100.0, 200 << 20)), round_time_ratios: Vec::new() },
            CompareRow { ours: ours("vqt", 40.0, 100 << 20), torch: Some(torch("vqt-trunk", 50.0, 100 << 20)), round_time_ratios: Vec::new() },
            CompareRow { ours: ours("full-ft", 130.0, 1 << 30), torch: Some(torch("full-ft", 100.0, 1 << 30)), round_time_ratios: Vec::new() },
            CompareRow { ours: ours("synqt", 10.0, 1 << 20), torch: None, round_time_ratios: Vec::new() },
        ];
        assert_eq!(rows[0].time_ratio(), Some(0.4));
        assert_eq!(rows[0].memory_ratio(), Some(0.5));
        let md = markdown(&rows, "test cpu");
        let ts = targets(&rows);
        let get = |w: &str| ts.iter().find(|t| t.what == w).unwrap_or_else(|| panic!("no target `{w}` in {ts:?}"));
        assert!(get("vqt / vqt-official step time").met && get("vqt / vqt-official step time").bound == 0.5);
        assert!(!get("vqt / vqt-official training memory").met, "0.5 > 0.18");
        assert!(get("vqt / vqt-trunk step time").met, "0.8 <= 1");
        assert!(!get("full-ft / full-ft step time").met, "1.3 > 1");
        // ours 800 img/s (40 ms per 32) vs PyTorch's 320: met; one inference row per method.
        assert!(get("vqt / vqt-official inference images/s").met);
        assert!(ts.iter().all(|t| t.what != "vqt / vqt-trunk inference images/s"));
        assert!(md.contains("| full-ft / full-ft step time | 1.30 | ≤ 1.00 | **no** |"), "{md}");
        assert!(md.contains("| synqt | (none) |"), "{md}");
        assert!(md.contains("CPU: test cpu"), "{md}");
        assert_eq!(torch_counterparts(Preset::Vqt, false), ["vqt-official", "vqt-trunk"]);
        assert!(torch_counterparts(Preset::Synqt, false).is_empty());
        assert_eq!(torch_counterparts(Preset::Synqt, true), ["synqt"]);
        assert_eq!(torch_counterparts(Preset::VptDeep, false), ["vpt-deep"]);
        assert!(torch_counterparts(Preset::VqtCached, true).is_empty());
    }

    #[test]
    fn rounds_merge_into_medians_and_keep_each_rounds_ratio() {
        let row = |ms: f64, mem: u64, torch_ms: f64| CompareRow { ours: ours("lora", ms, mem), torch: Some(torch("lora", torch_ms, 2 << 20)), round_time_ratios: Vec::new() };
        // An outlier round (ours 300 ms) does not move the medians: 100 ms ours, 125 ms PyTorch.
        let merged = merge_rounds(&[row(100.0, 3 << 20, 125.0), row(300.0, 1 << 20, 100.0), row(90.0, 2 << 20, 200.0)]);
        assert_eq!(merged.ours.step_ms_median, 100.0);
        assert_eq!(merged.torch.as_ref().unwrap().step_ms_median, 125.0);
        assert_eq!(merged.time_ratio(), Some(0.8));
        assert_eq!(merged.ours.rss_train_bytes, Some(2 << 20));
        assert_eq!(merged.ours.train_images_per_s, 320.0);
        assert_eq!(merged.round_time_ratios, vec![0.8, 3.0, 0.45]);
        let md = markdown(&[merged.clone()], "cpu");
        assert!(md.contains("median over 3 rounds") && md.contains("lora / lora: 0.80, 3.00, 0.45"), "{md}");
        // An even count takes the mean of the middle two; one round is the row itself.
        let two = merge_rounds(&[row(100.0, 1 << 20, 100.0), row(200.0, 1 << 20, 100.0)]);
        assert_eq!(two.ours.step_ms_median, 150.0);
        let one = merge_rounds(&[row(100.0, 1 << 20, 100.0)]);
        assert!(one.round_time_ratios.is_empty() && !markdown(&[one], "cpu").contains("rounds"));
    }

    #[test]
    fn phases_merge_per_phase_and_are_tabled_beside_pytorchs() {
        let ph = |f: f64, b: f64, o: f64| Some(Phases { forward_ms: f, backward_ms: b, optimizer_ms: o, cache_gather_ms: None });
        let row = |o: Option<Phases>, t: Option<Phases>| {
            let mut ours = ours("lora", 100.0, 1 << 20);
            ours.phases = o;
            let mut torch = torch("lora", 100.0, 1 << 20);
            torch.phases = t;
            CompareRow { ours, torch: Some(torch), round_time_ratios: Vec::new() }
        };
        // Each phase's median is taken on its own: not the phases of the median step.
        let merged = merge_rounds(&[
            row(ph(10.0, 90.0, 5.0), ph(20.0, 40.0, 1.0)),
            row(ph(30.0, 60.0, 1.0), ph(10.0, 50.0, 2.0)),
            row(ph(20.0, 80.0, 3.0), ph(30.0, 60.0, 4.0)),
        ]);
        assert_eq!(merged.ours.phases, ph(20.0, 80.0, 3.0));
        assert_eq!(merged.torch.as_ref().unwrap().phases, ph(20.0, 50.0, 2.0));
        let md = markdown(&[merged], "cpu");
        assert!(md.contains("| lora | lora | 20.0 / 20.0 | 1.00 | 80.0 / 50.0 | 1.60 | 3.0 / 2.0 | 1.50 |"), "{md}");
        // A round without phases (an older report) drops them rather than mixing rounds.
        let partial = merge_rounds(&[row(ph(10.0, 90.0, 5.0), ph(1.0, 1.0, 1.0)), row(None, ph(1.0, 1.0, 1.0))]);
        assert_eq!(partial.ours.phases, None);
        // No phases on one side: no phase table.
        assert!(!markdown(&[row(ph(1.0, 1.0, 1.0), None)], "cpu").contains("Where the step's time goes"));
        // A report without the field (written before it) still reads.
        let old: TorchReport = serde_json::from_str(
            r#"{"method":"lora","framework":"t","trainable_params":1,"total_params":2,"step_ms_median":1.0,"train_images_per_s":1.0,"rss_train_bytes":0}"#,
        )
        .unwrap();
        assert_eq!(old.phases, None);
    }
}
