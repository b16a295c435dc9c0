//! `TrunkModel`: a frozen backbone read by a query-side method (linear probe, VQT, SynQT).
//!
//! This is the *trunk path* of DESIGN.md: the backbone's parameters are frozen plain tensors,
//! every backbone computation runs without autodiff, and only the method's parameters are on the
//! tape. The model trains from images (the trunk runs every step) or from cached trunk features
//! ([`TrunkInput::Cached`]): both give the same logits, so the cache changes nothing but time.

use crate::query::{Synqt, Vqt};
use crate::vit::{TrunkKv, Vit};
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
}

impl TrunkModel {
    /// Freezes `backbone` (no gradients, no dropout) and pairs it with `method`.
    pub fn new(backbone: Vit, method: QueryMethod) -> Self {
        Self { backbone: backbone.freeze(), method }
    }

    /// The trunk's outputs for this input, as constants for the query side.
    pub fn trunk(&self, input: TrunkInput) -> TrunkKv {
        match input {
            TrunkInput::Images(x) => self.backbone.forward_kv(x.without_autodiff()),
            TrunkInput::Cached(t) => TrunkKv {
                kv: t.kv.into_iter().map(|(k, v)| (k.without_autodiff(), v.without_autodiff())).collect(),
                cls: t.cls.without_autodiff(),
            },
        }
    }

    /// Logits for a batch input.
    pub fn forward(&self, input: TrunkInput) -> Tensor<2> {
        let trunk = self.trunk(input);
        self.method.forward(&self.backbone, &trunk)
    }

    /// Logits, mean cross-entropy (plus the method's penalty, if any) and targets.
    pub fn forward_classification(&self, batch: TrunkBatch) -> ClassificationOutput {
        let logits = self.forward(batch.input);
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
        let out = self.forward_classification(batch);
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
