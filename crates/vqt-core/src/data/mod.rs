//! Datasets and preprocessing. Every reader yields [`RawImage`]s (decoded 8-bit pixels, any size,
//! 1 or 3 channels) with labels; [`preprocess::Preprocess`] turns them into model inputs.

pub mod files;
pub mod idx;
pub mod preprocess;
pub mod tfds;

use std::sync::Arc;

/// A decoded 8-bit image, HWC row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct RawImage {
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// `height·width·channels` bytes.
    pub pixels: Arc<[u8]>,
}

/// One labelled example.
#[derive(Clone, Debug)]
pub struct Sample {
    /// The image.
    pub image: RawImage,
    /// Class id, `0..num_classes`.
    pub label: usize,
}

/// Why a dataset could not be read. Every message names the file (and line where there is one).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// The content is malformed.
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        msg: String,
    },
}
