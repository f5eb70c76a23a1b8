//! The f32 data of a contiguous CPU tensor, and zeroed output buffers, for the custom ops' CPU kernels.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};
use rayon::prelude::*;
use std::cell::RefCell;
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

thread_local! {
    /// Buffers of [`Scratch`] not in use, per thread (a kernel takes its temporaries on the calling thread): a
    /// few, the largest kept.
    static SCRATCH_POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// Buffers the pool keeps; more are freed (the smallest first).
const SCRATCH_KEPT: usize = 4;

/// A kernel's temporary buffer (a padded copy of the images, say), taken from a small pool and given back when
/// dropped. Temporaries a little larger than the activations, allocated and freed by every call, left holes
/// between the activations a training forward pass keeps (≈ 3 MB per residual unit of peak RSS at batch 128).
pub struct Scratch(Vec<f32>);

impl Scratch {
    /// `len` elements filled by `init`, without a clearing pass first.
    ///
    /// # Safety
    /// `init` writes every element of the slice it is given.
    pub unsafe fn written_by(len: usize, init: impl FnOnce(&mut [MaybeUninit<f32>])) -> Self {
        let mut buf = SCRATCH_POOL.with_borrow_mut(|pool| {
            // The smallest buffer that is large enough, else the largest (grown below), else a new one.
            let fits = (0..pool.len())
                .filter(|&i| pool[i].capacity() >= len)
                .min_by_key(|&i| pool[i].capacity());
            let pick = fits.or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].capacity()));
            pick.map(|i| pool.swap_remove(i)).unwrap_or_default()
        });
        buf.clear();
        buf.reserve(len);
        init(&mut buf.spare_capacity_mut()[..len]);
        // SAFETY: the first `len` elements were initialised by `init` (the caller's promise).
        unsafe { buf.set_len(len) };
        Scratch(buf)
    }
}

impl std::ops::Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        // During thread teardown the pool may be gone: the buffer is then simply freed.
        let _ = SCRATCH_POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            pool.push(buf);
            if pool.len() > SCRATCH_KEPT {
                if let Some(i) = (0..pool.len()).min_by_key(|&i| pool[i].capacity()) {
                    pool.swap_remove(i);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(len: usize, value: f32) -> Scratch {
        // SAFETY: every element is written.
        unsafe {
            Scratch::written_by(len, |b| {
                b.iter_mut().for_each(|v| *v = MaybeUninit::new(value))
            })
        }
    }

    #[test]
    fn scratch_buffers_are_reused_and_hold_what_was_written() {
        let first = filled(1000, 1.0);
        let address = first.as_ptr();
        assert!(first.iter().all(|&v| v == 1.0));
        drop(first);
        // Another test may take the buffer in between: look for it among a few takes.
        let again: Vec<Scratch> = (0..SCRATCH_KEPT + 1).map(|_| filled(600, 2.0)).collect();
        assert!(again
            .iter()
            .all(|s| s.len() == 600 && s.iter().all(|&v| v == 2.0)));
        assert!(
            again.iter().any(|s| s.as_ptr() == address),
            "the freed buffer is handed out again"
        );
    }
}
