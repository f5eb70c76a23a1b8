//! Top-1/top-5 evaluation of a model on a dataset split.

use crate::metrics::{Accuracy, AccuracyReport};
use anyhow::{bail, Result};
use candle_core::{Device, D};
use datasets::{Augmentation, Loader, LoaderConfig, Normalization, Normalize, Pipeline, Split};
use resnet_core::{Family, Model};
use serde::Serialize;
use std::time::Instant;

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
}

/// The evaluation preprocessing of a network family.
pub fn eval_pipeline(family: Family, options: &EvalOptions) -> Result<Pipeline> {
    let augmentation = match family {
        Family::Cifar => Augmentation::None,
        Family::ImageNet => {
            if !(options.crop_pct > 0.0 && options.crop_pct <= 1.0) {
                bail!("--crop-pct must be in (0, 1], got {}", options.crop_pct);
            }
            Augmentation::CenterCrop {
                resize: (224.0 / options.crop_pct).floor() as u32,
                crop: 224,
            }
        }
    };
    Ok(Pipeline::new(
        augmentation,
        Normalization::PerChannel(options.normalize),
    ))
}

pub fn evaluate(model: &Model, split: Split, options: &EvalOptions) -> Result<EvalReport> {
    let classes = model.config().num_classes;
    if split.classes.len() > classes {
        bail!(
            "the data has {} classes but the network's head has {classes} outputs",
            split.classes.len()
        );
    }
    let pipeline = eval_pipeline(model.config().family, options)?;
    let config = LoaderConfig {
        batch_size: options.batch_size,
        shuffle: false,
        threads: options.threads,
        strict: options.strict,
        ..Default::default()
    };
    let loader = Loader::new(split, pipeline, config)?;
    let predictor = model.predictor(options.fold)?;
    let mut accuracy = Accuracy::new(classes);
    let start = Instant::now();
    for batch in loader.epoch(0, 0) {
        let batch = batch?;
        if batch.is_empty() {
            continue;
        }
        let (images, _) = batch.to_tensors(&options.device)?;
        let logits = predictor.forward(&images)?;
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
        accuracy.add(&probs.flatten_all()?.to_vec1::<f32>()?, &batch.labels);
    }
    let accuracy = accuracy.report();
    let seconds = start.elapsed().as_secs_f64();
    Ok(EvalReport {
        images_per_second: accuracy.images as f64 / seconds.max(1e-9),
        accuracy,
        skipped: loader.skipped(),
    })
}
