//! `tune_allocator` keeps large freed blocks for reuse: a second large batch-sized allocation
//! costs (almost) no page faults, where glibc's default unmaps and faults it in again. Each
//! case runs in its own process, because allocator settings are process-wide.
#![cfg(all(target_os = "linux", target_env = "gnu"))]

use std::process::Command;

/// Minor page faults of this process so far (`/proc/self/stat`, field 10).
fn minor_faults() -> u64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    s[s.rfind(')').unwrap() + 2..].split_whitespace().nth(7).unwrap().parse().unwrap()
}

/// Faults taken by filling a fresh 48 MiB buffer (12,288 pages) after an equal one was freed.
fn refill_faults() -> u64 {
    let n = 48 << 20;
    let fill = || {
        let v = vec![1u8; n];
        std::hint::black_box(&v);
    };
    fill();
    let before = minor_faults();
    fill();
    minor_faults() - before
}

/// Runs this test binary's (ignored) `child_reports_faults` in a fresh process with `malloc` as the
/// `VQT_MALLOC` value (unset for `None`) and returns (allocator description, faults).
fn in_child(malloc: Option<&str>) -> (String, u64) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_reports_faults", "--ignored", "--nocapture", "--test-threads=1"]);
    match malloc {
        Some(v) => cmd.env(vqt_core::mem::MALLOC_ENV, v),
        None => cmd.env_remove(vqt_core::mem::MALLOC_ENV),
    };
    let out = String::from_utf8(cmd.output().unwrap().stdout).unwrap();
    let line = out.lines().find_map(|l| l.split_once("ALLOC ").map(|(_, r)| r)).unwrap_or_else(|| panic!("no report in {out}"));
    let (desc, faults) = line.rsplit_once(" faults=").unwrap();
    (desc.to_string(), faults.parse().unwrap())
}

/// Not a check of its own: the child-process half of the test below.
#[test]
#[ignore = "run in a child process by large_freed_blocks_are_reused_without_page_faults"]
fn child_reports_faults() {
    let desc = vqt_core::mem::tune_allocator();
    assert_eq!(vqt_core::mem::allocator_in_effect(), desc);
    println!("ALLOC {desc} faults={}", refill_faults());
}

#[test]
fn large_freed_blocks_are_reused_without_page_faults() {
    let (tuned, tuned_faults) = in_child(None);
    assert!(tuned.contains("M_MMAP_MAX=0"), "{tuned}");
    let (default, default_faults) = in_child(Some("default"));
    assert!(default.contains("VQT_MALLOC=default"), "{default}");
    // 12,288 pages: glibc's default maps them afresh; the tuned allocator reuses them.
    assert!(default_faults > 10_000, "default settings: {default_faults} faults");
    assert!(tuned_faults < 1_000, "tuned: {tuned_faults} faults (default: {default_faults})");
}

/// Not a check of its own: the child-process half of the test below (glibc's default
/// allocator: a 48 MiB block is mapped, filled and unmapped, so the peak mark stays above the
/// resident memory; then a fresh peak measurement).
#[test]
#[ignore = "run in a child process by a_fresh_peak_measurement_starts_from_the_live_memory"]
fn child_reports_peak_reset() {
    vqt_core::mem::tune_allocator();
    let rss = || vqt_core::mem::proc_status_bytes("VmRSS").unwrap() >> 20;
    let hwm = || vqt_core::mem::proc_status_bytes("VmHWM").unwrap() >> 20;
    let v = vec![1u8; 48 << 20];
    std::hint::black_box(&v);
    drop(v);
    let (rss_freed, hwm_freed) = (rss(), hwm());
    let reset = vqt_core::mem::start_peak_measurement();
    println!("PEAK reset={reset} rss_freed={rss_freed} hwm_freed={hwm_freed} rss_after={} hwm_after={}", rss(), hwm());
}

#[test]
fn a_fresh_peak_measurement_starts_from_the_live_memory() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_reports_peak_reset", "--ignored", "--nocapture", "--test-threads=1"])
        .env(vqt_core::mem::MALLOC_ENV, "default")
        .output()
        .unwrap();
    let out = String::from_utf8(out.stdout).unwrap();
    let line = out.lines().find_map(|l| l.split_once("PEAK ").map(|(_, r)| r)).unwrap_or_else(|| panic!("no report in {out}"));
    let field = |k: &str| line.split_whitespace().find_map(|f| f.strip_prefix(&format!("{k}="))).unwrap_or_else(|| panic!("{k} in {line}"));
    let n = |k: &str| field(k).parse::<u64>().unwrap();
    assert_eq!(field("reset"), "true", "{line}");
    // The freed block is gone from the resident memory but not from the peak mark, until the
    // measurement restarts it from the live memory.
    assert!(n("hwm_freed") >= n("rss_freed") + 40, "{line}");
    assert!(n("hwm_after") + 40 <= n("hwm_freed"), "peak mark not reset: {line}");
    assert!(n("hwm_after") <= n("rss_after") + 1, "{line}");
}
