//! VTAB-1k straight from a TensorFlow Datasets data directory (`~/tensorflow_datasets` layout),
//! exactly as the official VQT/VPT code reads it through `tensorflow_datasets` with the split
//! definitions of google-research/task_adaptation (docs/design/vtab-tfds.md).
//!
//! A task's data is `<root>/<dataset>[/<config>]/<version>/`: `dataset_info.json` (each split's
//! shard lengths) and shards `<dataset>-<split>.tfrecord-NNNNN-of-MMMMM`. A VTAB split is one or
//! two slices of TFDS splits ([`TfdsTask::slices`]); a slice maps to a skip/take per shard in
//! shard order, so only the shards it covers are read. Records are TFRecord frames (length and
//! data each sealed with a masked CRC32C, both checked) holding `tf.train.Example` protobufs
//! (decoded with `prost`). The image feature is decoded by its bytes (PNG or JPEG, whatever the
//! builder declared), forced to RGB as `tf.image.decode_image(channels=3)` does, or, for the
//! one-channel datasets, tiled to three channels as task_adaptation does. Labels are the task's
//! feature, or derived from other features for the structured tasks ([`Label`]).
//!
//! Bad input is one error naming the file: a missing dataset or version directory, a split the
//! dataset lacks, a slice longer than the split, a shard with a bad CRC or a truncated record
//! (with `skip_bad`: left out and counted), a feature missing from an Example, an image that
//! does not decode, a label outside the task's classes.

use super::files::Skipped;
use super::{DataError, RawImage, Sample};
use std::collections::HashMap;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// tf.train.Example (tensorflow/core/example/example.proto and feature.proto), for prost.

/// `tf.train.Example`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Example {
    /// The features.
    #[prost(message, optional, tag = "1")]
    pub features: Option<Features>,
}

/// `tf.train.Features`: feature name to value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Features {
    /// The map.
    #[prost(map = "string, message", tag = "1")]
    pub feature: HashMap<String, Feature>,
}

/// `tf.train.Feature`: one of three lists.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Feature {
    /// The list.
    #[prost(oneof = "FeatureKind", tags = "1, 2, 3")]
    pub kind: Option<FeatureKind>,
}

/// The value lists of a [`Feature`].
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum FeatureKind {
    /// `bytes_list`.
    #[prost(message, tag = "1")]
    BytesList(BytesList),
    /// `float_list`.
    #[prost(message, tag = "2")]
    FloatList(FloatList),
    /// `int64_list`.
    #[prost(message, tag = "3")]
    Int64List(Int64List),
}

/// `tf.train.BytesList`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BytesList {
    /// Values.
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub value: Vec<Vec<u8>>,
}

/// `tf.train.FloatList`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FloatList {
    /// Values.
    #[prost(float, repeated, tag = "1")]
    pub value: Vec<f32>,
}

/// `tf.train.Int64List`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Int64List {
    /// Values.
    #[prost(int64, repeated, tag = "1")]
    pub value: Vec<i64>,
}

impl Example {
    fn get(&self, key: &str) -> Option<&FeatureKind> {
        self.features.as_ref()?.feature.get(key)?.kind.as_ref()
    }

    /// The `bytes_list` of `key` (absent or another kind: `None`).
    pub fn bytes(&self, key: &str) -> Option<&[Vec<u8>]> {
        match self.get(key)? {
            FeatureKind::BytesList(b) => Some(&b.value),
            _ => None,
        }
    }

    /// The `int64_list` of `key`; an absent key is an empty list (TFDS writes an empty sequence
    /// that way).
    pub fn ints(&self, key: &str) -> Option<&[i64]> {
        match self.get(key) {
            Some(FeatureKind::Int64List(v)) => Some(&v.value),
            None => Some(&[]),
            _ => None,
        }
    }

    /// The `float_list` of `key`; an absent key is an empty list.
    pub fn floats(&self, key: &str) -> Option<&[f32]> {
        match self.get(key) {
            Some(FeatureKind::FloatList(v)) => Some(&v.value),
            None => Some(&[]),
            _ => None,
        }
    }

    /// A text id of the example, if it has one of TFDS's id-like features (`id`, `file_name`,
    /// `filename`, `image/file_name`, `name`).
    pub fn id(&self) -> Option<String> {
        for key in ["id", "file_name", "filename", "image/file_name", "name"] {
            if let Some(v) = self.bytes(key).and_then(|b| b.first()) {
                return Some(String::from_utf8_lossy(v).into_owned());
            }
            if let Some(FeatureKind::Int64List(v)) = self.get(key) {
                if let Some(x) = v.value.first() {
                    return Some(x.to_string());
                }
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------------------------
// TFRecord framing.

/// The masked CRC32C of TFRecord frames.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8)
}

fn fmt_err(path: &Path, msg: impl Into<String>) -> DataError {
    DataError::Format { path: path.to_path_buf(), msg: msg.into() }
}

fn io_err(path: &Path, error: std::io::Error) -> DataError {
    DataError::Io { path: path.to_path_buf(), error }
}

/// Fills `buf` or reports how many bytes there were (0: a clean end of file).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Records `skip .. skip + take` of the TFRecord file at `path` (`take = None`: to the end), as
/// `(index in the file, data)`. Every record's length CRC is checked, and the data CRC of every
/// record returned. A record whose data CRC is wrong is an error, or with `skip_bad` left out and
/// counted as corrupt; a truncated record or a wrong length CRC (the framing is lost) is an
/// error, or with `skip_bad` ends the shard there, counted once.
pub fn read_records(path: &Path, skip: usize, take: Option<usize>, skip_bad: bool, skipped: &mut Skipped) -> Result<Vec<(usize, Vec<u8>)>, DataError> {
    let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut r = BufReader::new(file);
    let mut out = Vec::new();
    let mut index = 0usize;
    let end = take.map(|t| skip + t);
    loop {
        if end.is_some_and(|e| index >= e) {
            break;
        }
        let mut head = [0u8; 12];
        let got = read_full(&mut r, &mut head).map_err(|e| io_err(path, e))?;
        if got == 0 {
            break;
        }
        let framing = |msg: String, skipped: &mut Skipped| -> Result<(), DataError> {
            if skip_bad {
                skipped.corrupt += 1;
                Ok(())
            } else {
                Err(fmt_err(path, msg))
            }
        };
        if got < 12 {
            framing(format!("record {index}: truncated header ({got} of 12 bytes): the shard is damaged"), skipped)?;
            break;
        }
        let len_bytes: [u8; 8] = head[..8].try_into().expect("8 bytes");
        let len_crc = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        if masked_crc32c(&len_bytes) != len_crc {
            framing(format!("record {index}: the length's CRC does not match: the shard is damaged"), skipped)?;
            break;
        }
        let len = u64::from_le_bytes(len_bytes) as usize;
        if index < skip {
            r.seek(SeekFrom::Current(len as i64 + 4)).map_err(|e| io_err(path, e))?;
            index += 1;
            continue;
        }
        let mut data = vec![0u8; len];
        let mut tail = [0u8; 4];
        let got = read_full(&mut r, &mut data).map_err(|e| io_err(path, e))?;
        let got_tail = if got == len { read_full(&mut r, &mut tail).map_err(|e| io_err(path, e))? } else { 0 };
        if got < len || got_tail < 4 {
            framing(format!("record {index}: truncated ({got} of {len} data bytes): the shard is damaged"), skipped)?;
            break;
        }
        if masked_crc32c(&data) != u32::from_le_bytes(tail) {
            if skip_bad {
                skipped.corrupt += 1;
            } else {
                return Err(fmt_err(path, format!("record {index}: the data's CRC does not match: the shard is damaged (--skip-bad leaves such records out)")));
            }
        } else {
            out.push((index, data));
        }
        index += 1;
    }
    if let Some(e) = end {
        if index < e && !skip_bad {
            return Err(fmt_err(path, format!("has {index} records, fewer than the {e} dataset_info.json promises")));
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// dataset_info.json and shards.

/// One split of a prepared TFDS dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct SplitInfo {
    /// `train`, `validation`, `test`, …
    pub name: String,
    /// Records per shard, in shard order.
    pub shard_lengths: Vec<usize>,
    /// `filepathTemplate` (TFDS >= 4.8), if given.
    pub template: Option<String>,
}

impl SplitInfo {
    /// Records in the split.
    pub fn len(&self) -> usize {
        self.shard_lengths.iter().sum()
    }

    /// True for a split without records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The dataset name and the splits of `<dir>/dataset_info.json`.
pub fn read_dataset_info(dir: &Path) -> Result<(String, Vec<SplitInfo>), DataError> {
    let path = dir.join("dataset_info.json");
    let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| fmt_err(&path, e.to_string()))?;
    let name = v["name"].as_str().ok_or_else(|| fmt_err(&path, "no `name`"))?.to_string();
    let count = |x: &serde_json::Value| -> Option<usize> { x.as_u64().map(|n| n as usize).or_else(|| x.as_str()?.parse().ok()) };
    let splits = v["splits"]
        .as_array()
        .ok_or_else(|| fmt_err(&path, "no `splits` list"))?
        .iter()
        .map(|s| {
            let name = s["name"].as_str().ok_or_else(|| fmt_err(&path, "a split without `name`"))?.to_string();
            let shard_lengths = s["shardLengths"]
                .as_array()
                .ok_or_else(|| fmt_err(&path, format!("split `{name}` has no `shardLengths`")))?
                .iter()
                .map(|x| count(x).ok_or_else(|| fmt_err(&path, format!("split `{name}`: shardLengths entry {x} is not a count"))))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(SplitInfo { name, shard_lengths, template: s["filepathTemplate"].as_str().map(String::from) })
        })
        .collect::<Result<Vec<_>, DataError>>()?;
    Ok((name, splits))
}

/// The path of shard `i` of `split`.
pub fn shard_path(dir: &Path, dataset: &str, split: &SplitInfo, i: usize) -> PathBuf {
    let n = split.shard_lengths.len();
    let x_of_y = format!("{i:05}-of-{n:05}");
    let name = match &split.template {
        Some(t) => t.replace("{DATASET}", dataset).replace("{SPLIT}", &split.name).replace("{FILEFORMAT}", "tfrecord").replace("{SHARD_X_OF_Y}", &x_of_y),
        None => format!("{dataset}-{}.tfrecord-{x_of_y}", split.name),
    };
    dir.join(name)
}

/// Records `[from, to)` of a TFDS split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    /// The TFDS split.
    pub split: String,
    /// First record.
    pub from: usize,
    /// One past the last record.
    pub to: usize,
}

impl std::fmt::Display for Slice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}:{}]", self.split, self.from, self.to)
    }
}

/// One record of a slice: where it is and what it holds.
#[derive(Clone, Debug)]
pub struct Record {
    /// The shard file.
    pub shard: PathBuf,
    /// Its index in the shard.
    pub index: usize,
    /// The Example.
    pub example: Example,
}

/// Reads `slice` of the dataset prepared in `dir`: for each shard in order, the records it
/// covers (skip/take as `tfds` computes them), so only those shards are opened.
pub fn read_slice(dir: &Path, dataset: &str, split: &SplitInfo, slice: &Slice, skip_bad: bool, skipped: &mut Skipped) -> Result<Vec<Record>, DataError> {
    let mut out = Vec::with_capacity(slice.to.saturating_sub(slice.from));
    let mut start = 0usize;
    for (i, &n) in split.shard_lengths.iter().enumerate() {
        let end = start + n;
        if slice.from < end && slice.to > start {
            let skip = slice.from.saturating_sub(start);
            let take = slice.to.min(end) - start - skip;
            let path = shard_path(dir, dataset, split, i);
            if !path.is_file() {
                return Err(fmt_err(&path, format!("missing shard {i} of {} of split `{}` (dataset_info.json lists it)", split.shard_lengths.len(), split.name)));
            }
            for (index, data) in read_records(&path, skip, Some(take), skip_bad, skipped)? {
                match <Example as prost::Message>::decode(data.as_slice()) {
                    Ok(example) => out.push(Record { shard: path.clone(), index, example }),
                    Err(e) if skip_bad => {
                        let _ = e;
                        skipped.corrupt += 1;
                    }
                    Err(e) => return Err(fmt_err(&path, format!("record {index}: not a tf.train.Example: {e}"))),
                }
            }
        }
        start = end;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The VTAB-1k tasks.

/// How a task's `val200` is sliced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Val {
    /// `train[T:T+200]`, T = p·N//100 of the TFDS train split.
    TrainAt(usize),
    /// `validation[:200]`.
    Validation,
    /// `test[:200]`.
    TestHead,
}

/// How a task's `test` is sliced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Test {
    /// The TFDS `test` split.
    Test,
    /// `train[T+V:]`, T = p·N//100, V = q·N//100 of the TFDS train split.
    TrainAfter(usize, usize),
    /// `test[50%:]` (the percent bound rounded as Python's `round`).
    TestSecondHalf,
    /// The TFDS `validation` split.
    Validation,
}

/// Where a task's label comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Label {
    /// An int64 feature as stored.
    Key(&'static str),
    /// `floor(v / (values / classes))` of an int64 feature with `values` distinct values
    /// (dsprites' 16-class position and orientation).
    Binned(&'static str, usize),
    /// clevr count_all: the number of objects minus 3.
    ClevrCount,
    /// clevr closest_object_distance: the smallest depth (`objects/pixel_coords` z), binned.
    ClevrDistance,
    /// kitti closest_vehicle_distance: the smallest depth (`objects/location` z) of a Car, Van
    /// or Truck (1000 with none), binned.
    KittiDistance,
}

/// One VTAB-1k task as task_adaptation defines it.
#[derive(Clone, Copy, Debug)]
pub struct TfdsTask {
    /// The task's VTAB name (as [`super::files::VTAB_TASKS`], whose aliases apply).
    pub vtab: &'static str,
    /// TFDS dataset.
    pub dataset: &'static str,
    /// TFDS config.
    pub config: Option<&'static str>,
    /// Versions read, in order of preference: the one VPT used first.
    pub versions: &'static [&'static str],
    /// Any other version task_adaptation accepts starts with this (`3.` for `3.*.*`).
    pub version_prefix: &'static str,
    /// `val200`.
    pub val: Val,
    /// `test`.
    pub test: Test,
    /// The label.
    pub label: Label,
    /// Classes.
    pub classes: usize,
    /// One-channel images, tiled to three (times `scale`).
    pub gray: bool,
    /// Pixel scale (dsprites stores 0/1).
    pub scale: u8,
    /// The task_adaptation file that defines it.
    pub source: &'static str,
}

const fn task(vtab: &'static str, dataset: &'static str, config: Option<&'static str>, versions: &'static [&'static str], version_prefix: &'static str, val: Val, test: Test, label: Label, classes: usize, source: &'static str) -> TfdsTask {
    TfdsTask { vtab, dataset, config, versions, version_prefix, val, test, label, classes, gray: false, scale: 1, source }
}

/// Every VTAB-1k task, each row from its task_adaptation file (`task_adaptation/data/*.py`,
/// commit d7630d3; VPT's copies differ only in kitti's version) and the versions of VPT's
/// VTAB_SETUP.md.
pub const TFDS_TASKS: [TfdsTask; 19] = [
    task("cifar", "cifar100", None, &["3.0.2"], "3.", Val::TrainAt(90), Test::Test, Label::Key("label"), 100, "data/cifar.py"),
    task("caltech101", "caltech101", None, &["3.0.1"], "3.", Val::TrainAt(90), Test::Test, Label::Key("label"), 102, "data/caltech.py"),
    task("dtd", "dtd", None, &["3.0.1"], "3.", Val::Validation, Test::Test, Label::Key("label"), 47, "data/dtd.py"),
    task("oxford_flowers102", "oxford_flowers102", None, &["2.1.1"], "2.", Val::Validation, Test::Test, Label::Key("label"), 102, "data/oxford_flowers102.py"),
    task("oxford_iiit_pet", "oxford_iiit_pet", None, &["3.2.0"], "3.", Val::TrainAt(80), Test::Test, Label::Key("label"), 37, "data/oxford_iiit_pet.py"),
    task("svhn", "svhn_cropped", None, &["3.0.0"], "3.", Val::TrainAt(90), Test::Test, Label::Key("label"), 10, "data/svhn.py"),
    task("sun397", "sun397", Some("tfds"), &["4.0.0"], "4.", Val::Validation, Test::Test, Label::Key("label"), 397, "data/sun397.py"),
    task("patch_camelyon", "patch_camelyon", None, &["2.0.0"], "2.", Val::Validation, Test::Test, Label::Key("label"), 2, "data/patch_camelyon.py"),
    task("eurosat", "eurosat", Some("rgb"), &["2.0.0"], "2.", Val::TrainAt(60), Test::TrainAfter(60, 20), Label::Key("label"), 10, "data/eurosat.py"),
    task("resisc45", "resisc45", None, &["3.0.0"], "3.", Val::TrainAt(60), Test::TrainAfter(60, 20), Label::Key("label"), 45, "data/resisc45.py"),
    task("diabetic_retinopathy", "diabetic_retinopathy_detection", Some("btgraham-300"), &["3.0.0"], "3.", Val::Validation, Test::Test, Label::Key("label"), 5, "data/diabetic_retinopathy.py"),
    task("clevr_count", "clevr", None, &["3.1.0"], "3.", Val::TrainAt(90), Test::Validation, Label::ClevrCount, 8, "data/clevr.py (count_all)"),
    task("clevr_dist", "clevr", None, &["3.1.0"], "3.", Val::TrainAt(90), Test::Validation, Label::ClevrDistance, 6, "data/clevr.py (closest_object_distance)"),
    // dmlab: task_adaptation asks for exactly 2.0.1.
    task("dmlab", "dmlab", None, &["2.0.1"], "2.0.1", Val::Validation, Test::Test, Label::Key("label"), 6, "data/dmlab.py"),
    // kitti: task_adaptation asks for 3.1.0, VPT for 3.2.0 (the same data, task_adaptation issue #18).
    task("kitti", "kitti", None, &["3.2.0", "3.1.0"], "3.", Val::Validation, Test::Test, Label::KittiDistance, 4, "data/kitti.py (closest_vehicle_distance)"),
    TfdsTask { gray: true, scale: 255, ..task("dsprites_loc", "dsprites", None, &["2.0.0"], "2.", Val::TrainAt(80), Test::TrainAfter(80, 10), Label::Binned("label_x_position", 32), 16, "data/dsprites.py (label_x_position, 16 classes)") },
    TfdsTask { gray: true, scale: 255, ..task("dsprites_ori", "dsprites", None, &["2.0.0"], "2.", Val::TrainAt(80), Test::TrainAfter(80, 10), Label::Binned("label_orientation", 40), 16, "data/dsprites.py (label_orientation, 16 classes)") },
    TfdsTask { gray: true, ..task("smallnorb_azi", "smallnorb", None, &["2.0.0"], "2.", Val::TestHead, Test::TestSecondHalf, Label::Key("label_azimuth"), 18, "data/smallnorb.py (label_azimuth)") },
    TfdsTask { gray: true, ..task("smallnorb_ele", "smallnorb", None, &["2.0.0"], "2.", Val::TestHead, Test::TestSecondHalf, Label::Key("label_elevation"), 9, "data/smallnorb.py (label_elevation)") },
];

/// The TFDS definition of a VTAB task name or alias.
pub fn tfds_task(name: &str) -> Result<&'static TfdsTask, String> {
    let (folder, _) = super::files::vtab_task(name)?;
    Ok(TFDS_TASKS.iter().find(|t| t.vtab == folder).expect("every VTAB task has a TFDS row"))
}

/// Python's `round` (half to even) of `x`, for TFDS's percent bounds.
fn round_half_even(x: f64) -> usize {
    let r = x.round();
    let r = if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 { r - x.signum() } else { r };
    r as usize
}

impl TfdsTask {
    /// `<root>/<dataset>[/<config>]`.
    pub fn dataset_dir(&self, root: &Path) -> PathBuf {
        let d = root.join(self.dataset);
        match self.config {
            Some(c) => d.join(c),
            None => d,
        }
    }

    /// The prepared version directory under `root`: the first of [`TfdsTask::versions`] present,
    /// otherwise the highest other version task_adaptation accepts; an error names the folder
    /// and what it holds.
    pub fn version_dir(&self, root: &Path) -> Result<PathBuf, DataError> {
        let base = self.dataset_dir(root);
        let name = match self.config {
            Some(c) => format!("{}/{c}", self.dataset),
            None => self.dataset.to_string(),
        };
        if !base.is_dir() {
            return Err(fmt_err(
                &base,
                format!("no TFDS dataset `{name}` here (prepare it with tensorflow_datasets, e.g. tfds.builder(\"{name}:{}\", data_dir=ROOT).download_and_prepare())", self.versions[0]),
            ));
        }
        for v in self.versions {
            if base.join(v).join("dataset_info.json").is_file() {
                return Ok(base.join(v));
            }
        }
        let found: Vec<String> = std::fs::read_dir(&base)
            .map_err(|e| io_err(&base, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("dataset_info.json").is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let key = |v: &String| v.split('.').map(|p| p.parse::<u64>().unwrap_or(0)).collect::<Vec<_>>();
        let best = found.iter().filter(|v| v.starts_with(self.version_prefix)).max_by_key(|v| key(v));
        match best {
            Some(v) => Ok(base.join(v)),
            None => Err(fmt_err(
                &base,
                format!(
                    "no prepared version task_adaptation reads ({} or {}*; found: {})",
                    self.versions.join(", "),
                    self.version_prefix,
                    if found.is_empty() { "none".to_string() } else { found.join(", ") }
                ),
            )),
        }
    }

    /// The TFDS slices of VTAB split `vtab_split` (`train800`, `val200`, `train800val200`,
    /// `test`), given the TFDS splits' sizes; a slice longer than its split is an error.
    pub fn slices(&self, vtab_split: &str, splits: &[SplitInfo]) -> Result<Vec<Slice>, String> {
        let size = |name: &str| -> Result<usize, String> {
            splits.iter().find(|s| s.name == name).map(SplitInfo::len).ok_or_else(|| {
                format!("the dataset has no `{name}` split (it has {})", splits.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "))
            })
        };
        let s = |split: &str, from: usize, to: usize| Slice { split: split.into(), from, to };
        let train800 = || -> Result<Vec<Slice>, String> { Ok(vec![s("train", 0, 800)]) };
        let val200 = || -> Result<Vec<Slice>, String> {
            Ok(vec![match self.val {
                Val::TrainAt(p) => {
                    let t = p * size("train")? / 100;
                    s("train", t, t + 200)
                }
                Val::Validation => s("validation", 0, 200),
                Val::TestHead => s("test", 0, 200),
            }])
        };
        let slices = match vtab_split {
            "train800" => train800()?,
            "val200" => val200()?,
            "train800val200" => [train800()?, val200()?].concat(),
            "test" => vec![match self.test {
                Test::Test => s("test", 0, size("test")?),
                Test::Validation => s("validation", 0, size("validation")?),
                Test::TrainAfter(p, q) => {
                    let n = size("train")?;
                    s("train", p * n / 100 + q * n / 100, n)
                }
                Test::TestSecondHalf => {
                    let n = size("test")?;
                    s("test", round_half_even(50.0 * n as f64 / 100.0), n)
                }
            }],
            other => return Err(format!("unknown VTAB-1k split `{other}` (train800, val200, train800val200, test)")),
        };
        for sl in &slices {
            let n = size(&sl.split)?;
            if sl.to > n {
                return Err(format!("{} is `{}` of the TFDS split `{}`, which has only {n} records (a smaller download than the real dataset?)", vtab_split, sl, sl.split));
            }
        }
        Ok(slices)
    }

    /// The label of `ex`, checked against the classes.
    pub fn label(&self, ex: &Example) -> Result<usize, String> {
        self.in_range(self.raw_label(ex)?)
    }

    fn in_range(&self, v: i64) -> Result<usize, String> {
        usize::try_from(v).ok().filter(|&l| l < self.classes).ok_or_else(|| format!("label {v} is out of range for the task's {} classes", self.classes))
    }

    /// The label value of `ex` as the task defines it, before the class-count check; an error
    /// is a missing or mistyped feature.
    fn raw_label(&self, ex: &Example) -> Result<i64, String> {
        let ints = |k: &str| ex.ints(k).ok_or_else(|| format!("feature `{k}` is not an int64 list"));
        let floats = |k: &str| ex.floats(k).ok_or_else(|| format!("feature `{k}` is not a float list"));
        // The last bin whose threshold lies below `d` (task_adaptation: reduce_max(where(thr < d))).
        let bin = |thr: &[f32], d: f32| thr.iter().rposition(|&t| t < d).unwrap_or(0) as i64;
        let v: i64 = match self.label {
            Label::Key(k) => *ints(k)?.first().ok_or_else(|| format!("feature `{k}` missing from the Example"))?,
            Label::Binned(k, values) => {
                let x = *ints(k)?.first().ok_or_else(|| format!("feature `{k}` missing from the Example"))?;
                (x as f64 / (values as f64 / self.classes as f64)).floor() as i64
            }
            Label::ClevrCount => ints("objects/size")?.len() as i64 - 3,
            Label::ClevrDistance => {
                let z = floats("objects/pixel_coords")?;
                let d = z.iter().skip(2).step_by(3).copied().fold(f32::INFINITY, f32::min);
                if !d.is_finite() {
                    return Err("clevr closest_object_distance: the Example has no objects/pixel_coords".into());
                }
                bin(&[0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0], d)
            }
            Label::KittiDistance => {
                let types = ints("objects/type")?;
                let loc = floats("objects/location")?;
                if loc.len() != 3 * types.len() {
                    return Err(format!("kitti: {} objects/type but {} objects/location values", types.len(), loc.len()));
                }
                let d = types.iter().zip(loc.chunks(3)).filter(|(t, _)| **t < 3).map(|(_, l)| l[2]).fold(1000.0f32, f32::min);
                bin(&[-100.0, 8.0, 20.0, 999.0], d)
            }
        };
        Ok(v)
    }

    /// Decodes the Example's image as task_adaptation feeds it: RGB (grey replicated, alpha
    /// dropped), or for the one-channel datasets the grey values times `scale` tiled to three.
    pub fn image(&self, ex: &Example) -> Result<RawImage, String> {
        let bytes = ex.bytes("image").and_then(|b| b.first()).ok_or("feature `image` missing from the Example")?;
        let img = image::load_from_memory(bytes).map_err(|e| format!("cannot decode image: {}", e.to_string().lines().map(str::trim).collect::<Vec<_>>().join("; ")))?;
        let (width, height) = (img.width() as usize, img.height() as usize);
        let pixels: Vec<u8> = if self.gray {
            img.into_luma8().into_raw().into_iter().flat_map(|p| [p.saturating_mul(self.scale); 3]).collect()
        } else {
            img.into_rgb8().into_raw()
        };
        Ok(RawImage { height, width, channels: 3, pixels: Arc::from(pixels) })
    }

    /// The records of VTAB split `vtab_split` under `root`, in TFDS's slice order (each slice's
    /// shards in order), undecoded.
    pub fn records(&self, root: &Path, vtab_split: &str, skip_bad: bool, skipped: &mut Skipped) -> Result<Vec<Record>, DataError> {
        let dir = self.version_dir(root)?;
        let (dataset, splits) = read_dataset_info(&dir)?;
        let info = dir.join("dataset_info.json");
        let slices = self.slices(vtab_split, &splits).map_err(|e| fmt_err(&info, format!("VTAB task {}: {e}", self.vtab)))?;
        let mut out = Vec::new();
        for sl in &slices {
            let split = splits.iter().find(|s| s.name == sl.split).expect("checked by slices");
            out.extend(read_slice(&dir, &dataset, split, sl, skip_bad, skipped)?);
        }
        Ok(out)
    }
}

/// VTAB split `vtab_split` of `task` from the TFDS data dir `root`, decoded on `threads`
/// threads: the samples, what `skip_bad` skipped, and the task's class count.
pub fn load_vtab(root: &Path, task: &str, vtab_split: &str, skip_bad: bool, threads: usize) -> Result<(Vec<Sample>, Skipped, usize), DataError> {
    let t = tfds_task(task).map_err(|e| fmt_err(root, e))?;
    let mut skipped = Skipped::default();
    let records = t.records(root, vtab_split, skip_bad, &mut skipped)?;
    let chunk = records.len().div_ceil(threads.max(1)).max(1);
    // An error carries whether it is only a label outside the classes (counted as such with
    // `skip_bad`) or a damaged example (a missing feature, an image that does not decode).
    let decoded: Vec<Result<Sample, (PathBuf, usize, String, bool)>> = std::thread::scope(|s| {
        let handles: Vec<_> = records
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|r| {
                            let v = t.raw_label(&r.example).map_err(|e| (r.shard.clone(), r.index, e, false))?;
                            let label = t.in_range(v).map_err(|e| (r.shard.clone(), r.index, e, true))?;
                            let image = t.image(&r.example).map_err(|e| (r.shard.clone(), r.index, e, false))?;
                            Ok(Sample { image, label })
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("decoder thread")).collect()
    });
    let mut samples = Vec::with_capacity(decoded.len());
    for d in decoded {
        match d {
            Ok(s) => samples.push(s),
            Err((_, _, _, true)) if skip_bad => skipped.bad_label += 1,
            Err(_) if skip_bad => skipped.corrupt += 1,
            Err((shard, index, msg, _)) => return Err(fmt_err(&shard, format!("record {index}: {msg}"))),
        }
    }
    if samples.is_empty() {
        return Err(fmt_err(&t.version_dir(root)?, format!("VTAB split {vtab_split} of {} has no usable example", t.vtab)));
    }
    Ok((samples, skipped, t.classes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn frame(data: &[u8]) -> Vec<u8> {
        let len = (data.len() as u64).to_le_bytes();
        let mut out = len.to_vec();
        out.extend(masked_crc32c(&len).to_le_bytes());
        out.extend(data);
        out.extend(masked_crc32c(data).to_le_bytes());
        out
    }

    fn example(pairs: Vec<(&str, FeatureKind)>) -> Example {
        Example { features: Some(Features { feature: pairs.into_iter().map(|(k, v)| (k.to_string(), Feature { kind: Some(v) })).collect() }) }
    }

    #[test]
    fn the_masked_crc_is_tensorflows() {
        // CRC-32C's standard check value, then TensorFlow's mask (crc32c.h: rotate right by 15,
        // add 0xa282ead8). The fixtures written by TensorFlow check the whole framing.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283, "CRC-32C check value");
        let c = crc32c::crc32c(b"123456789");
        assert_eq!(masked_crc32c(b"123456789"), ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8));
    }

    #[test]
    fn records_are_sliced_checked_and_damage_is_one_line_or_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("x.tfrecord");
        let recs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 3 + i as usize]).collect();
        let bytes: Vec<u8> = recs.iter().flat_map(|r| frame(r)).collect();
        std::fs::write(&path, &bytes).unwrap();
        let mut sk = Skipped::default();
        let got = read_records(&path, 1, Some(3), false, &mut sk).unwrap();
        assert_eq!(got.iter().map(|(i, d)| (*i, d.clone())).collect::<Vec<_>>(), (1..4).map(|i| (i, recs[i].clone())).collect::<Vec<_>>());
        assert_eq!(read_records(&path, 0, None, false, &mut sk).unwrap().len(), 5);
        // A flipped data byte in record 2.
        let mut bad = bytes.clone();
        let off = frame(&recs[0]).len() + frame(&recs[1]).len() + 12;
        bad[off] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let e = read_records(&path, 0, None, false, &mut sk).unwrap_err().to_string();
        assert!(e.contains("x.tfrecord") && e.contains("record 2") && e.contains("CRC"), "{e}");
        let mut sk = Skipped::default();
        let got = read_records(&path, 0, None, true, &mut sk).unwrap();
        assert_eq!((got.len(), sk.corrupt), (4, 1));
        // Skipped records are not read, so damage there is not seen.
        assert_eq!(read_records(&path, 3, Some(2), false, &mut sk).unwrap().len(), 2);
        // Truncated.
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let e = read_records(&path, 0, None, false, &mut sk).unwrap_err().to_string();
        assert!(e.contains("record 4: truncated"), "{e}");
        let e = read_records(&path, 0, Some(9), false, &mut Skipped::default()).unwrap_err().to_string();
        assert!(e.contains("truncated") || e.contains("fewer"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn slices_follow_task_adaptation() {
        let info = |pairs: &[(&str, &[usize])]| pairs.iter().map(|(n, l)| SplitInfo { name: n.to_string(), shard_lengths: l.to_vec(), template: None }).collect::<Vec<_>>();
        let show = |t: &str, split: &str, s: &[SplitInfo]| tfds_task(t).unwrap().slices(split, s).map(|v| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("+"));
        let cifar = info(&[("train", &[25000, 25000]), ("test", &[10000])]);
        assert_eq!(show("cifar100", "train800", &cifar).unwrap(), "train[0:800]");
        assert_eq!(show("cifar100", "val200", &cifar).unwrap(), "train[45000:45200]");
        assert_eq!(show("cifar100", "train800val200", &cifar).unwrap(), "train[0:800]+train[45000:45200]");
        assert_eq!(show("cifar100", "test", &cifar).unwrap(), "test[0:10000]");
        let eurosat = info(&[("train", &[13500, 13500])]);
        assert_eq!(show("eurosat", "val200", &eurosat).unwrap(), "train[16200:16400]");
        assert_eq!(show("eurosat", "test", &eurosat).unwrap(), "train[21600:27000]");
        let resisc = info(&[("train", &[31500])]);
        assert_eq!(show("resisc45", "test", &resisc).unwrap(), "train[25200:31500]");
        let dsprites = info(&[("train", &[737280])]);
        assert_eq!(show("dsprites_loc", "val200", &dsprites).unwrap(), "train[589824:590024]");
        assert_eq!(show("dsprites_ori", "test", &dsprites).unwrap(), "train[663552:737280]");
        let norb = info(&[("train", &[24300]), ("test", &[24300])]);
        assert_eq!(show("smallnorb_azi", "val200", &norb).unwrap(), "test[0:200]");
        assert_eq!(show("smallnorb_ele", "test", &norb).unwrap(), "test[12150:24300]");
        let clevr = info(&[("train", &[70000]), ("validation", &[15000]), ("test", &[15000])]);
        assert_eq!(show("clevr_count", "val200", &clevr).unwrap(), "train[63000:63200]");
        assert_eq!(show("clevr_dist", "test", &clevr).unwrap(), "validation[0:15000]");
        let dtd = info(&[("train", &[1880]), ("validation", &[1880]), ("test", &[1880])]);
        assert_eq!(show("dtd", "train800val200", &dtd).unwrap(), "train[0:800]+validation[0:200]");
        // Python's round is half to even: 50% of 5 is 2 (2.5 -> 2), of 7 is 4 (3.5 -> 4).
        assert_eq!((round_half_even(2.5), round_half_even(3.5), round_half_even(12150.0)), (2, 4, 12150));
        // Too small a split, a missing split, an unknown split name.
        let e = show("cifar100", "val200", &info(&[("train", &[1000]), ("test", &[10])])).unwrap_err();
        assert!(e.contains("train[900:1100]") && e.contains("only 1000 records"), "{e}");
        assert!(show("dtd", "val200", &info(&[("train", &[900])])).unwrap_err().contains("no `validation` split"));
        assert!(show("dtd", "val", &dtd).unwrap_err().contains("unknown VTAB-1k split"));
        // Every task has a row, and every row's class count is the VTAB one.
        for (folder, _, classes) in super::super::files::VTAB_TASKS {
            assert_eq!(tfds_task(folder).unwrap().classes, classes, "{folder}");
        }
    }

    #[test]
    fn derived_labels_follow_task_adaptation() {
        let ints = |v: Vec<i64>| FeatureKind::Int64List(Int64List { value: v });
        let floats = |v: Vec<f32>| FeatureKind::FloatList(FloatList { value: v });
        let t = |name: &str| tfds_task(name).unwrap();
        let clevr = |zs: &[f32]| example(vec![("objects/size", ints(vec![0; zs.len()])), ("objects/pixel_coords", floats(zs.iter().flat_map(|&z| [1.0, 2.0, z]).collect()))]);
        assert_eq!(t("clevr_count").label(&clevr(&[9.0; 5])).unwrap(), 2);
        assert!(t("clevr_count").label(&clevr(&[9.0; 2])).unwrap_err().contains("out of range"));
        for (zs, want) in [(vec![12.0, 7.9], 0), (vec![8.2, 30.0], 1), (vec![8.5], 1), (vec![8.6], 2), (vec![9.7, 11.0], 4), (vec![10.5], 5)] {
            assert_eq!(t("clevr_dist").label(&clevr(&zs)).unwrap(), want, "{zs:?}");
        }
        let kitti = |objs: &[(i64, f32)]| example(vec![("objects/type", ints(objs.iter().map(|o| o.0).collect())), ("objects/location", floats(objs.iter().flat_map(|o| [0.0, 0.0, o.1]).collect()))]);
        assert_eq!(t("kitti").label(&kitti(&[(0, 5.0), (1, 30.0)])).unwrap(), 0);
        assert_eq!(t("kitti").label(&kitti(&[(3, 5.0), (2, 15.0)])).unwrap(), 1, "pedestrians (type 3) do not count");
        assert_eq!(t("kitti").label(&kitti(&[(1, 25.0)])).unwrap(), 2);
        assert_eq!(t("kitti").label(&kitti(&[(4, 5.0)])).unwrap(), 3, "no vehicle: 1000");
        let ds = |k: &str, v: i64| example(vec![(k, ints(vec![v]))]);
        assert_eq!(t("dsprites_loc").label(&ds("label_x_position", 31)).unwrap(), 15);
        assert_eq!(t("dsprites_loc").label(&ds("label_x_position", 2)).unwrap(), 1);
        assert_eq!(t("dsprites_ori").label(&ds("label_orientation", 39)).unwrap(), 15);
        assert_eq!(t("dsprites_ori").label(&ds("label_orientation", 5)).unwrap(), 2);
        assert_eq!(t("smallnorb_ele").label(&ds("label_elevation", 8)).unwrap(), 8);
        assert!(t("dtd").label(&ds("other", 1)).unwrap_err().contains("`label` missing"));
        // Round trip through prost, as the shards hold them.
        let ex = kitti(&[(0, 5.0)]);
        assert_eq!(Example::decode(ex.encode_to_vec().as_slice()).unwrap(), ex);
    }
}
