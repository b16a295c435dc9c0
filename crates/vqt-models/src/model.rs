//! `TrunkModel`: a backbone read by a query-side method (linear probe, VQT, SynQT), optionally
//! with backbone tuners (LoRA, AdaptFormer, VPT, SSF, BitFit, adapters, full fine-tuning).
//!
//! The model picks its path from its composition:
//! - **Trunk path** ([`TrunkModel::new`]): no tuner; the backbone's parameters are frozen plain
//!   tensors, every backbone computation runs without autodiff, and only the method's
//!   parameters are on the tape. It trains from images (the trunk runs every step) or from
//!   cached trunk features ([`TrunkInput::Cached`]): both give the same logits, so the cache
//!   changes nothing but time.
//! - **Full path** ([`TrunkModel::tuned`]): tuners were injected ([`crate::tuners`]), so the
//!   trunk depends on trainable tensors and runs on the tape. Frozen backbone tensors still get
//!   no gradient and no optimizer state; the cache is not available.

use crate::query::{Synqt, Vqt};
use crate::vit::{TrunkKv, TrunkNoise, Vit};
use burn::module::Module;
use burn::nn::Linear;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Int, Tensor};
use burn::train::{ClassificationOutput, InferenceStep, TrainOutput, TrainStep};

/// The trainable part on the trunk path.
#[derive(Module, Debug)]
pub enum QueryMethod {
    /// Linear probe on the final normalised class token.
    Linear(Linear),
    /// Visual Query Tuning.
    Vqt(Vqt),
    /// SynQT.
    Synqt(Synqt),
}

impl QueryMethod {
    /// Logits from the trunk's outputs.
    pub fn forward(&self, backbone: &Vit, trunk: &TrunkKv) -> Tensor<2> {
        match self {
            QueryMethod::Linear(head) => head.forward(trunk.cls.clone()),
            QueryMethod::Vqt(v) => v.forward(backbone, trunk),
            QueryMethod::Synqt(s) => s.forward(backbone, trunk),
        }
    }

    /// Whether the method reads the trunk's keys and values (VQT and SynQT do; the linear head
    /// reads the final class token only, so its trunk passes neither copy nor keep them).
    pub fn reads_kv(&self) -> bool {
        !matches!(self, QueryMethod::Linear(_))
    }

    /// An extra loss term the method defines (VQT's group lasso in the compress stage).
    pub fn penalty(&self) -> Option<Tensor<1>> {
        match self {
            QueryMethod::Vqt(v) => v.penalty(),
            _ => None,
        }
    }

    /// Short name for logs and records.
    pub fn name(&self) -> &'static str {
        match self {
            QueryMethod::Linear(_) => "linear",
            QueryMethod::Vqt(_) => "vqt",
            QueryMethod::Synqt(_) => "synqt",
        }
    }
}

/// What a batch feeds the trunk path.
#[derive(Clone, Debug)]
pub enum TrunkInput {
    /// Images `[B, C, H, W]`: the frozen trunk runs (without autodiff) on every step.
    Images(Tensor<4>),
    /// Trunk outputs computed ahead of time (the feature cache).
    Cached(TrunkKv),
}

/// One batch on the trunk path.
#[derive(Clone, Debug)]
pub struct TrunkBatch {
    /// Images or cached trunk features.
    pub input: TrunkInput,
    /// Class ids `[B]`.
    pub targets: Tensor<1, Int>,
    /// Training: re-seed the device before this batch's forward pass, so its dropout and
    /// drop-path draws depend on the batch (the loader derives it from the run seed, the epoch
    /// and the batch's rows), not on how many draws came before. A resumed run then repeats the
    /// uninterrupted run's masks exactly.
    pub rng_seed: Option<u64>,
}

/// Frozen backbone + query-side method.
#[derive(Module, Debug)]
pub struct TrunkModel {
    /// The frozen backbone (parameters never require grad; see [`TrunkModel::new`]).
    pub backbone: Vit,
    /// The trainable method.
    pub method: QueryMethod,
    /// Trunk randomness applied in training steps only (faithful mode); off by default.
    pub noise: TrunkNoise,
    /// True when the backbone carries trainable tensors (tuners, BitFit, full fine-tuning):
    /// the trunk then runs with autodiff (the full path).
    pub full_path: bool,
    /// On the full path: the leading blocks no tuner touches (`tuners.layers`), run with the
    /// embedding off the autodiff tape ([`Vit::forward_kv_split`]); 0 runs every block on it.
    pub frozen_prefix: usize,
}

impl TrunkModel {
    /// Freezes `backbone` (no gradients, no dropout) and pairs it with `method`.
    pub fn new(backbone: Vit, method: QueryMethod) -> Self {
        crate::materialize(&backbone);
        crate::materialize(&method);
        Self { backbone: backbone.freeze(), method, noise: TrunkNoise::default(), full_path: false, frozen_prefix: 0 }
    }

    /// Pairs a backbone whose tuners were injected by [`crate::tuners::TunersConfig::inject`]
    /// with `method`, jointly trained on the full path (with an empty tuner set this is
    /// [`TrunkModel::new`]). The model is returned in training state on the autodiff context of
    /// its device ([`Module::train`]): tuner tensors (and the backbone tensors BitFit or full
    /// fine-tuning re-enabled) require gradients, frozen tensors do not.
    pub fn tuned(backbone: Vit, tuners: &crate::tuners::TunersConfig, method: QueryMethod) -> Self {
        if tuners.is_empty() {
            return Self::new(backbone, method);
        }
        crate::materialize(&backbone);
        crate::materialize(&method);
        let frozen_prefix = tuners.frozen_prefix(backbone.depth());
        Self { backbone, method, noise: TrunkNoise::default(), full_path: true, frozen_prefix }.train()
    }

    /// The same model with its VQT method replaced by `f(vqt)` (the Head2Toe stages,
    /// [`Vqt::into_compress_stage`], [`Vqt::into_selected`]); an error for other methods.
    pub fn map_vqt(self, f: impl FnOnce(Vqt) -> Result<Vqt, String>) -> Result<Self, String> {
        match self.method {
            QueryMethod::Vqt(v) => Ok(Self { method: QueryMethod::Vqt(f(v)?), ..self }),
            other => Err(format!("Head2Toe feature selection needs a VQT model, not {}", other.name())),
        }
    }

    /// The same model with training-time trunk randomness (faithful mode).
    pub fn with_noise(mut self, noise: TrunkNoise) -> Self {
        self.noise = noise;
        self
    }

    /// The trunk's outputs for this input, as constants for the query side (deterministic).
    pub fn trunk(&self, input: TrunkInput) -> TrunkKv {
        self.trunk_with(input, TrunkNoise::default())
    }

    /// The trunk's outputs with the given trunk randomness. Cached inputs are only valid for a
    /// deterministic trunk: asking for noise on them is a programming error (configs reject
    /// `cache != off` with faithful mode before any model is built).
    pub fn trunk_with(&self, input: TrunkInput, noise: TrunkNoise) -> TrunkKv {
        self.trunk_pass(input, noise, true)
    }

    /// The trunk pass of [`TrunkModel::trunk_with`]; from images, each layer's keys and values
    /// only when `keep_kv` (the logits pass asks for them only when the method reads them).
    fn trunk_pass(&self, input: TrunkInput, noise: TrunkNoise, keep_kv: bool) -> TrunkKv {
        match input {
            TrunkInput::Images(x) if self.full_path => self.backbone.trunk_pass(x, noise, self.frozen_prefix, keep_kv),
            TrunkInput::Images(x) => self.backbone.trunk_pass(x.without_autodiff(), noise, 0, keep_kv),
            TrunkInput::Cached(_) if self.full_path => panic!("the feature cache needs a frozen trunk, but this model tunes the backbone"),
            TrunkInput::Cached(_) if !noise.is_off() => panic!("the feature cache needs a deterministic trunk (faithful mode is on)"),
            TrunkInput::Cached(t) => TrunkKv {
                kv: t.kv.into_iter().map(|(k, v)| (k.without_autodiff(), v.without_autodiff())).collect(),
                cls: t.cls.without_autodiff(),
                rows: t.rows,
            },
        }
    }

    /// Logits for a batch input (deterministic trunk).
    pub fn forward(&self, input: TrunkInput) -> Tensor<2> {
        self.logits(input, TrunkNoise::default())
    }

    /// Logits with the given trunk randomness. VQT over images: without autodiff (inference)
    /// its queries ride along in the trunk's products ([`Vqt::forward_images`]: the same
    /// logits to rounding, without copying out any layer's keys and values); in training on
    /// the trunk path each layer's query side runs as soon as the frozen trunk has produced
    /// that layer's keys and values ([`Vqt::forward_streaming`]: the same logits, one layer's
    /// keys and values held at a time). Otherwise the trunk pass and the method run apart.
    fn logits(&self, input: TrunkInput, noise: TrunkNoise) -> Tensor<2> {
        if let (TrunkInput::Images(images), QueryMethod::Vqt(vqt)) = (&input, &self.method) {
            let plain = !vqt.queries.device().is_autodiff() && !self.backbone.cls_token.device().is_autodiff();
            if plain && noise.is_off() {
                return vqt.forward_images(&self.backbone, images.clone());
            }
            if !self.full_path {
                return vqt.forward_streaming(&self.backbone, images.clone().without_autodiff(), noise);
            }
        }
        let trunk = self.trunk_pass(input, noise, self.method.reads_kv());
        self.method.forward(&self.backbone, &trunk)
    }

    /// Logits, mean cross-entropy (plus the method's penalty, if any) and targets, with a
    /// deterministic trunk (evaluation).
    pub fn forward_classification(&self, batch: TrunkBatch) -> ClassificationOutput {
        self.classification(batch, TrunkNoise::default())
    }

    /// As [`TrunkModel::forward_classification`], with this model's training-time trunk noise.
    pub fn forward_training(&self, batch: TrunkBatch) -> ClassificationOutput {
        self.classification(batch, self.noise.clone())
    }

    fn classification(&self, batch: TrunkBatch, noise: TrunkNoise) -> ClassificationOutput {
        let logits = self.logits(batch.input, noise);
        let targets = batch.targets.to_device(&logits.device());
        let mut loss = CrossEntropyLossConfig::new().init(&logits.device()).forward(logits.clone(), targets.clone());
        if let Some(p) = self.method.penalty() {
            loss = loss + p;
        }
        ClassificationOutput::new(loss, logits, targets)
    }

    /// Trainable parameter count: the method's plus, on the full path, the backbone tensors
    /// that require gradients (those are only visible once the model is on an autodiff device,
    /// as the learner trains it; on a plain device the count covers the method only).
    pub fn num_trainable(&self) -> usize {
        if self.full_path {
            let (backbone, _) = crate::tuners::param_counts(&self.backbone);
            backbone + self.method.num_params()
        } else {
            self.method.num_params()
        }
    }
}

impl TrainStep for TrunkModel {
    type Input = TrunkBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: TrunkBatch) -> TrainOutput<ClassificationOutput> {
        if let Some(seed) = batch.rng_seed {
            let device = batch.targets.device();
            device.clone().without_autodiff().seed(seed);
            device.seed(seed);
        }
        let out = self.forward_training(batch);
        TrainOutput::new(self, out.loss.backward(), out)
    }
}

impl InferenceStep for TrunkModel {
    type Input = TrunkBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: TrunkBatch) -> ClassificationOutput {
        self.forward_classification(batch)
    }
}
