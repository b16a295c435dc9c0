//! Helpers for the workspace's tests (feature `testing`, enabled by the crates' dev-dependencies).

use std::path::Path;

/// A fresh temp directory for one test (`vqt-<tag>-<random>` under the system's temp dir),
/// removed with everything in it when dropped; kept when the test is failing (the thread is
/// panicking), with its path printed, so its files can be looked at.
#[derive(Debug)]
pub struct TestDir(tempfile::TempDir);

impl TestDir {
    /// Creates the directory; panics if it cannot (a test helper).
    pub fn new(tag: &str) -> Self {
        Self(tempfile::Builder::new().prefix(&format!("vqt-{tag}-")).tempdir().expect("a temp dir for a test"))
    }
}

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<std::ffi::OsStr> for TestDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.path().as_os_str()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.disable_cleanup(true);
            eprintln!("test failed: its files are kept in {}", self.0.path().display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TestDir;

    #[test]
    fn a_test_dir_is_removed_when_dropped_and_kept_when_its_test_fails() {
        let d = TestDir::new("testing");
        std::fs::write(d.join("f"), b"x").unwrap();
        let path = d.to_path_buf();
        assert!(path.file_name().unwrap().to_string_lossy().starts_with("vqt-testing-"));
        drop(d);
        assert!(!path.exists());
        let kept = std::thread::spawn(|| {
            let d = TestDir::new("testing");
            let path = d.to_path_buf();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                let _d = d;
                panic!("a failing test");
            }));
            assert!(r.is_err());
            path
        })
        .join()
        .unwrap();
        assert!(kept.exists());
        std::fs::remove_dir_all(&kept).unwrap();
    }
}
