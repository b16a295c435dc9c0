//! The image dataset readers on small generated trees: every layout, and every kind of bad
//! input as a one-line error naming the file (and line), or skipped and counted.

use std::path::{Path, PathBuf};
use vqt_core::data::files::{load, read_fgvc, read_image_folder, read_vtab_split, vtab_task, Entry};

/// A fresh temp directory for one test, removed when dropped.
fn tmp(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("vqt-data-{tag}-")).tempdir().unwrap()
}

fn png(path: &Path, shade: u8, rgb: bool) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    if rgb {
        image::RgbImage::from_pixel(5, 4, image::Rgb([shade, 0, 255 - shade])).save(path).unwrap();
    } else {
        image::GrayImage::from_pixel(5, 4, image::Luma([shade])).save(path).unwrap();
    }
}

/// `<root>/cifar/{train800.txt, images/train800/…}` with the given lines.
fn noah(root: &Path, lines: &str) -> PathBuf {
    let task = root.join("cifar");
    png(&task.join("images/train800/000000.png"), 10, true);
    png(&task.join("images/train800/000001.png"), 200, false);
    png(&task.join("images/train800/with space.png"), 90, true);
    std::fs::write(task.join("train800.txt"), lines).unwrap();
    task.join("train800.txt")
}

fn err(r: Result<impl std::fmt::Debug, vqt_core::data::DataError>) -> String {
    let e = r.unwrap_err().to_string();
    assert!(!e.contains('\n'), "not one line: {e}");
    e
}

#[test]
fn noah_layout_with_aliases_reads_and_decodes() {
    let dir = tmp("noah");
    let root = dir.path();
    noah(root, "images/train800/000000.png 3\nimages/train800/000001.png\t7\r\nimages/train800/with space.png  99\n\n");
    let entries = read_vtab_split(root, "CIFAR100", "train800", false).unwrap();
    assert_eq!(entries.iter().map(|e| e.label).collect::<Vec<_>>(), vec![3, 7, 99]);
    assert!(entries[2].path.ends_with("images/train800/with space.png"));
    assert!(entries[1].origin.ends_with("train800.txt:2"));
    let (samples, skipped) = load(&entries, 100, false, 2).unwrap();
    assert_eq!(skipped.total(), 0);
    assert_eq!((samples[0].image.channels, samples[0].image.height, samples[0].image.width), (3, 4, 5));
    assert_eq!((samples[1].image.channels, samples[1].image.pixels[0]), (1, 200));
    assert_eq!(vtab_task("pcam").unwrap(), ("patch_camelyon", 2));
    assert!(vtab_task("imagenet").unwrap_err().contains("unknown VTAB task `imagenet`"));
}

#[test]
fn bad_lists_name_file_and_line() {
    let dir = tmp("badlist");
    let root = dir.path();
    let f = noah(root, "images/train800/000000.png 3\nimages/train800/000001.png\n");
    let e = err(read_vtab_split(root, "cifar", "train800", false));
    assert!(e.contains(&format!("{}: line 2: expected `path label`", f.display())), "{e}");
    noah(root, "images/train800/000000.png three\n");
    assert!(err(read_vtab_split(root, "cifar", "train800", false)).contains("line 1: label `three` is not a non-negative integer"));
    // Two numbers after the path: a malformed line, not the path `000000.png 5`.
    noah(root, "images/train800/000000.png 5 7\n");
    let e = err(read_vtab_split(root, "cifar", "train800", false));
    assert!(e.contains("line 1: `images/train800/000000.png 5 7` ends in two numbers"), "{e}");
    noah(root, "\n  \n");
    assert!(err(read_vtab_split(root, "cifar", "train800", false)).contains("train800.txt: the split is empty"));
    noah(root, "images/train800/000000.png 3\n");
    let e = err(read_vtab_split(root, "cifar", "train800", true));
    assert!(e.contains("1 lines, but VTAB-1k's train800 has 800"), "{e}");
    let e = err(read_vtab_split(root, "cifar", "val200", false));
    assert!(e.contains("val200.txt"), "{e}");
}

#[test]
fn bad_images_and_labels_stop_or_are_skipped_and_counted() {
    let dir = tmp("badimg");
    let root = dir.path();
    let f = noah(root, "images/train800/000000.png 3\nimages/train800/gone.png 1\nimages/train800/broken.png 2\nimages/train800/000001.png 12\n");
    std::fs::write(root.join("cifar/images/train800/broken.png"), b"not a png at all").unwrap();
    let entries = read_vtab_split(root, "cifar", "train800", false).unwrap();
    let e = err(load(&entries, 10, false, 2));
    assert!(e.contains(&format!("{}:4: label 12 is out of range for 10 classes", f.display())), "{e}");
    let e = err(load(&entries[..3], 10, false, 2));
    assert!(e.contains("gone.png") && e.contains(&format!("listed at {}:2", f.display())), "{e}");
    let e = err(load(&[entries[0].clone(), entries[2].clone()], 10, false, 1));
    assert!(e.contains("broken.png: cannot decode image") && e.contains(":3)"), "{e}");
    // A truncated JPEG: the decoder's message is kept on one line.
    let jpg = root.join("cifar/images/train800/cut.jpg");
    let mut full = Vec::new();
    image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 90]))
        .write_to(&mut std::io::Cursor::new(&mut full), image::ImageFormat::Jpeg)
        .unwrap();
    std::fs::write(&jpg, &full[..full.len() / 3]).unwrap();
    let cut = Entry { path: jpg, label: 1, origin: "list:9".into() };
    let e = err(load(&[cut], 10, false, 1));
    assert!(e.contains("cut.jpg: cannot decode image"), "{e}");
    let (samples, skipped) = load(&entries, 10, true, 2).unwrap();
    assert_eq!(samples.len(), 1);
    assert_eq!((skipped.missing, skipped.corrupt, skipped.bad_label), (1, 1, 1));
}

#[test]
fn synqt_json_variant_fgvc_and_image_folder() {
    // SynQT: train800val200.json, images under images/.
    let dir = tmp("synqt");
    let root = dir.path();
    let task = root.join("dtd");
    png(&task.join("images/a/x.png"), 1, true);
    std::fs::write(task.join("train800val200.json"), r#"[{"a/x.png": 4}]"#).unwrap();
    let e = read_vtab_split(root, "dtd", "train800val200", false).unwrap();
    assert_eq!(e, vec![Entry { path: task.join("images/a/x.png"), label: 4, origin: format!("{} item 0", task.join("train800val200.json").display()) }]);
    std::fs::write(task.join("test.json"), r#"[{"a/x.png": 4, "b.png": 1}]"#).unwrap();
    assert!(err(read_vtab_split(root, "dtd", "test", false)).contains("item 0: expected one"));

    // FGVC: class ids 5, 9, 7 -> 0, 2, 1 across the three files.
    let dir = tmp("fgvc");
    let root = dir.path();
    for (n, s) in [("a.png", 1), ("b.png", 2), ("c.png", 3)] {
        png(&root.join("images").join(n), s, true);
    }
    std::fs::write(root.join("train.json"), r#"{"a.png": 5, "b.png": 9}"#).unwrap();
    std::fs::write(root.join("val.json"), r#"{"c.png": 7}"#).unwrap();
    std::fs::write(root.join("test.json"), r#"{"a.png": 9}"#).unwrap();
    let ([train, val, test], classes) = read_fgvc(root, Path::new("images")).unwrap();
    assert_eq!(classes, 3);
    assert_eq!(train.iter().map(|e| e.label).collect::<Vec<_>>(), vec![0, 2]);
    assert_eq!((val[0].label, test[0].label), (1, 2));
    std::fs::write(root.join("val.json"), "{}").unwrap();
    assert!(err(read_fgvc(root, Path::new("images"))).contains("val.json: the split is empty"));

    // ImageFolder: sorted class folders.
    let dir = tmp("folder");
    let root = dir.path();
    png(&root.join("zebra/1.png"), 1, false);
    png(&root.join("ant/2.png"), 2, true);
    png(&root.join("ant/3.PNG"), 3, true);
    std::fs::write(root.join("ant/notes.txt"), "x").unwrap();
    let (entries, classes) = read_image_folder(root).unwrap();
    assert_eq!(classes, vec!["ant", "zebra"]);
    assert_eq!(entries.iter().map(|e| e.label).collect::<Vec<_>>(), vec![0, 0, 1]);
    assert!(err(read_image_folder(tmp("emptyfolder").path())).contains("no images"));
}
