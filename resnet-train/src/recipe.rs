//! Training recipes by name. Each is printed in full at start and saved with the run; every value can be
//! overridden by a flag.

use anyhow::{bail, Context};
use resnet_core::optim::SgdConfig;
use serde::{Deserialize, Serialize};

/// How the learning rate changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Schedule {
    /// ×`factor` at each milestone (iterations).
    Step {
        milestones: Vec<u64>,
        factor: f64,
    },
    /// ×`factor` when the test error has not improved by `threshold` points for `patience` evaluations.
    Plateau {
        factor: f64,
        patience: u32,
        threshold: f64,
    },
    /// Cosine decay from the base lr to 0 over the run.
    Cosine,
    Constant,
}

/// A low learning rate at the start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Warmup {
    None,
    /// `lr` until the training error of the last 50 iterations is below `error_below` percent, at most
    /// `max_iterations` (the paper's ResNet-110: 0.01 until training error < 80 %, about 400 iterations).
    UntilTrainError {
        lr: f64,
        error_below: f64,
        max_iterations: u64,
    },
    /// `lr` for the first `iterations`.
    Constant {
        lr: f64,
        iterations: u64,
    },
    /// Linear from 0 to the base lr over `iterations`.
    Linear {
        iterations: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrainTransform {
    /// 4-pixel pad, random 32×32 crop, flip.
    Cifar,
    /// Shorter side in [256, 480], random 224 crop, flip, PCA lighting.
    ScaleAugment,
    /// torchvision's RandomResizedCrop(224) + flip.
    RandomResizedCrop,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub name: String,
    pub model: String,
    pub batch_size: usize,
    pub sgd: SgdConfig,
    pub schedule: Schedule,
    pub warmup: Warmup,
    /// Stop after this many iterations.
    pub iterations: u64,
    /// Hold out this many training images as a validation set (the paper's 45k/5k), 0 for none.
    pub validation_holdout: usize,
    pub augment: TrainTransform,
    pub label_smoothing: f64,
    pub zero_init_residual: bool,
    /// The initial bias of a gated shortcut's gate (Identity Mappings Table 1 tries 0 and −5 … −7); `None`:
    /// the registry's −6.
    #[serde(default)]
    pub gate_bias: Option<f64>,
    /// Evaluate (and log a row) every this many iterations, and at the end.
    pub eval_every: u64,
    /// Log a training row every this many iterations.
    pub log_every: u64,
    /// After training, re-estimate BN statistics as the plain average over this many training batches
    /// (instead of the moving average), as the paper's authors did; 0 keeps the moving average.
    #[serde(default)]
    pub bn_recalibration_batches: usize,
}

pub const NAMES: &[&str] = &["cifar-paper", "preact-cifar", "imagenet-paper", "quick"];

impl Recipe {
    /// A named recipe for `model` (the warm-up of the deep CIFAR nets depends on the depth).
    pub fn named(name: &str, model: &str, depth: usize) -> Option<Recipe> {
        let cifar = |name: &str, warmup: Warmup| Recipe {
            name: name.into(),
            model: model.into(),
            batch_size: 128,
            sgd: SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                weight_decay: 1e-4,
                nesterov: false,
                decay_norm_and_bias: true,
            },
            schedule: Schedule::Step {
                milestones: vec![32_000, 48_000],
                factor: 0.1,
            },
            warmup,
            iterations: 64_000,
            validation_holdout: 5_000,
            augment: TrainTransform::Cifar,
            label_smoothing: 0.0,
            zero_init_residual: false,
            gate_bias: None,
            eval_every: 390,
            log_every: 50,
            bn_recalibration_batches: 0,
        };
        let paper_warmup = Warmup::UntilTrainError {
            lr: 0.01,
            error_below: 80.0,
            max_iterations: 2_000,
        };
        Some(match name {
            "cifar-paper" => cifar(
                name,
                if depth >= 110 {
                    paper_warmup
                } else {
                    Warmup::None
                },
            ),
            "preact-cifar" => cifar(
                name,
                if depth >= 1001 {
                    paper_warmup
                } else {
                    Warmup::None
                },
            ),
            "imagenet-paper" => Recipe {
                batch_size: 256,
                schedule: Schedule::Plateau {
                    factor: 0.1,
                    patience: 5,
                    threshold: 0.1,
                },
                warmup: Warmup::None,
                iterations: 600_000,
                validation_holdout: 0,
                augment: TrainTransform::ScaleAugment,
                eval_every: 5_000,
                log_every: 100,
                ..cifar(name, Warmup::None)
            },
            "quick" => Recipe {
                batch_size: 64,
                schedule: Schedule::Constant,
                iterations: 200,
                validation_holdout: 0,
                eval_every: 100,
                log_every: 20,
                ..cifar(name, Warmup::None)
            },
            _ => return None,
        })
    }
}

impl Recipe {
    /// The network this recipe trains: the registry's configuration of `model` with the recipe's
    /// initialisation options applied (`--zero-init-residual`, `--gate-bias`).
    pub fn model_config(&self) -> anyhow::Result<resnet_core::ResNetConfig> {
        let mut config = resnet_core::config_for(&self.model)?;
        config.zero_init_residual = self.zero_init_residual;
        if let Some(bias) = self.gate_bias {
            if !bias.is_finite() {
                bail!("--gate-bias must be a finite number, got {bias}");
            }
            config.combine = config.combine.with_gate_bias(bias).with_context(|| {
                format!(
                    "--gate-bias: {} has no gated shortcut (use a *_exclusive_gating or *_shortcut_gating net)",
                    self.model
                )
            })?;
        }
        Ok(config)
    }
}
