//! Backbone tuners (methods.md §5): the PETL methods that change the backbone's computation.
//!
//! Each tuner has its own file and config type and is *injected* into a loaded [`Vit`] by
//! [`TunersConfig::inject`]: it freezes every backbone tensor, then adds the tuner modules (or,
//! for BitFit and full fine-tuning, re-enables gradients on the backbone tensors the method
//! trains). Any set of tuners composes, and any query method (VQT, SynQT) runs on top of the
//! tuned blocks: the blocks' own methods apply every per-token tuner to query rows too
//! (methods.md §6). With a tuner present the trunk depends on trainable tensors, so the model
//! takes the full autodiff path; frozen tensors still get no gradient and no optimizer state.

pub mod adapter;
pub mod adaptformer;
pub mod lora;
pub mod ssf;
pub mod vpt;

use crate::vit::Vit;
use adapter::{AdapterConfig, AdapterKind};
use adaptformer::AdaptFormerConfig;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::Tensor;
use lora::LoraConfig;
use serde::{Deserialize, Serialize};
use ssf::SsfConfig;
use std::path::Path;
use vpt::VptConfig;

/// Which tuners to inject (any subset; all absent = the frozen backbone).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunersConfig {
    /// LoRA on the fused qkv.
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    /// AdaptFormer beside every MLP.
    #[serde(default)]
    pub adaptformer: Option<AdaptFormerConfig>,
    /// Visual prompts.
    #[serde(default)]
    pub vpt: Option<VptConfig>,
    /// SSF scale-shift after every operation.
    #[serde(default)]
    pub ssf: Option<SsfConfig>,
    /// Houlsby or Pfeiffer serial adapters.
    #[serde(default)]
    pub adapter: Option<AdapterConfig>,
    /// BitFit: train every backbone bias (linear, patch-embedding and LayerNorm biases).
    #[serde(default)]
    pub bitfit: bool,
    /// Full fine-tuning: train every backbone tensor.
    #[serde(default)]
    pub full_finetune: bool,
    /// The blocks the tuners go into: a list of block indices (`[8, 9, 10, 11]`) or `"last:K"`
    /// (absent: every block). Every per-block tuner is added to those blocks only; SSF's and
    /// BitFit's patch-embedding tensors are tuned only with block 0 listed, their final-norm
    /// tensors only with the last block; VPT puts its prompts in before the lowest listed block
    /// (deep: a fresh set before each listed block); with `full_finetune` the listed blocks are
    /// trained (and the final norm with the last block). Blocks below the lowest listed one run
    /// off the autodiff tape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Layers>,
}

/// Which blocks the tuners go into (`tuners.layers`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Layers {
    /// Block indices, 0-based.
    List(Vec<usize>),
    /// `"last:K"`: the last K blocks.
    Spec(String),
}

impl Layers {
    /// The sorted block indices for a backbone of `depth` blocks; the error names
    /// `tuners.layers`.
    pub fn resolve(&self, depth: usize) -> Result<Vec<usize>, String> {
        let v = match self {
            Layers::List(v) => {
                if v.is_empty() {
                    return Err("tuners.layers lists no block".into());
                }
                let mut s = v.clone();
                s.sort_unstable();
                if s.windows(2).any(|w| w[0] == w[1]) {
                    return Err(format!("tuners.layers {v:?} lists a block twice"));
                }
                if let Some(&m) = s.iter().find(|&&m| m >= depth) {
                    return Err(format!("tuners.layers: block {m} does not exist (the backbone has blocks 0..{})", depth - 1));
                }
                s
            }
            Layers::Spec(text) => {
                let k = text
                    .strip_prefix("last:")
                    .and_then(|k| k.trim().parse::<usize>().ok())
                    .ok_or_else(|| format!("tuners.layers = \"{text}\": expected a list of block indices or \"last:K\""))?;
                if k == 0 || k > depth {
                    return Err(format!("tuners.layers = \"{text}\": K must be in 1..={depth} (the backbone's depth)"));
                }
                (depth - k..depth).collect()
            }
        };
        Ok(v)
    }

    /// Short form for method names: `last4`, `8-11`, `2,5,7`.
    pub fn label(&self) -> String {
        match self {
            Layers::Spec(s) => s.replace(':', ""),
            Layers::List(v) => {
                let mut s = v.clone();
                s.sort_unstable();
                let contiguous = s.windows(2).all(|w| w[1] == w[0] + 1);
                match (contiguous && s.len() > 2, s.first(), s.last()) {
                    (true, Some(a), Some(b)) => format!("{a}-{b}"),
                    _ => s.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(","),
                }
            }
        }
    }
}

/// The bottleneck pair of the adapter-style tuners: `Linear(d, b)` with the PyTorch default
/// weight init (kaiming-uniform, a = √5) and a zero bias, and `Linear(b, d)` all zeros, so the
/// adapter's contribution starts at exactly zero.
pub(crate) fn zero_up_bottleneck(d: usize, b: usize, device: &burn::tensor::Device) -> (burn::nn::Linear, burn::nn::Linear) {
    use burn::module::Initializer;
    use burn::nn::LinearConfig;
    let mut down = LinearConfig::new(d, b).init(device);
    down.bias = Some(Initializer::Zeros.init([b], device));
    let up = LinearConfig::new(b, d).with_initializer(Initializer::Zeros).init(device);
    (down, up)
}

/// Matches every bias of the backbone: `*.bias` (linear and conv) and `*.beta` (LayerNorm).
fn bias_group() -> ParamGroup {
    ParamGroup::from_regex(r"(^|\.)(bias|beta)$").expect("static regex")
}

/// The tensors of `blocks` (`blocks.M.*`) and of the final norm when `last`; with
/// `biases = Some(first)` only their biases, and the patch embedding's bias when `first`.
fn block_group(blocks: &[usize], biases: Option<bool>, last: bool) -> Result<ParamGroup, String> {
    let list = blocks.iter().map(|m| m.to_string()).collect::<Vec<_>>().join("|");
    let mut parts = vec![format!(r"blocks\.({list})\.")];
    if last {
        parts.push(r"norm\.".into());
    }
    if biases == Some(true) {
        parts.push(r"patch_embed\.".into());
    }
    let tail = if biases.is_some() { r"(.*\.)?(bias|beta)$" } else { "" };
    ParamGroup::from_regex(format!("^({}){tail}", parts.join("|"))).map_err(|e| format!("tuners.layers: {e:?}"))
}

impl TunersConfig {
    /// True when no tuner is selected: the backbone stays frozen and the trunk path applies.
    pub fn is_empty(&self) -> bool {
        self.names().is_empty()
    }

    /// Names of the selected tuners, for logs and records (`lora`, `adaptformer`, `vpt-deep`, …).
    pub fn names(&self) -> Vec<String> {
        let mut n = Vec::new();
        if self.full_finetune {
            n.push("full-ft".to_string());
        }
        if self.bitfit {
            n.push("bitfit".into());
        }
        if self.ssf.is_some() {
            n.push("ssf".into());
        }
        if let Some(v) = &self.vpt {
            n.push(if v.deep { "vpt-deep" } else { "vpt-shallow" }.into());
        }
        if self.lora.is_some() {
            n.push("lora".into());
        }
        if self.adaptformer.is_some() {
            n.push("adaptformer".into());
        }
        if let Some(a) = &self.adapter {
            n.push(match a.kind {
                AdapterKind::Houlsby => "houlsby",
                AdapterKind::Pfeiffer => "pfeiffer",
            }
            .into());
        }
        n
    }

    /// The blocks the tuners go into in a backbone of `depth` blocks (every block without
    /// `layers`).
    pub fn tuned_blocks(&self, depth: usize) -> Result<Vec<usize>, String> {
        match &self.layers {
            Some(l) => l.resolve(depth),
            None => Ok((0..depth).collect()),
        }
    }

    /// How many leading blocks no tuner touches, so the model runs them off the tape (0 without
    /// `layers`, or without any tuner).
    pub fn frozen_prefix(&self, depth: usize) -> usize {
        if self.is_empty() {
            return 0;
        }
        self.tuned_blocks(depth).ok().and_then(|b| b.first().copied()).unwrap_or(0)
    }

    /// Checks every selected tuner; the error names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if self.layers.is_some() && self.is_empty() {
            return Err("tuners.layers is set but no tuner is selected".into());
        }
        if self.full_finetune && self.names().len() > 1 {
            return Err(format!(
                "tuners.full_finetune trains every backbone tensor; it cannot be combined with {}",
                self.names()[1..].join(", ")
            ));
        }
        if let Some(l) = &self.lora {
            l.validate()?;
        }
        if let Some(a) = &self.adaptformer {
            a.validate()?;
        }
        if let Some(v) = &self.vpt {
            v.validate()?;
        }
        if let Some(a) = &self.adapter {
            a.validate()?;
        }
        if let Some(s) = &self.ssf {
            if !(s.init_std.is_finite() && s.init_std >= 0.0) {
                return Err(format!("tuners.ssf.init_std = {} must be a finite value >= 0", s.init_std));
            }
        }
        Ok(())
    }

    /// Freezes `vit` and injects the selected tuners, created on `vit`'s device. Call it after
    /// loading the checkpoint. Fresh tuners start as the identity where the method defines it
    /// (LoRA B = 0, AdaptFormer/adapter up-projection 0); SSF starts near it (γ ~ N(1, σ)).
    pub fn inject(&self, vit: Vit) -> Result<Vit, String> {
        self.validate()?;
        let device = vit.cls_token.device();
        let (d, depth) = (vit.embed_dim(), vit.depth());
        let patch = vit.patch_embed.proj.kernel_size[0];
        let blocks = self.tuned_blocks(depth)?;
        let (first, last) = (blocks.contains(&0), blocks.contains(&(depth - 1)));
        let all = self.layers.is_none();
        let mut vit = vit.freeze();
        if self.full_finetune {
            vit = if all { vit.unfreeze() } else { vit.unfreeze_group(block_group(&blocks, None, last)?) };
        } else if self.bitfit {
            vit = if all { vit.unfreeze_group(bias_group()) } else { vit.unfreeze_group(block_group(&blocks, Some(first), last)?) };
        }
        if let Some(s) = &self.ssf {
            if first {
                vit.ssf_patch = Some(s.init(d, &device));
            }
            if last {
                vit.ssf_norm = Some(s.init(d, &device));
            }
        }
        if let Some(v) = &self.vpt {
            vit.vpt = Some(v.init_at(&blocks, d, patch, &device));
        }
        for (m, b) in vit.blocks.iter_mut().enumerate() {
            if !blocks.contains(&m) {
                continue;
            }
            if let Some(s) = &self.ssf {
                let hidden = b.mlp.fc1.weight.dims()[1];
                b.ssf_norm1 = Some(s.init(d, &device));
                b.attn.ssf_qkv = Some(s.init(3 * d, &device));
                b.attn.ssf_proj = Some(s.init(d, &device));
                b.ssf_norm2 = Some(s.init(d, &device));
                b.mlp.ssf_fc1 = Some(s.init(hidden, &device));
                b.mlp.ssf_fc2 = Some(s.init(d, &device));
            }
            if let Some(l) = &self.lora {
                b.attn.lora = Some(l.init(d, &device));
            }
            if let Some(a) = &self.adaptformer {
                b.adaptformer = Some(a.init(d, &device));
            }
            if let Some(a) = &self.adapter {
                if a.kind == AdapterKind::Houlsby {
                    b.adapter_attn = Some(a.init(d, &device));
                }
                b.adapter_mlp = Some(a.init(d, &device));
            }
        }
        Ok(vit)
    }
}

impl Vit {
    /// True when some tuner is injected (the trunk then depends on trainable tensors).
    pub fn has_tuner_modules(&self) -> bool {
        self.ssf_patch.is_some()
            || self.ssf_norm.is_some()
            || self.vpt.is_some()
            || self.blocks.iter().any(|b| {
                b.attn.lora.is_some()
                    || b.attn.ssf_qkv.is_some()
                    || b.attn.ssf_proj.is_some()
                    || b.ssf_norm1.is_some()
                    || b.ssf_norm2.is_some()
                    || b.mlp.ssf_fc1.is_some()
                    || b.mlp.ssf_fc2.is_some()
                    || b.adaptformer.is_some()
                    || b.adapter_attn.is_some()
                    || b.adapter_mlp.is_some()
            })
    }

    /// Folds every LoRA update into its plain qkv weight and removes the LoRA modules: the same
    /// outputs with the backbone's inference cost.
    pub fn merge_lora(mut self) -> Self {
        for b in self.blocks.iter_mut() {
            if let Some(l) = b.attn.lora.take() {
                let qkv = b.attn.qkv.clone();
                b.attn.qkv = l.merge_into(qkv);
            }
        }
        self
    }
}

/// Module path of every tensor, in the naming burn-store writes with `skip_enum_variants`
/// (`method.queries`, `backbone.blocks.0.attn.lora.q.a`): one entry per float tensor with its
/// element count and whether it is trainable.
#[derive(Default)]
struct TensorPaths {
    path: Vec<String>,
    pushed: Vec<bool>,
    out: Vec<(String, usize, bool)>,
}

impl ModuleVisitor for TensorPaths {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        let push = !container_type.starts_with("Enum:");
        if push {
            self.path.push(name.to_string());
        }
        self.pushed.push(push);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        if self.pushed.pop() == Some(true) {
            self.path.pop();
        }
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        self.out.push((self.path.join("."), t.shape().num_elements(), t.is_require_grad()));
    }
}

/// One tensor of a model: path, elements, trainable.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TensorInfo {
    /// Module path (stable name in trainable-parameter files).
    pub path: String,
    /// Number of elements.
    pub elements: usize,
    /// Whether it receives gradients.
    pub trainable: bool,
}

/// Every float tensor of `module` with its path and trainability. Trainability is only visible
/// on an autodiff device (`module.fork(&device.autodiff())`, as the learner trains it); on a
/// plain device every tensor reads as frozen.
pub fn tensor_infos<M: Module>(module: &M) -> Vec<TensorInfo> {
    let mut v = TensorPaths::default();
    module.visit(&mut v);
    v.out.into_iter().map(|(path, elements, trainable)| TensorInfo { path, elements, trainable }).collect()
}

/// The gradient of every tensor of `module` that has one, by module path (stable names).
pub fn named_grads<M: Module>(module: &M, grads: &burn::tensor::Gradients) -> std::collections::BTreeMap<String, vqt_core::HostTensor> {
    struct G<'a> {
        paths: TensorPaths,
        grads: &'a burn::tensor::Gradients,
        out: std::collections::BTreeMap<String, vqt_core::HostTensor>,
    }
    impl ModuleVisitor for G<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.paths.enter_module(name, container_type);
        }
        fn exit_module(&mut self, name: &str, container_type: &str) {
            self.paths.exit_module(name, container_type);
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = param.grad(self.grads) {
                self.out.insert(self.paths.path.join("."), vqt_core::HostTensor::from_tensor(g));
            }
        }
    }
    let mut v = G { paths: TensorPaths::default(), grads, out: Default::default() };
    module.visit(&mut v);
    v.out
}

/// The value of every float tensor of `module`, by module path (stable names), on the host.
pub fn named_values<M: Module>(module: &M) -> std::collections::BTreeMap<String, vqt_core::HostTensor> {
    struct V {
        paths: TensorPaths,
        out: std::collections::BTreeMap<String, vqt_core::HostTensor>,
    }
    impl ModuleVisitor for V {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.paths.enter_module(name, container_type);
        }
        fn exit_module(&mut self, name: &str, container_type: &str) {
            self.paths.exit_module(name, container_type);
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.out.insert(self.paths.path.join("."), vqt_core::HostTensor::from_tensor(param.val()));
        }
    }
    let mut v = V { paths: TensorPaths::default(), out: Default::default() };
    module.visit(&mut v);
    v.out
}

/// `(trainable, total)` parameter counts; see [`tensor_infos`] for the device requirement.
pub fn param_counts<M: Module>(module: &M) -> (usize, usize) {
    tensor_infos(module).iter().fold((0, 0), |(t, a), i| (t + if i.trainable { i.elements } else { 0 }, a + i.elements))
}

/// Errors of the trainable-parameter files.
#[derive(Debug, thiserror::Error)]
pub enum TrainableError {
    /// Reading or writing the file failed.
    #[error("{path}: {msg}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        msg: String,
    },
    /// The file does not fit the model.
    #[error("{path}: {msg}")]
    Mismatch {
        /// The file.
        path: String,
        /// What does not fit.
        msg: String,
    },
}

/// Metadata key of the parameter ids in trainable-parameter files (`{path: id}` as JSON). Burn's
/// optimizer state is keyed by parameter id, so a resumed run needs its parameters to carry the
/// ids they had when the optimizer state was saved.
pub const PARAM_IDS_KEY: &str = "vqt.param_ids";

fn param_ids<M: Module>(module: &M) -> std::collections::BTreeMap<String, u64> {
    struct Ids {
        paths: TensorPaths,
        out: std::collections::BTreeMap<String, u64>,
    }
    impl ModuleVisitor for Ids {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.paths.enter_module(name, container_type);
        }
        fn exit_module(&mut self, name: &str, container_type: &str) {
            self.paths.exit_module(name, container_type);
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.out.insert(self.paths.path.join("."), param.id.val());
        }
    }
    let mut v = Ids { paths: TensorPaths::default(), out: Default::default() };
    module.visit(&mut v);
    v.out
}

/// Gives the tensors at the listed paths the listed parameter ids.
fn set_param_ids<M: Module>(module: M, ids: &std::collections::BTreeMap<String, u64>) -> M {
    struct SetIds<'a> {
        paths: TensorPaths,
        ids: &'a std::collections::BTreeMap<String, u64>,
    }
    impl ModuleMapper for SetIds<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.paths.enter_module(name, container_type);
        }
        fn exit_module(&mut self, name: &str, container_type: &str) {
            self.paths.exit_module(name, container_type);
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            match self.ids.get(&self.paths.path.join(".")) {
                Some(&id) => {
                    let (_, value, mapper) = param.consume();
                    Param::from_mapped_value(ParamId::from(id), value, mapper)
                }
                None => param,
            }
        }
    }
    module.map(&mut SetIds { paths: TensorPaths::default(), ids })
}

/// Writes only the trainable tensors of `module` (on an autodiff device) to a safetensors file
/// with stable module-path names (and their parameter ids in the metadata); the write is atomic.
/// Returns the names written.
pub fn save_trainable<M: Module>(module: &M, path: &Path) -> Result<Vec<String>, TrainableError> {
    let names: Vec<String> = tensor_infos(module).into_iter().filter(|i| i.trainable).map(|i| i.path).collect();
    let io = |msg: String| TrainableError::Io { path: path.display().to_string(), msg };
    if names.is_empty() {
        return Err(io("the model has no trainable tensors (is it on an autodiff device?)".into()));
    }
    let ids: std::collections::BTreeMap<String, u64> = param_ids(module).into_iter().filter(|(k, _)| names.contains(k)).collect();
    let ids = serde_json::to_string(&ids).expect("ids serialise");
    let mut store = SafetensorsStore::from_bytes(None)
        .skip_enum_variants(true)
        .with_full_paths(names.clone())
        .metadata(PARAM_IDS_KEY, ids);
    module.save_into(&mut store).map_err(|e| io(e.to_string()))?;
    let bytes = store.get_bytes().map_err(|e| io(e.to_string()))?;
    vqt_core::fs::write_atomic(path, &bytes).map_err(|e| io(e.to_string()))?;
    Ok(names)
}

/// Loads a file written by [`save_trainable`] into `module` (and restores the saved parameter
/// ids, so optimizer state saved alongside applies). Every tensor in the file must exist in the
/// model with the same shape; tensors the file lacks keep their values. Load into the model on
/// the autodiff device it trains on.
pub fn load_trainable<M: Module>(module: M, path: &Path) -> Result<M, TrainableError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| TrainableError::Io { path: p.clone(), msg: e.to_string() })?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| TrainableError::Io { path: p.clone(), msg: format!("not a safetensors file: {e}") })?;
    let ids: std::collections::BTreeMap<String, u64> = match meta.metadata().as_ref().and_then(|m| m.get(PARAM_IDS_KEY)) {
        Some(json) => serde_json::from_str(json).map_err(|e| TrainableError::Io { path: p.clone(), msg: format!("metadata `{PARAM_IDS_KEY}`: {e}") })?,
        None => Default::default(),
    };
    // Float tensors take the model device's precision (a file written by an f32 run loads into
    // a bf16 model and vice versa); burn-store would otherwise keep the file's dtype.
    let target: burn::tensor::DType = module.devices().first().map(|d| d.settings().float_dtype.into()).unwrap_or(burn::tensor::DType::F32);
    let mut store = SafetensorsStore::from_bytes(Some(bytes))
        .skip_enum_variants(true)
        .allow_partial(true)
        .with_from_adapter(burn::store::FloatCastAdapter::to(target));
    let mut module = module;
    let report = module.load_from(&mut store).map_err(|e| TrainableError::Io { path: p.clone(), msg: e.to_string() })?;
    if !report.unused.is_empty() {
        return Err(TrainableError::Mismatch { path: p, msg: format!("tensors not in this model: {}", report.unused.join(", ")) });
    }
    if !report.errors.is_empty() {
        let msgs: Vec<String> = report.errors.iter().map(|e| e.to_string()).collect();
        return Err(TrainableError::Mismatch { path: p, msg: msgs.join("; ") });
    }
    Ok(set_param_ids(module, &ids))
}
