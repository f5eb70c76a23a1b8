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
