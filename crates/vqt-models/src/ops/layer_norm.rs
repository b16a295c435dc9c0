//! LayerNorm on the Flex (`cpu`) backend as a Burn backend extension with its own autodiff
//! node: forward and backward row-parallel over the rayon threads.
//!
//! Flex has a fused LayerNorm forward, but Burn 0.22's autodiff has none: under autodiff
//! `layer_norm` is composed from mean, subtract, square, mean, add, sqrt, divide, multiply and
//! add, each a pass over the activation on one thread (Flex's element-wise ops are not
//! threaded) with its own backward node, about 6-9 ms forward plus backward for one
//! `[32, 65, 384]` activation (ViT-S/14 112 px batch 32, Zen 3) while the other thread idles; a
//! ViT step has 25 of them. Here one task per block of rows computes each row's mean and
//! `1/√(var + ε)` (kept for the backward), writes `(x − μ)·rstd·γ + β`, and the backward
//! computes `dx = rstd·(g − mean(g) − x̂·mean(g·x̂))` with `g = dy·γ` per row, and `dγ = Σ dy·x̂`,
//! `dβ = Σ dy` as sums over fixed row blocks added in order, so the result does not depend on
//! the thread count. Each gradient is computed only for an input that is tracked.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::flex::FlexTensor;
use burn::backend::ops::ModuleOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex};
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use super::cpu::{all_f32, dense, lane_sum, lane_sum2, lane_sum3, par_new, simd};

/// LayerNorm over the last dim as a backend extension: Flex runs it row-parallel; under
/// autodiff a node of its own runs the matching backward.
#[backend_extension(Flex, Autodiff)]
pub trait FastLayerNorm: Backend {
    /// `(x − mean)/√(var + eps)·gamma + beta` over the last dim of `x: [..., D]` (biased
    /// variance), `gamma`, `beta`: `[D]`.
    fn fast_layer_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, eps: f64) -> FloatTensor<Self>;
}

impl FastLayerNorm for Flex {
    fn fast_layer_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        if all_f32([&x, &gamma, &beta]) {
            forward(&x, &gamma, &beta, eps, false).0
        } else {
            Flex::layer_norm(x, gamma, Some(beta), eps)
        }
    }
}

/// Each row's mean and `1/√(var + ε)`, kept for the backward.
#[derive(Clone)]
struct Stats(std::sync::Arc<(Vec<f32>, Vec<f32>)>);

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stats({} rows)", self.0 .0.len())
    }
}

impl<C: CheckpointStrategy> FastLayerNorm for Autodiff<Flex, C> {
    fn fast_layer_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        if !all_f32([x.primitive(), gamma.primitive(), beta.primitive()]) {
            return <Self as ModuleOps<Self>>::layer_norm(x, gamma, Some(beta), eps);
        }

        #[derive(Debug)]
        struct LayerNormNode;

        impl Backward<Flex, 3> for LayerNormNode {
            type State = (NodeId, NodeId, Stats);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_x, node_g, node_b] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                let (x_state, g_state, stats) = ops.state;
                let x: FlexTensor = checkpointer.retrieve_node_output(x_state);
                let gamma: FlexTensor = checkpointer.retrieve_node_output(g_state);
                let want = [node_x.is_some(), node_g.is_some(), node_b.is_some()];
                let out = backward(&x, &gamma, &stats.0, &grad, want);
                for (node, g) in [node_x, node_g, node_b].into_iter().zip(out) {
                    if let (Some(node), Some(g)) = (node, g) {
                        grads.register::<Flex>(node.id, g);
                    }
                }
            }
        }

        match LayerNormNode.prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let g_state = prep.checkpoint(&gamma);
                let (out, stats) = forward(x.primitive(), gamma.primitive(), beta.primitive(), eps, true);
                let stats = Stats(std::sync::Arc::new(stats.expect("kept when asked")));
                prep.finish((x_state, g_state, stats), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive(), gamma.primitive(), beta.primitive(), eps, false).0),
        }
    }
}

/// Rows per rayon task (and per block of the parameter-gradient sums).
const ROWS: usize = 64;

fn width(x: &FlexTensor, gamma: &FlexTensor) -> usize {
    let shape = x.layout().shape();
    let d = shape[shape.num_dims() - 1];
    assert_eq!(gamma.layout().shape().num_elements(), d, "layer_norm: gamma must have the last dim's {d} values");
    d
}

/// The output and, when `keep`, each row's (mean, rstd).
#[allow(clippy::type_complexity)]
fn forward(x: &FlexTensor, gamma: &FlexTensor, beta: &FlexTensor, eps: f64, keep: bool) -> (FlexTensor, Option<(Vec<f32>, Vec<f32>)>) {
    let d = width(x, gamma);
    assert_eq!(beta.layout().shape().num_elements(), d, "layer_norm: beta must have {d} values");
    let (xs, g, b) = (dense(x), dense(gamma), dense(beta));
    let n = xs.len();
    let rows = if d == 0 { 0 } else { n / d };
    let (mut means, mut rstds) = (vec![0f32; if keep { rows } else { 0 }], vec![0f32; if keep { rows } else { 0 }]);
    let eps = eps as f32;
    let simd = simd();
    let out = if d == 0 {
        vec![0f32; n]
    } else if keep {
        par_new(n, ROWS * d, xs.par_chunks(ROWS * d).zip(means.par_chunks_mut(ROWS).zip(rstds.par_chunks_mut(ROWS))), |o, (x, (m, s))| {
            rows_forward(simd, x, o, &g, &b, m, s, eps)
        })
    } else {
        par_new(n, ROWS * d, xs.par_chunks(ROWS * d), |o, x| rows_forward(simd, x, o, &g, &b, &mut [], &mut [], eps))
    };
    let out = FlexTensor::from_data(TensorData::new(out, x.layout().shape().clone()));
    (out, keep.then_some((means, rstds)))
}

/// `[dx, dγ, dβ]`, those asked for.
fn backward(x: &FlexTensor, gamma: &FlexTensor, stats: &(Vec<f32>, Vec<f32>), grad: &FlexTensor, want: [bool; 3]) -> [Option<FlexTensor>; 3] {
    let d = width(x, gamma);
    let (xs, g, dy) = (dense(x), dense(gamma), dense(grad));
    assert_eq!(dy.len(), xs.len(), "layer_norm backward: gradient shape");
    let (means, rstds) = (&stats.0, &stats.1);
    let rows = if d == 0 { 0 } else { xs.len() / d };
    let [want_x, want_g, want_b] = want;
    let dx = want_x.then(|| {
        let dx = if d == 0 {
            vec![0f32; xs.len()]
        } else {
            let simd = simd();
            let blocks = xs.par_chunks(ROWS * d).zip(dy.par_chunks(ROWS * d)).zip(means.par_chunks(ROWS).zip(rstds.par_chunks(ROWS)));
            par_new(xs.len(), ROWS * d, blocks, |o, ((x, dy), (m, s))| rows_backward(simd, x, dy, &g, m, s, o))
        };
        FlexTensor::from_data(TensorData::new(dx, x.layout().shape().clone()))
    });
    let (dg, db) = if want_g || want_b {
        // Per block of rows: (Σ dy·x̂, Σ dy), then the blocks added in order.
        let partial: Vec<(Vec<f32>, Vec<f32>)> = (0..rows.div_ceil(ROWS))
            .into_par_iter()
            .map(|blk| {
                let (mut sg, mut sb) = (vec![0f32; if want_g { d } else { 0 }], vec![0f32; if want_b { d } else { 0 }]);
                let (lo, hi) = (blk * ROWS, ((blk + 1) * ROWS).min(rows));
                rows_param_sums(simd(), &xs[lo * d..hi * d], &dy[lo * d..hi * d], &means[lo..hi], &rstds[lo..hi], &mut sg, &mut sb);
                (sg, sb)
            })
            .collect();
        let (mut sg, mut sb) = (vec![0f32; d], vec![0f32; d]);
        for (pg, pb) in partial {
            for (s, v) in sg.iter_mut().zip(pg) {
                *s += v;
            }
            for (s, v) in sb.iter_mut().zip(pb) {
                *s += v;
            }
        }
        (want_g.then(|| FlexTensor::from_data(TensorData::new(sg, [d]))), want_b.then(|| FlexTensor::from_data(TensorData::new(sb, [d]))))
    } else {
        (None, None)
    };
    [dx, dg, db]
}

dispatched! {
    /// One block of rows: `out ← (x − μ)·rstd·γ + β` per row of `xs`; each row's `μ` and `rstd`
    /// written to `means`, `rstds` when they are not empty.
    rows_forward(xs: &[f32], out: &mut [f32], g: &[f32], b: &[f32], means: &mut [f32], rstds: &mut [f32], eps: f32) => {
        let d = g.len();
        for (r, (row, orow)) in xs.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
            let mean = lane_sum(row, |v| v) / d as f32;
            let var = lane_sum(row, |v| (v - mean) * (v - mean)) / d as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for (((o, &v), &gi), &bi) in orow.iter_mut().zip(row).zip(g).zip(b) {
                *o = (v - mean) * rstd * gi + bi;
            }
            if !means.is_empty() {
                means[r] = mean;
                rstds[r] = rstd;
            }
        }
    }
}

dispatched! {
    /// One block of rows: `dx = rstd·(g − mean(g) − x̂·mean(g·x̂))` with `g = dy·γ`.
    rows_backward(xs: &[f32], dy: &[f32], g: &[f32], means: &[f32], rstds: &[f32], out: &mut [f32]) => {
        let d = g.len();
        for (r, ((xr, dyr), orow)) in xs.chunks_exact(d).zip(dy.chunks_exact(d)).zip(out.chunks_exact_mut(d)).enumerate() {
            let (mean, rstd) = (means[r], rstds[r]);
            // Σ dy·γ and Σ dy·γ·x̂ over the row.
            let sum_g = lane_sum2(dyr, g, |dv, gi| dv * gi);
            let sum_gx = lane_sum3(xr, dyr, g, |v, dv, gi| dv * gi * (v - mean) * rstd);
            let (mg, mgx) = (sum_g / d as f32, sum_gx / d as f32);
            for (((o, &v), &dv), &gi) in orow.iter_mut().zip(xr).zip(dyr).zip(g) {
                *o = rstd * (dv * gi - mg - (v - mean) * rstd * mgx);
            }
        }
    }
}

dispatched! {
    /// One block of rows' parameter-gradient sums: `sg += Σ dy·x̂`, `sb += Σ dy` per column (each
    /// skipped when its buffer is empty).
    rows_param_sums(xs: &[f32], dy: &[f32], means: &[f32], rstds: &[f32], sg: &mut [f32], sb: &mut [f32]) => {
        let d = sg.len().max(sb.len());
        for (r, (xr, dyr)) in xs.chunks_exact(d).zip(dy.chunks_exact(d)).enumerate() {
            let (mean, rstd) = (means[r], rstds[r]);
            for ((s, &v), &dv) in sg.iter_mut().zip(xr).zip(dyr) {
                *s += dv * (v - mean) * rstd;
            }
            for (s, &dv) in sb.iter_mut().zip(dyr) {
                *s += dv;
            }
        }
    }
}

/// LayerNorm through the extension (Flex devices, with or without autodiff).
pub(crate) fn layer_norm_flex<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, beta: Tensor<1>, eps: f64) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FastLayerNorm>::fast_layer_norm(x.into_dispatch(), gamma.into_dispatch(), beta.into_dispatch(), eps))
}

#[cfg(test)]
mod tests {
    use burn::backend::GradientCheckpointingStrategy;
    use burn::nn::LayerNormConfig;
    use burn::tensor::{Device, Distribution, Tensor, TensorData};

    type Grads = [Option<Vec<f32>>; 3];

    fn data() -> [TensorData; 4] {
        let d = Device::flex();
        let r = |dims: [usize; 3], m: f64, s: f64| Tensor::<3>::random(dims, Distribution::Normal(m, s), &d).into_data();
        // x: [3, 70, 40] read transposed in its leading dims (a strided view), shifted off
        // zero mean; gamma, beta: [40]; the loss weights.
        [r([70, 3, 40], 0.7, 2.0), r([1, 1, 40], 1.0, 0.3), r([1, 1, 40], 0.0, 0.3), r([3, 70, 40], 0.0, 1.0)]
    }

    /// LayerNorm (ours when `ours`, else the module's own forward) of the strided view, its value
    /// and the gradients of a weighted sum with respect to the tracked inputs (x, γ, β).
    fn run(device: &Device, data: &[TensorData; 4], ours: bool, track: [bool; 3], strategy: Option<GradientCheckpointingStrategy>) -> (Vec<f32>, Grads) {
        let input = |i: usize, on: bool| {
            let mut t = Tensor::<3>::from_data(data[i].clone(), device);
            if let Some(s) = strategy {
                t = t.with_gradient_checkpointing_strategy(s);
            }
            if on && device.is_autodiff() {
                t = t.require_grad();
            }
            t
        };
        let (x3, g3, b3) = (input(0, track[0]), input(1, track[1]), input(2, track[2]));
        let (gamma, beta): (Tensor<1>, Tensor<1>) = (g3.clone().reshape([40]), b3.clone().reshape([40]));
        let x = x3.clone().swap_dims(0, 1);
        let y = if ours { super::layer_norm_flex(x, gamma, beta, 1e-5) } else { burn::tensor::module::layer_norm(x, gamma, Some(beta), 1e-5) };
        let out: Vec<f32> = y.clone().into_data().try_to_vec().unwrap();
        if !device.is_autodiff() {
            return (out, [None, None, None]);
        }
        let grads = (y * input(3, false)).sum().backward();
        let g = |t: &Tensor<3>, on: bool| on.then(|| t.grad(&grads).expect("tracked input has a gradient").into_data().try_to_vec::<f32>().unwrap());
        (out, [g(&x3, track[0]), g(&g3, track[1]), g(&b3, track[2])])
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 2e-5 * y.abs().max(1.0), "{what}: {x} vs {y}");
        }
    }

    #[test]
    #[allow(deprecated)] // Device::ndarray: the independent reference backend
    fn flex_layer_norm_matches_burns_in_value_and_gradient() {
        let data = data();
        let (v_ref, g_ref) = run(&Device::ndarray().autodiff(), &data, false, [true; 3], None);
        for strategy in [None, Some(GradientCheckpointingStrategy::Balanced)] {
            let (v, g) = run(&Device::flex().autodiff(), &data, true, [true; 3], strategy);
            close(&v, &v_ref, "value");
            for (i, name) in ["dx", "dgamma", "dbeta"].iter().enumerate() {
                close(g[i].as_ref().unwrap(), g_ref[i].as_ref().unwrap(), &format!("{name} ({strategy:?})"));
            }
        }
        // Partly tracked: a frozen LayerNorm in a tuned backbone (dx alone), a tuned one on a
        // frozen input (dγ, dβ alone).
        let (_, g) = run(&Device::flex().autodiff(), &data, true, [true, false, false], None);
        close(g[0].as_ref().unwrap(), g_ref[0].as_ref().unwrap(), "dx alone");
        let (_, g) = run(&Device::flex().autodiff(), &data, true, [false, true, true], None);
        close(g[1].as_ref().unwrap(), g_ref[1].as_ref().unwrap(), "dgamma without dx");
        close(g[2].as_ref().unwrap(), g_ref[2].as_ref().unwrap(), "dbeta without dx");
        // Without autodiff: against ndarray's.
        let (v_plain, _) = run(&Device::flex(), &data, true, [false; 3], None);
        let (v_nd, _) = run(&Device::ndarray(), &data, false, [false; 3], None);
        close(&v_plain, &v_nd, "value without autodiff");
        // Deterministic.
        let a = run(&Device::flex().autodiff(), &data, true, [true; 3], None);
        let b = run(&Device::flex().autodiff(), &data, true, [true; 3], None);
        assert_eq!(a, b);
    }

    #[test]
    fn every_vector_loop_gives_the_baseline_bits() {
        // The row kernels are compiled once per level (AVX-512, AVX2, baseline); the lane sums fix
        // the order of every addition, so each level must give the baseline's bits (widths with
        // and without a tail of lanes).
        use crate::ops::cpu::{has, Simd};
        for d in [384usize, 40, 7] {
            let rows = 9;
            let v = |k: usize, s: f32| (0..k).map(|i| ((i * 7919 % 1000) as f32 * 1e-3 - 0.4) * s).collect::<Vec<f32>>();
            let (xs, dy, g, b) = (v(rows * d, 3.0), v(rows * d, 1.0).into_iter().rev().collect::<Vec<_>>(), v(d, 0.5), v(d, 0.2));
            let run = |level: Simd| {
                let (mut out, mut m, mut r) = (vec![0f32; rows * d], vec![0f32; rows], vec![0f32; rows]);
                super::rows_forward(level, &xs, &mut out, &g, &b, &mut m, &mut r, 1e-6);
                let mut dx = vec![0f32; rows * d];
                super::rows_backward(level, &xs, &dy, &g, &m, &r, &mut dx);
                let (mut sg, mut sb) = (vec![0f32; d], vec![0f32; d]);
                super::rows_param_sums(level, &xs, &dy, &m, &r, &mut sg, &mut sb);
                [out, m, r, dx, sg, sb].map(|v| v.into_iter().map(f32::to_bits).collect::<Vec<_>>())
            };
            let base = run(Simd::Baseline);
            for level in [Simd::Avx512, Simd::Avx2] {
                if has(level) {
                    assert!(run(level) == base, "{level:?} (d = {d}): differs from the baseline loop");
                }
            }
        }
    }

    #[test]
    fn norm_routes_flex_layer_norms_through_the_extension_with_their_epsilon() {
        let device = Device::flex();
        let ln = LayerNormConfig::new(8).with_epsilon(1e-6).init(&device);
        assert_eq!(super::super::layer_norm_eps(&ln), Some(1e-6));
        let x = Tensor::<2>::random([5, 8], Distribution::Normal(0.0, 1e-3), &device);
        // With a tiny variance ε matters: the routed result equals the module's own.
        let ours: Vec<f32> = super::super::norm(&ln, x.clone()).into_data().try_to_vec().unwrap();
        let burns: Vec<f32> = ln.forward(x).into_data().try_to_vec().unwrap();
        close(&ours, &burns, "routed");
    }
}
