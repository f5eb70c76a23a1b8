//! `--model NAME --weights SRC` to a ready model: the architecture from the name (or the checkpoint's own
//! metadata), the head size from the file, and the normalisation the weights were trained with.

use crate::hub::{architecture_from_config, normalize_from_config, HubSource};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use datasets::Normalize;
use resnet_core::{config_for, transformers_names, weights, Model, ResNetConfig, WeightLayout};
use std::collections::HashMap;
use std::path::PathBuf;

pub struct LoadedModel {
    pub name: String,
    pub model: Model,
    /// From the file's `normalize_mean` / `normalize_std` metadata, when present.
    pub normalize: Option<Normalize>,
    pub path: PathBuf,
    pub metadata: HashMap<String, String>,
}

/// Resolves `weights` (a local file or `hub:OWNER/REPO[@REV][:FILE]`) and builds the network it holds.
/// transformers-layout files are renamed to torchvision names first.
pub fn load_model(model: Option<&str>, weights_src: &str, device: &Device) -> Result<LoadedModel> {
    let (path, hub_config) = match HubSource::parse(weights_src) {
        Some(source) => {
            let source = source?;
            let path = source.fetch(&source.file)?;
            (path, source.config())
        }
        None => (PathBuf::from(weights_src), None),
    };
    if !path.is_file() {
        bail!(
            "weights file {} does not exist (expected a .safetensors file)",
            path.display()
        );
    }
    let metadata = weights::read_metadata(&path)?;
    let mut tensors = weights::read_safetensors(&path)?;
    if transformers_names::is_transformers_layout(tensors.keys()) {
        tensors = transformers_names::to_torchvision(tensors);
    }
    let from_hub = hub_config.as_ref().and_then(architecture_from_config);
    let (name, config) = architecture(model, &metadata, &tensors, from_hub)
        .with_context(|| format!("choosing the network for {}", path.display()))?;
    let net = Model::new(&config, 0, device)?;
    net.load_tensors(&to_device(tensors, device)?, &path)?;
    let normalize = match (
        metadata.get("normalize_mean"),
        metadata.get("normalize_std"),
    ) {
        (Some(m), Some(s)) => Some(
            Normalize::parse(m, s).with_context(|| format!("metadata of {}", path.display()))?,
        ),
        _ => hub_config.as_ref().and_then(normalize_from_config),
    };
    Ok(LoadedModel {
        name,
        model: net,
        normalize,
        path,
        metadata,
    })
}

fn to_device(tensors: HashMap<String, Tensor>, device: &Device) -> Result<HashMap<String, Tensor>> {
    if device.is_cpu() {
        return Ok(tensors);
    }
    tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_device(device)?)))
        .collect()
}

/// The configuration: `--model`, else the checkpoint's `config`/`model` metadata, else the hub's `config.json`;
/// the class count from the head.
fn architecture(
    model: Option<&str>,
    metadata: &HashMap<String, String>,
    tensors: &HashMap<String, Tensor>,
    from_hub: Option<(String, Option<usize>)>,
) -> Result<(String, ResNetConfig)> {
    let from_meta = metadata
        .get("config")
        .map(|c| serde_json::from_str::<ResNetConfig>(c));
    let saved = metadata
        .get("model")
        .cloned()
        .or(from_hub.map(|(name, _)| name));
    let (name, mut config) = match (model, saved.as_ref()) {
        (Some(name), saved) => {
            if let Some(saved) = saved.filter(|s| s.as_str() != name) {
                eprintln!("note: the checkpoint says it is a {saved}; building {name} as asked");
            }
            (name.to_string(), config_for(name)?)
        }
        (None, Some(saved)) => match from_meta {
            Some(Ok(config)) => (saved.clone(), config),
            _ => (saved.clone(), config_for(saved)?),
        },
        (None, None) => bail!("the weights do not say which network they are: pass --model NAME"),
    };
    let head = format!("{}.weight", WeightLayout::of(&config).head());
    if let Some(w) = tensors.get(&head) {
        config.num_classes = w.dim(0)?;
    }
    Ok((name, config))
}
