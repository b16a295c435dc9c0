//! Invariants of the trunk path (VQT, SynQT, linear probe): the backbone is never changed and
//! never differentiated, and the feature cache changes nothing but time.

use burn::module::Module;
use burn::nn::LinearConfig;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use vqt_core::HostTensor;
use vqt_models::cache::{CacheDtype, CacheKind, FeatureCache};
use vqt_models::query::{SynqtConfig, VqtConfig};
use vqt_models::{QueryMethod, TrunkBatch, TrunkInput, TrunkModel, Vit};

mod common;
use common::{images, targets, tiny, CLASSES};

fn methods(vit: &Vit, device: &Device) -> Vec<QueryMethod> {
    vec![
        QueryMethod::Linear(LinearConfig::new(vit.embed_dim(), CLASSES).init(device)),
        QueryMethod::Vqt(VqtConfig { num_queries: 2, query_dropout: 0.0 }.init(vit.depth(), vit.embed_dim(), 4, CLASSES, device)),
        QueryMethod::Synqt(
            SynqtConfig { num_tokens: 2, feat_scale: 0.5, attn_scale: 0.5, ffn_scale: 0.5, dropout: 0.0, head_drop_path: 0.0, kem_drop_path: 0.0 }
                .init(vit, CLASSES, device),
        ),
    ]
}

fn backbone_snapshot(vit: &Vit) -> Vec<HostTensor> {
    let mut out = vec![HostTensor::from_tensor(vit.cls_token.val()), HostTensor::from_tensor(vit.pos_embed.val())];
    for b in &vit.blocks {
        out.push(HostTensor::from_tensor(b.attn.qkv.weight.val()));
        out.push(HostTensor::from_tensor(b.mlp.fc2.weight.val()));
        out.push(HostTensor::from_tensor(b.ls1.as_ref().unwrap().gamma.val()));
    }
    out
}

#[test]
fn no_backbone_parameter_receives_a_gradient_and_every_method_parameter_does() {
    let plain = Device::flex();
    let ad = plain.clone().autodiff();
    plain.seed(1);
    let vit = tiny().init(&plain);
    for method in methods(&vit, &ad) {
        let name = method.name();
        let n_method_tensors = {
            let mut count = 0;
            method.visit(&mut CountTensors(&mut count));
            count
        };
        let model = TrunkModel::new(tiny().init(&plain), method);
        let batch = TrunkBatch { input: TrunkInput::Images(images(&ad, 4, 2)), targets: targets(4, &ad), rng_seed: None };
        let out = model.forward_classification(batch);
        let mut grads = out.loss.backward();
        assert_eq!(GradientsParams::from_module(&mut grads, &model.backbone).len(), 0, "{name}: backbone got gradients");
        assert_eq!(GradientsParams::from_module(&mut grads, &model.method).len(), n_method_tensors, "{name}: some method tensor got no gradient");
        // The trunk never lands on the tape: its outputs are plain tensors.
        let trunk = model.trunk(TrunkInput::Images(images(&ad, 2, 3)));
        assert!(!trunk.cls.device().is_autodiff() && !trunk.kv[0].0.device().is_autodiff(), "{name}");
    }
}

struct CountTensors<'a>(&'a mut usize);
impl burn::module::ModuleVisitor for CountTensors<'_> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        if param.is_require_grad() {
            *self.0 += 1;
        }
    }
}

#[test]
fn training_leaves_the_backbone_and_its_outputs_bit_identical() {
    let plain = Device::flex();
    let ad = plain.clone().autodiff();
    plain.seed(4);
    let vit = tiny().init(&plain);
    let x = images(&plain, 3, 5);
    let before_params = backbone_snapshot(&vit);
    let before_trace = vit.forward_trace(x.clone());
    let vqt = VqtConfig { num_queries: 3, query_dropout: 0.1 }.init(vit.depth(), vit.embed_dim(), 4, CLASSES, &ad);
    let mut model = TrunkModel::new(vit, QueryMethod::Vqt(vqt));
    let mut optim = AdamConfig::new().init();
    for step in 0..3 {
        let batch = TrunkBatch { input: TrunkInput::Images(images(&ad, 4, 10 + step)), targets: targets(4, &ad), rng_seed: None };
        let out = model.forward_classification(batch);
        let grads = GradientsParams::from_grads(out.loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    for (a, b) in before_params.iter().zip(backbone_snapshot(&model.backbone)) {
        assert!(a == &b, "a backbone parameter changed");
    }
    let after = model.backbone.forward_trace(x.clone());
    for (a, b) in before_trace.blocks.iter().zip(&after.blocks) {
        assert!(HostTensor::from_tensor(a.clone()) == HostTensor::from_tensor(b.clone()), "block output changed");
    }
    // The trunk pass the queries read is the plain ViT, bit for bit.
    let kv = model.backbone.forward_kv(x);
    assert!(HostTensor::from_tensor(kv.cls) == HostTensor::from_tensor(before_trace.cls));
}

/// A fresh model with SynQT (`vqt = false`) or VQT on the query side, and its 8 images.
fn initial_model(vqt: bool) -> (TrunkModel, Tensor<4>) {
    let plain = Device::flex();
    let ad = plain.clone().autodiff();
    plain.seed(7);
    let vit = tiny().init(&plain);
    let data = images(&plain, 8, 8);
    let method = if vqt {
        QueryMethod::Vqt(VqtConfig { num_queries: 2, query_dropout: 0.0 }.init(vit.depth(), vit.embed_dim(), 4, CLASSES, &ad))
    } else {
        let synqt = SynqtConfig { num_tokens: 2, feat_scale: 0.1, attn_scale: 1.0, ffn_scale: 0.1, dropout: 0.0, head_drop_path: 0.0, kem_drop_path: 0.0 };
        QueryMethod::Synqt(synqt.init(&vit, CLASSES, &ad))
    };
    (TrunkModel::new(vit, method), data)
}

/// The loss of six training steps, from images or from a feature cache of `(kind, dtype)`
/// (memory-mapped from a file when `mapped`).
fn train_losses(mut model: TrunkModel, data: &Tensor<4>, cached: Option<(CacheKind, CacheDtype)>, mapped: bool) -> Vec<f32> {
    let plain = Device::flex();
    let ad = plain.clone().autodiff();
    let dir = vqt_core::testing::TestDir::new("train-cache");
    let cache = cached.map(|(kind, dtype)| {
        let batches = (0..4).map(|i| data.clone().narrow(0, 2 * i, 2)); // built in other batch sizes than used
        let c = FeatureCache::build(&model.backbone, batches, kind, dtype, |_| {});
        if !mapped {
            return c;
        }
        let path = dir.join(format!("{kind:?}-{dtype:?}.cache"));
        let key = serde_json::json!({"test": "train_losses"});
        c.save(&path, &key).unwrap();
        FeatureCache::open(&path, &key).unwrap()
    });
    let mut optim = AdamConfig::new().init();
    let mut losses = Vec::new();
    for epoch in 0..3 {
        for rows in [[0usize, 3, 5, 6], [1, 2, 4, 7]] {
            let rows: Vec<usize> = rows.iter().map(|r| (r + epoch) % 8).collect();
            let input = match &cache {
                Some(c) => TrunkInput::Cached(c.batch(&model.backbone, &rows, &ad)),
                None => {
                    let idx = Tensor::<1, Int>::from_data(TensorData::new(rows.iter().map(|&r| r as i64).collect::<Vec<_>>(), [4]), &plain);
                    TrunkInput::Images(data.clone().select(0, idx))
                }
            };
            let out = model.forward_classification(TrunkBatch { input, targets: targets(4, &ad), rng_seed: None });
            losses.push(out.loss.clone().into_scalar::<f32>());
            let grads = GradientsParams::from_grads(out.loss.backward(), &model);
            model = optim.step(5e-3, model, grads);
        }
    }
    losses
}

#[test]
fn cached_and_uncached_training_give_the_same_loss_curve() {
    for vqt in [false, true] {
        let name = if vqt { "vqt" } else { "synqt" };
        let (model, data) = initial_model(vqt);
        let direct = train_losses(model.clone(), &data, None, false);
        // Kv f32 and f16 (in RAM and mapped): the attention reads the cache in place (f16
        // widened as it reads); hidden: the batch is gathered and its keys and values recomputed.
        for (mode, mapped, tol) in [
            ((CacheKind::Kv, CacheDtype::F32), false, 1e-5),
            ((CacheKind::Kv, CacheDtype::F32), true, 1e-5),
            ((CacheKind::Hidden, CacheDtype::F32), false, 1e-5),
            ((CacheKind::Kv, CacheDtype::F16), false, 5e-3),
            ((CacheKind::Kv, CacheDtype::F16), true, 5e-3),
        ] {
            let cached = train_losses(model.clone(), &data, Some(mode), mapped);
            assert_eq!(cached.len(), direct.len());
            for (i, (a, b)) in direct.iter().zip(&cached).enumerate() {
                assert!((a - b).abs() <= tol, "{name} {mode:?} (mapped: {mapped}) step {i}: direct {a} vs cached {b}");
            }
        }
        // The curve moves: a cache that returned the same batch every time would not match this.
        assert!(direct.first() != direct.last(), "{name}");
    }
}

#[test]
fn cache_sizes_match_the_arithmetic() {
    let plain = Device::flex();
    let vit = tiny().init(&plain);
    let n_tok = vit.num_tokens();
    let kv = FeatureCache::build(&vit, [images(&plain, 5, 1)], CacheKind::Kv, CacheDtype::F32, |_| {});
    let hidden = FeatureCache::build(&vit, [images(&plain, 5, 1)], CacheKind::Hidden, CacheDtype::F16, |_| {});
    assert_eq!(kv.len(), 5);
    assert_eq!(kv.bytes(), 5 * (3 * 2 * n_tok * 24 + 24) * 4);
    assert_eq!(hidden.bytes(), 5 * (3 * n_tok * 24 + 24) * 2);
}

#[test]
fn a_trunk_pass_that_keeps_no_keys_and_values_gives_the_same_class_token() {
    use vqt_models::vit::TrunkNoise;
    let plain = Device::flex();
    plain.seed(5);
    let vit = tiny().init(&plain);
    let x = images(&plain, 3, 4);
    let noise = TrunkNoise { embed_dropout: 0.1, drop_path: 0.5 };
    for noise in [TrunkNoise::default(), noise] {
        plain.seed(9);
        let full = vit.trunk_pass(x.clone(), noise.clone(), 0, true);
        plain.seed(9);
        let bare = vit.trunk_pass(x.clone(), noise.clone(), 0, false);
        assert_eq!(full.kv.len(), vit.depth());
        assert!(bare.kv.is_empty(), "keys and values kept although not asked for");
        assert!(HostTensor::from_tensor(bare.cls) == HostTensor::from_tensor(full.cls), "the class token differs ({noise:?})");
    }
    // The linear probe's logits (its pass keeps none) equal the head on the full pass's token.
    let head = LinearConfig::new(vit.embed_dim(), CLASSES).init(&plain);
    let cls = vit.forward_kv(x.clone()).cls;
    let expected = HostTensor::from_tensor(vqt_models::ops::apply(&head, cls));
    let model = TrunkModel::new(vit, QueryMethod::Linear(head));
    assert!(HostTensor::from_tensor(model.forward(TrunkInput::Images(x))) == expected);
}

#[test]
fn faithful_trunk_noise_is_random_in_training_only_and_stays_off_the_tape() {
    use vqt_models::vit::TrunkNoise;
    let plain = Device::flex();
    let ad = plain.clone().autodiff();
    plain.seed(11);
    let vit = tiny().init(&plain);
    let x = images(&plain, 4, 12);
    let clean = vit.forward_kv(x.clone());
    let off = vit.forward_kv_noisy(x.clone(), TrunkNoise::default());
    assert!(HostTensor::from_tensor(off.cls) == HostTensor::from_tensor(clean.cls.clone()));
    let noise = TrunkNoise { embed_dropout: 0.1, drop_path: 0.5 };
    let a = vit.forward_kv_noisy(x.clone(), noise.clone());
    let b = vit.forward_kv_noisy(x.clone(), noise.clone());
    let (ha, hb) = (HostTensor::from_tensor(a.cls.clone()), HostTensor::from_tensor(b.cls));
    assert!(ha != hb, "two noisy trunk passes were identical");
    assert!(ha != HostTensor::from_tensor(clean.cls), "noise had no effect");
    assert!(!a.kv[2].0.device().is_autodiff());

    let vqt = VqtConfig { num_queries: 1, query_dropout: 0.0 }.init(vit.depth(), vit.embed_dim(), 4, CLASSES, &ad);
    let model = TrunkModel::new(vit, QueryMethod::Vqt(vqt)).with_noise(noise);
    let batch = || TrunkBatch { input: TrunkInput::Images(x.clone()), targets: targets(4, &ad), rng_seed: None };
    // Evaluation ignores the noise: deterministic.
    let e1 = model.forward_classification(batch()).loss.into_scalar::<f32>();
    let e2 = model.forward_classification(batch()).loss.into_scalar::<f32>();
    assert_eq!(e1, e2);
    // Training uses it, and the backbone still gets no gradient.
    let t = model.forward_training(batch());
    let mut grads = t.loss.backward();
    assert_eq!(GradientsParams::from_module(&mut grads, &model.backbone).len(), 0);
    assert_eq!(GradientsParams::from_module(&mut grads, &model.method).len(), 3);
}

#[test]
fn cache_file_round_trip_and_errors() {
    let plain = Device::flex();
    plain.seed(21);
    let vit = tiny().init(&plain);
    let data = images(&plain, 6, 22);
    let dir = vqt_core::testing::TestDir::new("cache");
    for (kind, dtype) in [(CacheKind::Kv, CacheDtype::F32), (CacheKind::Kv, CacheDtype::F16), (CacheKind::Hidden, CacheDtype::F16)] {
        let mem = FeatureCache::build(&vit, [data.clone()], kind, dtype, |_| {});
        let path = dir.join(format!("{kind:?}-{dtype:?}.cache"));
        let key = serde_json::json!({"checkpoint": "sha256:abc", "img_size": 16, "normalization": "imagenet"});
        mem.save(&path, &key).unwrap();
        assert!(!dir.join(format!("{kind:?}-{dtype:?}.cache.partial")).exists());
        let mapped = FeatureCache::open(&path, &key).unwrap();
        assert_eq!((mapped.len(), mapped.bytes(), mapped.kind(), mapped.dtype()), (6, mem.bytes(), kind, dtype));
        let rows = [5, 0, 3];
        let (a, b) = (mem.batch(&vit, &rows, &plain), mapped.batch(&vit, &rows, &plain));
        // A kv cache, f32 or f16, in RAM or mapped, is read in place on Flex: whole layers (as
        // stored) and the rows.
        let in_place = kind == CacheKind::Kv;
        for t in [&a, &b] {
            assert_eq!(t.rows(), in_place.then_some(&rows[..]));
            assert_eq!(t.kv[0].0.dims()[0], if in_place { 6 } else { 3 });
            let stored = if in_place && dtype == CacheDtype::F16 { burn::tensor::DType::F16 } else { burn::tensor::DType::F32 };
            assert_eq!(t.kv[0].0.dtype(), stored);
        }
        // Each layer's batch keys and values: the same from RAM and from the file, and (K/V
        // kind) those of a trunk pass over the same three images.
        let idx = Tensor::<1, Int>::from_data(TensorData::new(rows.iter().map(|&r| r as i64).collect::<Vec<_>>(), [3]), &plain);
        let direct = vit.forward_kv(data.clone().select(0, idx));
        assert!(HostTensor::from_tensor(a.cls.clone()) == HostTensor::from_tensor(b.cls.clone()));
        for m in 0..vit.depth() {
            let ((ka, va), (kb, vb)) = (a.layer(m), b.layer(m));
            assert_eq!(ka.dims()[0], 3);
            assert!(HostTensor::from_tensor(ka.clone()) == HostTensor::from_tensor(kb));
            assert!(HostTensor::from_tensor(va.clone()) == HostTensor::from_tensor(vb));
            if kind == CacheKind::Kv {
                let (kd, vd) = direct.kv[m].clone();
                // f16 storage rounds each value once (relative error at most 2^-11).
                let tol = if dtype == CacheDtype::F16 { 2e-3 } else { 1e-5 };
                let close = |x: Tensor<4>, y: Tensor<4>| (x - y).abs().max().into_scalar::<f32>() < tol;
                assert!(close(ka, kd) && close(va, vd), "layer {m}: cached keys/values differ from the trunk pass");
            }
        }
        // Another input: the message names the field that differs, in one line.
        let other = serde_json::json!({"checkpoint": "sha256:def", "img_size": 16, "normalization": "imagenet"});
        let e = FeatureCache::open(&path, &other).unwrap_err().to_string();
        assert!(e.contains("cache was built for another `checkpoint` (\"sha256:abc\"; this run: \"sha256:def\")") && !e.contains('\n'), "{e}");
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.join("cut.cache");
        std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
        let e = FeatureCache::open(&cut, &key).unwrap_err().to_string();
        assert!(e.contains("cut.cache: not a vqt-rs feature cache: truncated"), "{e}");
        // Zeros written over part of the payload (same length, valid header): the CRC catches it.
        let mut zeroed = bytes.clone();
        let n = zeroed.len();
        zeroed[n / 2..n - 8].fill(0);
        let z = dir.join("zeroed.cache");
        std::fs::write(&z, &zeroed).unwrap();
        let e = FeatureCache::open(&z, &key).unwrap_err().to_string();
        assert!(e.contains("zeroed.cache: not a vqt-rs feature cache: the payload does not match its CRC-32"), "{e}");
        // A file of the previous format is refused by its version, not misread.
        let mut old = bytes.clone();
        old[..10].copy_from_slice(b"VQTCACHE1\n");
        let o = dir.join("old.cache");
        std::fs::write(&o, &old).unwrap();
        let e = FeatureCache::open(&o, &key).unwrap_err().to_string();
        assert!(e.contains("format 1 (an older vqt-rs)"), "{e}");
    }
    let junk = dir.join("junk.cache");
    std::fs::write(&junk, b"hello world, not a cache").unwrap();
    assert!(FeatureCache::open(&junk, &serde_json::json!({})).unwrap_err().to_string().contains("bad magic"));
}

#[test]
fn vqt_training_streams_the_trunk_layer_by_layer_with_the_same_logits_and_gradients() {
    use vqt_models::vit::TrunkNoise;
    let plain = Device::flex();
    let ad = plain.clone().autodiff();
    plain.seed(3);
    let vit = tiny().init(&plain);
    let x = images(&plain, 3, 8);
    let w = images(&plain, 3, 9).reshape([3, 3 * 16 * 16]).narrow(1, 0, CLASSES);
    // One query (the gradient maps route of the attention at these shapes) and eight (K and V
    // kept for the backward: the maps would be larger).
    for q in [1, 8] {
        let vqt = VqtConfig { num_queries: q, query_dropout: 0.0 }.init(vit.depth(), vit.embed_dim(), 4, CLASSES, &ad);
        let model = TrunkModel::new(vit.clone(), QueryMethod::Vqt(vqt));
        let QueryMethod::Vqt(v) = &model.method else { unreachable!() };
        let run = |logits: Tensor<2>| {
            let grads = (logits.clone() * w.clone()).sum().backward();
            let g = |t: Tensor<2>| HostTensor::from_tensor(t.grad(&grads).expect("tracked"));
            let gq = HostTensor::from_tensor(v.queries.val().grad(&grads).expect("tracked"));
            (HostTensor::from_tensor(logits), gq, g(v.head.weight.val()))
        };
        let streamed = run(v.forward_streaming(&model.backbone, x.clone(), TrunkNoise::default()));
        let apart = run(v.forward(&model.backbone, &model.backbone.trunk_pass(x.clone(), TrunkNoise::default(), 0, true)));
        assert!(streamed == apart, "Q = {q}: streaming the trunk changed the logits or the gradients");
        // Training on the trunk path takes that route.
        assert!(run(model.forward(TrunkInput::Images(x.clone()))) == streamed, "Q = {q}: TrunkModel::forward");
    }
}
