//! Dropout's mask drawn on every thread: `x ⊙ m`, `m` holding `1/keep` with probability `keep`
//! and 0 otherwise, each block of the mask from its own ChaCha12 stream.
//!
//! Burn's `Dropout` draws its Bernoulli mask through `Tensor::random`, one value at a time on
//! the calling thread (about 9 ns each here), then multiplies twice (mask, then `1/keep`). VPT's
//! deep prompts are dropped per image (`[B, Np, D]` per layer, 1.5 M values per step at ViT-S
//! batch 32): 15 ms of a step ran on one thread while the others waited (`bench.md`).
//!
//! The mask's seed is drawn from the backend's own generator (two values of `Tensor::random`),
//! so `Backend::seed` still fixes every mask (62 bits of it); block `i` of the mask is generated from that seed
//! and `i`, so the mask does not depend on the number of threads.

use burn::tensor::{Distribution, Int, Shape, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::cpu::par_new;

/// Values per block of the mask (one generator each).
const BLOCK: usize = 1 << 14;

/// The mask of `n` values for keep probability `keep`: `1/keep` where the block's next 32
/// random bits fall below `keep·2³²`, else 0.
pub(crate) fn mask(n: usize, keep: f64, seed: u64) -> Vec<f32> {
    assert!(keep > 0.0 && keep <= 1.0, "dropout: keep probability {keep} outside (0, 1]");
    // keep = 1 keeps every value: the threshold 2³² is above every u32.
    let threshold = (keep * 4_294_967_296.0).round() as u64;
    let scale = (1.0 / keep) as f32;
    par_new(n, BLOCK, (0..n.div_ceil(BLOCK)).into_par_iter(), |block, i| {
        let mut rng = StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for v in block.iter_mut() {
            *v = if (rng.next_u32() as u64) < threshold { scale } else { 0.0 };
        }
    })
}

/// A seed from the backend's generator on `device` (so `Backend::seed` fixes it).
fn draw_seed(device: &burn::tensor::Device) -> u64 {
    // Two 31-bit halves (the default int type may be i32).
    let halves: Vec<i64> = Tensor::<1, Int>::random([2], Distribution::Uniform(0.0, 2_147_483_647.0), device)
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("two integers");
    ((halves[0] as u64) << 31) ^ (halves[1] as u64)
}

/// `x ⊙ m` with a fresh mask (see the module's docs); `keep` in (0, 1).
pub(crate) fn dropout_flex<const D: usize>(x: Tensor<D>, keep: f64) -> Tensor<D> {
    let device = x.device();
    let shape: Shape = x.shape();
    let seed = draw_seed(&device.clone().without_autodiff());
    let m = mask(shape.num_elements(), keep, seed);
    let m = Tensor::<D>::from_data(TensorData::new(m, shape), &device);
    x * m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_keeps_about_keep_and_scales_by_its_inverse() {
        let n = 1 << 20;
        let m = mask(n, 0.9, 7);
        let kept = m.iter().filter(|&&v| v != 0.0).count();
        // 1 M draws: the kept fraction's standard deviation is 3e-4; 3e-3 is ten of them, and
        // a threshold off by the drop probability (keeping 10 %) is far outside.
        assert!((kept as f64 / n as f64 - 0.9).abs() < 3e-3, "kept {kept} of {n}");
        assert!(m.iter().all(|&v| v == 0.0 || v == (1.0f64 / 0.9) as f32));
        // The mean of the mask is 1: dropout leaves the expectation of x unchanged.
        let mean = m.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 4e-3, "mean {mean}");
        assert!(mask(1000, 1.0, 3).iter().all(|&v| v == 1.0));
    }

    #[test]
    fn the_mask_is_fixed_by_its_seed_not_by_the_threads() {
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let n = 5 * BLOCK + 17;
        let a = one.install(|| mask(n, 0.5, 11));
        let b = three.install(|| mask(n, 0.5, 11));
        assert_eq!(a, b);
        assert_ne!(a, mask(n, 0.5, 12), "another seed, another mask");
        // Blocks are not copies of each other (each has its own stream).
        assert_ne!(a[..BLOCK], a[BLOCK..2 * BLOCK]);
    }
}
