//! The papers' preprocessing as one value: an augmentation (random or fixed geometry) and a normalisation.

use crate::transforms::{
    center_crop, crop, hflip, lighting, pad_crop, random_resized_crop_box, resize, resize_shorter,
    ten_crop, to_chw, zero_pad, Normalize,
};
use crate::{DatasetError, Result};
use image::RgbImage;
use rand::Rng;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub enum Augmentation {
    /// The image as it is (CIFAR evaluation).
    None,
    /// He et al. CIFAR training: zero-pad by `padding`, random 32×32 crop, random horizontal flip.
    CifarTrain { padding: u32 },
    /// He et al. ImageNet training: shorter side uniform in `[min, max]`, random `crop`², flip, PCA lighting.
    ScaleAugment {
        min: u32,
        max: u32,
        crop: u32,
        lighting: f32,
    },
    /// torchvision's default training: RandomResizedCrop(`crop`, scale 0.08–1, ratio 3/4–4/3), flip.
    RandomResizedCrop { crop: u32 },
    /// Evaluation: shorter side to `resize`, centre `crop`² (resize = crop / crop_pct).
    CenterCrop { resize: u32, crop: u32 },
    /// Evaluation, the paper's 10-crop: shorter side to `resize` (0: as it is), zero-pad by `pad`, then the four
    /// corner and the centre `crop`² crops and their mirror images: ten views per image.
    TenCrop { resize: u32, pad: u32, crop: u32 },
    /// Evaluation of a fully-convolutional net at one scale: the whole image, shorter side `size`.
    ResizeShorter { size: u32 },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Normalization {
    /// `(x − mean) / std` per channel on [0, 1] pixels.
    PerChannel(Normalize),
    /// Subtract a mean image (CHW, [0, 1] pixels) of the training set: the paper's "per-pixel mean".
    PerPixelMean(Arc<Vec<f32>>),
}

/// CHW pixels of one processed image and its `(height, width)`.
pub type Processed = (Vec<f32>, (usize, usize));

#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    pub augmentation: Augmentation,
    pub normalization: Normalization,
}

impl Pipeline {
    pub fn new(augmentation: Augmentation, normalization: Normalization) -> Self {
        Self {
            augmentation,
            normalization,
        }
    }

    /// Images each sample becomes (10 for ten-crop, else 1).
    pub fn views(&self) -> usize {
        match self.augmentation {
            Augmentation::TenCrop { .. } => 10,
            _ => 1,
        }
    }

    /// The geometric part: the views of one image (one, except for ten-crop).
    pub fn augment_views(&self, img: &RgbImage, rng: &mut impl Rng) -> Vec<RgbImage> {
        match self.augmentation {
            Augmentation::TenCrop { resize, pad, crop } => {
                let img = if resize > 0 {
                    resize_shorter(img, resize)
                } else {
                    img.clone()
                };
                ten_crop(&zero_pad(&img, pad), crop)
            }
            _ => vec![self.augment(img, rng)],
        }
    }

    /// The geometric part: an RGB image of the output size.
    pub fn augment(&self, img: &RgbImage, rng: &mut impl Rng) -> RgbImage {
        match self.augmentation {
            Augmentation::None => img.clone(),
            Augmentation::ResizeShorter { size } => resize_shorter(img, size),
            Augmentation::TenCrop { .. } => {
                self.augment_views(img, rng).swap_remove(4) // the centre crop
            }
            Augmentation::CifarTrain { padding } => {
                let (x, y) = (
                    rng.random_range(0..=2 * padding),
                    rng.random_range(0..=2 * padding),
                );
                let out = pad_crop(img, padding, x, y, img.width().min(img.height()));
                flip_maybe(out, rng)
            }
            Augmentation::ScaleAugment {
                min,
                max,
                crop: size,
                ..
            } => {
                let scaled = resize_shorter(img, rng.random_range(min..=max.max(min)));
                let (w, h) = scaled.dimensions();
                let x = rng.random_range(0..=w.saturating_sub(size));
                let y = rng.random_range(0..=h.saturating_sub(size));
                flip_maybe(crop(&scaled, x, y, size.min(w), size.min(h)), rng)
            }
            Augmentation::RandomResizedCrop { crop: size } => {
                let (x, y, w, h) =
                    random_resized_crop_box(img.dimensions(), (0.08, 1.0), (0.75, 4.0 / 3.0), rng);
                flip_maybe(resize(&crop(img, x, y, w, h), size, size), rng)
            }
            Augmentation::CenterCrop { resize, crop } => {
                center_crop(&resize_shorter(img, resize), crop)
            }
        }
    }

    /// CHW f32 pixels after augmentation, colour augmentation and normalisation; for ten-crop, the ten views
    /// one after the other.
    pub fn apply(&self, img: &RgbImage, rng: &mut impl Rng) -> Result<Processed> {
        let views = self.augment_views(img, rng);
        let (w, h) = views[0].dimensions();
        let (w, h) = (w as usize, h as usize);
        let mut out = Vec::with_capacity(views.len() * 3 * w * h);
        for view in &views {
            let mut chw = to_chw(view);
            if let Augmentation::ScaleAugment { lighting: std, .. } = self.augmentation {
                if std > 0.0 {
                    lighting(&mut chw, w * h, std, rng);
                }
            }
            self.normalize(&mut chw, (h, w))?;
            out.extend_from_slice(&chw);
        }
        Ok((out, (h, w)))
    }

    pub fn normalize(&self, chw: &mut [f32], (h, w): (usize, usize)) -> Result<()> {
        match &self.normalization {
            Normalization::PerChannel(n) => n.apply(chw, h * w),
            Normalization::PerPixelMean(mean) => {
                if mean.len() != chw.len() {
                    return Err(DatasetError::Invalid {
                        what: "per-pixel mean".into(),
                        reason: format!(
                            "mean image has {} values, the {h}×{w} output has {}",
                            mean.len(),
                            chw.len()
                        ),
                    });
                }
                chw.iter_mut().zip(mean.iter()).for_each(|(v, m)| *v -= m);
            }
        }
        Ok(())
    }
}

fn flip_maybe(img: RgbImage, rng: &mut impl Rng) -> RgbImage {
    if rng.random_bool(0.5) {
        hflip(&img)
    } else {
        img
    }
}
