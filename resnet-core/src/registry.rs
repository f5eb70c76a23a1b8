//! One registry of named architectures drives the CLI and the tests (as timm's `create_model`).

use crate::{Block, Family, ResNetConfig, ResNetError, Result, Shortcut, Unit};

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
    "preact_resnet110",
    "preact_resnet164",
    "preact_resnet1001",
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

/// CIFAR stage depths: 6n+2 with basic units, 9n+2 with bottlenecks.
fn cifar_stages(depth: usize, block: Block) -> Option<Vec<usize>> {
    let per_unit = match block {
        Block::Basic => 6,
        Block::Bottleneck => 9,
    };
    let n = depth.checked_sub(2)?;
    (n > 0 && n % per_unit == 0).then(|| vec![n / per_unit; 3])
}

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
    }
}

fn cifar(unit: Unit, residual: bool, block: Block, stage_depths: Vec<usize>) -> ResNetConfig {
    ResNetConfig {
        family: Family::Cifar,
        unit,
        block,
        // The paper's CIFAR nets use option A; pre-activation nets project where the shape changes (its code).
        shortcut: match unit {
            Unit::Original => Shortcut::A,
            Unit::PreActivation => Shortcut::B,
        },
        residual,
        stage_depths,
        base_width: 16,
        num_classes: 10,
        zero_init_residual: false,
    }
}

/// The configuration of a named network with the papers' defaults; change fields for other options.
///
/// - `resnet{18,34,50,101,152,200}`, `plain{18,34}`, `resnetv2_{…}`: ImageNet family, 1000 classes, option B.
/// - `resnet{6n+2}`, `plain{6n+2}`: CIFAR family, basic units, option A, 10 classes.
/// - `preact_resnet{d}`: CIFAR pre-activation; basic units below depth 164 when d = 6n+2 (ResNet-110),
///   bottlenecks otherwise when d = 9n+2 (ResNet-164, -1001), as in Identity Mappings.
pub fn config_for(name: &str) -> Result<ResNetConfig> {
    let unknown = || ResNetError::UnknownModel {
        name: name.to_string(),
        known: REGISTERED.join(", "),
    };
    let depth_of = |prefix: &str| -> Option<usize> { name.strip_prefix(prefix)?.parse().ok() };

    if let Some(depth) = depth_of("resnetv2_") {
        let (block, stages) = imagenet_stages(depth).ok_or_else(unknown)?;
        return Ok(imagenet(Unit::PreActivation, true, block, stages));
    }
    if let Some(depth) = depth_of("preact_resnet") {
        let basic = cifar_stages(depth, Block::Basic).filter(|_| depth < 164);
        let (block, stages) = match basic {
            Some(stages) => (Block::Basic, stages),
            None => (
                Block::Bottleneck,
                cifar_stages(depth, Block::Bottleneck).ok_or_else(unknown)?,
            ),
        };
        return Ok(cifar(Unit::PreActivation, true, block, stages));
    }
    for (prefix, residual) in [("resnet", true), ("plain", false)] {
        if let Some(depth) = depth_of(prefix) {
            // Plain ImageNet nets exist at 18 and 34 only (the paper's Table 2).
            let imagenet_ok = residual || matches!(depth, 18 | 34);
            if let Some((block, stages)) = imagenet_stages(depth).filter(|_| imagenet_ok) {
                return Ok(imagenet(Unit::Original, residual, block, stages));
            }
            let stages = cifar_stages(depth, Block::Basic).ok_or_else(unknown)?;
            return Ok(cifar(Unit::Original, residual, Block::Basic, stages));
        }
    }
    Err(unknown())
}
