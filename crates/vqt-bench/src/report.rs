//! `vqt-bench report`: run records (`run.json` of `vqt-train train`) aggregated per method over
//! seeds into a markdown table and JSON: test accuracy mean ± std (last epoch, scored once),
//! validation accuracy, trainable parameters, process peak memory, the feature cache's size and
//! wall time; plus an SVG plot (plotters) of test accuracy against memory, one point per method.
//! The plotted memory is labelled: process peak RSS of the runs (which counts the decoded
//! dataset and the cache; the cache's size is printed beside a cached point), or, with
//! `--memory`, the training-step memory `vqt-bench memory` measured for each method.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The fields of a run record the report reads.
#[derive(Debug, Clone, Deserialize)]
pub struct RunSummary {
    /// Method name (`vqt`, `linear+lora`, …).
    pub method: String,
    /// Backend.
    pub backend: String,
    /// Test accuracy (%), last epoch.
    pub test_accuracy: f64,
    /// Validation accuracy (%), last epoch.
    pub val_accuracy: f64,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// All parameters.
    pub total_params: usize,
    /// Process peak RSS (bytes).
    pub peak_rss_bytes: Option<u64>,
    /// Wall time (s) of the invocation that wrote the record.
    pub wall_seconds: f64,
    /// The epoch the run resumed from, if it was resumed (then its wall time and peak RSS are
    /// those of the last invocation only).
    #[serde(default)]
    pub resumed_from_epoch: Option<usize>,
    /// `trunk` or `full`.
    #[serde(default)]
    pub path: Option<String>,
    /// The resolved config (for the seed).
    pub config: serde_json::Value,
    /// The feature cache, if the run used one.
    #[serde(default)]
    pub cache: Option<serde_json::Value>,
}

/// One method aggregated over its runs.
#[derive(Debug, Clone, Serialize)]
pub struct MethodRow {
    /// Method.
    pub method: String,
    /// Number of runs (seeds).
    pub runs: usize,
    /// Seeds, in order.
    pub seeds: Vec<u64>,
    /// Test accuracy mean (%).
    pub test_mean: f64,
    /// Test accuracy sample standard deviation (0 for one run).
    pub test_std: f64,
    /// Validation accuracy mean (%).
    pub val_mean: f64,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// Peak RSS mean (MiB) over the runs that were not resumed, when recorded.
    pub peak_rss_mib: Option<f64>,
    /// Wall time mean (s) over the runs that were not resumed (`None` if every run was).
    pub wall_seconds: Option<f64>,
    /// Runs that were resumed, left out of the wall-time and peak-RSS means (a resumed run's
    /// record holds only its last invocation's).
    pub resumed_runs: usize,
    /// `trunk` or `full`.
    pub path: Option<String>,
    /// Feature-cache size (MiB), for cached runs.
    pub cache_mib: Option<f64>,
    /// Training-step memory (MiB) from a `vqt-bench memory` report, when attached.
    pub step_memory_mib: Option<f64>,
    /// The `vqt-bench memory` method that memory was measured for.
    pub step_memory_method: Option<String>,
}

/// Which memory the plot's x axis shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryAxis {
    /// Process peak RSS of the runs.
    ProcessRss,
    /// Training-step memory from `vqt-bench memory`.
    Step,
}

/// Attaches the training-step memory of `reports` (a `vqt-bench memory` JSON) to the rows:
/// a row takes the report of the same method name, or the one `pairs` maps it to
/// (`RUN_METHOD=BENCH_METHOD`, e.g. `vqt=vqt-cached`). Returns the rows left without one.
pub fn attach_step_memory(rows: &mut [MethodRow], reports: &[crate::bench::StepReport], pairs: &[String]) -> Result<Vec<String>, String> {
    let mut map: BTreeMap<&str, &str> = BTreeMap::new();
    for p in pairs {
        let (a, b) = p.split_once('=').ok_or_else(|| format!("--match `{p}`: expected RUN_METHOD=BENCH_METHOD"))?;
        if !rows.iter().any(|r| r.method == a.trim()) {
            return Err(format!("--match `{p}`: no run has method `{}`", a.trim()));
        }
        if !reports.iter().any(|r| r.method == b.trim()) {
            return Err(format!("--match `{p}`: the memory report has no method `{}`", b.trim()));
        }
        map.insert(a.trim(), b.trim());
    }
    let mut missing = Vec::new();
    for row in rows.iter_mut() {
        let want = map.get(row.method.as_str()).copied().unwrap_or(row.method.as_str());
        match reports.iter().find(|r| r.method == want) {
            Some(r) => {
                row.step_memory_mib = r.device_peak_bytes.or(r.rss_train_bytes).map(|b| b as f64 / (1024.0 * 1024.0));
                row.step_memory_method = Some(r.method.clone());
            }
            None => missing.push(row.method.clone()),
        }
    }
    Ok(missing)
}

/// Every `run.json` at or below `dirs` (one level of nesting per seed directory is enough).
pub fn find_runs(dirs: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>, depth: usize) {
        if p.is_file() && p.file_name().is_some_and(|n| n == "run.json") {
            out.push(p.to_path_buf());
        } else if p.is_dir() && depth < 4 {
            if let Ok(rd) = std::fs::read_dir(p) {
                let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
                entries.sort();
                for e in entries {
                    walk(&e, out, depth + 1);
                }
            }
        }
    }
    let mut out = Vec::new();
    for d in dirs {
        if !d.exists() {
            return Err(format!("{}: no such file or directory", d.display()));
        }
        walk(d, &mut out, 0);
    }
    if out.is_empty() {
        return Err(format!("no run.json under {}", dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")));
    }
    Ok(out)
}

/// Reads and aggregates the runs, one row per method, in first-seen order.
pub fn aggregate(paths: &[PathBuf]) -> Result<Vec<MethodRow>, String> {
    let mut groups: BTreeMap<usize, (String, Vec<RunSummary>)> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let r: RunSummary = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
        let i = match order.iter().position(|m| *m == r.method) {
            Some(i) => i,
            None => {
                order.push(r.method.clone());
                order.len() - 1
            }
        };
        groups.entry(i).or_insert_with(|| (r.method.clone(), Vec::new())).1.push(r);
    }
    Ok(groups
        .into_values()
        .map(|(method, runs)| {
            let n = runs.len() as f64;
            let test_mean = runs.iter().map(|r| r.test_accuracy).sum::<f64>() / n;
            let test_std = if runs.len() > 1 {
                (runs.iter().map(|r| (r.test_accuracy - test_mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
            } else {
                0.0
            };
            let whole: Vec<&RunSummary> = runs.iter().filter(|r| r.resumed_from_epoch.is_none()).collect();
            let rss: Vec<f64> = whole.iter().filter_map(|r| r.peak_rss_bytes).map(|b| b as f64 / (1024.0 * 1024.0)).collect();
            MethodRow {
                method,
                runs: runs.len(),
                seeds: runs.iter().filter_map(|r| r.config.pointer("/train/seed").and_then(|s| s.as_u64())).collect(),
                test_mean,
                test_std,
                val_mean: runs.iter().map(|r| r.val_accuracy).sum::<f64>() / n,
                trainable_params: runs[0].trainable_params,
                peak_rss_mib: (!rss.is_empty()).then(|| rss.iter().sum::<f64>() / rss.len() as f64),
                wall_seconds: (!whole.is_empty()).then(|| whole.iter().map(|r| r.wall_seconds).sum::<f64>() / whole.len() as f64),
                resumed_runs: runs.len() - whole.len(),
                path: runs[0].path.clone(),
                cache_mib: runs[0].cache.as_ref().and_then(|c| c["bytes"].as_f64()).map(|b| b / (1024.0 * 1024.0)),
                step_memory_mib: None,
                step_memory_method: None,
            }
        })
        .collect())
}

/// The markdown table (`title` as a heading when given).
pub fn markdown(rows: &[MethodRow], title: Option<&str>) -> String {
    let mut s = String::new();
    if let Some(t) = title {
        s += &format!("# {t}\n\n");
    }
    let step = rows.iter().any(|r| r.step_memory_mib.is_some());
    s += "| method | path | runs (seeds) | test acc % (mean ± std) | val acc % | trainable params | peak RSS MiB | cache MiB | wall s / run |";
    s += if step { " step memory MiB (as measured for) |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n" } else { "\n|---|---|---|---:|---:|---:|---:|---:|---:|\n" };
    for r in rows {
        s += &format!(
            "| {} | {} | {} ({}) | {} | {:.2} | {} | {} | {} | {} |",
            r.method,
            r.path.as_deref().unwrap_or("–"),
            r.runs,
            r.seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(", "),
            if r.runs > 1 { format!("{:.2} ± {:.2}", r.test_mean, r.test_std) } else { format!("{:.2} (one seed, no std)", r.test_mean) },
            r.val_mean,
            r.trainable_params,
            r.peak_rss_mib.map(|m| format!("{m:.0}")).unwrap_or_else(|| "–".into()),
            r.cache_mib.map(|m| format!("{m:.0}")).unwrap_or_else(|| "–".into()),
            match (r.wall_seconds, r.resumed_runs) {
                (Some(w), 0) => format!("{w:.1}"),
                (Some(w), k) => format!("{w:.1} ({} of {} runs; {k} resumed)", r.runs - k, r.runs),
                (None, _) => "– (every run resumed)".into(),
            }
        );
        if step {
            s += &match (r.step_memory_mib, &r.step_memory_method) {
                (Some(m), Some(b)) => format!(" {m:.0} ({b}) |"),
                _ => " – |".into(),
            };
        }
        s += "\n";
    }
    s += "\nTest accuracy is scored once, at the last epoch; std is the sample standard deviation over seeds. Peak RSS is the whole process (the decoded dataset, backbone, feature cache and training); the cache column is the part of it the K/V cache holds.";
    if rows.iter().any(|r| r.resumed_runs > 0) {
        s += " Peak RSS and wall time are means over the runs that were not resumed: a resumed run's record holds only its last invocation's.";
    }
    if step {
        s += " Step memory is what one training step adds (`vqt-bench memory`, its own process per method, at the shape its report states), not a run's RSS.";
    }
    s += "\n";
    s
}

/// Test accuracy (mean, with ±std bars) against memory (`axis`), one labelled point per method
/// (label: method and trainable parameters; on the RSS axis also the cache's size for a cached
/// method), as an SVG document. Rows without that memory are left out.
pub fn svg(rows: &[MethodRow], title: &str, axis: MemoryAxis) -> Result<String, String> {
    use plotters::prelude::*;
    let pts: Vec<(f64, &MethodRow)> = rows
        .iter()
        .filter_map(|r| match axis {
            MemoryAxis::ProcessRss => r.peak_rss_mib,
            MemoryAxis::Step => r.step_memory_mib,
        }
        .map(|m| (m, r)))
        .collect();
    if pts.is_empty() {
        return Err(match axis {
            MemoryAxis::ProcessRss => "no run records peak memory (peak_rss_bytes), nothing to plot".into(),
            MemoryAxis::Step => "no row has a step memory from the --memory report (name them with --match RUN=BENCH), nothing to plot".into(),
        });
    }
    let x_desc = match axis {
        MemoryAxis::ProcessRss => "peak process memory during the run (MiB, RSS: data, backbone, cache, training)",
        MemoryAxis::Step => "training-step memory (MiB, vqt-bench memory)",
    };
    // A point from one run says so: it has no spread over seeds.
    let seeds = |r: &MethodRow| if r.runs == 1 { format!("; one seed, {}", r.seeds.first().map_or(String::new(), |s| s.to_string())) } else { format!("; {} seeds", r.runs) };
    let label = |r: &MethodRow| match (axis, r.cache_mib) {
        (MemoryAxis::ProcessRss, Some(c)) => format!("{} ({} params; cache {c:.0} MiB{})", r.method, r.trainable_params, seeds(r)),
        _ => format!("{} ({} params{})", r.method, r.trainable_params, seeds(r)),
    };
    let e = |e: DrawingAreaErrorKind<std::io::Error>| e.to_string();
    let (xs, ys): (Vec<f64>, Vec<f64>) = pts.iter().map(|(m, r)| (*m, r.test_mean)).unzip();
    let span = |v: &[f64], pad: f64| {
        let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
        let p = ((hi - lo) * pad).max(1.0);
        (lo - p, hi + p)
    };
    let (x0, x1) = span(&xs, 0.15);
    let (y0, y1) = span(&ys, 0.15);
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(20)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d(x0.max(0.0)..x1, y0.max(0.0)..y1.min(100.0))
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("test accuracy % (mean ± std over seeds)")
            .draw()
            .map_err(e)?;
        chart
            .draw_series(pts.iter().map(|(m, r)| PathElement::new(vec![(*m, r.test_mean - r.test_std), (*m, r.test_mean + r.test_std)], BLACK)))
            .map_err(e)?;
        chart.draw_series(pts.iter().map(|(m, r)| Circle::new((*m, r.test_mean), 5, BLUE.filled()))).map_err(e)?;
        chart
            .draw_series(pts.iter().map(|(m, r)| {
                Text::new(label(r), (*m, r.test_mean), ("sans-serif", 12).into_font())
            }))
            .map_err(e)?;
        root.present().map_err(e)?;
    }
    Ok(out)
}
