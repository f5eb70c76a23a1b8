//! `--weights hub:OWNER/REPO[@REVISION][:FILE]`: files from the Hugging Face hub through hf-hub and its standard
//! cache (HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN); `HF_HUB_OFFLINE=1` uses the cache only.

use anyhow::{bail, Context, Result};
use datasets::hub::{HubRepo, RepoKind};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSource {
    pub repo: HubRepo,
    pub file: String,
}

impl HubSource {
    /// `None` when `spec` does not start with `hub:`.
    pub fn parse(spec: &str) -> Option<Result<HubSource>> {
        let rest = spec.strip_prefix("hub:")?;
        Some(Self::parse_rest(rest).with_context(|| {
            format!("--weights {spec}: expected hub:OWNER/REPO[@REVISION][:FILE]")
        }))
    }

    fn parse_rest(rest: &str) -> Result<HubSource> {
        let (repo, file) = match rest.split_once(':') {
            Some((_, "")) => bail!("empty file name"),
            Some((r, f)) => (r, f.to_string()),
            None => (rest, "model.safetensors".to_string()),
        };
        let repo = HubRepo::parse(RepoKind::Model, repo).map_err(anyhow::Error::msg)?;
        Ok(HubSource { repo, file })
    }

    /// Local path of `file` from this repository (downloaded into the cache if needed).
    pub fn fetch(&self, file: &str) -> Result<PathBuf> {
        Ok(self.repo.fetch(file)?)
    }

    /// `config.json` of the repository, if it has one.
    pub fn config(&self) -> Option<serde_json::Value> {
        let path = self.fetch("config.json").ok()?;
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
    }
}

/// The registered network a hub `config.json` describes (timm's `architecture`, or transformers' `depths` and
/// `layer_type`), with its class count.
pub fn architecture_from_config(config: &serde_json::Value) -> Option<(String, Option<usize>)> {
    if let Some(arch) = config["architecture"].as_str() {
        let classes = config["num_classes"].as_u64().map(|n| n as usize);
        return Some((arch.to_string(), classes));
    }
    if config["model_type"].as_str() == Some("resnet") {
        let depths: Vec<u64> = config["depths"]
            .as_array()?
            .iter()
            .filter_map(|d| d.as_u64())
            .collect();
        let bottleneck = config["layer_type"].as_str() != Some("basic");
        let name = match (bottleneck, depths.as_slice()) {
            (false, [2, 2, 2, 2]) => "resnet18",
            (false, [3, 4, 6, 3]) => "resnet34",
            (true, [3, 4, 6, 3]) => "resnet50",
            (true, [3, 4, 23, 3]) => "resnet101",
            (true, [3, 8, 36, 3]) => "resnet152",
            _ => return None,
        };
        let classes = config["id2label"].as_object().map(|m| m.len());
        return Some((name.to_string(), classes));
    }
    None
}

/// Normalisation from a timm `config.json` (`pretrained_cfg.mean/std`).
pub fn normalize_from_config(config: &serde_json::Value) -> Option<datasets::Normalize> {
    let cfg = &config["pretrained_cfg"];
    let triple = |v: &serde_json::Value| -> Option<[f32; 3]> {
        let a = v.as_array()?;
        Some([
            a.first()?.as_f64()? as f32,
            a.get(1)?.as_f64()? as f32,
            a.get(2)?.as_f64()? as f32,
        ])
    };
    Some(datasets::Normalize {
        mean: triple(&cfg["mean"])?,
        std: triple(&cfg["std"])?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hub_specs() {
        let s = HubSource::parse("hub:timm/resnet50.a1_in1k")
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                s.repo.owner.as_str(),
                s.repo.name.as_str(),
                s.repo.revision,
                s.file.as_str()
            ),
            ("timm", "resnet50.a1_in1k", None, "model.safetensors")
        );
        let s = HubSource::parse("hub:microsoft/resnet-50@refs/pr/1:weights.safetensors")
            .unwrap()
            .unwrap();
        assert_eq!(s.repo.revision.as_deref(), Some("refs/pr/1"));
        assert_eq!(s.file, "weights.safetensors");
        assert!(HubSource::parse("weights.safetensors").is_none());
        for bad in ["hub:", "hub:noslash", "hub:a/b/c", "hub:a/b@", "hub:a/b:"] {
            assert!(HubSource::parse(bad).unwrap().is_err(), "{bad}");
        }
    }

    #[test]
    fn architectures_from_hub_configs() {
        let timm = serde_json::json!({"architecture": "resnetv2_50", "num_classes": 1000,
            "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}});
        assert_eq!(
            architecture_from_config(&timm),
            Some(("resnetv2_50".into(), Some(1000)))
        );
        assert_eq!(normalize_from_config(&timm).unwrap().mean, [0.5; 3]);
        let hf = serde_json::json!({"model_type": "resnet", "depths": [3, 4, 6, 3], "layer_type": "bottleneck",
            "id2label": {"0": "a", "1": "b"}});
        assert_eq!(
            architecture_from_config(&hf),
            Some(("resnet50".into(), Some(2)))
        );
    }
}
