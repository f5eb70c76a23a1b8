//! Image → tensor conversion and normalisation (torchvision's `ToTensor` and `Normalize`).

use crate::{DatasetError, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;
use std::path::Path;

/// Per-channel normalisation on pixels scaled to [0, 1]: `(x − mean) / std`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalize {
    /// The ImageNet statistics torchvision uses (and the pretrained CIFAR ResNets in ../shared were trained with).
    pub const IMAGENET: Normalize = Normalize {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };

    /// Per-channel statistics of the CIFAR-10 training set (the common CIFAR normalisation).
    pub const CIFAR10: Normalize = Normalize {
        mean: [0.4914, 0.4822, 0.4465],
        std: [0.2470, 0.2435, 0.2616],
    };

    /// Per-channel statistics of the CIFAR-100 training set.
    pub const CIFAR100: Normalize = Normalize {
        mean: [0.5071, 0.4865, 0.4409],
        std: [0.2673, 0.2564, 0.2762],
    };

    /// Parses `"0.485,0.456,0.406"`-style triples (as in safetensors metadata and the `--mean/--std` flags).
    pub fn parse(mean: &str, std: &str) -> Result<Self> {
        let triple = |what: &str, s: &str| -> Result<[f32; 3]> {
            let values: Vec<f32> = s
                .split(',')
                .map(|v| v.trim().parse::<f32>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| DatasetError::Invalid {
                    what: what.into(),
                    reason: format!("`{s}` is not three comma-separated numbers: {e}"),
                })?;
            values
                .try_into()
                .map_err(|v: Vec<f32>| DatasetError::Invalid {
                    what: what.into(),
                    reason: format!("expected 3 values, got {}", v.len()),
                })
        };
        let n = Normalize {
            mean: triple("mean", mean)?,
            std: triple("std", std)?,
        };
        if n.std.iter().any(|&s| s <= 0.0) {
            return Err(DatasetError::Invalid {
                what: "std".into(),
                reason: format!("every value must be positive, got {:?}", n.std),
            });
        }
        Ok(n)
    }

    /// Normalises CHW f32 pixel data in [0, 1] in place.
    pub fn apply(&self, chw: &mut [f32], plane: usize) {
        for (c, channel) in chw.chunks_mut(plane).enumerate() {
            let (m, s) = (self.mean[c % 3], 1.0 / self.std[c % 3]);
            channel.iter_mut().for_each(|v| *v = (*v - m) * s);
        }
    }
}

/// CHW f32 in [0, 1] from an RGB image (torchvision's `ToTensor`).
pub fn to_chw(img: &RgbImage) -> Vec<f32> {
    let plane = (img.width() * img.height()) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = p[c] as f32 / 255.0;
        }
    }
    out
}

/// Decodes an image file to RGB, naming the file on failure.
pub fn open_rgb(path: &Path) -> Result<RgbImage> {
    let img = image::open(path).map_err(|e| DatasetError::Decode {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(img.to_rgb8())
}

/// A normalised `[1, 3, H, W]` tensor of one image file.
pub fn image_tensor(path: &Path, normalize: &Normalize, device: &Device) -> Result<Tensor> {
    let img = open_rgb(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut chw = to_chw(&img);
    normalize.apply(&mut chw, w * h);
    Ok(Tensor::from_vec(chw, (1, 3, h, w), device)?)
}

/// Zero-pads by `padding` on every side, then crops `size`×`size` at `(x, y)` of the padded image
/// (the CIFAR augmentation of He et al.: padding 4, offsets uniform in 0..=8).
pub fn pad_crop(img: &RgbImage, padding: u32, x: u32, y: u32, size: u32) -> RgbImage {
    RgbImage::from_fn(size, size, |cx, cy| {
        let (sx, sy) = (
            (cx + x) as i64 - padding as i64,
            (cy + y) as i64 - padding as i64,
        );
        if sx < 0 || sy < 0 || sx >= img.width() as i64 || sy >= img.height() as i64 {
            image::Rgb([0, 0, 0])
        } else {
            *img.get_pixel(sx as u32, sy as u32)
        }
    })
}

/// Zero border of `pad` pixels on every side.
pub fn zero_pad(img: &RgbImage, pad: u32) -> RgbImage {
    if pad == 0 {
        return img.clone();
    }
    let mut out = RgbImage::new(img.width() + 2 * pad, img.height() + 2 * pad);
    image::imageops::replace(&mut out, img, pad as i64, pad as i64);
    out
}

pub fn hflip(img: &RgbImage) -> RgbImage {
    image::imageops::flip_horizontal(img)
}

pub fn crop(img: &RgbImage, x: u32, y: u32, w: u32, h: u32) -> RgbImage {
    image::imageops::crop_imm(img, x, y, w, h).to_image()
}

/// Bilinear resize (a triangle filter widened when shrinking, as PIL's `BILINEAR` that torchvision uses).
pub fn resize(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    if (w, h) == img.dimensions() {
        return img.clone();
    }
    image::imageops::resize(img, w, h, image::imageops::FilterType::Triangle)
}

/// Scales so the shorter side is `size`; the longer side is truncated as torchvision's `Resize(int)` does.
pub fn resize_shorter(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (nw, nh) = if w <= h {
        (size, (size as u64 * h as u64 / w as u64) as u32)
    } else {
        ((size as u64 * w as u64 / h as u64) as u32, size)
    };
    resize(img, nw, nh)
}

/// Top-left corner of torchvision's `CenterCrop`: Python's `round((side − size) / 2)`, ties to even.
pub fn center_offset(side: u32, size: u32) -> u32 {
    ((side.saturating_sub(size)) as f64 / 2.0).round_ties_even() as u32
}

pub fn center_crop(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if w < size || h < size {
        // torchvision zero-pads an image smaller than the crop, centred, then crops.
        let (cw, ch) = (w.max(size), h.max(size));
        let mut canvas = RgbImage::new(cw, ch);
        image::imageops::replace(
            &mut canvas,
            img,
            ((cw - w) / 2) as i64,
            ((ch - h) / 2) as i64,
        );
        return center_crop(&canvas, size);
    }
    crop(
        img,
        center_offset(w, size),
        center_offset(h, size),
        size,
        size,
    )
}

/// The ten crops of the paper's evaluation: four corners and the centre, then their horizontal flips.
pub fn ten_crop(img: &RgbImage, size: u32) -> Vec<RgbImage> {
    let (w, h) = img.dimensions();
    let corners = [(0, 0), (w - size, 0), (0, h - size), (w - size, h - size)];
    let mut crops: Vec<RgbImage> = corners
        .iter()
        .map(|&(x, y)| crop(img, x, y, size, size))
        .collect();
    crops.push(center_crop(img, size));
    let flipped: Vec<RgbImage> = crops.iter().map(hflip).collect();
    crops.extend(flipped);
    crops
}

/// Inception-style crop box (torchvision `RandomResizedCrop.get_params`): area in `scale` of the image,
/// aspect ratio log-uniform in `ratio`, 10 tries, then a centre crop at the clamped ratio.
pub fn random_resized_crop_box(
    (w, h): (u32, u32),
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut impl rand::Rng,
) -> (u32, u32, u32, u32) {
    let area = (w * h) as f64;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..scale.1);
        let aspect = rng.random_range(log_lo..log_hi).exp();
        let cw = (target * aspect).sqrt().round() as u32;
        let ch = (target / aspect).sqrt().round() as u32;
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            let x = rng.random_range(0..=w - cw);
            let y = rng.random_range(0..=h - ch);
            return (x, y, cw, ch);
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (cw, ch) = if in_ratio < ratio.0 {
        (w, (w as f64 / ratio.0).round() as u32)
    } else if in_ratio > ratio.1 {
        ((h as f64 * ratio.1).round() as u32, h)
    } else {
        (w, h)
    };
    ((w - cw) / 2, (h - ch) / 2, cw, ch)
}

/// AlexNet's PCA colour augmentation (as fb.resnet.torch `Lighting(0.1, …)`): adds
/// `V · (α ⊙ λ)` to every pixel of CHW data in [0, 1], α ~ N(0, `alpha_std`²).
pub fn lighting(chw: &mut [f32], plane: usize, alpha_std: f32, rng: &mut impl rand::Rng) {
    const EIGVAL: [f32; 3] = [0.2175, 0.0188, 0.0045];
    const EIGVEC: [[f32; 3]; 3] = [
        [-0.5675, 0.7192, 0.4009],
        [-0.5808, -0.0045, -0.8140],
        [-0.5836, -0.6948, 0.4203],
    ];
    use rand_distr::Distribution;
    let normal = rand_distr::Normal::new(0.0f32, alpha_std.max(1e-12)).expect("positive std");
    let alpha: [f32; 3] = std::array::from_fn(|_| normal.sample(rng));
    for (c, channel) in chw.chunks_mut(plane).enumerate() {
        let shift: f32 = (0..3).map(|k| EIGVEC[c][k] * alpha[k] * EIGVAL[k]).sum();
        channel.iter_mut().for_each(|v| *v += shift);
    }
}
