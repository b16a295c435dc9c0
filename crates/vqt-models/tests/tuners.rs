//! Backbone tuners: identity inits, which tensors train, LoRA merge, composition with VQT and
//! SynQT, trainable-only files, and the parameter counts of the literature (methods.md §5.7).

use burn::module::{Module, Param};
use burn::nn::LinearConfig;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Tensor};
use vqt_core::HostTensor;
use vqt_models::query::{SynqtConfig, VqtConfig};
use vqt_models::tuners::adapter::{AdapterActivation, AdapterConfig, AdapterKind};
use vqt_models::tuners::adaptformer::AdaptFormerConfig;
use vqt_models::tuners::lora::LoraConfig;
use vqt_models::tuners::ssf::{Ssf, SsfConfig};
use vqt_models::tuners::vpt::VptConfig;
use vqt_models::tuners::{load_trainable, param_counts, save_trainable, tensor_infos, TunersConfig};
use vqt_models::{QueryMethod, TrunkBatch, TrunkInput, TrunkModel, Vit, VitPreset};

mod common;
use common::{images, targets, tiny, CLASSES};

fn lora() -> TunersConfig {
    TunersConfig { lora: Some(LoraConfig { rank: 2, alpha: Some(4.0), targets: vec!["q".into(), "v".into()] }), ..Default::default() }
}
fn adaptformer() -> TunersConfig {
    TunersConfig { adaptformer: Some(AdaptFormerConfig { bottleneck: 3, scale: 0.1, dropout: 0.0 }), ..Default::default() }
}
fn adapter(kind: AdapterKind) -> TunersConfig {
    TunersConfig { adapter: Some(AdapterConfig { kind, bottleneck: 3, activation: AdapterActivation::Gelu }), ..Default::default() }
}
fn ssf() -> TunersConfig {
    TunersConfig { ssf: Some(SsfConfig::default()), ..Default::default() }
}
fn vpt(deep: bool) -> TunersConfig {
    TunersConfig { vpt: Some(VptConfig { num_tokens: 2, deep, dropout: 0.0 }), ..Default::default() }
}
fn bitfit() -> TunersConfig {
    TunersConfig { bitfit: true, ..Default::default() }
}
fn full() -> TunersConfig {
    TunersConfig { full_finetune: true, ..Default::default() }
}

fn diff(a: HostTensor, b: &HostTensor) -> f32 {
    a.max_abs_diff(b).expect("same shapes")
}

fn same<const D: usize>(a: &Tensor<D>, b: &Tensor<D>) -> f32 {
    diff(HostTensor::from_tensor(a.clone()), &HostTensor::from_tensor(b.clone()))
}

/// Sets every SSF to the exact identity (its init is only near it).
fn ssf_identity(mut vit: Vit) -> Vit {
    let dev = vit.cls_token.device();
    let id = |s: &mut Option<Ssf>| {
        if let Some(x) = s.as_mut() {
            *x = Ssf::identity(x.gamma.dims()[0], &dev);
        }
    };
    id(&mut vit.ssf_patch);
    id(&mut vit.ssf_norm);
    for b in vit.blocks.iter_mut() {
        id(&mut b.ssf_norm1);
        id(&mut b.ssf_norm2);
        id(&mut b.attn.ssf_qkv);
        id(&mut b.attn.ssf_proj);
        id(&mut b.mlp.ssf_fc1);
        id(&mut b.mlp.ssf_fc2);
    }
    vit
}

#[test]
fn identity_inits_leave_every_backbone_output_unchanged() {
    let plain = Device::flex();
    plain.seed(1);
    let vit = tiny().init(&plain);
    let x = images(&plain, 2, 2);
    let plain_trace = vit.forward_trace(x.clone());
    let plain_kv = vit.forward_kv(x.clone());
    for (name, cfg) in [
        ("lora", lora()),
        ("adaptformer", adaptformer()),
        ("houlsby", adapter(AdapterKind::Houlsby)),
        ("pfeiffer", adapter(AdapterKind::Pfeiffer)),
        ("ssf", ssf()),
        ("all", TunersConfig { ssf: Some(SsfConfig::default()), ..lora() }),
    ] {
        let cfg = TunersConfig { adaptformer: if name == "all" { adaptformer().adaptformer } else { cfg.adaptformer.clone() }, ..cfg };
        let tuned = ssf_identity(cfg.inject(vit.clone()).unwrap());
        assert!(tuned.has_tuner_modules(), "{name}");
        let t = tuned.forward_trace(x.clone());
        for (i, (a, b)) in plain_trace.blocks.iter().zip(&t.blocks).enumerate() {
            assert_eq!(same(a, b), 0.0, "{name}: block {i} changed at init");
        }
        let kv = tuned.forward_kv(x.clone());
        for ((ka, va), (kb, vb)) in plain_kv.kv.iter().zip(&kv.kv) {
            assert_eq!(same(ka, kb), 0.0, "{name}: K");
            assert_eq!(same(va, vb), 0.0, "{name}: V");
        }
    }
    // SSF's own init is near, not at, the identity; VPT prompts change the tokens by design.
    assert!(same(&plain_trace.blocks[2], &ssf().inject(vit.clone()).unwrap().forward_trace(x.clone()).blocks[2]) > 0.0);
    let v = vpt(true).inject(vit.clone()).unwrap().forward_trace(x);
    assert_eq!(v.blocks[0].dims()[1], vit.num_tokens() + 2, "prompts are extra trunk tokens");
}

/// Trainable paths of a model on the autodiff device, and the paths that got a gradient.
fn trained_paths(model: TrunkModel, x: Tensor<4>) -> (Vec<String>, Vec<String>) {
    let ad = Device::flex().autodiff();
    let model = model.fork(&ad);
    let trainable: Vec<String> = tensor_infos(&model).into_iter().filter(|i| i.trainable).map(|i| i.path).collect();
    let out = model.forward_classification(TrunkBatch { input: TrunkInput::Images(x), targets: targets(4, &ad), rng_seed: None });
    let grads = out.loss.backward();
    let with_grad: Vec<String> = vqt_models::tuners::named_grads(&model, &grads).into_keys().collect();
    (trainable, with_grad)
}

/// The trainable tensors and the tensors that got a gradient are the same paths.
fn assert_same_set(trainable: &[String], with_grad: &[String]) {
    let a: std::collections::BTreeSet<&String> = trainable.iter().collect();
    let b: std::collections::BTreeSet<&String> = with_grad.iter().collect();
    assert_eq!(a, b, "trainable tensors (left) vs tensors with a gradient (right)");
    assert_eq!(a.len(), trainable.len(), "duplicate paths");
}

#[test]
fn exactly_the_intended_tensors_train() {
    let plain = Device::flex();
    plain.seed(3);
    let vit = tiny().init(&plain);
    let head = || QueryMethod::Linear(LinearConfig::new(24, CLASSES).init(&plain));
    let x = images(&plain, 4, 4);
    type Rule = fn(&str) -> bool;
    let cases: Vec<(&str, TunersConfig, Rule, usize)> = vec![
        ("lora", lora(), |p| p.contains(".attn.lora.q.") || p.contains(".attn.lora.v."), 3 * 4),
        ("adaptformer", adaptformer(), |p| p.contains(".adaptformer."), 3 * 4),
        ("houlsby", adapter(AdapterKind::Houlsby), |p| p.contains(".adapter_attn.") || p.contains(".adapter_mlp."), 3 * 8),
        ("pfeiffer", adapter(AdapterKind::Pfeiffer), |p| p.contains(".adapter_mlp."), 3 * 4),
        ("ssf", ssf(), |p| p.contains("ssf_"), 3 * 12 + 4),
        ("vpt-deep", vpt(true), |p| p == "backbone.vpt.prompts", 1),
        ("vpt-shallow", vpt(false), |p| p == "backbone.vpt.prompts", 1),
        ("bitfit", bitfit(), |p| p.ends_with(".bias") || p.ends_with(".beta"), 3 * 6 + 2),
        ("full-ft", full(), |_| true, 3 * 14 + 6),
    ];
    for (name, cfg, rule, n_backbone) in cases {
        let model = TrunkModel::tuned(cfg.inject(vit.clone()).unwrap(), &cfg, head());
        assert!(model.full_path, "{name}");
        let (trainable, with_grad) = trained_paths(model, x.clone());
        let backbone: Vec<&String> = trainable.iter().filter(|p| p.starts_with("backbone.")).collect();
        assert_eq!(backbone.len(), n_backbone, "{name}: trainable backbone tensors {backbone:?}");
        for p in &backbone {
            assert!(rule(p), "{name}: `{p}` trains but should not");
        }
        assert!(trainable.contains(&"method.weight".to_string()) && trainable.contains(&"method.bias".to_string()), "{name}: head");
        // Every trainable tensor gets a gradient and nothing else does (the same set of paths,
        // not just as many).
        assert_same_set(&trainable, &with_grad);
    }
}

#[test]
fn training_a_tuner_leaves_the_frozen_backbone_bit_identical() {
    let plain = Device::flex();
    let ad = plain.clone().autodiff();
    plain.seed(5);
    let vit = tiny().init(&plain);
    let before: Vec<HostTensor> = vit.blocks.iter().map(|b| HostTensor::from_tensor(b.attn.qkv.weight.val())).collect();
    let cfg = TunersConfig { adaptformer: adaptformer().adaptformer, ..lora() };
    let mut model = TrunkModel::tuned(cfg.inject(vit).unwrap(), &cfg, QueryMethod::Linear(LinearConfig::new(24, CLASSES).init(&plain))).fork(&ad);
    let mut optim = AdamConfig::new().init();
    let mut losses = Vec::new();
    for step in 0..4 {
        let out = model.forward_classification(TrunkBatch { input: TrunkInput::Images(images(&plain, 4, 6 + step)), targets: targets(4, &ad), rng_seed: None });
        losses.push(out.loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(out.loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    for (b, w) in model.backbone.blocks.iter().zip(&before) {
        assert!(&HostTensor::from_tensor(b.attn.qkv.weight.val()) == w, "a frozen weight changed");
        let up = HostTensor::from_tensor(b.adaptformer.as_ref().unwrap().up.weight.val());
        assert!(up.data.iter().any(|v| *v != 0.0), "the adapter did not train");
        let lb = HostTensor::from_tensor(b.attn.lora.as_ref().unwrap().q.as_ref().unwrap().b.val());
        assert!(lb.data.iter().any(|v| *v != 0.0), "LoRA B did not train");
    }
}

#[test]
fn lora_merges_into_plain_weights_with_the_same_outputs() {
    let plain = Device::flex();
    plain.seed(7);
    let cfg = TunersConfig { lora: Some(LoraConfig { rank: 3, alpha: Some(6.0), targets: vec!["q".into(), "k".into(), "v".into()] }), ..Default::default() };
    let base = tiny().init(&plain);
    vqt_models::materialize(&base); // clones of lazy parameters would draw their own values
    let mut vit = cfg.inject(base.clone()).unwrap();
    for b in vit.blocks.iter_mut() {
        let l = b.attn.lora.as_mut().unwrap();
        for p in [&mut l.q, &mut l.k, &mut l.v] {
            let pair = p.as_mut().unwrap();
            pair.b = Param::from_tensor(Tensor::random([3, 24], Distribution::Normal(0.0, 0.3), &plain));
        }
    }
    let x = images(&plain, 3, 8);
    // On plain tensors (inference) each call adds the update to the weight; on the autodiff
    // context LoRA runs as its own two products: the same outputs.
    let unmerged = vit.forward_trace(x.clone());
    let ad = plain.clone().autodiff();
    let on_tape = vit.clone().fork(&ad).forward_trace(x.clone().autodiff());
    assert!(on_tape.cls.is_autodiff());
    for (a, b) in unmerged.blocks.iter().zip(&on_tape.blocks) {
        let d = same(a, &b.clone().without_autodiff());
        assert!(d <= 1e-5, "the inference fold differs from LoRA's own products by {d}");
    }
    let merged = vit.merge_lora();
    assert!(!merged.has_tuner_modules());
    let after = merged.forward_trace(x);
    for (a, b) in unmerged.blocks.iter().zip(&after.blocks) {
        let d = same(a, b);
        assert!(d <= 1e-5, "merged output differs by {d}");
    }
    // The non-zero LoRA pairs really change the outputs of this same backbone (so the equality
    // above is a test of the merge, not of two identity maps).
    assert!(same(&unmerged.blocks[2], &base.forward_trace(images(&plain, 3, 8)).blocks[2]) > 1e-3);
}

#[test]
fn query_methods_compose_with_tuners_and_train_jointly() {
    let plain = Device::flex();
    let ad = plain.clone().autodiff();
    plain.seed(9);
    let vit = tiny().init(&plain);
    let x = images(&plain, 4, 10);
    let vqt = VqtConfig { num_queries: 2, query_dropout: 0.0 }.init(3, 24, 4, CLASSES, &plain);
    // Identity-initialised tuners: VQT on the tuned backbone equals VQT on the plain one.
    let cfg = TunersConfig { adapter: adapter(AdapterKind::Houlsby).adapter, ..adaptformer() };
    let plain_model = TrunkModel::new(vit.clone(), QueryMethod::Vqt(vqt.clone()));
    let tuned = TrunkModel::tuned(cfg.inject(vit.clone()).unwrap(), &cfg, QueryMethod::Vqt(vqt));
    let (a, b) = (plain_model.forward(TrunkInput::Images(x.clone())), tuned.forward(TrunkInput::Images(x.clone())));
    // Not bit-identical only because the tuned model runs on the autodiff context, where GELU is
    // composed from erf for exact gradients (ops.rs) instead of the fused kernel.
    let d = same(&a, &b);
    assert!(d <= 1e-5, "identity tuners changed VQT's logits by {d}");
    // Joint training: queries, VQT head and adapters all get gradients; the trunk is on the tape.
    let (trainable, with_grad) = trained_paths(tuned, x.clone());
    assert!(trainable.iter().any(|p| p == "method.queries") && trainable.iter().any(|p| p.contains("adaptformer")));
    assert_same_set(&trainable, &with_grad);
    // SynQT on LoRA-tuned blocks, too.
    let cfg = lora();
    let synqt = SynqtConfig { num_tokens: 2, feat_scale: 0.1, attn_scale: 1.0, ffn_scale: 0.1, dropout: 0.0, head_drop_path: 0.0, kem_drop_path: 0.0 };
    let method = QueryMethod::Synqt(synqt.init(&vit, CLASSES, &ad));
    let (trainable, with_grad) = trained_paths(TrunkModel::tuned(cfg.inject(vit.clone()).unwrap(), &cfg, method), x);
    assert!(trainable.iter().any(|p| p.contains("lora")));
    assert_same_set(&trainable, &with_grad);
}

#[test]
fn trainable_parameters_save_and_load_alone() {
    let plain = Device::flex();
    let ad = plain.clone().autodiff();
    plain.seed(11);
    let cfg = TunersConfig { adaptformer: adaptformer().adaptformer, ..lora() };
    let base = tiny().init(&plain);
    let build = |seed: u64| {
        plain.seed(seed);
        let vqt = VqtConfig { num_queries: 1, query_dropout: 0.0 }.init(3, 24, 4, CLASSES, &plain);
        TrunkModel::tuned(cfg.inject(base.clone()).unwrap(), &cfg, QueryMethod::Vqt(vqt)).fork(&ad)
    };
    let mut model = build(12);
    let mut optim = AdamConfig::new().init();
    for step in 0..2 {
        let out = model.forward_classification(TrunkBatch { input: TrunkInput::Images(images(&plain, 4, 20 + step)), targets: targets(4, &ad), rng_seed: None });
        let grads = GradientsParams::from_grads(out.loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    let dir = vqt_core::testing::TestDir::new("trainable");
    let path = dir.join("trainable.safetensors");
    let names = save_trainable(&model, &path).unwrap();
    assert!(names.contains(&"backbone.blocks.0.attn.lora.q.a".to_string()), "{names:?}");
    assert!(names.contains(&"backbone.blocks.2.adaptformer.up.weight".to_string()), "{names:?}");
    assert!(names.contains(&"method.queries".to_string()) && names.contains(&"method.head.weight".to_string()));
    assert!(!names.iter().any(|n| n.ends_with("qkv.weight")), "frozen weights were saved");
    let (trainable, total) = param_counts(&model);
    let size = std::fs::metadata(&path).unwrap().len() as usize;
    assert!(size < trainable * 4 + 8192 && trainable < total / 2, "{size} bytes for {trainable} of {total} params");

    let fresh = build(99);
    let x = images(&plain, 3, 30);
    let want = HostTensor::from_tensor(model.forward(TrunkInput::Images(x.clone())));
    assert!(diff(HostTensor::from_tensor(fresh.forward(TrunkInput::Images(x.clone()))), &want) > 1e-4);
    let loaded = load_trainable(fresh, &path).unwrap();
    assert_eq!(diff(HostTensor::from_tensor(loaded.forward(TrunkInput::Images(x))), &want), 0.0);
    // Parameter ids come back too (the optimizer state of a resumed run is keyed by them), and
    // the loaded tensors still train.
    let (QueryMethod::Vqt(a), QueryMethod::Vqt(b)) = (&model.method, &loaded.method) else { unreachable!() };
    assert_eq!(a.queries.id, b.queries.id);
    assert_eq!(param_counts(&loaded), (trainable, total));

    // A file that does not fit the model: one line naming the file and the tensor.
    let other = TunersConfig::default();
    let vqt = VqtConfig { num_queries: 1, query_dropout: 0.0 }.init(3, 24, 4, CLASSES, &plain);
    let plain_model = TrunkModel::tuned(other.inject(tiny().init(&plain)).unwrap(), &other, QueryMethod::Vqt(vqt));
    let e = load_trainable(plain_model, &path).unwrap_err().to_string();
    assert!(e.contains("trainable.safetensors") && e.contains("backbone.blocks.0.attn.lora.q.a") && !e.contains('\n'), "{e}");
    let e = load_trainable(build(1), &dir.join("missing.safetensors")).unwrap_err().to_string();
    assert!(e.contains("missing.safetensors"), "{e}");
}

#[test]
fn parameter_counts_match_the_literature_for_vit_b16() {
    // methods.md §5.7 (V-PETL's table): head excluded.
    let ad = Device::flex().autodiff();
    let vit = VitPreset::BasePatch16.config().init(&Device::flex());
    let count = |cfg: TunersConfig| {
        let tuned = cfg.inject(vit.clone()).unwrap().train().fork(&ad);
        param_counts(&tuned).0
    };
    assert_eq!(count(bitfit()), 102_912);
    assert_eq!(count(ssf()), 205_824);
    assert_eq!(count(TunersConfig { adaptformer: Some(AdaptFormerConfig { bottleneck: 8, scale: 0.1, dropout: 0.1 }), ..Default::default() }), 156_768);
    assert_eq!(count(TunersConfig { adaptformer: Some(AdaptFormerConfig { bottleneck: 64, scale: 0.1, dropout: 0.1 }), ..Default::default() }), 1_189_632);
    assert_eq!(count(TunersConfig { lora: Some(LoraConfig { rank: 8, alpha: None, targets: vec!["q".into(), "v".into()] }), ..Default::default() }), 294_912);
    let ad_cfg = |kind, b| TunersConfig { adapter: Some(AdapterConfig { kind, bottleneck: b, activation: AdapterActivation::Gelu }), ..Default::default() };
    assert_eq!(count(ad_cfg(AdapterKind::Houlsby, 8)), 313_536);
    assert_eq!(count(ad_cfg(AdapterKind::Pfeiffer, 96)), 1_779_840);
    assert_eq!(count(TunersConfig { vpt: Some(VptConfig { num_tokens: 10, deep: true, dropout: 0.0 }), ..Default::default() }), 12 * 768 * 10);
    assert_eq!(count(TunersConfig { vpt: Some(VptConfig { num_tokens: 10, deep: false, dropout: 0.0 }), ..Default::default() }), 768 * 10);
    let (full_trainable, total) = param_counts(&full().inject(vit.clone()).unwrap().train());
    assert_eq!(full_trainable, total);
    assert_eq!(count(TunersConfig::default()), 0);
}

#[test]
fn bad_tuner_configs_are_one_line_errors() {
    let vit = tiny().init(&Device::flex());
    let bad = [
        (TunersConfig { lora: Some(LoraConfig { rank: 0, alpha: None, targets: vec!["q".into()] }), ..Default::default() }, "tuners.lora.rank"),
        (TunersConfig { lora: Some(LoraConfig { rank: 2, alpha: None, targets: vec!["o".into()] }), ..Default::default() }, "tuners.lora.targets: `o`"),
        (TunersConfig { full_finetune: true, ..lora() }, "tuners.full_finetune"),
        (TunersConfig { adaptformer: Some(AdaptFormerConfig { bottleneck: 0, scale: 0.1, dropout: 0.0 }), ..Default::default() }, "tuners.adaptformer.bottleneck"),
        (TunersConfig { vpt: Some(VptConfig { num_tokens: 0, deep: true, dropout: 0.0 }), ..Default::default() }, "tuners.vpt.num_tokens"),
    ];
    for (cfg, want) in bad {
        let e = cfg.inject(vit.clone()).unwrap_err();
        assert!(e.contains(want) && !e.contains('\n'), "{e}");
    }
}
