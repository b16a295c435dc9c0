//! `ops::dropout` on Flex under autodiff, end to end. The only test of this binary: it seeds the
//! backend's global generator, which a test running beside it could draw from in between.

use burn::tensor::{Device, Tensor, TensorData};

#[test]
fn flex_dropout_scales_kept_values_passes_the_mask_as_gradient_and_follows_the_seed() {
    let ad = Device::flex().autodiff();
    let layer = burn::nn::DropoutConfig::new(0.25).init();
    let xs: Vec<f32> = (0..4096).map(|i| 1.0 + (i % 7) as f32).collect();
    let run = |seed: u64| {
        Device::flex().seed(seed);
        let x = Tensor::<2>::from_data(TensorData::new(xs.clone(), [64, 64]), &ad).require_grad();
        let y = vqt_models::ops::dropout(&layer, x.clone());
        let out: Vec<f32> = y.clone().inner().into_data().try_to_vec::<f32>().unwrap();
        let grads = y.sum().backward();
        let g: Vec<f32> = x.grad(&grads).unwrap().into_data().try_to_vec::<f32>().unwrap();
        (out, g)
    };
    let (out, g) = run(5);
    let scale = (1.0f64 / 0.75) as f32;
    let kept = g.iter().filter(|&&m| m != 0.0).count();
    // 4096 draws at keep 0.75: std 28 values; a wrong threshold (keeping 25 %) is far off.
    assert!((kept as i64 - 3072).abs() < 200, "kept {kept}");
    for ((o, m), x) in out.iter().zip(&g).zip(&xs) {
        // The gradient of Σ y is the mask itself: 1/keep where kept, else 0.
        assert!(*m == 0.0 || *m == scale, "mask value {m}");
        assert_eq!(*o, x * m);
    }
    assert_eq!(run(5), (out.clone(), g.clone()), "the backend's seed fixes the mask");
    assert_ne!(run(6).0, out, "another seed, another mask");
    // Not training: the identity, as Burn's.
    let frozen = burn::nn::Dropout { training: burn::module::Param::from_bool(false), ..layer.clone() };
    let x = Tensor::<2>::from_data(TensorData::new(xs.clone(), [64, 64]), &ad);
    assert_eq!(vqt_models::ops::dropout(&frozen, x).inner().into_data().try_to_vec::<f32>().unwrap(), xs);
}
