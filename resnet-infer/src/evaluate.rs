//! Top-1/top-5 evaluation of a model on a dataset split.

use crate::metrics::{Accuracy, AccuracyReport};
use anyhow::{bail, Result};
use candle_core::{Device, D};
use datasets::{Augmentation, Loader, LoaderConfig, Normalization, Normalize, Pipeline, Split};
use resnet_core::{Family, Model};
use serde::Serialize;
use std::time::Instant;

/// What the evaluation data is (`--dataset`): fixes the class count and the normalisation used when neither
/// `--mean/--std` nor the weights say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalDataset {
    Cifar10,
    Cifar100,
    Imagenet,
}

impl EvalDataset {
    pub fn classes(self) -> usize {
        match self {
            Self::Cifar10 => 10,
            Self::Cifar100 => 100,
            Self::Imagenet => 1000,
        }
    }

    /// The training-set statistics the dataset's networks are usually trained with.
    pub fn normalize(self) -> Normalize {
        match self {
            Self::Cifar10 => Normalize::CIFAR10,
            Self::Cifar100 => Normalize::CIFAR100,
            Self::Imagenet => Normalize::IMAGENET,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Cifar10 => "cifar10",
            Self::Cifar100 => "cifar100",
            Self::Imagenet => "imagenet",
        }
    }
}

/// The normalisation of an evaluation: `--mean/--std`, else the weights' own (file metadata or the hub's
/// `config.json`), else `--dataset`'s statistics, else ImageNet's.
pub fn choose_normalization(
    explicit: Option<Normalize>,
    from_weights: Option<Normalize>,
    dataset: Option<EvalDataset>,
) -> Normalize {
    explicit
        .or(from_weights)
        .or(dataset.map(EvalDataset::normalize))
        .unwrap_or(Normalize::IMAGENET)
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub batch_size: usize,
    pub normalize: Normalize,
    /// ImageNet family: resize the shorter side to `224 / crop_pct`, then centre-crop 224.
    pub crop_pct: f64,
    pub threads: usize,
    pub strict: bool,
    pub device: Device,
    /// Fold BatchNorm into the convolutions (same logits within 1e-4 relative, faster).
    pub fold: bool,
    /// Average the softmax over the paper's ten crops.
    pub ten_crop: bool,
    /// Fully-convolutional multi-scale evaluation: average the softmax over these shorter sides (the paper's
    /// ImageNet protocol: 224, 256, 384, 480, 640); empty for single-scale.
    pub scales: Vec<u32>,
    /// When set, the data and the network's head must both have this dataset's class count.
    pub dataset: Option<EvalDataset>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            batch_size: 250,
            normalize: Normalize::IMAGENET,
            crop_pct: 0.875,
            threads: 0,
            strict: false,
            device: Device::Cpu,
            fold: true,
            ten_crop: false,
            scales: Vec::new(),
            dataset: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    #[serde(flatten)]
    pub accuracy: AccuracyReport,
    pub images_per_second: f64,
    /// Unreadable images skipped (path and reason).
    pub skipped: Vec<String>,
    /// Forward passes run (all scales together).
    pub batches: usize,
    /// Views averaged per image: 1, 10 (ten-crop) or the number of scales.
    pub views: usize,
    /// Whether the network ran with BatchNorm folded into its convolutions.
    pub bn_folded: bool,
}

/// The evaluation preprocessing of a network family: the image (CIFAR) or resize + centre crop (ImageNet);
/// ten-crop: of the 4-pixel zero-padded image (CIFAR) or of the resized one (ImageNet).
pub fn eval_pipeline(family: Family, options: &EvalOptions) -> Result<Pipeline> {
    if !(options.crop_pct > 0.0 && options.crop_pct <= 1.0) {
        bail!("--crop-pct must be in (0, 1], got {}", options.crop_pct);
    }
    let resize = (224.0 / options.crop_pct).floor() as u32;
    let augmentation = match (family, options.ten_crop) {
        (Family::Cifar, false) => Augmentation::None,
        (Family::Cifar, true) => Augmentation::TenCrop {
            resize: 0,
            pad: 4,
            crop: 32,
        },
        (Family::ImageNet, false) => Augmentation::CenterCrop { resize, crop: 224 },
        (Family::ImageNet, true) => Augmentation::TenCrop {
            resize,
            pad: 0,
            crop: 224,
        },
    };
    Ok(Pipeline::new(
        augmentation,
        Normalization::PerChannel(options.normalize),
    ))
}

/// Softmax of `logits` `[N·views, C]`, averaged over each sample's consecutive views: `[N, C]` row-major.
fn mean_probabilities(logits: &candle_core::Tensor, views: usize) -> Result<Vec<f32>> {
    let probs = candle_nn::ops::softmax(logits, D::Minus1)?;
    let (n, c) = probs.dims2()?;
    Ok(probs
        .reshape((n / views, views, c))?
        .mean(1)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// The checks `evaluate` starts with, for a caller that wants them before it prints anything: `--dataset`'s
/// class count against the data and the head, the data against the head, one protocol at a time.
pub fn check_options(model: &Model, split: &Split, options: &EvalOptions) -> Result<()> {
    let classes = model.config().num_classes;
    if let Some(dataset) = options.dataset {
        let want = dataset.classes();
        if split.classes.len() != want {
            bail!(
                "--dataset {} has {want} classes, but the data has {}",
                dataset.name(),
                split.classes.len()
            );
        }
        if classes != want {
            bail!(
                "--dataset {} has {want} classes, but the network's head has {classes} outputs",
                dataset.name()
            );
        }
    }
    if split.classes.len() > classes {
        bail!(
            "the data has {} classes but the network's head has {classes} outputs",
            split.classes.len()
        );
    }
    if options.ten_crop && !options.scales.is_empty() {
        bail!("--ten-crop and --multi-scale are separate protocols: choose one");
    }
    if options.scales.contains(&0) {
        bail!("--multi-scale sizes must be at least 1 pixel");
    }
    eval_pipeline(model.config().family, options)?;
    Ok(())
}

pub fn evaluate(model: &Model, split: Split, options: &EvalOptions) -> Result<EvalReport> {
    check_options(model, &split, options)?;
    let classes = model.config().num_classes;
    let predictor = model.predictor(options.fold)?;
    let labels = split.labels();
    let start = Instant::now();
    // One pass per scale (whole images of different sizes: one image per batch), or one pass.
    let passes: Vec<(Pipeline, usize)> = if options.scales.is_empty() {
        vec![(
            eval_pipeline(model.config().family, options)?,
            options.batch_size,
        )]
    } else {
        let norm = Normalization::PerChannel(options.normalize);
        options
            .scales
            .iter()
            .map(|&size| {
                (
                    Pipeline::new(Augmentation::ResizeShorter { size }, norm.clone()),
                    1,
                )
            })
            .collect()
    };
    let mut sums = vec![0f32; split.len() * classes];
    let mut seen = vec![false; split.len()];
    let mut skipped = Vec::new();
    let (mut batches, mut views) = (0, 0);
    for (pipeline, batch_size) in passes {
        views += pipeline.views();
        let config = LoaderConfig {
            batch_size,
            shuffle: false,
            threads: options.threads,
            strict: options.strict,
            ..Default::default()
        };
        let loader = Loader::new(split.clone(), pipeline, config)?;
        for batch in loader.epoch(0, 0) {
            let batch = batch?;
            if batch.is_empty() {
                continue;
            }
            batches += 1;
            let (images, _) = batch.to_tensors(&options.device)?;
            let probs = mean_probabilities(&predictor.forward(&images)?, batch.views)?;
            for (&i, row) in batch.indices.iter().zip(probs.chunks(classes)) {
                seen[i] = true;
                sums[i * classes..(i + 1) * classes]
                    .iter_mut()
                    .zip(row)
                    .for_each(|(s, p)| *s += p);
            }
        }
        skipped = loader.skipped();
    }
    let mut accuracy = Accuracy::new(classes);
    for (i, &label) in labels.iter().enumerate().filter(|(i, _)| seen[*i]) {
        accuracy.add(&sums[i * classes..(i + 1) * classes], &[label]);
    }
    let accuracy = accuracy.report();
    let seconds = start.elapsed().as_secs_f64();
    Ok(EvalReport {
        images_per_second: accuracy.images as f64 / seconds.max(1e-9),
        accuracy,
        skipped,
        batches,
        views,
        bn_folded: predictor.is_folded(),
    })
}
