//! The f32 data of a contiguous CPU tensor, and zeroed output buffers, for the custom ops' CPU kernels.

use crate::ops::parallel::for_each_chunk;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};
use std::mem::MaybeUninit;
use std::sync::Mutex;

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
    // SAFETY: `zero_fill` writes every element.
    unsafe { written_by(len, zero_fill) }
}

/// Zeros into every element of `b`, on all threads.
fn zero_fill(b: &mut [MaybeUninit<f32>]) {
    for_each_chunk(b, 1 << 14, |_, c| {
        c.iter_mut().for_each(|v| _ = v.write(0.0))
    });
}

/// `f(i, chunk)` for the `len`-long chunks of `data`, on all threads or on this one.
pub(crate) fn each_chunk<T: Send>(
    data: &mut [T],
    len: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    if parallel {
        for_each_chunk(data, len, f);
    } else {
        data.chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// The first `len` values of a kept scratch buffer that every use writes before it reads: it grows (zeroed)
/// only past the longest it has been. (`Vec::resize` after a shorter use zeroes the difference again: a
/// `memset` per call where layers of different sizes take turns, ~2 % of a ResNet-20 training step.)
pub(crate) fn kept_prefix(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
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

/// Buffers of [`Scratch`] not in use, for all threads (a per-thread pool kept one set of the largest
/// temporaries on every thread the ops happened to run on).
static SCRATCH_POOL: ScratchPool = ScratchPool::new();

/// Buffers the pool keeps; more are freed (the smallest first).
const SCRATCH_KEPT: usize = 4;

/// A few free buffers, the largest kept.
struct ScratchPool(Mutex<Vec<Vec<f32>>>);

impl ScratchPool {
    const fn new() -> Self {
        Self(Mutex::new(Vec::new()))
    }

    /// The smallest free buffer of at least `len` elements, else the largest (to be grown), else a new one.
    fn take(&self, len: usize) -> Vec<f32> {
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let fits = (0..pool.len())
            .filter(|&i| pool[i].capacity() >= len)
            .min_by_key(|&i| pool[i].capacity());
        let pick = fits.or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].capacity()));
        pick.map(|i| pool.swap_remove(i)).unwrap_or_default()
    }

    fn give(&self, buf: Vec<f32>) {
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        pool.push(buf);
        if pool.len() > SCRATCH_KEPT {
            if let Some(i) = (0..pool.len()).min_by_key(|&i| pool[i].capacity()) {
                pool.swap_remove(i);
            }
        }
    }
}

/// f32s in a 64-byte cache line. Kernel buffers start on a line: a large allocation from malloc starts 16 bytes
/// past a page, so every 64-byte AVX-512 load or store of it would straddle two lines (measured on AMD Zen 4:
/// ResNet-56 b500 inference 1–7 % faster aligned, ResNet-50 b1 level).
pub const LINE_F32: usize = 16;

/// The elements of `buf` from the first cache-line boundary on, `len` of them: `buf` grows to hold them, the
/// ≤ 15 elements before the boundary are zeroed, and `init` writes the rest. Returns where they start.
///
/// # Safety
/// `init` writes every element of the slice it is given.
pub unsafe fn init_aligned(
    buf: &mut Vec<f32>,
    len: usize,
    init: impl FnOnce(&mut [MaybeUninit<f32>]),
) -> usize {
    buf.clear();
    buf.reserve(len + LINE_F32 - 1);
    let start = buf.as_ptr().align_offset(LINE_F32 * 4).min(LINE_F32 - 1);
    let spare = buf.spare_capacity_mut();
    spare[..start].iter_mut().for_each(|v| {
        v.write(0.0);
    });
    init(&mut spare[start..start + len]);
    // SAFETY: the first `start` elements were zeroed, the next `len` written by `init` (the caller's promise).
    unsafe { buf.set_len(start + len) };
    start
}

/// A buffer whose elements start on a cache line (see [`LINE_F32`]): packed weights, which outlive a call.
#[derive(Debug, Clone, Default)]
pub struct LineAligned {
    buf: Vec<f32>,
    start: usize,
}

impl LineAligned {
    pub fn from_slice(values: &[f32]) -> Self {
        Self::from_values(values.len(), values.iter().copied())
    }

    /// The `len` values of `values`, written straight into the aligned buffer (packed weights: no copy of a
    /// packed `Vec`). Panics if `values` yields other than `len`.
    pub fn from_values(len: usize, values: impl IntoIterator<Item = f32>) -> Self {
        let mut buf = Vec::new();
        let mut written = 0;
        // SAFETY: every element is written; the assert stops a short iterator before the length is set.
        let start = unsafe {
            init_aligned(&mut buf, len, |dst| {
                // Internal iteration (`for_each`): nested `flat_map`s run as nested loops.
                values.into_iter().for_each(|v| {
                    dst[written].write(v);
                    written += 1;
                });
                assert_eq!(written, len, "LineAligned: {written} values for {len}");
            })
        };
        Self { buf, start }
    }
}

impl std::ops::Deref for LineAligned {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[self.start..]
    }
}

/// A kernel's temporary buffer (a padded copy of the images, say), taken from a small pool and given back when
/// dropped, its elements starting on a cache line. Temporaries a little larger than the activations, allocated
/// and freed by every call, left holes between the activations a training forward pass keeps (≈ 1.5 MB per
/// residual unit of peak RSS at batch 128).
pub struct Scratch {
    buf: Vec<f32>,
    start: usize,
}

impl Scratch {
    /// `len` elements filled by `init`, without a clearing pass first.
    ///
    /// # Safety
    /// `init` writes every element of the slice it is given.
    pub unsafe fn written_by(len: usize, init: impl FnOnce(&mut [MaybeUninit<f32>])) -> Self {
        // SAFETY: the caller's promise.
        unsafe { Self::from_pool(&SCRATCH_POOL, len, init) }
    }

    /// # Safety
    /// As [`Scratch::written_by`].
    unsafe fn from_pool(
        pool: &ScratchPool,
        len: usize,
        init: impl FnOnce(&mut [MaybeUninit<f32>]),
    ) -> Self {
        let mut buf = pool.take(len + LINE_F32 - 1);
        // SAFETY: the caller's promise.
        let start = unsafe { init_aligned(&mut buf, len, init) };
        Scratch { buf, start }
    }
}

impl Scratch {
    /// `len` zeros (cleared by all threads when large, as [`zeroed`]).
    pub fn zeroed(len: usize) -> Self {
        // SAFETY: `zero_fill` writes every element.
        unsafe { Self::written_by(len, zero_fill) }
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[self.start..]
    }
}

impl std::ops::Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[self.start..]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        SCRATCH_POOL.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(value: f32) -> impl FnOnce(&mut [MaybeUninit<f32>]) {
        move |b| b.iter_mut().for_each(|v| *v = MaybeUninit::new(value))
    }

    #[test]
    fn the_pool_hands_back_the_best_fitting_buffer_and_keeps_the_largest() {
        let pool = ScratchPool::new();
        for cap in [100, 1000, 10, 500] {
            pool.give(Vec::with_capacity(cap));
        }
        assert_eq!(pool.take(300).capacity(), 500, "the smallest that fits");
        assert_eq!(
            pool.take(2000).capacity(),
            1000,
            "none fits: the largest, to be grown"
        );
        // Left: 100, 10. Each give beyond SCRATCH_KEPT buffers frees the smallest: 10, then 20, then 30.
        for cap in [500, 20, 30, 40, 50] {
            pool.give(Vec::with_capacity(cap));
        }
        let caps: Vec<usize> = (0..5).map(|_| pool.take(1).capacity()).collect();
        assert_eq!(caps, [40, 50, 100, 500, 0], "then a new buffer");
    }

    #[test]
    fn scratch_holds_what_was_written() {
        let pool = ScratchPool::new();
        // SAFETY: `fill` writes every element.
        let s = unsafe { Scratch::from_pool(&pool, 600, fill(2.0)) };
        assert!(s.len() == 600 && s.iter().all(|&v| v == 2.0));
        assert_eq!(s.as_ptr() as usize % 64, 0, "on a cache line");
        let w = LineAligned::from_slice(&[1.0, 2.0, 3.0]);
        assert_eq!((&*w, w.as_ptr() as usize % 64), (&[1.0, 2.0, 3.0][..], 0));
    }
}
