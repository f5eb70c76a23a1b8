//! The ablations of Identity Mappings (He et al., 2016) as registry names on a base CIFAR depth, with the CIFAR-10
//! test errors the paper reports: shortcut variants (its Fig. 2 / Table 1), activation placements (Fig. 4 /
//! Table 2) and the 1-layer skip (Table 3, original → pre-activation).

use Reported::{Error, Fail, NotReported};

/// What the paper reports for a variant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reported {
    /// Test error, %.
    Error(f64),
    /// "fail": the paper's word for a net that trains to a test error above 20 %.
    Fail,
    /// Not in the paper at this depth.
    NotReported,
}

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reported::Error(e) => write!(f, "{e:.2}"),
            Reported::Fail => write!(f, "fail"),
            Reported::NotReported => write!(f, "–"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Ablation {
    /// `original`, `preact`, `preact_1layer`, or the name suffix without its `_` (`scale_both`).
    pub key: &'static str,
    pub figure: &'static str,
    pub description: &'static str,
    /// CIFAR-10 test error on ResNet-110 and on ResNet-164.
    pub resnet110: Reported,
    pub resnet164: Reported,
}

/// Every variant, in the paper's order. Gated joins are the registry's, with the gate bias b_g = −6 (the paper
/// also reports b_g = 0: exclusive gating fails, shortcut-only gating 12.86).
pub const ABLATIONS: &[Ablation] = &[
    Ablation {
        key: "original",
        figure: "Fig. 2(a), 4(a)",
        description: "h + F, ReLU after the addition",
        resnet110: Error(6.61),
        resnet164: Error(5.93),
    },
    Ablation {
        key: "scale_shortcut",
        figure: "Fig. 2(b)",
        description: "0.5·h + F",
        resnet110: Fail,
        resnet164: NotReported,
    },
    Ablation {
        key: "scale_both",
        figure: "Fig. 2(b)",
        description: "0.5·h + 0.5·F",
        resnet110: Error(12.35),
        resnet164: NotReported,
    },
    Ablation {
        key: "exclusive_gating",
        figure: "Fig. 2(c)",
        description: "(1 − g)·h + g·F, g = σ(1×1 conv + b_g), b_g = −6",
        resnet110: Error(8.70),
        resnet164: NotReported,
    },
    Ablation {
        key: "shortcut_gating",
        figure: "Fig. 2(d)",
        description: "(1 − g)·h + F, b_g = −6",
        resnet110: Error(6.91),
        resnet164: NotReported,
    },
    Ablation {
        key: "conv_shortcut",
        figure: "Fig. 2(e)",
        description: "1×1 conv shortcut in every unit (option C)",
        resnet110: Error(12.22),
        resnet164: NotReported,
    },
    Ablation {
        key: "dropout_shortcut",
        figure: "Fig. 2(f)",
        description: "dropout(h, 0.5) + F",
        resnet110: Fail,
        resnet164: NotReported,
    },
    Ablation {
        key: "bn_after_add",
        figure: "Fig. 4(b)",
        description: "BN (and ReLU) after the addition",
        resnet110: Error(8.17),
        resnet164: Error(6.50),
    },
    Ablation {
        key: "relu_before_add",
        figure: "Fig. 4(c)",
        description: "ReLU before the addition",
        resnet110: Error(7.84),
        resnet164: Error(6.14),
    },
    Ablation {
        key: "relu_preact",
        figure: "Fig. 4(d)",
        description: "ReLU-only pre-activation",
        resnet110: Error(6.71),
        resnet164: Error(5.91),
    },
    Ablation {
        key: "preact",
        figure: "Fig. 4(e)",
        description: "full pre-activation",
        resnet110: Error(6.37),
        resnet164: Error(5.46),
    },
    Ablation {
        key: "1layer",
        figure: "Table 3",
        description: "one 3×3 conv per unit, original",
        resnet110: Error(9.90),
        resnet164: NotReported,
    },
    Ablation {
        key: "preact_1layer",
        figure: "Table 3",
        description: "one 3×3 conv per unit, full pre-activation",
        resnet110: Error(8.91),
        resnet164: NotReported,
    },
];

impl Ablation {
    pub fn by_key(key: &str) -> Option<&'static Ablation> {
        ABLATIONS.iter().find(|a| a.key == key)
    }

    /// The registry name of this variant on the CIFAR net of `depth` layers.
    pub fn model_name(&self, depth: usize) -> String {
        match self.key {
            "original" => format!("resnet{depth}"),
            "preact" => format!("preact_resnet{depth}"),
            "preact_1layer" => format!("preact_resnet{depth}_1layer"),
            key => format!("resnet{depth}_{key}"),
        }
    }

    /// What the paper reports at `depth` (ResNet-110 and ResNet-164 only).
    pub fn reported(&self, depth: usize) -> Reported {
        match depth {
            110 => self.resnet110,
            164 => self.resnet164,
            _ => NotReported,
        }
    }
}
