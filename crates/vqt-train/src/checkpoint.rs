//! Checkpoints that hold only the trainable parameters (safetensors, stable names, a few KB to
//! MB), plugged into burn-train's learner as its model checkpointer. Optimizer and scheduler
//! state use burn-train's own file checkpointers; Burn keeps optimizer state only for tensors
//! that receive gradients, so those files are small too.

use burn::module::Module;
use burn::store::ModuleRecord;
use burn::train::checkpoint::{Checkpointer, CheckpointerError};
use std::path::{Path, PathBuf};
use vqt_models::tuners::{load_trainable, save_trainable};
use vqt_models::TrunkModel;

/// Saves/restores the learner's model as its trainable tensors only; the frozen rest comes from
/// `template` (the model as built, on the autodiff device).
pub struct TrainableCheckpointer {
    dir: PathBuf,
    template: TrunkModel,
}

impl TrainableCheckpointer {
    /// Checkpoints under `dir` as `trainable-<epoch>.safetensors`.
    pub fn new(dir: &Path, template: TrunkModel) -> Self {
        Self { dir: dir.to_path_buf(), template }
    }

    /// The file of `epoch`.
    pub fn path(dir: &Path, epoch: usize) -> PathBuf {
        dir.join(format!("trainable-{epoch}.safetensors"))
    }

    /// The latest epoch with a complete checkpoint (trainable, optimizer and scheduler files).
    pub fn latest(dir: &Path) -> Option<usize> {
        let entries = std::fs::read_dir(dir).ok()?;
        entries
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let epoch: usize = name.strip_prefix("trainable-")?.strip_suffix(".safetensors")?.parse().ok()?;
                let complete = dir.join(format!("optim-{epoch}.bpk")).is_file() && dir.join(format!("scheduler-{epoch}.bpk")).is_file();
                complete.then_some(epoch)
            })
            .max()
    }
}

fn other(e: impl std::fmt::Display) -> CheckpointerError {
    CheckpointerError::Unknown(e.to_string())
}

impl Checkpointer<ModuleRecord> for TrainableCheckpointer {
    fn save(&self, epoch: usize, record: ModuleRecord) -> Result<(), CheckpointerError> {
        std::fs::create_dir_all(&self.dir).map_err(CheckpointerError::IOError)?;
        let model = self.template.clone().try_load_record(record).map_err(CheckpointerError::Record)?;
        save_trainable(&model, &Self::path(&self.dir, epoch)).map_err(other)?;
        Ok(())
    }

    fn delete(&self, epoch: usize) -> Result<(), CheckpointerError> {
        match std::fs::remove_file(Self::path(&self.dir, epoch)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CheckpointerError::IOError(e)),
            _ => Ok(()),
        }
    }

    fn restore(&self, epoch: usize) -> Result<ModuleRecord, CheckpointerError> {
        let model = load_trainable(self.template.clone(), &Self::path(&self.dir, epoch)).map_err(other)?;
        Ok(model.into_record())
    }
}
