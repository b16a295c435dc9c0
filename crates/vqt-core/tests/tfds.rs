//! The TFDS reader against fixtures written by the real `tensorflow_datasets` (4.9.10) writer,
//! with what TFDS + task_adaptation's own split and label code return for them
//! (`fixtures/tfds/expected.json`, made by `tools/gen_tfds_fixtures.py`): counts, ids and labels
//! of every VTAB split in TFDS's slice order, decoded pixels (PNG bit-exact; JPEG against TF's
//! libjpeg-turbo decode within a stated tolerance), and the damaged shards.

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use vqt_core::data::files::Skipped;
use vqt_core::data::tfds::{load_vtab, tfds_task, Record, TfdsTask};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("tfds/expected.json")).unwrap()).unwrap()
}

/// Our task name for each task of expected.json.
const TASKS: [(&str, &str); 4] = [("cifar100", "cifar100"), ("eurosat", "eurosat"), ("clevr_count_all", "clevr_count"), ("clevr_closest_object_distance", "clevr_dist")];

fn records(t: &TfdsTask, split: &str) -> Vec<Record> {
    let mut sk = Skipped::default();
    let r = t.records(&fixtures().join("tfds"), split, false, &mut sk).unwrap_or_else(|e| panic!("{} {split}: {e}", t.vtab));
    assert_eq!(sk.total(), 0);
    r
}

#[test]
fn every_split_has_tfds_records_ids_and_task_adaptation_labels() {
    let e = expected();
    for (name, ours) in TASKS {
        let t = tfds_task(ours).unwrap();
        let spec = &e["tasks"][name];
        assert_eq!(spec["num_classes"].as_u64().unwrap() as usize, t.classes, "{name}");
        for split in ["train800", "val200", "train800val200", "test"] {
            let want = &spec["splits"][split];
            let recs = records(t, split);
            assert_eq!(recs.len() as u64, want["num_examples"].as_u64().unwrap(), "{name} {split} ({})", want["tfds_split"]);
            let ids: Vec<String> = recs.iter().map(|r| r.example.id().unwrap()).collect();
            assert_eq!(ids.first().map(String::as_str), want["first_id"].as_str(), "{name} {split}");
            assert_eq!(ids.last().map(String::as_str), want["last_id"].as_str(), "{name} {split}");
            if let Some(all) = want["ids"].as_array() {
                assert_eq!(ids, all.iter().map(|v| v.as_str().unwrap().to_string()).collect::<Vec<_>>(), "{name} {split}: ids in order");
            }
            let labels: Vec<u64> = recs.iter().map(|r| t.label(&r.example).unwrap() as u64).collect();
            if let Some(all) = want["labels"].as_array() {
                assert_eq!(labels, all.iter().map(|v| v.as_u64().unwrap()).collect::<Vec<_>>(), "{name} {split}: labels");
            }
            let mut hist = vec![0u64; t.classes];
            labels.iter().for_each(|&l| hist[l as usize] += 1);
            assert_eq!(serde_json::json!(hist), want["label_histogram"], "{name} {split}");
        }
    }
}

#[test]
fn png_pixels_are_bit_exact_and_jpeg_pixels_close_to_tensorflows() {
    let e = expected();
    for (name, ours) in [("cifar100", "cifar100"), ("clevr_count_all", "clevr_count"), ("eurosat", "eurosat")] {
        let t = tfds_task(ours).unwrap();
        let jpeg = name == "eurosat";
        for split in ["train800", "val200", "test"] {
            let want = &e["tasks"][name]["splits"][split];
            let recs = records(t, split);
            let mut all = Sha256::new();
            let mut worst_sum = 0f64;
            for (k, r) in recs.iter().enumerate() {
                let img = t.image(&r.example).unwrap();
                assert_eq!(img.channels, 3);
                all.update(&img.pixels[..]);
                let sha = format!("{:x}", Sha256::digest(&img.pixels[..]));
                if !jpeg {
                    assert_eq!(&sha[..16], want["image_sha256_16"][k].as_str().unwrap(), "{name} {split} image {k}: PNG decodes bit-exactly");
                } else {
                    let n = (img.width * img.height) as f64;
                    for c in 0..3 {
                        let ours: u64 = img.pixels.iter().skip(c).step_by(3).map(|&p| p as u64).sum();
                        let tf = want["image_channel_sums"][k][c].as_u64().unwrap();
                        worst_sum = worst_sum.max((ours as f64 - tf as f64).abs() / n);
                    }
                }
            }
            if jpeg {
                // The image crate's JPEG decoder (zune-jpeg) against TF's libjpeg-turbo: measured
                // on this fixture (quality 50, 4:2:0), the worst image's mean per-channel
                // difference is 2.23 levels (docs/guide/training.md); a regression guard.
                eprintln!("{name} {split}: worst image's mean channel difference from TF: {worst_sum:.3}");
                assert!(worst_sum < 2.5, "{name} {split}: mean channel difference {worst_sum} from TF's decode");
            } else {
                assert_eq!(format!("{:x}", all.finalize()), want["pixels_sha256"].as_str().unwrap(), "{name} {split}: every pixel");
            }
        }
    }
    // Two whole JPEGs against TF's decode, pixel by pixel: the max and mean difference.
    let t = tfds_task("eurosat").unwrap();
    let recs = records(t, "train800val200");
    let recs_test = records(t, "test");
    for (id, want) in e["datasets"]["eurosat"]["decoded_pixels"].as_object().unwrap() {
        let tf = base64_decode(want["rgb_base64"].as_str().unwrap());
        let r = recs.iter().chain(recs_test.iter()).find(|r| r.example.id().as_deref() == Some(id.as_str())).unwrap();
        let img = t.image(&r.example).unwrap();
        assert_eq!(tf.len(), img.pixels.len());
        let diffs: Vec<i32> = tf.iter().zip(img.pixels.iter()).map(|(&a, &b)| (a as i32 - b as i32).abs()).collect();
        let (max, mean) = (*diffs.iter().max().unwrap(), diffs.iter().sum::<i32>() as f64 / diffs.len() as f64);
        eprintln!("{id}: JPEG decode vs TF (libjpeg-turbo): max |diff| {max}, mean {mean:.4}");
        // Measured: max 5 levels, mean 1.12 / 1.32 (a regression guard).
        assert!(max <= 6 && mean < 1.5, "{id}: max {max}, mean {mean}");
    }
}

/// Standard base64 (the fixture's two reference images).
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    } as u32;
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &c)| acc | (val(c) << (18 - 6 * i)));
        let k = chunk.len() - 1;
        out.extend_from_slice(&n.to_be_bytes()[1..1 + k]);
    }
    out
}

#[test]
fn loading_decodes_every_split_and_bad_input_is_one_line() {
    let root = fixtures().join("tfds");
    let (train, skipped, classes) = load_vtab(&root, "cifar100", "train800", false, 2).unwrap();
    assert_eq!((train.len(), skipped.total(), classes), (800, 0, 100));
    assert!(train.iter().all(|s| s.image.channels == 3 && s.label < 100));
    // A missing dataset, a missing version, a split the dataset lacks.
    let e = load_vtab(&root, "dtd", "train800", false, 1).unwrap_err().to_string();
    assert!(e.contains("dtd") && e.contains("no TFDS dataset `dtd` here"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    std::fs::create_dir_all(tmp.join("cifar100/2.0.0")).unwrap();
    std::fs::write(tmp.join("cifar100/2.0.0/dataset_info.json"), "{}").unwrap();
    let e = load_vtab(tmp, "cifar", "train800", false, 1).unwrap_err().to_string();
    assert!(e.contains("no prepared version") && e.contains("3.0.2") && e.contains("found: 2.0.0"), "{e}");
    // A slice beyond the split (the fixture's eurosat has 1351 records, fewer than real).
    let copy = tempfile::tempdir().unwrap();
    let small = copy_dataset(&root.join("cifar100/3.0.2"), copy.path());
    let info = small.join("dataset_info.json");
    let text = std::fs::read_to_string(&info).unwrap().replace("\"503\"", "\"103\"");
    std::fs::write(&info, text).unwrap();
    let e = load_vtab(small.parent().unwrap().parent().unwrap(), "cifar100", "val200", false, 1).unwrap_err().to_string();
    assert!(e.contains("dataset_info.json") && e.contains("only"), "{e}");
}

/// The dataset version folder `dir` copied to `<into>/cifar100/3.0.2`, that copy's path.
fn copy_dataset(dir: &Path, into: &Path) -> PathBuf {
    let out = into.join("cifar100/3.0.2");
    std::fs::create_dir_all(&out).unwrap();
    for f in std::fs::read_dir(dir).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), out.join(f.file_name())).unwrap();
    }
    out
}

#[test]
fn damaged_shards_are_one_line_errors_or_skipped_and_counted() {
    let e = expected();
    for case in ["crc", "truncated"] {
        let c = &e["corrupt"][case];
        let root = fixtures().join("tfds-corrupt").join(case);
        let err = load_vtab(&root, "cifar100", "test", false, 1).unwrap_err().to_string();
        assert!(err.contains(c["shard"].as_str().unwrap()) && err.contains(&format!("record {}", c["record_index"])), "{case}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        // --skip-bad: the damaged record (CRC) or the shard's rest (truncated) is left out.
        let (samples, skipped, _) = load_vtab(&root, "cifar100", "test", true, 1).unwrap();
        assert!(skipped.corrupt >= 1, "{case}: {skipped:?}");
        let lost = match case {
            "crc" => 1,
            _ => c["records_in_shard"].as_u64().unwrap() as usize - c["record_index"].as_u64().unwrap() as usize,
        };
        assert_eq!(samples.len(), 100 - lost, "{case}");
    }
}
