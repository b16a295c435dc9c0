//! `vqt-train tune`: the honest VTAB-1k protocol (formats.md §2.3). For every task: train each
//! grid setting on `train800`, score `val200` at the final epoch, pick the best (ties: the
//! earlier setting in grid order, so list smaller learning rates first); retrain the best on
//! `train800val200` with every seed; score `test` once, at the final epoch. No test peeking:
//! the test split is only ever read by the final runs.
//!
//! The same protocol runs on an IDX task (`[data] kind = "idx"`, the DINOv2 demo's
//! Fashion-MNIST): `train_range` is train800 and `val_range` val200 (it must follow it); the grid
//! runs score val200 as their "test" split (read from the train files), the final runs train on
//! both ranges together and score the configured test images. `--on-tune DIR` makes every run
//! an add-on (`backbone.tuned_from`) on an earlier tune's runs: a grid run on that tune's chosen
//! grid run, a final run on its final run of the same seed, so neither stage sees val200 or the
//! test images before its own scoring.
//!
//! The table reports per-task mean ± std over seeds, each group's mean, the mean over tasks and
//! the mean of the group means (the two VTAB averaging conventions, labelled).
//!
//! A sweep is a set of jobs in a plan directory, so it can outgrow one process and one machine:
//! [`plan`] writes `plan.json`, `base.toml` (the resolved base config) and the grid phase's
//! jobs (`grid.jsonl`, one JSON line per job with its exact `vqt-train train ... --reuse`
//! command, and `grid.commands`, the same commands one per line); [`select`] picks each task's
//! best setting from the finished grid runs and writes the final phase's jobs; [`collect`]
//! writes `tune.{json,md}` and lists every job that has not finished. A job's output directory
//! is its only state, so the executors ([`execute_local`] with N workers, [`execute_slurm`]
//! with one job array per phase, or `xargs -P` over `grid.commands`) can run jobs in any order,
//! twice, or on several machines sharing a file system.

use crate::config::{self, DataConfig, ExperimentConfig};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
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
#[derive(Debug, Serialize, Deserialize)]
pub struct TaskResult {
    /// Task (as given).
    pub task: String,
    /// VTAB group.
    pub group: String,
    /// Validation accuracy (%) of every grid setting, in grid order.
    pub grid: Vec<(Vec<String>, f64)>,
    /// The chosen setting.
    pub best: Vec<String>,
    /// Its grid run's directory under the task's (`grid-<i>`).
    pub best_run: String,
    /// Test accuracy (%) per seed of the final runs.
    pub test: Vec<(u64, f64)>,
    /// Mean and sample std of `test`.
    pub mean: f64,
    /// Sample standard deviation (0 for one seed).
    pub std: f64,
}

/// The protocol's result.
#[derive(Debug, Serialize, Deserialize)]
pub struct TuneReport {
    /// Per task.
    pub tasks: Vec<TaskResult>,
    /// Mean test accuracy per VTAB group present.
    pub group_means: Vec<(String, f64)>,
    /// Mean over all tasks (absent while a task is incomplete).
    pub task_mean: Option<f64>,
    /// Mean of the group means (absent without VTAB groups, or while a task is incomplete).
    pub group_mean: Option<f64>,
    /// Tasks with a job that has not finished (no row, no mean over tasks).
    #[serde(default)]
    pub incomplete: Vec<String>,
    /// Every job that has not finished.
    #[serde(default)]
    pub missing: Vec<Missing>,
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let s = if v.len() > 1 { (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    (m, s)
}

/// How a run of the protocol reads its data: the grid phase (train800, scored on val200, the
/// test split pointed at val200) or the final phase (train800val200, scored on test).
fn apply_phase(cfg: &mut ExperimentConfig, final_phase: bool) -> Result<(), String> {
    match &mut cfg.data {
        DataConfig::Vtab { train_split, val_split, test_split, .. } | DataConfig::Tfds { train_split, val_split, test_split, .. } => {
            let (tr, te) = if final_phase { ("train800val200", "test") } else { ("train800", "val200") };
            (*train_split, *val_split, *test_split) = (tr.into(), "val200".into(), te.into());
        }
        DataConfig::Idx { train_images, train_labels, test_images, test_labels, train_range, val_range, test_limit, test_range, .. } => {
            if train_range[1] != val_range[0] {
                return Err(format!("tune on IDX data needs data.val_range to follow data.train_range (train800 = [0, 800], val200 = [800, 1000]); found {train_range:?} and {val_range:?}"));
            }
            if final_phase {
                // train800val200; the final runs' validation split is the next, unused slice.
                let n = val_range[1] - val_range[0];
                (*train_range, *val_range) = ([train_range[0], val_range[1]], [val_range[1], val_range[1] + n]);
            } else {
                (*test_images, *test_labels) = (train_images.clone(), train_labels.clone());
                (*test_range, *test_limit) = (Some(*val_range), None);
            }
        }
        _ => return Err("tune needs `[data] kind = \"vtab\"` or `kind = \"tfds\"` (the VTAB-1k splits) or `kind = \"idx\"` (train_range = train800, val_range = val200)".into()),
    }
    cfg.validate()
}

/// The run directory an earlier tune chose for `task` (its best grid run), from its tune.json.
fn chosen_run(earlier: &Path, task: &str) -> Result<PathBuf> {
    let path = earlier.join("tune.json");
    let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("--on-tune: {}: {e} (finish that tune first)", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let t = v["tasks"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["task"] == task))
        .ok_or_else(|| anyhow::anyhow!("--on-tune: {} has no task `{task}`", path.display()))?;
    let best = t["best_run"].as_str().map(String::from).or_else(|| {
        // tune.json written before `best_run` existed: the best setting's grid position.
        let grid = t["grid"].as_array()?;
        grid.iter().position(|g| g[0] == t["best"]).map(|i| format!("grid-{i}"))
    });
    let best = best.ok_or_else(|| anyhow::anyhow!("{}: task `{task}` names no chosen run", path.display()))?;
    Ok(earlier.join(task).join(best))
}

/// The plan's description of the sweep (`<dir>/plan.json`).
pub const PLAN_FILE: &str = "plan.json";
/// The sweep's resolved base config (`<dir>/base.toml`), which every job reads.
pub const BASE_FILE: &str = "base.toml";
/// The protocol's result (`<dir>/tune.json`, `<dir>/tune.md`).
pub const REPORT_FILE: &str = "tune.json";

/// The two phases of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Every grid setting on train800, scored on val200.
    Grid,
    /// The chosen setting on train800val200 per seed, scored on test; written by the selection
    /// step once a task's grid is complete.
    Final,
}

impl Phase {
    /// `grid` or `final`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Grid => "grid",
            Phase::Final => "final",
        }
    }

    /// The phase's job file in a plan directory (one JSON line per job).
    pub fn jobs_file(self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.jsonl", self.name()))
    }

    /// The same jobs as shell commands, one per line (for `xargs -P` / GNU parallel).
    pub fn commands_file(self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.commands", self.name()))
    }
}

/// How jobs start `vqt-train`: the binary and the global flags (backend, precision, devices).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    /// The `vqt-train` binary (absolute).
    pub exe: PathBuf,
    /// Flags before the subcommand, e.g. `["--backend", "cpu", "--precision", "f32"]`.
    pub global: Vec<String>,
}

/// One run of the sweep: a line of `grid.jsonl` or `final.jsonl`. Its output directory is its
/// only state: running a job whose `run.json` is complete does nothing, running an interrupted
/// one resumes it (`vqt-train train --reuse`), so any executor may run the jobs in any order,
/// twice, or on several machines sharing a file system.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// `grid/<task>/<i>` or `final/<task>/seed-<s>`.
    pub id: String,
    /// Its phase.
    pub phase: Phase,
    /// The task.
    pub task: String,
    /// The grid setting (`key=value` overrides).
    pub setting: Vec<String>,
    /// `train.seed` of the run.
    pub seed: u64,
    /// The run's output directory.
    pub out_dir: PathBuf,
    /// The earlier run an add-on job builds on (`backbone.tuned_from`).
    pub tuned_from: Option<PathBuf>,
    /// Every `--set` of the job, in order (the phase's `[data]`, the setting, the seed, the
    /// earlier run).
    pub overrides: Vec<String>,
    /// The directory the job runs in (relative paths in the config are relative to it).
    pub cwd: PathBuf,
    /// The exact `vqt-train ... train ... --reuse` command.
    pub argv: Vec<String>,
    /// `argv` as one shell command, with `cd <cwd> &&` in front.
    pub command: String,
}

/// What a sweep is (`plan.json`): enough to rebuild the final jobs and the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The config the sweep was planned from, and its overrides (the resolved result is
    /// `base.toml`).
    pub config: PathBuf,
    /// `--set` overrides of the base config.
    pub overrides: Vec<String>,
    /// Tasks, in order.
    pub tasks: Vec<String>,
    /// Every grid setting, in grid order (ties keep the earlier one).
    pub grid: Vec<Vec<String>>,
    /// Seeds of the final runs.
    pub seeds: Vec<u64>,
    /// The earlier tune every run is an add-on to.
    pub on_tune: Option<PathBuf>,
    /// VTAB data (task names and groups) or one IDX task.
    pub vtab: bool,
    /// How jobs start vqt-train.
    pub launch: Launch,
    /// The directory jobs run in.
    pub cwd: PathBuf,
    /// SLURM settings from the config's `[slurm]` section (flags override them).
    #[serde(default)]
    pub slurm: crate::config::SlurmConfig,
}

/// A job that has not finished: its id, directory and what the directory shows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Missing {
    /// The job id.
    pub id: String,
    /// Its output directory.
    pub out_dir: PathBuf,
    /// `not started`, or `interrupted or failed` (started, no run.json).
    pub state: String,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    vqt_core::fs::write_atomic(path, text.as_bytes()).with_context(|| path.display().to_string())
}

/// Reads a plan directory's `plan.json`.
pub fn read_plan(dir: &Path) -> Result<Plan> {
    read_json(&dir.join(PLAN_FILE)).map_err(|e| anyhow::anyhow!("{e:#} (not a sweep planned by `vqt-train tune`)"))
}

/// Reads a job file; a bad line is one error naming the file and line.
pub fn read_jobs(path: &Path) -> Result<Vec<Job>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1)))
        .collect()
}

fn write_jobs(dir: &Path, phase: Phase, jobs: &[Job]) -> Result<()> {
    let mut lines = String::new();
    let mut commands = String::new();
    for j in jobs {
        lines += &serde_json::to_string(j)?;
        lines.push('\n');
        commands += &j.command;
        commands.push('\n');
    }
    write_text(&phase.jobs_file(dir), &lines)?;
    write_text(&phase.commands_file(dir), &commands)
}

/// Everything [`plan`] needs besides the sweep itself.
pub struct PlanRequest<'a> {
    /// The base config.
    pub config: &'a Path,
    /// Its overrides.
    pub overrides: &'a [String],
    /// Tasks (VTAB names or aliases; one label for IDX data).
    pub tasks: &'a [String],
    /// Grid axes.
    pub axes: &'a [Axis],
    /// Final-run seeds.
    pub seeds: &'a [u64],
    /// An earlier, finished tune every run is an add-on to.
    pub on_tune: Option<&'a Path>,
    /// How jobs start vqt-train.
    pub launch: Launch,
}

/// Plans the protocol as jobs in `dir`: `plan.json`, `base.toml` (the resolved base config) and
/// the grid phase's `grid.jsonl` / `grid.commands`. Every job's config is resolved here, so a
/// bad setting is a one-line error now, not in a job. A stale final phase and report of an
/// earlier plan in `dir` are removed (the selection writes them again from the grid runs).
pub fn plan(req: &PlanRequest, dir: &Path) -> Result<Plan> {
    let base = config::load(req.config, req.overrides)?;
    let vtab = matches!(base.data, DataConfig::Vtab { .. } | DataConfig::Tfds { .. });
    anyhow::ensure!(!req.tasks.is_empty() && !req.seeds.is_empty(), "tune: give at least one --tasks name and one --seeds value");
    anyhow::ensure!(vtab || req.tasks.len() == 1, "tune: an IDX config is one task: give one --tasks name (its label), not {}", req.tasks.len());
    if !vtab {
        let mut probe = base.clone();
        apply_phase(&mut probe, false).map_err(|e| anyhow::anyhow!("{}: {e}", req.config.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let dir = std::path::absolute(dir)?;
    let cwd = std::env::current_dir()?;
    let on_tune = req.on_tune.map(std::path::absolute).transpose()?;
    let mut slurm = base.slurm.clone().unwrap_or_default();
    slurm.validate().map_err(|e| anyhow::anyhow!("{}: {e}", req.config.display()))?;
    let base_path = dir.join(BASE_FILE);
    let text = toml::to_string(&base).map_err(|e| anyhow::anyhow!("{}: cannot write the resolved config as TOML: {e}", base_path.display()))?;
    write_text(&base_path, &format!("# The resolved base config of the sweep planned in this directory (`vqt-train tune`): every job\n# reads it, with its own --set overrides.\n{text}"))?;
    let back = config::load(&base_path, &[])?;
    anyhow::ensure!(
        serde_json::to_value(&back)? == serde_json::to_value(&base)?,
        "{}: the resolved config does not read back as itself (a bug: please report it)",
        base_path.display()
    );
    let p = Plan {
        config: req.config.to_path_buf(),
        overrides: req.overrides.to_vec(),
        tasks: req.tasks.to_vec(),
        grid: combinations(req.axes),
        seeds: req.seeds.to_vec(),
        on_tune,
        vtab,
        launch: req.launch.clone(),
        cwd,
        slurm: std::mem::take(&mut slurm),
    };
    let mut jobs = Vec::new();
    for task in &p.tasks {
        if vtab {
            vqt_core::data::files::vtab_group(task).map_err(anyhow::Error::msg)?;
        }
        let earlier = p.on_tune.as_deref().map(|d| chosen_run(d, task)).transpose()?;
        if let Some(d) = &p.on_tune {
            for seed in &p.seeds {
                let f = d.join(task).join(format!("final-seed-{seed}"));
                anyhow::ensure!(f.join(crate::rundir::RUN_FILE).is_file(), "--on-tune: {} is not a finished final run (run that tune with seed {seed})", f.display());
            }
        }
        for (i, setting) in p.grid.iter().enumerate() {
            jobs.push(job(&p, &base, &dir, Phase::Grid, task, i, setting, None, earlier.clone())?);
        }
    }
    for stale in [Phase::Final.jobs_file(&dir), Phase::Final.commands_file(&dir), dir.join(REPORT_FILE), dir.join("tune.md")] {
        match std::fs::remove_file(&stale) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(anyhow::anyhow!("{}: {e}", stale.display())),
            _ => {}
        }
    }
    write_jobs(&dir, Phase::Grid, &jobs)?;
    write_text(&dir.join(PLAN_FILE), &serde_json::to_string_pretty(&p)?)?;
    Ok(p)
}

/// One job: the phase's `[data]` (the task, its splits) as one inline-table override, then the
/// setting, the seed and the earlier run; resolved once to check it.
#[allow(clippy::too_many_arguments)]
fn job(p: &Plan, base: &ExperimentConfig, dir: &Path, phase: Phase, task: &str, index: usize, setting: &[String], seed: Option<u64>, tuned_from: Option<PathBuf>) -> Result<Job> {
    let mut cfg = base.clone();
    if let DataConfig::Vtab { task: t, .. } | DataConfig::Tfds { task: t, .. } = &mut cfg.data {
        *t = task.to_string();
    }
    apply_phase(&mut cfg, phase == Phase::Final).map_err(|e| anyhow::anyhow!("{}: {e}", p.config.display()))?;
    let data = toml::Value::try_from(&cfg.data).map_err(|e| anyhow::anyhow!("[data] as TOML: {e}"))?;
    let mut overrides = vec![format!("data={data}")];
    overrides.extend(setting.iter().cloned());
    if let Some(s) = seed {
        overrides.push(format!("train.seed={s}"));
    }
    if let Some(t) = &tuned_from {
        overrides.push(format!("backbone.tuned_from={}", toml::Value::String(t.display().to_string())));
    }
    let base_path = dir.join(BASE_FILE);
    let (id, out_dir) = match phase {
        Phase::Grid => (format!("grid/{task}/{index}"), dir.join(task).join(format!("grid-{index}"))),
        Phase::Final => (format!("final/{task}/seed-{}", seed.unwrap_or(0)), dir.join(task).join(format!("final-seed-{}", seed.unwrap_or(0)))),
    };
    let resolved = config::load(&base_path, &overrides).with_context(|| format!("job {id} ({})", setting.join(" ")))?;
    let mut argv = vec![p.launch.exe.display().to_string()];
    argv.extend(p.launch.global.iter().cloned());
    argv.extend(["train".to_string(), "--config".into(), base_path.display().to_string()]);
    for o in &overrides {
        argv.extend(["--set".to_string(), o.clone()]);
    }
    argv.extend(["--out".to_string(), out_dir.display().to_string(), "--reuse".into()]);
    let quote = |s: &str| shlex::try_quote(s).map(|q| q.into_owned()).map_err(|e| anyhow::anyhow!("job {id}: {e}"));
    let command = format!("cd {} && {}", quote(&p.cwd.display().to_string())?, argv.iter().map(|a| quote(a)).collect::<Result<Vec<_>>>()?.join(" "));
    Ok(Job { id, phase, task: task.to_string(), setting: setting.to_vec(), seed: resolved.train.seed, out_dir, tuned_from, overrides, cwd: p.cwd.clone(), argv, command })
}

fn missing(j: &Job) -> Option<Missing> {
    let state = match crate::rundir::state(&j.out_dir) {
        crate::rundir::RunState::Complete => return None,
        crate::rundir::RunState::Empty => "not started",
        crate::rundir::RunState::Interrupted => "interrupted or failed (started, no run.json)",
    };
    Some(Missing { id: j.id.clone(), out_dir: j.out_dir.clone(), state: state.into() })
}

/// The selection step: for every task whose grid runs are all complete, the best setting by
/// val200 accuracy (ties keep the earlier setting), and its final jobs (one per seed), written
/// to `final.jsonl` / `final.commands`. Idempotent: the same grid runs give the same file.
/// Returns the final jobs and the grid jobs still missing.
pub fn select(dir: &Path) -> Result<(Vec<Job>, Vec<Missing>)> {
    let p = read_plan(dir)?;
    let base = config::load(&dir.join(BASE_FILE), &[])?;
    let grid = read_jobs(&Phase::Grid.jobs_file(dir))?;
    let (mut finals, mut waiting) = (Vec::new(), Vec::new());
    for task in &p.tasks {
        let jobs: Vec<&Job> = grid.iter().filter(|j| &j.task == task).collect();
        let left: Vec<Missing> = jobs.iter().filter_map(|j| missing(j)).collect();
        if !left.is_empty() || jobs.is_empty() {
            waiting.extend(left);
            continue;
        }
        let acc: Vec<f64> = jobs.iter().map(|j| crate::run::read_record(&j.out_dir).map(|r| r.val_accuracy)).collect::<Result<_>>()?;
        let best = (0..acc.len()).fold(0, |b, i| if acc[i] > acc[b] { i } else { b });
        let from_earlier = |seed: u64| p.on_tune.as_ref().map(|d| d.join(task).join(format!("final-seed-{seed}")));
        for &seed in &p.seeds {
            finals.push(job(&p, &base, dir, Phase::Final, task, 0, &jobs[best].setting, Some(seed), from_earlier(seed))?);
        }
    }
    write_jobs(dir, Phase::Final, &finals)?;
    Ok((finals, waiting))
}

/// The report of the sweep in `dir` from its run directories (running the selection first):
/// every task whose grid and final runs are all complete gets its row; every job that has not
/// finished is listed in `missing`, its task in `incomplete`, and then no mean over tasks is
/// given (never an average over fewer seeds or tasks). Writes `tune.json` and `tune.md`.
pub fn collect(dir: &Path) -> Result<TuneReport> {
    let p = read_plan(dir)?;
    let (finals, mut left) = select(dir)?;
    let grid = read_jobs(&Phase::Grid.jobs_file(dir))?;
    let mut tasks = Vec::new();
    let mut incomplete = Vec::new();
    for task in &p.tasks {
        let fin: Vec<&Job> = finals.iter().filter(|j| &j.task == task).collect();
        let not_done: Vec<Missing> = fin.iter().filter_map(|j| missing(j)).collect();
        if fin.is_empty() || !not_done.is_empty() {
            left.extend(not_done);
            incomplete.push(task.clone());
            continue;
        }
        let g: Vec<&Job> = grid.iter().filter(|j| &j.task == task).collect();
        let mut grid_acc = Vec::new();
        for j in &g {
            grid_acc.push((j.setting.clone(), crate::run::read_record(&j.out_dir)?.val_accuracy));
        }
        let best_i = g.iter().position(|j| j.setting == fin[0].setting).unwrap_or(0);
        let mut test = Vec::new();
        for j in &fin {
            test.push((j.seed, crate::run::read_record(&j.out_dir)?.test_accuracy));
        }
        let (mean, std) = mean_std(&test.iter().map(|t| t.1).collect::<Vec<_>>());
        let group = if p.vtab { vqt_core::data::files::vtab_group(task).map_err(anyhow::Error::msg)?.to_string() } else { "-".to_string() };
        tasks.push(TaskResult { task: task.clone(), group, grid: grid_acc, best: fin[0].setting.clone(), best_run: format!("grid-{best_i}"), test, mean, std });
    }
    let complete = incomplete.is_empty();
    let mut group_means = Vec::new();
    if complete {
        for g in ["Natural", "Specialized", "Structured"] {
            let v: Vec<f64> = tasks.iter().filter(|r| r.group == g).map(|r| r.mean).collect();
            if !v.is_empty() {
                group_means.push((g.to_string(), mean_std(&v).0));
            }
        }
    }
    let task_mean = complete.then(|| mean_std(&tasks.iter().map(|r| r.mean).collect::<Vec<_>>()).0);
    let group_mean = (!group_means.is_empty()).then(|| mean_std(&group_means.iter().map(|g| g.1).collect::<Vec<_>>()).0);
    let r = TuneReport { tasks, group_means, task_mean, group_mean, incomplete, missing: left };
    write_text(&dir.join(REPORT_FILE), &serde_json::to_string_pretty(&r)?)?;
    write_text(&dir.join("tune.md"), &markdown(&r))?;
    Ok(r)
}

/// The local executor: runs `jobs` as child processes (their exact commands), at most `workers`
/// at a time, each one's output in `<dir>/logs/<id>.log`. Returns the ids of the jobs that
/// failed (a failure does not stop the others; the report lists them).
pub fn run_local(dir: &Path, jobs: &[Job], workers: usize) -> Result<Vec<String>> {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| logs.display().to_string())?;
    let mut queue = jobs.iter();
    let mut running: Vec<(&Job, std::process::Child, PathBuf)> = Vec::new();
    let mut failed = Vec::new();
    loop {
        while running.len() < workers.max(1) {
            let Some(j) = queue.next() else { break };
            let log = logs.join(format!("{}.log", j.id.replace('/', "-")));
            let file = std::fs::File::create(&log).with_context(|| log.display().to_string())?;
            let child = std::process::Command::new(&j.argv[0])
                .args(&j.argv[1..])
                .current_dir(&j.cwd)
                .stdin(std::process::Stdio::null())
                .stdout(file.try_clone()?)
                .stderr(file)
                .spawn()
                .with_context(|| format!("job {}: {}", j.id, j.argv[0]))?;
            running.push((j, child, log));
        }
        if running.is_empty() {
            break;
        }
        let mut i = 0;
        let mut finished = false;
        while i < running.len() {
            if let Some(status) = running[i].1.try_wait()? {
                let (j, _, log) = running.swap_remove(i);
                finished = true;
                if status.success() {
                    eprintln!("{}: done", j.id);
                } else {
                    let last = std::fs::read_to_string(&log).ok().and_then(|t| t.lines().last().map(String::from)).unwrap_or_default();
                    eprintln!("{}: failed ({status}): {last} [{}]", j.id, log.display());
                    failed.push(j.id.clone());
                }
            } else {
                i += 1;
            }
        }
        if !finished {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    Ok(failed)
}

/// Runs the whole sweep in `dir` on this machine: the grid jobs, the selection, the final jobs,
/// the report. Jobs already complete cost nothing; an interrupted one resumes.
pub fn execute_local(dir: &Path, workers: usize) -> Result<TuneReport> {
    let grid = read_jobs(&Phase::Grid.jobs_file(dir))?;
    run_local(dir, &grid, workers)?;
    let (finals, _) = select(dir)?;
    run_local(dir, &finals, workers)?;
    collect(dir)
}

/// What the SLURM executor did.
#[derive(Debug)]
pub enum SlurmOutcome {
    /// A phase's job array and the follow-up job (selection, or the report) were submitted;
    /// `tune.json` appears when the chain has run.
    Submitted {
        /// The phase submitted.
        phase: Phase,
        /// Its array job id.
        array: String,
        /// The dependent follow-up job id.
        follow_up: String,
    },
    /// Nothing left to submit: the report, as written.
    Done(TuneReport),
}

/// The sbatch script of a phase (from the committed template `scripts/slurm/array.sbatch`):
/// array task N runs line N of the phase's job file through `vqt-train job`.
pub const SBATCH_TEMPLATE: &str = include_str!("../../../scripts/slurm/array.sbatch");

fn sbatch(args: &[String], script: Option<&Path>) -> Result<String> {
    let mut cmd = std::process::Command::new("sbatch");
    cmd.arg("--parsable").args(args);
    if let Some(s) = script {
        cmd.arg(s);
    }
    let out = cmd.output().map_err(|e| anyhow::anyhow!("sbatch: {e} (is SLURM installed here, and sbatch on PATH?)"))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    anyhow::ensure!(out.status.success(), "sbatch {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim().lines().last().unwrap_or("failed"));
    // `--parsable` prints `id` or `id;cluster`; with --wait the id comes first.
    let id = text.lines().next().unwrap_or("").split(';').next().unwrap_or("").trim().to_string();
    anyhow::ensure!(id.chars().all(|c| c.is_ascii_digit()) && !id.is_empty(), "sbatch printed `{text}`, not a job id");
    Ok(id)
}

/// The SLURM executor: submits the next unfinished phase of the sweep in `dir` as one job array
/// (`sbatch --array=0-(N-1)`) with `slurm`'s partition, time limit and cpus/gpus per task. Then,
/// unless `slurm.no_chain`, a follow-up job with `--dependency=afterok:<array>` that runs
/// `vqt-train tune --run <dir> --executor slurm` (after the grid: the selection and the final
/// array) or `vqt-train tune --collect <dir>` (after the final phase). With `wait`, each array
/// is submitted with `sbatch --wait` and this process goes on with the next phase itself,
/// returning the report.
pub fn execute_slurm(dir: &Path, slurm: &crate::config::SlurmConfig, wait: bool) -> Result<SlurmOutcome> {
    let p = read_plan(dir)?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| logs.display().to_string())?;
    let mut submitted_final = false;
    let mut submitted_grid = false;
    loop {
        let grid = read_jobs(&Phase::Grid.jobs_file(dir))?;
        let grid_left = grid.iter().any(|j| missing(j).is_some());
        let (phase, jobs) = if grid_left && !submitted_grid {
            submitted_grid = true;
            (Phase::Grid, grid)
        } else {
            let (finals, _) = select(dir)?;
            if finals.iter().any(|j| missing(j).is_some()) && !submitted_final {
                submitted_final = true;
                (Phase::Final, finals)
            } else {
                return Ok(SlurmOutcome::Done(collect(dir)?));
            }
        };
        let script = dir.join("slurm").join(format!("{}.sbatch", phase.name()));
        let text = SBATCH_TEMPLATE
            .replace("@VQT_TRAIN@", &shlex::try_quote(&p.launch.exe.display().to_string())?)
            .replace("@JOBS@", &shlex::try_quote(&phase.jobs_file(dir).display().to_string())?);
        write_text(&script, &text)?;
        let mut args = vec![
            format!("--array=0-{}", jobs.len() - 1),
            format!("--job-name=vqt-{}", phase.name()),
            format!("--output={}", logs.join("slurm-%x-%A_%a.out").display()),
            format!("--chdir={}", p.cwd.display()),
        ];
        args.extend(slurm.sbatch_args());
        if wait {
            args.push("--wait".into());
            // A failed array task makes `sbatch --wait` exit non-zero: the report lists it.
            if let Err(e) = sbatch(&args, Some(&script)) {
                eprintln!("{} phase: {e:#}", phase.name());
            }
            continue;
        }
        let array = sbatch(&args, Some(&script))?;
        if slurm.no_chain {
            return Ok(SlurmOutcome::Submitted { phase, array, follow_up: String::new() });
        }
        let mut next: Vec<String> = vec![p.launch.exe.display().to_string()];
        next.extend(p.launch.global.iter().cloned());
        next.extend(["tune".to_string(), if phase == Phase::Grid { "--run" } else { "--collect" }.into(), dir.display().to_string()]);
        if phase == Phase::Grid {
            next.extend(["--executor".to_string(), "slurm".into()]);
            next.extend(slurm.cli_args());
        }
        let wrap = next.iter().map(|a| shlex::try_quote(a).map(|q| q.into_owned())).collect::<Result<Vec<_>, _>>()?.join(" ");
        let mut fargs = vec![
            format!("--dependency=afterok:{array}"),
            format!("--job-name=vqt-{}", if phase == Phase::Grid { "select" } else { "collect" }),
            format!("--output={}", logs.join("slurm-%x-%j.out").display()),
            format!("--chdir={}", p.cwd.display()),
        ];
        fargs.extend(slurm.sbatch_args_without_resources());
        fargs.push(format!("--wrap={wrap}"));
        let follow_up = sbatch(&fargs, None)?;
        return Ok(SlurmOutcome::Submitted { phase, array, follow_up });
    }
}

/// `vqt-train job --file F --index N`: line N (0-based) of a job file, for a SLURM array task
/// (`$SLURM_ARRAY_TASK_ID`) or any other executor.
pub fn job_at(file: &Path, index: usize) -> Result<Job> {
    let jobs = read_jobs(file)?;
    anyhow::ensure!(!jobs.is_empty(), "{}: no jobs (missing or empty file)", file.display());
    jobs.get(index).cloned().ok_or_else(|| anyhow::anyhow!("{}: no job {index} (the file has jobs 0..{})", file.display(), jobs.len() - 1))
}

/// The markdown table: one row per complete task, the group means and both VTAB averages when
/// every task is complete; otherwise the incomplete tasks and every missing job, first.
pub fn markdown(r: &TuneReport) -> String {
    let mut s = String::new();
    if !r.missing.is_empty() || !r.incomplete.is_empty() {
        s += &format!(
            "**Incomplete**: {} job(s) have not finished, so {} task(s) have no row and no mean over tasks is given (rerun the executor, or `vqt-train tune --collect DIR` once they finish):\n\n",
            r.missing.len(),
            r.incomplete.len()
        );
        for m in &r.missing {
            s += &format!("- `{}`: {} ({})\n", m.id, m.state, m.out_dir.display());
        }
        s += "\n";
    }
    s += "| task | group | val200 acc % per grid setting | chosen on val200 | test acc % (mean ± std) | seeds |\n|---|---|---|---|---:|---|\n";
    for t in &r.tasks {
        s += &format!(
            "| {} | {} | {} | {} | {:.2} ± {:.2} | {} |\n",
            t.task,
            t.group,
            if t.grid.is_empty() { "–".into() } else { t.grid.iter().map(|(set, acc)| format!("{}: {acc:.1}", set.join(" "))).collect::<Vec<_>>().join("; ") },
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
    let Some(task_mean) = r.task_mean else {
        return s;
    };
    s += &format!("- **Mean over the {} tasks**: {task_mean:.2}\n", r.tasks.len());
    if let Some(g) = r.group_mean {
        s += &format!("- **Mean of the {} group means**: {g:.2}\n", r.group_means.len());
    }
    s += "\nTest accuracy at the final epoch of runs trained on train800 + val200; settings chosen on val200 only (train800 runs).\n";
    s
}
