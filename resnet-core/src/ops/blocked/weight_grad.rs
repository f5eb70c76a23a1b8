//! The weight gradient of a k×k convolution with padding k/2 (the 3×3 layers, either stride, the 7×7 stride-2
//! stem of the ImageNet nets, and their 1×1 layers where they train on blocked tensors), for the training op
//! (`ops::conv`), whose tensors are NCHW or blocked:
//!
//!   dW[o, c, ky, kx] = Σ_n Σ_{oy, ox} dY[n, o, oy, ox] · X_pad[n, c, oy·s + ky, ox·s + kx]
//!
//! The output gradient is copied once into the blocked layout `[N, C_out/B, H', W', B]` (or read in place where
//! it is already blocked), so that `B` output channels of a pixel are one vector; the input is read in place,
//! NCHW or blocked (training on blocked tensors, `ops::channel_blocks`), broadcast one value at a time (with a
//! zero-bordered copy of it instead, ResNet-20's weight gradients took 68–87 ms per batch of 128 against
//! 59–72, 3 alternated rounds, AMD EPYC Zen 4). A register tile is `F` output blocks × `CI` input channels ×
//! the k kernel columns of one kernel row; for 3×3, 2 × 2 × 3 or 1 × 4 × 3 = 12 accumulators: per output pixel `F`
//! vector loads and `12/F` broadcasts feed 12 FMAs, and with the `F` vectors and a broadcast the tile takes 15
//! of AVX2's 16 registers (smaller tiles where the input channels are not in pairs or fours, as at a 3-channel
//! stem). (The transposed tile, input channels in the vector and 4 output channels × 3 columns, needs all 16
//! and one more for the next broadcast: LLVM kept an accumulator on the stack, and it ran at 29–33 % of the
//! FMA peak.) im2col + GEMM ran these layers at 22–37 % (`bench --convs`, AMD EPYC Zen 2). The 7×7 stem
//! (3 input channels) takes 2 × 1 × 7 = 14 accumulators with AVX-512's 32 registers, 1 × 1 × 7 with fewer:
//! ResNet-18's stem at batch 16, im2col + GEMM 113–119 GFLOP/s (32–33 ms), this kernel 162–163 (23 ms; two
//! alternated rounds, AMD EPYC Zen 4).
//!
//! Images are summed in fixed groups, each group's partial sums added in group order: the same result for
//! any thread count.

use super::conv::lanes;
use super::layout::{Padded, Source};
use crate::ops::cpu_slice::written_by;
use crate::ops::isa::Isa;
use crate::ops::parallel::{for_each_chunk, for_each_chunk_in_runs};
use crate::ops::simd::{Portable, Simd};
use candle_core::Result;
use std::mem::MaybeUninit;

/// Multiply-adds ×2 that one thread takes at least at a time.
const MIN_TASK_FLOPS: usize = 2_000_000;

/// Kernel sizes with a kernel here for any training convolution, each with padding k/2: 3×3 and the 7×7 stem
/// (and 1×1, see [`pointwise_weight_grad_applies`]).
pub const KERNELS: [usize; 2] = [3, 7];

/// Values per task when the groups' partial sums are added: 16 KB of sums stay in L1 while each group's are added.
const SUM_CHUNK: usize = 4096;

/// Whether [`weight_grad`] computes the weight gradient of a `kernel`×`kernel` convolution with padding
/// `padding` from `c_in` to `c_out` channels on `isa`: a size of [`KERNELS`] padded by half of it, output
/// channels in whole blocks.
pub fn weight_grad_applies(
    isa: Isa,
    (kernel, padding): (usize, usize),
    c_in: usize,
    c_out: usize,
) -> bool {
    KERNELS.contains(&kernel)
        && padding == kernel / 2
        && c_in > 0
        && c_out.is_multiple_of(lanes(isa))
}

/// Whether [`weight_grad`] computes the weight gradient of a 1×1 convolution (no padding, any stride) from
/// `c_in` to `c_out` channels on `isa`: output channels in whole blocks. Training on blocked tensors sends its
/// projections here (`ops::conv`); an NCHW one's GEMM reads its operands in place. ResNet-18's projections at
/// batch 16 against GEMM on NCHW copies of both operands, GFLOP/s: see [`TILES_1X1`].
fn pointwise_weight_grad_applies(isa: Isa, c_in: usize, c_out: usize) -> bool {
    c_in > 0 && c_out.is_multiple_of(lanes(isa))
}

/// The register tiles of 1×1, `(F, CI)`: `F` output blocks × `CI` input channels of one input block, best
/// first; with AVX2's 16 registers 8 accumulators at most. ResNet-18's projections at batch 16 (`bench --train
/// --convs`, Intel Xeon, 2 FMA units, 2 alternated runs), GFLOP/s, GEMM on NCHW copies / these tiles with one
/// task per channel group / one task per tile, all channel groups image by image (`weight_grad`): 64→128 on
/// 56×56 88–90 / 115–119 / 138–140, 128→256 on 28×28 121–135 / 156–158 / 165–168, 256→512 on 14×14 148–151 /
/// 179–182 / 159–170. With AVX2 ((2, 4)), GEMM / one task per tile (one alternated pair of runs): 64→128 64 / 69–72,
/// 128→256 84 / 83–86, 256→512 101 / 96.
const TILES_1X1: [(usize, usize); 5] = [(2, 8), (2, 4), (1, 8), (1, 4), (1, 1)];

/// The register tiles of 3×3, `(F, CI)`: `F` output blocks × `CI` input channels × 3 kernel columns, best
/// first (12 accumulators; fewer where the channels do not divide, as at a 3-channel stem).
const TILES: [(usize, usize); 6] = [(2, 2), (1, 4), (1, 3), (2, 1), (1, 2), (1, 1)];

/// The register tiles of 7×7: 14 accumulators where AVX-512 has the registers, else 7.
const TILES_7X7: [(usize, usize); 2] = [(2, 1), (1, 1)];

/// The 3×3 tile of AVX-512 for an input in blocks: 1 × 8 × 3 = 24 accumulators, so that a broadcast's cache line
/// (16 channels of one pixel) serves 8 channels, not 2: with (2, 2) a task streamed a whole 64-byte line per 2
/// values of every pixel, and ResNet-18's 64→128 3×3/2 weight gradient on 56×56 ran at 136–151 GFLOP/s
/// against 215–239 from NCHW input (Intel Xeon, `bench --convs`).
const TILE_BLOCKED_INPUT: (usize, usize) = (1, 8);

/// The first tile of the kernel size's list that divides the channels and fits `isa`'s registers; for a 3×3
/// kernel on an input in blocks with AVX-512, [`TILE_BLOCKED_INPUT`] where the channels divide by it.
fn tile_shape(
    isa: Isa,
    kernel: usize,
    (c_in, x_blocked): (usize, bool),
    c_out: usize,
) -> (usize, usize) {
    let b = lanes(isa);
    if kernel == 3 && x_blocked && isa == Isa::Avx512 && c_in.is_multiple_of(TILE_BLOCKED_INPUT.1) {
        return TILE_BLOCKED_INPUT;
    }
    let tiles: &[(usize, usize)] = match kernel {
        1 => &TILES_1X1,
        3 => &TILES,
        _ => &TILES_7X7,
    };
    tiles
        .iter()
        .copied()
        .find(|&(f, ci)| {
            tile_fits(isa, kernel, (f, ci))
                && c_out.is_multiple_of(f * b)
                && c_in.is_multiple_of(ci)
        })
        .unwrap_or((1, 1))
}

/// Whether a `kernel`×`kernel` tile of `F` output blocks × `CI` input channels keeps its accumulators, the `F`
/// output-gradient vectors and a broadcast in `isa`'s registers: 3×3 tiles are sized for AVX2's 16; 1×1 ones take
/// 8 accumulators at most there, 7×7 ones one (7 accumulators); AVX-512's 32 registers hold every listed tile.
fn tile_fits(isa: Isa, kernel: usize, (f, ci): (usize, usize)) -> bool {
    match kernel {
        3 => true,
        _ if isa == Isa::Avx512 => true,
        1 => f * ci <= 8,
        _ => f * ci == 1,
    }
}

/// What one kernel call reads and writes: the tile of `F` output blocks (tile `t`) and `CI` input channels
/// (channel group `cg`) of one image, its sums stored or added to its predecessors'.
#[derive(Clone, Copy)]
struct Tile {
    /// The input at the image, the channel group's first channel.
    x: *const f32,
    /// Elements between the input's neighbouring channels and rows: `(h·w, w)` in NCHW, `(1, w·B)` in
    /// blocks of `B` (a tile's channels lie in one block; the columns are the kernel's `XL` apart).
    x_channel: usize,
    x_row: usize,
    /// The blocked output gradient at the image, the tile's first block.
    dy: *const f32,
    /// `[CI][k][k][F][B]`: the tile's sums, written, or added to what it holds where `accumulate`.
    out: *mut f32,
    accumulate: bool,
    /// The input plane, `h · w`.
    h: usize,
    w: usize,
    dy_plane: usize,
    oh: usize,
    ow: usize,
    stride: usize,
}

type TileKernel = unsafe fn(&Tile);

/// `dW` `[C_out, C_in, k, k]` of the k×k convolution (padding k/2, stride `stride`) of `x` `[N, C_in, H, W]`
/// whose output gradient is `dy` `[N, C_out, H', W']`, each NCHW or already in `isa`'s blocks (read in place),
/// images summed in groups of `group`. Call where
/// [`weight_grad_applies`]`(isa, (k, k / 2), c_in, c_out)`.
pub fn weight_grad(
    isa: Isa,
    x: Source,
    dy: Source,
    (c_out, oh, ow): (usize, usize, usize),
    (k, stride): (usize, usize),
    group: usize,
) -> Result<Vec<f32>> {
    let b = lanes(isa);
    let pad = k / 2;
    let out = |side: usize| {
        (side + 2 * pad)
            .checked_sub(k)
            .map(|d| d / stride.max(1) + 1)
    };
    let (n, c_in, h, w) = x.dims();
    if isa > Isa::best_available()
        || !(weight_grad_applies(isa, (k, pad), c_in, c_out)
            || k == 1 && pointwise_weight_grad_applies(isa, c_in, c_out))
        || dy.dims() != (n, c_out, oh, ow)
        || matches!(dy, Source::Blocked(d) if d.lanes != b)
        || matches!(x, Source::Blocked(d) if d.lanes != b)
        || stride == 0
        || group == 0
        || (Some(oh), Some(ow)) != (out(h), out(w))
    {
        candle_core::bail!(
            "blocked weight gradient: input [{n}, {c_in}, {h}, {w}], output gradient {:?} \
             for [{n}, {c_out}, {oh}, {ow}], {k}×{k} kernel, stride {stride}: expected a kernel of \
             {KERNELS:?} padded by half (or 1×1 without padding), the output channels \
             and blocked operands in blocks of {b} and a CPU that runs {isa}",
            dy.dims()
        );
    }
    let blocked_dy = Padded::batch(dy, 0, b);
    let dy_blocked = blocked_dy.batch_data();
    let (f, channels) = tile_shape(isa, k, (c_in, matches!(x, Source::Blocked(_))), c_out);
    let (tiles, channel_groups, groups) = (c_out / (f * b), c_in / channels, n.div_ceil(group));
    let taps = k * k;
    let tile_len = f * channels * taps * b;
    // Partial sums `[groups][tiles][c_in / channels][tile]`: task (group, tile, channels) writes one chunk.
    let task_flops = 2 * group * oh * ow * tile_len;
    let x_plane = h * w;
    // Where the first image's channel `ch` starts, and the strides of `Tile`.
    let (x, x_lanes) = match x {
        Source::Nchw { data, .. } => (data, 1),
        Source::Blocked(d) => (d.data, b),
    };
    let x_at = |ch: usize| ch / x_lanes * x_plane * x_lanes + ch % x_lanes;
    let kernel = tile_kernel(isa, k, (f, channels), x_lanes);
    let (x_channel, x_row) = match x_lanes {
        1 => (x_plane, w),
        _ => (1, w * x_lanes),
    };
    // A task takes every channel group of its tile, image by image: the image's planes are read from memory once
    // for all of them, where with one task per channel group each task streamed its whole group of images again.
    // Both orders called alternately in one process, 30 calls each, median GFLOP/s, caches flushed before each
    // call (Intel Xeon, 2 FMA units): ResNet-18's 1×1 projections at batch 16, 64→128 on 56×56 73 → 78 (116 →
    // 132 with the operands in cache), 256→512 on 14×14 1.02–1.06×; its 3×3/2 layers 1.00–1.06×; ResNet-20's at
    // batch 128 0.98–1.03×. The sums are the same: per image and channel group, the pixels in order, then added
    // to the image's predecessors in the group.
    let fill = |partials: &mut [MaybeUninit<f32>]| {
        let runs = MIN_TASK_FLOPS.div_ceil(task_flops * channel_groups);
        for_each_chunk_in_runs(partials, channel_groups * tile_len, runs, |task, out| {
            let (grp, t) = (task / tiles, task % tiles);
            let first = grp * group;
            for img in first..(first + group).min(n) {
                for (cg, out) in out.chunks_exact_mut(tile_len).enumerate() {
                    let tile = Tile {
                        x: x[img * c_in * x_plane + x_at(cg * channels)..].as_ptr(),
                        x_channel,
                        x_row,
                        dy: dy_blocked[(img * c_out / b + t * f) * oh * ow * b..].as_ptr(),
                        out: out.as_mut_ptr().cast::<f32>(),
                        accumulate: img > first,
                        h,
                        w,
                        dy_plane: oh * ow * b,
                        oh,
                        ow,
                        stride,
                    };
                    // SAFETY: the tile reads its image's input (the taps inside the plane) and blocked output
                    // gradient, and writes all of its own chunk (reading it back where it accumulates); the
                    // kernel set was checked above.
                    unsafe { kernel(&tile) };
                }
            }
        })
    };
    let whole = tiles * channel_groups * tile_len;
    // SAFETY: the tasks write every chunk of `tile_len` values.
    let mut partials = unsafe { written_by(groups * whole, fill) };
    // The other groups' partial sums added into the first group's, in group order, value by value along them (a
    // single group is its own sum): a sum per value gathered across the groups (`whole` values apart, 16 groups
    // of 147 KB for ResNet-20's 64→64 at b128) read a new cache line at every term.
    let (sums, others) = partials.split_at_mut(whole);
    for_each_chunk(sums, SUM_CHUNK, |j, sum| {
        for part in others.chunks_exact(whole) {
            let part = &part[j * SUM_CHUNK..][..sum.len()];
            sum.iter_mut().zip(part).for_each(|(s, p)| *s += p);
        }
    });
    let sums = &*sums;
    // `[C_out, C_in, k, k]` from the sums, on all threads.
    let gather = |dw: &mut [MaybeUninit<f32>]| {
        for_each_chunk(dw, c_in * taps, |o, row| {
            let (t, lane) = (o / (f * b), o % (f * b));
            for (c, kernel) in row.chunks_exact_mut(taps).enumerate() {
                let at = (t * channel_groups + c / channels) * tile_len
                    + c % channels * taps * f * b
                    + lane;
                for (tap, v) in kernel.iter_mut().enumerate() {
                    let i = at + tap * f * b;
                    v.write(sums[i]);
                }
            }
        })
    };
    // SAFETY: every output channel's row of `c_in · k²` values is written.
    Ok(unsafe { written_by(c_out * c_in * taps, gather) })
}

/// The tile kernel of `isa` for a `kernel`×`kernel` convolution, a tile shape of `tile_shape` and an input
/// in blocks of `x_lanes` channels (1: NCHW).
fn tile_kernel(isa: Isa, kernel: usize, shape: (usize, usize), x_lanes: usize) -> TileKernel {
    macro_rules! pick {
        ($tile:ident, $xl:literal) => {
            match (kernel, shape) {
                (1, (2, 8)) => $tile::<2, 8, 1, $xl>,
                (1, (2, 4)) => $tile::<2, 4, 1, $xl>,
                (1, (1, 8)) => $tile::<1, 8, 1, $xl>,
                (1, (1, 4)) => $tile::<1, 4, 1, $xl>,
                (1, _) => $tile::<1, 1, 1, $xl>,
                (7, (2, 1)) => $tile::<2, 1, 7, $xl>,
                (7, _) => $tile::<1, 1, 7, $xl>,
                (_, (1, 8)) => $tile::<1, 8, 3, $xl>,
                (_, (2, 2)) => $tile::<2, 2, 3, $xl>,
                (_, (1, 4)) => $tile::<1, 4, 3, $xl>,
                (_, (1, 3)) => $tile::<1, 3, 3, $xl>,
                (_, (2, 1)) => $tile::<2, 1, 3, $xl>,
                (_, (1, 2)) => $tile::<1, 2, 3, $xl>,
                _ => $tile::<1, 1, 3, $xl>,
            }
        };
    }
    // The input's column step a compile-time constant: the taps' offsets are immediates.
    macro_rules! by_layout {
        ($tile:ident) => {
            match x_lanes {
                16 => pick!($tile, 16),
                8 => pick!($tile, 8),
                _ => pick!($tile, 1),
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 => return by_layout!(avx512_tile),
        Isa::Avx2 => return by_layout!(avx2_tile),
        Isa::Generic => {}
    }
    let _ = isa;
    by_layout!(portable_tile)
}

unsafe fn portable_tile<const F: usize, const CI: usize, const K: usize, const XL: usize>(
    tile: &Tile,
) {
    unsafe { sum_tile::<Portable, F, CI, K, XL>(tile) }
}

#[cfg(target_arch = "x86_64")]
use x86::{avx2_tile, avx512_tile};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{sum_tile, Tile};
    use crate::ops::simd::{Avx2, Avx512};

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2_tile<
        const F: usize,
        const CI: usize,
        const K: usize,
        const XL: usize,
    >(
        tile: &Tile,
    ) {
        unsafe { sum_tile::<Avx2, F, CI, K, XL>(tile) }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512_tile<
        const F: usize,
        const CI: usize,
        const K: usize,
        const XL: usize,
    >(
        tile: &Tile,
    ) {
        unsafe { sum_tile::<Avx512, F, CI, K, XL>(tile) }
    }
}

/// The tile's sums over one image: per kernel row, the accumulators run over every output pixel, then are stored (the
/// group's first image) or added to the group's sums so far. The input is read in place: a tap in the zero border adds
/// nothing, so rows in it are skipped, and the columns at the plane's edges take their taps one by one.
#[inline(always)]
unsafe fn sum_tile<S: Simd, const F: usize, const CI: usize, const K: usize, const XL: usize>(
    tile: &Tile,
) {
    let (w, s, pad) = (tile.w, tile.stride, K / 2);
    // Output columns `first..inner` have all K taps (columns `ox·s − pad ..= ox·s − pad + K − 1`) inside the
    // plane; the others take theirs one by one.
    let first = pad.div_ceil(s).min(tile.ow);
    let inner = ((w + pad).checked_sub(K).map_or(0, |d| d / s + 1)).clamp(first, tile.ow);
    unsafe {
        let mut sums = [[[[S::zero(); F]; K]; K]; CI];
        for ky in 0..K {
            let mut acc = [[[S::zero(); F]; K]; CI];
            for oy in 0..tile.oh {
                // Input row `oy·s + ky − pad`, if it is inside the plane.
                let Some(iy) = (oy * s + ky).checked_sub(pad).filter(|&r| r < tile.h) else {
                    continue;
                };
                let row = Row {
                    x: tile.x.add(iy * tile.x_row),
                    dy: tile.dy.add(oy * tile.ow * S::LANES),
                };
                for ox in 0..first {
                    pixel::<S, F, CI, K, XL, true>(&mut acc, row, tile, ox);
                }
                for ox in first..inner {
                    pixel::<S, F, CI, K, XL, false>(&mut acc, row, tile, ox);
                }
                for ox in inner..tile.ow {
                    pixel::<S, F, CI, K, XL, true>(&mut acc, row, tile, ox);
                }
            }
            // Kernel row `ky` of each input channel (a copy: LLVM kept the accumulators in registers only with
            // the stores out of this loop).
            for (sum, acc) in sums.iter_mut().zip(&acc) {
                sum[ky] = *acc;
            }
        }
        let mut out = tile.out;
        for sum in sums.iter().flatten().flatten().flatten() {
            match tile.accumulate {
                true => S::load(out).add(*sum).store(out),
                false => sum.store(out),
            }
            out = out.add(S::LANES);
        }
    }
}

/// One input row and the output gradient's row that it meets.
#[derive(Clone, Copy)]
struct Row {
    x: *const f32,
    dy: *const f32,
}

/// Output column `ox`'s terms into the accumulators: `F` output-gradient vectors, each input channel's `K`
/// taps broadcast. `EDGE`: some taps may fall outside the row, and those add nothing. (A function, not a
/// closure: a closure does not take its caller's `target_feature`.)
#[inline(always)]
unsafe fn pixel<
    S: Simd,
    const F: usize,
    const CI: usize,
    const K: usize,
    const XL: usize,
    const EDGE: bool,
>(
    acc: &mut [[[S; F]; K]; CI],
    row: Row,
    tile: &Tile,
    ox: usize,
) {
    let (s, w, pad) = (tile.stride as isize, tile.w as isize, (K / 2) as isize);
    unsafe {
        let dv: [S; F] =
            std::array::from_fn(|f| S::load(row.dy.add(f * tile.dy_plane + ox * S::LANES)));
        // Column `ox·s − pad` (before the row's start at the left edge, not read there).
        let at = row.x.wrapping_offset((ox as isize * s - pad) * XL as isize);
        // A blocked input's channels are neighbours.
        let x_channel = if XL == 1 { tile.x_channel } else { 1 };
        for (c, acc) in acc.iter_mut().enumerate() {
            for (kx, acc) in acc.iter_mut().enumerate() {
                let col = ox as isize * s + kx as isize - pad;
                let v = match !EDGE || (0..w).contains(&col) {
                    true => S::splat(at.wrapping_add(c * x_channel + kx * XL)),
                    false => S::zero(),
                };
                for (a, g) in acc.iter_mut().zip(&dv) {
                    *a = v.mul_add(*g, *a);
                }
            }
        }
    }
}

// SAFETY: a `Tile` is used by one task; its pointers are into buffers that outlive the parallel loop.
unsafe impl Send for Tile {}
unsafe impl Sync for Tile {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::blocked::Blocked;

    /// The definition, in f64.
    fn reference(
        x: &[f32],
        (n, c_in, h, w): (usize, usize, usize, usize),
        dy: &[f32],
        (c_out, oh, ow): (usize, usize, usize),
        (k, s): (usize, usize),
    ) -> Vec<f64> {
        let pad = (k / 2) as isize;
        let mut dw = vec![0f64; c_out * c_in * k * k];
        for img in 0..n {
            for o in 0..c_out {
                for c in 0..c_in {
                    for tap in 0..k * k {
                        let (ky, kx) = (tap / k, tap % k);
                        let mut sum = 0f64;
                        for oy in 0..oh {
                            for ox in 0..ow {
                                let (iy, ix) =
                                    ((oy * s + ky) as isize - pad, (ox * s + kx) as isize - pad);
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xv = x[((img * c_in + c) * h + iy as usize) * w + ix as usize];
                                sum += f64::from(xv)
                                    * f64::from(dy[((img * c_out + o) * oh + oy) * ow + ox]);
                            }
                        }
                        dw[(o * c_in + c) * k * k + tap] += sum;
                    }
                }
            }
        }
        dw
    }

    /// Every kernel set this CPU runs, both kernel sizes, both strides, odd planes, planes smaller than the
    /// kernel, a partial last group of images.
    #[test]
    fn equals_the_definition_on_every_kernel_set() -> Result<()> {
        let value = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        for isa in Isa::available() {
            let b = lanes(isa);
            let mut blocked_inputs = 0;
            // (images, c_in, h, w, c_out, kernel, stride)
            let shapes = [
                (3, 4, 5, 7, b, 3, 1),
                (5, 6, 9, 6, 2 * b, 3, 2),
                (1, 8, 1, 1, 2 * b, 3, 1),
                (2, 12, 4, 4, 3 * b, 3, 2),
                // Many tiles and channel groups; input channels in blocks, both strides.
                (2, 64, 24, 24, 10 * b, 3, 1),
                (3, 2 * b, 9, 10, b, 3, 2),
                // Input channels in threes (a stem), odd, in pairs only, prime.
                (3, 3, 12, 12, b, 3, 1),
                (2, 5, 6, 6, 2 * b, 3, 2),
                (2, 2, 5, 5, b, 3, 1),
                (1, 7, 4, 4, b, 3, 1),
                // The 7×7 stem: both tiles, both strides, odd and tiny planes.
                (3, 3, 19, 22, 2 * b, 7, 2),
                (2, 3, 11, 9, b, 7, 2),
                (1, 2, 13, 13, 2 * b, 7, 1),
                (2, 3, 4, 3, 2 * b, 7, 2),
                // 1×1 (the projections of training on blocked tensors): each tile, both strides, odd planes.
                (3, b, 7, 9, 2 * b, 1, 2),
                (2, 2 * b, 8, 8, b, 1, 1),
                (2, 4, 5, 5, 2 * b, 1, 2),
                (1, 4, 3, 3, b, 1, 1),
                (2, 3, 6, 5, b, 1, 2),
            ];
            let tiles: Vec<_> = shapes
                .iter()
                .map(|&(_, c_in, _, _, c_out, k, _)| (k, tile_shape(isa, k, (c_in, false), c_out)))
                .collect();
            let all = (TILES.iter().map(|&t| (3, t)))
                .chain(TILES_7X7.iter().map(|&t| (7, t)))
                .chain(TILES_1X1.iter().map(|&t| (1, t)))
                .filter(|&(k, t)| tile_fits(isa, k, t));
            assert!(all.clone().all(|t| tiles.contains(&t)), "{isa}: {tiles:?}");
            for (n, c_in, h, w, c_out, k, s) in shapes {
                let out = |side: usize| (side + 2 * (k / 2) - k) / s + 1;
                let (oh, ow) = (out(h), out(w));
                let x: Vec<f32> = (0..n * c_in * h * w).map(value).collect();
                let dy: Vec<f32> = (0..n * c_out * oh * ow).map(|i| value(i + 3)).collect();
                let dims = (n, c_in, h, w);
                let ours = weight_grad(
                    isa,
                    Source::nchw(&x, dims),
                    Source::nchw(&dy, (n, c_out, oh, ow)),
                    (c_out, oh, ow),
                    (k, s),
                    2,
                )?;
                // The output gradient already blocked (as training's shared conversion hands it), and the
                // input too where its channels are whole blocks (training on blocked tensors): the same bits.
                let blocked_dy = Blocked::from_nchw_slice(&dy, (n, c_out, oh, ow), b)?;
                let from_blocked = weight_grad(
                    isa,
                    Source::nchw(&x, dims),
                    blocked_dy.source(),
                    (c_out, oh, ow),
                    (k, s),
                    2,
                )?;
                assert_eq!(ours, from_blocked, "{isa}: {c_in}→{c_out} {k}×{k}/{s}");
                if c_in % b == 0 {
                    let blocked_x = Blocked::from_nchw_slice(&x, dims, b)?;
                    let both_blocked = weight_grad(
                        isa,
                        blocked_x.source(),
                        blocked_dy.source(),
                        (c_out, oh, ow),
                        (k, s),
                        2,
                    )?;
                    assert_eq!(
                        ours, both_blocked,
                        "{isa}: {c_in}→{c_out} {k}×{k}/{s}, x blocked"
                    );
                    blocked_inputs += 1;
                }
                let exact = reference(&x, dims, &dy, (c_out, oh, ow), (k, s));
                assert_eq!(ours.len(), exact.len());
                for (i, (a, e)) in ours.iter().zip(&exact).enumerate() {
                    assert!(
                        (f64::from(*a) - e).abs() < 1e-4 * (1.0 + e.abs()),
                        "{isa} {:?} element {i}: {a} vs {e}",
                        (n, c_in, h, w, c_out, k, s)
                    );
                }
            }
            assert!(
                blocked_inputs >= 2,
                "{isa}: {blocked_inputs} shapes with blocked input channels"
            );
        }
        Ok(())
    }
}
