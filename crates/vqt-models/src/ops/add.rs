//! Same-shape addition on the Flex (`cpu`) backend as a Burn backend extension, threaded over
//! the rayon pool, with its own autodiff node.
//!
//! Flex's `float_add` runs one thread (`add_inplace_f32_seq`); a ViT block adds two residual
//! branches of `[B, N, D]` and LoRA adds its low-rank update to the fused `[B, N, 3·D]` qkv
//! output, so on two cores half the machine idled through those passes. Here the sum is
//! written in place when the left operand owns its buffer (as Flex does) or into a new one,
//! chunk by chunk on every thread. Each element is one f32 addition, so the result is the same
//! bits as Flex's whatever the thread count. Under autodiff the node passes the gradient to
//! both operands unchanged (no broadcast: the shapes are equal).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::state::BackwardStates;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{binary, Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::TensorMetadata;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex};
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use super::cpu::{dense, owned_values, par_new};

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

/// Sums below this many elements stay on Flex's own (one-thread) add: a rayon task costs more.
const PARALLEL_MIN: usize = 1 << 15;

/// `lhs + rhs` for tensors of one shape as a backend extension: Flex adds on every thread;
/// under autodiff a node of its own passes the gradient to both operands.
#[backend_extension(Flex, Autodiff)]
pub trait FastAdd: Backend {
    /// `lhs + rhs` (equal shapes).
    fn fast_add(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl FastAdd for Flex {
    fn fast_add(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        forward(lhs, rhs)
    }
}

impl<C: CheckpointStrategy> FastAdd for Autodiff<Flex, C> {
    fn fast_add(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct AddNode;

        impl Backward<Flex, 2> for AddNode {
            type State = ();

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                binary::<Flex, _, _>(ops.parents, ops.node, grads, |g| g, |g| g);
            }
        }

        /// Recomputes the sum from the operands when a checkpointing strategy dropped it.
        #[derive(Debug, Clone)]
        struct RetroAdd(NodeId, NodeId);

        impl RetroForward for RetroAdd {
            fn forward(&self, states: &mut BackwardStates, out_node: NodeId) {
                let lhs: FlexTensor = states.get_state(&self.0);
                let rhs: FlexTensor = states.get_state(&self.1);
                states.save(out_node, forward(lhs, rhs))
            }
        }

        match AddNode.prepare::<C>([lhs.node(), rhs.node()]).memory_bound().retro_forward(RetroAdd(lhs.id(), rhs.id())).parents([&lhs, &rhs]).stateful() {
            OpsKind::Tracked(prep) => prep.finish((), forward(lhs.into_primitive(), rhs.into_primitive())),
            OpsKind::UnTracked(prep) => prep.finish(forward(lhs.into_primitive(), rhs.into_primitive())),
        }
    }
}

/// The sum: in place in `lhs` when it owns its dense buffer, else into a new one; small or
/// non-f32 sums, and shapes that differ, go to Flex's own add.
fn forward(mut lhs: FlexTensor, rhs: FlexTensor) -> FlexTensor {
    let n = lhs.shape().num_elements();
    if lhs.dtype() != DType::F32 || rhs.dtype() != DType::F32 || lhs.shape() != rhs.shape() || n < PARALLEL_MIN {
        return Flex::float_add(lhs, rhs);
    }
    let r = dense(&rhs);
    if let Some(values) = owned_values(&mut lhs) {
        values.par_chunks_mut(CHUNK).zip(r.par_chunks(CHUNK)).for_each(|(o, b)| {
            for (o, b) in o.iter_mut().zip(b) {
                *o += b;
            }
        });
        return lhs;
    }
    let l = dense(&lhs);
    let out = par_new(n, CHUNK, l.par_chunks(CHUNK).zip(r.par_chunks(CHUNK)), |o, (a, b)| {
        for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
            *o = a + b;
        }
    });
    FlexTensor::from_data(TensorData::new(out, lhs.shape().clone()))
}

/// Same-shape addition through the extension (Flex devices, with or without autodiff).
pub(crate) fn add_flex<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FastAdd>::fast_add(lhs.into_dispatch(), rhs.into_dispatch()))
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution, Tensor};

    /// Values and both gradients of `w · (a + b)` summed, ours against Burn's `+`.
    fn run(ours: bool, a_view: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let device = Device::flex().autodiff();
        // Fixed values (not random draws: both runs must see the same inputs).
        let r = |dims: [usize; 3], k: usize| {
            let n = dims.iter().product::<usize>();
            burn::tensor::TensorData::new((0..n).map(|i| ((i * 7919 + k) % 1009) as f32 * 0.01 - 5.0).collect::<Vec<f32>>(), dims)
        };
        let (ad, bd, wd) = (r([40, 30, 64], 1), r([30, 40, 64], 2), r([30, 40, 64], 3));
        let a = Tensor::<3>::from_data(ad, &device).require_grad();
        let b = Tensor::<3>::from_data(bd, &device).require_grad();
        // `a` read as a strided view (swap_dims) or made dense first.
        let av = if a_view { a.clone().swap_dims(0, 1) } else { a.clone().swap_dims(0, 1) * 1.0 };
        let s = if ours { super::add_flex(av, b.clone()) } else { av + b.clone() };
        let loss = (s.clone() * Tensor::<3>::from_data(wd, &device)).sum();
        let grads = loss.backward();
        let v = |t: Tensor<3>| t.into_data().try_to_vec::<f32>().unwrap();
        (v(s), v(a.grad(&grads).unwrap()), v(b.grad(&grads).unwrap()))
    }

    #[test]
    fn flex_add_matches_burns_in_value_and_gradient() {
        for a_view in [true, false] {
            let (ours, burns) = (run(true, a_view), run(false, a_view));
            assert!(ours.0 == burns.0, "values (a view: {a_view})");
            assert!(ours.1 == burns.1, "gradient of a (a view: {a_view})");
            assert!(ours.2 == burns.2, "gradient of b (a view: {a_view})");
        }
        // Without autodiff, in place: the left operand's buffer holds the sum.
        let d = Device::flex();
        let a = Tensor::<2>::random([300, 200], Distribution::Normal(0.0, 1.0), &d);
        let b = Tensor::<2>::random([300, 200], Distribution::Normal(0.0, 1.0), &d);
        let want = (a.clone() + b.clone()).into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(super::add_flex(a, b).into_data().try_to_vec::<f32>().unwrap(), want);
    }
}
