//! Multi-head attention on the Flex (`cpu`) backend as a Burn backend extension with its own
//! autodiff node: `softmax(q·kᵀ·scale)·v`, one rayon task per (image, head), each running its
//! products as single-threaded `gemm` calls straight on the strided head views.
//!
//! Under autodiff Burn 0.22 composes attention from matmul, scale, softmax and matmul, each a
//! separate op with its own output buffers, layout copies and backward nodes: at ViT-S/14 112 px
//! batch 32 the per-head products ran at 15-40 GFLOP/s where the same `gemm` calls on the same
//! strided views reach about 80 (Zen 3, 2 threads). Here the forward keeps the probabilities `P`
//! (as the composed graph does) and the backward runs the four products of the gradient
//! (`dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − rowsum(dP ⊙ P))·scale`, `dQ = dS·K`,
//! `dK = dSᵀ·Q`) per (image, head) in one task, computing only the gradients whose inputs are
//! tracked (VQT's queries read frozen keys and values, so only `dQ`). The output is written in
//! `[B, N, H, Dh]` order, so merging the heads afterwards is a view, not a copy. With fewer than
//! 16 query rows per head (VQT's Q queries per layer, usually 1) every product is a handful of
//! vector products, so the head runs dot-product and row-update loops instead of `gemm` calls
//! (whose per-call setup and packing cost more than that work).
//!
//! The result does not depend on the number of threads (each task owns its head). The
//! exponential is [`super::exp_neg`] (about 2 ulp) in a loop compiled for AVX-512F,
//! AVX2+FMA and the baseline (chosen as for GELU); every loop gives the same bits.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex};
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use super::exp_neg;
use super::cpu::{lane_max, lane_sum, lane_sum2, par_zeros, simd, SendPtr};

/// Attention of already split heads as a backend extension: Flex runs it per (image, head);
/// under autodiff a node of its own runs the matching backward.
#[backend_extension(Flex, Autodiff)]
pub trait FastAttention: Backend {
    /// `softmax(q·kᵀ·scale)·v` for `q: [B, H, Nq, Dh]`, `k: [B, H, Nk, Dh]`, `v: [B, H, Nk, Dv]`
    /// (any strides), giving `[B, H, Nq, Dv]`.
    fn fast_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, scale: f32) -> FloatTensor<Self>;
    /// Self-attention of a fused projection `qkv: [B, N, 3·H·Dh]` (q, k and v side by side,
    /// head h of each owning columns `h·Dh .. (h+1)·Dh` of its third, as timm's fused qkv),
    /// read in place (rows at any stride, columns contiguous or not), giving `[B, H, N, Dh]`:
    /// every row is a query, and the first `keys` rows (`keys ≤ N`; `N` for plain
    /// self-attention) are the keys and values. Under autodiff its backward writes the
    /// gradient of `qkv` as one tensor, so the three parts are neither copied apart in the
    /// forward nor gathered back (zero-filled and summed, as slicing's backward would) in the
    /// backward.
    fn fast_attention_packed(qkv: FloatTensor<Self>, heads: usize, keys: usize, scale: f32) -> FloatTensor<Self>;
    /// [`FastAttention::fast_attention`] of `q: [B, H, Nq, Dh]` over keys and values read in
    /// place from larger tensors `k, v: [N, H, Nk, ·]` (the feature cache's whole layer):
    /// image `b` of the batch reads their row `rows[b]`. The keys and values are constants
    /// (only `q` has a gradient), so nothing of the cache is copied, forward or backward.
    fn fast_attention_rows(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, rows: Vec<usize>, scale: f32) -> FloatTensor<Self>;
}

impl FastAttention for Flex {
    fn fast_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        forward(&q, &k, &v, scale, false).0
    }
    fn fast_attention_packed(qkv: FloatTensor<Self>, heads: usize, keys: usize, scale: f32) -> FloatTensor<Self> {
        forward_packed(&qkv, heads, keys, scale, false).0
    }
    fn fast_attention_rows(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, rows: Vec<usize>, scale: f32) -> FloatTensor<Self> {
        forward_rows(&q, &k, &v, &rows, scale, false).0
    }
}

/// The probabilities `P = softmax(q·kᵀ·scale)` kept for the backward, `[B·H, Nq, Nk]`.
#[derive(Clone)]
struct Probs(std::sync::Arc<Vec<f32>>);

impl std::fmt::Debug for Probs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Probs({} values)", self.0.len())
    }
}

impl<C: CheckpointStrategy> FastAttention for Autodiff<Flex, C> {
    fn fast_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct AttentionNode;

        impl Backward<Flex, 3> for AttentionNode {
            type State = (NodeId, NodeId, NodeId, Probs, f32);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_q, node_k, node_v] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                let (q_state, k_state, v_state, probs, scale) = ops.state;
                let q: FlexTensor = checkpointer.retrieve_node_output(q_state);
                let k: FlexTensor = checkpointer.retrieve_node_output(k_state);
                let v: FlexTensor = checkpointer.retrieve_node_output(v_state);
                let want = [node_q.is_some(), node_k.is_some(), node_v.is_some()];
                let [dq, dk, dv] = backward(&q, &k, &v, &probs.0, &grad, scale, want);
                for (node, g) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
                    if let (Some(node), Some(g)) = (node, g) {
                        grads.register::<Flex>(node.id, g);
                    }
                }
            }
        }

        /// Constant keys and values (VQT's queries reading the frozen trunk's): the node
        /// keeps each query row's gradient map ([`head_maps`]) instead of q, k, v and the
        /// probabilities, so the keys and values can be freed after the forward.
        #[derive(Debug)]
        struct MapsNode;

        impl Backward<Flex, 1> for MapsNode {
            type State = (Probs, [usize; 5]);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_q] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                let (maps, dims) = ops.state;
                if let Some(node) = node_q {
                    grads.register::<Flex>(node.id, backward_maps(&maps.0, &grad, dims));
                }
            }
        }

        if q.is_tracked() && !k.is_tracked() && !v.is_tracked() && maps_are_smaller(q.primitive(), k.primitive(), v.primitive()) {
            let (k, v) = (k.primitive().clone(), v.primitive().clone());
            return match MapsNode.prepare::<C>([q.node()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let (out, maps, dims) = forward_maps(q.primitive(), &k, &v, scale);
                    prep.finish((Probs(std::sync::Arc::new(maps)), dims), out)
                }
                OpsKind::UnTracked(prep) => prep.finish(forward(q.primitive(), &k, &v, scale, false).0),
            };
        }

        match AttentionNode.prepare::<C>([q.node(), k.node(), v.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let q_state = prep.checkpoint(&q);
                let k_state = prep.checkpoint(&k);
                let v_state = prep.checkpoint(&v);
                let (out, probs) = forward(q.primitive(), k.primitive(), v.primitive(), scale, true);
                let probs = Probs(std::sync::Arc::new(probs.expect("kept when asked")));
                prep.finish((q_state, k_state, v_state, probs, scale), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(q.primitive(), k.primitive(), v.primitive(), scale, false).0),
        }
    }

    fn fast_attention_packed(qkv: FloatTensor<Self>, heads: usize, keys: usize, scale: f32) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct PackedNode;

        impl Backward<Flex, 1> for PackedNode {
            type State = (NodeId, Probs, usize, usize, f32);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                let (state, probs, heads, keys, scale) = ops.state;
                let qkv: FlexTensor = checkpointer.retrieve_node_output(state);
                if let Some(node) = node {
                    grads.register::<Flex>(node.id, backward_packed(&qkv, heads, keys, &probs.0, &grad, scale));
                }
            }
        }

        match PackedNode.prepare::<C>([qkv.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = prep.checkpoint(&qkv);
                let (out, probs) = forward_packed(qkv.primitive(), heads, keys, scale, true);
                let probs = Probs(std::sync::Arc::new(probs.expect("kept when asked")));
                prep.finish((state, probs, heads, keys, scale), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward_packed(qkv.primitive(), heads, keys, scale, false).0),
        }
    }

    fn fast_attention_rows(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, rows: Vec<usize>, scale: f32) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct RowsNode;

        impl Backward<Flex, 1> for RowsNode {
            type State = (NodeId, FlexTensor, FlexTensor, Vec<usize>, Probs, f32);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_q] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                let (q_state, k, v, rows, probs, scale) = ops.state;
                let q: FlexTensor = checkpointer.retrieve_node_output(q_state);
                if let Some(node) = node_q {
                    grads.register::<Flex>(node.id, backward_rows(&q, &k, &v, &rows, &probs.0, &grad, scale));
                }
            }
        }

        // The cached keys and values are constants: the node's only parent is q, and they are
        // kept as plain tensors (shared, not copied).
        assert!(!k.is_tracked() && !v.is_tracked(), "attention over cached rows: the keys and values must not require gradients");
        let (k, v) = (k.primitive().clone(), v.primitive().clone());
        match RowsNode.prepare::<C>([q.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let q_state = prep.checkpoint(&q);
                let (out, probs) = forward_rows(q.primitive(), &k, &v, &rows, scale, true);
                let probs = Probs(std::sync::Arc::new(probs.expect("kept when asked")));
                prep.finish((q_state, k, v, rows, probs, scale), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward_rows(q.primitive(), &k, &v, &rows, scale, false).0),
        }
    }
}

/// The elements behind a [`View`]: f32, or f16 (a feature cache's keys and values stored in half
/// precision, widened to f32 head by head as they are read).
#[derive(Clone, Copy)]
enum Data<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

impl Data<'_> {
    fn len(&self) -> usize {
        match self {
            Data::F32(d) => d.len(),
            Data::F16(d) => d.len(),
        }
    }
}

/// A strided 4-D view `[B, H, rows, cols]`: its buffer, the element offset of its origin and its
/// four strides (elements).
struct View<'a> {
    data: Data<'a>,
    start: isize,
    strides: [isize; 4],
    dims: [usize; 4],
    /// Where given, batch index `b` reads the tensor's row `rows[b]` (and `dims[0]` is
    /// `rows.len()`): a batch read in place from a larger tensor.
    rows: Option<&'a [usize]>,
}

impl<'a> View<'a> {
    fn of(t: &'a FlexTensor, what: &str) -> Self {
        let layout = t.layout();
        let shape = layout.shape();
        assert_eq!(shape.num_dims(), 4, "attention: {what} must be [B, H, N, D], got {shape:?}");
        let s = layout.strides();
        let data = match t.dtype() {
            DType::F32 => Data::F32(t.storage::<f32>()),
            DType::F16 => Data::F16(t.storage::<half::f16>()),
            other => panic!("attention: {what} must be f32 or f16, got {other:?}"),
        };
        Self {
            data,
            start: layout.start_offset() as isize,
            strides: [s[0], s[1], s[2], s[3]],
            dims: [shape[0], shape[1], shape[2], shape[3]],
            rows: None,
        }
    }

    /// The rows `rows` of `t: [N, H, rows, cols]` as a batch `[rows.len(), H, rows, cols]`.
    fn of_rows(t: &'a FlexTensor, what: &str, rows: &'a [usize]) -> Self {
        let mut view = Self::of(t, what);
        let n = view.dims[0];
        assert!(rows.iter().all(|&r| r < n), "attention: a row of {what} out of range (it has {n})");
        view.dims[0] = rows.len();
        view.rows = Some(rows);
        view
    }

    /// The offset of head `(b, h)`'s first element.
    fn head_offset(&self, b: usize, h: usize) -> isize {
        let b = self.rows.map_or(b, |r| r[b]);
        self.start + b as isize * self.strides[0] + h as isize * self.strides[1]
    }

    /// Part `part` (0 = q, 1 = k, 2 = v) of a fused projection `[B, N, 3·H·Dh]` as the view
    /// `[B, H, rows, Dh]` of its heads' first `rows` rows (`rows ≤ N`).
    fn packed(t: &'a FlexTensor, heads: usize, part: usize, rows: usize) -> Self {
        let layout = t.layout();
        let shape = layout.shape();
        assert_eq!(shape.num_dims(), 3, "attention: the fused qkv must be [B, N, 3·D], got {shape:?}");
        let [b, n, width] = [shape[0], shape[1], shape[2]];
        assert!(heads > 0 && width % (3 * heads) == 0, "attention: a fused qkv of width {width} does not split into 3 x {heads} heads");
        assert!(rows <= n, "attention: {rows} key rows of a fused qkv with {n} rows");
        let dh = width / (3 * heads);
        let s = layout.strides();
        Self {
            data: Data::F32(t.storage::<f32>()),
            start: layout.start_offset() as isize + (part * heads * dh) as isize * s[2],
            strides: [s[0], dh as isize * s[2], s[1], s[2]],
            dims: [b, heads, rows, dh],
            rows: None,
        }
    }

    /// Pointer to head `(b, h)`'s first element (an f32 view).
    fn head(&self, b: usize, h: usize) -> *const f32 {
        let off = self.head_offset(b, h);
        debug_assert!(off >= 0 && (off as usize) < self.data.len().max(1));
        let Data::F32(data) = self.data else { panic!("attention: a product reads an f16 head in place") };
        // SAFETY: the offset addresses an element of the view, which lies inside `data`.
        unsafe { data.as_ptr().offset(off) }
    }

    /// Head `(b, h)` as f32 for a product: its pointer with (row, column) strides, in place
    /// for an f32 view, else widened into `buf` (contiguous rows).
    fn head_f32(&self, b: usize, h: usize, buf: &mut Vec<f32>) -> (*const f32, isize, isize) {
        if let Data::F32(_) = self.data {
            return (self.head(b, h), self.rs(), self.cs());
        }
        let cols = self.dims[3];
        let rows = Rows::of(self, b, h, buf);
        debug_assert_eq!(rows.rs, cols);
        (rows.data.as_ptr(), cols as isize, 1)
    }

    /// Row and column strides of one head.
    fn rs(&self) -> isize {
        self.strides[2]
    }
    fn cs(&self) -> isize {
        self.strides[3]
    }
}

/// `dst[m, n] = beta · lhs[m, k] · rhs[k, n]` on one thread, every operand given by its pointer
/// and (column, row) strides; `dst` is overwritten.
///
/// # Safety
/// Every pointer with its strides must address `m·k`, `k·n` and `m·n` valid elements, and `dst`
/// must not overlap the inputs.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(m: usize, n: usize, k: usize, dst: *mut f32, dst_cs: isize, dst_rs: isize, lhs: *const f32, lhs_cs: isize, lhs_rs: isize, rhs: *const f32, rhs_cs: isize, rhs_rs: isize, beta: f32) {
    // SAFETY: forwarded from the caller.
    unsafe { gemm::gemm(m, n, k, dst, dst_cs, dst_rs, false, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs, 0.0, beta, false, false, false, gemm::Parallelism::None) }
}

fn checked_dims(q: &View, k: &View, v: &View) -> (usize, usize, usize, usize, usize, usize) {
    let [b, h, nq, dh] = q.dims;
    let [kb, kh, nk, kd] = k.dims;
    let [vb, vh, vn, dv] = v.dims;
    assert!(
        kb == b && vb == b && kh == h && vh == h && kd == dh && vn == nk,
        "attention: q {:?}, k {:?}, v {:?} do not fit [B, H, Nq, Dh] x [B, H, Nk, Dh] x [B, H, Nk, Dv]",
        q.dims,
        k.dims,
        v.dims
    );
    (b, h, nq, nk, dh, dv)
}

/// The forward: the output `[B, H, Nq, Dv]` (stored `[B, Nq, H, Dv]`) and, when `keep`, the
/// probabilities `[B·H, Nq, Nk]`. Non-f32 inputs go through Burn's own attention.
fn forward(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, scale: f32, keep: bool) -> (FlexTensor, Option<Vec<f32>>) {
    assert!(q.dtype() == DType::F32 && k.dtype() == DType::F32 && v.dtype() == DType::F32, "attention: f32 only (the caller routes other dtypes to Burn)");
    let (out, probs, _) = forward_views(&View::of(q, "q"), &View::of(k, "k"), &View::of(v, "v"), scale, keep, false);
    (out, probs)
}

/// Whether [`forward_maps`]' gradient maps (`Nq·Dh·Dv` a head) take less memory than the keys
/// and values (`Nk·(Dh + Dv)`) that the backward would otherwise keep: VQT's few queries a
/// layer over a ViT's tokens (at ViT-B/16 224 px with one query: 4,096 against 25,216 values a
/// head), not many queries over few keys.
fn maps_are_smaller(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor) -> bool {
    let dims = |t: &FlexTensor| t.layout().shape().to_vec();
    let (q, k, v) = (dims(q), dims(k), dims(v));
    if q.len() != 4 || k.len() != 4 || v.len() != 4 {
        return false;
    }
    crate::ops::attention_keeps_maps(q[2], k[2], q[3], v[3])
}

/// [`forward`] for a query side whose keys and values are constants: the output and each query
/// row's gradient map `M_i` ([`head_maps`], `[B·H·Nq, Dh, Dv]`), with the dims
/// `[B, H, Nq, Dh, Dv]`.
fn forward_maps(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, scale: f32) -> (FlexTensor, Vec<f32>, [usize; 5]) {
    assert!(q.dtype() == DType::F32 && k.dtype() == DType::F32 && v.dtype() == DType::F32, "attention: f32 only (the caller routes other dtypes to Burn)");
    let (qv, kv, vv) = (View::of(q, "q"), View::of(k, "k"), View::of(v, "v"));
    let (b, h, nq, _, dh, dv) = checked_dims(&qv, &kv, &vv);
    let (out, _, maps) = forward_views(&qv, &kv, &vv, scale, false, true);
    (out, maps.expect("asked"), [b, h, nq, dh, dv])
}

/// The gradient of q from [`forward_maps`]' maps: `dq_i = M_i · do_i` per query row,
/// `[B, H, Nq, Dh]`.
fn backward_maps(maps: &[f32], grad: &FlexTensor, dims: [usize; 5]) -> FlexTensor {
    let [b, h, nq, dh, dv] = dims;
    let gv = View::of(grad, "grad");
    assert_eq!(gv.dims, [b, h, nq, dv], "attention: output gradient shape");
    assert_eq!(maps.len(), b * h * nq * dh * dv, "attention: kept gradient maps");
    let mut dq = par_zeros(b * h * nq * dh);
    dq.par_chunks_mut((nq * dh).max(1)).enumerate().with_min_len(h).for_each_init(Vec::new, |g_buf, (i, dq_head)| {
        let g = Rows::of(&gv, i / h, i % h, g_buf);
        for (qi, dq_row) in dq_head.chunks_exact_mut(dh.max(1)).enumerate() {
            let m = &maps[(i * nq + qi) * dh * dv..(i * nq + qi + 1) * dh * dv];
            for (a, x) in dq_row.iter_mut().enumerate() {
                *x = dot(&m[a * dv..(a + 1) * dv], g.row(qi));
            }
        }
    });
    FlexTensor::from_data(TensorData::new(dq, [b, h, nq, dh]))
}

/// [`forward`] of the heads of a fused projection `[B, N, 3·H·Dh]`: every row a query, the
/// first `keys` rows the keys and values.
fn forward_packed(qkv: &FlexTensor, heads: usize, keys: usize, scale: f32, keep: bool) -> (FlexTensor, Option<Vec<f32>>) {
    assert!(qkv.dtype() == DType::F32, "attention: f32 only (the caller routes other dtypes to Burn)");
    let n = qkv.layout().shape()[1];
    let [q, k, v] = [0, 1, 2].map(|part| View::packed(qkv, heads, part, if part == 0 { n } else { keys }));
    let (out, probs, _) = forward_views(&q, &k, &v, scale, keep, false);
    (out, probs)
}

/// [`forward`] over the rows `rows` of larger keys and values `[N, H, Nk, ·]`, read in place.
fn forward_rows(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, rows: &[usize], scale: f32, keep: bool) -> (FlexTensor, Option<Vec<f32>>) {
    assert!(q.dtype() == DType::F32 && cache_dtype(k.dtype()) && cache_dtype(v.dtype()), "attention: f32 queries over f32 or f16 keys and values only (the caller routes other dtypes to Burn)");
    let (out, probs, _) = forward_views(&View::of(q, "q"), &View::of_rows(k, "k", rows), &View::of_rows(v, "v", rows), scale, keep, false);
    (out, probs)
}

/// Whether keys and values read in place ([`forward_rows`]) may be stored as `dtype`.
pub(crate) fn cache_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16)
}

/// The gradient of `q` for [`forward_rows`] (the keys and values are constants).
fn backward_rows(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, rows: &[usize], probs: &[f32], grad: &FlexTensor, scale: f32) -> FlexTensor {
    let (qv, kv, vv) = (View::of(q, "q"), View::of_rows(k, "k", rows), View::of_rows(v, "v", rows));
    let (b, h, nq, _, dh, _) = checked_dims(&qv, &kv, &vv);
    let mut dq = par_zeros(b * h * nq * dh);
    let dest = Dest { ptr: SendPtr(dq.as_mut_ptr()), base: 0, sb: h * nq * dh, sh: nq * dh, rs: dh };
    backward_views(&qv, &kv, &vv, probs, &View::of(grad, "grad"), scale, [Some(dest), None, None]);
    FlexTensor::from_data(TensorData::new(dq, [b, h, nq, dh]))
}

/// The forward on views: the output `[B, H, Nq, Dv]` (stored `[B, Nq, H, Dv]`), the
/// probabilities when `keep`, and the gradient maps ([`head_maps`], `[B·H·Nq, Dh, Dv]`) when
/// `maps`.
fn forward_views(qv: &View, kv: &View, vv: &View, scale: f32, keep: bool, maps: bool) -> (FlexTensor, Option<Vec<f32>>, Option<Vec<f32>>) {
    let (b, h, nq, nk, dh, dv) = checked_dims(qv, kv, vv);
    let mut out = par_zeros(b * nq * h * dv);
    let mut probs = keep.then(|| par_zeros(b * h * nq * nk));
    let mut map_buf = maps.then(|| par_zeros(b * h * nq * dh * dv));
    let out_ptr = SendPtr(out.as_mut_ptr());
    let probs_ptr = probs.as_mut().map(|p| SendPtr(p.as_mut_ptr()));
    let maps_ptr = map_buf.as_mut().map(|m| SendPtr(m.as_mut_ptr()));
    let level = simd();
    let few = nq < FEW_ROWS;
    (0..b * h).into_par_iter().with_min_len(if few { h } else { 1 }).for_each_init(
        || (if keep { Vec::new() } else { vec![0f32; nq * nk] }, Scratch::default()),
        |(scratch, few_scratch), i| {
            let (bi, hi) = (i / h, i % h);
            let p: &mut [f32] = match probs_ptr {
                // SAFETY: head i owns probs[i·Nq·Nk .. (i+1)·Nq·Nk].
                Some(ptr) => unsafe { std::slice::from_raw_parts_mut(ptr.get().add(i * nq * nk), nq * nk) },
                None => scratch.as_mut_slice(),
            };
            // The output head (b, h) is Nq rows of Dv at row stride H·Dv, owned by this task.
            let out_head = out_ptr.get().wrapping_add(bi * nq * h * dv + hi * dv);
            // Head i's gradient maps: Nq blocks of Dh x Dv, owned by this task.
            let map_head = maps_ptr.map(|m| m.get().wrapping_add(i * nq * dh * dv));
            if few {
                let Scratch { a, b: kb, c: vb, out: o, w } = few_scratch;
                let (q, k, v) = (Rows::of(qv, bi, hi, a), Rows::of(kv, bi, hi, kb), Rows::of(vv, bi, hi, vb));
                few_scores(level, q, k, scale, p);
                softmax_rows(level, p, nk);
                o.resize(nq * dv, 0.0);
                few_combine(level, p, v, o);
                // SAFETY: as above; o is Nq x Dv.
                unsafe { put_rows(o, dv, out_head, h * dv) };
                if let Some(dst) = map_head {
                    // SAFETY: k's rows are `k.rs` apart with contiguous columns; o is Nq x Dv;
                    // dst is this head's block.
                    unsafe { head_maps(p, nk, dh, k.data.as_ptr(), k.rs as isize, 1, v, o.as_ptr(), dv, scale, w, dst) };
                }
                return;
            }
            let Scratch { b: kb, c: vb, w: wb, .. } = few_scratch;
            let (k, k_rs, k_cs) = kv.head_f32(bi, hi, kb);
            let (v, v_rs, v_cs) = vv.head_f32(bi, hi, vb);
            // SAFETY: the views (or their widened copies) address their heads; p is Nq x Nk
            // row-major.
            unsafe {
                mm(nq, nk, dh, p.as_mut_ptr(), 1, nk as isize, qv.head(bi, hi), qv.cs(), qv.rs(), k, k_rs, k_cs, scale);
            }
            softmax_rows(level, p, nk);
            unsafe {
                mm(nq, dv, nk, out_head, 1, (h * dv) as isize, p.as_ptr(), 1, nk as isize, v, v_cs, v_rs, 1.0);
            }
            if let Some(dst) = map_head {
                let mut v_buf = Vec::new();
                let v_rows = Rows::of(vv, bi, hi, &mut v_buf);
                // SAFETY: as above; the output head was just written, rows H·Dv apart.
                unsafe { head_maps(p, nk, dh, k, k_rs, k_cs, v_rows, out_head, h * dv, scale, wb, dst) };
            }
        },
    );
    let stored = FlexTensor::from_data(TensorData::new(out, [b, nq, h, dv]));
    (Flex::float_swap_dims(stored, 1, 2), probs, map_buf)
}

/// One head's gradient maps for constant keys and values: per query row i,
/// `M_i = scale · Kᵀ·(diag(p_i)·V − p_i·o_iᵀ)` (`Dh x Dv`, row-major, written to `dst`), with
/// `p_i` its probabilities and `o_i = Vᵀ·p_i` its output. The gradient of the query row is then
/// `dq_i = M_i · do_i` (`dS = P ⊙ (dO·Vᵀ − rowsum(dO·Vᵀ ⊙ P))·scale` and `dQ = dS·K` written as
/// one matrix), so the backward needs neither the keys nor the values. `w` is scratch.
///
/// # Safety
/// `k` with its row and column strides must address `Nk x Dh` elements, `o` `Nq` rows of `Dv`
/// at row stride `o_rs`, and `dst` `Nq·Dh·Dv` writable elements no one else touches meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn head_maps(p: &[f32], nk: usize, dh: usize, k: *const f32, k_rs: isize, k_cs: isize, v: Rows<'_>, o: *const f32, o_rs: usize, scale: f32, w: &mut Vec<f32>, dst: *mut f32) {
    let dv = v.cols;
    let nq = p.len().checked_div(nk).unwrap_or(0);
    w.resize(nk * dv, 0.0);
    for i in 0..nq {
        // SAFETY: row i of the output (the caller's contract).
        let oi = unsafe { std::slice::from_raw_parts(o.add(i * o_rs), dv) };
        for (j, wj) in w.chunks_exact_mut(dv.max(1)).enumerate() {
            let c = scale * p[i * nk + j];
            for (x, (&a, &b)) in wj.iter_mut().zip(v.row(j).iter().zip(oi)) {
                *x = c * (a - b);
            }
        }
        // M_i = Kᵀ · W: [Dh x Nk] x [Nk x Dv], Kᵀ read in place through K's strides.
        // SAFETY: the caller's contract; w is Nk x Dv row-major.
        unsafe { mm(dh, dv, nk, dst.add(i * dh * dv), 1, dv as isize, k, k_rs, k_cs, w.as_ptr(), 1, dv as isize, 1.0) };
    }
}

/// Query rows per head below which a head's products run as vector loops over rows (dot
/// products and row updates, [`few_scores`], [`few_combine`], [`few_transpose_combine`])
/// instead of `gemm` calls: with VQT's Q = 1 query per layer every per-head product is a
/// vector product, and a `gemm` call per head (packing included) costs more than its work.
const FEW_ROWS: usize = 16;

/// Per-task buffers of the few-row path: head copies where a view's columns are strided, and
/// results before they are written to their (interleaved) destinations.
#[derive(Default)]
struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    out: Vec<f32>,
    /// The gradient maps' weighted values ([`head_maps`]).
    w: Vec<f32>,
}

/// One head's `rows x cols` block with contiguous columns: row `r` is `data[r·rs .. r·rs + cols]`.
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a> {
    data: &'a [f32],
    rs: usize,
    rows: usize,
    cols: usize,
}

impl<'a> Rows<'a> {
    /// Head `(b, h)` of `view`, read in place when its columns are contiguous (and its strides
    /// non-negative), else copied into `buf`.
    fn of(view: &'a View, b: usize, h: usize, buf: &'a mut Vec<f32>) -> Self {
        let [_, _, rows, cols] = view.dims;
        let (rs, cs) = (view.rs(), view.cs());
        let off = view.head_offset(b, h);
        if rows == 0 || cols == 0 {
            return Rows { data: &[], rs: cols, rows, cols };
        }
        let contiguous = cs == 1 && rs >= 0 && off >= 0;
        match view.data {
            Data::F32(data) if contiguous => {
                let (off, rs) = (off as usize, rs as usize);
                return Rows { data: &data[off..off + (rows - 1) * rs + cols], rs, rows, cols };
            }
            Data::F32(data) => {
                buf.clear();
                for r in 0..rows as isize {
                    buf.extend((0..cols as isize).map(|c| data[(off + r * rs + c * cs) as usize]));
                }
            }
            Data::F16(data) => {
                // Widened with the CPU's conversion instructions, a whole head (or row) per call.
                let level = super::cpu::simd();
                buf.resize(rows * cols, 0.0);
                if contiguous && rs as usize == cols {
                    let off = off as usize;
                    super::cpu::widen_f16(level, &data[off..off + rows * cols], buf);
                } else if contiguous {
                    for (r, dst) in buf.chunks_exact_mut(cols).enumerate() {
                        let o = off as usize + r * rs as usize;
                        super::cpu::widen_f16(level, &data[o..o + cols], dst);
                    }
                } else {
                    for (r, dst) in buf.chunks_exact_mut(cols).enumerate() {
                        for (c, x) in dst.iter_mut().enumerate() {
                            *x = data[(off + r as isize * rs + c as isize * cs) as usize].to_f32();
                        }
                    }
                }
            }
        }
        Rows { data: buf, rs: cols, rows, cols }
    }

    /// Contiguous rows (`rows x cols` row-major in `data`).
    #[cfg(test)]
    pub(crate) fn dense(data: &'a [f32], cols: usize) -> Self {
        Rows { data, rs: cols, rows: data.len() / cols.max(1), cols }
    }

    #[inline(always)]
    fn row(&self, r: usize) -> &'a [f32] {
        &self.data[r * self.rs..r * self.rs + self.cols]
    }
}

/// `a · b` in 8 lanes summed in a fixed order: the same bits on every vector loop.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ar.iter().zip(br).enumerate() {
        acc[l] += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `out += w · x`.
#[inline(always)]
fn axpy(w: f32, x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o += w * v;
    }
}

dispatched! {
    /// `s[i, j] = scale · (a_i · b_j)` (`s`: `a.rows x b.rows`, row-major).
    few_scores(a: Rows<'_>, b: Rows<'_>, scale: f32, s: &mut [f32]) => {
        for (i, srow) in s.chunks_exact_mut(b.rows.max(1)).enumerate().take(a.rows) {
            let ai = a.row(i);
            for (j, x) in srow.iter_mut().enumerate() {
                *x = dot(ai, b.row(j)) * scale;
            }
        }
    }
}

dispatched! {
    /// `out_i = Σ_j w[i, j] · x_j` (`w`: `rows x x.rows`; `out`: `rows x x.cols`, overwritten).
    few_combine(w: &[f32], x: Rows<'_>, out: &mut [f32]) => {
        let n = x.rows;
        for (wrow, orow) in w.chunks_exact(n.max(1)).zip(out.chunks_exact_mut(x.cols.max(1))) {
            orow.fill(0.0);
            for (j, &c) in wrow.iter().enumerate() {
                axpy(c, x.row(j), orow);
            }
        }
    }
}

dispatched! {
    /// `out_j = Σ_i w[i, j] · x_i` (`w`: `x.rows x n`; `out`: `n x x.cols`, overwritten).
    few_transpose_combine(w: &[f32], n: usize, x: Rows<'_>, out: &mut [f32]) => {
        for (j, orow) in out.chunks_exact_mut(x.cols.max(1)).enumerate().take(n) {
            orow.fill(0.0);
            for i in 0..x.rows {
                axpy(w[i * n + j], x.row(i), orow);
            }
        }
    }
}

/// Writes `src` (rows of `cols`) to rows `dst_rs` apart from `dst`.
///
/// # Safety
/// `dst` must address `src.len() / cols` rows of `cols` writable elements at that stride, not
/// written by anyone else meanwhile.
unsafe fn put_rows(src: &[f32], cols: usize, dst: *mut f32, dst_rs: usize) {
    for (r, row) in src.chunks_exact(cols.max(1)).enumerate() {
        // SAFETY: forwarded from the caller.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst.add(r * dst_rs), cols) };
    }
}

/// The gradients `[dQ, dK, dV]` (those asked for) from the output gradient `grad`.
fn backward(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, probs: &[f32], grad: &FlexTensor, scale: f32, want: [bool; 3]) -> [Option<FlexTensor>; 3] {
    let (qv, kv, vv) = (View::of(q, "q"), View::of(k, "k"), View::of(v, "v"));
    let (b, h, nq, nk, dh, dv) = checked_dims(&qv, &kv, &vv);
    let [want_q, want_k, want_v] = want;
    let alloc = |on: bool, n: usize| if on { par_zeros(n) } else { Vec::new() };
    let (mut dq, mut dk, mut dvv) = (alloc(want_q, b * h * nq * dh), alloc(want_k, b * h * nk * dh), alloc(want_v, b * h * nk * dv));
    // Each gradient contiguous [B, H, rows, cols].
    let dest = |on: bool, buf: &mut Vec<f32>, rows: usize, cols: usize| on.then(|| Dest { ptr: SendPtr(buf.as_mut_ptr()), base: 0, sb: h * rows * cols, sh: rows * cols, rs: cols });
    let dests = [dest(want_q, &mut dq, nq, dh), dest(want_k, &mut dk, nk, dh), dest(want_v, &mut dvv, nk, dv)];
    backward_views(&qv, &kv, &vv, probs, &View::of(grad, "grad"), scale, dests);
    let wrap = |on: bool, data: Vec<f32>, n: usize, d: usize| on.then(|| FlexTensor::from_data(TensorData::new(data, [b, h, n, d])));
    [wrap(want_q, dq, nq, dh), wrap(want_k, dk, nk, dh), wrap(want_v, dvv, nk, dv)]
}

/// The gradient of a fused projection `[B, N, 3·H·Dh]` that [`forward_packed`] read: one
/// contiguous tensor whose three thirds are `dQ`, `dK`, `dV`, written by the head tasks in place
/// (the key and value thirds of rows `keys..` are not read, and their gradient is zero).
fn backward_packed(qkv: &FlexTensor, heads: usize, keys: usize, probs: &[f32], grad: &FlexTensor, scale: f32) -> FlexTensor {
    let n = qkv.layout().shape()[1];
    let [q, k, v] = [0, 1, 2].map(|part| View::packed(qkv, heads, part, if part == 0 { n } else { keys }));
    let [b, _, n, dh] = q.dims;
    let width = 3 * heads * dh;
    let mut out = par_zeros(b * n * width);
    let ptr = SendPtr(out.as_mut_ptr());
    let dests = [0, 1, 2].map(|part| Some(Dest { ptr, base: part * heads * dh, sb: n * width, sh: dh, rs: width }));
    backward_views(&q, &k, &v, probs, &View::of(grad, "grad"), scale, dests);
    FlexTensor::from_data(TensorData::new(out, [b, n, width]))
}

/// Where a gradient's heads go: head `(b, h)` starts at `base + b·sb + h·sh` of the buffer
/// behind `ptr`, its rows `rs` apart (columns contiguous).
#[derive(Clone, Copy)]
struct Dest {
    ptr: SendPtr,
    base: usize,
    sb: usize,
    sh: usize,
    rs: usize,
}

impl Dest {
    fn head(&self, b: usize, h: usize) -> *mut f32 {
        // SAFETY: the caller sized the buffer for every (b, h) head it names.
        unsafe { self.ptr.get().add(self.base + b * self.sb + h * self.sh) }
    }
}

/// The backward on views: each wanted gradient (`dests`: dQ, dK, dV) written head by head.
#[allow(clippy::too_many_arguments)]
fn backward_views(qv: &View, kv: &View, vv: &View, probs: &[f32], gv: &View, scale: f32, dests: [Option<Dest>; 3]) {
    let (b, h, nq, nk, dh, dv) = checked_dims(qv, kv, vv);
    assert_eq!(gv.dims, [b, h, nq, dv], "attention: output gradient shape");
    assert_eq!(probs.len(), b * h * nq * nk, "attention: kept probabilities");
    let [dq_dest, dk_dest, dv_dest] = dests;
    let (want_q, want_k) = (dq_dest.is_some(), dk_dest.is_some());
    let level = simd();
    let few = nq < FEW_ROWS;
    (0..b * h).into_par_iter().with_min_len(if few { h } else { 1 }).for_each_init(
        || (vec![0f32; nq * nk], Scratch::default(), Vec::new()),
        |(ds, scratch, g_buf), i| {
            let (bi, hi) = (i / h, i % h);
            let p = &probs[i * nq * nk..(i + 1) * nq * nk];
            if few {
                let Scratch { a, b: kb, c: vb, out, .. } = scratch;
                let g = Rows::of(gv, bi, hi, g_buf);
                // SAFETY (every put_rows): head i owns its Nq x Dh, Nk x Dh and Nk x Dv blocks
                // of the destinations (disjoint between heads, also inside one fused buffer).
                if let Some(d) = dv_dest {
                    // dV = Pᵀ · dO
                    out.resize(nk * dv, 0.0);
                    few_transpose_combine(level, p, nk, g, out);
                    unsafe { put_rows(out, dv, d.head(bi, hi), d.rs) };
                }
                if !(want_q || want_k) {
                    return;
                }
                // dP = dO · Vᵀ, then dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale
                few_scores(level, g, Rows::of(vv, bi, hi, vb), 1.0, ds);
                softmax_grad_rows(level, p, ds, nk, scale);
                if let Some(d) = dq_dest {
                    // dQ = dS · K
                    out.resize(nq * dh, 0.0);
                    few_combine(level, ds, Rows::of(kv, bi, hi, kb), out);
                    unsafe { put_rows(out, dh, d.head(bi, hi), d.rs) };
                }
                if let Some(d) = dk_dest {
                    // dK = dSᵀ · Q
                    out.resize(nk * dh, 0.0);
                    few_transpose_combine(level, ds, nk, Rows::of(qv, bi, hi, a), out);
                    unsafe { put_rows(out, dh, d.head(bi, hi), d.rs) };
                }
                return;
            }
            // SAFETY (all products): the views address their heads, p and ds are Nq x Nk
            // row-major, and head i owns its Nq x Dh, Nk x Dh and Nk x Dv blocks of the
            // destinations (disjoint between heads, also inside one fused buffer).
            if let Some(d) = dv_dest {
                // dV = Pᵀ · dO
                unsafe { mm(nk, dv, nq, d.head(bi, hi), 1, d.rs as isize, p.as_ptr(), nk as isize, 1, gv.head(bi, hi), gv.cs(), gv.rs(), 1.0) };
            }
            if !(want_q || want_k) {
                return;
            }
            let Scratch { b: kb, c: vb, .. } = scratch;
            let (v, v_rs, v_cs) = vv.head_f32(bi, hi, vb);
            // dP = dO · Vᵀ
            unsafe { mm(nq, nk, dv, ds.as_mut_ptr(), 1, nk as isize, gv.head(bi, hi), gv.cs(), gv.rs(), v, v_rs, v_cs, 1.0) };
            // dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale
            softmax_grad_rows(level, p, ds, nk, scale);
            if let Some(d) = dq_dest {
                // dQ = dS · K
                let (k, k_rs, k_cs) = kv.head_f32(bi, hi, kb);
                unsafe { mm(nq, dh, nk, d.head(bi, hi), 1, d.rs as isize, ds.as_ptr(), 1, nk as isize, k, k_cs, k_rs, 1.0) };
            }
            if let Some(d) = dk_dest {
                // dK = dSᵀ · Q
                unsafe { mm(nk, dh, nq, d.head(bi, hi), 1, d.rs as isize, ds.as_ptr(), nk as isize, 1, qv.head(bi, hi), qv.cs(), qv.rs(), 1.0) };
            }
        },
    );
}

dispatched! {
    /// Row-wise softmax in place over rows of `n`: `e^{x − max} / Σ` (the max and the sum in
    /// lanes, so the whole row vectorises).
    softmax_rows(p: &mut [f32], n: usize) => {
        for row in p.chunks_exact_mut(n) {
            let max = lane_max(row);
            for x in row.iter_mut() {
                *x = exp_neg(max - *x);
            }
            let inv = 1.0 / lane_sum(row, |x| x);
            for x in row.iter_mut() {
                *x *= inv;
            }
        }
    }
}

dispatched! {
    /// `ds ← p ⊙ (ds − rowsum(ds ⊙ p)) · scale`, row by row (rows of `n`).
    softmax_grad_rows(p: &[f32], ds: &mut [f32], n: usize, scale: f32) => {
        for (pr, dr) in p.chunks_exact(n).zip(ds.chunks_exact_mut(n)) {
            let dot = lane_sum2(pr, dr, |a, b| a * b);
            for (d, &pp) in dr.iter_mut().zip(pr) {
                *d = pp * (*d - dot) * scale;
            }
        }
    }
}

/// Attention through the extension (Flex devices, with or without autodiff): `[B, H, Nq, Dv]`.
pub(crate) fn attention_flex(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, scale: f32) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FastAttention>::fast_attention(q.into_dispatch(), k.into_dispatch(), v.into_dispatch(), scale))
}

/// Attention of `q: [B, H, Nq, Dh]` over the rows `rows` of `k, v: [N, H, Nk, ·]` through the
/// extension (read in place): `[B, H, Nq, Dv]`.
pub(crate) fn attention_rows_flex(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, rows: &[usize], scale: f32) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FastAttention>::fast_attention_rows(q.into_dispatch(), k.into_dispatch(), v.into_dispatch(), rows.to_vec(), scale))
}

/// Self-attention of a fused projection `[B, N, 3·H·Dh]` through the extension, its first `keys`
/// rows the keys and values: `[B, H, N, Dh]`.
pub(crate) fn attention_packed_flex(qkv: Tensor<3>, heads: usize, keys: usize, scale: f32) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FastAttention>::fast_attention_packed(qkv.into_dispatch(), heads, keys, scale))
}

#[cfg(test)]
mod tests {
    use crate::vit::{split_heads, Attention};
    use burn::backend::GradientCheckpointingStrategy;
    use burn::tensor::{Device, Distribution, Tensor, TensorData};

    type Grads = [Option<Vec<f32>>; 3];

    /// Attention of q, k, v given with three different layouts, its value and the gradients of a weighted sum
    /// with respect to the tracked inputs (`track`: q, k, v).
    fn run(device: &Device, data: &[TensorData; 4], track: [bool; 3], strategy: Option<GradientCheckpointingStrategy>) -> (Vec<f32>, Grads) {
        let input = |i: usize| {
            let mut t = Tensor::<3>::from_data(data[i].clone(), device);
            if let Some(s) = strategy {
                t = t.with_gradient_checkpointing_strategy(s);
            }
            if track[i] {
                t = t.require_grad();
            }
            t
        };
        let (q3, k3, v3) = (input(0), input(1), input(2));
        // q: heads of [B, N, D] (strided view); k: contiguous heads; v: inner stride 9 (a
        // transposed view), as a cached or tuned path may hand them over.
        let q = split_heads(q3.clone(), 3);
        let k = k3.clone().reshape([2, 3, 9, 8]);
        let v = v3.clone().reshape([2, 3, 8, 9]).swap_dims(2, 3);
        let o = Attention::attend(q, k, v);
        let mut w = Tensor::<3>::from_data(data[3].clone(), device);
        if let Some(s) = strategy {
            w = w.with_gradient_checkpointing_strategy(s);
        }
        let out: Vec<f32> = o.clone().into_data().try_to_vec().unwrap();
        if !device.is_autodiff() {
            return (out, [None, None, None]);
        }
        let grads = (o * w).sum().backward();
        let g = |t: &Tensor<3>, on: bool| on.then(|| t.grad(&grads).expect("tracked input has a gradient").into_data().try_to_vec::<f32>().unwrap());
        (out, [g(&q3, track[0]), g(&k3, track[1]), g(&v3, track[2])])
    }

    /// B = 2, `nq` query rows, Nk = 9, H = 3, Dh = 8.
    fn data_nq(nq: usize) -> [TensorData; 4] {
        let d = Device::flex();
        let r = |dims: [usize; 3], s: f32| Tensor::<3>::random(dims, Distribution::Normal(0.0, s as f64), &d).into_data();
        [r([2, nq, 24], 1.5), r([2, 9, 24], 1.5), r([2, 9, 24], 1.0), r([2, nq, 24], 1.0)]
    }

    /// Nq = 17: the per-head `gemm` path (16 query rows and more).
    fn data() -> [TensorData; 4] {
        data_nq(17)
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 2e-5 * y.abs().max(1.0), "{what}: {x} vs {y}");
        }
    }

    #[test]
    #[allow(deprecated)] // Device::ndarray: the composed reference path
    fn flex_attention_matches_the_composed_ops_in_value_and_gradient() {
        let data = data();
        // ndarray composes attention from matmul and softmax (Burn's autodiff differentiates it).
        let all = [true, true, true];
        let (v_ref, g_ref) = run(&Device::ndarray().autodiff(), &data, all, None);
        for strategy in [None, Some(GradientCheckpointingStrategy::Balanced)] {
            let (v, g) = run(&Device::flex().autodiff(), &data, all, strategy);
            close(&v, &v_ref, "value");
            for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
                close(g[i].as_ref().unwrap(), g_ref[i].as_ref().unwrap(), &format!("{name} ({strategy:?})"));
            }
        }
        // Only the queries tracked (VQT reading frozen keys and values): dq alone, same values.
        let (_, g) = run(&Device::flex().autodiff(), &data, [true, false, false], None);
        close(g[0].as_ref().unwrap(), g_ref[0].as_ref().unwrap(), "dq alone");
        let (_, g) = run(&Device::flex().autodiff(), &data, [false, true, false], None);
        close(g[1].as_ref().unwrap(), g_ref[1].as_ref().unwrap(), "dk alone");
        // Without autodiff: against Burn's fused attention on ndarray.
        let (v_plain, _) = run(&Device::flex(), &data, [false; 3], None);
        let (v_nd, _) = run(&Device::ndarray(), &data, [false; 3], None);
        close(&v_plain, &v_nd, "value without autodiff");
        close(&v_plain, &v_ref, "value without autodiff vs with");
        // The route: the extension for any number of query rows on Flex in f32.
        let t = |nq: usize| Tensor::<4>::random([1, 2, nq, 4], Distribution::Default, &Device::flex());
        assert!(crate::ops::flex_attention(t(16), t(9), t(9)).is_ok());
        assert!(crate::ops::flex_attention(t(1), t(9), t(9)).is_ok());
    }

    /// The few-row path (fewer than 16 query rows per head: VQT's queries), on strided and
    /// transposed views, against Burn's composed ops: value and every gradient, alone and together.
    #[test]
    #[allow(deprecated)] // Device::ndarray: the composed reference path
    fn few_query_rows_match_the_composed_ops_in_value_and_gradient() {
        for nq in [1, 3, 15] {
            let data = data_nq(nq);
            let all = [true, true, true];
            let (v_ref, g_ref) = run(&Device::ndarray().autodiff(), &data, all, None);
            let (v, g) = run(&Device::flex().autodiff(), &data, all, None);
            close(&v, &v_ref, &format!("value, nq {nq}"));
            for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
                close(g[i].as_ref().unwrap(), g_ref[i].as_ref().unwrap(), &format!("{name}, nq {nq}"));
            }
            for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
                let mut track = [false; 3];
                track[i] = true;
                let (_, g) = run(&Device::flex().autodiff(), &data, track, None);
                close(g[i].as_ref().unwrap(), g_ref[i].as_ref().unwrap(), &format!("{name} alone, nq {nq}"));
            }
            let (v_plain, _) = run(&Device::flex(), &data, [false; 3], None);
            close(&v_plain, &v_ref, &format!("value without autodiff, nq {nq}"));
            // Same bits on a second run.
            assert_eq!(run(&Device::flex().autodiff(), &data, all, None), (v, g));
        }
    }

    /// Constant keys and values (only q tracked) with more key rows than a head's maps take:
    /// the backward runs from the gradient maps alone, on the few-row and the `gemm` paths,
    /// and gives Burn's composed gradient of q.
    #[test]
    #[allow(deprecated)] // Device::ndarray: the composed reference path
    fn constant_keys_and_values_differentiate_through_gradient_maps() {
        let d = Device::flex();
        for (nq, nk) in [(1, 9), (2, 9), (1, 70), (17, 150)] {
            let r = |dims: [usize; 3], s: f64| Tensor::<3>::random(dims, Distribution::Normal(0.0, s), &d).into_data();
            let (qd, kd, vd, wd) = (r([2, nq, 24], 1.5), r([2, nk, 24], 1.5), r([2, nk, 24], 1.0), r([2, nq, 24], 1.0));
            let run = |device: &Device| {
                let t = |data: &TensorData| Tensor::<3>::from_data(data.clone(), device);
                let q3 = t(&qd).require_grad();
                // q strided heads, k contiguous heads, v a transposed view.
                let k = t(&kd).reshape([2, 3, nk, 8]);
                let v = t(&vd).reshape([2, 3, 8, nk]).swap_dims(2, 3);
                let o = Attention::attend(split_heads(q3.clone(), 3), k, v);
                let grads = (o.clone() * t(&wd)).sum().backward();
                let g: Vec<f32> = q3.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
                (o.into_data().try_to_vec::<f32>().unwrap(), g)
            };
            let (v_ref, g_ref) = run(&Device::ndarray().autodiff());
            let (v, g) = run(&Device::flex().autodiff());
            close(&v, &v_ref, &format!("value, nq {nq}, nk {nk}"));
            close(&g, &g_ref, &format!("dq from the maps, nq {nq}, nk {nk}"));
            // The maps route applies to these shapes (Nq·Dh·Dv < Nk·(Dh + Dv)).
            let f = |dims: [usize; 4]| super::FlexTensor::from_data(TensorData::zeros::<f32, _>(dims));
            assert!(super::maps_are_smaller(&f([2, 3, nq, 8]), &f([2, 3, nk, 8]), &f([2, 3, nk, 8])), "nq {nq}, nk {nk}");
        }
        let f = |dims: [usize; 4]| super::FlexTensor::from_data(TensorData::zeros::<f32, _>(dims));
        assert!(!super::maps_are_smaller(&f([2, 3, 3, 8]), &f([2, 3, 9, 8]), &f([2, 3, 9, 8])));
    }

    /// Attention over rows of larger keys and values read in place (the feature cache's whole
    /// layer) equals attention over the gathered rows, in value and in the gradient of q.
    #[test]
    #[allow(deprecated)] // Device::ndarray: the composed reference path
    fn attention_over_cached_rows_matches_the_gathered_rows() {
        use burn::tensor::Int;
        let rows = [4usize, 1, 4];
        let d = Device::flex();
        for nq in [1, 17] {
            let r = |dims: [usize; 4]| Tensor::<4>::random(dims, Distribution::Normal(0.0, 1.5), &d).into_data();
            let (qd, kd, vd, wd) = (r([3, 2, nq, 8]), r([5, 2, 9, 8]), r([5, 2, 9, 8]), r([3, nq, 2, 8]));
            let run = |device: &Device, in_place: bool| {
                let q = Tensor::<4>::from_data(qd.clone(), device).require_grad();
                let (k, v) = (Tensor::<4>::from_data(kd.clone(), device), Tensor::<4>::from_data(vd.clone(), device));
                let o = if in_place {
                    crate::vit::merge_heads(crate::ops::flex_attention_rows(q.clone(), k, v, &rows).map_err(|_| "applies on Flex").unwrap())
                } else {
                    let idx = Tensor::<1, Int>::from_data(TensorData::new(rows.iter().map(|&r| r as i64).collect::<Vec<_>>(), [3]), device);
                    Attention::attend(q.clone(), k.select(0, idx.clone()), v.select(0, idx))
                };
                let w = Tensor::<4>::from_data(wd.clone(), device).reshape([3, nq, 16]);
                let grads = (o.clone() * w).sum().backward();
                let dq: Vec<f32> = q.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
                (o.into_data().try_to_vec::<f32>().unwrap(), dq)
            };
            let (v_ref, g_ref) = run(&Device::ndarray().autodiff(), false);
            let (v, g) = run(&d.clone().autodiff(), true);
            close(&v, &v_ref, &format!("value, nq {nq}"));
            close(&g, &g_ref, &format!("dq, nq {nq}"));
            // Without autodiff, and through Attention::attend_rows.
            let q = Tensor::<4>::from_data(qd.clone(), &d);
            let (k, v4) = (Tensor::<4>::from_data(kd.clone(), &d), Tensor::<4>::from_data(vd.clone(), &d));
            let plain: Vec<f32> = Attention::attend_rows(q, k, v4, Some(&rows)).into_data().try_to_vec().unwrap();
            close(&plain, &v_ref, &format!("value without autodiff, nq {nq}"));
        }
    }

    /// f16 keys and values (an f16 feature cache) read in place give the same attention as their
    /// values widened to f32, value and gradient of q: the same bits on the few-row loops (nq 1),
    /// to rounding on the products (nq 17); contiguous keys and column-strided values.
    #[test]
    fn attention_over_f16_rows_equals_attention_over_their_widened_values() {
        use burn::tensor::{DType, FloatDType};
        let rows = [4usize, 1, 4];
        let d = Device::flex();
        for nq in [1, 17] {
            let r = |dims: [usize; 4]| Tensor::<4>::random(dims, Distribution::Normal(0.0, 1.5), &d).into_data();
            let (qd, kd, vd, wd) = (r([3, 2, nq, 8]), r([5, 2, 9, 8]), r([5, 2, 8, 9]), r([3, nq, 2, 8]));
            let (k16, v16) = (Tensor::<4>::from_data(kd.clone(), (&d, DType::F16)), Tensor::<4>::from_data(vd.clone(), (&d, DType::F16)));
            assert_eq!((k16.dtype(), v16.dtype()), (DType::F16, DType::F16));
            let run = |widen: bool| {
                let device = d.clone().autodiff();
                let q = Tensor::<4>::from_data(qd.clone(), &device).require_grad();
                let (mut k, mut v) = (k16.clone(), v16.clone());
                if widen {
                    (k, v) = (k.cast(FloatDType::F32), v.cast(FloatDType::F32));
                }
                // Onto the autodiff device without a copy of their values' precision.
                let (k, v) = (Tensor::<4>::from_data(k.into_data(), (&device, if widen { DType::F32 } else { DType::F16 })), Tensor::<4>::from_data(v.into_data(), (&device, if widen { DType::F32 } else { DType::F16 })));
                let o = crate::vit::merge_heads(crate::ops::flex_attention_rows(q.clone(), k, v.swap_dims(2, 3), &rows).map_err(|_| "applies on Flex").unwrap());
                let w = Tensor::<4>::from_data(wd.clone(), &device).reshape([3, nq, 16]);
                let grads = (o.clone() * w).sum().backward();
                let dq: Vec<f32> = q.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
                (o.into_data().try_to_vec::<f32>().unwrap(), dq)
            };
            let ((v32, g32), (v16, g16)) = (run(true), run(false));
            if nq < super::FEW_ROWS {
                // The few-row loops read the same values in the same order.
                assert!(v32 == v16 && g32 == g16, "nq {nq}: not the same bits");
            } else {
                // gemm may sum a product's terms in another order for another layout.
                close(&v16, &v32, &format!("value, nq {nq}"));
                close(&g16, &g32, &format!("dq, nq {nq}"));
            }
        }
    }

    #[test]
    fn the_few_row_loops_give_the_same_bits_on_every_vector_loop() {
        use super::{few_combine, few_scores, few_transpose_combine, Rows};
        use crate::ops::cpu::Simd;
        let x: Vec<f32> = (0..3 * 70).map(|i| (((i * 37) % 101) as f32 - 50.0) * 0.013).collect();
        let y: Vec<f32> = (0..5 * 70).map(|i| (((i * 53) % 97) as f32 - 48.0) * 0.021).collect();
        let (a, b) = (Rows::dense(&x, 70), Rows::dense(&y, 70));
        let outs = |level: Simd| {
            let mut s = vec![0f32; 15];
            few_scores(level, a, b, 0.125, &mut s);
            let mut c = vec![0f32; 3 * 70];
            few_combine(level, &s, b, &mut c);
            let mut t = vec![0f32; 5 * 70];
            few_transpose_combine(level, &s, 5, a, &mut t);
            (s, c, t)
        };
        let base = outs(Simd::Baseline);
        // Against a plain f64 reference.
        for i in 0..3 {
            for j in 0..5 {
                let r: f64 = (0..70).map(|k| x[i * 70 + k] as f64 * y[j * 70 + k] as f64).sum::<f64>() * 0.125;
                assert!((base.0[i * 5 + j] as f64 - r).abs() < 1e-5, "score ({i}, {j})");
            }
        }
        for level in [Simd::Avx2, Simd::Avx512] {
            if super::super::cpu::has(level) {
                assert_eq!(outs(level), base, "{level:?} differs from the baseline loop");
            }
        }
    }

    /// Self-attention of a fused projection read in place, against the three parts split apart
    /// (ndarray: Burn's composed ops): value, and the gradient of the fused tensor. Every row is a
    /// query; the first `keys` rows are the keys and values.
    fn run_packed(device: &Device, qkv: &TensorData, w: &TensorData, strategy: Option<GradientCheckpointingStrategy>, packed: bool, keys: usize) -> (Vec<f32>, Option<Vec<f32>>) {
        let (heads, d) = (3, 24);
        let mut wide = Tensor::<3>::from_data(qkv.clone(), device);
        if let Some(s) = strategy {
            wide = wide.with_gradient_checkpointing_strategy(s);
        }
        let wide = if device.is_autodiff() { wide.require_grad() } else { wide };
        // A strided fused output: rows 80 apart (a narrowed wider tensor), 72 columns used.
        let qkv = wide.clone().narrow(2, 5, 3 * d);
        let o = if packed {
            let (o, _) = crate::ops::flex_attention_packed(qkv, heads, keys).map_err(|_| "the packed route applies").unwrap();
            crate::vit::merge_heads(o)
        } else {
            let part = |i: usize, rows: usize| split_heads(qkv.clone().narrow(2, i * d, d).narrow(1, 0, rows), heads);
            let n = qkv.dims()[1];
            Attention::attend(part(0, n), part(1, keys), part(2, keys))
        };
        let out: Vec<f32> = o.clone().into_data().try_to_vec().unwrap();
        if !device.is_autodiff() {
            return (out, None);
        }
        let mut w = Tensor::<3>::from_data(w.clone(), device);
        if let Some(s) = strategy {
            w = w.with_gradient_checkpointing_strategy(s);
        }
        let grads = (o * w).sum().backward();
        (out, Some(wide.grad(&grads).expect("tracked").into_data().try_to_vec::<f32>().unwrap()))
    }

    #[test]
    #[allow(deprecated)] // Device::ndarray: the composed reference path
    fn packed_attention_matches_the_split_parts_in_value_and_gradient() {
        let d = Device::flex();
        let qkv = Tensor::<3>::random([2, 17, 80], Distribution::Normal(0.0, 1.5), &d).into_data();
        let w = Tensor::<3>::random([2, 17, 24], Distribution::Normal(0.0, 1.0), &d).into_data();
        // All 17 rows keys (self-attention), then 15 keys with two query rows riding along.
        for keys in [17, 15] {
            let (v_ref, g_ref) = run_packed(&Device::ndarray().autodiff(), &qkv, &w, None, false, keys);
            let g_ref = g_ref.unwrap();
            // Columns 0..5 and 77..80 of the wide tensor are not read: their gradient is zero;
            // so is that of the key and value columns (29..77) of rows after the keys.
            for (i, g) in g_ref.iter().enumerate() {
                let (row, col) = ((i / 80) % 17, i % 80);
                if col < 5 || col >= 77 || (row >= keys && col >= 29) {
                    assert_eq!(*g, 0.0, "keys {keys}, row {row}, column {col}");
                }
            }
            for strategy in [None, Some(GradientCheckpointingStrategy::Balanced)] {
                let (v, g) = run_packed(&Device::flex().autodiff(), &qkv, &w, strategy, true, keys);
                close(&v, &v_ref, &format!("packed value ({keys} keys)"));
                close(&g.unwrap(), &g_ref, &format!("packed gradient ({keys} keys, {strategy:?})"));
            }
            let (v_plain, _) = run_packed(&Device::flex(), &qkv, &w, None, true, keys);
            close(&v_plain, &v_ref, &format!("packed value without autodiff ({keys} keys)"));
            // Same bits on a second run (each head owns its task and its blocks of the gradient).
            let a = run_packed(&Device::flex().autodiff(), &qkv, &w, None, true, keys);
            let b = run_packed(&Device::flex().autodiff(), &qkv, &w, None, true, keys);
            assert_eq!(a, b);
        }
        // A row riding along changes nothing for the keys' rows: the first 16 rows of the
        // output are those of self-attention over those 16 rows alone (to rounding: the
        // products' blocking depends on the number of rows).
        let short = Tensor::<3>::from_data(qkv.clone(), &d).narrow(1, 0, 16).into_data();
        let (alone, _) = run_packed(&d, &short, &w, None, true, 16);
        let (riding, _) = run_packed(&d, &qkv, &w, None, true, 16);
        for img in 0..2 {
            close(&riding[img * 17 * 24..img * 17 * 24 + 16 * 24], &alone[img * 16 * 24..(img + 1) * 16 * 24], &format!("image {img}"));
        }
        // The route: 16 tokens and more, a width of 3 x heads; otherwise the tensor comes back.
        let t = |n: usize, width: usize| Tensor::<3>::random([1, n, width], Distribution::Default, &Device::flex());
        assert!(crate::ops::flex_attention_packed(t(16, 24), 2, 16).is_ok());
        assert!(crate::ops::flex_attention_packed(t(16, 24), 2, 3).is_ok());
        assert!(crate::ops::flex_attention_packed(t(15, 24), 2, 15).is_err());
        assert!(crate::ops::flex_attention_packed(t(16, 25), 2, 16).is_err());
        assert!(crate::ops::flex_attention_packed(Tensor::<3>::random([1, 16, 24], Distribution::Default, &Device::ndarray()), 2, 16).is_err());
    }

    #[test]
    fn flex_attention_is_deterministic_and_its_vector_loops_agree() {
        use super::{softmax_grad_rows, softmax_rows};
        use crate::ops::cpu::Simd;
        // Rows of 65 (a tail after four lanes of 16), with a large spread of scores.
        let scores: Vec<f32> = (0..65 * 5).map(|i| ((i * 37) % 101) as f32 * -0.37 + (i % 7) as f32).collect();
        let grads: Vec<f32> = (0..65 * 5).map(|i| ((i * 53) % 89) as f32 * 0.01 - 0.4).collect();
        let rows = |level: Simd| {
            let (mut p, mut ds) = (scores.clone(), grads.clone());
            softmax_rows(level, &mut p, 65);
            softmax_grad_rows(level, &p, &mut ds, 65, 0.125);
            (p, ds)
        };
        let base = rows(Simd::Baseline);
        for row in base.0.chunks(65) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        for level in [Simd::Avx2, Simd::Avx512] {
            if super::super::cpu::has(level) {
                assert_eq!(rows(level), base, "{level:?} differs from the baseline loop");
            }
        }
        let data = data();
        let a = run(&Device::flex().autodiff(), &data, [true; 3], None);
        let b = run(&Device::flex().autodiff(), &data, [true; 3], None);
        assert_eq!(a.0, b.0);
        assert_eq!(a.1, b.1);
    }
}
