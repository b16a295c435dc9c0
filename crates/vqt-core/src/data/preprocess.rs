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

/// Resampling filter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeFilter {
    /// Nearest neighbour (the `image` crate's).
    Nearest,
    /// Linear ("triangle") of the `image` crate, computed in f32: widens its support when
    /// shrinking (antialiased), like PIL's `BILINEAR` in the timm/torchvision pipelines (within
    /// one 8-bit level of PIL, which rounds to u8; tests/resize_parity.rs). When enlarging it is
    /// the same function as `tf-bilinear`. The default.
    #[default]
    Bilinear,
    /// TensorFlow's `tf.image.resize(method="bilinear", antialias=False)`: half-pixel centres,
    /// two taps, no antialiasing, float output (the VTAB recipes of VPT/VQT; equal to torch's
    /// `interpolate(mode="bilinear", align_corners=False)`). Matches TensorFlow within 1e-4
    /// (tests/resize_parity.rs).
    TfBilinear,
    /// Catmull-Rom cubic of the `image` crate (PIL's `BICUBIC` uses a = -0.5 too).
    Bicubic,
    /// Lanczos with window 3.
    Lanczos3,
}

/// Training-time augmentation. Evaluation always uses the deterministic transform (resize to
/// `resize_size`, center crop `img_size`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Augment {
    /// None (the VTAB-1k recipes): train images get the evaluation transform.
    #[default]
    None,
    /// The VPT FGVC recipe: resize to `resize_size` (e.g. 256), a uniformly placed `img_size`
    /// crop (224), horizontal flip with p = 0.5 (torchvision `RandomCrop` + `RandomHorizontalFlip`).
    CropFlip,
    /// torchvision/timm `RandomResizedCrop(img_size, scale=(0.08, 1), ratio=(3/4, 4/3))` on the
    /// original image, then horizontal flip with p = 0.5.
    RandomResizedCrop,
}

/// How images become `[3, S, S]` inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Output side S.
    pub img_size: usize,
    /// Resize filter.
    #[serde(default)]
    pub resize: ResizeFilter,
    /// Normalisation preset.
    #[serde(default)]
    pub normalization: Normalization,
    /// Side R of the square resize before a center (eval) or random (train, `crop-flip`) crop
    /// of S (FGVC: 256 -> 224). Absent: a straight resize to S (aspect ratio not kept, as in the
    /// VTAB recipes).
    #[serde(default)]
    pub resize_size: Option<usize>,
    /// Training augmentation.
    #[serde(default)]
    pub augment: Augment,
}

/// An RGB image in f32, values in [0, 1].
type Rgb32 = image::Rgb32FImage;

/// A per-sample augmentation seed from the run seed, the epoch and the sample's row: the same
/// sample gets the same crop in a resumed run, whatever the loader's worker order.
pub fn augment_seed(seed: u64, epoch: usize, row: usize) -> u64 {
    let mut z = seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (row as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    // splitmix64 finaliser
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Preprocess {
    /// A straight resize to `img_size` without augmentation.
    pub fn new(img_size: usize, resize: ResizeFilter, normalization: Normalization) -> Self {
        Self { img_size, resize, normalization, resize_size: None, augment: Augment::None }
    }

    /// Checks the sizes; the message names the keys.
    pub fn validate(&self) -> Result<(), String> {
        if self.img_size == 0 {
            return Err("img_size must be positive".into());
        }
        if let Some(r) = self.resize_size {
            if r < self.img_size {
                return Err(format!("resize_size {r} is smaller than img_size {}: the crop would not fit", self.img_size));
            }
        }
        Ok(())
    }

    /// True when training images go through a random transform (so trunk features cannot be
    /// cached).
    pub fn is_random(&self) -> bool {
        self.augment != Augment::None
    }

    /// Appends one image as CHW f32 (3·S·S values) to `out`: the evaluation transform.
    pub fn apply_into(&self, img: &RawImage, out: &mut Vec<f32>) {
        let s = self.img_size as u32;
        let src = to_rgb32(img);
        let x = match self.resize_size {
            Some(r) if r as u32 != s => center_crop(&resize(&src, r as u32, r as u32, self.resize), s, s),
            _ => resize(&src, s, s, self.resize),
        };
        self.write_chw(&x, false, out);
    }

    /// Appends one image with the training transform, drawing from a generator seeded with
    /// `seed` (see [`augment_seed`]). Without augmentation this is [`Self::apply_into`].
    pub fn apply_train_into(&self, img: &RawImage, seed: u64, out: &mut Vec<f32>) {
        use rand::{RngExt, SeedableRng};
        if self.augment == Augment::None {
            return self.apply_into(img, out);
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let s = self.img_size as u32;
        let src = to_rgb32(img);
        let x = match self.augment {
            Augment::None => unreachable!(),
            Augment::CropFlip => {
                let r = self.resize_size.unwrap_or(self.img_size) as u32;
                let big = resize(&src, r, r, self.resize);
                let (top, left) = (rng.random_range(0..=r - s), rng.random_range(0..=r - s));
                image::imageops::crop_imm(&big, left, top, s, s).to_image()
            }
            Augment::RandomResizedCrop => {
                let (left, top, w, h) = random_resized_crop_box(src.width(), src.height(), &mut rng);
                resize(&image::imageops::crop_imm(&src, left, top, w, h).to_image(), s, s, self.resize)
            }
        };
        let flip = rng.random_bool(0.5);
        self.write_chw(&x, flip, out);
    }

    fn write_chw(&self, x: &Rgb32, flip: bool, out: &mut Vec<f32>) {
        let (w, h) = (x.width() as usize, x.height() as usize);
        let (mean, std) = self.normalization.mean_std();
        let raw = x.as_raw();
        for c in 0..3 {
            for row in 0..h {
                let line = &raw[row * w * 3..(row + 1) * w * 3];
                if flip {
                    out.extend(line.chunks_exact(3).rev().map(|px| (px[c] - mean[c]) / std[c]));
                } else {
                    out.extend(line.chunks_exact(3).map(|px| (px[c] - mean[c]) / std[c]));
                }
            }
        }
    }

    /// A batch as `(values, [B, 3, S, S])`, evaluation transform.
    pub fn batch(&self, images: &[&RawImage]) -> (Vec<f32>, [usize; 4]) {
        self.batch_on(images, 1)
    }

    /// [`Preprocess::batch`] with the images split over `threads` threads. Each image's values
    /// depend only on the image, so the result is the same for every thread count.
    pub fn batch_on(&self, images: &[&RawImage], threads: usize) -> (Vec<f32>, [usize; 4]) {
        let s = self.img_size;
        (fill_in_order(images, threads, 3 * s * s, |img, out| self.apply_into(img, out)), [images.len(), 3, s, s])
    }

    /// A training batch: each image with its augmentation seed.
    pub fn batch_train(&self, images: &[(&RawImage, u64)]) -> (Vec<f32>, [usize; 4]) {
        self.batch_train_on(images, 1)
    }

    /// [`Preprocess::batch_train`] on `threads` threads (same result for every thread count: each
    /// image's augmentation is seeded by its own seed).
    pub fn batch_train_on(&self, images: &[(&RawImage, u64)], threads: usize) -> (Vec<f32>, [usize; 4]) {
        let s = self.img_size;
        (fill_in_order(images, threads, 3 * s * s, |(img, seed), out| self.apply_train_into(img, *seed, out)), [images.len(), 3, s, s])
    }
}

/// `f` applied to every item, the outputs concatenated in item order; the items are split into
/// at most `threads` contiguous chunks processed in parallel (scoped threads).
fn fill_in_order<T: Sync>(items: &[T], threads: usize, per_item: usize, f: impl Fn(&T, &mut Vec<f32>) + Sync) -> Vec<f32> {
    let run = |chunk: &[T]| {
        let mut out = Vec::with_capacity(chunk.len() * per_item);
        chunk.iter().for_each(|x| f(x, &mut out));
        out
    };
    if threads <= 1 || items.len() < 2 {
        return run(items);
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|s| {
        let parts: Vec<_> = items.chunks(chunk).map(|c| s.spawn(move || run(c))).collect();
        let mut out = Vec::with_capacity(items.len() * per_item);
        for p in parts {
            out.extend(p.join().expect("preprocessing thread panicked"));
        }
        out
    })
}

fn to_rgb32(img: &RawImage) -> Rgb32 {
    let (w, h) = (img.width as u32, img.height as u32);
    let dynamic = match img.channels {
        1 => image::GrayImage::from_raw(w, h, img.pixels.to_vec()).map(image::DynamicImage::ImageLuma8),
        3 => image::RgbImage::from_raw(w, h, img.pixels.to_vec()).map(image::DynamicImage::ImageRgb8),
        c => panic!("RawImage with {c} channels (readers produce 1 or 3)"),
    }
    .expect("RawImage pixel count matches its shape");
    dynamic.to_rgb32f()
}

/// Resizes in f32 (no rounding to 8 bits between or after the passes).
fn resize(src: &Rgb32, w: u32, h: u32, filter: ResizeFilter) -> Rgb32 {
    if src.width() == w && src.height() == h {
        return src.clone();
    }
    let f = match filter {
        ResizeFilter::TfBilinear => return tf_bilinear(src, w, h),
        ResizeFilter::Nearest => image::imageops::FilterType::Nearest,
        ResizeFilter::Bilinear => image::imageops::FilterType::Triangle,
        ResizeFilter::Bicubic => image::imageops::FilterType::CatmullRom,
        ResizeFilter::Lanczos3 => image::imageops::FilterType::Lanczos3,
    };
    image::imageops::resize(src, w, h, f)
}

/// TensorFlow's half-pixel bilinear resize without antialiasing (`resize_bilinear_op.cc`:
/// `in = (out + 0.5)·scale − 0.5`, lower = max(floor(in), 0), upper = min(ceil(in), n − 1),
/// lerp = in − floor(in)). The `image` crate has no non-antialiased bilinear when shrinking.
fn tf_bilinear(src: &Rgb32, w: u32, h: u32) -> Rgb32 {
    fn taps(n_in: u32, n_out: u32) -> Vec<(usize, usize, f32)> {
        let scale = n_in as f32 / n_out as f32;
        (0..n_out)
            .map(|o| {
                let x = (o as f32 + 0.5) * scale - 0.5;
                let f = x.floor();
                let lo = (f as i64).max(0) as usize;
                let hi = (x.ceil() as i64).min(n_in as i64 - 1) as usize;
                (lo, hi, x - f)
            })
            .collect()
    }
    let (xs, ys) = (taps(src.width(), w), taps(src.height(), h));
    let sw = src.width() as usize;
    let raw = src.as_raw();
    let px = |y: usize, x: usize, c: usize| raw[(y * sw + x) * 3 + c];
    let mut out = Vec::with_capacity((w * h * 3) as usize);
    for &(y0, y1, ly) in &ys {
        for &(x0, x1, lx) in &xs {
            for c in 0..3 {
                let top = px(y0, x0, c) + (px(y0, x1, c) - px(y0, x0, c)) * lx;
                let bottom = px(y1, x0, c) + (px(y1, x1, c) - px(y1, x0, c)) * lx;
                out.push(top + (bottom - top) * ly);
            }
        }
    }
    Rgb32::from_raw(w, h, out).expect("w·h·3 values")
}

/// torchvision's center crop: offsets `round((R − S) / 2)`.
fn center_crop(x: &Rgb32, w: u32, h: u32) -> Rgb32 {
    let top = ((x.height() - h) as f64 / 2.0).round() as u32;
    let left = ((x.width() - w) as f64 / 2.0).round() as u32;
    image::imageops::crop_imm(x, left, top, w, h).to_image()
}

/// torchvision `RandomResizedCrop.get_params` with scale (0.08, 1) and ratio (3/4, 4/3):
/// ten tries of a random area and log-uniform aspect ratio, then a center crop with the ratio
/// clamped. Returns (left, top, width, height).
pub fn random_resized_crop_box(width: u32, height: u32, rng: &mut impl rand::RngExt) -> (u32, u32, u32, u32) {
    let area = (width * height) as f64;
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(0.08..1.0);
        let ratio = rng.random_range(lo..hi).exp();
        let w = (target * ratio).sqrt().round() as u32;
        let h = (target / ratio).sqrt().round() as u32;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return (left, top, w, h);
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < 0.75 {
        (width, ((width as f64 / 0.75).round() as u32).min(height))
    } else if in_ratio > 4.0 / 3.0 {
        (((height as f64 * 4.0 / 3.0).round() as u32).min(width), height)
    } else {
        (width, height)
    };
    ((width - w) / 2, (height - h) / 2, w, h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn grey_is_replicated_resized_and_normalised() {
        let img = RawImage { height: 4, width: 4, channels: 1, pixels: Arc::from(vec![51u8; 16]) };
        let p = Preprocess::new(8, ResizeFilter::Bilinear, Normalization::Imagenet);
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
        let p = Preprocess::new(2, ResizeFilter::Nearest, Normalization::None);
        let (v, _) = p.batch(&[&img]);
        assert_eq!(&v[0..4], &[1.0; 4]);
        assert_eq!(&v[4..8], &[0.0; 4]);
        assert!(v[8..12].iter().all(|x| (x - 127.0 / 255.0).abs() < 1e-6));
    }

    /// An 8×8 grey image whose pixel (y, x) is 8y + x, as a [0, 1] value.
    fn ramp() -> RawImage {
        RawImage { height: 8, width: 8, channels: 1, pixels: Arc::from((0..64u8).collect::<Vec<_>>()) }
    }

    fn px(v: f32) -> u8 {
        (v * 255.0).round() as u8
    }

    #[test]
    fn eval_resize_then_center_crop() {
        let p = Preprocess { resize_size: Some(8), ..Preprocess::new(4, ResizeFilter::Nearest, Normalization::None) };
        let (v, _) = p.batch(&[&ramp()]);
        let got: Vec<u8> = v[..16].iter().map(|&x| px(x)).collect();
        let want: Vec<u8> = (2..6).flat_map(|y| (2..6).map(move |x| 8 * y + x)).collect();
        assert_eq!(got, want);
        // Training without augmentation is the same transform.
        let (t, _) = p.batch_train(&[(&ramp(), 7)]);
        assert_eq!(v, t);
    }

    #[test]
    fn crop_flip_is_a_seeded_window_with_flips() {
        let p = Preprocess { resize_size: Some(8), augment: Augment::CropFlip, ..Preprocess::new(4, ResizeFilter::Nearest, Normalization::None) };
        let img = ramp();
        let mut seen = std::collections::HashSet::new();
        let mut flips = 0;
        for seed in 0..400u64 {
            let (v, shape) = p.batch_train(&[(&img, augment_seed(42, 0, seed as usize))]);
            assert_eq!(shape, [1, 3, 4, 4]);
            let g: Vec<u8> = v[..16].iter().map(|&x| px(x)).collect();
            // Recover the window: the first row is 8·top + left .. (+3), possibly reversed.
            let flipped = g[0] > g[3];
            let (top, left) = ((g[0].min(g[3]) / 8) as usize, (g[0].min(g[3]) % 8) as usize);
            for y in 0..4 {
                for x in 0..4 {
                    let sx = if flipped { left + 3 - x } else { left + x };
                    assert_eq!(g[y * 4 + x] as usize, 8 * (top + y) + sx, "seed {seed}");
                }
            }
            flips += flipped as usize;
            seen.insert((top, left));
        }
        assert_eq!(seen.len(), 25, "every offset 0..=4 in both axes is drawn");
        assert!((150..250).contains(&flips), "{flips} flips of 400");
        // Same seed, same output.
        let a = p.batch_train(&[(&img, 5)]).0;
        assert_eq!(a, p.batch_train(&[(&img, 5)]).0);
        // Evaluation stays the center crop.
        assert_eq!(p.batch(&[&img]).0, Preprocess { augment: Augment::None, ..p.clone() }.batch(&[&img]).0);
        // Splitting a batch over threads changes nothing.
        let imgs: Vec<(&RawImage, u64)> = (0..5).map(|i| (&img, i as u64)).collect();
        assert_eq!(p.batch_train(&imgs), p.batch_train_on(&imgs, 3));
        let plain: Vec<&RawImage> = imgs.iter().map(|(i, _)| *i).collect();
        assert_eq!(p.batch(&plain), p.batch_on(&plain, 2));
    }

    #[test]
    fn random_resized_crop_boxes_follow_torchvision() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let (mut min_frac, mut max_frac) = (1.0f64, 0.0f64);
        for _ in 0..2000 {
            let (l, t, w, h) = random_resized_crop_box(300, 200, &mut rng);
            assert!(w > 0 && h > 0 && l + w <= 300 && t + h <= 200, "{l} {t} {w} {h}");
            let frac = (w * h) as f64 / 60000.0;
            min_frac = min_frac.min(frac);
            max_frac = max_frac.max(frac);
            let ratio = w as f64 / h as f64;
            if (w, h) != (300, 200) {
                assert!((0.74..=1.35).contains(&ratio), "ratio {ratio} of {w}x{h}");
            }
        }
        assert!(min_frac < 0.1 && min_frac > 0.07 && max_frac > 0.8, "area fractions {min_frac}..{max_frac}");
        // A strip no crop fits: the fallback is a center crop with the ratio clamped to 3/4.
        let (l, t, w, h) = random_resized_crop_box(10, 200, &mut rng);
        assert_eq!((w, h), (10, 13));
        assert_eq!((l, t), (0, 93));
        // The whole pipeline gives S×S.
        let p = Preprocess { augment: Augment::RandomResizedCrop, ..Preprocess::new(6, ResizeFilter::Bilinear, Normalization::None) };
        assert_eq!(p.batch_train(&[(&ramp(), 1)]).1, [1, 3, 6, 6]);
    }

    #[test]
    fn resize_size_below_img_size_is_refused() {
        let p = Preprocess { resize_size: Some(200), ..Preprocess::new(224, ResizeFilter::Bilinear, Normalization::None) };
        assert!(p.validate().unwrap_err().contains("resize_size 200 is smaller than img_size 224"));
        assert!(Preprocess { resize_size: Some(256), ..p }.validate().is_ok());
    }
}
