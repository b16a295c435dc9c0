//! `vqt-parity/1` fixture runner (format: `fixtures/README.md`).
//!
//! A fixture directory holds a small model checkpoint, an input batch and the tensors a reference
//! implementation produced. [`run`] rebuilds the model from `manifest.json`, loads the checkpoint
//! through the same readers users use, runs every listed check and compares tensor by tensor.

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vqt_core::checkpoint::{CheckpointFormat, load_checkpoint};
use vqt_core::HostTensor;
use vqt_models::query::Vqt;
use vqt_models::vit::load::default_resample;
use vqt_models::vit::pos_embed::PosResample;
use vqt_models::{Vit, VitConfig};

/// Why a fixture could not be run at all (as opposed to a tensor that differs).
#[derive(Debug, thiserror::Error)]
pub enum ParityError {
    /// File-level problem; the message names the file.
    #[error("{0}")]
    Input(String),
}

fn input_err(path: &Path, msg: impl std::fmt::Display) -> ParityError {
    ParityError::Input(format!("{}: {msg}", path.display()))
}

#[derive(Debug, Deserialize)]
struct Manifest {
    format: String,
    model: ModelSpec,
    checkpoint: CheckpointSpec,
    inputs: FileSpec,
    tolerance: Tolerance,
    checks: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct ModelSpec {
    img_size: usize,
    patch_size: usize,
    #[serde(default = "three")]
    in_chans: usize,
    embed_dim: usize,
    depth: usize,
    num_heads: usize,
    #[serde(default = "four")]
    mlp_ratio: f64,
    #[serde(default = "yes")]
    qkv_bias: bool,
    #[serde(default = "yes")]
    class_token: bool,
    #[serde(default = "eps")]
    layer_norm_eps: f64,
    #[serde(default)]
    layer_scale_init: Option<f64>,
    #[serde(default)]
    num_classes: usize,
}
fn three() -> usize {
    3
}
fn four() -> f64 {
    4.0
}
fn yes() -> bool {
    true
}
fn eps() -> f64 {
    1e-6
}

#[derive(Debug, Deserialize)]
struct CheckpointSpec {
    file: String,
    naming: String,
    #[serde(default)]
    pos_resample: Option<PosResample>,
}

#[derive(Debug, Deserialize)]
struct FileSpec {
    file: String,
}

#[derive(Debug, Deserialize)]
struct Tolerance {
    abs: f32,
}

#[derive(Debug, Deserialize)]
struct TensorCheck {
    file: String,
    tensors: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct SynqtCheck {
    params: String,
    naming: String,
    num_tokens: usize,
    feat_scale: f64,
    attn_scale: f64,
    ffn_scale: f64,
    file: String,
    tensors: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TunedCheck {
    /// Tuners as `[tuners]` in a vqt-train config.
    tuners: vqt_models::tuners::TunersConfig,
    /// `"linear"` or `{"vqt": {"num_queries": Q}}`.
    method: serde_json::Value,
    /// Trainable tensors with vqt-rs names (a `load_trainable` file).
    params: String,
    file: String,
    tensors: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct VqtCheck {
    params: String,
    num_queries: usize,
    file: String,
    tensors: Vec<String>,
}

/// One compared tensor.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParityLine {
    /// The check it belongs to (`vit`, `vqt`).
    pub check: String,
    /// The expected tensor's name.
    pub tensor: String,
    /// Max abs diff (NaN if non-finite or shapes differ).
    pub max_abs_diff: f32,
    /// Shape mismatch message, if any.
    pub note: Option<String>,
    /// Whether it is within tolerance.
    pub ok: bool,
}

/// The outcome of one fixture.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParityReport {
    /// Fixture directory.
    pub dir: PathBuf,
    /// Tolerance from the manifest.
    pub tolerance: f32,
    /// One line per compared tensor.
    pub lines: Vec<ParityLine>,
    /// Checks listed in the manifest that this build does not support (each fails the run).
    pub unsupported: Vec<String>,
}

impl ParityReport {
    /// True when every tensor is within tolerance and every listed check was supported.
    pub fn passed(&self) -> bool {
        self.unsupported.is_empty() && !self.lines.is_empty() && self.lines.iter().all(|l| l.ok)
    }
}

/// Float tensors and integer tensors of a safetensors file.
struct Tensors {
    path: PathBuf,
    floats: BTreeMap<String, HostTensor>,
    ints: BTreeMap<String, (Vec<usize>, Vec<i64>)>,
}

impl Tensors {
    fn read(path: &Path) -> Result<Self, ParityError> {
        use safetensors::{Dtype, SafeTensors};
        let bytes = std::fs::read(path).map_err(|e| input_err(path, e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| input_err(path, format!("not a readable safetensors file: {e}")))?;
        let mut floats = BTreeMap::new();
        let mut ints = BTreeMap::new();
        for (name, v) in st.tensors() {
            let shape = v.shape().to_vec();
            match v.dtype() {
                Dtype::F32 => {
                    let data = v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                    floats.insert(name, HostTensor::new(shape, data));
                }
                Dtype::I64 => {
                    let data = v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
                    ints.insert(name, (shape, data));
                }
                other => return Err(input_err(path, format!("tensor `{name}` has unsupported dtype {other:?}"))),
            }
        }
        Ok(Self { path: path.to_path_buf(), floats, ints })
    }

    fn float(&self, name: &str) -> Result<&HostTensor, ParityError> {
        self.floats.get(name).ok_or_else(|| input_err(&self.path, format!("missing f32 tensor `{name}`")))
    }
}

struct Comparer {
    expected: Tensors,
    tol: f32,
    lines: Vec<ParityLine>,
}

impl Comparer {
    fn compare(&mut self, check: &str, name: &str, actual: HostTensor) -> Result<(), ParityError> {
        let exp = self.expected.float(name)?;
        let (max_abs_diff, note) = match actual.max_abs_diff(exp) {
            Some(d) => (d, None),
            None => (f32::NAN, Some(format!("shape {:?}, expected {:?}", actual.shape, exp.shape))),
        };
        let ok = max_abs_diff.is_finite() && max_abs_diff <= self.tol;
        self.lines.push(ParityLine { check: check.into(), tensor: name.into(), max_abs_diff, note, ok });
        Ok(())
    }
}

fn format_of(naming: &str, path: &Path) -> Result<CheckpointFormat, ParityError> {
    Ok(match naming {
        "timm" => CheckpointFormat::Timm,
        "jax-npz" | "jax" => CheckpointFormat::JaxNpz,
        "hf-vit" => CheckpointFormat::HfVit,
        "hf-dinov2" => CheckpointFormat::HfDinov2,
        other => return Err(input_err(path, format!("checkpoint.naming `{other}` is not one of timm, jax-npz, hf-vit, hf-dinov2"))),
    })
}

/// Runs every check of the fixture in `dir` on `device`.
pub fn run(dir: &Path, device: &Device) -> Result<ParityReport, ParityError> {
    let mpath = dir.join("manifest.json");
    let text = std::fs::read_to_string(&mpath).map_err(|e| input_err(&mpath, e))?;
    let man: Manifest = serde_json::from_str(&text).map_err(|e| input_err(&mpath, e))?;
    if man.format != "vqt-parity/1" {
        return Err(input_err(&mpath, format!("format `{}` is not vqt-parity/1", man.format)));
    }
    let m = &man.model;
    if !m.class_token {
        return Err(input_err(&mpath, "model.class_token = false is not supported"));
    }
    let cfg = VitConfig {
        img_size: m.img_size,
        patch_size: m.patch_size,
        in_chans: m.in_chans,
        embed_dim: m.embed_dim,
        depth: m.depth,
        num_heads: m.num_heads,
        mlp_ratio: m.mlp_ratio,
        qkv_bias: m.qkv_bias,
        layer_norm_eps: m.layer_norm_eps,
        layer_scale_init: m.layer_scale_init,
        num_classes: m.num_classes,
    };
    cfg.validate().map_err(|e| input_err(&mpath, e))?;

    let plain = device.clone().without_autodiff();
    let ckpt = dir.join(&man.checkpoint.file);
    let map = load_checkpoint(&ckpt, format_of(&man.checkpoint.naming, &mpath)?).map_err(|e| ParityError::Input(e.to_string()))?;
    let resample = man.checkpoint.pos_resample.unwrap_or_else(|| default_resample(map.provenance.naming));
    let (vit, _report) = cfg.init(&plain).load_tensor_map(map, resample).map_err(|e| ParityError::Input(e.to_string()))?;
    let vit = vit.valid();

    let ipath = dir.join(&man.inputs.file);
    let inputs = Tensors::read(&ipath)?;
    let images = inputs.float("images")?.to_tensor::<4>(&plain);

    let mut lines = Vec::new();
    let mut unsupported = Vec::new();
    for (name, spec) in &man.checks {
        match name.as_str() {
            "vit" => {
                let spec: TensorCheck = serde_json::from_value(spec.clone()).map_err(|e| input_err(&mpath, format!("checks.vit: {e}")))?;
                let mut c = Comparer { expected: Tensors::read(&dir.join(&spec.file))?, tol: man.tolerance.abs, lines: Vec::new() };
                let trace = vit.forward_trace(images.clone());
                for t in &spec.tensors {
                    let actual = if let Some(i) = t.strip_prefix("vit.block.") {
                        let i: usize = i.parse().map_err(|_| input_err(&mpath, format!("bad tensor name `{t}`")))?;
                        let b = trace.blocks.get(i).ok_or_else(|| input_err(&mpath, format!("`{t}`: the model has {} blocks", trace.blocks.len())))?;
                        HostTensor::from_tensor(b.clone())
                    } else if t == "vit.cls" {
                        HostTensor::from_tensor(trace.cls.clone())
                    } else if t == "vit.logits" {
                        let head = vit.head.as_ref().ok_or_else(|| input_err(&mpath, "vit.logits listed but model.num_classes is 0"))?;
                        HostTensor::from_tensor(head.forward(trace.cls.clone()))
                    } else {
                        unsupported.push(format!("vit: tensor `{t}`"));
                        continue;
                    };
                    c.compare("vit", t, actual)?;
                }
                lines.extend(c.lines);
            }
            "vqt" => {
                let spec: VqtCheck = serde_json::from_value(spec.clone()).map_err(|e| input_err(&mpath, format!("checks.vqt: {e}")))?;
                let labels = inputs.ints.get("labels").ok_or_else(|| input_err(&ipath, "missing i64 tensor `labels`"))?;
                let mut c = Comparer { expected: Tensors::read(&dir.join(&spec.file))?, tol: man.tolerance.abs, lines: Vec::new() };
                let r = run_vqt(&vit, &images, labels, &dir.join(&spec.params), spec.num_queries, device)?;
                for t in &spec.tensors {
                    match r.get(t) {
                        Some(a) => c.compare("vqt", t, a.clone())?,
                        None => unsupported.push(format!("vqt: tensor `{t}`")),
                    }
                }
                lines.extend(c.lines);
            }
            "synqt" => {
                let spec: SynqtCheck = serde_json::from_value(spec.clone()).map_err(|e| input_err(&mpath, format!("checks.synqt: {e}")))?;
                if spec.naming != "official" {
                    return Err(input_err(&mpath, format!("checks.synqt.naming `{}`: only `official` is supported", spec.naming)));
                }
                let labels = inputs.ints.get("labels").ok_or_else(|| input_err(&ipath, "missing i64 tensor `labels`"))?;
                let mut c = Comparer { expected: Tensors::read(&dir.join(&spec.file))?, tol: man.tolerance.abs, lines: Vec::new() };
                let r = run_synqt(&vit, &images, labels, &dir.join(&spec.params), &spec, device)?;
                for t in &spec.tensors {
                    match r.get(t) {
                        Some(a) => c.compare("synqt", t, a.clone())?,
                        None => unsupported.push(format!("synqt: tensor `{t}`")),
                    }
                }
                lines.extend(c.lines);
            }
            "tuned" => {
                let spec: TunedCheck = serde_json::from_value(spec.clone()).map_err(|e| input_err(&mpath, format!("checks.tuned: {e}")))?;
                let labels = inputs.ints.get("labels").ok_or_else(|| input_err(&ipath, "missing i64 tensor `labels`"))?;
                let mut c = Comparer { expected: Tensors::read(&dir.join(&spec.file))?, tol: man.tolerance.abs, lines: Vec::new() };
                let r = run_tuned(&vit, &images, labels, &dir.join(&spec.params), &spec, &mpath, device)?;
                for t in &spec.tensors {
                    match r.get(t) {
                        Some(a) => c.compare("tuned", t, a.clone())?,
                        None => unsupported.push(format!("tuned: tensor `{t}`")),
                    }
                }
                lines.extend(c.lines);
            }
            other => unsupported.push(format!("check `{other}`")),
        }
    }
    Ok(ParityReport { dir: dir.to_path_buf(), tolerance: man.tolerance.abs, lines, unsupported })
}

/// VQT forward + backward on the trunk path; every named tensor of the `vqt` check.
fn run_vqt(
    vit: &Vit,
    images: &Tensor<4>,
    labels: &(Vec<usize>, Vec<i64>),
    params: &Path,
    num_queries: usize,
    device: &Device,
) -> Result<BTreeMap<String, HostTensor>, ParityError> {
    let ad = device.clone().autodiff();
    let p = Tensors::read(params)?;
    let queries = p.float("queries")?;
    let (w, b) = (p.float("head.weight")?, p.float("head.bias")?);
    if queries.shape != [vit.depth(), num_queries, vit.embed_dim()] {
        return Err(input_err(params, format!("`queries` has shape {:?}, expected [{}, {num_queries}, {}]", queries.shape, vit.depth(), vit.embed_dim())));
    }
    let mut vqt = vqt_models::query::VqtConfig { num_queries, query_dropout: 0.0 }.init(
        vit.depth(),
        vit.embed_dim(),
        vit.patch_embed.proj.kernel_size[0],
        w.shape[0],
        &ad,
    );
    if w.shape != [vqt.head.weight.dims()[1], vqt.head.weight.dims()[0]] {
        return Err(input_err(params, format!("`head.weight` has shape {:?}", w.shape)));
    }
    vqt.queries = burn::module::Param::from_tensor(queries.to_tensor::<3>(&ad));
    vqt.head.weight = burn::module::Param::from_tensor(w.transpose2().to_tensor::<2>(&ad));
    vqt.head.bias = Some(burn::module::Param::from_tensor(b.to_tensor::<1>(&ad)));

    // Trunk on the plain device: no tape, constants for the query side.
    let trunk = vit.forward_kv(images.clone());
    let outs = vqt.query_outputs(vit, &trunk);
    let feats = Vqt::features(trunk.cls.clone(), &outs);
    let logits = vqt.head.forward(feats.clone());
    let loss = cross_entropy(logits.clone(), labels);
    let mut out = BTreeMap::new();
    for (i, o) in outs.iter().enumerate() {
        out.insert(format!("vqt.query_out.{i}"), HostTensor::from_tensor(o.clone()));
    }
    out.insert("vqt.features".into(), HostTensor::from_tensor(feats));
    out.insert("vqt.logits".into(), HostTensor::from_tensor(logits));
    out.insert("vqt.loss".into(), scalar(&loss));
    let grads = loss.backward();
    let gq = vqt.queries.grad(&grads).ok_or_else(|| ParityError::Input("no gradient reached the queries".into()))?;
    let gw = vqt.head.weight.grad(&grads).ok_or_else(|| ParityError::Input("no gradient reached the head weight".into()))?;
    let gb = vqt.head.bias.as_ref().and_then(|b| b.grad(&grads)).ok_or_else(|| ParityError::Input("no gradient reached the head bias".into()))?;
    out.insert("vqt.grad.queries".into(), HostTensor::from_tensor(gq));
    out.insert("vqt.grad.head.weight".into(), HostTensor::from_tensor(gw).transpose2());
    out.insert("vqt.grad.head.bias".into(), HostTensor::from_tensor(gb));
    Ok(out)
}

/// Backbone tuners (and optionally VQT) trained jointly on the full path: trunk outputs, logits,
/// loss and the gradient of every trainable tensor, by vqt-rs name.
fn run_tuned(
    vit: &Vit,
    images: &Tensor<4>,
    labels: &(Vec<usize>, Vec<i64>),
    params: &Path,
    spec: &TunedCheck,
    mpath: &Path,
    device: &Device,
) -> Result<BTreeMap<String, HostTensor>, ParityError> {
    use vqt_models::{MethodSpec, ModelSpec, QueryMethod, TrunkInput};
    let ad = device.clone().autodiff();
    let p = Tensors::read(params)?;
    let method = match &spec.method {
        serde_json::Value::String(s) if s == "linear" => MethodSpec::Linear,
        v => MethodSpec::Vqt(vqt_models::query::VqtConfig {
            num_queries: v
                .get("vqt")
                .and_then(|q| q.get("num_queries"))
                .and_then(|q| q.as_u64())
                .ok_or_else(|| input_err(mpath, "checks.tuned.method: expected \"linear\" or {\"vqt\": {\"num_queries\": Q}}"))? as usize,
            query_dropout: 0.0,
        }),
    };
    let head_w = p.float(if matches!(method, MethodSpec::Vqt(_)) { "method.head.weight" } else { "method.weight" })?;
    let classes = head_w.shape[1];
    let model = ModelSpec { method, tuners: spec.tuners.clone() }.build(vit.clone(), classes).map_err(|e| input_err(mpath, e))?;
    // Load on the autodiff device: loading keeps each parameter's gradient requirement as the
    // tensor reports it, and only autodiff tensors report one.
    let model = vqt_models::tuners::load_trainable(model.fork(&ad), params).map_err(|e| ParityError::Input(e.to_string()))?;
    let mut out = BTreeMap::new();
    let trace = model.backbone.forward_trace(images.clone());
    for (i, b) in trace.blocks.iter().enumerate() {
        out.insert(format!("tuned.block.{i}"), HostTensor::from_tensor(b.clone()));
    }
    out.insert("tuned.cls".into(), HostTensor::from_tensor(trace.cls));
    let trunk = model.trunk(TrunkInput::Images(images.clone()));
    if let QueryMethod::Vqt(v) = &model.method {
        for (i, o) in v.query_outputs(&model.backbone, &trunk).iter().enumerate() {
            out.insert(format!("tuned.query_out.{i}"), HostTensor::from_tensor(o.clone()));
        }
    }
    let logits = model.method.forward(&model.backbone, &trunk);
    let loss = cross_entropy(logits.clone(), labels);
    out.insert("tuned.logits".into(), HostTensor::from_tensor(logits));
    out.insert("tuned.loss".into(), scalar(&loss));
    let grads = loss.backward();
    for (name, g) in vqt_models::tuners::named_grads(&model, &grads) {
        out.insert(format!("tuned.grad.{name}"), g);
    }
    Ok(out)
}

fn cross_entropy(logits: Tensor<2>, labels: &(Vec<usize>, Vec<i64>)) -> Tensor<1> {
    let device = logits.device();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(labels.1.clone(), labels.0.clone()), &device);
    CrossEntropyLossConfig::new().init(&device).forward(logits, targets)
}

fn scalar(loss: &Tensor<1>) -> HostTensor {
    HostTensor::new(vec![], HostTensor::from_tensor(loss.clone()).data)
}

/// SynQT forward + backward on the trunk path, parameters in the official code's names.
fn run_synqt(
    vit: &Vit,
    images: &Tensor<4>,
    labels: &(Vec<usize>, Vec<i64>),
    params: &Path,
    spec: &SynqtCheck,
    device: &Device,
) -> Result<BTreeMap<String, HostTensor>, ParityError> {
    use vqt_models::query::synqt::{ParamSlot, SynqtConfig};
    let ad = device.clone().autodiff();
    let p = Tensors::read(params)?;
    let classes = p.float("head.weight")?.shape[0];
    let cfg = SynqtConfig {
        num_tokens: spec.num_tokens,
        feat_scale: spec.feat_scale,
        attn_scale: spec.attn_scale,
        ffn_scale: spec.ffn_scale,
        dropout: 0.0,
        head_drop_path: 0.0,
        kem_drop_path: 0.0,
    };
    let mut synqt = cfg.init(vit, classes, &ad).load_official(&p.floats).map_err(|e| input_err(params, e))?;
    let trunk = vit.forward_kv(images.clone());
    let tr = synqt.forward_trace(vit, &trunk);
    let mut out = BTreeMap::new();
    for (name, list) in [("h_hat", &tr.h_hat), ("f_att", &tr.f_att), ("f_ffn", &tr.f_ffn), ("h", &tr.h)] {
        for (i, t) in list.iter().enumerate() {
            out.insert(format!("synqt.{name}.{i}"), HostTensor::from_tensor(t.clone()));
        }
    }
    out.insert("synqt.logits".into(), HostTensor::from_tensor(tr.logits.clone()));
    let loss = cross_entropy(tr.logits, labels);
    out.insert("synqt.loss".into(), scalar(&loss));
    let grads = loss.backward();
    for (name, slot) in synqt.official_slots() {
        let g = match slot {
            ParamSlot::Vector(p) => p.grad(&grads).map(HostTensor::from_tensor),
            ParamSlot::LinearWeight(p) => p.grad(&grads).map(|g| HostTensor::from_tensor(g).transpose2()),
            ParamSlot::Rank3(p) => p.grad(&grads).map(HostTensor::from_tensor),
        };
        if let Some(g) = g {
            out.insert(format!("synqt.grad.{name}"), g);
        }
    }
    Ok(out)
}

/// Prints one line per tensor, then a summary line.
pub fn print_report(r: &ParityReport) {
    for l in &r.lines {
        println!(
            "{:4} {:<5} {:<24} max_abs_diff {:.3e}{}",
            if l.ok { "ok" } else { "FAIL" },
            l.check,
            l.tensor,
            l.max_abs_diff,
            l.note.as_deref().map(|n| format!("  ({n})")).unwrap_or_default()
        );
    }
    for u in &r.unsupported {
        println!("FAIL unsupported {u}");
    }
    let failed = r.lines.iter().filter(|l| !l.ok).count() + r.unsupported.len();
    println!(
        "{}: {} tensors, {} failed, tolerance {:.1e}",
        r.dir.display(),
        r.lines.len(),
        failed,
        r.tolerance
    );
}
