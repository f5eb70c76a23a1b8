//! One registry of named architectures drives the CLI and the tests (as timm's `create_model`).

use crate::{Block, Combine, Family, ResNetConfig, ResNetError, Result, Shortcut, Unit};

/// Every name the registry lists. Any other CIFAR depth of the right form also parses (see `config_for`).
pub const REGISTERED: &[&str] = &[
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet1202",
    "plain20",
    "plain32",
    "plain44",
    "plain56",
    "plain110",
    "resnet164",
    "preact_resnet110",
    "preact_resnet164",
    "preact_resnet1001",
    // Identity Mappings Table 1 (of the seed): 1-layer skip.
    "resnet110_1layer",
    "preact_resnet110_1layer",
    // Identity Mappings Fig. 2: shortcut variants on ResNet-110.
    "resnet110_scale_shortcut",
    "resnet110_scale_both",
    "resnet110_exclusive_gating",
    "resnet110_shortcut_gating",
    "resnet110_conv_shortcut",
    "resnet110_dropout_shortcut",
    // Identity Mappings Fig. 4: activation placements on ResNet-110 and ResNet-164.
    "resnet110_bn_after_add",
    "resnet110_relu_before_add",
    "resnet110_relu_preact",
    "resnet164_bn_after_add",
    "resnet164_relu_before_add",
    "resnet164_relu_preact",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet200",
    "plain18",
    "plain34",
    "resnetv2_18",
    "resnetv2_34",
    "resnetv2_50",
    "resnetv2_101",
    "resnetv2_152",
    "resnetv2_200",
];

/// ImageNet stage depths (Table 1 of the paper; 200 from Identity Mappings).
fn imagenet_stages(depth: usize) -> Option<(Block, Vec<usize>)> {
    Some(match depth {
        18 => (Block::Basic, vec![2, 2, 2, 2]),
        34 => (Block::Basic, vec![3, 4, 6, 3]),
        50 => (Block::Bottleneck, vec![3, 4, 6, 3]),
        101 => (Block::Bottleneck, vec![3, 4, 23, 3]),
        152 => (Block::Bottleneck, vec![3, 8, 36, 3]),
        200 => (Block::Bottleneck, vec![3, 24, 36, 3]),
        _ => return None,
    })
}

/// CIFAR stage depths: 3n+2 with single-conv units, 6n+2 with basic units, 9n+2 with bottlenecks.
fn cifar_stages(depth: usize, block: Block) -> Option<Vec<usize>> {
    let per_unit = 3 * block.layers();
    let n = depth.checked_sub(2)?;
    (n > 0 && n % per_unit == 0).then(|| vec![n / per_unit; 3])
}

/// The CIFAR branch of Identity Mappings for a depth: bottlenecks from 164 layers on where the depth is 9n+2
/// (ResNet-164, -1001), basic units where it is 6n+2 (ResNet-110, -1202), else bottlenecks (ResNet-29).
fn cifar_block(depth: usize) -> Option<(Block, Vec<usize>)> {
    let bottleneck = cifar_stages(depth, Block::Bottleneck).map(|s| (Block::Bottleneck, s));
    let basic = cifar_stages(depth, Block::Basic).map(|s| (Block::Basic, s));
    match depth >= 164 {
        true => bottleneck.or(basic),
        false => basic.or(bottleneck),
    }
}

/// A change a name suffix makes to a two-conv or bottleneck base net (Identity Mappings' variants; the 1-layer
/// skip, `_1layer`, has a depth of its own and is parsed by `single_conv`).
#[derive(Clone, Copy)]
enum Variant {
    Placement(Unit),
    Combine(Combine),
    ConvShortcut,
}

/// Suffixes of CIFAR names: `resnet110_bn_after_add`, `resnet56_exclusive_gating`.
const SUFFIXES: &[(&str, Variant)] = &[
    ("_bn_after_add", Variant::Placement(Unit::BnAfterAddition)),
    (
        "_relu_before_add",
        Variant::Placement(Unit::ReluBeforeAddition),
    ),
    (
        "_relu_preact",
        Variant::Placement(Unit::ReluOnlyPreActivation),
    ),
    (
        "_scale_shortcut",
        Variant::Combine(Combine::ConstantScaling {
            shortcut: 0.5,
            branch: 1.0,
        }),
    ),
    (
        "_scale_both",
        Variant::Combine(Combine::ConstantScaling {
            shortcut: 0.5,
            branch: 0.5,
        }),
    ),
    (
        "_exclusive_gating",
        Variant::Combine(Combine::ExclusiveGating {
            gate_bias: Combine::PAPER_GATE_BIAS,
        }),
    ),
    (
        "_shortcut_gating",
        Variant::Combine(Combine::ShortcutOnlyGating {
            gate_bias: Combine::PAPER_GATE_BIAS,
        }),
    ),
    ("_conv_shortcut", Variant::ConvShortcut),
    (
        "_dropout_shortcut",
        Variant::Combine(Combine::DropoutShortcut { rate: 0.5 }),
    ),
];

fn imagenet(unit: Unit, residual: bool, block: Block, stage_depths: Vec<usize>) -> ResNetConfig {
    ResNetConfig {
        family: Family::ImageNet,
        unit,
        block,
        shortcut: Shortcut::B,
        residual,
        stage_depths,
        base_width: 64,
        num_classes: 1000,
        zero_init_residual: false,
        combine: Combine::Sum,
    }
}

fn cifar(unit: Unit, residual: bool, block: Block, stage_depths: Vec<usize>) -> ResNetConfig {
    ResNetConfig {
        family: Family::Cifar,
        unit,
        block,
        // The paper's CIFAR nets use option A; Identity Mappings' pre-activation and bottleneck nets project where
        // the shape changes (its code), as zero-padding 16 to 64 channels would leave 3/4 of a shortcut empty.
        shortcut: match (unit, block) {
            (Unit::PreActivation, _) | (_, Block::Bottleneck) => Shortcut::B,
            _ => Shortcut::A,
        },
        residual,
        stage_depths,
        base_width: 16,
        num_classes: 10,
        zero_init_residual: false,
        combine: Combine::Sum,
    }
}

/// The configuration of a named network with the papers' defaults; change fields for other options.
///
/// - `resnet{18,34,50,101,152,200}`, `plain{18,34}`, `resnetv2_{…}`: ImageNet family, 1000 classes, option B.
/// - `resnet{d}`, `plain{d}`: CIFAR family, option A, 10 classes; basic units for d = 6n+2 (ResNet-20 … -1202),
///   bottlenecks for d = 9n+2 from 164 layers on or where d is not 6n+2 (ResNet-164, -1001), as in Identity
///   Mappings.
/// - `preact_resnet{d}`: the same depths with full pre-activation units and option B.
/// - CIFAR names take one suffix of Identity Mappings' variants: `_1layer` (one 3×3 conv per
///   unit, depth 3n+2), `_bn_after_add`, `_relu_before_add`, `_relu_preact` (Fig. 4), `_scale_shortcut`
///   (λ = 0.5 on the shortcut), `_scale_both` (0.5 on both), `_exclusive_gating`, `_shortcut_gating` (gate
///   bias −6), `_conv_shortcut` (option C), `_dropout_shortcut` (rate 0.5) (Fig. 2).
pub fn config_for(name: &str) -> Result<ResNetConfig> {
    let unknown = || ResNetError::UnknownModel {
        name: name.to_string(),
        known: REGISTERED.join(", "),
    };
    if let Some(base) = name.strip_suffix("_1layer") {
        return single_conv(base).ok_or_else(unknown);
    }
    if let Some((base, variant)) = SUFFIXES
        .iter()
        .find_map(|&(suffix, v)| name.strip_suffix(suffix).map(|base| (base, v)))
    {
        return cifar_variant(base, variant).ok_or_else(unknown);
    }
    base_config(name).ok_or_else(unknown)
}

/// `base` (a CIFAR residual net) changed by `variant`.
fn cifar_variant(base: &str, variant: Variant) -> Option<ResNetConfig> {
    let mut config = base_config(base).filter(|c| c.family == Family::Cifar && c.residual)?;
    match variant {
        // The placements are variants of the original unit.
        Variant::Placement(unit) if config.unit == Unit::Original => config.unit = unit,
        Variant::Placement(_) => return None,
        Variant::Combine(combine) => config.combine = combine,
        Variant::ConvShortcut => config.shortcut = Shortcut::C,
    }
    Some(config)
}

/// `[preact_]resnet{3n+2}` with one 3×3 conv per unit, whether or not a two-conv net of that depth exists.
fn single_conv(base: &str) -> Option<ResNetConfig> {
    let (unit, rest) = match base.strip_prefix("preact_") {
        Some(rest) => (Unit::PreActivation, rest),
        None => (Unit::Original, base),
    };
    let depth: usize = rest.strip_prefix("resnet")?.parse().ok()?;
    let stages = cifar_stages(depth, Block::Single)?;
    Some(cifar(unit, true, Block::Single, stages))
}

fn base_config(name: &str) -> Option<ResNetConfig> {
    let depth_of = |prefix: &str| -> Option<usize> { name.strip_prefix(prefix)?.parse().ok() };

    if let Some(depth) = depth_of("resnetv2_") {
        let (block, stages) = imagenet_stages(depth)?;
        return Some(imagenet(Unit::PreActivation, true, block, stages));
    }
    if let Some(depth) = depth_of("preact_resnet") {
        let (block, stages) = cifar_block(depth)?;
        return Some(cifar(Unit::PreActivation, true, block, stages));
    }
    for (prefix, residual) in [("resnet", true), ("plain", false)] {
        if let Some(depth) = depth_of(prefix) {
            // Plain ImageNet nets exist at 18 and 34 only (the paper's Table 2).
            let imagenet_ok = residual || matches!(depth, 18 | 34);
            if let Some((block, stages)) = imagenet_stages(depth).filter(|_| imagenet_ok) {
                return Some(imagenet(Unit::Original, residual, block, stages));
            }
            let (block, stages) = cifar_block(depth)?;
            return Some(cifar(Unit::Original, residual, block, stages));
        }
    }
    None
}
