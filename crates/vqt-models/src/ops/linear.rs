//! The linear layer `x·W + b` on the Flex (`cpu`) backend as a Burn backend extension with its
//! own autodiff node: one `gemm` call over all rows with the bias written into the output
//! before the product (gemm then accumulates into it), as PyTorch's `addmm` does.
//!
//! Flex has no `linear` of its own, so Burn's default runs it as a matmul into a zero-filled
//! output followed by a separate broadcast bias add, which allocates and writes the output a
//! second time: at ViT-S/14 112 px batch 32 (Zen 3, 2 threads) the block's four products ran at
//! 92-141 GFLOP/s through it where the same `gemm` calls reach 160-180 (`tools/gemm-vs-blas`,
//! docs/guide/bench.md). Here the output is allocated once, never zeroed (the bias rows, or
//! gemm's own write, fill it), and the input is read through its strides when its rows form one
//! stride (a permuted or narrowed view needs no copy). The backward runs `dX = dY·Wᵀ` and
//! `dW = Xᵀ·dY` as single `gemm` calls on transposed views and `db` as a column sum over fixed
//! row blocks, each only for an input that is tracked (a frozen weight gets no `dW`).
//!
//! A large product runs as one single-threaded gemm call per rayon thread, each on its own
//! block of output rows (or columns), rather than on gemm's own threads (docs/guide/bench.md,
//! item 10). Results do not depend on the number of threads: the split is of the output, not
//! the inner dimension, and the bias sum adds its fixed blocks in order.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::flex::FlexTensor;
use burn::backend::ops::ModuleOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex};
use burn::tensor::{Shape, Tensor, TensorData};
use rayon::prelude::*;

use super::cpu::{all_f32, dense, SendPtr};

/// `x·W + b` as a backend extension: Flex runs it as one bias-initialised gemm; under autodiff a
/// node of its own runs the matching backward.
#[backend_extension(Flex, Autodiff)]
pub trait FastLinear: Backend {
    /// `x: [..., d_in]`, `weight: [d_in, d_out]`, `bias: [d_out]` (any strides), giving
    /// `[..., d_out]`.
    fn fast_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `x·weight` without a bias. (Two methods, because the extension macro of Burn 0.22 does
    /// not pass an `Option` of a tensor through.)
    fn fast_linear_no_bias(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl FastLinear for Flex {
    fn fast_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        flex_linear(x, weight, Some(bias))
    }
    fn fast_linear_no_bias(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        flex_linear(x, weight, None)
    }
}

fn flex_linear(x: FlexTensor, weight: FlexTensor, bias: Option<FlexTensor>) -> FlexTensor {
    if all_f32([&x, &weight].into_iter().chain(bias.as_ref())) {
        forward(x, &weight, bias.as_ref())
    } else {
        Flex::linear(x, weight, bias)
    }
}

/// Checkpointed inputs of the backward: x (for `dW`), W (for `dX`), each kept only when the
/// other is tracked; whether a bias was given.
type LinearState = (Option<NodeId>, Option<NodeId>);

fn run_backward(x: Option<FlexTensor>, w: Option<FlexTensor>, grad: FlexTensor, want: [bool; 3]) -> [Option<FlexTensor>; 3] {
    let [want_x, want_w, want_b] = want;
    let dx = want_x.then(|| grad_input(w.as_ref().expect("weight kept when x is tracked"), &grad));
    let dw = want_w.then(|| grad_weight(x.as_ref().expect("x kept when the weight is tracked"), &grad));
    let db = want_b.then(|| grad_bias(&grad));
    [dx, dw, db]
}

impl<C: CheckpointStrategy> FastLinear for Autodiff<Flex, C> {
    fn fast_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        autodiff_linear::<C>(x, weight, Some(bias))
    }
    fn fast_linear_no_bias(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        autodiff_linear::<C>(x, weight, None)
    }
}

fn autodiff_linear<C: CheckpointStrategy>(x: FloatTensor<Autodiff<Flex, C>>, weight: FloatTensor<Autodiff<Flex, C>>, bias: Option<FloatTensor<Autodiff<Flex, C>>>) -> FloatTensor<Autodiff<Flex, C>> {
    {
        if !all_f32([x.primitive(), weight.primitive()].into_iter().chain(bias.as_ref().map(|b| b.primitive()))) {
            return <Autodiff<Flex, C> as ModuleOps<Autodiff<Flex, C>>>::linear(x, weight, bias);
        }

        #[derive(Debug)]
        struct WithBias;
        #[derive(Debug)]
        struct NoBias;

        impl Backward<Flex, 3> for WithBias {
            type State = LinearState;

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_x, node_w, node_b] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                let (x_state, w_state) = ops.state;
                let x = x_state.map(|id| checkpointer.retrieve_node_output::<FlexTensor>(id));
                let w = w_state.map(|id| checkpointer.retrieve_node_output::<FlexTensor>(id));
                let want = [node_x.is_some(), node_w.is_some(), node_b.is_some()];
                for (node, g) in [node_x, node_w, node_b].into_iter().zip(run_backward(x, w, grad, want)) {
                    if let (Some(node), Some(g)) = (node, g) {
                        grads.register::<Flex>(node.id, g);
                    }
                }
            }
        }

        impl Backward<Flex, 2> for NoBias {
            type State = LinearState;

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_x, node_w] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                let (x_state, w_state) = ops.state;
                let x = x_state.map(|id| checkpointer.retrieve_node_output::<FlexTensor>(id));
                let w = w_state.map(|id| checkpointer.retrieve_node_output::<FlexTensor>(id));
                let want = [node_x.is_some(), node_w.is_some(), false];
                for (node, g) in [node_x, node_w].into_iter().zip(run_backward(x, w, grad, want)) {
                    if let (Some(node), Some(g)) = (node, g) {
                        grads.register::<Flex>(node.id, g);
                    }
                }
            }
        }

        let (x_tracked, w_tracked) = (x.is_tracked(), weight.is_tracked());
        match bias {
            Some(bias) => match WithBias.prepare::<C>([x.node(), weight.node(), bias.node()]).compute_bound().stateful() {
                OpsKind::Tracked(mut prep) => {
                    // x is only needed for the weight's gradient, and the weight for x's.
                    let x_state = w_tracked.then(|| prep.checkpoint(&x));
                    let w_state = x_tracked.then(|| prep.checkpoint(&weight));
                    prep.finish((x_state, w_state), forward(x.into_primitive(), weight.primitive(), Some(bias.primitive())))
                }
                OpsKind::UnTracked(prep) => prep.finish(forward(x.into_primitive(), weight.primitive(), Some(bias.primitive()))),
            },
            None => match NoBias.prepare::<C>([x.node(), weight.node()]).compute_bound().stateful() {
                OpsKind::Tracked(mut prep) => {
                    let x_state = w_tracked.then(|| prep.checkpoint(&x));
                    let w_state = x_tracked.then(|| prep.checkpoint(&weight));
                    prep.finish((x_state, w_state), forward(x.into_primitive(), weight.primitive(), None))
                }
                OpsKind::UnTracked(prep) => prep.finish(forward(x.into_primitive(), weight.primitive(), None)),
            },
        }
    }
}

/// Products at least this large (m·n·k) run on rayon's threads. Flex's matmul uses 192³; here
/// it is lower so that a bottleneck's rank-8 products at ViT sizes (2080 x 384 x 8, 6.4 M
/// multiply-adds, AdaptFormer's and the adapters' forward and backward) are split too: on one
/// thread they ran on the calling thread while the pool's workers waited (bench.md).
const PARALLEL_THRESHOLD: usize = 128 * 128 * 128;

/// Row (or column) blocks of a split product start at multiples of this: gemm's f32
/// microkernels are 16 rows tall with AVX2 (two 8-lane registers) and 16·k with AVX-512, so no
/// block but the last has a partial micro-panel.
const SPLIT_ALIGN: usize = 16;

static GEMM_OWN_THREADS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// For A/B measurements (`vqt-bench step --flex-gemm gemm`): `true` makes every product of
/// [`FastLinear`] use gemm's own rayon parallelism (`Parallelism::Rayon`, as Flex's matmul does)
/// instead of splitting the output into one block per thread, for the rest of the process.
pub fn use_gemm_own_threads(on: bool) {
    GEMM_OWN_THREADS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// How a product of `m·n·k` is spread over `threads`: one call, gemm's own threads, or one
/// single-threaded gemm call per block of `block` output rows (`by_rows`) or columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    One,
    GemmThreads,
    Blocks { by_rows: bool, block: usize },
}

fn split(m: usize, n: usize, k: usize, threads: usize) -> Split {
    if threads < 2 || m.saturating_mul(n).saturating_mul(k) < PARALLEL_THRESHOLD {
        return Split::One;
    }
    if GEMM_OWN_THREADS.load(std::sync::atomic::Ordering::Relaxed) {
        return Split::GemmThreads;
    }
    // Split the longer side of the output: each block packs the whole of the other operand,
    // so that operand should be the smaller one.
    let by_rows = m >= n;
    let len = if by_rows { m } else { n };
    let block = len.div_ceil(threads).next_multiple_of(SPLIT_ALIGN);
    if block >= len {
        return Split::One;
    }
    Split::Blocks { by_rows, block }
}

/// A tensor read as a matrix `[rows, cols]` (all leading dims folded into the rows): its
/// buffer, origin offset and (row, column) strides in elements.
struct Matrix<'a> {
    data: &'a [f32],
    start: usize,
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

impl<'a> Matrix<'a> {
    /// The matrix view of `t`, or `None` when its leading dims do not advance by one row
    /// stride (then the caller makes it contiguous first).
    fn of(t: &'a FlexTensor) -> Option<Self> {
        let layout = t.layout();
        let shape = layout.shape();
        let strides = layout.strides();
        let rank = shape.num_dims();
        assert!(rank >= 1, "linear: a scalar has no rows");
        let cols = shape[rank - 1];
        let cs = strides[rank - 1];
        let rows: usize = (0..rank - 1).map(|i| shape[i]).product();
        // The row stride: that of the innermost leading dim longer than 1, and every outer
        // such dim must step by its inner neighbour's stride times its length.
        let mut rs: Option<isize> = None;
        let mut span = 1usize; // rows covered by the dims inside the current one
        for i in (0..rank - 1).rev() {
            if shape[i] == 1 {
                continue;
            }
            match rs {
                None => rs = Some(strides[i]),
                Some(r) => {
                    if strides[i] != r * span as isize {
                        return None;
                    }
                }
            }
            span *= shape[i];
        }
        // A rank-1 tensor (or all leading dims 1) is one row: any row stride works.
        let rs = rs.unwrap_or(cols as isize * cs.max(1));
        if rs < 0 || cs < 0 {
            return None;
        }
        Some(Self { data: t.storage::<f32>(), start: layout.start_offset(), rows, cols, rs, cs })
    }

    fn ptr(&self) -> *const f32 {
        // SAFETY: the origin offset lies inside the buffer (or the view is empty).
        unsafe { self.data.as_ptr().add(self.start.min(self.data.len())) }
    }
}

/// `t` with a contiguous copy when its rows cannot be read by one stride.
fn rows_readable(t: FlexTensor) -> FlexTensor {
    if Matrix::of(&t).is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// `dst[m, n] = (read ? dst : 0) + lhs[m, k]·rhs[k, n]`, `dst` row-major and dense.
///
/// A large product is split into one block of output rows (or, when the output is wider than
/// tall, columns) per rayon thread, each a single-threaded gemm call. On the Zen 3 of
/// docs/guide/bench.md this ran the ViT products at about 12% more GFLOP/s than gemm's own
/// two-thread split (item 10 there). Each output value is the same k-loop either way, so the
/// result does not depend on the split or the thread count.
///
/// # Safety
/// Every operand with its strides must address valid elements; `dst` holds `m·n` values
/// (initialised when `read`) and does not overlap the inputs.
#[allow(clippy::too_many_arguments)]
unsafe fn product(m: usize, n: usize, k: usize, dst: *mut f32, read: bool, lhs: *const f32, lhs_rs: isize, lhs_cs: isize, rhs: *const f32, rhs_rs: isize, rhs_cs: isize) {
    // SAFETY (every call below): forwarded from the caller; a block addresses a sub-range of
    // the output rows or columns and the matching rows of `lhs` or columns of `rhs`, and the
    // blocks' outputs are disjoint.
    // The output's row stride is the whole product's `n`, whatever block is written.
    let dst_rs = n as isize;
    let call = |rows: usize, cols: usize, dst: *mut f32, lhs: *const f32, rhs: *const f32, par: gemm::Parallelism| unsafe {
        gemm::gemm(rows, cols, k, dst, 1, dst_rs, read, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs, 1.0, 1.0, false, false, false, par)
    };
    match split(m, n, k, rayon::current_num_threads()) {
        Split::One => call(m, n, dst, lhs, rhs, gemm::Parallelism::None),
        Split::GemmThreads => call(m, n, dst, lhs, rhs, gemm::Parallelism::Rayon(0)),
        Split::Blocks { by_rows, block } => {
            let len = if by_rows { m } else { n };
            let (dst, lhs, rhs) = (SendPtr(dst), SendPtr(lhs.cast_mut()), SendPtr(rhs.cast_mut()));
            (0..len.div_ceil(block)).into_par_iter().for_each(|b| {
                let start = b * block;
                let size = block.min(len - start);
                let (dst, lhs, rhs) = (dst.get(), lhs.get().cast_const(), rhs.get().cast_const());
                // SAFETY: see above; `start` < `len`, so every offset stays inside its operand.
                unsafe {
                    if by_rows {
                        call(size, n, dst.add(start * n), lhs.offset(start as isize * lhs_rs), rhs, gemm::Parallelism::None)
                    } else {
                        call(m, size, dst.add(start), lhs, rhs.offset(start as isize * rhs_cs), gemm::Parallelism::None)
                    }
                }
            });
        }
    }
}

/// A dense row-major `[m, n]` output written by `fill` (which must write every value) without
/// zeroing it first.
fn uninit_output(m: usize, n: usize, fill: impl FnOnce(*mut f32)) -> Vec<f32> {
    let len = m.checked_mul(n).expect("linear: output size overflows");
    let mut out: Vec<f32> = Vec::with_capacity(len);
    fill(out.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    // SAFETY: `fill` wrote all `len` values (its contract).
    unsafe { out.set_len(len) };
    out
}

/// The forward: one gemm over every row of `x`, into an output that starts as the bias rows.
fn forward(x: FlexTensor, w: &FlexTensor, bias: Option<&FlexTensor>) -> FlexTensor {
    let x = rows_readable(x);
    let xm = Matrix::of(&x).expect("rows readable");
    let wm = Matrix::of(w).expect("a 2-D weight reads as a matrix");
    assert_eq!(w.layout().shape().num_dims(), 2, "linear: the weight must be [d_in, d_out]");
    let (m, k, n) = (xm.rows, xm.cols, wm.cols);
    assert_eq!(wm.rows, k, "linear: x has {k} features, the weight {} rows", wm.rows);
    let bias_values: Option<Vec<f32>> = bias.map(|b| {
        assert_eq!(b.layout().shape().num_elements(), n, "linear: bias of {n} values expected");
        dense(b)[..n].to_vec()
    });
    let out = uninit_output(m, n, |dst| {
        let dst = SendPtr(dst);
        let mut read = false;
        if let Some(bias) = &bias_values {
            if n > 0 {
                // Bias rows in blocks across the threads, then gemm adds the product to them.
                const BLOCK: usize = 64;
                (0..m.div_ceil(BLOCK)).into_par_iter().for_each(|blk| {
                    let dst = dst;
                    for r in blk * BLOCK..((blk + 1) * BLOCK).min(m) {
                        // SAFETY: row r of the m x n output, written by this task only.
                        unsafe { std::ptr::copy_nonoverlapping(bias.as_ptr(), dst.0.add(r * n), n) };
                    }
                });
            }
            read = true;
        }
        if k == 0 {
            // gemm would not touch the output: the product is zero.
            if !read {
                // SAFETY: m·n values of the output.
                unsafe { std::ptr::write_bytes(dst.0, 0, m * n) };
            }
            return;
        }
        // SAFETY: x and w are read through their views; dst is the m x n output.
        unsafe { product(m, n, k, dst.0, read, xm.ptr(), xm.rs, xm.cs, wm.ptr(), wm.rs, wm.cs) };
    });
    let shape = x.layout().shape();
    let mut dims: Vec<usize> = (0..shape.num_dims()).map(|i| shape[i]).collect();
    *dims.last_mut().expect("rank >= 1") = n;
    FlexTensor::from_data(TensorData::new(out, Shape::from(dims)))
}

/// `dX = dY·Wᵀ`, shaped like `dY` with `d_in` last.
fn grad_input(w: &FlexTensor, grad: &FlexTensor) -> FlexTensor {
    let grad = rows_readable(grad.clone());
    let gm = Matrix::of(&grad).expect("rows readable");
    let wm = Matrix::of(w).expect("a 2-D weight reads as a matrix");
    let (m, k, n) = (gm.rows, gm.cols, wm.rows);
    assert_eq!(wm.cols, k, "linear backward: gradient width");
    let out = uninit_output(m, n, |dst| {
        if k == 0 {
            // SAFETY: m·n values.
            unsafe { std::ptr::write_bytes(dst, 0, m * n) };
            return;
        }
        // SAFETY: Wᵀ is W's view with its strides swapped.
        unsafe { product(m, n, k, dst, false, gm.ptr(), gm.rs, gm.cs, wm.ptr(), wm.cs, wm.rs) };
    });
    let shape = grad.layout().shape();
    let mut dims: Vec<usize> = (0..shape.num_dims()).map(|i| shape[i]).collect();
    *dims.last_mut().expect("rank >= 1") = n;
    FlexTensor::from_data(TensorData::new(out, Shape::from(dims)))
}

/// `dW = Xᵀ·dY`, `[d_in, d_out]` (the sum over every row).
fn grad_weight(x: &FlexTensor, grad: &FlexTensor) -> FlexTensor {
    let x = rows_readable(x.clone());
    let grad = rows_readable(grad.clone());
    let (xm, gm) = (Matrix::of(&x).expect("rows readable"), Matrix::of(&grad).expect("rows readable"));
    assert_eq!(xm.rows, gm.rows, "linear backward: rows of x and of the gradient");
    let (m, k, n) = (xm.cols, xm.rows, gm.cols);
    let out = uninit_output(m, n, |dst| {
        if k == 0 {
            // SAFETY: m·n values.
            unsafe { std::ptr::write_bytes(dst, 0, m * n) };
            return;
        }
        // SAFETY: Xᵀ is x's matrix view with its strides swapped.
        unsafe { product(m, n, k, dst, false, xm.ptr(), xm.cs, xm.rs, gm.ptr(), gm.rs, gm.cs) };
    });
    FlexTensor::from_data(TensorData::new(out, [m, n]))
}

/// Rows per block of the bias gradient's column sum: blocks are summed in parallel, then added
/// in order, so the result does not depend on the thread count.
const SUM_ROWS: usize = 256;

/// `db = Σ_rows dY`, `[d_out]`.
fn grad_bias(grad: &FlexTensor) -> FlexTensor {
    let grad = rows_readable(grad.clone());
    let gm = Matrix::of(&grad).expect("rows readable");
    let (rows, n) = (gm.rows, gm.cols);
    let partial: Vec<Vec<f32>> = (0..rows.div_ceil(SUM_ROWS))
        .into_par_iter()
        .map(|blk| {
            let mut acc = vec![0f32; n];
            for r in blk * SUM_ROWS..((blk + 1) * SUM_ROWS).min(rows) {
                let row = gm.start as isize + r as isize * gm.rs;
                if gm.cs == 1 {
                    let values = &gm.data[row as usize..row as usize + n];
                    for (a, v) in acc.iter_mut().zip(values) {
                        *a += v;
                    }
                } else {
                    for (c, a) in acc.iter_mut().enumerate() {
                        *a += gm.data[(row + c as isize * gm.cs) as usize];
                    }
                }
            }
            acc
        })
        .collect();
    let mut sum = vec![0f32; n];
    for p in partial {
        for (s, v) in sum.iter_mut().zip(p) {
            *s += v;
        }
    }
    FlexTensor::from_data(TensorData::new(sum, [n]))
}

/// `x·weight + bias` through the extension (Flex devices, with or without autodiff).
pub(crate) fn linear_flex<const D: usize>(x: Tensor<D>, weight: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<D> {
    Tensor::from_dispatch(match bias {
        Some(b) => <Dispatch as FastLinear>::fast_linear(x.into_dispatch(), weight.into_dispatch(), b.into_dispatch()),
        None => <Dispatch as FastLinear>::fast_linear_no_bias(x.into_dispatch(), weight.into_dispatch()),
    })
}

#[cfg(test)]
mod tests {
    use burn::backend::GradientCheckpointingStrategy;
    use burn::tensor::{Device, Distribution, Tensor, TensorData};
    use super::{product, split, Split};

    /// Which inputs are tracked: x, weight, bias.
    type Track = [bool; 3];
    type Grads = [Option<Vec<f32>>; 3];

    struct Case {
        x: TensorData,
        w: TensorData,
        b: TensorData,
        r: TensorData,
    }

    fn case() -> Case {
        let d = Device::flex();
        let r = |dims: [usize; 4], s: f64| Tensor::<4>::random(dims, Distribution::Normal(0.0, s), &d).into_data();
        Case {
            // x: [2, 3, 5, 20], read as its first 16 features (a narrowed view whose rows keep
            // one stride) or transposed in its leading dims (rows not on one stride: copied).
            x: r([2, 3, 5, 20], 1.0),
            // W: [16, 30] narrowed to columns 4..28 (row stride 30); bias [30] narrowed likewise.
            w: r([1, 1, 16, 30], 0.5),
            b: r([1, 1, 1, 30], 0.5),
            r: r([3, 2, 5, 24], 1.0),
        }
    }

    /// `linear` (ours when `ours`, else Burn's) of the case's strided views, its value and the
    /// gradients of a weighted sum with respect to the tracked inputs.
    #[allow(clippy::too_many_arguments)]
    fn run(device: &Device, c: &Case, ours: bool, track: Track, bias: bool, permuted: bool, strategy: Option<GradientCheckpointingStrategy>) -> (Vec<f32>, Grads) {
        let input = |data: &TensorData, on: bool| {
            let mut t = Tensor::<4>::from_data(data.clone(), device);
            if let Some(s) = strategy {
                t = t.with_gradient_checkpointing_strategy(s);
            }
            if on && device.is_autodiff() {
                t = t.require_grad();
            }
            t
        };
        let (x4, w4, b4) = (input(&c.x, track[0]), input(&c.w, track[1]), input(&c.b, track[2]));
        let x = x4.clone().narrow(3, 0, 16);
        let x = if permuted { x.swap_dims(0, 1) } else { x.swap_dims(0, 1).swap_dims(0, 1) };
        let w: Tensor<2> = w4.clone().reshape([16, 30]).narrow(1, 4, 24);
        let b: Option<Tensor<1>> = bias.then(|| b4.clone().reshape([30]).narrow(0, 3, 24));
        let y = if ours { super::linear_flex(x, w, b) } else { burn::tensor::module::linear(x, w, b) };
        let y = if permuted { y } else { y.swap_dims(0, 1) };
        let out: Vec<f32> = y.clone().into_data().try_to_vec().unwrap();
        if !device.is_autodiff() {
            return (out, [None, None, None]);
        }
        let grads = (y * input(&c.r, false)).sum().backward();
        let g = |t: &Tensor<4>, on: bool| on.then(|| t.grad(&grads).expect("tracked input has a gradient").into_data().try_to_vec::<f32>().unwrap());
        (out, [g(&x4, track[0]), g(&w4, track[1]), g(&b4, track[2] && bias)])
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{what}: {x} vs {y}");
        }
    }

    #[test]
    #[allow(deprecated)] // Device::ndarray: the independent reference backend
    fn flex_linear_matches_burns_linear_in_value_and_gradient() {
        let c = case();
        let reference = Device::ndarray().autodiff();
        for bias in [true, false] {
            for permuted in [false, true] {
                let (v_ref, g_ref) = run(&reference, &c, false, [true; 3], bias, permuted, None);
                for strategy in [None, Some(GradientCheckpointingStrategy::Balanced)] {
                    let what = format!("bias {bias}, permuted {permuted}, {strategy:?}");
                    let (v, g) = run(&Device::flex().autodiff(), &c, true, [true; 3], bias, permuted, strategy);
                    close(&v, &v_ref, &format!("value ({what})"));
                    for (i, name) in ["dx", "dW", "db"].iter().enumerate() {
                        match (&g[i], &g_ref[i]) {
                            (Some(a), Some(b)) => close(a, b, &format!("{name} ({what})")),
                            (None, None) => {}
                            _ => panic!("{name} ({what}): present in one run only"),
                        }
                    }
                }
                // Partly tracked: a frozen weight (a tuned backbone's linear) gives dx alone, and
                // a frozen input (the first layer) dW and db alone, with the same values.
                let (_, g) = run(&Device::flex().autodiff(), &c, true, [true, false, false], bias, permuted, None);
                close(g[0].as_ref().unwrap(), g_ref[0].as_ref().unwrap(), "dx alone");
                assert!(g[1].is_none() && g[2].is_none());
                let (_, g) = run(&Device::flex().autodiff(), &c, true, [false, true, true], bias, permuted, None);
                close(g[1].as_ref().unwrap(), g_ref[1].as_ref().unwrap(), "dW without dx");
                // Without autodiff: the plain Flex forward against ndarray's.
                let (v_plain, _) = run(&Device::flex(), &c, true, [false; 3], bias, permuted, None);
                let (v_nd, _) = run(&Device::ndarray(), &c, false, [false; 3], bias, permuted, None);
                close(&v_plain, &v_nd, &format!("value without autodiff (bias {bias}, permuted {permuted})"));
            }
        }
    }

    #[test]
    fn flex_linear_handles_ranks_and_empty_sizes() {
        let device = Device::flex();
        // A vector (rank 1) and a plain matrix, against Burn's linear on the same device.
        let w = Tensor::<2>::random([7, 5], Distribution::Default, &device);
        let b = Tensor::<1>::random([5], Distribution::Default, &device);
        let x1 = Tensor::<1>::random([7], Distribution::Default, &device);
        let x2 = Tensor::<2>::random([9, 7], Distribution::Default, &device);
        let v = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap();
        close(&v(super::linear_flex(x1.clone(), w.clone(), Some(b.clone()))), &v(burn::tensor::module::linear(x1, w.clone(), Some(b.clone()))), "rank 1");
        let y2 = super::linear_flex(x2.clone(), w.clone(), Some(b.clone())).reshape([45]);
        close(&v(y2), &v(burn::tensor::module::linear(x2, w, Some(b)).reshape([45])), "rank 2");
        // No rows: an empty output of the right shape.
        let x0 = Tensor::<3>::zeros([2, 0, 7], &device);
        let y0 = super::linear_flex(x0, Tensor::<2>::ones([7, 3], &device), None);
        assert_eq!(y0.dims(), [2, 0, 3]);
    }

    #[test]
    fn flex_linear_is_deterministic() {
        let c = case();
        let a = run(&Device::flex().autodiff(), &c, true, [true; 3], true, true, None);
        let b = run(&Device::flex().autodiff(), &c, true, [true; 3], true, true, None);
        assert_eq!(a.0, b.0);
        assert_eq!(a.1, b.1);
    }

    /// Every split of a product (row blocks, column blocks, with a short last block, on
    /// strided and transposed operands, into a zeroed or an initialised output) gives the bits of
    /// one single-threaded gemm call over the whole product.
    #[test]
    fn split_products_equal_one_gemm_call() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let value = |i: usize| ((i * 7919 + 13) % 1009) as f32 / 1009.0 - 0.5;
        // (m, n, k, the split expected at 3 threads)
        let cases = [
            (300, 200, 160, Split::Blocks { by_rows: true, block: 112 }),
            (100, 500, 160, Split::Blocks { by_rows: false, block: 176 }),
            (40, 40, 40, Split::One),
        ];
        for (m, n, k, expected) in cases {
            assert_eq!(split(m, n, k, 3), expected, "{m}x{n}x{k}");
            // lhs read transposed (column stride m... as the dW product reads X), rhs dense.
            let lhs: Vec<f32> = (0..m * k).map(value).collect();
            let rhs: Vec<f32> = (0..k * n).map(|i| value(i + 5)).collect();
            for (lhs_rs, lhs_cs) in [(k as isize, 1), (1, m as isize)] {
                for read in [false, true] {
                    let init: Vec<f32> = (0..m * n).map(|i| value(i + 11)).collect();
                    let mut whole = init.clone();
                    // SAFETY: the operands hold m·k, k·n and m·n values for these strides.
                    unsafe {
                        gemm::gemm(m, n, k, whole.as_mut_ptr(), 1, n as isize, read, lhs.as_ptr(), lhs_cs, lhs_rs, rhs.as_ptr(), 1, n as isize, 1.0, 1.0, false, false, false, gemm::Parallelism::None)
                    };
                    let mut split_out = init.clone();
                    // SAFETY: as above.
                    pool.install(|| unsafe { product(m, n, k, split_out.as_mut_ptr(), read, lhs.as_ptr(), lhs_rs, lhs_cs, rhs.as_ptr(), n as isize, 1) });
                    assert_eq!(whole, split_out, "{m}x{n}x{k}, lhs strides ({lhs_rs}, {lhs_cs}), read {read}");
                    // And the value itself, against a plain f64 loop.
                    let (i, j) = (m - 1, n / 2);
                    let mut r: f64 = if read { init[i * n + j] as f64 } else { 0.0 };
                    for p in 0..k {
                        r += lhs[(i as isize * lhs_rs + p as isize * lhs_cs) as usize] as f64 * rhs[p * n + j] as f64;
                    }
                    assert!((split_out[i * n + j] as f64 - r).abs() < 1e-3, "{m}x{n}x{k}: {} vs {r}", split_out[i * n + j]);
                }
            }
        }
    }
}
