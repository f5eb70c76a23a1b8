//! The tensor names of the published checkpoints. The module tree mirrors them, so a loaded file needs no renaming.
//!
//! | layout        | used for                     | stem            | unit                        | shortcut                    | end               |
//! |---------------|------------------------------|-----------------|-----------------------------|-----------------------------|-------------------|
//! | `Cifar`       | CIFAR family                 | `conv1`, `bn1`  | `layer{s}.{i}.{conv,bn}{k}` | `shortcut.0`, `shortcut.1`  | (`bn`), `linear`  |
//! | `Torchvision` | ImageNet, original units     | `conv1`, `bn1`  | `layer{s}.{i}.{conv,bn}{k}` | `downsample.0/1`            | `fc`              |
//! | `TimmV2`      | ImageNet, pre-activation     | `stem.conv`     | `stages.{s}.blocks.{i}.{conv,norm}{k}` | `downsample.conv` | `norm`, `head.fc` |

use crate::{Family, ResNetConfig, Unit};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightLayout {
    /// `conv1, bn1, layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}, linear` (pytorch_resnet_cifar10; pre-activation as kuangliu).
    Cifar,
    /// torchvision / timm `resnet*`.
    Torchvision,
    /// timm `resnetv2_*`.
    TimmV2,
}

impl WeightLayout {
    pub fn of(config: &ResNetConfig) -> Self {
        match (config.family, config.unit) {
            (Family::Cifar, _) => WeightLayout::Cifar,
            (Family::ImageNet, Unit::PreActivation) => WeightLayout::TimmV2,
            (Family::ImageNet, _) => WeightLayout::Torchvision,
        }
    }

    pub fn stem_conv(self) -> &'static str {
        match self {
            WeightLayout::TimmV2 => "stem.conv",
            _ => "conv1",
        }
    }

    /// The stem's BN (original units only: pre-activation nets normalise inside the first unit).
    pub fn stem_norm(self) -> &'static str {
        "bn1"
    }

    /// Prefix of unit `index` of stage `stage` (both 0-based).
    pub fn unit(self, stage: usize, index: usize) -> String {
        match self {
            WeightLayout::TimmV2 => format!("stages.{stage}.blocks.{index}"),
            _ => format!("layer{}.{index}", stage + 1),
        }
    }

    /// Name of the `k`-th (1-based) convolution of a residual branch.
    pub fn branch_conv(self, k: usize) -> String {
        format!("conv{k}")
    }

    /// Name of the `k`-th (1-based) BN of a residual branch.
    pub fn branch_norm(self, k: usize) -> String {
        match self {
            WeightLayout::TimmV2 => format!("norm{k}"),
            _ => format!("bn{k}"),
        }
    }

    /// Names of the projection shortcut's conv and BN, relative to the unit.
    pub fn shortcut(self) -> (&'static str, &'static str) {
        match self {
            WeightLayout::Cifar => ("shortcut.0", "shortcut.1"),
            WeightLayout::Torchvision => ("downsample.0", "downsample.1"),
            WeightLayout::TimmV2 => ("downsample.conv", "downsample.norm"),
        }
    }

    /// The 1×1 convolution of a gated shortcut (Identity Mappings Fig. 2(c, d)), relative to the unit:
    /// `gate.weight`, `gate.bias`.
    pub fn gate(self) -> &'static str {
        "gate"
    }

    /// The BN after the last unit of a pre-activation net.
    pub fn final_norm(self) -> &'static str {
        match self {
            WeightLayout::Cifar => "bn",
            _ => "norm",
        }
    }

    pub fn head(self) -> &'static str {
        match self {
            WeightLayout::Cifar => "linear",
            WeightLayout::Torchvision => "fc",
            WeightLayout::TimmV2 => "head.fc",
        }
    }

    /// timm stores its classifier as a 1×1 convolution: weight `[classes, features, 1, 1]`.
    pub fn head_is_conv(self) -> bool {
        self == WeightLayout::TimmV2
    }
}
