//! The f32 data of a contiguous CPU tensor, for the custom ops' CPU kernels.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};

/// The elements of `storage` under `layout`; `what` names the operand in errors (e.g. "conv2d input").
pub fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(d) => d.as_slice(),
        other => candle_core::bail!("{what}: expected f32, got {:?}", other.dtype()),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: tensor must be contiguous"),
    }
}
