//! A residual branch scaled per channel and added, `z + o ⊙ γ` (DINOv2's LayerScale on the
//! residual stream), on the Flex (`cpu`) backend as one threaded Burn backend extension with its
//! own autodiff node.
//!
//! Composed, the same sum is Flex's broadcast product (one thread, a fresh buffer) and an add;
//! under autodiff its backward is one more broadcast product (`dO = g ⊙ γ`) and, when `γ`
//! trains, a product and a sum over every row (`dγ = Σ g ⊙ o`), each on one thread. Here the
//! forward is one pass on every thread (in place in `z` when it owns its buffer) and the
//! backward computes `dO` and `dγ` row-parallel, `dγ` as sums over fixed blocks of rows added in
//! order, so the result does not depend on the thread count. The value and `dO` are the same
//! bits as the composed ops' (one product, then one addition, per element).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::TensorMetadata;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex};
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use super::cpu::{dense, owned_values, par_new};

/// Rows per rayon task (and per block of the `dγ` sums).
const ROWS: usize = 64;

/// `z + o ⊙ γ` over the last dim (`z`, `o`: `[..., D]`, `γ`: `[D]`) as a backend extension:
/// Flex runs it row-parallel; under autodiff a node of its own runs the matching backward.
#[backend_extension(Flex, Autodiff)]
pub trait FastScaledAdd: Backend {
    /// `z + o ⊙ gamma`, `gamma` broadcast over the last dim.
    fn fast_scaled_add(z: FloatTensor<Self>, o: FloatTensor<Self>, gamma: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl FastScaledAdd for Flex {
    fn fast_scaled_add(z: FloatTensor<Self>, o: FloatTensor<Self>, gamma: FloatTensor<Self>) -> FloatTensor<Self> {
        forward(z, &o, &gamma)
    }
}

impl<C: CheckpointStrategy> FastScaledAdd for Autodiff<Flex, C> {
    fn fast_scaled_add(z: FloatTensor<Self>, o: FloatTensor<Self>, gamma: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct ScaledAddNode;

        impl Backward<Flex, 3> for ScaledAddNode {
            /// The checkpoints of `o` (kept when `γ` is tracked) and `γ` (when `o` is).
            type State = (Option<NodeId>, Option<NodeId>);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_z, node_o, node_g] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                let (o_state, g_state) = ops.state;
                let o: Option<FlexTensor> = o_state.map(|s| checkpointer.retrieve_node_output(s));
                let gamma: Option<FlexTensor> = g_state.map(|s| checkpointer.retrieve_node_output(s));
                let (d_o, d_g) = backward(&grad, o.as_ref(), gamma.as_ref());
                if let (Some(node), Some(g)) = (node_o, d_o) {
                    grads.register::<Flex>(node.id, g);
                }
                if let (Some(node), Some(g)) = (node_g, d_g) {
                    grads.register::<Flex>(node.id, g);
                }
                if let Some(node) = node_z {
                    grads.register::<Flex>(node.id, grad);
                }
            }
        }

        let (o_tracked, g_tracked) = (o.is_tracked(), gamma.is_tracked());
        match ScaledAddNode.prepare::<C>([z.node(), o.node(), gamma.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                // o is only needed for γ's gradient, and γ for o's.
                let o_state = g_tracked.then(|| prep.checkpoint(&o));
                let g_state = o_tracked.then(|| prep.checkpoint(&gamma));
                prep.finish((o_state, g_state), forward(z.into_primitive(), o.primitive(), gamma.primitive()))
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(z.into_primitive(), o.primitive(), gamma.primitive())),
        }
    }
}

/// `z + o ⊙ γ`, in place in `z` when it owns its dense buffer, else into a new one.
fn forward(mut z: FlexTensor, o: &FlexTensor, gamma: &FlexTensor) -> FlexTensor {
    assert!(z.dtype() == DType::F32 && o.dtype() == DType::F32 && gamma.dtype() == DType::F32, "scaled_add: f32 only (the caller routes other dtypes to Burn)");
    assert_eq!(z.shape(), o.shape(), "scaled_add: z and o must have one shape");
    let d = gamma.shape().num_elements();
    let n = z.shape().num_elements();
    assert!(d > 0 && n % d == 0 && o.shape()[o.shape().num_dims() - 1] == d, "scaled_add: gamma must have the last dim's values");
    let (os, g) = (dense(o), dense(gamma));
    let row = |out: &mut [f32], zr: Option<&[f32]>, or: &[f32]| match zr {
        Some(zr) => {
            for (((y, &a), &b), &c) in out.iter_mut().zip(zr).zip(or).zip(g.iter()) {
                *y = a + b * c;
            }
        }
        None => {
            for ((y, &b), &c) in out.iter_mut().zip(or).zip(g.iter()) {
                *y += b * c;
            }
        }
    };
    if let Some(values) = owned_values(&mut z) {
        values.par_chunks_mut(ROWS * d).zip(os.par_chunks(ROWS * d)).for_each(|(zb, ob)| {
            for (zr, or) in zb.chunks_exact_mut(d).zip(ob.chunks_exact(d)) {
                row(zr, None, or);
            }
        });
        return z;
    }
    let zs = dense(&z);
    let out = par_new(n, ROWS * d, zs.par_chunks(ROWS * d).zip(os.par_chunks(ROWS * d)), |yb, (zb, ob)| {
        for ((yr, zr), or) in yb.chunks_exact_mut(d).zip(zb.chunks_exact(d)).zip(ob.chunks_exact(d)) {
            row(yr, Some(zr), or);
        }
    });
    FlexTensor::from_data(TensorData::new(out, z.shape().clone()))
}

/// `(dO, dγ)` for the gradient `grad` of the sum: `dO = grad ⊙ γ` when `γ` is given (o is
/// tracked), `dγ = Σ_rows grad ⊙ o` when `o` is given (γ is tracked).
fn backward(grad: &FlexTensor, o: Option<&FlexTensor>, gamma: Option<&FlexTensor>) -> (Option<FlexTensor>, Option<FlexTensor>) {
    let gs = dense(grad);
    let d_o = gamma.map(|gamma| {
        let g = dense(gamma);
        let d = g.len();
        let out = par_new(gs.len(), ROWS * d, gs.par_chunks(ROWS * d), |ob, gb| {
            for (orow, grow) in ob.chunks_exact_mut(d).zip(gb.chunks_exact(d)) {
                for ((y, &a), &c) in orow.iter_mut().zip(grow).zip(g.iter()) {
                    *y = a * c;
                }
            }
        });
        FlexTensor::from_data(TensorData::new(out, grad.shape().clone()))
    });
    let d_g = o.map(|o| {
        let os = dense(o);
        let d = o.shape()[o.shape().num_dims() - 1];
        let partial: Vec<Vec<f32>> = gs
            .par_chunks(ROWS * d)
            .zip(os.par_chunks(ROWS * d))
            .map(|(gb, ob)| {
                let mut s = vec![0f32; d];
                for (grow, orow) in gb.chunks_exact(d).zip(ob.chunks_exact(d)) {
                    for ((acc, &a), &b) in s.iter_mut().zip(grow).zip(orow) {
                        *acc += a * b;
                    }
                }
                s
            })
            .collect();
        let mut s = vec![0f32; d];
        for p in partial {
            for (acc, v) in s.iter_mut().zip(p) {
                *acc += v;
            }
        }
        FlexTensor::from_data(TensorData::new(s, [d]))
    });
    (d_o, d_g)
}

/// `z + o ⊙ γ` through the extension (Flex devices, with or without autodiff).
pub(crate) fn scaled_add_flex(z: Tensor<3>, o: Tensor<3>, gamma: Tensor<1>) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as FastScaledAdd>::fast_scaled_add(z.into_dispatch(), o.into_dispatch(), gamma.into_dispatch()))
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Tensor, TensorData};

    fn values(dims: &[usize], k: usize) -> TensorData {
        let n = dims.iter().product::<usize>();
        TensorData::new((0..n).map(|i| ((i * 7919 + k * 131) % 1013) as f32 * 0.003 - 1.5).collect::<Vec<f32>>(), dims.to_vec())
    }

    /// The sum and the gradients (z, o, γ) of `Σ w ⊙ (z + o ⊙ γ)` for the tracked inputs, ours
    /// or composed; `z` read as a strided view when `view`.
    fn run(ours: bool, track: [bool; 3], view: bool) -> [Option<Vec<f32>>; 4] {
        let device = Device::flex().autodiff();
        let t = |d: TensorData, on: bool| {
            let t = Tensor::<3>::from_data(d, &device);
            if on { t.require_grad() } else { t }
        };
        let z0 = t(values(&[70, 3, 48], 1), track[0]);
        let o = t(values(&[3, 70, 48], 2), track[1]);
        let g = Tensor::<1>::from_data(values(&[48], 3), &device);
        let g = if track[2] { g.require_grad() } else { g };
        let z = if view { z0.clone().swap_dims(0, 1) } else { z0.clone().swap_dims(0, 1) * 1.0 };
        let s = if ours { super::scaled_add_flex(z, o.clone(), g.clone()) } else { z + o.clone() * g.clone().unsqueeze::<3>() };
        let w = Tensor::<3>::from_data(values(&[3, 70, 48], 4), &device);
        let grads = (s.clone() * w).sum().backward();
        let v3 = |t: Tensor<3>| t.into_data().try_to_vec::<f32>().unwrap();
        [
            Some(v3(s)),
            track[0].then(|| v3(z0.grad(&grads).unwrap())),
            track[1].then(|| v3(o.grad(&grads).unwrap())),
            track[2].then(|| g.grad(&grads).unwrap().into_data().try_to_vec::<f32>().unwrap()),
        ]
    }

    #[test]
    fn flex_scaled_add_matches_the_composed_ops_in_value_and_gradient() {
        for (track, view) in [([true, true, true], true), ([true, true, false], false), ([false, false, true], false), ([true, false, false], true)] {
            let (ours, composed) = (run(true, track, view), run(false, track, view));
            // The value, dz and dO: one product and one addition per element, the same bits.
            for i in 0..3 {
                assert!(ours[i] == composed[i], "output {i} (tracked {track:?}, view {view})");
            }
            // dγ: a sum over 210 rows in another order.
            match (&ours[3], &composed[3]) {
                (Some(a), Some(b)) => {
                    for (x, y) in a.iter().zip(b) {
                        assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "dγ {x} vs {y}");
                    }
                }
                (a, b) => assert_eq!(a.is_some(), b.is_some()),
            }
        }
        // Without autodiff, in place in z.
        let d = Device::flex();
        let (z, o, g) = (Tensor::<3>::from_data(values(&[4, 50, 48], 5), &d), Tensor::<3>::from_data(values(&[4, 50, 48], 6), &d), Tensor::<1>::from_data(values(&[48], 7), &d));
        let want = (z.clone() + o.clone() * g.clone().unsqueeze::<3>()).into_data().try_to_vec::<f32>().unwrap();
        assert!(super::scaled_add_flex(z, o, g).into_data().try_to_vec::<f32>().unwrap() == want);
    }
}
