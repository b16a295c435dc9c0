//! Tuners on chosen blocks (`tuners.layers`): which tensors train, and the frozen prefix run
//! off the autodiff tape with the outputs and gradients of the whole pass on it.

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use std::collections::BTreeMap;
use vqt_core::HostTensor;
use vqt_models::query::VqtConfig;
use vqt_models::tuners::adapter::{AdapterActivation, AdapterConfig, AdapterKind};
use vqt_models::tuners::adaptformer::AdaptFormerConfig;
use vqt_models::tuners::lora::LoraConfig;
use vqt_models::tuners::ssf::SsfConfig;
use vqt_models::tuners::vpt::VptConfig;
use vqt_models::tuners::{tensor_infos, Layers, TunersConfig};
use vqt_models::vit::TrunkNoise;
use vqt_models::{MethodSpec, ModelSpec, TrunkBatch, TrunkInput, TrunkModel};

mod common;
use common::{images, targets, tiny, CLASSES};

fn on(layers: Layers, t: TunersConfig) -> TunersConfig {
    TunersConfig { layers: Some(layers), ..t }
}

fn kinds() -> Vec<(&'static str, TunersConfig)> {
    let d = TunersConfig::default;
    vec![
        ("lora", TunersConfig { lora: Some(LoraConfig { rank: 2, alpha: Some(4.0), targets: vec!["q".into(), "v".into()] }), ..d() }),
        ("adaptformer", TunersConfig { adaptformer: Some(AdaptFormerConfig { bottleneck: 3, scale: 0.1, dropout: 0.0 }), ..d() }),
        ("houlsby", TunersConfig { adapter: Some(AdapterConfig { kind: AdapterKind::Houlsby, bottleneck: 3, activation: AdapterActivation::Gelu }), ..d() }),
        ("pfeiffer", TunersConfig { adapter: Some(AdapterConfig { kind: AdapterKind::Pfeiffer, bottleneck: 3, activation: AdapterActivation::Gelu }), ..d() }),
        ("ssf", TunersConfig { ssf: Some(SsfConfig::default()), ..d() }),
        ("vpt-deep", TunersConfig { vpt: Some(VptConfig { num_tokens: 2, deep: true, dropout: 0.0 }), ..d() }),
        ("vpt-shallow", TunersConfig { vpt: Some(VptConfig { num_tokens: 2, deep: false, dropout: 0.0 }), ..d() }),
        ("bitfit", TunersConfig { bitfit: true, ..d() }),
        ("full-ft", TunersConfig { full_finetune: true, ..d() }),
    ]
}

#[test]
fn layers_resolve_and_bad_values_are_one_line_errors() {
    assert_eq!(Layers::List(vec![11, 8, 9, 10]).resolve(12).unwrap(), [8, 9, 10, 11]);
    assert_eq!(Layers::Spec("last:4".into()).resolve(12).unwrap(), [8, 9, 10, 11]);
    assert_eq!(Layers::Spec("last:12".into()).resolve(12).unwrap(), (0..12).collect::<Vec<_>>());
    assert_eq!(Layers::Spec("last:4".into()).label(), "last4");
    assert_eq!(Layers::List(vec![10, 8, 9, 11]).label(), "8-11");
    assert_eq!(Layers::List(vec![2, 7]).label(), "2,7");
    for (bad, needle) in [
        (Layers::List(vec![]), "lists no block"),
        (Layers::List(vec![3, 3]), "twice"),
        (Layers::List(vec![12]), "block 12 does not exist"),
        (Layers::Spec("last:0".into()), "1..=12"),
        (Layers::Spec("last:13".into()), "1..=12"),
        (Layers::Spec("first:2".into()), "expected a list of block indices or \"last:K\""),
    ] {
        let e = bad.resolve(12).unwrap_err();
        assert!(e.contains("tuners.layers") && e.contains(needle), "{bad:?}: {e}");
    }
    // Both forms parse from a config; layers without a tuner is refused.
    let t: TunersConfig = serde_json::from_str(r#"{"adaptformer": {"bottleneck": 8}, "layers": "last:2"}"#).unwrap();
    assert_eq!(t.tuned_blocks(12).unwrap(), [10, 11]);
    assert_eq!(t.frozen_prefix(12), 10);
    let t: TunersConfig = serde_json::from_str(r#"{"lora": {"rank": 4}, "layers": [0, 5]}"#).unwrap();
    assert_eq!((t.tuned_blocks(12).unwrap(), t.frozen_prefix(12)), (vec![0, 5], 0));
    let e = TunersConfig { layers: Some(Layers::Spec("last:2".into())), ..Default::default() }.validate().unwrap_err();
    assert!(e.contains("tuners.layers") && e.contains("no tuner"), "{e}");
    // The name says which blocks.
    let spec = ModelSpec { method: MethodSpec::Linear, tuners: on(Layers::Spec("last:4".into()), kinds()[1].1.clone()) };
    assert_eq!(spec.name(), "adaptformer@last4");
    // Without layers nothing changes.
    assert_eq!(kinds()[0].1.frozen_prefix(12), 0);
    assert!(serde_json::to_value(&kinds()[0].1).unwrap().get("layers").is_none(), "absent layers are not serialised (run identities stay)");
}

#[test]
fn tuners_go_only_into_the_listed_blocks() {
    let plain = Device::flex();
    plain.seed(3);
    let vit = tiny().init(&plain);
    let ad = plain.clone().autodiff();
    let x = images(&plain, 4, 4);
    // tiny(): depth 3; blocks 1 and 2 tuned, so the last block is in and block 0 and the patch
    // embedding are not. Expected trainable backbone tensors per kind.
    let expected: BTreeMap<&str, usize> =
        [("lora", 2 * 4), ("adaptformer", 2 * 4), ("houlsby", 2 * 8), ("pfeiffer", 2 * 4), ("ssf", 2 * 12 + 2), ("vpt-deep", 1), ("vpt-shallow", 1), ("bitfit", 2 * 6 + 1), ("full-ft", 2 * 14 + 2)]
            .into();
    for (name, t) in kinds() {
        let t = on(Layers::List(vec![1, 2]), t);
        let model = ModelSpec { method: MethodSpec::Linear, tuners: t.clone() }.build(vit.clone(), CLASSES).unwrap().fork(&ad);
        assert_eq!(model.frozen_prefix, 1, "{name}");
        let trainable: Vec<String> = tensor_infos(&model).into_iter().filter(|i| i.trainable && i.path.starts_with("backbone.")).map(|i| i.path).collect();
        assert_eq!(trainable.len(), expected[name], "{name}: {trainable:?}");
        for p in &trainable {
            let ok = p.starts_with("backbone.blocks.1.") || p.starts_with("backbone.blocks.2.") || p.starts_with("backbone.norm.") || p.starts_with("backbone.ssf_norm.") || p == "backbone.vpt.prompts";
            assert!(ok, "{name}: `{p}` trains but is outside blocks 1-2");
        }
        // Every trainable tensor gets a gradient, nothing else does.
        let out = model.forward_classification(TrunkBatch { input: TrunkInput::Images(x.clone()), targets: targets(4, &ad), rng_seed: None });
        let grads = out.loss.backward();
        let with_grad: Vec<String> = vqt_models::tuners::named_grads(&model, &grads).into_keys().filter(|p| p.starts_with("backbone.")).collect();
        let mut sorted = trainable.clone();
        sorted.sort();
        assert_eq!(sorted, with_grad, "{name}: trainable vs with a gradient");
    }
    // VPT: deep puts a set before each listed block, shallow one before the lowest; the tokens
    // of the untuned prefix are the plain backbone's.
    let deep = on(Layers::List(vec![1, 2]), kinds()[5].1.clone()).inject(vit.clone()).unwrap();
    assert_eq!(deep.vpt.as_ref().unwrap().prompts.dims(), [2, 2, 24]);
    let trace = deep.forward_trace(x.clone());
    let base = vit.forward_trace(x.clone());
    assert_eq!(trace.blocks[0].dims()[1], vit.num_tokens(), "no prompts before block 1");
    assert_eq!(HostTensor::from_tensor(trace.blocks[0].clone()).max_abs_diff(&HostTensor::from_tensor(base.blocks[0].clone())).unwrap(), 0.0);
    assert_eq!(trace.blocks[1].dims()[1], vit.num_tokens() + 2, "prompts from block 1 on");
    let shallow = on(Layers::List(vec![2]), kinds()[6].1.clone()).inject(vit.clone()).unwrap();
    assert_eq!(shallow.vpt.as_ref().unwrap().prompts.dims(), [1, 2, 24]);
    assert_eq!(shallow.forward_trace(x).blocks[1].dims()[1], vit.num_tokens());
}

/// K/V, class token, logits and every gradient of `model` with the prefix split off the tape,
/// and the same with the whole pass on it.
fn both_ways(model: &TrunkModel, x: &Tensor<4>) -> [(BTreeMap<String, HostTensor>, Vec<bool>); 2] {
    [model.frozen_prefix, 0].map(|prefix| {
        let trunk = model.backbone.forward_kv_split(x.clone(), TrunkNoise::default(), prefix);
        let on_tape: Vec<bool> = trunk.kv.iter().map(|(k, v)| k.is_autodiff() && v.is_autodiff()).collect();
        let mut out = BTreeMap::new();
        for (m, (k, v)) in trunk.kv.iter().enumerate() {
            out.insert(format!("k{m}"), HostTensor::from_tensor(k.clone()));
            out.insert(format!("v{m}"), HostTensor::from_tensor(v.clone()));
        }
        out.insert("cls".into(), HostTensor::from_tensor(trunk.cls.clone()));
        let logits = model.method.forward(&model.backbone, &trunk);
        out.insert("logits".into(), HostTensor::from_tensor(logits.clone()));
        let device = logits.device();
        let loss = burn::nn::loss::CrossEntropyLossConfig::new().init(&device).forward(logits, targets(x.dims()[0], &device));
        for (p, g) in vqt_models::tuners::named_grads(model, &loss.backward()) {
            out.insert(format!("grad.{p}"), g);
        }
        (out, on_tape)
    })
}

#[test]
fn the_frozen_prefix_runs_off_the_tape_with_the_same_outputs_and_gradients() {
    let plain = Device::flex();
    plain.seed(5);
    let vit = tiny().init(&plain);
    let ad = plain.clone().autodiff();
    let x = images(&plain, 4, 6);
    let vqt = MethodSpec::Vqt(VqtConfig { num_queries: 2, query_dropout: 0.0 });
    for (name, t) in kinds() {
        for method in [MethodSpec::Linear, vqt.clone()] {
            let spec = ModelSpec { method: method.clone(), tuners: on(Layers::Spec("last:2".into()), t.clone()) };
            let mut model = spec.build(vit.clone(), CLASSES).unwrap().fork(&ad);
            // The tuners start at (or near) the identity; move them so the check sees them.
            model = model.map(&mut Nudge(0));
            let [(split, split_tape), (whole, whole_tape)] = both_ways(&model, &x);
            let what = format!("{} on {name}", method.kind());
            assert_eq!(split_tape, [false, true, true], "{what}: block 0 runs off the tape, the tuned blocks on it");
            assert_eq!(whole_tape, [true, true, true], "{what}: the reference runs every block on the tape");
            assert_eq!(split.keys().collect::<Vec<_>>(), whole.keys().collect::<Vec<_>>(), "{what}: the same tensors get gradients");
            assert!(split.keys().any(|k| k.starts_with("grad.backbone.")), "{what}: the tuners get gradients");
            for (k, a) in &split {
                let d = a.max_abs_diff(&whole[k]).unwrap();
                assert!(d < 1e-4, "{what}: `{k}` differs by {d}");
            }
            // Training takes the split path.
            assert!(!model.trunk(TrunkInput::Images(x.clone())).kv[0].0.is_autodiff(), "{what}: the training trunk splits");
        }
    }
}

/// Adds a small deterministic offset to every float parameter that requires a gradient (the
/// tuners' zero-initialised up-projections would otherwise hide their effect).
struct Nudge(usize);

impl burn::module::ModuleMapper for Nudge {
    fn map_float<const D: usize>(&mut self, param: burn::module::Param<Tensor<D>>) -> burn::module::Param<Tensor<D>> {
        let (id, t, mapper) = param.consume();
        if !t.is_require_grad() {
            return burn::module::Param::from_mapped_value(id, t, mapper);
        }
        self.0 += 1;
        let shape = t.shape();
        let n = shape.num_elements();
        let k = self.0;
        let vals: Vec<f32> = t.to_data().try_to_vec::<f32>().unwrap().iter().enumerate().map(|(i, v)| v + 0.05 * (((i * 7 + k * 3) % 11) as f32 / 11.0 - 0.5)).collect();
        assert_eq!(vals.len(), n);
        let device = t.device();
        let t = Tensor::<1>::from_floats(vals.as_slice(), &device).reshape(shape).require_grad();
        burn::module::Param::from_mapped_value(id, t, mapper)
    }
}

#[test]
fn a_model_without_layers_keeps_every_block_on_the_tape() {
    let plain = Device::flex();
    let vit = tiny().init(&plain);
    let ad = plain.clone().autodiff();
    let model = ModelSpec { method: MethodSpec::Linear, tuners: kinds()[1].1.clone() }.build(vit, CLASSES).unwrap().fork(&ad);
    assert_eq!(model.frozen_prefix, 0);
    assert!(model.trunk(TrunkInput::Images(images(&plain, 2, 1))).kv[0].0.is_autodiff());
}

#[test]
#[allow(deprecated)] // Device::ndarray: the split-parts route of the attention
fn vqt_inference_with_the_queries_riding_along_equals_the_trunk_path() {
    use vqt_models::QueryMethod;
    let vqt = MethodSpec::Vqt(VqtConfig { num_queries: 2, query_dropout: 0.1 });
    let mut all = vec![("no tuner", TunersConfig::default())];
    all.extend(kinds());
    for plain in [Device::flex(), Device::ndarray()] {
        plain.seed(5);
        let vit = tiny().init(&plain);
        let x = images(&plain, 3, 6);
        for (name, t) in &all {
            let spec = ModelSpec { method: vqt.clone(), tuners: t.clone() };
            // Trained-looking tuners, queries and head (the tuners start at the identity), in
            // eval: the plain model inference runs.
            let model = spec.build(vit.clone(), CLASSES).unwrap().fork(&plain.clone().autodiff()).map(&mut Nudge(0)).valid();
            let QueryMethod::Vqt(v) = &model.method else { unreachable!() };
            let riding = HostTensor::from_tensor(v.forward_images(&model.backbone, x.clone()));
            let apart = HostTensor::from_tensor(v.forward(&model.backbone, &model.backbone.forward_kv(x.clone())));
            let d = riding.max_abs_diff(&apart).unwrap();
            assert!(d < 1e-4, "{name} on {plain:?}: the queries riding along change the logits by {d}");
            // Inference takes that route.
            assert!(HostTensor::from_tensor(model.forward(TrunkInput::Images(x.clone()))) == riding, "{name}: TrunkModel::forward");
        }
    }
}
