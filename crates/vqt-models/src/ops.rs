//! Small numeric building blocks shared by every module.

use burn::tensor::Tensor;

/// Defines `$name(simd, args..)`: the `#[inline(always)]` loop `$body` compiled three times
/// (AVX-512F, AVX2+FMA, baseline), the copy run chosen by `simd`.
macro_rules! dispatched {
    ($(#[$doc:meta])* $name:ident($($a:ident: $t:ty),*) => $body:block) => {
        $(#[$doc])*
        pub(crate) fn $name(simd: $crate::ops::cpu::Simd, $($a: $t),*) {
            #[inline(always)]
            fn body($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($a: $t),*) {
                    body($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($a: $t),*) {
                    body($($a),*)
                }
                match simd {
                    // SAFETY: `simd` comes from `detect`, which checked the CPU for the feature
                    // (a caller passing a level the CPU lacks is refused below).
                    $crate::ops::cpu::Simd::Avx512 if $crate::ops::cpu::has($crate::ops::cpu::Simd::Avx512) => unsafe { avx512($($a),*) },
                    $crate::ops::cpu::Simd::Avx2 if $crate::ops::cpu::has($crate::ops::cpu::Simd::Avx2) => unsafe { avx2($($a),*) },
                    _ => body($($a),*),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = simd;
                body($($a),*)
            }
        }
    };
}

pub mod adamw;
pub mod add;
pub mod attention;
pub mod cpu;
pub mod dropout;
pub mod gelu;
pub mod layer_norm;
pub mod linear;
pub mod scaled_add;

/// `a + b` for tensors of one shape (the residual stream's additions, LoRA's update).
///
/// On Flex in f32 it is [`add::FastAdd`]: the same additions on every rayon thread, in place
/// when `a` owns its buffer, with its own autodiff node (Flex's `float_add` runs on one thread).
/// Elsewhere, or for shapes that differ (broadcasting), Burn's `+`.
pub fn add<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    if a.dtype() == burn::tensor::DType::F32 && b.dtype() == burn::tensor::DType::F32 && a.dims() == b.dims() && is_flex(&a.device()) {
        add::add_flex(a, b)
    } else {
        a + b
    }
}

/// `z + o ⊙ gamma`, `gamma: [D]` scaling the last dim (a LayerScale'd residual branch added).
///
/// On Flex in f32 it is [`scaled_add::FastScaledAdd`]: one threaded pass (in place when `z`
/// owns its buffer) with its own autodiff node, where the composed form is a one-thread
/// broadcast product and an add, and as many one-thread passes again in its backward.
/// Elsewhere, Burn's `z + o * gamma`.
pub fn add_scaled(z: Tensor<3>, o: Tensor<3>, gamma: Tensor<1>) -> Tensor<3> {
    let f32s = [z.dtype(), o.dtype(), gamma.dtype()].iter().all(|d| *d == burn::tensor::DType::F32);
    if f32s && z.dims() == o.dims() && o.dims()[2] == gamma.dims()[0] && is_flex(&z.device()) {
        scaled_add::scaled_add_flex(z, o, gamma)
    } else {
        z + o * gamma.unsqueeze::<3>()
    }
}

/// A `burn::nn::LayerNorm` applied to `x` (over its last dim).
///
/// On Flex in f32 (with a bias, as every LayerNorm here has) it is
/// [`layer_norm::FastLayerNorm`]: row-parallel forward and backward with its own autodiff node
/// (Burn 0.22 composes LayerNorm under autodiff from nine one-threaded element-wise ops, each
/// with its own backward node). Elsewhere, or with the A/B switch [`use_burn_flex_layer_norm`]
/// set, the module's own `forward`.
pub fn norm<const D: usize>(ln: &burn::nn::LayerNorm, x: Tensor<D>) -> Tensor<D> {
    let flex = x.dtype() == burn::tensor::DType::F32 && is_flex(&x.device()) && !BURN_FLEX_LAYER_NORM.load(std::sync::atomic::Ordering::Relaxed);
    match (&ln.beta, flex.then(|| layer_norm_eps(ln)).flatten()) {
        (Some(beta), Some(eps)) => layer_norm::layer_norm_flex(x, ln.gamma.val(), beta.val(), eps),
        _ => ln.forward(x),
    }
}

/// A LayerNorm's ε. Burn 0.22 keeps the field private and shows it only in the module's
/// display (`LayerNorm {d_model: 384, epsilon: 0.000001, bias: true, ...}`), so it is read from
/// there; `None` (then the module's own forward runs) if that text ever changes.
fn layer_norm_eps(ln: &burn::nn::LayerNorm) -> Option<f64> {
    let text = format!("{ln}");
    let rest = &text[text.find("epsilon: ")? + "epsilon: ".len()..];
    let end = rest.find([',', '}', ' ']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok().filter(|e: &f64| e.is_finite() && *e >= 0.0)
}

static BURN_FLEX_LAYER_NORM: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// For A/B measurements (`vqt-bench step --flex-layer-norm burn`): `true` makes [`norm()`] on
/// Flex run the module's own forward (Burn's composed ops under autodiff) instead of
/// [`layer_norm::FastLayerNorm`], for the rest of the process.
pub fn use_burn_flex_layer_norm(on: bool) {
    BURN_FLEX_LAYER_NORM.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The linear layer `x·W + b` (`x: [..., d_in]`, `W: [d_in, d_out]` in Burn's layout).
///
/// On Flex in f32 it is [`linear::FastLinear`]: one gemm call over every row into an output
/// that starts as the bias rows, with its own autodiff node (Burn's default for Flex runs a
/// matmul into a zeroed output and then a separate bias add, 92-141 GFLOP/s at a ViT-S block's
/// shapes where gemm itself reaches 160-180 on Zen 3). Elsewhere, or with the A/B switch
/// [`use_burn_flex_linear`] set, Burn's `linear`.
pub fn linear<const D: usize>(x: Tensor<D>, weight: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<D> {
    let f32s = x.dtype() == burn::tensor::DType::F32 && weight.dtype() == burn::tensor::DType::F32;
    if f32s && is_flex(&x.device()) && !BURN_FLEX_LINEAR.load(std::sync::atomic::Ordering::Relaxed) {
        linear::linear_flex(x, weight, bias)
    } else {
        burn::tensor::module::linear(x, weight, bias)
    }
}

/// A `burn::nn::Linear` layer applied through [`linear()`].
pub fn apply<const D: usize>(layer: &burn::nn::Linear, x: Tensor<D>) -> Tensor<D> {
    linear(x, layer.weight.val(), layer.bias.as_ref().map(|b| b.val()))
}

static BURN_FLEX_LINEAR: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// For A/B measurements (`vqt-bench step --flex-linear burn`): `true` makes [`linear()`] on Flex
/// call Burn's own `linear` (matmul, then bias add) instead of [`linear::FastLinear`], for the
/// rest of the process.
pub fn use_burn_flex_linear(on: bool) {
    BURN_FLEX_LINEAR.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// `layer`'s dropout of `x`: Burn's `Dropout::forward`, except on Flex in f32 while training
/// under autodiff, where the mask is drawn on every thread ([the `dropout` module](mod@dropout)) and
/// applied with one multiplication. Identity when the layer is not training, the device has no
/// autodiff or the probability is 0, as Burn's.
pub fn dropout<const D: usize>(layer: &burn::nn::Dropout, x: Tensor<D>) -> Tensor<D> {
    let device = x.device();
    let training = layer.training.is_enabled() && device.is_autodiff() && layer.prob > 0.0;
    if training && layer.prob < 1.0 && x.dtype() == burn::tensor::DType::F32 && is_flex(&device) {
        dropout::dropout_flex(x, 1.0 - layer.prob)
    } else {
        layer.forward(x)
    }
}

/// The exact (erf) GELU, `0.5·x·(1 + erf(x/√2))`, with an exact gradient on every backend.
///
/// On Flex (the `cpu` backend) it is [`gelu::FastGelu`], a backend extension with its own
/// autodiff node: forward and backward run on every rayon thread in an AVX-512/AVX2 loop chosen
/// at run time, where Flex's own GELU runs one thread of scalar `libm` erf per element (it was a
/// third of a frozen ViT block's forward, and more of a tuned method's step). Burn's fused
/// `gelu` computes the exact value elsewhere, but its default backward is the derivative of the
/// tanh approximation (only Flex and LibTorch override it), so on other backends with autodiff
/// GELU is composed from `erf`, whose derivative Burn computes exactly (otherwise gradients would
/// differ from PyTorch's by up to ~1e-3 on ndarray, wgpu and CUDA); without autodiff the fused
/// op is used.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let device = x.device();
    if is_flex(&device) {
        if BURN_FLEX_GELU.load(std::sync::atomic::Ordering::Relaxed) {
            burn::tensor::activation::gelu(x)
        } else {
            gelu::gelu_flex(x)
        }
    } else if device.is_autodiff() {
        let cdf = x.clone().mul_scalar(std::f64::consts::FRAC_1_SQRT_2).erf().add_scalar(1.0).mul_scalar(0.5);
        x * cdf
    } else {
        burn::tensor::activation::gelu(x)
    }
}

/// Multi-head attention `softmax(q·kᵀ/√Dh)·v` of split heads (`[B, H, Nq, Dh]` x
/// `[B, H, Nk, Dh]` x `[B, H, Nk, Dv]` -> `[B, H, Nq, Dv]`) on Flex in f32, through
/// [`attention::FastAttention`] (per-head products on the strided views, its own autodiff node),
/// or `Err` with the inputs back where that does not apply (another backend or dtype, or the A/B
/// switch [`use_burn_flex_attention`] set): the caller then composes it from Burn's ops. Heads
/// with fewer than 16 query rows (VQT's queries) run vector loops instead of `gemm` calls.
pub fn flex_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Result<Tensor<4>, (Tensor<4>, Tensor<4>, Tensor<4>)> {
    let f32s = [q.dtype(), k.dtype(), v.dtype()].iter().all(|d| *d == burn::tensor::DType::F32);
    if !is_flex(&q.device()) || !f32s || BURN_FLEX_ATTENTION.load(std::sync::atomic::Ordering::Relaxed) {
        return Err((q, k, v));
    }
    let scale = 1.0 / (q.dims()[3] as f32).sqrt();
    Ok(attention::attention_flex(q, k, v, scale))
}

/// [`flex_attention`] of `q: [B, H, Nq, Dh]` over keys and values `k, v: [N, H, Nk, ·]` that hold
/// more images than the batch (the feature cache's whole layer, shared, not copied): image `b`
/// reads their row `rows[b]`; the keys and values may be f16 (an f16 cache, widened as it is
/// read). `Err` with the inputs back where the extension does not apply
/// (another backend or dtype, or the A/B switch [`use_burn_flex_attention`] set): the caller
/// then gathers the rows and attends as usual.
pub fn flex_attention_rows(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, rows: &[usize]) -> Result<Tensor<4>, (Tensor<4>, Tensor<4>, Tensor<4>)> {
    let dtypes = q.dtype() == burn::tensor::DType::F32 && attention::cache_dtype(k.dtype()) && attention::cache_dtype(v.dtype());
    if !is_flex(&q.device()) || !dtypes || BURN_FLEX_ATTENTION.load(std::sync::atomic::Ordering::Relaxed) {
        return Err((q, k, v));
    }
    let scale = 1.0 / (q.dims()[3] as f32).sqrt();
    Ok(attention::attention_rows_flex(q, k, v, rows, scale))
}

/// Self-attention of a fused projection `qkv: [B, N, 3·H·Dh]` (timm's fused qkv output) with
/// `heads` heads, `[B, H, N, Dh]`, through [`attention::FastAttention::fast_attention_packed`]
/// on Flex in f32: the heads are read where the projection wrote them and, under autodiff, the
/// backward returns one gradient for `qkv` (split into three copies, Burn's slicing backward
/// would zero-fill a tensor of `qkv`'s size per part and sum the three). Every row is a query;
/// the first `keys` rows (`1 ..= N`; `N` for plain self-attention) are the keys and values,
/// so rows after them (VQT's queries riding along with the trunk's tokens) read the tokens
/// without being read. `Ok` also hands `qkv` back (a caller keeping the keys and values copies
/// them out of it); `Err(qkv)` where the extension does not apply (another backend or dtype,
/// fewer than 16 rows, or one of the A/B switches [`use_burn_flex_attention`] and
/// [`use_split_qkv`] set).
pub fn flex_attention_packed(qkv: Tensor<3>, heads: usize, keys: usize) -> Result<(Tensor<4>, Tensor<3>), Tensor<3>> {
    let [_, n, width] = qkv.dims();
    assert!(keys >= 1 && keys <= n, "attention: {keys} key rows of a fused qkv with {n} rows");
    let usable = is_flex(&qkv.device())
        && qkv.dtype() == burn::tensor::DType::F32
        && n >= MIN_QUERY_ROWS
        && heads > 0
        && width % (3 * heads) == 0
        && !BURN_FLEX_ATTENTION.load(std::sync::atomic::Ordering::Relaxed)
        && !SPLIT_QKV.load(std::sync::atomic::Ordering::Relaxed);
    if !usable {
        return Err(qkv);
    }
    let scale = 1.0 / ((width / (3 * heads)) as f32).sqrt();
    Ok((attention::attention_packed_flex(qkv.clone(), heads, keys, scale), qkv))
}

/// The keys and values of a fused projection `qkv: [B, N, 3·H·Dh]` (plain Flex f32: the frozen
/// trunk's) as zero-copy views `[B, H, keys, Dh]` of its buffer, the first `keys` rows;
/// `Err(qkv)` elsewhere (autodiff, another backend or dtype). A view holds the whole projection
/// (its query third too): it is for a consumer that is done with them at once (VQT's streamed
/// training step, whose attention keeps gradient maps instead, [`attention_keeps_maps`]).
pub fn flex_kv_views(qkv: Tensor<3>, heads: usize, keys: usize) -> Result<(Tensor<4>, Tensor<4>), Tensor<3>> {
    let [b, n, width] = qkv.dims();
    assert!(keys <= n, "{keys} key rows of a fused qkv with {n} rows");
    if qkv.is_autodiff() || !is_flex(&qkv.device()) || qkv.dtype() != burn::tensor::DType::F32 || heads == 0 || width % (3 * heads) != 0 {
        return Err(qkv);
    }
    let t = qkv.try_into_primitive::<burn::backend::Flex>().expect("checked: a plain Flex tensor");
    let dh = width / (3 * heads);
    let (s, start) = (t.layout().strides().to_vec(), t.layout().start_offset() as isize);
    let view = |part: usize| {
        let offset = start + (part * heads * dh) as isize * s[2];
        assert!(offset >= 0, "a fused qkv view before its buffer");
        let layout = burn::backend::flex::Layout::new(burn::tensor::Shape::from([b, heads, keys, dh]), vec![s[0], dh as isize * s[2], s[1], s[2]], offset as usize);
        Tensor::<4>::from_primitive::<burn::backend::Flex>(t.clone().with_layout(layout))
    };
    Ok((view(1), view(2)))
}

/// Whether attention of `nq` query rows over `nk` constant keys and values (head widths `dh`,
/// `dv`) keeps per-query gradient maps for its backward instead of the keys and values (on
/// Flex in f32 under autodiff, [`attention::FastAttention::fast_attention`]): where the maps are
/// smaller, `nq·dh·dv < nk·(dh + dv)`.
pub fn attention_keeps_maps(nq: usize, nk: usize, dh: usize, dv: usize) -> bool {
    nq.saturating_mul(dh).saturating_mul(dv) < nk.saturating_mul(dh + dv)
}

static SPLIT_QKV: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// For A/B measurements (`vqt-bench step --flex-qkv split`): `true` makes self-attention on
/// Flex copy the fused projection apart into q, k and v (timm's split) and run
/// [`attention::FastAttention::fast_attention`] on the copies, instead of
/// [`flex_attention_packed`], for the rest of the process.
pub fn use_split_qkv(on: bool) {
    SPLIT_QKV.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Tokens from which [`flex_attention_packed`] takes the extension (ViT tokens, 50 and more at
/// the sizes used here); fewer go through the split parts.
const MIN_QUERY_ROWS: usize = 16;

static BURN_FLEX_ATTENTION: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// For A/B measurements (`vqt-bench step --flex-attention burn`): `true` makes attention on Flex
/// take Burn's ops again (its fused `attention` without autodiff, matmul + softmax + matmul with
/// it) instead of [`attention::FastAttention`], for the rest of the process.
pub fn use_burn_flex_attention(on: bool) {
    BURN_FLEX_ATTENTION.store(on, std::sync::atomic::Ordering::Relaxed);
}

static BURN_FLEX_GELU: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// For A/B measurements (`vqt-bench step --flex-gelu burn`): `true` makes [`gelu()`] on Flex call
/// Burn's own op (one thread, scalar `libm` erf, Burn's autodiff node) instead of
/// [`gelu::FastGelu`], for the rest of the process.
pub fn use_burn_flex_gelu(on: bool) {
    BURN_FLEX_GELU.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// erf by Abramowitz & Stegun 7.1.26, `1 − (a₁t + … + a₅t⁵)·e^{−x²}` with `t = 1/(1 + p|x|)`
/// (absolute error ≤ 1.5e-7 in exact arithmetic, ≤ 5e-7 in f32 near 0), the formula of PyTorch's vectorised `erf` (ATen `Vectorized<float>`);
/// the exponential is [`exp_neg`].
#[inline(always)]
pub fn erf_as(x: f32) -> f32 {
    let a = x.abs();
    erf_poly(a, exp_neg(a * a)).copysign(x)
}

/// erf(a) for `a ≥ 0` by A&S 7.1.26, given `e = e^{−a²}` (GELU's gradient reuses it).
#[inline(always)]
pub(crate) fn erf_poly(a: f32, e: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_7) * t - 0.284_496_72) * t + 0.254_829_6) * t;
    1.0 - poly * e
}

/// `e^{−y}` for `y ≥ 0`, branch-free (Cephes `expf`: `e^{−y} = 2ⁿ·e^r`, |r| ≤ ln2/2, degree-6
/// polynomial, about 2 ulp); `y` beyond 87 is clamped to 87 (e^{−87} ≈ 1.6e-38, which is 0 to
/// erf in f32).
#[inline(always)]
pub fn exp_neg(y: f32) -> f32 {
    let x = (-y).max(-87.0);
    // n = round(x·log2 e) by the 1.5·2²³ trick (no floor call, so it vectorises): t = 1.5·2²³ + n
    // keeps n in its low mantissa bits, so the integer n is t's bits less 1.5·2²³'s. Taking it
    // from the bits, not by `n as i32` (a saturating conversion that LLVM does one lane at a
    // time), keeps the whole function in vector registers; the value is the same integer.
    let t = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let k = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r + 0.5) * r * r + r + 1.0;
    p * f32::from_bits(k.wrapping_add(127).wrapping_shl(23) as u32)
}

/// Whether `device` (with or without autodiff) is a Flex device.
pub fn is_flex(device: &burn::tensor::Device) -> bool {
    static FLEX: std::sync::OnceLock<burn::tensor::Device> = std::sync::OnceLock::new();
    device.clone().without_autodiff() == *FLEX.get_or_init(burn::tensor::Device::flex)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    #[allow(deprecated)] // Device::ndarray: another backend gets its tensor back
    fn kv_views_share_the_fused_projection_and_equal_its_split_parts() {
        let d = Device::flex();
        // A strided fused projection: rows 80 apart (a narrowed wider tensor), 72 columns used.
        let wide = Tensor::<3>::random([2, 17, 80], burn::tensor::Distribution::Normal(0.0, 1.0), &d);
        let qkv = wide.narrow(2, 5, 72);
        for keys in [17, 15] {
            let (k, v) = flex_kv_views(qkv.clone(), 3, keys).map_err(|_| "the views apply").unwrap();
            let part = |i: usize| crate::vit::split_heads(qkv.clone().narrow(2, i * 24, 24).narrow(1, 0, keys), 3);
            for (view, copy) in [(k, part(1)), (v, part(2))] {
                assert_eq!(view.dims(), [2, 3, keys, 8]);
                let layout = view.clone().try_into_primitive::<burn::backend::Flex>().unwrap().layout().clone();
                assert_eq!(layout.strides(), &[17 * 80, 8, 80, 1], "a view of the buffer, not a copy");
                assert_eq!(view.into_data(), copy.into_data());
            }
        }
        assert!(flex_kv_views(qkv.clone().autodiff(), 3, 17).is_err());
        assert!(flex_kv_views(Tensor::<3>::zeros([1, 4, 72], &Device::ndarray()), 3, 4).is_err());
        assert!(attention_keeps_maps(1, 65, 64, 64) && !attention_keeps_maps(3, 65, 64, 64));
    }

    #[test]
    #[allow(deprecated)] // Device::ndarray: the backend is still compiled in and tested
    fn flex_is_recognised_with_and_without_autodiff() {
        assert!(is_flex(&Device::flex()) && is_flex(&Device::flex().autodiff()));
        assert!(!is_flex(&Device::ndarray()) && !is_flex(&Device::ndarray().autodiff()));
    }

    #[test]
    fn exp_neg_takes_the_exponent_from_the_bits_as_a_conversion_would() {
        // The exponent integer comes from the bits of 1.5·2²³ + n (so the loop vectorises); it
        // must be the integer `n as i32` gives, for every y the clamp lets through, to the bit.
        fn by_conversion(y: f32) -> f32 {
            let x = (-y).max(-87.0);
            let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
            let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
            let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r + 0.5) * r * r + r + 1.0;
            p * f32::from_bits((n as i32).wrapping_add(127).wrapping_shl(23) as u32)
        }
        let mut y = 0f32;
        while y < 100.0 {
            assert_eq!(exp_neg(y).to_bits(), by_conversion(y).to_bits(), "e^-{y}");
            y = if y == 0.0 { f32::MIN_POSITIVE } else { y * 1.000_37 + 1e-6 };
        }
        for y in [0.0, 0.5 * std::f32::consts::LN_2, 86.999, 87.0, 1000.0, f32::INFINITY] {
            assert_eq!(exp_neg(y).to_bits(), by_conversion(y).to_bits(), "e^-{y}");
        }
    }

    #[test]
    fn threaded_gelu_matches_flex_gelu_and_its_erf_is_within_the_bound() {
        // The erf against libm's on a dense grid: A&S 7.1.26 promises 1.5e-7 in exact arithmetic;
        // in f32, `1 - poly·e^{-x²}` cancels near 0 (measured worst: 4.7e-7 absolute). The
        // exponential within about 2 ulp.
        let mut worst_erf = 0f64;
        for i in -12_000..=12_000 {
            let x = i as f32 * 1e-3;
            worst_erf = worst_erf.max((erf_as(x) as f64 - libm::erf(x as f64)).abs());
            if x >= 0.0 {
                let y = x * 7.0;
                let (ours, exact) = (exp_neg(y) as f64, (-(y as f64)).exp());
                assert!((ours - exact).abs() <= 2.5e-7 * exact + 1e-38, "e^-{y}: {ours} vs {exact}");
            }
        }
        assert!(worst_erf < 6e-7, "worst erf error {worst_erf}");
        assert_eq!(erf_as(f32::INFINITY), 1.0);
        assert_eq!(erf_as(-30.0), -1.0);
        assert!(exp_neg(1000.0) > 0.0 && exp_neg(1000.0) < 2e-38);
        // Through a tensor (threads, a strided view made contiguous by into_data), against
        // Flex's own GELU (libm's erff): |x|·0.5·(erf error) at most.
        let device = Device::flex();
        for x in [
            Tensor::<2>::random([300, 257], burn::tensor::Distribution::Normal(0.0, 3.0), &device),
            Tensor::<2>::random([64, 48], burn::tensor::Distribution::Normal(0.0, 2.0), &device).swap_dims(0, 1),
        ] {
            let xs: Vec<f32> = x.clone().into_data().try_to_vec::<f32>().unwrap();
            let ours: Vec<f32> = gelu(x.clone()).into_data().try_to_vec::<f32>().unwrap();
            let burns: Vec<f32> = burn::tensor::activation::gelu(x).into_data().try_to_vec::<f32>().unwrap();
            assert_eq!(ours.len(), burns.len());
            for ((x, a), b) in xs.iter().zip(&ours).zip(&burns) {
                assert!((a - b).abs() <= 3e-7 * x.abs().max(1.0) + 1e-7, "gelu({x}): {a} vs {b}");
            }
        }
    }

    #[test]
    #[allow(deprecated)]
    fn composed_and_fused_gelu_agree_and_gradient_is_exact() {
        // Flex (fused forward and backward) and ndarray (composed from erf under autodiff).
        for plain in [Device::flex(), Device::ndarray()] {
            check_gelu(plain);
        }
    }

    fn check_gelu(plain: Device) {
        let ad = plain.clone().autodiff();
        let xs = vec![-3.0f32, -1.2, -0.3, 0.0, 0.4, 1.7, 2.9];
        let fused = gelu(Tensor::<1>::from_data(TensorData::new(xs.clone(), [7]), &plain));
        let x = Tensor::<1>::from_data(TensorData::new(xs.clone(), [7]), &ad).require_grad();
        let composed = gelu(x.clone());
        let a: Vec<f32> = fused.into_data().try_to_vec::<f32>().unwrap();
        let b: Vec<f32> = composed.clone().inner().into_data().try_to_vec::<f32>().unwrap();
        for (u, v) in a.iter().zip(&b) {
            assert!((u - v).abs() < 1e-6, "{u} vs {v}");
        }
        let grads = composed.sum().backward();
        let g: Vec<f32> = x.grad(&grads).unwrap().into_data().try_to_vec::<f32>().unwrap();
        for (xi, gi) in xs.iter().zip(&g) {
            let x = *xi as f64;
            let pdf = (-x * x / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let cdf = 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2));
            let exact = cdf + x * pdf;
            assert!((*gi as f64 - exact).abs() < 1e-6, "x={x}: {gi} vs {exact}");
        }
    }

    /// Abramowitz–Stegun 7.1.26 is too coarse; integrate the series instead (|x| ≤ 3 here).
    fn erf(x: f64) -> f64 {
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 || n < 5.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    }
}
