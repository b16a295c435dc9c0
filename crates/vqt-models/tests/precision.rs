//! Reduced precision (`--precision bf16|f16`): a device configured for bf16 builds, trains and
//! reloads a VQT model whose trainable tensors are bf16 end to end, and trainable files of
//! another precision load by casting. Its own test binary: the dtype is set once per device
//! and process, before any tensor exists.

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{DType, Device, FloatDType};
use vqt_core::HostTensor;
use vqt_models::query::VqtConfig;
use vqt_models::tuners::{load_trainable, save_trainable, TunersConfig};
use vqt_models::{QueryMethod, TrunkBatch, TrunkInput, TrunkModel};
mod common;
use common::{images, targets, tiny, CLASSES};

#[test]
fn bf16_models_train_save_and_reload() {
    let mut plain = Device::flex();
    plain.configure(FloatDType::BF16).expect("flex supports bf16");
    let ad = plain.clone().autodiff();
    let cfg = TunersConfig::default();
    plain.seed(2);
    let base = tiny().init(&plain).freeze();
    let build = |seed: u64| {
        plain.seed(seed);
        let base = base.clone();
        let vqt = VqtConfig { num_queries: 2, query_dropout: 0.0 }.init(3, 24, 4, CLASSES, &ad);
        TrunkModel::tuned(base, &cfg, QueryMethod::Vqt(vqt)).fork(&ad)
    };
    let mut model = build(3);
    let QueryMethod::Vqt(v) = &model.method else { unreachable!() };
    assert_eq!(v.queries.val().dtype(), DType::BF16);
    let mut optim = AdamConfig::new().with_epsilon(1e-8).init();
    let mut losses = Vec::new();
    for step in 0..6 {
        let out = model.forward_classification(TrunkBatch { input: TrunkInput::Images(images(&plain, 8, 40)), targets: targets(8, &ad), rng_seed: None });
        losses.push(out.loss.clone().into_scalar::<f32>());
        assert_eq!(out.loss.dtype(), DType::BF16, "step {step}");
        let grads = GradientsParams::from_grads(out.loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    assert!(losses.iter().all(|l| l.is_finite()) && losses[5] < losses[0], "bf16 training does not fit one batch: {losses:?}");

    let dir = vqt_core::testing::TestDir::new("precision");
    let path = dir.join("trainable.safetensors");
    save_trainable(&model, &path).unwrap();
    let x = images(&plain, 3, 50);
    let want = HostTensor::from_tensor(model.forward(TrunkInput::Images(x.clone())));
    let loaded = load_trainable(build(9), &path).unwrap();
    let got = HostTensor::from_tensor(loaded.forward(TrunkInput::Images(x.clone())));
    assert_eq!(got.max_abs_diff(&want).unwrap(), 0.0, "a bf16 round trip changes the outputs");

    // The same tensors as an f32 file (what an f32 run writes) load into the bf16 model, cast.
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let widened: Vec<(String, Vec<u8>, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::BF16, "{name}");
            let data = view.data().chunks_exact(2).flat_map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32().to_le_bytes()).collect();
            (name, data, view.shape().to_vec())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = widened
        .iter()
        .map(|(n, d, s)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap()))
        .collect();
    let f32_path = dir.join("trainable-f32.safetensors");
    std::fs::write(&f32_path, safetensors::serialize(views, meta.metadata().clone()).unwrap()).unwrap();
    let cast = load_trainable(build(10), &f32_path).unwrap();
    let QueryMethod::Vqt(v) = &cast.method else { unreachable!() };
    assert_eq!(v.queries.val().dtype(), DType::BF16);
    let got = HostTensor::from_tensor(cast.forward(TrunkInput::Images(x)));
    assert_eq!(got.max_abs_diff(&want).unwrap(), 0.0, "bf16 -> f32 -> bf16 is exact");
}
