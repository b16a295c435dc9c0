//! Memory and speed of one training step per method, each measured in its own process.
//!
//! `vqt-bench step` (one method, this process) builds the model, runs warm-up steps, then timed
//! steps (forward, backward, optimizer), and prints one JSON line. `vqt-bench memory` spawns one
//! `step` child per method, so process-lifetime peaks (VmHWM) never mix, and writes a JSON file
//! and a markdown table with ratios to full fine-tuning.

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::time::Instant;
use vqt_core::mem::proc_status_bytes;
use vqt_models::cache::{CacheDtype, CacheKind, FeatureCache};
use vqt_models::{Preset, PresetOn, TrunkBatch, TrunkInput, VitConfig};

/// What one `step` run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepReport {
    /// Method name.
    pub method: String,
    /// Backend name.
    pub backend: String,
    /// Backbone description.
    pub backbone: String,
    /// Input size.
    pub img_size: usize,
    /// Batch size.
    pub batch: usize,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// All parameters.
    pub total_params: usize,
    /// Median training-step time (ms), warm-up excluded.
    pub step_ms_median: f64,
    /// Training images per second at the median step time.
    pub train_images_per_s: f64,
    /// Resident memory after the model was built, the data generated and (for `vqt-cached`) the
    /// cache built, with freed heap memory returned first (bytes, CPU backends).
    pub rss_baseline_bytes: Option<u64>,
    /// Peak resident memory of the training steps (VmHWM, reset at the baseline; bytes).
    pub rss_peak_bytes: Option<u64>,
    /// Peak minus baseline: what training added (bytes).
    pub rss_train_bytes: Option<u64>,
    /// Whether the peak was measured from the baseline on (`vqt_core::mem::start_peak_measurement`);
    /// `false` where the kernel refused to reset it, and the peak then covers the whole process
    /// (the cache build's too). Absent in reports written before this field.
    #[serde(default)]
    pub rss_peak_reset: Option<bool>,
    /// Device memory pool: max bytes in use sampled after forward and backward (GPU backends).
    pub device_peak_bytes: Option<u64>,
    /// For `vqt-cached`: time to build the cache for `batch·steps` images, i.e. one trunk
    /// inference pass over them (ms).
    pub cache_build_ms: Option<f64>,
    /// For `vqt-cached`: 100 epochs from the cache divided by one inference pass.
    pub cache_100_epochs_over_inference: Option<f64>,
    /// For `vqt-cached`: the arithmetic floor of that ratio, [`cache_floor`].
    #[serde(default)]
    pub cache_floor_100_epochs: Option<f64>,
    /// For `vqt-cached`: storage dtype of the cache.
    pub cache_dtype: Option<CacheDtype>,
    /// For `vqt-cached`: images in the cache.
    pub cache_images: Option<usize>,
    /// For `vqt-cached`: how a step reads the batch's keys and values from the cache:
    /// `in-place` (the attention reads the cache's memory) or `gather` (copied into batch
    /// tensors first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read: Option<String>,
    /// For `vqt-cached`: host bytes the cache holds (not part of `rss_train_bytes`, which starts
    /// after the cache is built).
    pub cache_bytes: Option<usize>,
    /// 1-minute load average at the end (timings on a shared machine swing with load).
    pub load_avg: Option<f64>,
    /// The allocator settings of the measuring process ([`vqt_core::mem::allocator_in_effect`]).
    #[serde(default)]
    pub allocator: String,
    /// Median inference time of one batch of images (ms; the trained model without autodiff,
    /// timed after the training peak was read; the cached VQT row infers from images too).
    #[serde(default)]
    pub infer_ms_median: Option<f64>,
    /// Inference images per second at that median.
    #[serde(default)]
    pub infer_images_per_s: Option<f64>,
    /// Where the timed steps' time went, phase by phase (medians; absent in older reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phases: Option<Phases>,
}

/// The median time (ms) of each phase of a training step. Each phase ends at a device sync, so
/// on an asynchronous (GPU) backend its work is counted where it ran, not where it was queued.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Phases {
    /// The forward pass to the loss (for the cached rows, gathering the batch's keys and values
    /// from the cache too).
    pub forward_ms: f64,
    /// `loss.backward()` and collecting the parameters' gradients.
    pub backward_ms: f64,
    /// The optimizer's update.
    pub optimizer_ms: f64,
    /// For the cached rows: the part of `forward_ms` that gathers the batch's keys and values
    /// out of the cache onto the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_gather_ms: Option<f64>,
}

impl Phases {
    /// The per-phase medians of `steps` (each `[forward, backward, optimizer]`); `None` for none.
    pub fn median_of(steps: &[[f64; 3]]) -> Option<Phases> {
        let v: Vec<Phases> = steps.iter().map(|&[forward_ms, backward_ms, optimizer_ms]| Phases { forward_ms, backward_ms, optimizer_ms, cache_gather_ms: None }).collect();
        Phases::median_over(&v)
    }

    /// Each phase's own median over `v` (the cache gather's only where every entry has one);
    /// `None` for none. The phases of the median step are not this: each phase is taken alone.
    pub fn median_over(v: &[Phases]) -> Option<Phases> {
        if v.is_empty() {
            return None;
        }
        let m = |f: fn(&Phases) -> f64| median(v.iter().map(f).collect());
        let gather: Option<Vec<f64>> = v.iter().map(|p| p.cache_gather_ms).collect();
        Some(Phases {
            forward_ms: m(|p| p.forward_ms),
            backward_ms: m(|p| p.backward_ms),
            optimizer_ms: m(|p| p.optimizer_ms),
            cache_gather_ms: gather.map(median),
        })
    }
}

fn load_avg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// The median of `v` (the mean of the middle two for an even length); every median of the
/// bench (steps, phases, rounds, kernels) is this one. Panics on an empty `v`.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    assert!(!v.is_empty(), "median of nothing");
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) }
}

fn pool_bytes(device: &Device) -> Option<u64> {
    device.sync().ok()?;
    device.memory_pool_usage().map(|u| u.bytes_in_use)
}

/// Touches every parameter so lazily initialised weights exist before the baseline is read.
fn materialize<M: Module>(m: &M) {
    struct Touch;
    impl burn::module::ModuleVisitor for Touch {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    m.visit(&mut Touch);
    for d in m.devices() {
        let _ = d.sync();
    }
}

/// Multiply-add FLOPs of one trunk inference pass over one image (patch embedding left out: it
/// is under 1% at these sizes): per block the four linear layers on every token and the two
/// attention products.
pub fn trunk_flops(vit: &VitConfig) -> f64 {
    let t = vit.num_tokens() as f64;
    let d = vit.embed_dim as f64;
    let hidden = vit.mlp_hidden() as f64;
    vit.depth as f64 * (2.0 * t * (3.0 * d * d + d * d + 2.0 * d * hidden) + 4.0 * t * t * d)
}

/// FLOPs of one cached VQT epoch per image with `queries` queries per layer: for each query
/// token and layer the q projection, attention over the cached keys and values, the output
/// projection and the MLP, forward plus the input-gradient backward (the same products again;
/// the frozen weights get no gradient).
pub fn cached_vqt_epoch_flops(vit: &VitConfig, queries: usize) -> f64 {
    let t = vit.num_tokens() as f64;
    let d = vit.embed_dim as f64;
    let hidden = vit.mlp_hidden() as f64;
    let per_query_layer = 2.0 * d * d + 4.0 * t * d + 2.0 * d * d + 4.0 * d * hidden;
    2.0 * vit.depth as f64 * queries as f64 * per_query_layer
}

/// The floor of "100 cached VQT epochs over one trunk inference pass": the arithmetic ratio at
/// equal throughput (about 0.85 at ViT-B/16 224 px and 2.6 at ViT-S/14 112 px).
pub fn cache_floor(vit: &VitConfig, queries: usize) -> f64 {
    100.0 * cached_vqt_epoch_flops(vit, queries) / trunk_flops(vit)
}

/// Options of one measurement.
#[derive(Debug, Clone)]
pub struct StepOptions {
    /// Backbone shape (random weights: memory and time do not depend on values).
    pub vit: VitConfig,
    /// Backbone description for the report.
    pub backbone: String,
    /// Batch size.
    pub batch: usize,
    /// Classes of the head.
    pub classes: usize,
    /// Warm-up steps (not timed).
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    /// Backend name for the report.
    pub backend: String,
    /// Storage of the `vqt-cached` feature cache.
    pub cache_dtype: CacheDtype,
}

/// Measures `method` in this process.
pub fn measure(method: &PresetOn, o: &StepOptions, device: &Device) -> Result<StepReport, String> {
    let name = method.name();
    let method_on = method;
    let method = method.preset;
    let plain = device.clone().without_autodiff();
    let ad = plain.clone().autodiff();
    plain.seed(0);
    let (b, c) = (o.batch, o.classes);
    let img = o.vit.img_size;
    let images: Vec<Tensor<4>> = (0..o.warmup + o.steps)
        .map(|_| Tensor::random([b, 3, img, img], Distribution::Normal(0.0, 1.0), &plain))
        .collect();
    let labels: Vec<i64> = (0..b as i64).map(|i| i % c as i64).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(labels, [b]), &ad);
    let mut times = Vec::new();
    let mut phases: Vec<[f64; 3]> = Vec::new();
    let mut gathers: Vec<f64> = Vec::new();
    let mut cache_read: Option<String> = None;
    let mut device_peak: Option<u64> = None;
    let sample = |device_peak: &mut Option<u64>| {
        if let Some(u) = pool_bytes(&plain) {
            *device_peak = Some(device_peak.map_or(u, |p| p.max(u)));
        }
    };
    let mut optim = burn::optim::ModuleOptimizer::from(vqt_models::ops::adamw::FusedAdamW::new(1e-8, 1e-2));
    let (trainable, total, baseline, cache_build_ms, cache_ratio, cache_bytes, peak, infer_ms, peak_reset);
    let cache_images = method.cached().then_some(b * images.len());
    if method == Preset::FullFt && method_on.layers.is_none() {
        let mut vit = o.vit.clone().with_num_classes(c).init(&ad);
        trainable = vit.num_params();
        total = trainable;
        materialize(&vit);
        peak_reset = vqt_core::mem::start_peak_measurement();
        baseline = proc_status_bytes("VmRSS");
        for (i, x) in images.iter().enumerate() {
            let t0 = Instant::now();
            let logits = vit.forward(x.clone().to_device(&ad));
            let loss = CrossEntropyLossConfig::new().init(&ad).forward(logits, targets.clone());
            sample(&mut device_peak);
            let t1 = Instant::now();
            let grads = GradientsParams::from_grads(loss.backward(), &vit);
            sample(&mut device_peak);
            let t2 = Instant::now();
            vit = optim.step(1e-4, vit, grads);
            plain.sync().map_err(|e| e.to_string())?;
            if i >= o.warmup {
                times.push(t0.elapsed().as_secs_f64() * 1e3);
                phases.push(phase_ms(t0, t1, t2));
            }
        }
        cache_build_ms = None;
        cache_ratio = None;
        cache_bytes = None;
        peak = proc_status_bytes("VmHWM");
        let eval = vit.valid();
        infer_ms = time_batches(&images, o.warmup, &plain, |x| {
            let _ = eval.forward(x.clone());
        })?;
    } else {
        let vit = o.vit.clone().init(&plain);
        // An add-on preset freezes an earlier stage's tuners into the backbone first.
        let vit = match method.frozen_tuners() {
            Some(t) => t.inject(vit)?,
            None => vit,
        };
        let mut model = method_on.spec(vit.embed_dim()).build(vit, c)?;
        (trainable, total) = vqt_models::tuners::param_counts(&model.clone().fork(&ad));
        materialize(&model);
        let cache = if method.cached() {
            let t0 = Instant::now();
            let c = FeatureCache::build(&model.backbone, images.iter().cloned(), CacheKind::Kv, o.cache_dtype, |_| {});
            plain.sync().map_err(|e| e.to_string())?;
            Some((c, t0.elapsed().as_secs_f64() * 1e3))
        } else {
            None
        };
        peak_reset = vqt_core::mem::start_peak_measurement();
        baseline = proc_status_bytes("VmRSS");
        for (i, x) in images.iter().enumerate() {
            let t0 = Instant::now();
            let input = match &cache {
                Some((c, _)) => {
                    let t = c.batch(&model.backbone, &(i * b..(i + 1) * b).collect::<Vec<_>>(), &ad);
                    cache_read = Some(if t.rows.is_some() { "in-place" } else { "gather" }.into());
                    TrunkInput::Cached(t)
                }
                None => TrunkInput::Images(x.clone()),
            };
            if cache.is_some() && i >= o.warmup {
                plain.sync().map_err(|e| e.to_string())?;
                gathers.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            let out = model.forward_classification(TrunkBatch { input, targets: targets.clone(), rng_seed: None });
            sample(&mut device_peak);
            let t1 = Instant::now();
            let grads = GradientsParams::from_grads(out.loss.backward(), &model);
            sample(&mut device_peak);
            let t2 = Instant::now();
            model = optim.step(1e-3, model, grads);
            plain.sync().map_err(|e| e.to_string())?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            if i >= o.warmup {
                times.push(ms);
                phases.push(phase_ms(t0, t1, t2));
            }
        }
        cache_build_ms = cache.as_ref().map(|(_, ms)| *ms);
        cache_bytes = cache.as_ref().map(|(c, _)| c.bytes());
        // One epoch = one step per cached batch, at the median step time.
        cache_ratio = cache.as_ref().map(|(_, build)| 100.0 * median(times.clone()) * images.len() as f64 / build);
        peak = proc_status_bytes("VmHWM");
        let eval = model.valid();
        infer_ms = time_batches(&images, o.warmup, &plain, |x| {
            let _ = eval.forward(TrunkInput::Images(x.clone()));
        })?;
    }
    let step_ms = median(times);
    Ok(StepReport {
        method: name,
        backend: o.backend.clone(),
        backbone: o.backbone.clone(),
        img_size: img,
        batch: b,
        trainable_params: trainable,
        total_params: total,
        step_ms_median: step_ms,
        train_images_per_s: b as f64 / (step_ms / 1e3),
        rss_baseline_bytes: baseline,
        rss_peak_bytes: peak,
        rss_train_bytes: match (peak, baseline) {
            (Some(p), Some(b)) => Some(p.saturating_sub(b)),
            _ => None,
        },
        rss_peak_reset: Some(peak_reset),
        device_peak_bytes: device_peak,
        cache_build_ms,
        cache_100_epochs_over_inference: cache_ratio,
        cache_floor_100_epochs: method.cached().then(|| cache_floor(&o.vit, 1)),
        cache_dtype: method.cached().then_some(o.cache_dtype),
        cache_images,
        cache_read,
        cache_bytes,
        load_avg: load_avg(),
        allocator: vqt_core::mem::allocator_in_effect().into(),
        infer_ms_median: Some(infer_ms),
        infer_images_per_s: Some(b as f64 / (infer_ms / 1e3)),
        phases: Phases::median_of(&phases).map(|p| Phases { cache_gather_ms: (!gathers.is_empty()).then(|| median(gathers)), ..p }),
    })
}

/// `[forward, backward, optimizer]` ms of a step that started at `t0`, whose backward started
/// at `t1` and whose optimizer started at `t2` and ended now.
fn phase_ms(t0: Instant, t1: Instant, t2: Instant) -> [f64; 3] {
    let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1e3;
    [ms(t0, t1), ms(t1, t2), ms(t2, Instant::now())]
}

/// Median time (ms) of `f` over the batches after `warmup`.
fn time_batches(images: &[Tensor<4>], warmup: usize, plain: &Device, f: impl Fn(&Tensor<4>)) -> Result<f64, String> {
    let mut times = Vec::new();
    for (i, x) in images.iter().enumerate() {
        let t0 = Instant::now();
        f(x);
        plain.sync().map_err(|e| e.to_string())?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(times))
}

fn mib(b: Option<u64>) -> String {
    b.map(|b| format!("{:.0}", b as f64 / (1024.0 * 1024.0))).unwrap_or_else(|| "–".into())
}

/// Markdown table of reports, with memory and time ratios to `full-ft` when present.
pub fn markdown(reports: &[StepReport]) -> String {
    let full = reports.iter().find(|r| r.method == "full-ft");
    let mem = |r: &StepReport| r.device_peak_bytes.or(r.rss_train_bytes);
    let mut s = String::new();
    if let Some(r) = reports.first() {
        s += &format!(
            "Backbone {} at {}px, batch {}, backend `{}`; median of timed steps after warm-up; memory = {}; allocator: {}.\n\n",
            r.backbone,
            r.img_size,
            r.batch,
            r.backend,
            if r.device_peak_bytes.is_some() { "device pool peak" } else { if r.rss_peak_reset == Some(true) {
                "peak RSS of the training steps (VmHWM reset after the model build, and the cache build where cached, with freed heap memory returned) minus the RSS then"
            } else {
                "process peak RSS (VmHWM) minus RSS after model build"
            } },
            if r.allocator.is_empty() { "not recorded" } else { &r.allocator }
        );
    }
    s += "| method | trainable params | step ms | train img/s | infer img/s | train memory MiB | memory / full FT | time / full FT |\n|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for r in reports {
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "–".into(),
        };
        let mem_ratio = ratio(mem(r).map(|x| x as f64), full.and_then(|f| mem(f)).map(|x| x as f64));
        let time_ratio = ratio(Some(r.step_ms_median), full.map(|f| f.step_ms_median));
        s += &format!(
            "| {} | {} | {:.1} | {:.1} | {} | {} | {} | {} |\n",
            r.method,
            r.trainable_params,
            r.step_ms_median,
            r.train_images_per_s,
            r.infer_images_per_s.map(|x| format!("{x:.1}")).unwrap_or_else(|| "–".into()),
            mib(mem(r)),
            mem_ratio,
            time_ratio
        );
    }
    for r in reports.iter().filter(|r| r.cache_100_epochs_over_inference.is_some()) {
        s += &format!(
            "\nFeature cache ({}, {:?}): {} MiB of K/V for {} images, held in RAM (not in the train-memory column). Building it (one trunk inference pass) took {:.0} ms; 100 epochs of VQT from it cost {:.2}x that pass (arithmetic floor at equal throughput: {}).\n",
            r.method,
            r.cache_dtype.unwrap_or(CacheDtype::F32),
            mib(r.cache_bytes.map(|b| b as u64)),
            r.cache_images.unwrap_or(0),
            r.cache_build_ms.unwrap_or(f64::NAN),
            r.cache_100_epochs_over_inference.unwrap(),
            r.cache_floor_100_epochs.map(|f| format!("{f:.2}x")).unwrap_or_else(|| "–".into())
        );
        if let Some(p) = r.phases {
            s += &format!(
                "Its step, phase by phase (medians): forward {:.1} ms{}, backward {:.1} ms, optimizer {:.1} ms.\n",
                p.forward_ms,
                match (p.cache_gather_ms, r.cache_read.as_deref()) {
                    (Some(g), Some("in-place")) => format!(" (the batch's keys and values read in place from the cache, no copy; preparing the batch: {g:.1} ms)"),
                    (Some(g), _) => format!(" (of which {g:.1} ms gathering the batch's keys and values from the cache)"),
                    (None, _) => String::new(),
                },
                p.backward_ms,
                p.optimizer_ms
            );
        }
    }
    if let Some(l) = reports.iter().filter_map(|r| r.load_avg).reduce(f64::max) {
        s += &format!("\nMax 1-minute load average during the runs: {l:.2} (timings swing with load on a shared machine).\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_floor_is_the_arithmetic_of_the_issue() {
        let cfg = |name: &str, img| vqt_models::VitPreset::from_name(name).unwrap().config().with_img_size(img);
        let (b16, s14) = (cfg("vit-b16", 224), cfg("vit-s14-dinov2", 112));
        // ~35 and ~2.8 GFLOP per trunk pass; ~0.30 and ~0.073 GFLOP per cached epoch.
        assert!((trunk_flops(&b16) / 1e9 - 34.9).abs() < 0.2, "{}", trunk_flops(&b16));
        assert!((trunk_flops(&s14) / 1e9 - 2.84).abs() < 0.02, "{}", trunk_flops(&s14));
        assert!((cached_vqt_epoch_flops(&b16, 1) / 1e9 - 0.30).abs() < 0.01);
        assert!((cached_vqt_epoch_flops(&s14, 1) / 1e9 - 0.073).abs() < 0.002);
        assert!((cache_floor(&b16, 1) - 0.85).abs() < 0.02, "{}", cache_floor(&b16, 1));
        assert!((cache_floor(&s14, 1) - 2.58).abs() < 0.03, "{}", cache_floor(&s14, 1));
        assert!((cache_floor(&s14, 2) - 2.0 * cache_floor(&s14, 1)).abs() < 1e-9);
    }

    #[test]
    fn phases_are_per_phase_medians_and_the_cached_row_reports_its_gather() {
        // Each phase's median on its own (not the phases of the median step).
        let p = Phases::median_of(&[[10.0, 90.0, 1.0], [30.0, 50.0, 3.0], [20.0, 70.0, 2.0]]).unwrap();
        assert_eq!((p.forward_ms, p.backward_ms, p.optimizer_ms, p.cache_gather_ms), (20.0, 70.0, 2.0, None));
        assert_eq!(Phases::median_of(&[]), None);
        // One median convention everywhere: the mean of the middle two for an even count.
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        // The gather's median only where every entry has one.
        let g = |x: f64, gather: Option<f64>| Phases { forward_ms: x, backward_ms: x, optimizer_ms: x, cache_gather_ms: gather };
        let m = Phases::median_over(&[g(1.0, Some(5.0)), g(3.0, Some(7.0))]).unwrap();
        assert_eq!((m.forward_ms, m.cache_gather_ms), (2.0, Some(6.0)));
        assert_eq!(Phases::median_over(&[g(1.0, Some(5.0)), g(3.0, None)]).unwrap().cache_gather_ms, None);
        let mut r: StepReport = serde_json::from_value(serde_json::json!({
            "method": "vqt-cached", "backend": "cpu", "backbone": "vit-s14-dinov2", "img_size": 112, "batch": 128,
            "trainable_params": 10, "total_params": 100, "step_ms_median": 170.0, "train_images_per_s": 1.0,
            "rss_baseline_bytes": 0, "rss_peak_bytes": 1, "rss_train_bytes": 1, "device_peak_bytes": null,
            "cache_build_ms": 1000.0, "cache_100_epochs_over_inference": 5.0, "cache_dtype": "f32", "cache_images": 768,
            "cache_bytes": 1, "load_avg": null
        }))
        .unwrap();
        assert_eq!(r.phases, None, "a report without phases (written before them) still reads");
        assert!(!markdown(std::slice::from_ref(&r)).contains("phase by phase"));
        r.phases = Some(Phases { cache_gather_ms: Some(40.0), ..p });
        let md = markdown(std::slice::from_ref(&r));
        assert!(md.contains("forward 20.0 ms (of which 40.0 ms gathering the batch's keys and values from the cache), backward 70.0 ms"), "{md}");
        r.cache_read = Some("in-place".into());
        let md = markdown(std::slice::from_ref(&r));
        assert!(md.contains("forward 20.0 ms (the batch's keys and values read in place from the cache, no copy; preparing the batch: 40.0 ms)"), "{md}");
    }
}
