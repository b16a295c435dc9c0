//! `vqt-bench kernels`: the backend's matmul throughput at the shapes that dominate a ViT step,
//! called the way the model calls them, beside PyTorch's for the same shapes and threads.
//!
//! Every step of every method is mostly these products: the four linear layers of a block
//! (qkv, proj, fc1, fc2) forward and, for methods that train through the backbone, their two
//! backward products (input gradient `dY·Wᵀ` and weight gradient `Xᵀ·dY`), plus the two
//! per-head attention products (`q·kᵀ` and `p·v`). The report gives each one's GFLOP/s, so a
//! step's time can be set against the ceiling of its own kernels.

use vqt_models::ops::linear;
use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};
use crate::bench::median;
use std::time::Instant;
use vqt_models::VitConfig;

/// How a product is formed (the same op in the model and in the PyTorch script).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelOp {
    /// `linear(x: [B, T, K], W: [K, N])` (the model's `ops::linear`; PyTorch `F.linear`).
    Linear,
    /// The input gradient `dY: [B, T, N] · Wᵀ` (Burn's `linear_x_backward`).
    LinearDx,
    /// The weight gradient `Xᵀ: [K, B·T] · dY: [B·T, N]` (Burn's `linear_weight_backward`).
    LinearDw,
    /// Attention scores `q · kᵀ`, q and k `[B, H, T, Dh]` head views of a fused qkv output.
    Scores,
    /// Attention output `p · v`, p `[B, H, T, T]`, v a head view of a fused qkv output.
    Av,
}

/// One product to measure: `b` batches of `[m, k] · [k, n]` (for the linear ops `b` is the batch
/// and `m` the tokens, so the rows of the folded product are `b·m`; for the attention ops `b` is
/// batch × heads).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KernelShape {
    /// What it is in the model, e.g. `fc1` or `attn q·kᵀ`.
    pub name: String,
    /// How it is formed.
    pub op: KernelOp,
    /// Images in the batch.
    pub batch: usize,
    /// Attention heads (attention ops; 1 otherwise).
    pub heads: usize,
    /// Rows per batch.
    pub m: usize,
    /// Inner dimension.
    pub k: usize,
    /// Output columns.
    pub n: usize,
}

impl KernelShape {
    /// Floating-point operations of one product (2 per multiply-add).
    pub fn flops(&self) -> f64 {
        2.0 * (self.batch * self.heads) as f64 * self.m as f64 * self.k as f64 * self.n as f64
    }
}

/// The products of one training step of a ViT of this shape at this batch, each once (a block
/// has each of them once; the step has them `depth` times).
pub fn vit_shapes(vit: &VitConfig, batch: usize) -> Vec<KernelShape> {
    let (t, d, hidden) = (vit.num_tokens(), vit.embed_dim, vit.mlp_hidden());
    let (h, dh) = (vit.num_heads, vit.head_dim());
    let lin = |name: &str, op, k, n| KernelShape { name: name.into(), op, batch, heads: 1, m: t, k, n };
    let mut v = Vec::new();
    for (name, k, n) in [("qkv", d, 3 * d), ("proj", d, d), ("fc1", d, hidden), ("fc2", hidden, d)] {
        v.push(lin(name, KernelOp::Linear, k, n));
    }
    for (name, k, n) in [("qkv", d, 3 * d), ("fc1", d, hidden), ("fc2", hidden, d)] {
        // dX = dY·Wᵀ: [B·T, n]·[n, k]; dW = Xᵀ·dY: [k, B·T]·[B·T, n].
        v.push(KernelShape { name: format!("{name} dX"), op: KernelOp::LinearDx, batch, heads: 1, m: t, k: n, n: k });
        v.push(KernelShape { name: format!("{name} dW"), op: KernelOp::LinearDw, batch: 1, heads: 1, m: k, k: batch * t, n });
    }
    v.push(KernelShape { name: "attn q·kᵀ".into(), op: KernelOp::Scores, batch, heads: h, m: t, k: dh, n: t });
    v.push(KernelShape { name: "attn p·v".into(), op: KernelOp::Av, batch, heads: h, m: t, k: t, n: dh });
    v
}

/// One measured product.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelResult {
    /// The product.
    pub shape: KernelShape,
    /// Median time of one product (ms).
    pub ms_median: f64,
    /// Throughput at that median.
    pub gflops: f64,
}

/// Times `f` (which must finish its work before returning) `reps` times after one warm-up.
fn time_median(reps: usize, device: &Device, mut f: impl FnMut()) -> Result<f64, String> {
    f();
    device.sync().map_err(|e| e.to_string())?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f();
        device.sync().map_err(|e| e.to_string())?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(times))
}

/// `[B, T, 3·D]` -> one of its thirds as heads `[B, H, T, Dh]` (a strided view, as in the model).
fn head_view(qkv: &Tensor<3>, part: usize, heads: usize) -> Tensor<4> {
    let [_, _, d3] = qkv.dims();
    let d = d3 / 3;
    vqt_models::vit::split_heads(qkv.clone().narrow(2, part * d, d), heads)
}

/// Measures one product on `device` (non-autodiff), as the model forms it.
pub fn measure(shape: &KernelShape, reps: usize, device: &Device) -> Result<KernelResult, String> {
    let device = device.clone().without_autodiff();
    let rnd3 = |dims: [usize; 3]| Tensor::<3>::random(dims, Distribution::Normal(0.0, 1.0), &device);
    let rnd2 = |dims: [usize; 2]| Tensor::<2>::random(dims, Distribution::Normal(0.0, 1.0), &device);
    let s = shape;
    let ms = match s.op {
        KernelOp::Linear => {
            let (x, w) = (rnd3([s.batch, s.m, s.k]), rnd2([s.k, s.n]));
            time_median(reps, &device, || drop(linear(x.clone(), w.clone(), None)))?
        }
        KernelOp::LinearDx => {
            // The weight is stored [n, k] (= Burn's [in, out] of the forward layer) and used
            // transposed, as `linear_x_backward` does.
            let (dy, w) = (rnd3([s.batch, s.m, s.k]), rnd2([s.n, s.k]));
            time_median(reps, &device, || drop(linear(dy.clone(), w.clone().swap_dims(0, 1), None)))?
        }
        KernelOp::LinearDw => {
            let (x, dy) = (rnd2([s.k, s.m]), rnd2([s.k, s.n]));
            time_median(reps, &device, || drop(x.clone().swap_dims(0, 1).matmul(dy.clone())))?
        }
        KernelOp::Scores => {
            let qkv = rnd3([s.batch, s.m, 3 * s.heads * s.k]);
            time_median(reps, &device, || {
                let (q, k) = (head_view(&qkv, 0, s.heads), head_view(&qkv, 1, s.heads));
                drop(q.matmul(k.swap_dims(2, 3)))
            })?
        }
        KernelOp::Av => {
            let qkv = rnd3([s.batch, s.m, 3 * s.heads * s.n]);
            let p = Tensor::<4>::random([s.batch, s.heads, s.m, s.k], Distribution::Default, &device);
            time_median(reps, &device, || drop(p.clone().matmul(head_view(&qkv, 2, s.heads))))?
        }
    };
    Ok(KernelResult { shape: shape.clone(), ms_median: ms, gflops: s.flops() / (ms * 1e6) })
}

/// Where one block's forward spends its time, stage by stage, on the frozen trunk path (no
/// autodiff): each stage run on its own input and timed alone (median of `reps`), through the
/// model's own code (`Block`, `Attention`, `Mlp`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageTime {
    /// The stage.
    pub stage: String,
    /// Median time (ms).
    pub ms_median: f64,
    /// Its matmul FLOPs, if it has any.
    pub gflop: Option<f64>,
}

/// The stages of one block's forward at this shape (see [`StageTime`]).
pub fn block_profile(vit: &VitConfig, batch: usize, reps: usize, device: &Device) -> Result<Vec<StageTime>, String> {
    use vqt_models::vit::Attention;
    let device = device.clone().without_autodiff();
    let model = vit.init(&device);
    let block = &model.blocks[0];
    let (t, d, hidden) = (vit.num_tokens(), vit.embed_dim, vit.mlp_hidden());
    let z = Tensor::<3>::random([batch, t, d], Distribution::Normal(0.0, 1.0), &device);
    let a = block.norm1_out(z.clone());
    let (q, k, v) = block.attn.qkv(a.clone());
    let o = Attention::attend(q.clone(), k.clone(), v.clone());
    let h = vqt_models::ops::apply(&block.mlp.fc1, a.clone());
    let g = vqt_models::ops::gelu(h.clone());
    let rows = (batch * t) as f64;
    let lin = |k: usize, n: usize| Some(2.0 * rows * k as f64 * n as f64 / 1e9);
    let attn_flops = Some(4.0 * (batch * vit.num_heads) as f64 * (t * t * vit.head_dim()) as f64 / 1e9);
    let mut out = Vec::new();
    let mut stage = |name: &str, gflop: Option<f64>, f: &mut dyn FnMut()| -> Result<(), String> {
        out.push(StageTime { stage: name.into(), ms_median: time_median(reps, &device, f)?, gflop });
        Ok(())
    };
    stage("LayerNorm 1", None, &mut || drop(block.norm1_out(z.clone())))?;
    stage("qkv projection + head split", lin(d, 3 * d), &mut || drop(block.attn.qkv(a.clone())))?;
    stage("attention (q·kᵀ, softmax, p·v, merge heads)", attn_flops, &mut || drop(Attention::attend(q.clone(), k.clone(), v.clone())))?;
    stage("output projection", lin(d, d), &mut || drop(block.attn.project_out(o.clone())))?;
    stage("residual add", None, &mut || drop(z.clone() + o.clone()))?;
    stage("LayerNorm 2", None, &mut || drop(vqt_models::ops::norm(&block.norm2, z.clone())))?;
    stage("fc1", lin(d, hidden), &mut || drop(vqt_models::ops::apply(&block.mlp.fc1, a.clone())))?;
    stage("GELU", None, &mut || drop(vqt_models::ops::gelu(h.clone())))?;
    stage("fc2", lin(hidden, d), &mut || drop(vqt_models::ops::apply(&block.mlp.fc2, g.clone())))?;
    stage("whole block", None, &mut || drop(block.forward(z.clone())))?;
    Ok(out)
}

/// One block's attention under autodiff (forward, then the backward of a weighted sum to q, k
/// and v), as a tuned method's step runs it, with vqt-models' attention and with Burn's composed
/// ops (`ops::use_burn_flex_attention`), in alternating rounds in this process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainAttention {
    /// Median ms, vqt-models' attention (`FastAttention` on Flex).
    pub ours_ms: f64,
    /// Median ms, Burn's ops (matmul, softmax, matmul, and their autodiff nodes).
    pub burn_ms: f64,
    /// Alternating rounds each median is taken over.
    pub rounds: usize,
}

/// Times [`TrainAttention`] at the block's shape (only meaningful on Flex, where the two paths
/// differ; elsewhere both run Burn's ops).
pub fn train_attention(vit: &VitConfig, batch: usize, reps: usize, device: &Device) -> Result<TrainAttention, String> {
    use vqt_models::vit::Attention;
    let plain = device.clone().without_autodiff();
    let ad = plain.clone().autodiff();
    let (t, h, dh) = (vit.num_tokens(), vit.num_heads, vit.head_dim());
    let rnd = |dims: [usize; 4]| Tensor::<4>::random(dims, Distribution::Normal(0.0, 1.0), &plain).into_data();
    let (q, k, v, w) = (rnd([batch, h, t, dh]), rnd([batch, h, t, dh]), rnd([batch, h, t, dh]), rnd([batch, t, h, dh]));
    let w = Tensor::<4>::from_data(w, &ad).reshape([batch, t, h * dh]);
    let step = || {
        let q = Tensor::<4>::from_data(q.clone(), &ad).require_grad();
        let k = Tensor::<4>::from_data(k.clone(), &ad).require_grad();
        let v = Tensor::<4>::from_data(v.clone(), &ad).require_grad();
        let grads = (Attention::attend(q.clone(), k.clone(), v.clone()) * w.clone()).sum().backward();
        drop((q.grad(&grads), k.grad(&grads), v.grad(&grads)));
    };
    alternate(reps, &ad, vqt_models::ops::use_burn_flex_attention, step)
}

/// `step` timed in 3 alternating rounds with `switch(true)` (Burn's path) and `switch(false)`
/// (vqt-models'), the switch reset to `false` after each.
fn alternate(reps: usize, ad: &Device, switch: fn(bool), step: impl Fn()) -> Result<TrainAttention, String> {
    let rounds = 3;
    let (mut ours, mut burn) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (use_burn, into) in [(true, &mut burn), (false, &mut ours)] {
            switch(use_burn);
            let r = time_median(reps, ad, &mut || step());
            switch(false);
            into.push(r?);
        }
    }
    Ok(TrainAttention { ours_ms: median(ours), burn_ms: median(burn), rounds })
}

/// One block's first LayerNorm under autodiff (forward, then the backward of a weighted sum to
/// its input, a frozen LayerNorm as in a tuned backbone), vqt-models' extension against the
/// module's own forward (Burn's composed ops), in alternating rounds ([`TrainAttention`]'s
/// fields).
pub fn train_layer_norm(vit: &VitConfig, batch: usize, reps: usize, device: &Device) -> Result<TrainAttention, String> {
    let plain = device.clone().without_autodiff();
    let ad = plain.clone().autodiff();
    let (t, d) = (vit.num_tokens(), vit.embed_dim);
    use burn::module::Module as _;
    let ln = burn::nn::LayerNormConfig::new(d).with_epsilon(1e-6).init(&ad).no_grad();
    let x = Tensor::<3>::random([batch, t, d], Distribution::Normal(0.0, 1.0), &plain).into_data();
    let w = Tensor::<3>::random([batch, t, d], Distribution::Normal(0.0, 1.0), &ad);
    let step = || {
        let x = Tensor::<3>::from_data(x.clone(), &ad).require_grad();
        let grads = (vqt_models::ops::norm(&ln, x.clone()) * w.clone()).sum().backward();
        drop(x.grad(&grads));
    };
    alternate(reps, &ad, vqt_models::ops::use_burn_flex_layer_norm, step)
}

/// One block's fc1 under autodiff (forward with bias, then the backward of a weighted sum to its
/// input, the weight frozen as in a tuned backbone), vqt-models' extension against Burn's
/// `linear`, in alternating rounds ([`TrainAttention`]'s fields).
pub fn train_linear(vit: &VitConfig, batch: usize, reps: usize, device: &Device) -> Result<TrainAttention, String> {
    let plain = device.clone().without_autodiff();
    let ad = plain.clone().autodiff();
    let (t, d, hidden) = (vit.num_tokens(), vit.embed_dim, vit.mlp_hidden());
    use burn::module::Module as _;
    let fc1 = burn::nn::LinearConfig::new(d, hidden).init(&ad).no_grad();
    let x = Tensor::<3>::random([batch, t, d], Distribution::Normal(0.0, 1.0), &plain).into_data();
    let w = Tensor::<3>::random([batch, t, hidden], Distribution::Normal(0.0, 1.0), &ad);
    let step = || {
        let x = Tensor::<3>::from_data(x.clone(), &ad).require_grad();
        let grads = (vqt_models::ops::apply(&fc1, x.clone()) * w.clone()).sum().backward();
        drop(x.grad(&grads));
    };
    alternate(reps, &ad, vqt_models::ops::use_burn_flex_linear, step)
}

/// One AdamW step over every parameter of the whole ViT (full fine-tuning's optimizer step, with
/// fixed gradients and state carried from step to step as in training), vqt-models' fused pass
/// against Burn's `AdamW`, in alternating rounds ([`TrainAttention`]'s fields).
pub fn train_adamw(vit: &VitConfig, reps: usize, device: &Device) -> Result<TrainAttention, String> {
    use burn::module::{Module as _, ModuleVisitor, Param};
    use burn::optim::{GradientsParams, ModuleOptimizer};
    /// Registers a gradient for every float parameter: random ones, or those of `base`.
    struct Grads<'a> {
        out: GradientsParams,
        base: Option<&'a GradientsParams>,
        plain: Device,
    }
    impl ModuleVisitor for Grads<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let g = match self.base {
                Some(base) => base.get::<D>(param.id).expect("a gradient for every parameter"),
                None => Tensor::<D>::random(param.val().shape(), Distribution::Normal(0.0, 1e-3), &self.plain),
            };
            self.out.register(param.id, g);
        }
    }
    let plain = device.clone().without_autodiff();
    let ad = plain.clone().autodiff();
    let model = vit.clone().with_num_classes(10).init(&ad);
    let grads_of = |model: &vqt_models::Vit, base: Option<&GradientsParams>| {
        let mut v = Grads { out: GradientsParams::new(), base, plain: plain.clone() };
        model.visit(&mut v);
        v.out
    };
    let base = grads_of(&model, None);
    let state = std::cell::RefCell::new((Some(model), ModuleOptimizer::from(vqt_models::ops::adamw::FusedAdamW::new(1e-8, 1e-2))));
    let step = || {
        let mut s = state.borrow_mut();
        let model = s.0.take().expect("the model is put back after every step");
        let grads = grads_of(&model, Some(&base));
        let model = s.1.step(1e-3, model, grads);
        s.0 = Some(model);
    };
    alternate(reps, &ad, vqt_models::ops::adamw::use_burn_flex_adamw, step)
}

/// The markdown line of [`train_adamw`].
pub fn train_adamw_markdown(a: &TrainAttention, params: usize) -> String {
    format!(
        "
One AdamW step over the whole ViT ({:.1} M parameters, full fine-tuning's optimizer step), median of {} alternating rounds: \
         vqt-models' fused pass {:.2} ms, Burn's `AdamW` {:.2} ms ({:.2}x).\n",
        params as f64 / 1e6,
        a.rounds,
        a.ours_ms,
        a.burn_ms,
        a.ours_ms / a.burn_ms
    )
}

/// The block's linear products with each large product split into one single-threaded gemm
/// call per thread (vqt-models' default) and on gemm's own rayon threads
/// (`ops::linear::use_gemm_own_threads`), in alternating rounds in this process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GemmSplit {
    /// Median ms, one gemm call per thread on its own block of output rows or columns.
    pub split_ms: f64,
    /// Median ms, gemm's own split over its rayon threads (`Parallelism::Rayon`).
    pub gemm_threads_ms: f64,
    /// Alternating rounds each median is taken over (the order swapped every round).
    pub rounds: usize,
}

/// Times [`GemmSplit`] on one block's products: qkv, proj, fc1 and fc2 forward on the frozen
/// trunk path, then fc1 under autodiff with its weight tracked (forward, `dX` and `dW`, as in
/// full fine-tuning). Only meaningful on Flex, where the linear layers call gemm directly.
pub fn gemm_split(vit: &VitConfig, batch: usize, reps: usize, device: &Device) -> Result<GemmSplit, String> {
    let plain = device.clone().without_autodiff();
    let ad = plain.clone().autodiff();
    let (t, d, hidden) = (vit.num_tokens(), vit.embed_dim, vit.mlp_hidden());
    let layer = |i: usize, o: usize, dev: &Device| burn::nn::LinearConfig::new(i, o).init(dev);
    let (qkv, proj, fc1, fc2) = (layer(d, 3 * d, &plain), layer(d, d, &plain), layer(d, hidden, &plain), layer(hidden, d, &plain));
    let fc1_tuned = layer(d, hidden, &ad);
    let x = Tensor::<3>::random([batch, t, d], Distribution::Normal(0.0, 1.0), &plain);
    let h = Tensor::<3>::random([batch, t, hidden], Distribution::Normal(0.0, 1.0), &plain);
    let w = Tensor::<3>::random([batch, t, hidden], Distribution::Normal(0.0, 1.0), &ad);
    let x_data = x.clone().into_data();
    let step = || {
        use vqt_models::ops::apply;
        drop((apply(&qkv, x.clone()), apply(&proj, x.clone()), apply(&fc1, x.clone()), apply(&fc2, h.clone())));
        let xa = Tensor::<3>::from_data(x_data.clone(), &ad).require_grad();
        let grads = (apply(&fc1_tuned, xa.clone()) * w.clone()).sum().backward();
        drop((xa.grad(&grads), fc1_tuned.weight.val().grad(&grads)));
    };
    let rounds = 6;
    let (mut split, mut own) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let order = if round % 2 == 0 { [false, true] } else { [true, false] };
        for gemm_threads in order {
            linear::use_gemm_own_threads(gemm_threads);
            let r = time_median(reps, &ad, &mut || step());
            linear::use_gemm_own_threads(false);
            if gemm_threads { own.push(r?) } else { split.push(r?) }
        }
    }
    Ok(GemmSplit { split_ms: median(split), gemm_threads_ms: median(own), rounds })
}

/// The markdown line of a [`GemmSplit`].
pub fn gemm_split_markdown(g: &GemmSplit) -> String {
    format!(
        "
The block's linear products (qkv, proj, fc1, fc2 forward; fc1 forward, `dX` and `dW` under autodiff), median of {} alternating rounds: \
         one gemm call per thread {:.2} ms, gemm's own threads {:.2} ms ({:.2}x).\n",
        g.rounds,
        g.split_ms,
        g.gemm_threads_ms,
        g.split_ms / g.gemm_threads_ms
    )
}

/// The markdown line of [`train_layer_norm`] and [`train_linear`].
pub fn train_ops_markdown(ln: &TrainAttention, lin: &TrainAttention) -> String {
    format!(
        "
Under autodiff, forward then backward to the input (frozen parameters), median of {} alternating rounds: one LayerNorm \
         vqt-models' {:.2} ms, Burn's composed ops {:.2} ms ({:.2}x); fc1 with bias vqt-models' {:.2} ms, Burn's `linear` {:.2} ms ({:.2}x).\n",
        ln.rounds,
        ln.ours_ms,
        ln.burn_ms,
        ln.ours_ms / ln.burn_ms,
        lin.ours_ms,
        lin.burn_ms,
        lin.ours_ms / lin.burn_ms
    )
}

/// The markdown line of a [`TrainAttention`].
pub fn train_attention_markdown(a: &TrainAttention) -> String {
    format!(
        "
One block's attention under autodiff (forward, then the backward to q, k and v), median of {} alternating rounds: \
         vqt-models' attention {:.2} ms, Burn's composed ops {:.2} ms ({:.2}x).\n",
        a.rounds,
        a.ours_ms,
        a.burn_ms,
        a.ours_ms / a.burn_ms
    )
}

/// One row of the report: ours and, where measured, PyTorch's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelRow {
    /// Ours.
    pub ours: KernelResult,
    /// PyTorch's for the same shape.
    pub torch: Option<KernelResult>,
}

/// Header facts of a kernels report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelsMeta {
    /// Backbone preset.
    pub backbone: String,
    /// Input size.
    pub img_size: usize,
    /// Batch.
    pub batch: usize,
    /// Backend of our side.
    pub backend: String,
    /// Threads of both sides.
    pub threads: usize,
    /// PyTorch's versions, if measured.
    pub torch: Option<String>,
    /// The CPU (`lscpu` model name, family and model).
    pub cpu: String,
}

/// The CPU this ran on, as lscpu names it (the figures differ between Zen 4 and Zen 5).
pub fn cpu_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|n| n.trim() == k))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    let avx512 = info.lines().find(|l| l.starts_with("flags")).is_some_and(|l| l.split_whitespace().any(|f| f == "avx512f"));
    format!(
        "{} (family {}, model {}{})",
        field("model name"),
        field("cpu family"),
        field("model"),
        if avx512 { ", avx512f" } else { ", no avx512f" }
    )
}

/// The markdown table of a block profile.
pub fn profile_markdown(stages: &[StageTime]) -> String {
    let whole = stages.iter().find(|s| s.stage == "whole block").map(|s| s.ms_median);
    let parts: f64 = stages.iter().filter(|s| s.stage != "whole block").map(|s| s.ms_median).sum();
    let mut s = String::from(
        "\nOne block's forward on the frozen trunk path (no autodiff), stage by stage through the model's code, each timed alone:\n\n\
         | stage | ms | share of the stages | GFLOP/s |\n|---|---:|---:|---:|\n",
    );
    for st in stages {
        let share = if st.stage == "whole block" { "–".to_string() } else { format!("{:.0}%", 100.0 * st.ms_median / parts) };
        s += &format!(
            "| {} | {:.2} | {} | {} |\n",
            st.stage,
            st.ms_median,
            share,
            st.gflop.map(|g| format!("{:.0}", g / (st.ms_median / 1e3))).unwrap_or_else(|| "–".into())
        );
    }
    if let Some(w) = whole {
        s += &format!("\nThe stages sum to {parts:.2} ms; the whole block took {w:.2} ms.\n");
    }
    s
}

/// The markdown table.
pub fn markdown(meta: &KernelsMeta, rows: &[KernelRow]) -> String {
    let mut s = format!(
        "Matmul throughput at the shapes of one ViT step: {} at {} px, batch {}, vqt-rs backend `{}`{}, {} threads each; CPU: {}. \
         Each product formed as the model forms it (linear layers through `linear`, head views of a fused qkv output); median of timed repetitions after a warm-up.\n\n",
        meta.backbone,
        meta.img_size,
        meta.batch,
        meta.backend,
        meta.torch.as_ref().map(|t| format!(" vs {t}")).unwrap_or_default(),
        meta.threads,
        meta.cpu
    );
    s += "| product | shape (batches × [m,k]·[k,n]) | GFLOP | ms ours | GFLOP/s ours | ms PyTorch | GFLOP/s PyTorch | ours / PyTorch (GFLOP/s) |\n|---|---|---:|---:|---:|---:|---:|---:|\n";
    for r in rows {
        let sh = &r.ours.shape;
        let (tms, tg, ratio) = match &r.torch {
            Some(t) => (format!("{:.3}", t.ms_median), format!("{:.0}", t.gflops), format!("{:.2}", r.ours.gflops / t.gflops)),
            None => ("–".into(), "–".into(), "–".into()),
        };
        s += &format!(
            "| {} | {} × [{},{}]·[{},{}] | {:.3} | {:.3} | {:.0} | {} | {} | {} |\n",
            sh.name,
            sh.batch * sh.heads,
            sh.m,
            sh.k,
            sh.k,
            sh.n,
            sh.flops() / 1e9,
            r.ours.ms_median,
            r.ours.gflops,
            tms,
            tg,
            ratio
        );
    }
    let total = |f: &dyn Fn(&KernelRow) -> Option<f64>| rows.iter().map(f).sum::<Option<f64>>();
    let flops: f64 = rows.iter().map(|r| r.ours.shape.flops()).sum();
    let ours_ms = total(&|r| Some(r.ours.ms_median)).unwrap_or(f64::NAN);
    s += &format!("\nAll products once: {:.2} GFLOP in {:.1} ms ours ({:.0} GFLOP/s)", flops / 1e9, ours_ms, flops / (ours_ms * 1e6));
    if let Some(t) = total(&|r| r.torch.as_ref().map(|t| t.ms_median)) {
        s += &format!(", {:.1} ms PyTorch ({:.0} GFLOP/s)", t, flops / (t * 1e6));
    }
    s += ".\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_count_the_flops_of_a_block() {
        let vit = vqt_models::VitPreset::from_name("vit-s14-dinov2").unwrap().config().with_img_size(112);
        let shapes = vit_shapes(&vit, 32);
        let fwd: f64 = shapes.iter().filter(|s| matches!(s.op, KernelOp::Linear | KernelOp::Scores | KernelOp::Av)).map(KernelShape::flops).sum();
        // 65 tokens x 32 images; the four linears 2·2080·384·(1152+384+1536+1536) and the
        // attention 2·2·192·65·65·64.
        let want = 2.0 * 2080.0 * 384.0 * (1152.0 + 384.0 + 1536.0 + 1536.0) + 4.0 * 192.0 * 65.0 * 65.0 * 64.0;
        assert!((fwd - want).abs() < 1.0, "{fwd} vs {want}");
        // The weight gradient folds the batch into its inner dimension.
        let dw = shapes.iter().find(|s| s.name == "fc1 dW").unwrap();
        assert_eq!((dw.batch, dw.m, dw.k, dw.n), (1, 384, 2080, 1536));
    }

    #[test]
    fn measured_products_report_their_throughput() {
        let device = Device::flex();
        let vit = vqt_models::VitPreset::from_name("vit-ti16").unwrap().config().with_img_size(32);
        for s in vit_shapes(&vit, 2) {
            let r = measure(&s, 2, &device).unwrap();
            assert!(r.ms_median > 0.0 && r.gflops.is_finite() && r.gflops > 0.0, "{r:?}");
        }
        let stages = block_profile(&vit, 2, 2, &device).unwrap();
        assert_eq!(stages.len(), 10);
        assert!(stages.iter().all(|s| s.ms_median > 0.0));
        assert!(profile_markdown(&stages).contains("| whole block |"));
        let a = train_attention(&vit, 2, 2, &device).unwrap();
        assert!(a.ours_ms > 0.0 && a.burn_ms > 0.0 && a.rounds == 3, "{a:?}");
        assert!(train_attention_markdown(&a).contains("Burn's composed ops"));
        let (ln, lin) = (train_layer_norm(&vit, 2, 2, &device).unwrap(), train_linear(&vit, 2, 2, &device).unwrap());
        assert!(ln.ours_ms > 0.0 && ln.burn_ms > 0.0 && lin.ours_ms > 0.0 && lin.burn_ms > 0.0);
        assert!(train_ops_markdown(&ln, &lin).contains("one LayerNorm"));
        let g = gemm_split(&vit, 2, 2, &device).unwrap();
        assert!(g.split_ms > 0.0 && g.gemm_threads_ms > 0.0 && g.rounds == 6, "{g:?}");
        assert!(gemm_split_markdown(&g).contains("one gemm call per thread"));
        let a = train_adamw(&vit, 2, &device).unwrap();
        assert!(a.ours_ms > 0.0 && a.burn_ms > 0.0 && a.rounds == 3, "{a:?}");
        assert!(train_adamw_markdown(&a, 5_000_000).contains("5.0 M parameters"));
        // The A/B switch is left off: the model's default path again.
        let q = Tensor::<4>::random([1, 3, 20, 4], Distribution::Default, &device);
        assert!(vqt_models::ops::flex_attention(q.clone(), q.clone(), q).is_ok());
    }
}
