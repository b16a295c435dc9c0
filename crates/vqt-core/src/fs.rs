//! Output files that are never half-written.

use std::path::Path;

/// Writes `bytes` to `path` through `<path>.partial` and a rename (creating the parent folder),
/// so a crash never leaves a file that looks complete.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |f| std::io::Write::write_all(f, bytes))
}

/// [`write_atomic`] for output produced piece by piece: `write` fills `<path>.partial` through a
/// buffered writer, which is then flushed, synced and renamed to `path`. Any failure removes the
/// temporary file (disk full, file-size limit), so nothing half-written is left behind.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = std::path::PathBuf::from(tmp);
    let result = std::fs::File::create(&tmp)
        .and_then(|f| {
            let mut w = std::io::BufWriter::new(f);
            write(&mut w)?;
            w.into_inner().map_err(|e| e.into_error())?.sync_data()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_whole_file_and_leaves_no_partial() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("sub");
        let p = dir.join("run.json");
        super::write_atomic(&p, b"{}").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"{}");
        assert!(!dir.join("run.json.partial").exists());
    }

    #[test]
    fn a_failed_write_leaves_no_partial_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        // The rename fails (the target is a non-empty directory): the temporary file goes too.
        let target = dir.join("occupied");
        std::fs::create_dir_all(target.join("x")).unwrap();
        assert!(super::write_atomic(&target, b"data").is_err());
        assert!(!dir.join("occupied.partial").exists());
    }
}
