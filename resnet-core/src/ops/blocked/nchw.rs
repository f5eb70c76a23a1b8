//! The blocked convolution for the training ops (`ops::conv`): on NCHW tensors the padded copy the kernel makes
//! anyway gathers the input's channels into blocks, and the output goes back to NCHW image by image from the
//! thread's cache where the batch is padded image by image, else in one pass after
//! (`BlockedConv::forward_nchw`); on channel-blocked tensors (`ops::channel_blocks`) input and output stay
//! blocked. The weight gradient is in `weight_grad`.
//!
//! With AVX2 the blocked kernel ran ResNet-20's 3×3 stride-1 layers at 163–189 GFLOP/s where the NCHW direct
//! kernel for AVX2 ran at 82–97 (`bench --convs`, AMD EPYC Zen 4, batch 128); with the conversions 1.2–1.4×
//! that kernel, which was removed.

use super::conv::BlockedConv;
use super::layout::Source;
use crate::ops::isa::Isa;
use crate::ops::parallel::for_each_chunk;
use crate::ops::taps::kernel_3x3;
use candle_core::Result;

/// The layout a training convolution writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputLayout {
    /// `[N, C, H', W']`.
    Nchw,
    /// `[N, C/B, H', W', B]` in `isa`'s blocks: training on blocked tensors (`ops::channel_blocks`).
    Blocked,
}

/// `conv(x, w)` of `x` `[N, C_in, H, W]` (NCHW, or already in `isa`'s blocks) and `w` `[C_out, C_in, k, k]`,
/// no bias, in `layout`. Call where [`BlockedConv::applies`]`(isa, c_out)`.
pub fn conv(
    isa: Isa,
    x: Source,
    weight: &[f32],
    (c_out, k): (usize, usize),
    geometry: (usize, usize),
    layout: OutputLayout,
) -> Result<Vec<f32>> {
    let (_, c_in, _, _) = x.dims();
    let dims = (c_out, c_in, k);
    match layout {
        // The NCHW output comes from the direct kernel, whatever the input's layout.
        OutputLayout::Nchw => {
            BlockedConv::from_slice(isa, weight, dims, &vec![0.0; c_out], geometry, false)?
                .forward_nchw(x)
        }
        OutputLayout::Blocked => {
            BlockedConv::for_input(isa, weight, dims, geometry, x)?.forward_values(x)
        }
    }
}

/// The input gradient of a 3×3, stride-1, padding-1 convolution: the convolution of `dy` `[N, C_out, H, W]`
/// (NCHW, or already in `isa`'s blocks) with the kernel flipped and its channel axes swapped, `[N, C_in, H, W]`
/// in `layout`. Call where [`BlockedConv::applies`]`(isa, c_in)`.
pub fn input_grad_3x3(
    isa: Isa,
    dy: Source,
    weight: &[f32],
    c_in: usize,
    layout: OutputLayout,
) -> Result<Vec<f32>> {
    match layout {
        // Winograd's algorithm where it runs transforms `weight` itself: no flipped copy (ResNet-18's 512→512
        // layers: 2.4 M taps written and read again per call).
        OutputLayout::Blocked => {
            BlockedConv::for_input_grad(isa, weight, c_in, dy, || flipped(dy, weight, c_in))?
                .forward_values(dy)
        }
        OutputLayout::Nchw => conv(
            isa,
            dy,
            &flipped(dy, weight, c_in),
            (c_in, 3),
            (1, 1),
            layout,
        ),
    }
}

/// `w'` `[C_in, C_out, 3, 3]`: kernel (o', i') of the gradient's convolution is `kernel_3x3(…, true, (o', i'))`.
/// One output channel o' per task (on one thread, the 512→512 layers' 2.4 M taps took milliseconds per call).
fn flipped(dy: Source, weight: &[f32], c_in: usize) -> Vec<f32> {
    let (_, c_out, _, _) = dy.dims();
    let mut flipped = vec![0f32; c_in * c_out * 9];
    for_each_chunk(&mut flipped, c_out * 9, |o, kernels| {
        for (i, taps) in kernels.chunks_exact_mut(9).enumerate() {
            taps.copy_from_slice(&kernel_3x3(weight, c_in, true, (o, i)));
        }
    });
    flipped
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// An NCHW input padded the three ways `BlockedConv::compute` chooses from, on every kernel set, against
    /// candle's `conv2d`: image by image (weights that stay in L2; weights that leave it with an output plane
    /// of at least `PER_IMAGE_MIN_PIXELS`) and whole (weights that leave it on a smaller plane); on two threads
    /// (five images) and on one, where every batch of two images or more runs image by image.
    #[test]
    fn forward_equals_candle_however_the_input_is_padded() -> Result<()> {
        forward_equals_candle()?;
        let one_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("a thread pool");
        one_thread.install(forward_equals_candle)
    }

    fn forward_equals_candle() -> Result<()> {
        let dev = Device::Cpu;
        // (c_in, c_out, side, stride): 16→16 weights stay; 96→96 weights (324 KB) leave L2, with 14×14 and
        // 7×7 output planes.
        for (c_in, c_out, side, stride) in [(16, 16, 12, 1), (96, 96, 28, 2), (96, 96, 14, 2)] {
            let x = Tensor::randn(0f32, 1.0, (5, c_in, side, side), &dev)?;
            let w = Tensor::randn(0f32, 0.1, (c_out, c_in, 3, 3), &dev)?;
            let expected = x.conv2d(&w, 1, stride, 1, 1)?;
            let pixels = x.flatten_all()?.to_vec1::<f32>()?;
            let weights = w.flatten_all()?.to_vec1::<f32>()?;
            for isa in Isa::available() {
                assert!(BlockedConv::applies(isa, c_out), "{isa}");
                let ours = conv(
                    isa,
                    Source::nchw(&pixels, (5, c_in, side, side)),
                    &weights,
                    (c_out, 3),
                    (stride, 1),
                    OutputLayout::Nchw,
                )?;
                let ours = Tensor::from_vec(ours, expected.shape(), &dev)?;
                let diff = (ours - &expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff < 1e-4,
                    "{isa} {c_in}→{c_out} on {side}×{side}/{stride}: max |diff| {diff}"
                );
            }
        }
        Ok(())
    }
}
