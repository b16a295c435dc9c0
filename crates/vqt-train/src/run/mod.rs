//! One training run, read top to bottom as the data flows:
//!
//! | room | holds |
//! |---|---|
//! | [`data`] | the three splits of a `[data]` section, decoded |
//! | [`batch`] | rows, the trunk-path batchers (images, or feature-cache rows), the seeded per-epoch shuffle |
//! | [`build`] | the run from its config: splits, input pipeline, backbone + tuners, query method |
//! | [`cache`] | the feature cache: its validity key, building it, opening a cache file |
//! | `stages` | one training stage with burn-train's learner (optimizer, schedule, checkpoints, resume) |
//! | [`mod@train`] | a whole run: output-directory checks, stage(s) (Head2Toe has three), final evaluation, `run.json` |
//! | [`record`] | what `run.json` holds |
//! | [`eval`] | accuracy on a split, of a saved run; per-layer feature extraction |
//!
//! So config -> [`build::prepare`] (dataset, trunk, query side, head) -> [`batch::TrunkBatcher`]
//! (images, or the [`cache`]) -> `stages::Stages::run` (one learner run) -> [`eval`] -> [`record::RunRecord`].

pub mod batch;
pub mod build;
pub mod cache;
pub mod data;
pub mod eval;
pub mod record;
pub(crate) mod stages;
pub mod train;

pub use batch::{EpochShuffled, Item, SeededBatcher, TrunkBatcher};
pub use build::{prepare, Prepared};
pub use cache::{build_cache_file, cache_key, CacheKey};
pub use data::load_data;
pub use eval::{evaluate, extract, EvalSplit};
pub use record::{read_record, CacheRecord, CheckpointRecord, Head2ToeRecord, RunRecord};
pub use train::{train, train_or_reuse, TrainOptions, HEAD2TOE_DIR, TRAINABLE_FILE};
