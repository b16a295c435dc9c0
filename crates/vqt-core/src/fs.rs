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
    let tmp = std::path::PathBuf::from(tmp);
    let result = write_synced(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        // A failed write (disk full, file-size limit) leaves nothing behind.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_data()
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

    #[test]
    fn a_failed_write_leaves_no_partial_file() {
        let dir = std::env::temp_dir().join(format!("vqt-fs-fail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // The rename fails (the target is a non-empty directory): the temporary file goes too.
        let target = dir.join("occupied");
        std::fs::create_dir_all(target.join("x")).unwrap();
        assert!(super::write_atomic(&target, b"data").is_err());
        assert!(!dir.join("occupied.partial").exists());
    }
}
