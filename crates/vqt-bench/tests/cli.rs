//! The `vqt-bench` binary end to end: exit codes and one-line errors.

use std::path::PathBuf;
use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vqt-bench"))
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn tmpdir(tag: &str) -> vqt_core::testing::TestDir {
    vqt_core::testing::TestDir::new(&format!("bench-cli-{tag}"))
}

#[test]
fn parity_passes_on_shared_fixture_and_writes_json() {
    let dir = tmpdir("json");
    let json = dir.join("parity.json");
    let out = bench().args(["parity"]).arg(fixtures().join("tiny-a")).arg("--json").arg(&json).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ok   vqt   vqt.grad.queries"), "{stdout}");
    assert!(stdout.contains("parity passed for 1 fixture(s) on cpu"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v[0]["lines"].as_array().unwrap().len(), 16);
}

#[test]
fn unsupported_check_fails_the_run() {
    let d = tmpdir("unsupported");
    for f in std::fs::read_dir(fixtures().join("tiny-a")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
    }
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("manifest.json")).unwrap()).unwrap();
    m["checks"]["future_method"] = serde_json::json!({"file": "expected.safetensors", "tensors": []});
    std::fs::write(d.join("manifest.json"), m.to_string()).unwrap();
    let out = bench().arg("parity").arg(&d).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FAIL unsupported check `future_method`"), "{stdout}");
}

#[test]
fn tolerance_violation_fails_the_run() {
    let d = tmpdir("tol");
    for f in std::fs::read_dir(fixtures().join("tiny-a")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
    }
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("manifest.json")).unwrap()).unwrap();
    m["tolerance"]["abs"] = serde_json::json!(0.0);
    m["checks"].as_object_mut().unwrap().remove("vqt");
    std::fs::write(d.join("manifest.json"), m.to_string()).unwrap();
    let out = bench().arg("parity").arg(&d).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // f32 results from a different kernel order are never all bit-identical to PyTorch's.
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAIL vit"), "{stdout}");
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let missing = bench().args(["parity", "/nonexistent/fixture"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(2));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/fixture/manifest.json"), "{err}");

    let backend = bench().arg("parity").arg(fixtures().join("tiny-a")).args(["--backend", "tpu"]).output().unwrap();
    assert_eq!(backend.status.code(), Some(2));
    let err = String::from_utf8_lossy(&backend.stderr);
    assert!(err.contains("unknown backend `tpu`"), "{err}");

    #[cfg(not(feature = "cuda"))]
    {
        let cuda = bench().arg("parity").arg(fixtures().join("tiny-a")).args(["--backend", "cuda"]).output().unwrap();
        assert_eq!(cuda.status.code(), Some(2));
        let err = String::from_utf8_lossy(&cuda.stderr);
        assert!(err.contains("--features cuda"), "{err}");
    }

    // No Vulkan driver (the loader pointed at none): one line naming the package, not a panic.
    let mut cmd = bench();
    cmd.arg("parity").arg(fixtures().join("tiny-a")).args(["--backend", "vulkan-cpu"]);
    cmd.env("VK_ICD_FILENAMES", "/nonexistent/icd.json").env("VK_DRIVER_FILES", "/nonexistent/icd.json");
    let novk = vqt_core::process::output_within(&mut cmd, vqt_core::process::gpu_check_limit(300)).unwrap();
    assert_eq!(novk.status.code(), Some(2), "{}", String::from_utf8_lossy(&novk.stderr));
    let err = String::from_utf8_lossy(&novk.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("backend `vulkan-cpu`") && err.contains("mesa-vulkan-drivers"), "{err}");

    // A truncated checkpoint: the error names the file.
    let d = tmpdir("trunc");
    for f in std::fs::read_dir(fixtures().join("tiny-a")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
    }
    let ck = d.join("vit.safetensors");
    let bytes = std::fs::read(&ck).unwrap();
    std::fs::write(&ck, &bytes[..bytes.len() / 2]).unwrap();
    let out = bench().arg("parity").arg(&d).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("vit.safetensors: not a readable safetensors file"), "{err}");
}

#[test]
fn report_aggregates_runs_per_method_over_seeds() {
    let d = tmpdir("report");
    let run = |method: &str, seed: u64, test: f64| {
        let dir = d.join(method).join(format!("seed-{seed}"));
        std::fs::create_dir_all(&dir).unwrap();
        let rec = serde_json::json!({
            "method": method, "backend": "cpu", "test_accuracy": test, "val_accuracy": test - 1.0,
            "trainable_params": 1234, "total_params": 99999, "peak_rss_bytes": 100u64 << 20,
            "wall_seconds": 2.0, "path": "trunk", "config": {"train": {"seed": seed}}
        });
        std::fs::write(dir.join("run.json"), rec.to_string()).unwrap();
    };
    run("vqt", 42, 80.0);
    run("vqt", 43, 84.0);
    run("linear", 42, 70.0);
    let out = d.join("report");
    let o = bench().arg("report").arg(&d).arg("--out").arg(&out).args(["--title", "T"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(out.with_extension("md")).unwrap();
    // mean 82, sample std sqrt(8) = 2.83
    assert!(md.contains("| vqt | trunk | 2 (42, 43) | 82.00 ± 2.83 | 81.00 | 1234 | 100 | – | 2.0 |"), "{md}");
    assert!(md.contains("| linear | trunk | 1 (42) | 70.00 (one seed, no std) |"), "{md}");
    let svg = std::fs::read_to_string(out.with_extension("svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("vqt (1234 params; 2 seeds)") && svg.contains("<circle"), "{svg}");
    assert!(svg.contains("linear (1234 params; one seed, 42)"), "a one-run point says it has one seed: {svg}");
    assert!(svg.contains("RSS"), "the plot says which memory it shows");
    let e = bench().args(["report", "/nope/runs", "--out"]).arg(&out).output().unwrap();
    assert_eq!(e.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&e.stderr).contains("/nope/runs: no such file or directory"));

    // A cached run shows its cache beside the RSS point; with --memory the plot is step memory.
    let dir = d.join("vqt-cached-run");
    std::fs::create_dir_all(&dir).unwrap();
    let rec = serde_json::json!({
        "method": "vqt-x", "backend": "cpu", "test_accuracy": 90.0, "val_accuracy": 89.0, "trainable_params": 55, "total_params": 99,
        "peak_rss_bytes": 300u64 << 20, "wall_seconds": 1.0, "path": "trunk", "config": {"train": {"seed": 1}},
        "cache": {"mode": "kv", "dtype": "f32", "bytes": 64u64 << 20, "build_seconds": 1.0}
    });
    std::fs::write(dir.join("run.json"), rec.to_string()).unwrap();
    let o = bench().arg("report").arg(&d).arg("--out").arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let svg = std::fs::read_to_string(out.with_extension("svg")).unwrap();
    assert!(svg.contains("cache 64 MiB"), "{svg}");
    // A resumed run's wall time and peak RSS (its last invocation's only) stay out of the means.
    let rdir = d.join("vqt").join("seed-44");
    std::fs::create_dir_all(&rdir).unwrap();
    let rec = serde_json::json!({
        "method": "vqt", "backend": "cpu", "test_accuracy": 82.0, "val_accuracy": 81.0, "trainable_params": 1234, "total_params": 99999,
        "peak_rss_bytes": 10u64 << 20, "wall_seconds": 0.5, "resumed_from_epoch": 9, "path": "trunk", "config": {"train": {"seed": 44}}
    });
    std::fs::write(rdir.join("run.json"), rec.to_string()).unwrap();
    let o = bench().arg("report").arg(&d).arg("--out").arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(out.with_extension("md")).unwrap();
    assert!(md.contains("| vqt | trunk | 3 (42, 43, 44) | 82.00 ± 2.00 | 81.00 | 1234 | 100 | – | 2.0 (2 of 3 runs; 1 resumed) |"), "{md}");
    assert!(md.contains("not resumed"), "{md}");
    std::fs::remove_dir_all(&rdir).unwrap();
    let step = |m: &str, mib: u64| serde_json::json!({"method": m, "backend": "cpu", "backbone": "b", "img_size": 32, "batch": 2, "trainable_params": 1,
        "total_params": 2, "step_ms_median": 1.0, "train_images_per_s": 2.0, "rss_baseline_bytes": null, "rss_peak_bytes": null,
        "rss_train_bytes": mib << 20, "device_peak_bytes": null, "cache_build_ms": null, "cache_100_epochs_over_inference": null,
        "cache_dtype": null, "cache_images": null, "cache_bytes": null, "load_avg": null});
    let mem = d.join("memory.json");
    std::fs::write(&mem, serde_json::json!([step("vqt", 10), step("vqt-cached", 3), step("linear", 5)]).to_string()).unwrap();
    let o = bench().arg("report").arg(&d).arg("--out").arg(&out).arg("--memory").arg(&mem).args(["--match", "vqt-x=vqt-cached"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(out.with_extension("md")).unwrap();
    assert!(md.contains("| 3 (vqt-cached) |") && md.contains("| 10 (vqt) |") && md.contains("| 5 (linear) |"), "{md}");
    let svg = std::fs::read_to_string(out.with_extension("svg")).unwrap();
    assert!(svg.contains("training-step memory") && !svg.contains("cache 64 MiB"), "{svg}");
    let o = bench().arg("report").arg(&d).arg("--out").arg(&out).arg("--memory").arg(&mem).args(["--match", "vqt-x=nope"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no method `nope`"));
}

#[test]
fn compare_interleaves_ours_and_the_reference_and_reports_ratios() {
    // A stand-in for tools/torch_bench.py (CI has no torch): a shell script that answers the
    // script's protocol, one JSON line for the method it is asked about, and logs the order.
    let d = tmpdir("compare");
    let log = d.join("order.log");
    let fake = d.join("fake_torch.sh");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nm=$2\necho \"torch $m\" >> {log}\necho '{{\"method\": \"'$m'\", \"framework\": \"fake\", \"trainable_params\": 1, \"total_params\": 2, \
             \"step_ms_median\": 1000.0, \"train_images_per_s\": 2.0, \"rss_train_bytes\": 1073741824}}'\n",
            log = log.display()
        ),
    )
    .unwrap();
    let out_prefix = d.join("cmp");
    // `compare` on a tiny shape with the stand-in as the reference script.
    let compare = |methods: &str, extra: &[&std::ffi::OsStr]| {
        bench()
            .args(["compare", "--methods", methods, "--python", "sh", "--script"])
            .arg(&fake)
            .args(extra)
            .args(["--preset", "vit-ti16", "--img-size", "32", "--batch", "2", "--steps", "1", "--out"])
            .arg(&out_prefix)
            .output()
            .unwrap()
    };
    let o = compare("linear,vqt,synqt", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "torch linear\ntorch vqt-official\ntorch vqt-trunk\n");
    let md = std::fs::read_to_string(out_prefix.with_extension("md")).unwrap();
    assert!(md.contains("| linear | linear |") && md.contains("| vqt | vqt-official |") && md.contains("| vqt | vqt-trunk |"), "{md}");
    assert!(md.contains("| synqt | (none) |") && md.contains("| vqt / vqt-official step time | 0.0"), "{md}");
    // The stand-in reports no inference time: no inference target, and the table says so.
    assert!(!md.contains("inference images/s |"), "{md}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out_prefix.with_extension("json")).unwrap()).unwrap();
    assert_eq!(report["rows"].as_array().unwrap().len(), 4);
    assert!(report["cpu"].as_str().unwrap().contains("family"), "{report}");
    let targets = report["targets"].as_array().unwrap();
    assert!(targets.iter().any(|t| t["what"] == "vqt / vqt-trunk step time" && t["bound"] == 1.0), "{targets:?}");

    // With the official SynQT source, synqt gets its PyTorch row and the script gets the path.
    let synqt_py = d.join("synqt.py");
    std::fs::write(&synqt_py, "# stand-in\n").unwrap();
    let o = compare("synqt", &["--synqt-py".as_ref(), synqt_py.as_os_str()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read_to_string(&log).unwrap().ends_with("torch synqt\n"));
    assert!(std::fs::read_to_string(out_prefix.with_extension("md")).unwrap().contains("| synqt | synqt |"));
    let e = compare("synqt", &["--synqt-py".as_ref(), "/nope/synqt.py".as_ref()]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("/nope/synqt.py: the official SynQT source is missing"));

    // A reference that fails, or a missing script: one line naming it.
    let e = bench().args(["compare", "--methods", "linear", "--python", "sh", "--script"]).arg(d.join("missing.py")).output().unwrap();
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(e.status.code() == Some(2) && err.contains("missing.py: the PyTorch reference script is missing") && err.trim().lines().count() == 1, "{err}");
    std::fs::write(&fake, "#!/bin/sh\necho 'ModuleNotFoundError: No module named torch' >&2\nexit 1\n").unwrap();
    let e = compare("linear", &[]);
    let err = String::from_utf8_lossy(&e.stderr);
    let last = err.trim().lines().last().unwrap_or("");
    assert!(e.status.code() == Some(2) && last.contains("--method linear: ModuleNotFoundError: No module named torch"), "{err}");
}

#[test]
fn speed_measures_training_and_inference_per_method_in_child_processes() {
    let d = tmpdir("speed");
    let prefix = d.join("speed");
    let o = bench()
        .args(["speed", "--methods", "linear,vqt,lora", "--preset", "vit-ti16", "--img-size", "32", "--batch", "2", "--steps", "1", "--out"])
        .arg(&prefix)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(prefix.with_extension("json")).unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for r in rows {
        for key in ["step_ms_median", "train_images_per_s", "infer_images_per_s"] {
            assert!(r[key].as_f64().unwrap() > 0.0, "{key} of {r}");
        }
        assert!(r["trainable_params"].as_u64().unwrap() < r["total_params"].as_u64().unwrap());
    }
    let md = std::fs::read_to_string(prefix.with_extension("md")).unwrap();
    assert!(md.contains("| infer img/s |") && md.contains("| lora |"), "{md}");
    let e = bench().args(["speed", "--methods", "linear,dora", "--out"]).arg(&prefix).output().unwrap();
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(e.status.code() == Some(2) && err.contains("unknown method `dora`"), "{err}");
    // No method at all is an error too, not an empty report.
    let empty = prefix.with_file_name("empty");
    let e = bench().args(["memory", "--methods", "", "--out"]).arg(&empty).output().unwrap();
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(e.status.code() == Some(2) && err.contains("names no method"), "{err}");
    assert!(!empty.with_extension("json").exists());
}

/// The GPU check end to end on the CPU adapter (what scripts/gpu-check.sh runs on a GPU machine),
/// at a toy size: adapters listed, parity and memory steps run in limited children and pass, the
/// training step is skipped with the missing asset named, and the report exists in both forms.
#[test]
fn gpu_check_runs_on_the_cpu_adapter_and_writes_its_report() {
    let d = tmpdir("gpu-check");
    let fx = d.join("fixtures");
    std::fs::create_dir_all(fx.join("tiny-a")).unwrap();
    for f in std::fs::read_dir(fixtures().join("tiny-a")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, fx.join("tiny-a").join(f.file_name().unwrap())).unwrap();
    }
    let cfg = d.join("demo.toml");
    std::fs::write(&cfg, "[backbone]\ncheckpoint = \"/nonexistent/model.safetensors\"\n[data]\ntrain_images = \"/nonexistent/train.gz\"\n").unwrap();
    let out = d.join("report");
    let mut cmd = bench();
    cmd.args(["gpu-check", "--backends", "wgpu-cpu", "--preset", "vit-ti16", "--img-size", "32", "--batch", "2"])
        .args(["--methods", "linear,vqt-cached", "--limit-s", "600", "--fixtures"])
        .arg(&fx)
        .arg("--train-config")
        .arg(&cfg)
        .arg("--out")
        .arg(&out);
    let o = vqt_core::process::output_within(&mut cmd, vqt_core::process::gpu_check_limit(1500)).unwrap();
    let (so, se) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{so}\n{se}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("gpu-check.json")).unwrap()).unwrap();
    assert!(r["adapters"].as_array().unwrap().iter().any(|a| a["device_type"] == "Cpu"), "{r}");
    let steps = r["steps"].as_array().unwrap();
    let status: Vec<(&str, &str)> = steps.iter().map(|s| (s["step"].as_str().unwrap(), s["status"].as_str().unwrap())).collect();
    assert_eq!(status, [("parity:tiny-a", "passed"), ("memory", "passed"), ("train", "skipped")], "{r}");
    assert!(steps[0]["summary"].as_str().unwrap().starts_with("16 tensors within tolerance"), "{r}");
    let mem = steps[1]["details"].as_array().unwrap();
    assert_eq!(mem.len(), 2);
    assert!(mem.iter().all(|m| m["device_peak_bytes"].as_u64().is_some_and(|b| b > 0)), "device pool peak measured: {r}");
    assert!(steps[2]["summary"].as_str().unwrap().contains("/nonexistent/model.safetensors"), "{r}");
    let md = std::fs::read_to_string(out.join("gpu-check.md")).unwrap();
    assert!(md.contains("| wgpu-cpu | memory | passed |") && md.contains("Overall: passed."), "{md}");

    // An unknown or CPU backend is refused in one line before anything runs.
    let e = bench().args(["gpu-check", "--backends", "cpu"]).output().unwrap();
    assert_eq!(e.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&e.stderr).contains("`cpu` is not a GPU-runtime backend"));
}
