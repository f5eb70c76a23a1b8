//! Helpers shared by the integration tests: where `../shared` is, and PyTorch-style tolerance checks.
//!
//! Tests that need a fixture fail loudly when it is missing: they never skip.

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// `$RESNET_SHARED`, or `../shared` beside the repository.
pub fn shared_dir() -> PathBuf {
    std::env::var_os("RESNET_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
}

/// A file under `shared/`, which must exist.
pub fn shared(rel: &str) -> PathBuf {
    let path = shared_dir().join(rel);
    assert!(
        path.exists(),
        "required fixture {} is missing (set RESNET_SHARED to the shared/ folder)",
        path.display()
    );
    path
}

/// All tensors of a fixture file, in f32 on the CPU.
pub fn load_fixture(rel: &str) -> Result<HashMap<String, Tensor>> {
    let path = shared(rel);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?;
    tensors
        .into_iter()
        .map(|(k, v)| {
            let v = if v.dtype().is_float() {
                v.to_dtype(DType::F32)?
            } else {
                v
            };
            Ok((k, v))
        })
        .collect()
}

/// Tensors whose names start with `prefix`, with the prefix removed.
pub fn strip_prefix(tensors: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    tensors
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
        .collect()
}

pub fn max_abs(t: &Tensor) -> Result<f32> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    ensure!(
        a.dims() == b.dims(),
        "shapes differ: {:?} vs {:?}",
        a.dims(),
        b.dims()
    );
    max_abs(&(a - b)?)
}

/// ‖a − b‖ / ‖b‖ (Frobenius).
pub fn rel_norm_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    ensure!(
        a.dims() == b.dims(),
        "shapes differ: {:?} vs {:?}",
        a.dims(),
        b.dims()
    );
    let diff = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
    let norm = b.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
    Ok(diff / norm.max(f32::MIN_POSITIVE))
}
