//! The input gradient of a 3×3 stride-2 convolution (padding 1), for the training op (`ops::conv`), by its
//! sub-pixel classes. The input pixels `(2i + a, 2j + b)` of one class receive only the kernel rows
//! `ky ≡ a + 1` and columns `kx ≡ b + 1` (mod 2), from the output-gradient pixel `(i + dy, j + dx)` with
//! `d = (a + 1 − ky) / 2`:
//!
//!   dX[c, 2i + a, 2j + b] = Σ_o Σ_{ky, kx} W[o, c, ky, kx] · dY[o, i + (a + 1 − ky)/2, j + (b + 1 − kx)/2]
//!
//! So each class is a stride-1 convolution of `dY` with a 1×1, 1×2, 2×1 or 2×2 kernel (the 9 taps once
//! each, no product with an inserted zero), run on the blocked kernel's register tiles, which write the class's
//! columns 2 pixels apart into the blocked `dX`. im2col + GEMM + col2im ran ResNet-20's 16→32 and 32→64
//! stride-2 input gradients at 20–46 % of the FMA peak (`bench --convs --train`, AMD EPYC Zen 4).

use super::conv::{
    chunk_blocks, each_padded_image, lanes, max_columns, nchw_image_by_image, output_group,
    row_kernel, rows_per_task, Row, SendPtr, MIN_TASK_FLOPS, PER_IMAGE_BATCHES, SEGMENT_TILES,
};
use super::layout::{Blocked, BlockedSlice, Padded, Source};
use crate::ops::cpu_slice::{written_by, LineAligned, Scratch};
use crate::ops::isa::Isa;
use crate::ops::parallel;
use candle_core::Result;
use std::mem::MaybeUninit;

const STRIDE: usize = 2;

/// Input planes from this width on: each class row then has 7 columns or more.
const MIN_WIDTH: usize = 14;

/// Tiles per class row up to which a task takes several rows (`conv::rows_per_task`). ResNet-18 at batch 16,
/// `bench --train --convs`, input gradient GFLOP/s, one row per task / several where a class row has at most
/// this many tiles (Intel Xeon, 2 FMA units, 2 alternated runs): 256→512 on 14×14 (7-column class rows, 2 tiles)
/// 159–166 / 179–180; up to 6 tiles, as the forward, took 64→128 on 56×56 (28 columns) 285–290 → 262–265 and
/// 128→256 on 28×28 270 → 251–257. ResNet-20's 16→32 and 32→64 (2 tiles) at batch 128: level.
const MULTI_ROW_TILES: usize = 2;

/// Whether [`strided_input_grad_3x3_nchw`] computes the input gradient of a 3×3 convolution of `stride`
/// (padding 1) into `c_in` channels of `w`-wide planes on `isa`: stride 2, input channels in whole blocks, and
/// planes of at least 14 columns. Measured (AMD EPYC Zen 4, AVX-512, 3 alternated rounds
/// against im2col + GEMM + col2im, GFLOP/s): faster on 32, 16, 56 and 28-wide planes (ResNet-20 16→32 and
/// 32→64 at batch 128: 67–102 vs 58–80 and 88–151 vs 83–98; ResNet-18/50 at batch 16, 64→128 on 56×56
/// 149–174 vs 117–133, 128→128 on 56×56 98–182 vs 115–141, 128→256 on 28×28 149–174 vs 120–151, 256→256 on
/// 28×28 153–164 vs 119–131), slower on 14×14 planes, whose classes are 7 columns wide (256→512 67–97 vs
/// 81–148, 512→512 72–96 vs 133–146) with one class row per task. With several rows per task (below) the 14×14
/// planes went over: ResNet-18's 256→512 at batch 16, 150–154 GFLOP/s by im2col + GEMM against 179–186 (Intel Xeon,
/// 2 FMA units, `bench --train --convs`, 2 alternated runs; not measured on Zen 4).
pub fn strided_input_grad_applies(isa: Isa, stride: usize, c_in: usize, w: usize) -> bool {
    stride == STRIDE && c_in.is_multiple_of(lanes(isa)) && w >= MIN_WIDTH
}

/// The kernel taps one class `a` (of rows or of columns) receives, in the order of the output-gradient pixel
/// they come from, `i + 0` then `i + 1`.
fn class_taps(a: usize) -> Vec<usize> {
    (0..3)
        .rev()
        .filter(|&k| a + 1 >= k && (a + 1 - k).is_multiple_of(STRIDE))
        .collect()
}

/// One sub-pixel class: its input pixels, its kernel and how its rows are cut into tasks.
struct Class {
    /// The class's row and column offsets `(a, b)`.
    offset: (usize, usize),
    /// Its input pixels: rows ≡ a, columns ≡ b.
    rows: usize,
    cols: usize,
    /// Kernel rows and columns.
    kh: usize,
    kw: usize,
    /// `[C_in / (F·B)][C_out / bi][kh][kw][bi][F][B]`: the gradient's convolution maps the `C_out` channels of
    /// `dY` to the `C_in` of `dX`.
    weights: LineAligned,
    segments: usize,
    segment: usize,
    /// Class rows per task (see `conv::rows_per_task`).
    rows_per_task: usize,
}

impl Class {
    fn tasks(&self, groups: usize) -> usize {
        self.rows.div_ceil(self.rows_per_task) * self.segments * groups
    }
}

/// `dX` `[N, C_in, H, W]` of the 3×3 convolution (stride 2, padding 1) with `weight` `[C_out, C_in, 3, 3]`,
/// from `dy` `[N, C_out, H', W']`. Input channels in whole blocks; the dispatcher calls it where
/// [`strided_input_grad_applies`].
pub fn strided_input_grad_3x3_nchw(
    isa: Isa,
    dy: &[f32],
    dims: (usize, usize, usize, usize),
    weight: &[f32],
    input: (usize, usize, usize),
) -> Result<Vec<f32>> {
    if dy.len() != dims.0 * dims.1 * dims.2 * dims.3 {
        candle_core::bail!(
            "blocked strided input gradient: {} values for an output gradient {dims:?}",
            dy.len()
        );
    }
    strided_input_grad(isa, Source::nchw(dy, dims), weight, input, false)
}

/// [`strided_input_grad_3x3_nchw`] of a blocked `dy` (training on blocked tensors), `dX` blocked too.
pub fn strided_input_grad_3x3_blocked(
    isa: Isa,
    dy: BlockedSlice,
    weight: &[f32],
    input: (usize, usize, usize),
) -> Result<Vec<f32>> {
    strided_input_grad(isa, Source::Blocked(dy), weight, input, true)
}

/// `dX` in `isa`'s blocks where `blocked`, else NCHW.
fn strided_input_grad(
    isa: Isa,
    dy: Source,
    weight: &[f32],
    (c_in, h, w): (usize, usize, usize),
    blocked: bool,
) -> Result<Vec<f32>> {
    let b = lanes(isa);
    let (n, c_out, oh, ow) = dy.dims();
    if isa > Isa::best_available()
        || !c_in.is_multiple_of(b)
        || c_out == 0
        || h == 0
        || w == 0
        || (oh, ow) != ((h - 1) / STRIDE + 1, (w - 1) / STRIDE + 1)
        || matches!(dy, Source::Blocked(d) if d.lanes != b)
        || weight.len() != c_out * c_in * 9
    {
        candle_core::bail!(
            "blocked strided input gradient: output gradient [{n}, {c_out}, {oh}, {ow}], weight \
             [{c_out}, {c_in}, 3, 3] ({} values), input {h}×{w}: expected the input channels (and a blocked \
             output gradient) in blocks of {b}, the output of a stride-2 3×3 layer and a CPU that runs {isa}",
            weight.len()
        );
    }
    let f = output_group(isa, c_in / b);
    let bi = if c_out.is_multiple_of(b) { b } else { c_out };
    let groups = c_in / (f * b);
    let columns = max_columns(isa, f);
    let classes: Vec<Class> = (0..STRIDE * STRIDE)
        .map(|k| {
            let (a, bb) = (k / STRIDE, k % STRIDE);
            let (ty, tx) = (class_taps(a), class_taps(bb));
            // `[C_in / (F·B)][C_out / bi][kh][kw][bi][F][B]`, in order, straight into the aligned buffer.
            let (ty, tx) = (&ty, &tx);
            let packed = (0..groups).flat_map(move |g| {
                (0..c_out / bi).flat_map(move |cb| {
                    ty.iter().flat_map(move |&ky| {
                        tx.iter().flat_map(move |&kx| {
                            (0..bi).flat_map(move |i| {
                                (0..f * b).map(move |lane| {
                                    let (o, c) = (cb * bi + i, g * f * b + lane);
                                    weight[(o * c_in + c) * 9 + ky * 3 + kx]
                                })
                            })
                        })
                    })
                })
            });
            let weights = LineAligned::from_values(c_in * c_out * ty.len() * tx.len(), packed);
            let cols = (w - bb).div_ceil(STRIDE);
            let segments = cols.div_ceil(SEGMENT_TILES * columns).max(1);
            let rows = (h - a).div_ceil(STRIDE);
            Class {
                offset: (a, bb),
                rows,
                rows_per_task: match segments {
                    1 => rows_per_task(
                        rows,
                        cols,
                        (columns, MULTI_ROW_TILES),
                        n * groups * STRIDE * STRIDE,
                    ),
                    _ => 1,
                },
                cols,
                kh: ty.len(),
                kw: tx.len(),
                weights,
                segments,
                segment: cols.div_ceil(segments),
            }
        })
        .collect();
    // `dY` with a border of zeros: the last class rows and columns read one pixel past it where H, W are even.
    // A large batch runs image by image: each image's `dY` padded, its classes computed and its `dX` turned to
    // NCHW in the thread's cache. Through memory, the two conversions were 30 % of the call; ResNet-20's 16→32
    // layer at batch 128 (9 alternated runs of a probe, AMD EPYC Zen 4) went from 65–102 to 91–133 GFLOP/s.
    // A blocked `dX` needs no conversion, but its `dY` is padded image by image too, in the thread's cache
    // instead of the whole batch through memory (ResNet-20's 16→32 layer in `bench --convs`: 117–139 → 134–141
    // GFLOP/s, 3 alternated runs, same machine).
    let per_image = n >= PER_IMAGE_BATCHES * rayon::current_num_threads();
    let padded = Padded::new(dy, 1, bi, per_image);
    let bias = vec![0f32; f * b];
    let job = Row {
        x: std::ptr::null(),
        w: std::ptr::null(),
        bias: bias.as_ptr(),
        out: std::ptr::null_mut(),
        residual: std::ptr::null(),
        relu: false,
        blocks_in: padded.blocks,
        x_plane: padded.h * padded.w * bi,
        x_row: padded.w * bi,
        x_step: bi,
        kernel: 0,
        taps_per_row: 0,
        w_plane: 0,
        w_row: 0,
        out_plane: h * w * b,
        out_step: STRIDE * b,
        width: 0,
        rows: 1,
        x_rows: padded.w * bi,
        out_row: STRIDE * w * b,
        columns,
        chunk_blocks: 0,
    };
    let kernel = row_kernel(isa, f, bi == b);
    // Tasks of an image: each class's (row, segment, group), the groups innermost, so that one thread takes
    // every group of a segment while its output-gradient rows are in L1.
    let class_tasks: Vec<usize> = classes.iter().map(|c| c.tasks(groups)).collect();
    let tasks_per_image: usize = class_tasks.iter().sum();
    let image_flops = 2 * c_in * c_out * 9 * oh * ow;
    let batch = MIN_TASK_FLOPS.div_ceil((image_flops / tasks_per_image.max(1)).max(1));
    // Task `t` of image `img`, reading the image's padded `dY` at `dy_image`, writing its `dX` at `out`.
    let run = |t: usize, dy_image: &[f32], out: &SendPtr| {
        // A whole capture: `Row` is shared across threads, its pointer fields are not.
        let job = &job;
        let mut t = t;
        let mut k = 0;
        while t >= class_tasks[k] {
            t -= class_tasks[k];
            k += 1;
        }
        let c = &classes[k];
        let (g, rest) = (t % groups, t / groups);
        let (i, s) = (rest / c.segments * c.rows_per_task, rest % c.segments);
        let j0 = s * c.segment;
        let (a, bb) = c.offset;
        // The first tap reads output-gradient pixel (i, j0): (i + 1, j0 + 1) of the padded copy.
        let x_at = (i + 1) * job.x_row + (j0 + 1) * bi;
        let out_at = ((g * f) * h + STRIDE * i + a) * w * b + (STRIDE * j0 + bb) * b;
        let w_group = c.weights.len() / groups;
        let row = Row {
            x: dy_image[x_at..].as_ptr(),
            w: c.weights[g * w_group..].as_ptr(),
            bias: job.bias,
            out: out.0.wrapping_add(out_at),
            kernel: c.kh,
            taps_per_row: c.kw * bi,
            w_plane: c.kh * c.kw * bi * f * b,
            w_row: c.kw * bi * f * b,
            width: c.segment.min(c.cols - j0),
            rows: c.rows_per_task.min(c.rows - i),
            chunk_blocks: chunk_blocks(c.rows_per_task, bi),
            ..*job
        };
        // SAFETY: the pointers address this task's rows of the padded output gradient (every tap of the class's
        // columns lies inside its border), its group's weights and its class's pixels of one output row, which
        // no other task writes; the kernel set was checked above.
        unsafe { kernel(&row) };
    };
    let image_in = padded.image_len();
    let image_out = c_in * h * w;
    if blocked && padded.data().is_none() {
        let fill = |buf: &mut [MaybeUninit<f32>]| {
            let out = &SendPtr(buf.as_mut_ptr().cast::<f32>());
            each_padded_image(&padded, n, |img, x| {
                let image = SendPtr(out.0.wrapping_add(img * image_out));
                for t in 0..tasks_per_image {
                    run(t, x, &image);
                }
            })
        };
        // SAFETY: the classes partition every image's pixels, and each class's tasks write all of its pixels
        // of every block.
        return Ok(unsafe { written_by(n * image_out, fill) });
    }
    let Some(dy_padded) = padded.data() else {
        let compute = |x: &[f32], out: &SendPtr| {
            for t in 0..tasks_per_image {
                run(t, x, out);
            }
        };
        // SAFETY: the classes partition the image's pixels, and each class's tasks write all of its pixels of
        // every block.
        return Ok(unsafe { nchw_image_by_image(&padded, (n, image_out, h * w * b), b, compute) });
    };
    let fill = |buf: &mut [MaybeUninit<f32>]| {
        let out = SendPtr(buf.as_mut_ptr().cast::<f32>());
        let out = &out;
        parallel::for_each_index(n * tasks_per_image, batch, |task| {
            let img = task / tasks_per_image;
            let image = SendPtr(out.0.wrapping_add(img * image_out));
            run(task % tasks_per_image, &dy_padded[img * image_in..], &image)
        });
    };
    if blocked {
        // SAFETY: the classes partition every image's pixels, and each class's tasks write all of its pixels
        // of every block.
        return Ok(unsafe { written_by(n * image_out, fill) });
    }
    // SAFETY: as above.
    let data = unsafe { Scratch::written_by(n * image_out, fill) };
    let dx = Blocked {
        data,
        n,
        c: c_in,
        h,
        w,
        lanes: b,
    };
    Ok(dx.to_nchw_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, summed in f64.
    fn reference(
        dy: &[f32],
        (n, c_out, oh, ow): (usize, usize, usize, usize),
        weight: &[f32],
        (c_in, h, w): (usize, usize, usize),
    ) -> Vec<f32> {
        let mut dx = vec![0f64; n * c_in * h * w];
        for img in 0..n {
            for o in 0..c_out {
                for (y, x) in (0..oh).flat_map(|y| (0..ow).map(move |x| (y, x))) {
                    let g = dy[((img * c_out + o) * oh + y) * ow + x] as f64;
                    for (ky, kx) in (0..3).flat_map(|ky| (0..3).map(move |kx| (ky, kx))) {
                        let (iy, ix) = (2 * y + ky, 2 * x + kx);
                        if iy == 0 || ix == 0 || iy > h || ix > w {
                            continue;
                        }
                        for c in 0..c_in {
                            let wv = weight[(o * c_in + c) * 9 + ky * 3 + kx] as f64;
                            dx[((img * c_in + c) * h + iy - 1) * w + ix - 1] += wv * g;
                        }
                    }
                }
            }
        }
        dx.into_iter().map(|v| v as f32).collect()
    }

    /// On all threads and on one (where a batch of two images or more runs image by image).
    #[test]
    fn equals_the_definition_on_every_kernel_set() -> Result<()> {
        equals_the_definition()?;
        let one_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("a thread pool");
        one_thread.install(equals_the_definition)
    }

    fn equals_the_definition() -> Result<()> {
        // Even and odd planes, narrow and blocked output-gradient channels, one and two blocks per tile.
        for isa in Isa::available() {
            let b = lanes(isa);
            for (n, c_out, c_in, h, w) in [
                (2, 2 * b, b, 8, 8),
                (1, 3, 2 * b, 7, 9),
                (3, b, 2 * b, 5, 6),
                (1, 4 * b, 2 * b, 30, 2),
                (5, b, b, 16, 17),
            ] {
                let (oh, ow) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
                let value = |i: usize, scale: f32| ((i * 7919 % 211) as f32 / 105.0 - 1.0) * scale;
                let dy: Vec<f32> = (0..n * c_out * oh * ow).map(|i| value(i, 1.0)).collect();
                let weight: Vec<f32> = (0..c_out * c_in * 9).map(|i| value(i + 5, 0.3)).collect();
                let ours = strided_input_grad_3x3_nchw(
                    isa,
                    &dy,
                    (n, c_out, oh, ow),
                    &weight,
                    (c_in, h, w),
                )?;
                // From a blocked output gradient into a blocked `dX` (training on blocked tensors): the same bits.
                if c_out % b == 0 {
                    let dy_blocked = Blocked::from_nchw_slice(&dy, (n, c_out, oh, ow), b)?;
                    let dx = strided_input_grad_3x3_blocked(
                        isa,
                        dy_blocked.slice(),
                        &weight,
                        (c_in, h, w),
                    )?;
                    let dx = BlockedSlice::new(&dx, (n, c_in, h, w), b)?.to_nchw_vec();
                    assert!(dx == ours, "{isa} {n}×{c_out}→{c_in} on {h}×{w}, blocked");
                }
                let expected = reference(&dy, (n, c_out, oh, ow), &weight, (c_in, h, w));
                let diff = ours
                    .iter()
                    .zip(&expected)
                    .map(|(a, e)| (a - e).abs())
                    .fold(0f32, f32::max);
                assert!(
                    diff < 1e-4,
                    "{isa} {n}×{c_out}→{c_in} on {h}×{w}: max |diff| {diff}"
                );
            }
        }
        Ok(())
    }
}
