//! Heads and Head2Toe-style feature selection for VQT (methods.md §3.4).
//!
//! Stage A ("compress") trains a fresh head on the frozen VQT features with the group-lasso
//! penalty `λ·Σ_j ‖W_j‖₂`, where `W_j` is the weight row of input feature j (L2 across classes,
//! L1 across features). Stage B ("featselect") scores each feature by `‖W_A,j‖₂`, keeps the top
//! `int(F·keep)` in descending score order, and trains a fresh head on those features only.

use burn::tensor::{Int, Tensor, TensorData};

/// `Σ_j ‖W_j‖₂` for a Burn `[F, C]` weight (rows = input features).
///
/// `eps` inside the square root keeps the gradient finite for an all-zero row (PyTorch's norm
/// has no gradient there); with `eps = 1e-12` the value differs by at most `F·1e-6`.
pub fn group_lasso(weight: Tensor<2>, eps: f64) -> Tensor<1> {
    weight.powi_scalar(2).sum_dim(1).add_scalar(eps).sqrt().sum()
}

/// Feature scores `‖W_j‖₂` of a Burn `[F, C]` head weight.
pub fn feature_scores(weight: Tensor<2>) -> Vec<f32> {
    let [f, _] = weight.dims();
    let norms = weight.powi_scalar(2).sum_dim(1).sqrt().reshape([f]);
    vqt_core::HostTensor::from_tensor(norms).data
}

/// Indices of the `int(F·keep)` highest scores, highest first (ties keep the lower index first).
pub fn select_top(scores: &[f32], keep: f64) -> Result<Vec<usize>, String> {
    if !(keep > 0.0 && keep <= 1.0) {
        return Err(format!("keep fraction {keep} is not in (0, 1]"));
    }
    let k = (scores.len() as f64 * keep) as usize;
    if k == 0 {
        return Err(format!("keep fraction {keep} of {} features selects none", scores.len()));
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(format!("feature {i} has a non-finite score"));
    }
    let mut ids: Vec<usize> = (0..scores.len()).collect();
    ids.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
    ids.truncate(k);
    Ok(ids)
}

/// Columns `ids` of features `[B, F]`, in that order.
pub fn select_columns(feats: Tensor<2>, ids: &[usize]) -> Tensor<2> {
    let device = feats.device();
    let idx: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    feats.select(1, Tensor::<1, Int>::from_data(TensorData::new(idx, [ids.len()]), &device))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    #[test]
    fn penalty_value_and_gradient() {
        let ad = Device::flex().autodiff();
        // rows: (3,4) -> 5, (0,0) -> 0, (1,0) -> 1
        let w = Tensor::<2>::from_data(TensorData::new(vec![3.0f32, 4.0, 0.0, 0.0, 1.0, 0.0], [3, 2]), &ad).require_grad();
        let p = group_lasso(w.clone(), 1e-12);
        assert!((p.clone().into_scalar::<f32>() - 6.0).abs() < 1e-5);
        let g: Vec<f32> = w.grad(&p.backward()).unwrap().into_data().try_to_vec::<f32>().unwrap();
        let expected = [0.6, 0.8, 0.0, 0.0, 1.0, 0.0];
        for (a, b) in g.iter().zip(expected) {
            assert!((a - b).abs() < 1e-5, "{g:?}");
        }
    }

    #[test]
    fn selection_keeps_top_fraction_in_descending_order() {
        let s = [0.1f32, 0.9, 0.5, 0.9, 0.0, 0.3, 0.7, 0.2, 0.6, 0.4];
        assert_eq!(select_top(&s, 0.7).unwrap(), vec![1, 3, 6, 8, 2, 9, 5]);
        // VQT demo size: int(9,984 × 0.7) = 6,988
        assert_eq!(select_top(&vec![1.0; 9984], 0.7).unwrap().len(), 6988);
        assert!(select_top(&s, 0.0).is_err());
        assert!(select_top(&s, 0.05).unwrap_err().contains("selects none"));
        assert!(select_top(&[1.0, f32::NAN], 0.5).unwrap_err().contains("feature 1"));
    }

    #[test]
    fn select_columns_in_order() {
        let dev = Device::flex();
        let x = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [1, 4]), &dev);
        let y: Vec<f32> = select_columns(x, &[3, 0]).into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(y, vec![4.0, 1.0]);
    }
}
