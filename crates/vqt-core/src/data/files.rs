//! Image datasets on disk: VTAB-1k in the NOAH layout (and the SynQT JSON variant), FGVC JSON
//! splits (VPT convention) and ImageFolder trees (formats.md §2). Every reader first produces
//! [`Entry`]s (image path, label, and where the pair was declared), then [`load`] decodes them
//! with the `image` crate, in parallel, checking labels against the class count.
//!
//! Bad input stops with one line naming the file (and line): a malformed line, a label out of
//! range, a missing or corrupt image, an empty split, a wrong class count. With `skip_bad` the
//! missing/corrupt images and out-of-range labels are skipped and counted instead.

use super::{DataError, RawImage, Sample};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One declared example: the image file, its label and where the pair was declared.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// Image file.
    pub path: PathBuf,
    /// Class id as declared.
    pub label: usize,
    /// `file:line` (or the file) that declared it.
    pub origin: String,
}

/// What `skip_bad` skipped, by reason.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    /// Images that do not exist.
    pub missing: usize,
    /// Images that could not be decoded.
    pub corrupt: usize,
    /// Labels outside `0..num_classes`.
    pub bad_label: usize,
}

impl Skipped {
    /// Total skipped.
    pub fn total(&self) -> usize {
        self.missing + self.corrupt + self.bad_label
    }
}

fn fmt_err(path: &Path, msg: impl Into<String>) -> DataError {
    DataError::Format { path: path.to_path_buf(), msg: msg.into() }
}

fn read_text(path: &Path) -> Result<String, DataError> {
    std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.to_path_buf(), error: source })
}

/// VTAB-1k tasks: NOAH folder name, accepted aliases, class count (formats.md §2.1).
pub const VTAB_TASKS: [(&str, &[&str], usize); 19] = [
    ("cifar", &["cifar100", "cifar_100"], 100),
    ("caltech101", &[], 102),
    ("dtd", &[], 47),
    ("oxford_flowers102", &["flowers102"], 102),
    ("oxford_iiit_pet", &["pets", "oxford_pet"], 37),
    ("svhn", &[], 10),
    ("sun397", &[], 397),
    ("patch_camelyon", &["pcam"], 2),
    ("eurosat", &[], 10),
    ("resisc45", &[], 45),
    ("diabetic_retinopathy", &["retinopathy"], 5),
    ("clevr_count", &[], 8),
    ("clevr_dist", &[], 6),
    ("dmlab", &[], 6),
    ("kitti", &[], 4),
    ("dsprites_loc", &[], 16),
    ("dsprites_ori", &[], 16),
    ("smallnorb_azi", &[], 18),
    ("smallnorb_ele", &[], 9),
];

/// The NOAH folder name and class count of a VTAB task name or alias.
pub fn vtab_task(name: &str) -> Result<(&'static str, usize), String> {
    let n = name.to_lowercase().replace('-', "_");
    VTAB_TASKS
        .iter()
        .find(|(f, aliases, _)| *f == n || aliases.contains(&n.as_str()))
        .map(|(f, _, c)| (*f, *c))
        .ok_or_else(|| format!("unknown VTAB task `{name}` (known: {})", VTAB_TASKS.iter().map(|t| t.0).collect::<Vec<_>>().join(", ")))
}

/// The VTAB group of a task (`Natural`, `Specialized`, `Structured`), by name or alias.
pub fn vtab_group(name: &str) -> Result<&'static str, String> {
    let (folder, _) = vtab_task(name)?;
    let i = VTAB_TASKS.iter().position(|t| t.0 == folder).expect("known task");
    Ok(match i {
        0..=6 => "Natural",
        7..=10 => "Specialized",
        _ => "Structured",
    })
}

/// Expected line counts of the NOAH split files (checked on import).
pub fn vtab_split_size(split: &str) -> Option<usize> {
    match split {
        "train800" => Some(800),
        "val200" => Some(200),
        "train800val200" => Some(1000),
        _ => None,
    }
}

/// Parses a NOAH split file (`relpath label` per line, relative to the file's folder). Lines are
/// split at the last run of whitespace, so paths may contain spaces.
pub fn read_noah_list(file: &Path) -> Result<Vec<Entry>, DataError> {
    let text = read_text(file)?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", file.display(), i + 1);
        let (rel, label) = line
            .rsplit_once(|c: char| c.is_whitespace())
            .map(|(r, l)| (r.trim_end(), l))
            .filter(|(r, _)| !r.trim().is_empty())
            .ok_or_else(|| fmt_err(file, format!("line {}: expected `path label`, found `{line}`", i + 1)))?;
        let label: usize = label.parse().map_err(|_| fmt_err(file, format!("line {}: label `{label}` is not a non-negative integer", i + 1)))?;
        // `img.jpg 5 7` is a line with two labels, not the path `img.jpg 5`: a path may contain
        // spaces, but not end in a separate number.
        if let Some((_, last)) = rel.rsplit_once(|c: char| c.is_whitespace()) {
            if last.parse::<usize>().is_ok() {
                return Err(fmt_err(file, format!("line {}: `{line}` ends in two numbers: expected `path label`, one label per line", i + 1)));
            }
        }
        out.push(Entry { path: base.join(rel.trim()), label, origin: at });
    }
    Ok(out)
}

/// One VTAB split in the NOAH layout: `<root>/<task>/<split>.txt`, or, when that file does not
/// exist, the SynQT variant `<root>/<task>/<split>.json` (an array of `{"relpath": label}`
/// objects, images under `<root>/<task>/images/`). `check_count` enforces the split sizes.
pub fn read_vtab_split(root: &Path, task: &str, split: &str, check_count: bool) -> Result<Vec<Entry>, DataError> {
    let (folder, _) = vtab_task(task).map_err(|e| fmt_err(root, e))?;
    let dir = root.join(folder);
    let txt = dir.join(format!("{split}.txt"));
    let json = dir.join(format!("{split}.json"));
    let (file, entries) = if txt.exists() || !json.exists() {
        (txt.clone(), read_noah_list(&txt)?)
    } else {
        (json.clone(), read_synqt_json(&json, &dir.join("images"))?)
    };
    if entries.is_empty() {
        return Err(fmt_err(&file, "the split is empty"));
    }
    if let (true, Some(n)) = (check_count, vtab_split_size(split)) {
        if entries.len() != n {
            return Err(fmt_err(&file, format!("{} lines, but VTAB-1k's {split} has {n}", entries.len())));
        }
    }
    Ok(entries)
}

/// The SynQT JSON grammar: `[ {"relpath": label}, … ]`, paths relative to `images`.
pub fn read_synqt_json(file: &Path, images: &Path) -> Result<Vec<Entry>, DataError> {
    let v: serde_json::Value = serde_json::from_str(&read_text(file)?).map_err(|e| fmt_err(file, format!("not JSON: {e}")))?;
    let arr = v.as_array().ok_or_else(|| fmt_err(file, "expected a JSON array of {\"path\": label} objects"))?;
    let mut out = Vec::new();
    for (i, item) in arr.iter().enumerate() {
        let obj = item.as_object().filter(|o| o.len() == 1).ok_or_else(|| fmt_err(file, format!("item {i}: expected one {{\"path\": label}} pair")))?;
        let (rel, label) = obj.iter().next().expect("one pair");
        let label = label.as_u64().ok_or_else(|| fmt_err(file, format!("item {i}: label {label} is not a non-negative integer")))?;
        out.push(Entry { path: images.join(rel), label: label as usize, origin: format!("{} item {i}", file.display()) });
    }
    Ok(out)
}

/// FGVC splits (VPT convention): `<root>/{train,val,test}.json`, each one object
/// `{"relpath": class_id}`, images under `<root>/<image_root>`. Class ids are remapped to
/// `0..C` by sorting the ids found in all three files. Returns the three splits and C.
pub fn read_fgvc(root: &Path, image_root: &Path) -> Result<([Vec<Entry>; 3], usize), DataError> {
    let mut raw: Vec<Vec<(String, u64)>> = Vec::new();
    for split in ["train", "val", "test"] {
        let file = root.join(format!("{split}.json"));
        let v: serde_json::Value = serde_json::from_str(&read_text(&file)?).map_err(|e| fmt_err(&file, format!("not JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| fmt_err(&file, "expected one JSON object {\"path\": class_id, …}"))?;
        if obj.is_empty() {
            return Err(fmt_err(&file, "the split is empty"));
        }
        let mut items = Vec::new();
        for (rel, id) in obj {
            let id = id.as_u64().ok_or_else(|| fmt_err(&file, format!("`{rel}`: class id {id} is not a non-negative integer")))?;
            items.push((rel.clone(), id));
        }
        raw.push(items);
    }
    let ids: std::collections::BTreeSet<u64> = raw.iter().flatten().map(|(_, id)| *id).collect();
    let map: BTreeMap<u64, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let img_root = root.join(image_root);
    let splits = ["train", "val", "test"];
    let mut out: Vec<Vec<Entry>> = Vec::new();
    for (s, items) in raw.into_iter().enumerate() {
        let file = root.join(format!("{}.json", splits[s]));
        out.push(items.into_iter().map(|(rel, id)| Entry { path: img_root.join(&rel), label: map[&id], origin: format!("{} `{rel}`", file.display()) }).collect());
    }
    let [a, b, c]: [Vec<Entry>; 3] = out.try_into().expect("three splits");
    Ok(([a, b, c], map.len()))
}

/// ImageFolder: `root/<class>/*.{jpg,jpeg,png,bmp}`; class id = index of the folder name in the
/// sorted list. Returns the entries and the class names.
pub fn read_image_folder(root: &Path) -> Result<(Vec<Entry>, Vec<String>), DataError> {
    let io = |source| DataError::Io { path: root.to_path_buf(), error: source };
    let mut classes: Vec<String> = std::fs::read_dir(root)
        .map_err(io)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    classes.sort();
    let mut out = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let dir = root.join(class);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|source| DataError::Io { path: dir.clone(), error: source })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()).is_some_and(|e| ["jpg", "jpeg", "png", "bmp"].contains(&e.to_lowercase().as_str())))
            .collect();
        files.sort();
        out.extend(files.into_iter().map(|path| Entry { origin: path.display().to_string(), path, label }));
    }
    if out.is_empty() {
        return Err(fmt_err(root, "no images (expected root/<class>/*.jpg|jpeg|png|bmp)"));
    }
    Ok((out, classes))
}

/// Decodes one image file to 8-bit grey or RGB.
pub fn decode(path: &Path) -> Result<RawImage, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.to_path_buf(), error: source })?;
    let img = image::load_from_memory(&bytes).map_err(|e| {
        // The decoders' messages can span lines (a truncated JPEG): keep the error on one.
        let msg = e.to_string().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
        fmt_err(path, format!("cannot decode image: {msg}"))
    })?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    let (channels, pixels): (usize, Vec<u8>) = match img.color().channel_count() {
        1 | 2 => (1, img.into_luma8().into_raw()),
        _ => (3, img.into_rgb8().into_raw()),
    };
    Ok(RawImage { height, width, channels, pixels: Arc::from(pixels) })
}

/// Decodes `entries` (on `threads` threads) into samples, checking labels against
/// `num_classes`. Without `skip_bad` the first problem is an error naming the file (and the
/// declaring line); with it, problems are skipped and counted.
pub fn load(entries: &[Entry], num_classes: usize, skip_bad: bool, threads: usize) -> Result<(Vec<Sample>, Skipped), DataError> {
    for e in entries {
        if e.label >= num_classes && !skip_bad {
            return Err(DataError::Format { path: PathBuf::from(&e.origin), msg: format!("label {} is out of range for {num_classes} classes", e.label) });
        }
    }
    let chunk = entries.len().div_ceil(threads.max(1)).max(1);
    let results: Vec<Vec<Result<Option<Sample>, (DataError, bool)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = entries
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|e| {
                            if e.label >= num_classes {
                                return Ok(None);
                            }
                            match decode(&e.path) {
                                Ok(image) => Ok(Some(Sample { image, label: e.label })),
                                Err(err) => Err((err, !e.path.exists())),
                            }
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("decoder thread")).collect()
    });
    let mut samples = Vec::with_capacity(entries.len());
    let mut skipped = Skipped::default();
    for (e, r) in entries.iter().zip(results.into_iter().flatten()) {
        match r {
            Ok(Some(s)) => samples.push(s),
            Ok(None) => skipped.bad_label += 1,
            Err((err, missing)) if skip_bad => {
                let _ = err;
                if missing {
                    skipped.missing += 1;
                } else {
                    skipped.corrupt += 1;
                }
            }
            Err((err, _)) => {
                return Err(match err {
                    DataError::Io { path, error: source } => DataError::Format { path, msg: format!("{source} (listed at {})", e.origin) },
                    DataError::Format { path, msg } => DataError::Format { path, msg: format!("{msg} (listed at {})", e.origin) },
                });
            }
        }
    }
    if samples.is_empty() {
        return Err(fmt_err(Path::new(entries.first().map(|e| e.origin.as_str()).unwrap_or("dataset")), "no usable images in the split"));
    }
    Ok((samples, skipped))
}
