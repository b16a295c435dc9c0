//! Position-embedding resampling for other input sizes, done once at load time on the host (f64
//! arithmetic, f32 result) so that every backend gets bit-identical embeddings.
//!
//! Burn's `interpolate` has no antialias option, and timm's `resample_abs_pos_embed` calls
//! PyTorch's bicubic with `antialias=True`, whose kernel differs from plain bicubic (a = −0.5,
//! support widened when shrinking). Both kernels are implemented here as separable weight
//! matrices, following PyTorch's `upsample_bicubic2d` and `_upsample_bicubic2d_aa`.

use serde::{Deserialize, Serialize};
use vqt_core::HostTensor;

/// Which kernel resizes the position grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PosResample {
    /// timm `resample_abs_pos_embed`: bicubic, align_corners false, antialias true (a = −0.5,
    /// PIL-style support scaling).
    TimmBicubicAntialias,
    /// Plain bicubic, a = −0.75, half-pixel centres, edge clamp, no antialias: PyTorch's
    /// `F.interpolate(mode="bicubic")` and the ONNX `Resize` in the DINOv2 (HF) export.
    Bicubic,
}

impl PosResample {
    /// Name for load reports and run records.
    pub fn name(self) -> &'static str {
        match self {
            PosResample::TimmBicubicAntialias => "timm-bicubic-antialias",
            PosResample::Bicubic => "bicubic",
        }
    }
}

/// `weights[o][i]`: contribution of input i to output o, for one axis.
fn weights(in_size: usize, out_size: usize, method: PosResample) -> Vec<Vec<f64>> {
    let scale = in_size as f64 / out_size as f64;
    let mut w = vec![vec![0f64; in_size]; out_size];
    match method {
        PosResample::Bicubic => {
            let a = -0.75;
            let cc1 = |x: f64| ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
            let cc2 = |x: f64| ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
            for (o, row) in w.iter_mut().enumerate() {
                let real = scale * (o as f64 + 0.5) - 0.5;
                let base = real.floor();
                let t = real - base;
                let coeffs = [cc2(t + 1.0), cc1(t), cc1(1.0 - t), cc2(2.0 - t)];
                for (j, c) in coeffs.iter().enumerate() {
                    let idx = (base as i64 - 1 + j as i64).clamp(0, in_size as i64 - 1) as usize;
                    row[idx] += c;
                }
            }
        }
        PosResample::TimmBicubicAntialias => {
            let a = -0.5;
            let filter = |x: f64| {
                let x = x.abs();
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            };
            let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
            let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
            for (o, row) in w.iter_mut().enumerate() {
                let center = scale * (o as f64 + 0.5);
                let xmin = ((center - support + 0.5) as i64).max(0) as usize;
                let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
                let ws: Vec<f64> = (xmin..xmax).map(|j| filter((j as f64 - center + 0.5) * invscale)).collect();
                let total: f64 = ws.iter().sum();
                for (j, wj) in (xmin..xmax).zip(ws) {
                    row[j] = if total != 0.0 { wj / total } else { 0.0 };
                }
            }
        }
    }
    w
}

/// Resizes a `[1, 1 + g0², D]` position table (class row first) to `[1, 1 + g1², D]`.
pub fn resample_pos_embed(pos: &HostTensor, g1: usize, method: PosResample) -> Result<HostTensor, String> {
    let [one, n0, d] = pos.shape[..] else {
        return Err(format!("expected a [1, N, D] position table, found {:?}", pos.shape));
    };
    let g0 = ((n0 - 1) as f64).sqrt().round() as usize;
    if one != 1 || g0 * g0 + 1 != n0 {
        return Err(format!("position table {:?} is not a class row plus a square grid", pos.shape));
    }
    if g0 == g1 {
        return Ok(pos.clone());
    }
    let w = weights(g0, g1, method);
    let grid = &pos.data[d..];
    // Rows first: tmp[r1][c0][d] = Σ_r0 w[r1][r0] · grid[r0][c0][d]
    let mut tmp = vec![0f64; g1 * g0 * d];
    for r1 in 0..g1 {
        for (r0, &wr) in w[r1].iter().enumerate() {
            if wr == 0.0 {
                continue;
            }
            for c0 in 0..g0 {
                let src = &grid[(r0 * g0 + c0) * d..(r0 * g0 + c0 + 1) * d];
                let dst = &mut tmp[(r1 * g0 + c0) * d..(r1 * g0 + c0 + 1) * d];
                for (t, s) in dst.iter_mut().zip(src) {
                    *t += wr * *s as f64;
                }
            }
        }
    }
    let mut out = Vec::with_capacity((1 + g1 * g1) * d);
    out.extend_from_slice(&pos.data[..d]);
    for r1 in 0..g1 {
        for c1 in 0..g1 {
            let mut acc = vec![0f64; d];
            for (c0, &wc) in w[c1].iter().enumerate() {
                if wc == 0.0 {
                    continue;
                }
                for (a, s) in acc.iter_mut().zip(&tmp[(r1 * g0 + c0) * d..(r1 * g0 + c0 + 1) * d]) {
                    *a += wc * s;
                }
            }
            out.extend(acc.into_iter().map(|v| v as f32));
        }
    }
    Ok(HostTensor::new(vec![1, 1 + g1 * g1, d], out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_sum_to_one_and_identity_at_same_size() {
        for m in [PosResample::Bicubic, PosResample::TimmBicubicAntialias] {
            for (i, o) in [(4, 6), (6, 4), (37, 16), (37, 8), (14, 14)] {
                for row in weights(i, o, m) {
                    assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{m:?} {i}->{o}");
                }
            }
            let w = weights(5, 5, m);
            for (o, row) in w.iter().enumerate() {
                for (i, v) in row.iter().enumerate() {
                    assert!((v - if i == o { 1.0 } else { 0.0 }).abs() < 1e-12, "{m:?} identity");
                }
            }
        }
    }

    #[test]
    fn constant_grid_stays_constant() {
        let d = 3;
        let mut data = vec![9.0f32; d];
        data.extend(std::iter::repeat_n(0.5f32, 16 * d));
        let pos = HostTensor::new(vec![1, 17, d], data);
        let out = resample_pos_embed(&pos, 7, PosResample::TimmBicubicAntialias).unwrap();
        assert_eq!(out.shape, vec![1, 50, d]);
        assert_eq!(&out.data[..d], &[9.0; 3]);
        assert!(out.data[d..].iter().all(|v| (v - 0.5).abs() < 1e-6));
    }

    #[test]
    fn rejects_non_square_grids() {
        let pos = HostTensor::new(vec![1, 6, 2], vec![0.0; 12]);
        assert!(resample_pos_embed(&pos, 3, PosResample::Bicubic).unwrap_err().contains("square grid"));
    }
}
