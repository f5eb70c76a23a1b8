//! The f32 data of a contiguous CPU tensor, and zeroed output buffers, for the custom ops' CPU kernels.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};
use rayon::prelude::*;
use std::mem::MaybeUninit;

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

/// `len` zeros, cleared by all threads when large: the ops fill their activation-sized outputs in parallel, and
/// clearing them on the calling thread alone was a serial part of every training step.
pub fn zeroed(len: usize) -> Vec<f32> {
    if len < 1 << 16 {
        return vec![0.0; len];
    }
    let mut out = Vec::with_capacity(len);
    out.par_extend(rayon::iter::repeat_n(0f32, len));
    out
}

/// A `len`-long buffer filled by `init`, without a clearing pass first: for kernels that write every element.
///
/// # Safety
/// `init` writes every element of the slice it is given.
pub unsafe fn written_by(len: usize, init: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    init(&mut out.spare_capacity_mut()[..len]);
    // SAFETY: the first `len` elements were initialised by `init` (the caller's promise).
    unsafe { out.set_len(len) };
    out
}
