//! Data loading: the three splits of a `[data]` section, decoded into samples.

use crate::config::DataConfig;
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::Path;
use vqt_core::data::files::Skipped;
use vqt_core::data::Sample;

fn split(samples: &[Sample], range: [usize; 2], what: &str, path: &Path) -> Result<Vec<Sample>> {
    anyhow::ensure!(
        range[1] <= samples.len(),
        "{}: data.{what} {range:?} exceeds the {} images in the file",
        path.display(),
        samples.len()
    );
    Ok(samples[range[0]..range[1]].to_vec())
}

/// The loaded data: train, validation and test samples, the class count, and what `skip_bad`
/// skipped per split.
pub type Splits = (Vec<Sample>, Vec<Sample>, Vec<Sample>, usize, BTreeMap<String, Skipped>);

/// Reads the three splits of `data` (decoding images on `threads` threads).
pub fn load_data(data: &DataConfig, threads: usize) -> Result<Splits> {
    use vqt_core::data::files;
    let decode = |entries: Vec<files::Entry>, classes: usize, skip: bool, name: &str, skipped: &mut BTreeMap<String, Skipped>| -> Result<Vec<Sample>> {
        let (samples, s) = files::load(&entries, classes, skip, threads)?;
        if s.total() > 0 {
            eprintln!("{name}: skipped {} bad item(s): {} missing, {} corrupt, {} label out of range", s.total(), s.missing, s.corrupt, s.bad_label);
            skipped.insert(name.to_string(), s);
        }
        Ok(samples)
    };
    let mut skipped = BTreeMap::new();
    match data {
        DataConfig::Idx { train_images, train_labels, test_images, test_labels, num_classes, train_range, val_range, test_limit, test_range } => {
            let all_train = vqt_core::data::idx::read_idx_pair(train_images, train_labels, *num_classes)?;
            let train = split(&all_train, *train_range, "train_range", train_images)?;
            let val = split(&all_train, *val_range, "val_range", train_images)?;
            let mut test = vqt_core::data::idx::read_idx_pair(test_images, test_labels, *num_classes)?;
            if let Some(n) = test_limit {
                anyhow::ensure!(
                    *n <= test.len(),
                    "{}: data.test_limit = {n} exceeds the {} images in the file",
                    test_images.display(),
                    test.len()
                );
                test.truncate(*n);
            }
            if let Some(r) = test_range {
                test = split(&test, *r, "test_range", test_images)?;
            }
            Ok((train, val, test, *num_classes, skipped))
        }
        DataConfig::Vtab { root, task, train_split, val_split, test_split, check_counts, skip_bad, .. } => {
            let (_, classes) = files::vtab_task(task).map_err(anyhow::Error::msg)?;
            let mut read = |split: &str| -> Result<Vec<Sample>> {
                let entries = files::read_vtab_split(root, task, split, *check_counts)?;
                decode(entries, classes, *skip_bad, split, &mut skipped)
            };
            let (train, val, test) = (read(train_split)?, read(val_split)?, read(test_split)?);
            Ok((train, val, test, classes, skipped))
        }
        DataConfig::Tfds { root, task, train_split, val_split, test_split, skip_bad, .. } => {
            let mut read = |split: &str| -> Result<(Vec<Sample>, usize)> {
                let (samples, s, classes) = vqt_core::data::tfds::load_vtab(root, task, split, *skip_bad, threads)?;
                if s.total() > 0 {
                    eprintln!("{split}: skipped {} bad record(s): {} corrupt, {} label out of range", s.total(), s.corrupt, s.bad_label);
                    skipped.insert(split.to_string(), s);
                }
                Ok((samples, classes))
            };
            let ((train, classes), (val, _), (test, _)) = (read(train_split)?, read(val_split)?, read(test_split)?);
            Ok((train, val, test, classes, skipped))
        }
        DataConfig::Fgvc { root, image_root, num_classes, skip_bad } => {
            let ([train, val, test], found) = files::read_fgvc(root, image_root)?;
            anyhow::ensure!(found == *num_classes, "{}: the splits hold {found} classes, but data.num_classes = {num_classes}", root.display());
            let train = decode(train, found, *skip_bad, "train", &mut skipped)?;
            let val = decode(val, found, *skip_bad, "val", &mut skipped)?;
            let test = decode(test, found, *skip_bad, "test", &mut skipped)?;
            Ok((train, val, test, found, skipped))
        }
        DataConfig::ImageFolder { train, val, test, num_classes, skip_bad } => {
            let mut out = Vec::new();
            let mut names: Option<Vec<String>> = None;
            for (name, dir) in [("train", train), ("val", val), ("test", test)] {
                let (entries, classes) = files::read_image_folder(dir)?;
                anyhow::ensure!(classes.len() == *num_classes, "{}: {} class folders, but data.num_classes = {num_classes}", dir.display(), classes.len());
                if let Some(n) = &names {
                    anyhow::ensure!(*n == classes, "{}: class folders differ from the training tree's", dir.display());
                }
                names = Some(classes);
                out.push(decode(entries, *num_classes, *skip_bad, name, &mut skipped)?);
            }
            let test = out.pop().expect("3");
            let val = out.pop().expect("3");
            let train = out.pop().expect("3");
            Ok((train, val, test, *num_classes, skipped))
        }
    }
}
