//! `q·kᵀ` of ViT-S/14 at 112 px, batch 32: 192 (32 images x 6 heads) products [65,64]x[64,65],
//! one single-threaded gemm call per head on rayon's threads, (a) straight on the strided head
//! views of a fused qkv output `[B, T, 3, H, Dh]`, (b) after copying each head contiguous.

use std::time::Instant;
use rayon::prelude::*;
fn run(out: &mut [f32], t: usize, dh: usize, q: &[f32], qrs: isize, qbase: &(dyn Fn(usize) -> usize + Sync), k: &[f32], krs: isize, kbase: &(dyn Fn(usize) -> usize + Sync)) {
    out.par_chunks_mut(t * t).enumerate().for_each(|(i, o)| unsafe {
        gemm::gemm(t, t, dh, o.as_mut_ptr(), 1, t as isize, false,
            q.as_ptr().add(qbase(i)), 1, qrs,
            k.as_ptr().add(kbase(i)), krs, 1,
            0.0, 1.0, false, false, false, gemm::Parallelism::None);
    });
}
fn main() {
    let (b, t, h, dh) = (32usize, 65usize, 6usize, 64usize);
    let d = h * dh;
    let qkv: Vec<f32> = (0..b * t * 3 * d).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
    let mut out = vec![0f32; b * h * t * t];
    let g = 2.0 * (b * h * t * t * dh) as f64 / 1e9;
    let mut qc = vec![0f32; b * h * t * dh];
    let mut kc = vec![0f32; b * h * t * dh];
    for _ in 0..3 {
        let st = Instant::now();
        for _ in 0..50 {
            run(&mut out, t, dh, &qkv, (3 * d) as isize, &|i| { let (bb, hh) = (i / h, i % h); bb * t * 3 * d + hh * dh }, &qkv, (3 * d) as isize, &|i| { let (bb, hh) = (i / h, i % h); bb * t * 3 * d + d + hh * dh });
        }
        let strided = st.elapsed().as_secs_f64() / 50.0;
        let st = Instant::now();
        for _ in 0..50 {
            qc.par_chunks_mut(t * dh).zip(kc.par_chunks_mut(t * dh)).enumerate().for_each(|(i, (qq, kk))| {
                let (bb, hh) = (i / h, i % h);
                for r in 0..t { let s = bb * t * 3 * d + r * 3 * d + hh * dh; qq[r * dh..(r + 1) * dh].copy_from_slice(&qkv[s..s + dh]); kk[r * dh..(r + 1) * dh].copy_from_slice(&qkv[s + d..s + d + dh]); }
            });
            run(&mut out, t, dh, &qc, dh as isize, &|i| i * t * dh, &kc, dh as isize, &|i| i * t * dh);
        }
        let copied = st.elapsed().as_secs_f64() / 50.0;
        println!("q·kᵀ strided head views: {:.2} ms ({:.0} GFLOP/s); per-head contiguous copies + gemm: {:.2} ms ({:.0} GFLOP/s)", strided * 1e3, g / strided, copied * 1e3, g / copied);
    }
}
