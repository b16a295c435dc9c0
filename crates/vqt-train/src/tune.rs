//! `vqt-train tune`: the honest VTAB-1k protocol (formats.md §2.3). For every task: train each
//! grid setting on `train800`, score `val200` at the final epoch, pick the best (ties: the
//! earlier setting in grid order, so list smaller learning rates first); retrain the best on
//! `train800val200` with every seed; score `test` once, at the final epoch. No test peeking:
//! the test split is only ever read by the final runs.
//!
//! The table reports per-task mean ± std over seeds, each group's mean, the mean over tasks and
//! the mean of the group means (the two VTAB averaging conventions, labelled).

use crate::config::{self, DataConfig, ExperimentConfig};
use crate::run::TrainOptions;
use anyhow::{Context, Result};
use burn::tensor::Device;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One grid axis: a config key and its values (TOML literals).
#[derive(Clone, Debug)]
pub struct Axis {
    /// Dotted config key.
    pub key: String,
    /// Values, in order.
    pub values: Vec<String>,
}

impl std::str::FromStr for Axis {
    type Err = String;
    /// `key=[v1,v2,…]` or `key=v`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (key, vals) = s.split_once('=').ok_or_else(|| format!("--grid `{s}`: expected key=[v1,v2,...]"))?;
        let vals = vals.trim();
        let inner = vals.strip_prefix('[').and_then(|v| v.strip_suffix(']')).unwrap_or(vals);
        let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect();
        if values.is_empty() {
            return Err(format!("--grid `{s}`: no values"));
        }
        Ok(Axis { key: key.trim().to_string(), values })
    }
}

/// Every combination of the axes, as `key=value` overrides, first axis slowest.
pub fn combinations(axes: &[Axis]) -> Vec<Vec<String>> {
    axes.iter().fold(vec![Vec::new()], |acc, a| {
        acc.into_iter().flat_map(|prefix| a.values.iter().map(move |v| [prefix.clone(), vec![format!("{}={v}", a.key)]].concat())).collect()
    })
}

/// One task's outcome.
#[derive(Debug, Serialize)]
pub struct TaskResult {
    /// Task (as given).
    pub task: String,
    /// VTAB group.
    pub group: String,
    /// Validation accuracy (%) of every grid setting, in grid order.
    pub grid: Vec<(Vec<String>, f64)>,
    /// The chosen setting.
    pub best: Vec<String>,
    /// Test accuracy (%) per seed of the final runs.
    pub test: Vec<(u64, f64)>,
    /// Mean and sample std of `test`.
    pub mean: f64,
    /// Sample standard deviation (0 for one seed).
    pub std: f64,
}

/// The protocol's result.
#[derive(Debug, Serialize)]
pub struct TuneReport {
    /// Per task.
    pub tasks: Vec<TaskResult>,
    /// Mean test accuracy per VTAB group present.
    pub group_means: Vec<(String, f64)>,
    /// Mean over all tasks.
    pub task_mean: f64,
    /// Mean of the group means.
    pub group_mean: f64,
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let s = if v.len() > 1 { (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    (m, s)
}

/// Runs the protocol for `tasks` with the base config at `config` (its `[data]` must be
/// `kind = "vtab"`; `task` and the splits are set per run).
#[allow(clippy::too_many_arguments)]
#[allow(clippy::too_many_arguments)]
pub fn tune(config_path: &Path, overrides: &[String], tasks: &[String], axes: &[Axis], seeds: &[u64], backend: &str, device: &Device, opts: &TrainOptions, out: &Path) -> Result<TuneReport> {
    let base = config::load(config_path, overrides)?;
    anyhow::ensure!(matches!(base.data, DataConfig::Vtab { .. }), "{}: tune needs `[data] kind = \"vtab\"`", config_path.display());
    anyhow::ensure!(!tasks.is_empty() && !seeds.is_empty(), "tune: give at least one --task and one --seed");
    let combos = combinations(axes);
    let run = |task: &str, split_overrides: &[String], extra: &[String], dir: PathBuf| -> Result<crate::run::RunRecord> {
        let mut o: Vec<String> = overrides.to_vec();
        o.push(format!("data.task=\"{task}\""));
        o.extend(split_overrides.iter().cloned());
        o.extend(extra.iter().cloned());
        let cfg: ExperimentConfig = config::load(config_path, &o)?;
        crate::run::train_or_reuse(&cfg, backend, device, &dir, opts.clone()).with_context(|| format!("{task} {}", extra.join(" ")))
    };
    let mut results = Vec::new();
    for task in tasks {
        let group = vqt_core::data::files::vtab_group(task).map_err(anyhow::Error::msg)?.to_string();
        // The test split is never read while tuning: the grid runs score val200 twice instead.
        let tune_splits =
            ["data.train_split=\"train800\"".to_string(), "data.val_split=\"val200\"".to_string(), "data.test_split=\"val200\"".to_string()];
        let mut grid = Vec::new();
        for (i, c) in combos.iter().enumerate() {
            let rec = run(task, &tune_splits, c, out.join(task).join(format!("grid-{i}")))?;
            eprintln!("{task} [{}]: val {:.2}%", c.join(" "), rec.val_accuracy);
            grid.push((c.clone(), rec.val_accuracy));
        }
        // Best validation accuracy; ties keep the earlier setting (strict >).
        let best = grid.iter().fold(&grid[0], |b, g| if g.1 > b.1 { g } else { b }).0.clone();
        let final_splits = ["data.train_split=\"train800val200\"".to_string(), "data.val_split=\"val200\"".to_string(), "data.test_split=\"test\"".to_string()];
        let mut test = Vec::new();
        for &seed in seeds {
            let mut extra = best.clone();
            extra.push(format!("train.seed={seed}"));
            let rec = run(task, &final_splits, &extra, out.join(task).join(format!("final-seed-{seed}")))?;
            eprintln!("{task} final seed {seed}: test {:.2}%", rec.test_accuracy);
            test.push((seed, rec.test_accuracy));
        }
        let (mean, std) = mean_std(&test.iter().map(|t| t.1).collect::<Vec<_>>());
        results.push(TaskResult { task: task.clone(), group, grid, best, test, mean, std });
    }
    let mut group_means = Vec::new();
    for g in ["Natural", "Specialized", "Structured"] {
        let v: Vec<f64> = results.iter().filter(|r| r.group == g).map(|r| r.mean).collect();
        if !v.is_empty() {
            group_means.push((g.to_string(), mean_std(&v).0));
        }
    }
    let task_mean = mean_std(&results.iter().map(|r| r.mean).collect::<Vec<_>>()).0;
    let group_mean = mean_std(&group_means.iter().map(|g| g.1).collect::<Vec<_>>()).0;
    Ok(TuneReport { tasks: results, group_means, task_mean, group_mean })
}

/// The markdown table.
pub fn markdown(r: &TuneReport) -> String {
    let mut s = String::from("| task | group | chosen on val200 | test acc % (mean ± std) | seeds |\n|---|---|---|---:|---|\n");
    for t in &r.tasks {
        s += &format!(
            "| {} | {} | {} | {:.2} ± {:.2} | {} |\n",
            t.task,
            t.group,
            if t.best.is_empty() { "(no grid)".into() } else { t.best.join(" ") },
            t.mean,
            t.std,
            t.test.iter().map(|(s, _)| s.to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    s += "\n";
    for (g, m) in &r.group_means {
        s += &format!("- {g} mean: {m:.2}\n");
    }
    s += &format!(
        "- **Mean over the {} tasks**: {:.2}\n- **Mean of the {} group means**: {:.2}\n\nTest accuracy at the final epoch of runs trained on train800val200; settings chosen on val200 only (train800 runs).\n",
        r.tasks.len(),
        r.task_mean,
        r.group_means.len(),
        r.group_mean
    );
    s
}
