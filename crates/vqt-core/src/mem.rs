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
