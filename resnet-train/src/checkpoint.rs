//! One safetensors file per checkpoint: the model under its published names (so `resnet-infer --weights`
//! and PyTorch read it directly), the momentum buffers under `optimizer.`, and in the metadata the step,
//! epoch, position in the epoch, schedule state, seed and recipe. Written atomically (temp, fsync, rename).

use crate::recipe::Recipe;
use crate::schedule::ScheduleState;
use anyhow::{bail, Context, Result};
use datasets::Normalize;
use resnet_core::optim::Sgd;
use resnet_core::weights::{self, OPTIMIZER_PREFIX};
use resnet_core::Model;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where a run stands: enough to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    pub iteration: u64,
    /// Epoch in progress and the next batch of it: the data order is a function of (seed, epoch).
    pub epoch: u64,
    pub batch_in_epoch: usize,
    pub seed: u64,
    pub schedule: ScheduleState,
    /// Lowest test error so far (percent); `None` before the first evaluation.
    pub best_test_error: Option<f64>,
    pub recipe: Recipe,
}

pub const LAST: &str = "last.safetensors";
pub const BEST: &str = "best.safetensors";

pub fn save(
    path: &Path,
    model: &Model,
    sgd: &Sgd,
    state: &TrainingState,
    normalize: &Normalize,
) -> Result<()> {
    let mut tensors = model.state_dict()?;
    for (name, t) in sgd.state() {
        tensors.insert(format!("{OPTIMIZER_PREFIX}{name}"), t);
    }
    let join = |v: [f32; 3]| v.map(|x| x.to_string()).join(",");
    let metadata = HashMap::from([
        ("model".to_string(), state.recipe.model.clone()),
        ("config".to_string(), serde_json::to_string(model.config())?),
        ("normalize_mean".to_string(), join(normalize.mean)),
        ("normalize_std".to_string(), join(normalize.std)),
        ("training_state".to_string(), serde_json::to_string(state)?),
    ]);
    weights::save_file(&tensors, metadata, path)
        .with_context(|| format!("writing checkpoint {}", path.display()))
}

/// Numbered checkpoints of a run, oldest first.
pub fn numbered(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("ckpt-") && name.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    files
}

pub fn numbered_path(dir: &Path, iteration: u64) -> PathBuf {
    dir.join(format!("ckpt-{iteration:09}.safetensors"))
}

/// Deletes all but the newest `keep` numbered checkpoints.
pub fn prune(dir: &Path, keep: usize) {
    let files = numbered(dir);
    for old in files.iter().take(files.len().saturating_sub(keep)) {
        let _ = std::fs::remove_file(old);
    }
}

pub struct Restored {
    pub path: PathBuf,
    pub state: TrainingState,
    pub tensors: HashMap<String, candle_core::Tensor>,
}

fn read(path: &Path) -> Result<Restored> {
    let metadata = weights::read_metadata(path)?;
    let tensors = weights::read_safetensors(path)?;
    let state = metadata.get("training_state").with_context(|| {
        format!(
            "{} has no training_state metadata: not a resnet-train checkpoint",
            path.display()
        )
    })?;
    let state = serde_json::from_str(state)
        .with_context(|| format!("training_state of {}", path.display()))?;
    Ok(Restored {
        path: path.to_path_buf(),
        state,
        tensors,
    })
}

/// The newest readable checkpoint of a run: `last.safetensors`, else the newest numbered one.
/// A damaged file is reported and skipped.
pub fn restore(dir: &Path) -> Result<Restored> {
    let mut candidates = vec![dir.join(LAST)];
    candidates.extend(numbered(dir).into_iter().rev());
    let mut problems = Vec::new();
    let mut best: Option<Restored> = None;
    for path in candidates.iter().filter(|p| p.is_file()) {
        match read(path) {
            Ok(r) => {
                if best
                    .as_ref()
                    .is_none_or(|b| r.state.iteration > b.state.iteration)
                {
                    best = Some(r);
                }
            }
            Err(e) => {
                eprintln!(
                    "warning: skipping damaged checkpoint {}: {e:#}",
                    path.display()
                );
                problems.push(format!("{}: {e:#}", path.display()));
            }
        }
    }
    match best {
        Some(r) => Ok(r),
        None if problems.is_empty() => bail!(
            "no checkpoint in {} (expected {LAST} or ckpt-*.safetensors)",
            dir.display()
        ),
        None => bail!(
            "no readable checkpoint in {}: {}",
            dir.display(),
            problems.join("; ")
        ),
    }
}

/// Momentum buffers of a checkpoint, with their `optimizer.` prefix removed.
pub fn optimizer_tensors(
    tensors: &HashMap<String, candle_core::Tensor>,
) -> HashMap<String, candle_core::Tensor> {
    tensors
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(OPTIMIZER_PREFIX)
                .map(|k| (k.to_string(), v.clone()))
        })
        .collect()
}
