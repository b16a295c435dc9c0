//! Output files that are never half-written.

use std::path::Path;

/// Writes `bytes` to `path` through `<path>.partial` and a rename (creating the parent folder),
/// so a crash never leaves a file that looks complete.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_whole_file_and_leaves_no_partial() {
        let dir = std::env::temp_dir().join(format!("vqt-fs-{}", std::process::id())).join("sub");
        let p = dir.join("run.json");
        super::write_atomic(&p, b"{}").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"{}");
        assert!(!dir.join("run.json.partial").exists());
    }
}
