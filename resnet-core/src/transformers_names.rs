//! Hugging Face transformers' ResNet names (`microsoft/resnet-50`) to the torchvision names the model uses.
//!
//! | transformers                                                   | torchvision                    |
//! |----------------------------------------------------------------|--------------------------------|
//! | `resnet.embedder.embedder.convolution`                         | `conv1`                        |
//! | `resnet.embedder.embedder.normalization`                       | `bn1`                          |
//! | `resnet.encoder.stages.{s}.layers.{i}.layer.{j}.convolution`   | `layer{s+1}.{i}.conv{j+1}`     |
//! | `resnet.encoder.stages.{s}.layers.{i}.layer.{j}.normalization` | `layer{s+1}.{i}.bn{j+1}`       |
//! | `resnet.encoder.stages.{s}.layers.{i}.shortcut.convolution`    | `layer{s+1}.{i}.downsample.0`  |
//! | `resnet.encoder.stages.{s}.layers.{i}.shortcut.normalization`  | `layer{s+1}.{i}.downsample.1`  |
//! | `classifier.1`                                                 | `fc`                           |

use candle_core::Tensor;
use std::collections::HashMap;

/// Whether `names` are in the transformers layout.
pub fn is_transformers_layout<'a>(mut names: impl Iterator<Item = &'a String>) -> bool {
    names.any(|n| n.starts_with("resnet.embedder.") || n.starts_with("resnet.encoder."))
}

/// The torchvision name of one transformers tensor name; `None` for names with no counterpart.
pub fn torchvision_name(name: &str) -> Option<String> {
    let (module, param) = name.rsplit_once('.')?;
    let module = match module {
        "resnet.embedder.embedder.convolution" => "conv1".to_string(),
        "resnet.embedder.embedder.normalization" => "bn1".to_string(),
        "classifier.1" => "fc".to_string(),
        _ => {
            let rest = module.strip_prefix("resnet.encoder.stages.")?;
            let parts: Vec<&str> = rest.split('.').collect();
            let stage: usize = parts.first()?.parse().ok()?;
            if parts.get(1) != Some(&"layers") {
                return None;
            }
            let unit: usize = parts.get(2)?.parse().ok()?;
            let prefix = format!("layer{}.{unit}", stage + 1);
            match parts.get(3..)? {
                ["layer", j, "convolution"] => {
                    format!("{prefix}.conv{}", j.parse::<usize>().ok()? + 1)
                }
                ["layer", j, "normalization"] => {
                    format!("{prefix}.bn{}", j.parse::<usize>().ok()? + 1)
                }
                ["shortcut", "convolution"] => format!("{prefix}.downsample.0"),
                ["shortcut", "normalization"] => format!("{prefix}.downsample.1"),
                _ => return None,
            }
        }
    };
    Some(format!("{module}.{param}"))
}

/// Renames a transformers checkpoint to torchvision names; names without a counterpart are kept as they are
/// (so that loading reports them as unexpected).
pub fn to_torchvision(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    tensors
        .into_iter()
        .map(|(name, t)| (torchvision_name(&name).unwrap_or(name), t))
        .collect()
}

/// The inverse mapping, for writing transformers-layout files (and for tests).
pub fn transformers_name(torchvision: &str) -> Option<String> {
    let (module, param) = torchvision.rsplit_once('.')?;
    let module = match module {
        "conv1" => "resnet.embedder.embedder.convolution".to_string(),
        "bn1" => "resnet.embedder.embedder.normalization".to_string(),
        "fc" => "classifier.1".to_string(),
        _ => {
            let rest = module.strip_prefix("layer")?;
            let parts: Vec<&str> = rest.split('.').collect();
            let stage = parts.first()?.parse::<usize>().ok()?.checked_sub(1)?;
            let unit: usize = parts.get(1)?.parse().ok()?;
            let prefix = format!("resnet.encoder.stages.{stage}.layers.{unit}");
            match parts.get(2..)? {
                ["downsample", "0"] => format!("{prefix}.shortcut.convolution"),
                ["downsample", "1"] => format!("{prefix}.shortcut.normalization"),
                [leaf] => {
                    let (kind, k) = leaf.split_at(leaf.find(|c: char| c.is_ascii_digit())?);
                    let j = k.parse::<usize>().ok()?.checked_sub(1)?;
                    match kind {
                        "conv" => format!("{prefix}.layer.{j}.convolution"),
                        "bn" => format!("{prefix}.layer.{j}.normalization"),
                        _ => return None,
                    }
                }
                _ => return None,
            }
        }
    };
    Some(format!("{module}.{param}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        let pairs = [
            (
                "resnet.embedder.embedder.convolution.weight",
                "conv1.weight",
            ),
            (
                "resnet.embedder.embedder.normalization.running_var",
                "bn1.running_var",
            ),
            (
                "resnet.encoder.stages.0.layers.0.shortcut.convolution.weight",
                "layer1.0.downsample.0.weight",
            ),
            (
                "resnet.encoder.stages.3.layers.2.shortcut.normalization.bias",
                "layer4.2.downsample.1.bias",
            ),
            (
                "resnet.encoder.stages.2.layers.5.layer.2.convolution.weight",
                "layer3.5.conv3.weight",
            ),
            (
                "resnet.encoder.stages.1.layers.1.layer.0.normalization.weight",
                "layer2.1.bn1.weight",
            ),
            ("classifier.1.weight", "fc.weight"),
        ];
        for (hf, tv) in pairs {
            assert_eq!(torchvision_name(hf).as_deref(), Some(tv), "{hf}");
            assert_eq!(transformers_name(tv).as_deref(), Some(hf), "{tv}");
        }
        assert_eq!(torchvision_name("resnet.pooler.weight"), None);
    }
}
