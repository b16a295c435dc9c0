//! gemm 0.19 (as Burn's Flex calls it: `Parallelism::Rayon`, contiguous row-major operands)
//! against OpenBLAS's `cblas_sgemm` at the linear products of one ViT-S/14 112 px batch-32 step
//! and of one ViT-B/16 224 px batch-16 step, and a 65x64x65 attention product, GFLOP/s, two
//! rounds each. Columns: gemm's own rayon split (`gemm2`), the output rows split over rayon's
//! threads with one single-threaded gemm call each (`gemmsplit`, as vqt-models' `ops::linear`
//! runs its products), and OpenBLAS. `split`: OpenBLAS at one thread per call, the output rows
//! split over rayon's threads; anything else: OpenBLAS's own 2 threads.

use std::time::Instant;
#[link(name = "openblas")]
extern "C" { fn openblas_set_num_threads(n: i32); }
fn gemm_crate(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], threads: usize) {
    unsafe {
        gemm::gemm(m, n, k, c.as_mut_ptr(), 1, n as isize, false, a.as_ptr(), 1, k as isize, b.as_ptr(), 1, n as isize, 0.0, 1.0, false, false, false,
            if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None });
    }
}
fn blas(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    unsafe { cblas_sys::cblas_sgemm(cblas_sys::CblasRowMajor, cblas_sys::CblasNoTrans, cblas_sys::CblasNoTrans, m as i32, n as i32, k as i32, 1.0, a.as_ptr(), k as i32, b.as_ptr(), n as i32, 0.0, c.as_mut_ptr(), n as i32) }
}
fn blas_split(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    use rayon::prelude::*;
    let parts = rayon::current_num_threads();
    let rows = (m + parts - 1) / parts;
    c.par_chunks_mut(rows * n).enumerate().for_each(|(i, cc)| {
        let r = cc.len() / n;
        blas(r, k, n, &a[i * rows * k..], b, cc);
    });
}
fn gemm_split(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    use rayon::prelude::*;
    let parts = rayon::current_num_threads();
    let rows = ((m + parts - 1) / parts + 15) / 16 * 16;
    c.par_chunks_mut(rows * n).enumerate().for_each(|(i, cc)| {
        let r = cc.len() / n;
        gemm_crate(r, k, n, &a[i * rows * k..], b, cc, 1);
    });
}
fn time(reps: usize, mut f: impl FnMut()) -> f64 { f(); let t = Instant::now(); for _ in 0..reps { f() } t.elapsed().as_secs_f64() / reps as f64 }
fn main() {
    let mode: String = std::env::args().nth(1).unwrap_or_default();
    unsafe { openblas_set_num_threads(if mode == "split" { 1 } else { 2 }) };
    for (m, k, n) in [
        (2080, 384, 1152), (2080, 384, 384), (2080, 384, 1536), (2080, 1536, 384), (1152, 2080, 384),
        (3152, 768, 2304), (3152, 768, 768), (3152, 768, 3072), (3152, 3072, 768), (768, 3152, 2304),
        (65, 64, 65),
    ] {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 1000) as f32 / 1000.0).collect();
        let mut c = vec![0f32; m * n];
        let reps = if m > 100 { 30 } else { 3000 };
        let g = 2.0 * (m * k * n) as f64 / 1e9;
        for _ in 0..2 {
            let t1 = time(reps, || gemm_crate(m, k, n, &a, &b, &mut c, 2));
            let t1s = time(reps, || gemm_split(m, k, n, &a, &b, &mut c));
            let t2 = time(reps, || if mode == "split" { blas_split(m, k, n, &a, &b, &mut c) } else { blas(m, k, n, &a, &b, &mut c) });
            println!("[{m},{k}]x[{k},{n}] gemm2 {:6.1} gemmsplit {:6.1} openblas-{mode} {:6.1} GFLOP/s", g / t1, g / t1s, g / t2);
        }
    }
}
