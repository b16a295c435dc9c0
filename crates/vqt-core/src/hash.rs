//! File hashing for run records.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// Hex-encoded sha256 of a file's bytes, read in 1 MiB chunks.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Hex sha256 of the content of a decoded split, in order: every image's size, channels and
/// pixels and its label. Two splits hash alike exactly when they hold the same images and labels
/// in the same order, wherever the files came from; a file changed in place changes it.
pub fn sha256_samples(samples: &[crate::data::Sample]) -> String {
    let mut h = Sha256::new();
    for s in samples {
        let i = &s.image;
        for v in [i.height, i.width, i.channels, s.label] {
            h.update((v as u64).to_le_bytes());
        }
        h.update(&i.pixels);
    }
    format!("{:x}", h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_content() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let p = dir.join("abc.txt");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
