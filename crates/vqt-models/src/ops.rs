//! Small numeric building blocks shared by every module.

use burn::tensor::Tensor;

/// The exact (erf) GELU, `0.5·x·(1 + erf(x/√2))`, with an exact gradient on every backend.
///
/// Burn's fused `gelu` computes the exact value, but its default backward is the derivative of
/// the tanh approximation (only Flex and LibTorch override it), so gradients through a GELU
/// differ from PyTorch's by up to ~1e-3 on ndarray, wgpu and CUDA. On an autodiff device we
/// therefore compose GELU from `erf`, whose derivative Burn computes exactly; without autodiff
/// (the frozen trunk, inference) the fused op is used.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if x.device().is_autodiff() {
        let cdf = x.clone().mul_scalar(std::f64::consts::FRAC_1_SQRT_2).erf().add_scalar(1.0).mul_scalar(0.5);
        x * cdf
    } else {
        burn::tensor::activation::gelu(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn composed_and_fused_gelu_agree_and_gradient_is_exact() {
        let plain = Device::flex();
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
