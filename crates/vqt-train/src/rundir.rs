//! The output directory of one run: one writer at a time (a lock), what was started there
//! (`started.json`: everything a `--resume` must match), and whether the run is complete.
//!
//! A directory is in one of three states: empty (nothing started), interrupted (`started.json`
//! without `run.json`) or complete (`run.json`, written last). Training into an interrupted or
//! complete run needs `--resume` (continue; refused for a complete one) or `--overwrite`
//! (start afresh).

use crate::config::ExperimentConfig;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The lock file; held (advisory `flock`) by the process writing the run.
pub const LOCK_FILE: &str = ".lock";
/// What the run was started with.
pub const STARTED_FILE: &str = "started.json";
/// The run record, written last: its presence marks a complete run.
pub const RUN_FILE: &str = "run.json";

/// Config keys that do not change a run's numbers, so a resumed run may differ in them.
const NOT_COMPARED: &[&str] = &["train.num_workers", "train.cache_file"];

/// Holds the directory's lock until dropped (the OS releases it if the process dies).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

/// Takes `out`'s lock (creating `out`), or fails in one line if another process holds it.
pub fn lock(out: &Path) -> Result<RunLock> {
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    let path = out.join(LOCK_FILE);
    let file = File::options().create(true).truncate(false).write(true).open(&path).with_context(|| path.display().to_string())?;
    match file.try_lock() {
        Ok(()) => Ok(RunLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "{}: another vqt-train process is writing a run here (it holds {}); wait for it to finish or pass another --out",
            out.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

/// What a run directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Nothing was started here.
    Empty,
    /// A run was started and did not finish.
    Interrupted,
    /// A run finished (`run.json`).
    Complete,
}

/// The state of `out`.
pub fn state(out: &Path) -> RunState {
    if out.join(RUN_FILE).is_file() {
        RunState::Complete
    } else if out.join(STARTED_FILE).is_file() || out.join("checkpoint").is_dir() {
        RunState::Interrupted
    } else {
        RunState::Empty
    }
}

/// Everything that determines a run's numbers: the resolved config, the backend, the precision
/// and the number of data-parallel devices.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunIdentity {
    /// The resolved config.
    pub config: Value,
    /// `--backend`.
    pub backend: String,
    /// `--precision`.
    pub precision: String,
    /// Devices of a data-parallel run (0 or 1: one device).
    pub devices: usize,
}

impl RunIdentity {
    /// The identity of a run of `cfg`.
    pub fn new(cfg: &ExperimentConfig, backend: &str, precision: &str, devices: usize) -> Self {
        let config = serde_json::to_value(cfg).expect("config serialises");
        Self { config, backend: backend.into(), precision: precision.into(), devices: devices.max(1) }
    }

    /// Writes `<out>/started.json`.
    pub fn write(&self, out: &Path) -> Result<()> {
        let path = out.join(STARTED_FILE);
        vqt_core::fs::write_atomic(&path, serde_json::to_string_pretty(self)?.as_bytes()).with_context(|| path.display().to_string())
    }

    /// Reads `<out>/started.json`.
    pub fn read(out: &Path) -> Result<Self> {
        let path = out.join(STARTED_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot tell what this run was started with", path.display()))?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The first key (in sorted order) whose value differs from `earlier`'s, as
    /// `(key, this value, earlier value)`; `None` when the two runs are the same run.
    pub fn first_difference(&self, earlier: &Self) -> Option<(String, String, String)> {
        let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
        flatten("", &self.config, &mut a);
        flatten("", &earlier.config, &mut b);
        for (flag, x, y) in [("--backend", &self.backend, &earlier.backend), ("--precision", &self.precision, &earlier.precision)] {
            a.insert(flag.to_string(), Value::String(x.clone()));
            b.insert(flag.to_string(), Value::String(y.clone()));
        }
        a.insert("--devices (count)".into(), self.devices.into());
        b.insert("--devices (count)".into(), earlier.devices.into());
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        let show = |v: Option<&Value>| v.map_or("(absent)".to_string(), |v| v.to_string());
        keys.into_iter()
            .filter(|k| !NOT_COMPARED.contains(&k.as_str()))
            .find(|k| a.get(*k) != b.get(*k))
            .map(|k| (k.clone(), show(a.get(k)), show(b.get(k))))
    }

    /// Refuses, in one line naming the first differing key, to resume the run in `out` with a
    /// different identity.
    pub fn check_resume(&self, out: &Path) -> Result<()> {
        let earlier = Self::read(out)?;
        if let Some((key, now, then)) = self.first_difference(&earlier) {
            anyhow::bail!(
                "--resume: {key} is {now} here, but the run in {} was started with {then} ({}): resume with the run's own settings, or start afresh with --overwrite",
                out.display(),
                out.join(STARTED_FILE).display()
            );
        }
        Ok(())
    }
}

/// Dotted keys of every leaf of `v` (tables by key, arrays as a whole).
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, x, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), v.clone());
        }
    }
}

/// Removes what an earlier run left in `out` (checkpoints, stage folders, logs, records), for a
/// fresh start; the lock stays.
pub fn clear(out: &Path, stage_dirs: &[PathBuf]) -> Result<()> {
    let mut paths: Vec<PathBuf> = ["checkpoint", "train", "valid", "epochs.json", RUN_FILE, STARTED_FILE, crate::run::TRAINABLE_FILE]
        .iter()
        .map(|p| out.join(p))
        .collect();
    paths.extend_from_slice(stage_dirs);
    for p in paths {
        let r = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        match r {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(anyhow::anyhow!("{}: {e}", p.display())),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_differing_key_is_named_and_speed_only_keys_are_ignored() {
        let id = |cfg: Value, backend: &str| RunIdentity { config: cfg, backend: backend.into(), precision: "f32".into(), devices: 1 };
        let a = id(serde_json::json!({"train": {"lr": 0.01, "seed": 1, "num_workers": 2}, "method": {"kind": "vqt"}}), "cpu");
        let b = id(serde_json::json!({"train": {"lr": 0.02, "seed": 1, "num_workers": 1}, "method": {"kind": "vqt"}}), "cpu");
        assert_eq!(a.first_difference(&b), Some(("train.lr".into(), "0.01".into(), "0.02".into())));
        let c = id(serde_json::json!({"train": {"lr": 0.01, "seed": 1, "num_workers": 8}, "method": {"kind": "vqt"}}), "cpu");
        assert_eq!(a.first_difference(&c), None);
        let d = id(serde_json::json!({"train": {"lr": 0.01, "seed": 1}, "method": {"kind": "vqt"}, "tuners": {"bitfit": true}}), "cpu");
        assert_eq!(a.first_difference(&d).unwrap().0, "tuners.bitfit");
        assert_eq!(a.first_difference(&id(a.config.clone(), "wgpu")).unwrap(), ("--backend".into(), "\"cpu\"".into(), "\"wgpu\"".into()));
    }

    #[test]
    fn one_writer_at_a_time() {
        let dir = vqt_core::testing::TestDir::new("lock");
        let first = lock(&dir).unwrap();
        let e = lock(&dir).unwrap_err().to_string();
        assert!(e.contains("another vqt-train process is writing a run here"), "{e}");
        drop(first);
        lock(&dir).unwrap();
    }
}
