//! `TrunkModel`: a frozen backbone read by a query-side method (linear probe, VQT, SynQT).
//!
//! This is the *trunk path* of DESIGN.md: the backbone's parameters are frozen plain tensors,
//! every backbone computation runs without autodiff, and only the method's parameters are on the
//! tape. The model trains from images (the trunk runs every step) or from cached trunk features
//! ([`TrunkInput::Cached`]): both give the same logits, so the cache changes nothing but time.

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
}

impl TrunkModel {
    /// Freezes `backbone` (no gradients, no dropout) and pairs it with `method`.
    pub fn new(backbone: Vit, method: QueryMethod) -> Self {
        Self { backbone: backbone.freeze(), method, noise: TrunkNoise::default() }
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
        match input {
            TrunkInput::Images(x) => self.backbone.forward_kv_noisy(x.without_autodiff(), noise),
            TrunkInput::Cached(_) if !noise.is_off() => panic!("the feature cache needs a deterministic trunk (faithful mode is on)"),
            TrunkInput::Cached(t) => TrunkKv {
                kv: t.kv.into_iter().map(|(k, v)| (k.without_autodiff(), v.without_autodiff())).collect(),
                cls: t.cls.without_autodiff(),
            },
        }
    }

    /// Logits for a batch input (deterministic trunk).
    pub fn forward(&self, input: TrunkInput) -> Tensor<2> {
        let trunk = self.trunk(input);
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
        let trunk = self.trunk_with(batch.input, noise);
        let logits = self.method.forward(&self.backbone, &trunk);
        let targets = batch.targets.to_device(&logits.device());
        let mut loss = CrossEntropyLossConfig::new().init(&logits.device()).forward(logits.clone(), targets.clone());
        if let Some(p) = self.method.penalty() {
            loss = loss + p;
        }
        ClassificationOutput::new(loss, logits, targets)
    }

    /// Trainable parameter count (the method's; the backbone is frozen).
    pub fn num_trainable(&self) -> usize {
        self.method.num_params()
    }
}

impl TrainStep for TrunkModel {
    type Input = TrunkBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: TrunkBatch) -> TrainOutput<ClassificationOutput> {
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
