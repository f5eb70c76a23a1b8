//! A `ResNetConfig` describes one network completely; `ResNet::new` turns it into modules.

use serde::{Deserialize, Serialize};

/// The two families of He et al. (2016): CIFAR (3×3 stem, 3 stages) and ImageNet (7×7/2 stem, max-pool, 4 stages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Cifar,
    ImageNet,
}

/// Where the activation sits in a residual unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unit {
    /// Deep Residual Learning: conv-BN-ReLU-…-conv-BN, add, ReLU.
    Original,
    /// Identity Mappings: BN-ReLU-conv-…-BN-ReLU-conv, add.
    PreActivation,
}

/// The layers of a residual branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Block {
    /// Two 3×3 convolutions.
    Basic,
    /// 1×1 reduce, 3×3 (carrying the stride, as torchvision and timm), 1×1 expand ×4.
    Bottleneck,
}

impl Block {
    pub fn expansion(self) -> usize {
        match self {
            Block::Basic => 1,
            Block::Bottleneck => 4,
        }
    }
}

/// The shortcut options of the paper (Sec. 3.3 and 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Shortcut {
    /// Identity; where the shape changes, subsample by the stride and zero-pad the new channels (parameter-free).
    A,
    /// Identity, with a projection (1×1 conv + BN) only where the shape changes.
    B,
    /// Projection everywhere.
    C,
}

/// Everything that defines a network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    pub family: Family,
    pub unit: Unit,
    pub block: Block,
    pub shortcut: Shortcut,
    /// `false` builds the plain twin: the same layers without any shortcut (the degradation experiments).
    pub residual: bool,
    /// Number of units in each stage.
    pub stage_depths: Vec<usize>,
    /// Width of the first stage (16 on CIFAR, 64 on ImageNet); each later stage doubles it.
    pub base_width: usize,
    pub num_classes: usize,
    /// Start each residual branch at zero: γ of its last BN (or, in pre-activation units, its last conv).
    pub zero_init_residual: bool,
}

impl ResNetConfig {
    /// Channels entering the branch of each stage (before expansion).
    pub fn stage_widths(&self) -> Vec<usize> {
        (0..self.stage_depths.len())
            .map(|s| self.base_width << s)
            .collect()
    }

    /// Channels after the last stage: what the head sees.
    pub fn feature_width(&self) -> usize {
        self.stage_widths()
            .last()
            .copied()
            .unwrap_or(self.base_width)
            * self.block.expansion()
    }

    /// The number of weighted layers, as the papers count depth (convolutions plus the classifier).
    pub fn depth(&self) -> usize {
        let per_unit = match self.block {
            Block::Basic => 2,
            Block::Bottleneck => 3,
        };
        self.stage_depths.iter().sum::<usize>() * per_unit + 2
    }

    pub fn layout(&self) -> crate::WeightLayout {
        crate::WeightLayout::of(self)
    }

    pub fn validate(&self) -> crate::Result<()> {
        let bad = |m: String| Err(crate::ResNetError::InvalidConfig(m));
        if self.stage_depths.is_empty() || self.stage_depths.contains(&0) {
            return bad(format!(
                "every stage needs at least one unit, got {:?}",
                self.stage_depths
            ));
        }
        if self.num_classes == 0 {
            return bad("num_classes must be at least 1".into());
        }
        if self.base_width == 0 {
            return bad("base_width must be at least 1".into());
        }
        let expected_stages = match self.family {
            Family::Cifar => 3,
            Family::ImageNet => 4,
        };
        if self.stage_depths.len() != expected_stages {
            return bad(format!(
                "the {:?} family has {expected_stages} stages, got {}",
                self.family,
                self.stage_depths.len()
            ));
        }
        Ok(())
    }
}
