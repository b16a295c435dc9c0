//! What the Flex (`cpu`) kernels of [`super`] share: the vector loop the CPU runs ([`Simd`],
//! chosen once at run time), a pointer rayon tasks may write through, and the dtype and layout
//! checks every kernel makes before it reads a tensor's values as one f32 slice.

use std::mem::MaybeUninit;

use burn::backend::flex::FlexTensor;
use burn::backend::TensorMetadata;
use burn::tensor::DType;
use rayon::prelude::*;

/// Which vector loop this CPU runs (detected once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    /// AVX-512F (16 lanes).
    Avx512,
    /// AVX2 with FMA (8 lanes).
    Avx2,
    /// The baseline build (SSE2 on x86-64, or another architecture's default).
    Baseline,
}

/// The vector loop the kernels (GELU, the attention's exponentials) use on this CPU;
/// `VQT_SIMD=baseline` (or `avx2`) forces a narrower one, for checking that a build runs
/// without AVX-512.
pub fn simd() -> Simd {
    static SIMD: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *SIMD.get_or_init(|| {
        let forced = std::env::var("VQT_SIMD").ok();
        detect(forced.as_deref())
    })
}

/// Whether this CPU has the instructions of `level`.
pub(crate) fn has(level: Simd) -> bool {
    match level {
        Simd::Baseline => true,
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
        #[cfg(not(target_arch = "x86_64"))]
        _ => false,
    }
}

/// The widest level the CPU has, at most `forced` (`baseline`, `avx2`, `avx512`) when given.
fn detect(forced: Option<&str>) -> Simd {
    let cap = match forced {
        Some("baseline") => 0,
        Some("avx2") => 1,
        _ => 2,
    };
    [(2, Simd::Avx512), (1, Simd::Avx2)].into_iter().find(|&(rank, level)| rank <= cap && has(level)).map_or(Simd::Baseline, |(_, level)| level)
}

/// `dst[i] = src[i]` widened from f16 to f32 (exact: every f16 is an f32): 16 values per
/// instruction with AVX-512F (`vcvtph2ps`), 8 with F16C, else `half`'s conversion. The loop is
/// inlined here, once per call (a head of cached keys or values), where `half`'s slice
/// conversion makes a call per 8 values.
pub(crate) fn widen_f16(level: Simd, src: &[half::f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen_f16: lengths");
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, __m256i, _mm256_cvtph_ps, _mm256_loadu_si256, _mm256_storeu_ps, _mm512_cvtph_ps, _mm512_storeu_ps, _mm_loadu_si128};
        #[target_feature(enable = "avx512f")]
        fn avx512(src: &[half::f16], dst: &mut [f32]) {
            let n = src.len() / 16 * 16;
            for i in (0..n).step_by(16) {
                // SAFETY: i + 16 <= n <= the length of both slices; unaligned loads and stores.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(_mm256_loadu_si256(src.as_ptr().add(i).cast::<__m256i>()))) };
            }
            for (d, s) in dst[n..].iter_mut().zip(&src[n..]) {
                *d = s.to_f32();
            }
        }
        #[target_feature(enable = "avx,f16c")]
        fn f16c(src: &[half::f16], dst: &mut [f32]) {
            let n = src.len() / 8 * 8;
            for i in (0..n).step_by(8) {
                // SAFETY: i + 8 <= n <= the length of both slices; unaligned loads and stores.
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().add(i).cast::<__m128i>()))) };
            }
            for (d, s) in dst[n..].iter_mut().zip(&src[n..]) {
                *d = s.to_f32();
            }
        }
        match level {
            // SAFETY: the CPU has the feature (checked here).
            Simd::Avx512 if has(Simd::Avx512) => return unsafe { avx512(src, dst) },
            Simd::Avx512 | Simd::Avx2 if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") => return unsafe { f16c(src, dst) },
            _ => {}
        }
    }
    use half::slice::HalfFloatSliceExt;
    let _ = level;
    src.convert_to_f32_slice(dst);
}

/// Lanes of the kernels' row sums (LayerNorm, softmax): 16 partial sums (one AVX-512 register,
/// two AVX2 ones) added at the end, so the reductions vectorise inside a `dispatched!` loop; the
/// order of the additions is fixed, so the result does not depend on the CPU's level.
pub(crate) const LANES: usize = 16;

/// `Σ f(v)` over `v` in [`LANES`] partial sums, then the tail.
#[inline(always)]
pub(crate) fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x);
        }
    }
    let mut s = 0f32;
    for &x in tail {
        s += f(x);
    }
    acc.iter().sum::<f32>() + s
}

/// `Σ f(a, b)` over `a`, `b` in [`LANES`] partial sums, then the tail.
#[inline(always)]
pub(crate) fn lane_sum2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s += f(x, y);
        }
    }
    let mut s = 0f32;
    for (&x, &y) in ta.iter().zip(tb) {
        s += f(x, y);
    }
    acc.iter().sum::<f32>() + s
}

/// `Σ f(a, b, c)` over `a`, `b`, `c` in [`LANES`] partial sums, then the tail.
#[inline(always)]
pub(crate) fn lane_sum3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb, cc) = (a.chunks_exact(LANES), b.chunks_exact(LANES), c.chunks_exact(LANES));
    let (ta, tb, tc) = (ca.remainder(), cb.remainder(), cc.remainder());
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for (((s, &x), &y), &z) in acc.iter_mut().zip(x).zip(y).zip(z) {
            *s += f(x, y, z);
        }
    }
    let mut s = 0f32;
    for ((&x, &y), &z) in ta.iter().zip(tb).zip(tc) {
        s += f(x, y, z);
    }
    acc.iter().sum::<f32>() + s
}

/// The largest of `v` (`−∞` when empty; NaNs skipped) in [`LANES`] partial maxima.
#[inline(always)]
pub(crate) fn lane_max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    acc.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// A raw pointer that may cross into a rayon task. Each use must have every task write its
/// own disjoint part of a buffer that outlives the parallel loop.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: the tasks write disjoint regions and the buffer outlives the parallel loop (the
// contract of every use, above).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `SendPtr`, not its field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// A new buffer of `n` values, block by block in parallel: each block of `chunk` values (the
/// last may be shorter) is zeroed by the task that then hands it to `fill` with the matching item
/// of `with` (one item per block: checked).
///
/// This replaces `vec![0f32; n]` followed by a parallel loop over its chunks. There the zeroing is
/// one serial memset on the calling thread (glibc's calloc clears a reused block), which the other
/// threads wait for and which runs through the whole buffer before the loop reads it again;
/// measured, those memsets were a tenth of a tuned method's step on two threads (`bench.md`).
/// Here a block is cleared just before it is filled, by the same core, while it is in its cache.
pub(crate) fn par_new<I>(n: usize, chunk: usize, with: I, fill: impl Fn(&mut [f32], I::Item) + Sync + Send) -> Vec<f32>
where
    I: IndexedParallelIterator,
{
    let chunk = chunk.max(1);
    assert_eq!(with.len(), n.div_ceil(chunk), "par_new: one item per block of the output");
    let mut out: Vec<f32> = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n].par_chunks_mut(chunk).zip(with).for_each(|(block, item)| {
        block.fill(MaybeUninit::new(0.0));
        // SAFETY: every value of `block` was initialised just above, and `MaybeUninit<f32>` has
        // the layout of `f32`.
        let block = unsafe { &mut *(block as *mut [MaybeUninit<f32>] as *mut [f32]) };
        fill(block, item);
    });
    // SAFETY: the zip visited all `n.div_ceil(chunk)` blocks (as many items as blocks, asserted),
    // which cover the first `n` values, and each block was initialised.
    unsafe { out.set_len(n) };
    out
}

/// `n` zeros, cleared in parallel blocks (see [`par_new`]), for kernels that then write every
/// value through raw pointers in a layout of their own (attention's heads).
pub(crate) fn par_zeros(n: usize) -> Vec<f32> {
    const BLOCK: usize = 1 << 14;
    par_new(n, BLOCK, rayon::iter::repeat_n((), n.div_ceil(BLOCK)), |_, ()| {})
}

/// Whether every tensor holds f32 (the kernels' only dtype; others take Burn's own ops).
pub(crate) fn all_f32<'a>(ts: impl IntoIterator<Item = &'a FlexTensor>) -> bool {
    ts.into_iter().all(|t| t.dtype() == DType::F32)
}

/// Whether `t` may be written in place: the only owner of a buffer it fills densely from the
/// start (not a view, not shared).
pub(crate) fn writable(t: &FlexTensor) -> bool {
    t.is_unique() && t.layout().contiguous_offsets() == Some((0, t.shape().num_elements()))
}

/// `t`'s values, writable in place, when [`writable`] (else `None`: a view, a shared buffer).
pub(crate) fn owned_values(t: &mut FlexTensor) -> Option<&mut [f32]> {
    if !writable(t) {
        return None;
    }
    let n = t.shape().num_elements();
    t.try_storage_mut::<f32>().map(|v| &mut v[..n])
}

/// `t` with contiguous values (a copy only when it is a strided view).
pub(crate) fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.layout().contiguous_offsets().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// `t`'s values as one contiguous slice (a copy only for a strided view).
pub(crate) fn dense(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(t.to_contiguous().as_slice::<f32>().expect("contiguous f32").to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn par_new_fills_every_block_with_its_own_item_and_clears_it_first() {
        // 10 values in blocks of 4: the blocks 0..4, 4..8, 8..10, each given its own index and
        // seen zeroed (a block that `fill` skipped would stay 0, one filled twice would differ).
        let out = par_new(10, 4, (0..3usize).into_par_iter(), |block, i| {
            assert!(block.iter().all(|&v| v == 0.0), "block {i} not cleared");
            assert_eq!(block.len(), if i == 2 { 2 } else { 4 });
            for (j, v) in block.iter_mut().enumerate() {
                *v = (i * 4 + j) as f32 + 1.0;
            }
        });
        assert_eq!(out, (1..=10).map(|v| v as f32).collect::<Vec<_>>());
        assert!(par_zeros(40_000).iter().all(|&v| v == 0.0) && par_zeros(0).is_empty());
    }

    #[test]
    #[should_panic(expected = "one item per block")]
    fn par_new_refuses_fewer_items_than_blocks() {
        // Two items for three blocks would leave the last block unwritten.
        let _ = par_new(10, 4, (0..2usize).into_par_iter(), |_, _| {});
    }

    #[test]
    fn a_forced_loop_is_honoured_and_baseline_is_always_available() {
        assert_eq!(detect(Some("baseline")), Simd::Baseline);
        assert!(has(detect(None)) && has(detect(Some("avx2"))));
        if has(Simd::Avx512) {
            assert_eq!(detect(None), Simd::Avx512);
        }
        if has(Simd::Avx2) {
            assert_eq!(detect(Some("avx2")), Simd::Avx2);
        }
    }

    /// Every f16 bit pattern widens to the f32 `half` gives (NaNs stay NaN), on every level the
    /// CPU has, with a tail shorter than a vector (65536 + 7 values, and a 5-value slice).
    #[test]
    fn widen_f16_is_exact_on_every_level() {
        let src: Vec<half::f16> = (0..65536u32 + 7).map(|i| half::f16::from_bits((i % 65536) as u16)).collect();
        for level in [Simd::Avx512, Simd::Avx2, Simd::Baseline].into_iter().filter(|&l| has(l)) {
            for len in [src.len(), 5] {
                let mut dst = vec![0f32; len];
                widen_f16(level, &src[..len], &mut dst);
                for (h, w) in src[..len].iter().zip(&dst) {
                    let want = h.to_f32();
                    assert!(if want.is_nan() { w.is_nan() } else { w.to_bits() == want.to_bits() }, "{level:?}: {h:?} widened to {w}, not {want}");
                }
            }
        }
    }
}
