//! Process memory probes for run records and benchmarks.

/// A `/proc/self/status` field in bytes (`VmRSS` = current resident memory, `VmHWM` = peak);
/// `None` off Linux or if the field is missing.
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_is_at_least_current() {
        if let (Some(rss), Some(hwm)) = (super::proc_status_bytes("VmRSS"), super::proc_status_bytes("VmHWM")) {
            assert!(rss > 0 && hwm >= rss, "rss {rss}, hwm {hwm}");
        }
        assert_eq!(super::proc_status_bytes("NoSuchField"), None);
    }
}
