//! AdamW on the Flex (`cpu`) backend as one threaded pass per parameter.
//!
//! Burn's `AdamW` composes each parameter's update from a dozen element-wise tensor ops (moment
//! updates, bias corrections, square root, division, decay), each one pass over the parameter on
//! one thread with its own output buffer. [`FusedAdamW`] computes the same update in one pass on
//! every rayon thread, in place where the parameter and its moments own their buffers.
//!
//! It performs the same f32 operations in the same order as Burn's `AdamW` (no FMA contraction;
//! division and square root are exact IEEE operations in every vector width), so the parameters
//! and the moments it produces are bit-identical to Burn's (tested), and its state is Burn's own
//! [`AdamWState`]: a checkpoint written by either resumes with the other.

use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::optim::{AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, Optimizer};
use burn::tensor::{DType, Device, Tensor, TensorData};
use rayon::prelude::*;

use super::cpu::{contiguous, simd, writable};

/// Elements per rayon task (a ViT-B MLP weight, 2.4 M elements, splits into ~150 tasks; a bias
/// runs as one).
const CHUNK: usize = 1 << 14;

/// AdamW (decoupled weight decay, no AMSGrad, no cautious decay) whose step on Flex f32 tensors
/// is one fused, threaded pass; on any other backend or dtype, or with the A/B switch
/// [`use_burn_flex_adamw`] set, it is Burn's `AdamW` with the same settings.
#[derive(Clone)]
pub struct FusedAdamW {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    burn: AdamW,
}

impl FusedAdamW {
    /// AdamW with Burn's default betas (0.9, 0.999), the given ε and decoupled weight decay.
    pub fn new(epsilon: f32, weight_decay: f32) -> Self {
        Self::with_betas(0.9, 0.999, epsilon, weight_decay)
    }

    /// AdamW with explicit betas.
    pub fn with_betas(beta_1: f32, beta_2: f32, epsilon: f32, weight_decay: f32) -> Self {
        let burn = AdamWConfig::new().with_beta_1(beta_1).with_beta_2(beta_2).with_epsilon(epsilon).with_weight_decay(weight_decay).build();
        Self { beta_1, beta_2, epsilon, weight_decay, burn }
    }

    /// Whether the fused pass applies: Flex tensors in f32 without autodiff, and a state (if
    /// any) without AMSGrad's maximum, of the parameter's shape.
    fn fusable<const D: usize>(&self, tensor: &Tensor<D>, grad: &Tensor<D>, state: Option<&AdamWState<D>>) -> bool {
        let plain_f32 = |t: &Tensor<D>| t.dtype() == DType::F32 && !t.is_autodiff() && super::is_flex(&t.device());
        let state_ok = state.is_none_or(|s| {
            let m = &s.momentum;
            m.max_moment_2.is_none() && plain_f32(&m.moment_1) && plain_f32(&m.moment_2) && m.moment_1.dims() == tensor.dims() && m.moment_2.dims() == tensor.dims()
        });
        !BURN_FLEX_ADAMW.load(std::sync::atomic::Ordering::Relaxed) && plain_f32(tensor) && plain_f32(grad) && grad.dims() == tensor.dims() && state_ok
    }
}

impl Optimizer for FusedAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(&self, lr: LearningRate, tensor: Tensor<D>, grad: Tensor<D>, state: Option<Self::State<D>>) -> (Tensor<D>, Option<Self::State<D>>) {
        if !self.fusable(&tensor, &grad, state.as_ref()) {
            return self.burn.step(lr, tensor, grad, state);
        }
        let flex = |t: Tensor<D>| t.try_into_primitive::<Flex>().expect("checked: a Flex tensor without autodiff");
        let shape = tensor.shape();
        let mut param = flex(tensor);
        let grad = contiguous(flex(grad));
        let g = grad.as_slice::<f32>().expect("contiguous f32");
        let (time, mut m, mut v) = match state {
            Some(s) => (s.momentum.time + 1, Some(flex(s.momentum.moment_1)), Some(flex(s.momentum.moment_2))),
            None => (1, None, None),
        };
        let time_i32 = i32::try_from(time).unwrap_or(i32::MAX);
        // Burn's scalars, rounded to f32 the way its scalar ops round them.
        let decay_rate = lr * self.weight_decay as f64;
        let k = Coefficients {
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            factor_1: 1.0 - self.beta_1,
            factor_2: 1.0 - self.beta_2,
            correction_1: 1f32 - self.beta_1.powi(time_i32),
            correction_2: 1f32 - self.beta_2.powi(time_i32),
            epsilon: self.epsilon,
            keep: (decay_rate != 0.0).then_some((1.0 - decay_rate) as f32),
            lr: lr as f32,
        };
        let level = simd();
        // Each buffer is written in place when it owns its memory, else into a copy.
        let mut p_copy = (!writable(&param)).then(|| read(&param));
        let p: &mut [f32] = match p_copy.as_mut() {
            Some(c) => c,
            None => param.try_storage_mut::<f32>().expect("checked: owned f32 values"),
        };
        let (m, v) = match (m.as_mut(), v.as_mut()) {
            (Some(mt), Some(vt)) => {
                let mut m_copy = (!writable(mt)).then(|| read(mt));
                let mut v_copy = (!writable(vt)).then(|| read(vt));
                {
                    let ms: &mut [f32] = match m_copy.as_mut() {
                        Some(c) => c,
                        None => mt.try_storage_mut::<f32>().expect("checked: owned f32 values"),
                    };
                    let vs: &mut [f32] = match v_copy.as_mut() {
                        Some(c) => c,
                        None => vt.try_storage_mut::<f32>().expect("checked: owned f32 values"),
                    };
                    p.par_chunks_mut(CHUNK).zip(ms.par_chunks_mut(CHUNK)).zip(vs.par_chunks_mut(CHUNK)).zip(g.par_chunks(CHUNK)).for_each(|(((p, m), v), g)| step_next(level, &k, p, m, v, g));
                }
                let m = m_copy.map_or_else(|| m.take().expect("present"), |c| FlexTensor::from_data(TensorData::new(c, shape.clone())));
                let v = v_copy.map_or_else(|| v.take().expect("present"), |c| FlexTensor::from_data(TensorData::new(c, shape.clone())));
                (m, v)
            }
            _ => {
                let (mut ms, mut vs) = (vec![0f32; g.len()], vec![0f32; g.len()]);
                p.par_chunks_mut(CHUNK).zip(ms.par_chunks_mut(CHUNK)).zip(vs.par_chunks_mut(CHUNK)).zip(g.par_chunks(CHUNK)).for_each(|(((p, m), v), g)| step_first(level, &k, p, m, v, g));
                (FlexTensor::from_data(TensorData::new(ms, shape.clone())), FlexTensor::from_data(TensorData::new(vs, shape.clone())))
            }
        };
        if let Some(c) = p_copy {
            param = FlexTensor::from_data(TensorData::new(c, shape.clone()));
        }
        let wrap = |t: FlexTensor| Tensor::<D>::from_primitive::<Flex>(t);
        let momentum = AdaptiveMomentumState { time, moment_1: wrap(m), moment_2: wrap(v), max_moment_2: None };
        (wrap(param), Some(AdamWState { momentum }))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        <AdamW as Optimizer>::to_device(state, device)
    }
}

/// The step's scalars, as f32.
pub(crate) struct Coefficients {
    beta_1: f32,
    beta_2: f32,
    factor_1: f32,
    factor_2: f32,
    correction_1: f32,
    correction_2: f32,
    epsilon: f32,
    /// `1 − lr·wd`, or `None` when there is no decay (Burn then leaves the parameter as is).
    keep: Option<f32>,
    lr: f32,
}

/// The parameter update from the new moments, in Burn's order:
/// `θ·(1 − lr·wd) − lr · (m/c₁) / (√(v/c₂) + ε)`.
#[inline(always)]
fn update(k: &Coefficients, p: f32, m: f32, v: f32) -> f32 {
    let delta = (m / k.correction_1) / ((v / k.correction_2).sqrt() + k.epsilon);
    let decayed = match k.keep {
        Some(keep) => p * keep,
        None => p,
    };
    decayed - delta * k.lr
}

dispatched! {
    /// A step with existing moments: `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`, then the update.
    step_next(k: &Coefficients, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) => {
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            *m = *m * k.beta_1 + g * k.factor_1;
            *v = *v * k.beta_2 + (g * g) * k.factor_2;
            *p = update(k, *p, *m, *v);
        }
    }
}

dispatched! {
    /// The first step: `m ← (1−β₁)g`, `v ← (1−β₂)g²`, then the update.
    step_first(k: &Coefficients, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) => {
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            *m = g * k.factor_1;
            *v = (g * g) * k.factor_2;
            *p = update(k, *p, *m, *v);
        }
    }
}

/// A copy of `t`'s values in row-major order.
fn read(t: &FlexTensor) -> Vec<f32> {
    contiguous(t.clone()).as_slice::<f32>().expect("contiguous f32").to_vec()
}

static BURN_FLEX_ADAMW: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// For A/B measurements (`vqt-bench step --flex-adamw burn`): `true` makes [`FusedAdamW`] run
/// Burn's `AdamW` (its composed tensor ops) instead of the fused pass, for the rest of the
/// process.
pub fn use_burn_flex_adamw(on: bool) {
    BURN_FLEX_ADAMW.store(on, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::{has, Simd};
    use burn::tensor::Distribution;

    fn bits<const D: usize>(t: &Tensor<D>) -> Vec<u32> {
        t.clone().into_data().try_to_vec::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
    }

    /// Four steps of the fused pass against four of Burn's `AdamW`, with and without weight
    /// decay, on a parameter split over many rayon tasks and on a small one: parameters and both
    /// moments bit-identical at every step. Also with the parameter's buffer shared (held
    /// elsewhere, so it is not written in place: the holder's values must not change), a strided
    /// gradient, and the fused state handed to Burn's `AdamW` and back (the records are one type).
    #[test]
    fn fused_steps_equal_burns_adamw_bit_for_bit() {
        let device = Device::flex();
        device.seed(11);
        for (shape, wd) in [([300usize, 130usize], 0.0f32), ([300, 130], 0.05), ([7, 3], 0.01)] {
            let fused = FusedAdamW::new(1e-8, wd);
            let burn = AdamWConfig::new().with_epsilon(1e-8).with_weight_decay(wd).build();
            let mut p_f = Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let mut p_b = p_f.clone();
            let (mut s_f, mut s_b) = (None, None);
            for step in 0..4 {
                let lr = 0.01 / (step + 1) as f64;
                // A transposed (strided) gradient on odd steps.
                let g = if step % 2 == 0 {
                    Tensor::<2>::random(shape, Distribution::Normal(0.0, 2.0), &device)
                } else {
                    Tensor::<2>::random([shape[1], shape[0]], Distribution::Normal(0.0, 2.0), &device).swap_dims(0, 1)
                };
                let held = (step == 2).then(|| (p_f.clone(), bits(&p_f)));
                // Step 3 hands the fused state to Burn's optimizer and back.
                if step == 3 {
                    let (p, s) = burn.step(lr, p_f, g.clone(), s_f);
                    (p_f, s_f) = (p, s);
                } else {
                    let (p, s) = fused.step(lr, p_f, g.clone(), s_f);
                    (p_f, s_f) = (p, s);
                }
                let (p, s) = burn.step(lr, p_b, g, s_b);
                (p_b, s_b) = (p, s);
                if let Some((t, b)) = held {
                    assert_eq!(bits(&t), b, "a shared parameter buffer was written in place");
                }
                let (mf, mb) = (&s_f.as_ref().unwrap().momentum, &s_b.as_ref().unwrap().momentum);
                assert_eq!(mf.time, mb.time);
                assert!(bits(&p_f) == bits(&p_b), "{shape:?} wd {wd} step {step}: parameter differs from Burn's AdamW");
                assert!(bits(&mf.moment_1) == bits(&mb.moment_1), "{shape:?} step {step}: first moment differs");
                assert!(bits(&mf.moment_2) == bits(&mb.moment_2), "{shape:?} step {step}: second moment differs");
            }
        }
    }

    /// The switch makes it Burn's optimizer; a non-Flex parameter (ndarray) takes Burn's path too.
    #[test]
    #[allow(deprecated)] // Device::ndarray: the backend is still compiled in and tested
    fn other_backends_take_burns_adamw() {
        let nd = Device::ndarray();
        let p = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, -2.0, 3.0], [3]), &nd);
        let g = Tensor::<1>::from_data(TensorData::new(vec![0.5f32, 0.25, -1.0], [3]), &nd);
        let fused = FusedAdamW::new(1e-8, 0.1);
        assert!(!fused.fusable(&p, &g, None));
        let (a, _) = fused.step(0.1, p.clone(), g.clone(), None);
        let (b, _) = AdamWConfig::new().with_epsilon(1e-8).with_weight_decay(0.1).build().step(0.1, p, g, None);
        assert_eq!(bits(&a), bits(&b));
        let flex = Tensor::<1>::from_data(TensorData::new(vec![1.0f32], [1]), &Device::flex());
        assert!(fused.fusable(&flex, &flex, None));
    }

    /// Each vector loop the CPU has gives the baseline loop's bits.
    #[test]
    fn every_vector_loop_gives_the_baseline_bits() {
        let n = 1000;
        let g: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let k = Coefficients { beta_1: 0.9, beta_2: 0.999, factor_1: 0.1, factor_2: 1.0 - 0.999, correction_1: 0.19, correction_2: 0.001999, epsilon: 1e-8, keep: Some(0.9995), lr: 0.003 };
        let run = |level: Simd| {
            let (mut p, mut m, mut v) = ((0..n).map(|i| i as f32 * 1e-3 - 0.4).collect::<Vec<_>>(), vec![0.0f32; n], vec![0.0f32; n]);
            step_first(level, &k, &mut p, &mut m, &mut v, &g);
            step_next(level, &k, &mut p, &mut m, &mut v, &g);
            [p, m, v].map(|x| x.into_iter().map(f32::to_bits).collect::<Vec<_>>())
        };
        let base = run(Simd::Baseline);
        for level in [Simd::Avx512, Simd::Avx2] {
            if has(level) {
                assert!(run(level) == base, "{level:?}: differs from the baseline loop");
            }
        }
    }
}
