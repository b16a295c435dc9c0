//! Training checkpoints: the trainable parameters only (safetensors, stable names, a few KB to
//! MB) as burn-train's model checkpointer, and the optimizer and LR-scheduler state as burnpack
//! files. Burn keeps optimizer state only for tensors that receive gradients, so those are small
//! too.
//!
//! Every checkpoint file is written atomically (temporary file + rename, removed on failure) and
//! then sealed: its sha256 goes into `<file>.sha256`. An epoch's checkpoint is usable only when
//! all three of its files match their seals, so a file torn by a crash or a full disk, or damaged
//! later, is never resumed from: `--resume` falls back to the newest usable epoch.

use burn::module::Module;
use burn::store::ModuleRecord;
use burn::train::checkpoint::{Checkpoint, Checkpointer, CheckpointerError};
use std::path::{Path, PathBuf};
use vqt_models::tuners::{load_trainable, save_trainable};
use vqt_models::TrunkModel;

/// Name of the optimizer-state files (`optim-<epoch>.bpk`).
pub const OPTIM: &str = "optim";
/// Name of the LR-scheduler-state files (`scheduler-<epoch>.bpk`).
pub const SCHEDULER: &str = "scheduler";

/// Saves/restores the learner's model as its trainable tensors only; the frozen rest comes from
/// `template` (the model as built, on the autodiff device).
pub struct TrainableCheckpointer {
    dir: PathBuf,
    template: TrunkModel,
}

/// What a checkpoint folder holds.
#[derive(Debug, Default, PartialEq)]
pub struct Scan {
    /// The newest epoch whose three files match their seals.
    pub usable: Option<usize>,
    /// Newer epochs that cannot be used, with the reason (newest first).
    pub damaged: Vec<(usize, String)>,
}

impl TrainableCheckpointer {
    /// Checkpoints under `dir` as `trainable-<epoch>.safetensors`.
    pub fn new(dir: &Path, template: TrunkModel) -> Self {
        Self { dir: dir.to_path_buf(), template }
    }

    /// The trainable-parameter file of `epoch`.
    pub fn path(dir: &Path, epoch: usize) -> PathBuf {
        dir.join(format!("trainable-{epoch}.safetensors"))
    }

    /// The three files of `epoch`'s checkpoint.
    fn files(dir: &Path, epoch: usize) -> [PathBuf; 3] {
        [Self::path(dir, epoch), StateCheckpointer::file(dir, OPTIM, epoch), StateCheckpointer::file(dir, SCHEDULER, epoch)]
    }

    /// The latest epoch with a usable checkpoint (all three files present and matching their
    /// seals).
    pub fn latest(dir: &Path) -> Option<usize> {
        Self::scan(dir).usable
    }

    /// Every epoch that has any checkpoint file in `dir`, checked newest first down to the first
    /// usable one.
    pub fn scan(dir: &Path) -> Scan {
        let Ok(entries) = std::fs::read_dir(dir) else { return Scan::default() };
        let mut epochs: Vec<usize> = entries
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let stem = name.strip_suffix(".safetensors").or_else(|| name.strip_suffix(".bpk"))?;
                let (_, epoch) = stem.rsplit_once('-')?;
                epoch.parse().ok()
            })
            .collect();
        epochs.sort_unstable();
        epochs.dedup();
        let mut scan = Scan::default();
        for &epoch in epochs.iter().rev() {
            match Self::files(dir, epoch).iter().try_for_each(|f| verify(f)) {
                Ok(()) => {
                    scan.usable = Some(epoch);
                    break;
                }
                Err(why) => scan.damaged.push((epoch, why)),
            }
        }
        scan
    }
}

/// `<file>.sha256`.
fn seal_path(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".sha256");
    PathBuf::from(s)
}

/// Writes `file`'s seal.
fn seal(file: &Path) -> std::io::Result<()> {
    let sha = vqt_core::hash::sha256_file(file)?;
    vqt_core::fs::write_atomic(&seal_path(file), sha.as_bytes())
}

/// Checks `file` against its seal; the error says which file and what is wrong.
fn verify(file: &Path) -> Result<(), String> {
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !file.is_file() {
        return Err(format!("{name} is missing"));
    }
    let Ok(want) = std::fs::read_to_string(seal_path(file)) else { return Err(format!("{name} has no seal (written incompletely)")) };
    match vqt_core::hash::sha256_file(file) {
        Ok(got) if got == want.trim() => Ok(()),
        Ok(_) => Err(format!("{name} does not match its sha256 seal (truncated or damaged)")),
        Err(e) => Err(format!("{name}: {e}")),
    }
}

/// Removes `file` and its seal (absent files are fine).
fn remove_sealed(file: &Path) -> Result<(), CheckpointerError> {
    for f in [seal_path(file), file.to_path_buf()] {
        match std::fs::remove_file(&f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(CheckpointerError::IOError(e)),
            _ => {}
        }
    }
    Ok(())
}

fn other(e: impl std::fmt::Display) -> CheckpointerError {
    CheckpointerError::Unknown(e.to_string())
}

impl Checkpointer<ModuleRecord> for TrainableCheckpointer {
    fn save(&self, epoch: usize, record: ModuleRecord) -> Result<(), CheckpointerError> {
        std::fs::create_dir_all(&self.dir).map_err(CheckpointerError::IOError)?;
        let model = self.template.clone().try_load_record(record).map_err(CheckpointerError::Record)?;
        let path = Self::path(&self.dir, epoch);
        save_trainable(&model, &path).map_err(other)?;
        seal(&path).map_err(CheckpointerError::IOError)
    }

    fn delete(&self, epoch: usize) -> Result<(), CheckpointerError> {
        remove_sealed(&Self::path(&self.dir, epoch))
    }

    fn restore(&self, epoch: usize) -> Result<ModuleRecord, CheckpointerError> {
        let path = Self::path(&self.dir, epoch);
        verify(&path).map_err(other)?;
        let model = load_trainable(self.template.clone(), &path).map_err(other)?;
        Ok(model.into_record())
    }
}

/// Optimizer or scheduler state as `<name>-<epoch>.bpk` (burnpack bytes), written atomically and
/// sealed.
pub struct StateCheckpointer {
    dir: PathBuf,
    name: &'static str,
}

impl StateCheckpointer {
    /// `<dir>/<name>-<epoch>.bpk`.
    pub fn new(dir: &Path, name: &'static str) -> Self {
        Self { dir: dir.to_path_buf(), name }
    }

    /// The file of `epoch`.
    pub fn file(dir: &Path, name: &str, epoch: usize) -> PathBuf {
        dir.join(format!("{name}-{epoch}.bpk"))
    }
}

impl<R: Checkpoint> Checkpointer<R> for StateCheckpointer {
    fn save(&self, epoch: usize, record: R) -> Result<(), CheckpointerError> {
        let path = Self::file(&self.dir, self.name, epoch);
        let bytes = record.checkpoint_into_bytes().map_err(CheckpointerError::Record)?;
        vqt_core::fs::write_atomic(&path, &bytes).map_err(CheckpointerError::IOError)?;
        seal(&path).map_err(CheckpointerError::IOError)
    }

    fn delete(&self, epoch: usize) -> Result<(), CheckpointerError> {
        remove_sealed(&Self::file(&self.dir, self.name, epoch))
    }

    fn restore(&self, epoch: usize) -> Result<R, CheckpointerError> {
        let path = Self::file(&self.dir, self.name, epoch);
        verify(&path).map_err(other)?;
        let bytes = std::fs::read(&path).map_err(CheckpointerError::IOError)?;
        R::checkpoint_from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes)).map_err(CheckpointerError::Record)
    }
}
