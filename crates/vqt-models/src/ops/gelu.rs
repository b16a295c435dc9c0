//! GELU on the Flex (`cpu`) backend as a Burn backend extension: a threaded, vectorised forward
//! and backward (with an AVX-512 or AVX2+FMA loop chosen at run time), with its own autodiff
//! node, so training through a tuned backbone does not spend its time in Flex's single-threaded
//! scalar GELU (`libm` erf per element, forward and backward).
//!
//! Every path computes the same f32 operations in the same order (Rust does not contract
//! `a·b + c` into an FMA unless asked), so the result is bit-identical whichever loop the CPU
//! gets and however many threads run: a run reproduces across machines with and without
//! AVX-512 (tested against the plain loop).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::state::BackwardStates;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::ops::ActivationOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::flex::FlexTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex};
use burn::backend::TensorMetadata;
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use super::cpu::{contiguous, owned_values, par_new, simd};
use super::{erf_poly, exp_neg};

/// Elements per rayon task: large enough to amortise the task, small enough to split a
/// [2080, 1536] activation over two threads evenly.
const CHUNK: usize = 1 << 14;

/// 1/√(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// The exact-erf GELU as a backend extension: Flex runs the threaded, vectorised forward; under
/// autodiff, a node of its own runs the matching backward (`grad · (Φ(x) + x·φ(x))`) the same
/// way.
#[backend_extension(Flex, Autodiff)]
pub trait FastGelu: Backend {
    /// `0.5·x·(1 + erf(x/√2))`.
    fn fast_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl FastGelu for Flex {
    fn fast_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        if x.dtype() == DType::F32 {
            forward(x)
        } else {
            Flex::gelu(x)
        }
    }
}

impl<C: CheckpointStrategy> FastGelu for Autodiff<Flex, C> {
    fn fast_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        if x.dtype() != DType::F32 {
            return <Self as ActivationOps<Self>>::gelu(x);
        }

        #[derive(Debug)]
        struct GeluNode;

        impl Backward<Flex, 1> for GeluNode {
            type State = NodeId;

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let input: FlexTensor = checkpointer.retrieve_node_output(ops.state);
                unary::<Flex, _>(ops.parents, ops.node, grads, |grad| backward(input, grad));
            }
        }

        /// Recomputes the output from the input when a checkpointing strategy dropped it.
        #[derive(Debug, Clone)]
        struct RetroGelu(NodeId);

        impl RetroForward for RetroGelu {
            fn forward(&self, states: &mut BackwardStates, out_node: NodeId) {
                let input: FlexTensor = states.get_state(&self.0);
                states.save(out_node, forward(input))
            }
        }

        match GeluNode.prepare::<C>([x.node()]).memory_bound().retro_forward(RetroGelu(x.id())).parents([&x]).stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = prep.checkpoint(&x);
                prep.finish(state, forward(x.primitive().clone()))
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(x.into_primitive())),
        }
    }
}

/// GELU of `x` (f32): in place when `x` owns its contiguous buffer, else into a new one.
fn forward(mut x: FlexTensor) -> FlexTensor {
    let simd = simd();
    if let Some(values) = owned_values(&mut x) {
        values.par_chunks_mut(CHUNK).for_each(|c| gelu_in_place(simd, c));
        return x;
    }
    let x = contiguous(x);
    let src = x.as_slice::<f32>().expect("contiguous f32");
    let out = par_new(src.len(), CHUNK, src.par_chunks(CHUNK), |o, s| gelu_into(simd, s, o));
    FlexTensor::from_data(TensorData::new(out, x.shape()))
}

/// `grad · GELU'(x)`, GELU' = Φ(x) + x·φ(x), written into `grad`'s buffer when it owns it.
fn backward(x: FlexTensor, mut grad: FlexTensor) -> FlexTensor {
    let simd = simd();
    let x = contiguous(x);
    let xs = x.as_slice::<f32>().expect("contiguous f32");
    if let Some(g) = owned_values(&mut grad) {
        g.par_chunks_mut(CHUNK).zip(xs.par_chunks(CHUNK)).for_each(|(g, x)| gelu_grad_in_place(simd, x, g));
        return grad;
    }
    let grad = contiguous(grad);
    let gs = grad.as_slice::<f32>().expect("contiguous f32");
    let g = par_new(gs.len(), CHUNK, gs.par_chunks(CHUNK).zip(xs.par_chunks(CHUNK)), |g, (src, x)| {
        g.copy_from_slice(src);
        gelu_grad_in_place(simd, x, g)
    });
    FlexTensor::from_data(TensorData::new(g, grad.shape()))
}

/// GELU of one value: `0.5·x·(1 + erf(x/√2))`, erf by [`erf_poly`].
#[inline(always)]
pub(crate) fn gelu_value(x: f32) -> f32 {
    let a = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let erf = erf_poly(a, exp_neg(a * a)).copysign(x);
    0.5 * x * (1.0 + erf)
}

/// GELU'(x) = Φ(x) + x·φ(x); both share one exponential, e^{−x²/2}.
#[inline(always)]
pub(crate) fn gelu_grad_value(x: f32) -> f32 {
    let a = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let e = exp_neg(a * a);
    let cdf = 0.5 * (1.0 + erf_poly(a, e).copysign(x));
    cdf + x * (INV_SQRT_2PI * e)
}

dispatched! {
    /// `v ← GELU(v)`.
    gelu_in_place(v: &mut [f32]) => {
        for x in v {
            *x = gelu_value(*x);
        }
    }
}

dispatched! {
    /// `out ← GELU(src)`.
    gelu_into(src: &[f32], out: &mut [f32]) => {
        for (o, x) in out.iter_mut().zip(src) {
            *o = gelu_value(*x);
        }
    }
}

dispatched! {
    /// `g ← g · GELU'(x)`.
    gelu_grad_in_place(x: &[f32], g: &mut [f32]) => {
        for (g, x) in g.iter_mut().zip(x) {
            *g *= gelu_grad_value(*x);
        }
    }
}

/// GELU through the extension (Flex devices, with or without autodiff).
pub(crate) fn gelu_flex<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FastGelu>::fast_gelu(x.into_dispatch()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::{has, Simd};

    /// Each vector loop the CPU has gives the same bits as the baseline loop.
    #[test]
    fn every_vector_loop_gives_the_baseline_bits() {
        let xs: Vec<f32> = (-40_000..40_000).map(|i| i as f32 * 3e-4).chain([0.0, -0.0, 9.5, -9.5, 30.0, -30.0, 1e-20, f32::INFINITY]).collect();
        let run = |level: Simd| {
            let (mut f, mut g, mut inplace) = (vec![0f32; xs.len()], vec![1.5f32; xs.len()], xs.clone());
            gelu_into(level, &xs, &mut f);
            gelu_grad_in_place(level, &xs, &mut g);
            gelu_in_place(level, &mut inplace);
            assert_eq!(f.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), inplace.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            (f.into_iter().map(f32::to_bits).collect::<Vec<_>>(), g.into_iter().map(f32::to_bits).collect::<Vec<_>>())
        };
        let base = run(Simd::Baseline);
        for level in [Simd::Avx512, Simd::Avx2] {
            if !has(level) {
                eprintln!("{level:?}: not on this CPU");
                continue;
            }
            let got = run(level);
            assert!(got.0 == base.0, "{level:?}: forward differs from the baseline loop");
            assert!(got.1 == base.1, "{level:?}: gradient differs from the baseline loop");
        }
        // Against f64: GELU within the erf bound, GELU' within a few e-7.
        for (i, &x) in xs.iter().enumerate().filter(|(_, x)| x.is_finite()) {
            let (xd, f, g) = (x as f64, f32::from_bits(base.0[i]) as f64, f32::from_bits(base.1[i]) as f64 / 1.5);
            let cdf = 0.5 * (1.0 + libm::erf(xd / std::f64::consts::SQRT_2));
            let pdf = (-xd * xd / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
            assert!((f - xd * cdf).abs() <= 4e-7 * xd.abs().max(1.0), "gelu({x}) = {f}");
            assert!((g - (cdf + xd * pdf)).abs() <= 1e-6, "gelu'({x}) = {g}");
        }
    }

    /// The Flex node's value and gradient against ndarray's GELU composed from erf (Burn's exact
    /// erf derivative), on a strided input, with the input also used elsewhere (its buffer
    /// shared), and under Burn's balanced checkpointing (the output recomputed in the backward).
    #[test]
    #[allow(deprecated)] // Device::ndarray: the backend is still compiled in and tested
    fn flex_node_matches_composed_gelu_in_value_and_gradient() {
        use burn::backend::GradientCheckpointingStrategy;
        use burn::tensor::{Device, Distribution};
        let base = Tensor::<2>::random([96, 130], Distribution::Normal(0.0, 2.0), &Device::flex());
        let weights = Tensor::<2>::random([130, 96], Distribution::Default, &Device::flex());
        let data = (base.into_data(), weights.into_data());
        let grad_of = |device: Device, strategy: Option<GradientCheckpointingStrategy>| {
            let mut x = Tensor::<2>::from_data(data.0.clone(), &device).require_grad();
            let mut w = Tensor::<2>::from_data(data.1.clone(), &device);
            if let Some(s) = strategy {
                x = x.with_gradient_checkpointing_strategy(s);
                w = w.with_gradient_checkpointing_strategy(s);
            }
            let y = crate::ops::gelu(x.clone().swap_dims(0, 1).mul_scalar(1.1)) * w;
            let loss = y.clone().sum() + x.clone().sum().mul_scalar(0.5);
            let grads = loss.backward();
            let g: Vec<f32> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
            let v: Vec<f32> = y.inner().into_data().to_vec().unwrap();
            (v, g)
        };
        let (v_ref, g_ref) = grad_of(Device::ndarray().autodiff(), None);
        for strategy in [None, Some(GradientCheckpointingStrategy::Balanced)] {
            let (v, g) = grad_of(Device::flex().autodiff(), strategy);
            for (a, b) in v.iter().zip(&v_ref) {
                assert!((a - b).abs() <= 2e-6 * b.abs().max(1.0), "{strategy:?}: value {a} vs {b}");
            }
            for (a, b) in g.iter().zip(&g_ref) {
                assert!((a - b).abs() <= 2e-6 * b.abs().max(1.0), "{strategy:?}: gradient {a} vs {b}");
            }
        }
    }
}
