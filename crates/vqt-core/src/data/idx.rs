//! IDX files (MNIST, Fashion-MNIST), gzipped or not: big-endian header `0 0 type ndims`, one u32
//! per dimension, then row-major data. Images must be u8 `[n, h, w]`, labels u8 `[n]`.

use super::{DataError, RawImage, Sample};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

/// A parsed IDX array of u8.
#[derive(Debug, Clone)]
pub struct IdxArray {
    /// Extents.
    pub dims: Vec<usize>,
    /// Row-major bytes.
    pub data: Vec<u8>,
}

fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    let io = |source| DataError::Io { path: path.to_path_buf(), error: source };
    let raw = std::fs::read(path).map_err(io)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::Format { path: path.to_path_buf(), msg: format!("bad gzip stream: {e}") })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Reads an IDX file of unsigned bytes (type code 0x08).
pub fn read_idx(path: &Path) -> Result<IdxArray, DataError> {
    let bytes = read_file(path)?;
    let fmt = |msg: String| DataError::Format { path: path.to_path_buf(), msg };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(fmt("not an IDX file (bad magic)".into()));
    }
    if bytes[2] != 0x08 {
        return Err(fmt(format!("IDX type code 0x{:02x} is not unsigned bytes (0x08)", bytes[2])));
    }
    let ndims = bytes[3] as usize;
    let header = 4 + 4 * ndims;
    if ndims == 0 || bytes.len() < header {
        return Err(fmt("truncated IDX header".into()));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let n: usize = dims.iter().product();
    if bytes.len() - header != n {
        return Err(fmt(format!("header says {dims:?} ({n} bytes of data) but the file has {}", bytes.len() - header)));
    }
    Ok(IdxArray { dims, data: bytes[header..].to_vec() })
}

/// Reads an IDX image file `[n, h, w]` and its label file `[n]` into samples.
/// `num_classes` bounds the labels (an out-of-range label is an error naming its index).
pub fn read_idx_pair(images: &Path, labels: &Path, num_classes: usize) -> Result<Vec<Sample>, DataError> {
    let img = read_idx(images)?;
    let lab = read_idx(labels)?;
    let [n, h, w] = img.dims[..] else {
        return Err(DataError::Format { path: images.to_path_buf(), msg: format!("expected 3 dimensions [n, h, w], found {:?}", img.dims) });
    };
    if lab.dims != [n] {
        return Err(DataError::Format {
            path: labels.to_path_buf(),
            msg: format!("has {:?} labels but {} has {n} images", lab.dims, images.display()),
        });
    }
    if n == 0 {
        return Err(DataError::Format { path: images.to_path_buf(), msg: "contains no images".into() });
    }
    if let Some(i) = lab.data.iter().position(|&l| l as usize >= num_classes) {
        return Err(DataError::Format {
            path: labels.to_path_buf(),
            msg: format!("label {} at index {i} is out of range for {num_classes} classes", lab.data[i]),
        });
    }
    Ok(img
        .data
        .chunks_exact(h * w)
        .zip(&lab.data)
        .map(|(px, &l)| Sample { image: RawImage { height: h, width: w, channels: 1, pixels: Arc::from(px) }, label: l as usize })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    /// `bytes` written to `name` in `dir`.
    fn tmp(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn reads_plain_and_gzipped_pairs() {
        let d = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = (0..2 * 3 * 2).map(|x| x as u8).collect();
        let images = tmp(&d, "img.idx", &idx(&[2, 3, 2], &pixels));
        let labels = tmp(&d, "lab.idx.gz", &gz(&idx(&[2], &[7, 1])));
        let s = read_idx_pair(&images, &labels, 10).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!((s[1].label, s[1].image.height, s[1].image.width), (1, 3, 2));
        assert_eq!(&s[1].image.pixels[..], &pixels[6..12]);
    }

    #[test]
    fn bad_files_name_the_file_and_problem() {
        let d = tempfile::tempdir().unwrap();
        let images = tmp(&d, "i2.idx", &idx(&[2, 2, 2], &[0; 8]));
        let short = tmp(&d, "short.idx", &idx(&[2, 2, 2], &[0; 7]));
        let e = read_idx_pair(&short, &images, 10).unwrap_err().to_string();
        assert!(e.contains("short.idx: header says [2, 2, 2] (8 bytes of data) but the file has 7"), "{e}");
        let labels3 = tmp(&d, "l3.idx", &idx(&[3], &[0, 1, 2]));
        let e = read_idx_pair(&images, &labels3, 10).unwrap_err().to_string();
        assert!(e.contains("l3.idx: has [3] labels but") && e.contains("i2.idx has 2 images"), "{e}");
        let big = tmp(&d, "big.idx", &idx(&[2], &[0, 12]));
        let e = read_idx_pair(&images, &big, 10).unwrap_err().to_string();
        assert!(e.contains("big.idx: label 12 at index 1 is out of range for 10 classes"), "{e}");
        let junk = tmp(&d, "junk.idx", b"PK\x03\x04 not idx");
        assert!(read_idx(&junk).unwrap_err().to_string().contains("junk.idx: not an IDX file"));
        let badgz = tmp(&d, "bad.gz", &[0x1f, 0x8b, 8, 0, 1, 2, 3]);
        assert!(read_idx(&badgz).unwrap_err().to_string().contains("bad.gz: bad gzip stream"));
        let e = read_idx(std::path::Path::new("/nope/train.idx")).unwrap_err().to_string();
        assert!(e.starts_with("/nope/train.idx: "), "{e}");
    }
}
