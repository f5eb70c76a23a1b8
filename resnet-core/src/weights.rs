//! Reading weights into a model: every tensor checked by name and shape, float16/bfloat16/float32/float64
//! converted to float32, and every mismatch reported as a typed error naming the file and tensor.

use crate::param_store::ParamStore;
use crate::{ResNetError, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Prefix of the optimizer state inside the project's training checkpoints.
pub const OPTIMIZER_PREFIX: &str = "optimizer.";

/// Names that checkpoints carry but the model does not need: PyTorch's BN counter, our optimizer state.
fn ignorable(name: &str) -> bool {
    name.ends_with("num_batches_tracked") || name.starts_with(OPTIMIZER_PREFIX)
}

/// Reads every tensor of a safetensors file, validating the container first so truncation is reported as such.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|source| ResNetError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let not_safetensors = |reason: String| ResNetError::NotSafetensors {
        path: path.to_path_buf(),
        reason,
    };
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| not_safetensors(e.to_string()))?;
    let mut tensors = HashMap::new();
    for (name, view) in file.tensors() {
        let tensor = candle_core::safetensors::Load::load(&view, &Device::Cpu).map_err(|_| {
            ResNetError::UnsupportedDtype {
                path: path.to_path_buf(),
                name: name.clone(),
                dtype: format!("{:?}", view.dtype()),
            }
        })?;
        tensors.insert(name, tensor);
    }
    Ok(tensors)
}

/// The `__metadata__` strings of a safetensors file (e.g. `normalize_mean`), empty when it has none.
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    use std::io::Read;
    let io = |source| ResNetError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io)?;
    let mut header = vec![0u8; u64::from_le_bytes(len).min(100_000_000) as usize];
    file.read_exact(&mut header).map_err(io)?;
    let bad = |reason: String| ResNetError::NotSafetensors {
        path: path.to_path_buf(),
        reason,
    };
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let meta = json.get("__metadata__").and_then(|m| m.as_object());
    Ok(meta
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect())
}

pub fn load_file(params: &ParamStore, path: &Path) -> Result<()> {
    load_tensors(params, &read_safetensors(path)?, path)
}

/// Copies `tensors` into `params`. All checks run before anything is written, so a bad file leaves the model as it was.
pub fn load_tensors(
    params: &ParamStore,
    tensors: &HashMap<String, Tensor>,
    source: &Path,
) -> Result<()> {
    let vars = params.named_vars();
    let path = || source.to_path_buf();
    let missing: Vec<String> = vars
        .iter()
        .filter(|(n, _)| !tensors.contains_key(n))
        .map(|(n, _)| n.clone())
        .collect();
    if !missing.is_empty() {
        return Err(ResNetError::MissingTensors {
            path: path(),
            missing,
        });
    }
    let known: std::collections::HashSet<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    let mut unexpected: Vec<String> = tensors
        .keys()
        .filter(|n| !known.contains(n.as_str()) && !ignorable(n))
        .cloned()
        .collect();
    if !unexpected.is_empty() {
        unexpected.sort();
        return Err(ResNetError::UnexpectedTensors {
            path: path(),
            unexpected,
        });
    }
    let mut converted = Vec::with_capacity(vars.len());
    for (name, var) in &vars {
        let t = &tensors[name];
        if t.dims() != var.dims() {
            return Err(ResNetError::ShapeMismatch {
                path: path(),
                name: name.clone(),
                expected: var.dims().to_vec(),
                found: t.dims().to_vec(),
            });
        }
        if !t.dtype().is_float() {
            return Err(ResNetError::UnsupportedDtype {
                path: path(),
                name: name.clone(),
                dtype: format!("{:?}", t.dtype()),
            });
        }
        converted.push(t.to_dtype(DType::F32)?.to_device(var.device())?);
    }
    for ((_, var), value) in vars.iter().zip(converted) {
        var.set(&value)?;
    }
    Ok(())
}

/// Writes `tensors` (+ string metadata) as one safetensors file, atomically: a temporary file beside the target,
/// fsync, rename, fsync of the folder. A crash at any instant leaves either the old file or the new one.
pub fn save_file(
    tensors: &HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<()> {
    use std::io::Write;
    let io = |source| ResNetError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut sorted: Vec<(&String, Tensor)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        sorted.push((name, t.to_device(&Device::Cpu)?.contiguous()?));
    }
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let meta = (!metadata.is_empty()).then_some(metadata);
    let bytes = safetensors::serialize(sorted.iter().map(|(n, t)| (n.as_str(), t)), meta)
        .map_err(|e| ResNetError::Candle(candle_core::Error::wrap(e)))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("weights");
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself must reach the disk too.
        std::fs::File::open(&dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io)
}
