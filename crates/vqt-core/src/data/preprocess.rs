//! Image -> model input: grey to RGB, resize, /255, per-channel normalisation (formats.md §3).

use super::RawImage;
use serde::{Deserialize, Serialize};

/// Input normalisation presets. Record which one a run used: results move by points.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Normalization {
    /// mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225): VPT/VQT/SynQT recipes, DINOv2, MAE.
    /// The default.
    #[default]
    Imagenet,
    /// mean = std = 0.5 (range [-1, 1]): JAX ViT pre-training, SSF, Adapter+.
    Inception,
    /// [0, 1] pixels (PETL_Vision default).
    None,
}

impl Normalization {
    /// Per-channel (mean, std).
    pub fn mean_std(self) -> ([f32; 3], [f32; 3]) {
        match self {
            Normalization::Imagenet => ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            Normalization::Inception => ([0.5; 3], [0.5; 3]),
            Normalization::None => ([0.0; 3], [1.0; 3]),
        }
    }
}

/// Resampling filter of the `image` crate (not bit-identical to TF or PIL; see formats.md §3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeFilter {
    /// Nearest neighbour.
    Nearest,
    /// Linear ("triangle"); widens when shrinking, like PIL. The default.
    #[default]
    Bilinear,
    /// Catmull-Rom cubic.
    Bicubic,
    /// Lanczos with window 3.
    Lanczos3,
}

/// How images become `[3, S, S]` inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Output side S (straight resize; aspect ratio is not kept, as in the VTAB recipes).
    pub img_size: usize,
    /// Resize filter.
    #[serde(default)]
    pub resize: ResizeFilter,
    /// Normalisation preset.
    #[serde(default)]
    pub normalization: Normalization,
}



impl Preprocess {
    /// Appends one image as CHW f32 (3·S·S values) to `out`.
    pub fn apply_into(&self, img: &RawImage, out: &mut Vec<f32>) {
        let s = self.img_size as u32;
        let rgb: image::RgbImage = match img.channels {
            1 => image::GrayImage::from_raw(img.width as u32, img.height as u32, img.pixels.to_vec())
                .map(|g| image::DynamicImage::ImageLuma8(g).to_rgb8()),
            3 => image::RgbImage::from_raw(img.width as u32, img.height as u32, img.pixels.to_vec()),
            c => panic!("RawImage with {c} channels (readers produce 1 or 3)"),
        }
        .expect("RawImage pixel count matches its shape");
        let resized = if rgb.width() == s && rgb.height() == s {
            rgb
        } else {
            let filter = match self.resize {
                ResizeFilter::Nearest => image::imageops::FilterType::Nearest,
                ResizeFilter::Bilinear => image::imageops::FilterType::Triangle,
                ResizeFilter::Bicubic => image::imageops::FilterType::CatmullRom,
                ResizeFilter::Lanczos3 => image::imageops::FilterType::Lanczos3,
            };
            image::imageops::resize(&rgb, s, s, filter)
        };
        let (mean, std) = self.normalization.mean_std();
        let raw = resized.as_raw();
        for c in 0..3 {
            out.extend(raw.chunks_exact(3).map(|px| (px[c] as f32 / 255.0 - mean[c]) / std[c]));
        }
    }

    /// A batch as `(values, [B, 3, S, S])`.
    pub fn batch(&self, images: &[&RawImage]) -> (Vec<f32>, [usize; 4]) {
        let s = self.img_size;
        let mut out = Vec::with_capacity(images.len() * 3 * s * s);
        for img in images {
            self.apply_into(img, &mut out);
        }
        (out, [images.len(), 3, s, s])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn grey_is_replicated_resized_and_normalised() {
        let img = RawImage { height: 4, width: 4, channels: 1, pixels: Arc::from(vec![51u8; 16]) };
        let p = Preprocess { img_size: 8, resize: ResizeFilter::Bilinear, normalization: Normalization::Imagenet };
        let (v, shape) = p.batch(&[&img, &img]);
        assert_eq!(shape, [2, 3, 8, 8]);
        assert_eq!(v.len(), 2 * 3 * 64);
        let (mean, std) = Normalization::Imagenet.mean_std();
        for c in 0..3 {
            let want = (0.2 - mean[c]) / std[c];
            assert!(v[c * 64..(c + 1) * 64].iter().all(|x| (x - want).abs() < 1e-5), "channel {c}");
        }
    }

    #[test]
    fn rgb_channels_stay_apart() {
        let px: Vec<u8> = (0..4).flat_map(|_| [255u8, 0, 127]).collect();
        let img = RawImage { height: 2, width: 2, channels: 3, pixels: Arc::from(px) };
        let p = Preprocess { img_size: 2, resize: ResizeFilter::Nearest, normalization: Normalization::None };
        let (v, _) = p.batch(&[&img]);
        assert_eq!(&v[0..4], &[1.0; 4]);
        assert_eq!(&v[4..8], &[0.0; 4]);
        assert!(v[8..12].iter().all(|x| (x - 127.0 / 255.0).abs() < 1e-6));
    }
}
