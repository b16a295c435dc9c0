//! VQT's two-stage Head2Toe feature selection (methods.md §3.4) on a tiny backbone.

use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use vqt_models::head::feature_scores;
use vqt_models::query::VqtConfig;
use vqt_models::{QueryMethod, TrunkBatch, TrunkInput, TrunkModel, VitConfig};

fn vqt(model: &TrunkModel) -> &vqt_models::query::Vqt {
    match &model.method {
        QueryMethod::Vqt(v) => v,
        _ => unreachable!(),
    }
}

fn steps(mut model: TrunkModel, x: &Tensor<4>, y: &Tensor<1, Int>, n: usize, lr: f64) -> (TrunkModel, Vec<f32>) {
    let mut optim = AdamConfig::new().init();
    let mut losses = Vec::new();
    for _ in 0..n {
        let out = model.forward_classification(TrunkBatch { input: TrunkInput::Images(x.clone()), targets: y.clone(), rng_seed: None });
        losses.push(out.loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(out.loss.backward(), &model);
        model = optim.step(lr, model, grads);
    }
    (model, losses)
}

#[test]
fn compress_then_featselect() {
    let plain = Device::flex();
    let ad = plain.clone().autodiff();
    plain.seed(3);
    let cfg = VitConfig { img_size: 16, patch_size: 4, in_chans: 3, embed_dim: 16, depth: 2, num_heads: 2, mlp_ratio: 2.0, qkv_bias: true, layer_norm_eps: 1e-6, layer_scale_init: None, num_classes: 0 };
    let vit = cfg.init(&plain);
    let x = Tensor::<4>::random([6, 3, 16, 16], Distribution::Normal(0.0, 1.0), &plain);
    let y = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1, 2, 0, 1, 2], [6]), &ad);
    let v = VqtConfig { num_queries: 2, query_dropout: 0.0 }.init(2, 16, 4, 3, &ad);
    let f = 16 * (1 + 2 * 2);
    let (model, losses) = steps(TrunkModel::new(vit, QueryMethod::Vqt(v)), &x, &y, 15, 1e-2);
    assert!(losses.last() < losses.first(), "VQT did not learn: {losses:?}");
    let trained_queries = vqt_core::HostTensor::from_tensor(vqt(&model).queries.val());

    // Stage A: fresh head, frozen queries, penalty in the loss.
    let TrunkModel { backbone, method, .. } = model;
    let QueryMethod::Vqt(v) = method else { unreachable!() };
    let a = v.into_compress_stage(1e-2);
    assert!(!a.queries.is_require_grad());
    let ce_only = a.head.weight.val().inner().powi_scalar(2).sum_dim(1).sqrt().sum().into_scalar::<f32>() * 1e-2;
    let pen = a.penalty().unwrap().into_scalar::<f32>();
    assert!((pen - ce_only).abs() < 1e-3 * ce_only.max(1.0), "{pen} vs {ce_only}");
    let model = TrunkModel::new(backbone, QueryMethod::Vqt(a));
    let out = model.forward_classification(TrunkBatch { input: TrunkInput::Images(x.clone()), targets: y.clone(), rng_seed: None });
    let mut grads = out.loss.backward();
    assert!(vqt(&model).queries.grad(&grads).is_none(), "frozen queries got a gradient");
    assert_eq!(GradientsParams::from_module(&mut grads, &model.method).len(), 2, "only head weight and bias train");
    let (model, a_losses) = steps(model, &x, &y, 20, 1e-2);
    assert!(a_losses.last() < a_losses.first(), "{a_losses:?}");
    assert!(vqt_core::HostTensor::from_tensor(vqt(&model).queries.val()) == trained_queries, "queries changed in stage A");

    // Stage B: top int(F·keep) rows, in descending norm order, fresh head on them.
    let scores = feature_scores(vqt(&model).head.weight.val());
    let TrunkModel { backbone, method, .. } = model;
    let QueryMethod::Vqt(v) = method else { unreachable!() };
    let b = v.into_featselect_stage(0.7).unwrap();
    let ids = b.selection.clone().unwrap();
    assert_eq!(ids.len(), (f as f64 * 0.7) as usize);
    assert_eq!(b.head.weight.dims(), [ids.len(), 3]);
    assert!(ids.windows(2).all(|w| scores[w[0]] >= scores[w[1]]));
    let min_kept = ids.iter().map(|&i| scores[i]).fold(f32::INFINITY, f32::min);
    assert!((0..f).filter(|i| !ids.contains(i)).all(|i| scores[i] <= min_kept));
    assert_eq!(b.penalty().map(|_| ()), None);
    assert!(b.clone().into_featselect_stage(0.5).is_err(), "selection twice");
    // Evaluation rebuilds stage B from a recorded selection; bad selections are errors.
    let fresh = || VqtConfig { num_queries: 2, query_dropout: 0.0 }.init(2, 16, 4, 3, &ad);
    let rebuilt = fresh().into_selected(ids.clone()).unwrap();
    assert_eq!((rebuilt.selection.as_ref(), rebuilt.head.weight.dims()), (Some(&ids), [ids.len(), 3]));
    assert!(!rebuilt.queries.is_require_grad());
    assert!(fresh().into_selected(vec![]).unwrap_err().contains("empty"));
    assert!(fresh().into_selected(vec![0, f]).unwrap_err().contains(&format!("feature index {f} is out of range")));
    let (_, b_losses) = steps(TrunkModel::new(backbone, QueryMethod::Vqt(b)), &x, &y, 20, 1e-2);
    assert!(b_losses.last() < b_losses.first(), "{b_losses:?}");
}
