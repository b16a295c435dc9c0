//! The one registry of what a run trains: a query-side method ([`MethodSpec`]) times a set of
//! backbone tuners ([`TunersConfig`]), together a [`ModelSpec`], and the named settings the
//! benchmarks measure ([`Preset`]).
//!
//! `vqt-train` reads a [`ModelSpec`] from a config's `[method]` and `[tuners]` tables,
//! `vqt-bench memory/compare/gpu-check` build one from a [`Preset`] name, and `vqt-bench parity`
//! from a fixture's manifest; all three then call [`ModelSpec::build`]. Names are parsed once,
//! into these enums, and a wrong name is an error listing the valid ones.
//!
//! Adding a query method is one file under `query/` plus one [`MethodSpec`] arm (and its
//! [`crate::QueryMethod`] arm); adding a tuner is one file under `tuners/` plus one
//! [`TunersConfig`] field; a new benchmark setting is one [`Preset`] arm.

use crate::query::{SynqtConfig, VqtConfig};
use crate::tuners::adapter::{AdapterActivation, AdapterConfig, AdapterKind};
use crate::tuners::adaptformer::AdaptFormerConfig;
use crate::tuners::lora::LoraConfig;
use crate::tuners::ssf::SsfConfig;
use crate::tuners::vpt::VptConfig;
use crate::tuners::{Layers, TunersConfig};
use crate::vit::Vit;
use crate::{QueryMethod, TrunkModel};
use burn::nn::LinearConfig;
use burn::tensor::Device;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The query-side method and its head (`kind = "linear" | "vqt" | "synqt"` in a config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum MethodSpec {
    /// Linear probe on the final normalised class token (with tuners: their plain head).
    Linear,
    /// Visual Query Tuning.
    Vqt(VqtConfig),
    /// SynQT.
    Synqt(SynqtConfig),
}

impl MethodSpec {
    /// Every `kind`, for error messages.
    pub const KINDS: [&'static str; 3] = ["linear", "vqt", "synqt"];

    /// The config `kind` of this method.
    pub fn kind(&self) -> &'static str {
        match self {
            MethodSpec::Linear => "linear",
            MethodSpec::Vqt(_) => "vqt",
            MethodSpec::Synqt(_) => "synqt",
        }
    }

    /// Range checks; the error names the key (`method.<field>`).
    pub fn validate(&self) -> Result<(), String> {
        match self {
            MethodSpec::Linear => Ok(()),
            MethodSpec::Vqt(v) => v.validate(),
            MethodSpec::Synqt(s) => s.validate(),
        }
    }

    /// The method's modules for a `num_classes` head on `vit`, initialised on `device` (the
    /// autodiff device when it is to be trained).
    pub fn init(&self, vit: &Vit, num_classes: usize, device: &Device) -> QueryMethod {
        let (d, depth, p) = (vit.embed_dim(), vit.depth(), vit.patch_embed.proj.kernel_size[0]);
        match self {
            MethodSpec::Linear => QueryMethod::Linear(LinearConfig::new(d, num_classes).init(device)),
            MethodSpec::Vqt(v) => QueryMethod::Vqt(v.init(depth, d, p, num_classes, device)),
            MethodSpec::Synqt(s) => QueryMethod::Synqt(s.init(vit, num_classes, device)),
        }
    }
}

/// A whole trainable model: the query method on top of the backbone tuners (none: the frozen
/// backbone and the trunk path).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The query side.
    pub method: MethodSpec,
    /// The backbone tuners, trained jointly with `method`.
    pub tuners: TunersConfig,
}

impl ModelSpec {
    /// Short name for logs and records: the query method, then the tuners, then the tuned
    /// blocks when `tuners.layers` is set (`vqt+adaptformer`, `lora`, `full-ft`, `linear`,
    /// `adaptformer@last4`, `lora@8-11`).
    pub fn name(&self) -> String {
        let q = self.method.kind();
        let mut t = self.tuners.names();
        if let (Some(l), Some(last)) = (&self.tuners.layers, t.last_mut()) {
            *last = format!("{last}@{}", l.label());
        }
        match (q, t.is_empty()) {
            (_, true) => q.to_string(),
            ("linear", false) => t.join("+"),
            (_, false) => format!("{q}+{}", t.join("+")),
        }
    }

    /// Checks the method and the tuner set; the error names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        self.method.validate()?;
        self.tuners.validate()
    }

    /// Builds the model on a loaded `vit` (plain tensors): with no tuner the backbone is frozen
    /// and the model takes the trunk path, otherwise the tuners are injected and the model runs
    /// on the tape. The method is initialised on the autodiff device of `vit`'s device.
    pub fn build(&self, vit: Vit, num_classes: usize) -> Result<TrunkModel, String> {
        let ad = vit.cls_token.device().without_autodiff().autodiff();
        let vit = if self.tuners.is_empty() { vit } else { self.tuners.inject(vit)? };
        let method = self.method.init(&vit, num_classes, &ad);
        Ok(TrunkModel::tuned(vit, &self.tuners, method))
    }
}

/// The named settings that `vqt-bench memory`, `compare` and `gpu-check` measure, at the
/// settings the literature's VTAB tables use (VQT Q = 1, SynQT one token, LoRA r = 8 on q/v,
/// AdaptFormer b = 8, VPT-deep 10 prompts, Houlsby b = 8, Pfeiffer D/8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// Linear probe.
    Linear,
    /// VQT, trunk recomputed every step.
    Vqt,
    /// SynQT.
    Synqt,
    /// VQT from the feature cache.
    VqtCached,
    /// Full fine-tuning (the bench trains timm's own model with its head).
    FullFt,
    /// LoRA.
    Lora,
    /// AdaptFormer.
    Adaptformer,
    /// VPT-deep.
    VptDeep,
    /// BitFit.
    Bitfit,
    /// SSF.
    Ssf,
    /// Houlsby adapters.
    Houlsby,
    /// Pfeiffer adapters.
    Pfeiffer,
    /// VQT and AdaptFormer trained jointly.
    VqtAdaptformer,
    /// VQT from the feature cache on a frozen AdaptFormer-tuned backbone (the add-on's second
    /// stage, `backbone.tuned_from`).
    VqtAddon,
}

impl Preset {
    /// Every preset, in report order.
    pub const ALL: [Preset; 14] = [
        Preset::Linear,
        Preset::Vqt,
        Preset::Synqt,
        Preset::VqtCached,
        Preset::FullFt,
        Preset::Lora,
        Preset::Adaptformer,
        Preset::VptDeep,
        Preset::Bitfit,
        Preset::Ssf,
        Preset::Houlsby,
        Preset::Pfeiffer,
        Preset::VqtAdaptformer,
        Preset::VqtAddon,
    ];

    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Linear => "linear",
            Preset::Vqt => "vqt",
            Preset::Synqt => "synqt",
            Preset::VqtCached => "vqt-cached",
            Preset::FullFt => "full-ft",
            Preset::Lora => "lora",
            Preset::Adaptformer => "adaptformer",
            Preset::VptDeep => "vpt-deep",
            Preset::Bitfit => "bitfit",
            Preset::Ssf => "ssf",
            Preset::Houlsby => "houlsby",
            Preset::Pfeiffer => "pfeiffer",
            Preset::VqtAdaptformer => "vqt-adaptformer",
            Preset::VqtAddon => "vqt-addon",
        }
    }

    /// Every name, comma-separated (for help and error text).
    pub fn names() -> String {
        Self::ALL.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
    }

    /// Whether the method trains from the feature cache.
    pub fn cached(self) -> bool {
        matches!(self, Preset::VqtCached | Preset::VqtAddon)
    }

    /// The tuners of the earlier stage that an add-on preset freezes into its backbone (the
    /// model itself trains the query side only).
    pub fn frozen_tuners(self) -> Option<TunersConfig> {
        (self == Preset::VqtAddon).then(|| Preset::Adaptformer.spec(0).tuners)
    }

    /// The model this preset trains, for a backbone of width `width`.
    pub fn spec(self, width: usize) -> ModelSpec {
        let vqt = MethodSpec::Vqt(VqtConfig { num_queries: 1, query_dropout: 0.1 });
        let adapter = |kind, bottleneck| Some(AdapterConfig { kind, bottleneck, activation: AdapterActivation::Gelu });
        let af = || Some(AdaptFormerConfig { bottleneck: 8, scale: 0.1, dropout: 0.1 });
        let t = TunersConfig::default();
        let (method, tuners) = match self {
            Preset::Linear => (MethodSpec::Linear, t),
            Preset::Vqt | Preset::VqtCached | Preset::VqtAddon => (vqt, t),
            Preset::Synqt => (
                MethodSpec::Synqt(SynqtConfig {
                    num_tokens: 1,
                    feat_scale: 0.1,
                    attn_scale: 0.1,
                    ffn_scale: 0.1,
                    dropout: 0.1,
                    head_drop_path: 0.3,
                    kem_drop_path: 0.0,
                }),
                t,
            ),
            Preset::FullFt => (MethodSpec::Linear, TunersConfig { full_finetune: true, ..t }),
            Preset::Lora => (MethodSpec::Linear, TunersConfig { lora: Some(LoraConfig { rank: 8, alpha: None, targets: vec!["q".into(), "v".into()] }), ..t }),
            Preset::Adaptformer => (MethodSpec::Linear, TunersConfig { adaptformer: af(), ..t }),
            Preset::VptDeep => (MethodSpec::Linear, TunersConfig { vpt: Some(VptConfig { num_tokens: 10, deep: true, dropout: 0.1 }), ..t }),
            Preset::Bitfit => (MethodSpec::Linear, TunersConfig { bitfit: true, ..t }),
            Preset::Ssf => (MethodSpec::Linear, TunersConfig { ssf: Some(SsfConfig::default()), ..t }),
            Preset::Houlsby => (MethodSpec::Linear, TunersConfig { adapter: adapter(AdapterKind::Houlsby, 8), ..t }),
            Preset::Pfeiffer => (MethodSpec::Linear, TunersConfig { adapter: adapter(AdapterKind::Pfeiffer, width / 8), ..t }),
            Preset::VqtAdaptformer => (vqt, TunersConfig { adaptformer: af(), ..t }),
        };
        ModelSpec { method, tuners }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| format!("unknown method `{s}` (known: {})", Self::names()))
    }
}

/// A preset, optionally with its tuners on chosen blocks: `adaptformer@last4` (or `@last:4`),
/// `lora@8-11`, `lora@10,11` (the memory-budget points).
#[derive(Clone, Debug, PartialEq)]
pub struct PresetOn {
    /// The preset.
    pub preset: Preset,
    /// `tuners.layers` for it (absent: every block).
    pub layers: Option<Layers>,
}

impl PresetOn {
    /// The model it trains on a backbone of width `width`.
    pub fn spec(&self, width: usize) -> ModelSpec {
        let mut s = self.preset.spec(width);
        s.tuners.layers = self.layers.clone();
        s
    }

    /// The name on the command line and in reports (`adaptformer@last4`).
    pub fn name(&self) -> String {
        match &self.layers {
            Some(l) => format!("{}@{}", self.preset.name(), l.label()),
            None => self.preset.name().to_string(),
        }
    }
}

impl fmt::Display for PresetOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for PresetOn {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, at) = match s.split_once('@') {
            Some((n, a)) => (n, Some(a.trim())),
            None => (s, None),
        };
        let preset: Preset = name.trim().parse()?;
        let layers = match at {
            None => None,
            Some(a) => Some(if let Some(k) = a.strip_prefix("last") {
                Layers::Spec(format!("last:{}", k.trim_start_matches(':')))
            } else if let Some((lo, hi)) = a.split_once('-') {
                let (lo, hi) = (lo.trim().parse::<usize>(), hi.trim().parse::<usize>());
                match (lo, hi) {
                    (Ok(lo), Ok(hi)) if lo <= hi => Layers::List((lo..=hi).collect()),
                    _ => return Err(format!("`{s}`: expected blocks as `@lastK`, `@A-B` or `@A,B,...`")),
                }
            } else {
                Layers::List(a.split(',').map(|m| m.trim().parse::<usize>()).collect::<Result<_, _>>().map_err(|_| format!("`{s}`: expected blocks as `@lastK`, `@A-B` or `@A,B,...`"))?)
            }),
        };
        if layers.is_some() && preset.spec(8).tuners.is_empty() {
            return Err(format!("`{s}`: {} has no backbone tuner to put on chosen blocks", preset.name()));
        }
        Ok(PresetOn { preset, layers })
    }
}

/// Parses a comma-separated list of presets (`linear,vqt,lora`); empty items are ignored, an
/// empty list is an error.
pub fn parse_presets(list: &str) -> Result<Vec<PresetOn>, String> {
    // Commas separate methods, except inside a block list after `@` (`lora@10,11,vqt`: a
    // number continues the list).
    let mut items: Vec<String> = Vec::new();
    for part in list.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        match items.last_mut() {
            Some(prev) if prev.contains('@') && part.chars().all(|c| c.is_ascii_digit()) => {
                prev.push(',');
                prev.push_str(part);
            }
            _ => items.push(part.to_string()),
        }
    }
    let out = items.iter().map(|m| m.parse::<PresetOn>()).collect::<Result<Vec<_>, _>>()?;
    if out.is_empty() {
        return Err(format!("`{list}` names no method (known: {})", Preset::names()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_round_trips_its_name_and_builds_a_valid_spec() {
        for p in Preset::ALL {
            assert_eq!(p.name().parse::<Preset>().unwrap(), p);
            assert_eq!(serde_json::to_value(p).unwrap(), serde_json::Value::String(p.name().into()));
            p.spec(384).validate().unwrap_or_else(|e| panic!("{p}: {e}"));
        }
        assert_eq!(Preset::Lora.spec(384).name(), "lora");
        assert_eq!(Preset::VqtAdaptformer.spec(384).name(), "vqt+adaptformer");
        assert_eq!(Preset::FullFt.spec(384).name(), "full-ft");
        assert_eq!(Preset::VqtCached.spec(384).name(), "vqt");
        assert!(Preset::VqtCached.cached() && !Preset::Vqt.cached() && Preset::VqtAddon.cached());
        assert!(Preset::VqtAddon.spec(384).tuners.is_empty() && Preset::VqtAddon.frozen_tuners().is_some());
    }

    #[test]
    fn a_wrong_name_lists_the_valid_ones() {
        let e = "vtq".parse::<Preset>().unwrap_err();
        assert!(e.contains("`vtq`") && e.contains("vqt-cached") && e.contains("pfeiffer"), "{e}");
        let e: Vec<Preset> = parse_presets("linear, lora,,").unwrap().into_iter().map(|p| p.preset).collect();
        assert_eq!(e, [Preset::Linear, Preset::Lora]);
        let on = parse_presets("adaptformer@last4,lora@10,11,vqt,lora@8-9").unwrap();
        assert_eq!(on.iter().map(|p| p.name()).collect::<Vec<_>>(), ["adaptformer@last4", "lora@10,11", "vqt", "lora@8,9"]);
        assert_eq!(on[0].spec(384).tuners.tuned_blocks(12).unwrap(), [8, 9, 10, 11]);
        assert_eq!(on[1].spec(384).name(), "lora@10,11");
        assert!("vqt@last2".parse::<PresetOn>().unwrap_err().contains("no backbone tuner"));
        assert!("lora@first2".parse::<PresetOn>().unwrap_err().contains("@lastK"));
        assert!(parse_presets(" , ").unwrap_err().contains("names no method"));
        assert!(parse_presets("linear,nope").unwrap_err().contains("`nope`"));
    }

    #[test]
    fn method_kinds_are_the_config_tags() {
        for (json, kind) in [(r#"{"kind": "linear"}"#, "linear"), (r#"{"kind": "vqt", "num_queries": 2}"#, "vqt"), (r#"{"kind": "synqt", "num_tokens": 1, "feat_scale": 0.1, "attn_scale": 0.1, "ffn_scale": 0.1}"#, "synqt")] {
            let m: MethodSpec = serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(m.kind(), kind);
            assert!(MethodSpec::KINDS.contains(&kind));
        }
        let e = serde_json::from_str::<MethodSpec>(r#"{"kind": "vtq"}"#).unwrap_err().to_string();
        assert!(e.contains("vtq") && e.contains("linear") && e.contains("synqt"), "{e}");
    }

    #[test]
    fn build_takes_the_trunk_path_only_without_tuners() {
        let device = Device::flex();
        let cfg = crate::VitConfig { depth: 2, ..crate::VitPreset::from_name("vit-ti16").unwrap().config() }.with_img_size(32).with_num_classes(0);
        for p in [Preset::Linear, Preset::Vqt, Preset::Synqt, Preset::Lora, Preset::VqtAdaptformer] {
            let m = p.spec(cfg.embed_dim).build(cfg.clone().init(&device), 5).unwrap();
            assert_eq!(m.full_path, !p.spec(cfg.embed_dim).tuners.is_empty(), "{p}");
            assert_eq!(m.method.name(), p.spec(cfg.embed_dim).method.kind(), "{p}");
        }
    }
}
