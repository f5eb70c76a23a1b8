//! A `ResNetConfig` describes one network completely; `ResNet::new` turns it into modules.

use serde::{Deserialize, Serialize};

/// The two families of He et al. (2016): CIFAR (3×3 stem, 3 stages) and ImageNet (7×7/2 stem, max-pool, 4 stages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Cifar,
    ImageNet,
}

/// Where the activations sit in a residual unit: the five placements of Identity Mappings Fig. 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unit {
    /// Fig. 4(a), Deep Residual Learning: conv-BN-ReLU-…-conv-BN, add, ReLU.
    Original,
    /// Fig. 4(b): conv-BN-ReLU-…-conv, add, BN, ReLU (the last BN moves after the addition).
    BnAfterAddition,
    /// Fig. 4(c): conv-BN-ReLU-…-conv-BN-ReLU, add (the ReLU moves into the branch).
    ReluBeforeAddition,
    /// Fig. 4(d): ReLU-conv-BN-…-ReLU-conv-BN, add. The stem is conv-BN, and a ReLU follows the last unit.
    ReluOnlyPreActivation,
    /// Fig. 4(e), full pre-activation: BN-ReLU-conv-…-BN-ReLU-conv, add. The stem is a conv alone, and
    /// BN-ReLU follows the last unit.
    PreActivation,
}

impl Unit {
    /// BN normalises each convolution's input (pre-activation) rather than its output.
    pub fn normalizes_input(self) -> bool {
        self == Unit::PreActivation
    }

    /// The stem's BN is followed by a ReLU (the units start with a convolution).
    pub fn stem_relu(self) -> bool {
        !matches!(self, Unit::ReluOnlyPreActivation | Unit::PreActivation)
    }
}

/// The layers of a residual branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Block {
    /// One 3×3 convolution: the "1-layer skip" of Identity Mappings Table 1.
    Single,
    /// Two 3×3 convolutions.
    Basic,
    /// 1×1 reduce, 3×3 (carrying the stride, as torchvision and timm), 1×1 expand ×4.
    Bottleneck,
}

impl Block {
    pub fn expansion(self) -> usize {
        match self {
            Block::Single | Block::Basic => 1,
            Block::Bottleneck => 4,
        }
    }

    /// Convolutions per unit, as the papers count depth.
    pub fn layers(self) -> usize {
        match self {
            Block::Single => 1,
            Block::Basic => 2,
            Block::Bottleneck => 3,
        }
    }
}

/// How a unit joins its shortcut h(x) and its branch F(x): the shortcut variants of Identity Mappings Fig. 2
/// (1×1 convolution shortcuts, Fig. 2(e), are [`Shortcut::C`]). Where the shape changes, h is the option A or B
/// path, and the variant applies to it as to an identity.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Combine {
    /// h(x) + F(x), Fig. 2(a).
    #[default]
    Sum,
    /// λ_h·h(x) + λ_F·F(x), Fig. 2(b): constant scaling, no parameters.
    ConstantScaling { shortcut: f64, branch: f64 },
    /// (1 − g(x))·h(x) + g(x)·F(x), Fig. 2(c), with the gate g(x) = σ(W_g x + b_g) a 1×1 convolution (stride
    /// and width of the unit's output) whose bias starts at `gate_bias`.
    ExclusiveGating { gate_bias: f64 },
    /// (1 − g(x))·h(x) + F(x), Fig. 2(d): the gate on the shortcut only.
    ShortcutOnlyGating { gate_bias: f64 },
    /// dropout(h(x)) + F(x), Fig. 2(f): in training each shortcut value is dropped with probability `rate`
    /// and the rest scaled by 1/(1 − rate), as `torch.nn.Dropout`; evaluation adds h(x) unchanged.
    DropoutShortcut { rate: f64 },
}

impl Combine {
    /// The paper's best gate bias initialisation (Identity Mappings Table 1: b_g = −6).
    pub const PAPER_GATE_BIAS: f64 = -6.0;

    /// The same gated join with the gate's bias starting at `gate_bias`; `None` for a join without a gate.
    pub fn with_gate_bias(self, gate_bias: f64) -> Option<Combine> {
        match self {
            Combine::ExclusiveGating { .. } => Some(Combine::ExclusiveGating { gate_bias }),
            Combine::ShortcutOnlyGating { .. } => Some(Combine::ShortcutOnlyGating { gate_bias }),
            _ => None,
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
    /// How each unit joins its shortcut and its branch (Identity Mappings Fig. 2).
    #[serde(default)]
    pub combine: Combine,
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
        self.stage_depths.iter().sum::<usize>() * self.block.layers() + 2
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
        if !self.residual && self.combine != Combine::Sum {
            return bad(format!(
                "a plain net has no shortcut to combine, got {:?}",
                self.combine
            ));
        }
        let finite = |v: f64| v.is_finite();
        match self.combine {
            Combine::ConstantScaling { shortcut, branch }
                if !(finite(shortcut) && finite(branch)) =>
            {
                return bad(format!(
                    "constant scaling needs finite factors, got {shortcut} and {branch}"
                ))
            }
            Combine::DropoutShortcut { rate } if !(0.0..1.0).contains(&rate) => {
                return bad(format!(
                    "the shortcut dropout rate must be in [0, 1), got {rate}"
                ))
            }
            Combine::ExclusiveGating { gate_bias } | Combine::ShortcutOnlyGating { gate_bias }
                if !finite(gate_bias) =>
            {
                return bad(format!("the gate bias must be finite, got {gate_bias}"))
            }
            _ => {}
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
