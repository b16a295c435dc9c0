//! Process memory probes for run records and benchmarks.

/// A `/proc/self/status` field in bytes (`VmRSS` = current resident memory, `VmHWM` = peak);
/// `None` off Linux or if the field is missing.
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    status_field_bytes(&text, field)
}

/// Parses one `Name:   1234 kB` field of a `/proc/<pid>/status` text into bytes.
pub fn status_field_bytes(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.split(':').next() == Some(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Starts a fresh measurement of peak memory: returns freed heap memory to the kernel
/// (glibc's `malloc_trim(0)`: free pages inside every arena, and the top of the main arena,
/// where the calling thread's large tensors live; other threads' arena tops stay), then resets the
/// kernel's peak-RSS mark to the current RSS (writing `5` to `/proc/self/clear_refs`, Linux
/// 4.0+). Afterwards `VmRSS` counts live memory only and `VmHWM` the peak from here on. Returns
/// whether the peak mark was reset (off Linux, or where `/proc` refuses, `VmHWM` keeps the
/// process's whole history and a caller must say so).
///
/// Without it a benchmark's "peak above baseline" mixes in what ran before: with
/// [`tune_allocator`]'s settings freed memory stays resident, so the memory a feature-cache
/// build freed counted in the baseline and was reused by the training steps (cached VQT at
/// batch 128 read 29 MiB, at batch 64 113 MiB), and `VmHWM` still held the build's own peak.
pub fn start_peak_measurement() -> bool {
    release_free_heap();
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_heap() {
    // SAFETY: malloc_trim only returns free memory to the kernel; callable at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_heap() {}

/// The environment variable that keeps the C library's default allocator behaviour
/// (`VQT_MALLOC=default`) instead of [`tune_allocator`]'s.
pub const MALLOC_ENV: &str = "VQT_MALLOC";

/// Keeps large freed blocks in the process for reuse (glibc only; called first thing by the
/// `vqt-train` and `vqt-bench` binaries). Returns a description of the allocator in effect, for
/// reports.
///
/// By default glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh
/// `mmap` and unmaps it when freed, so every training step page-faults and zeroes its large
/// tensors again: a batch of cached keys/values (77 MiB per tensor for ViT-B/16 at 224 px,
/// batch 128), trunk activations. Measured on the 2-core CI machine (ViT-B/16, 224 px, batch
/// 32, one cached-VQT step): gathering the batch from the cache 120 -> 21 ms, the whole step
/// 379 -> 228 ms, and a trunk inference batch 13.0 -> 11.2 s. This sets `M_MMAP_MAX = 0`
/// (every block from the heap) and `M_TRIM_THRESHOLD` = 2 GiB (freed heap memory stays mapped
/// for the next step instead of going back to the kernel). Peak RSS keeps its meaning: freed
/// memory is reused, never counted twice. Idempotent: later calls return the first answer.
pub fn tune_allocator() -> &'static str {
    TUNED.get_or_init(|| {
        if std::env::var(MALLOC_ENV).is_ok_and(|v| v == "default") {
            "system malloc, default settings (VQT_MALLOC=default)"
        } else {
            tune_platform()
        }
    })
}

static TUNED: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// The allocator settings of this process, for run records and reports: what
/// [`tune_allocator`] set, or the defaults when nothing called it (a library user's process).
pub fn allocator_in_effect() -> &'static str {
    TUNED.get().copied().unwrap_or("system malloc, default settings (not tuned)")
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_platform() -> &'static str {
    // SAFETY: mallopt only changes glibc's allocation parameters; it is safe to call at any time.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_MAX, 0) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1 };
    if ok {
        "glibc malloc, large blocks kept for reuse (M_MMAP_MAX=0, M_TRIM_THRESHOLD=2GiB)"
    } else {
        "glibc malloc, default settings (mallopt refused)"
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_platform() -> &'static str {
    "system malloc, default settings"
}

#[cfg(test)]
mod tests {
    use super::status_field_bytes;

    #[test]
    fn parses_fields_from_one_snapshot() {
        let text = "Name:\tx\nVmHWM:\t  1200 kB\nVmRSS:\t  1000 kB\nVmRSSx:\t 7 kB\n";
        assert_eq!(status_field_bytes(text, "VmRSS"), Some(1000 * 1024));
        assert_eq!(status_field_bytes(text, "VmHWM"), Some(1200 * 1024));
        assert_eq!(status_field_bytes(text, "NoSuchField"), None);
        assert_eq!(status_field_bytes("VmRSS:\tbad kB\n", "VmRSS"), None);
    }

    #[test]
    fn peak_is_at_least_current_in_one_snapshot() {
        // RSS and HWM must come from the same read: two reads race with the allocator (the CI
        // once saw RSS of a later read exceed the HWM of an earlier one by one page).
        if let Ok(text) = std::fs::read_to_string("/proc/self/status") {
            let rss = status_field_bytes(&text, "VmRSS").unwrap();
            let hwm = status_field_bytes(&text, "VmHWM").unwrap();
            assert!(rss > 0 && hwm >= rss, "rss {rss}, hwm {hwm}");
        }
    }
}
