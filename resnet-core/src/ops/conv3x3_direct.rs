//! Direct 3×3 convolution, stride 1, padding 1, for 16k output channels, with AVX-512 (x86-64, detected at
//! run time): the forward pass, the input gradient (the same convolution of the output gradient with the
//! kernel flipped and its channel axes swapped) and, for narrow layers, the weight gradient of the 3×3 layers.
//!
//! Why: through im2col, a 16→16 layer on 32×32 images first writes a column matrix nine times the input's
//! size, then the GEMM packs it again; for so few channels that costs as much as the multiply-adds, and the
//! GEMM ran at ~100 GFLOP/s on two cores. Here each image is copied once into a zero-bordered buffer and
//! sixteen vector accumulators (16 output channels × 16 columns) take every input vector with sixteen FMAs.
//!
//! Layouts: x `[N, C_in, H, W]`, weight `[C_out, C_in, 3, 3]`, y `[N, C_out, H, W]`, all row-major.

use crate::ops::cpu_slice::{written_by, Scratch};
use crate::ops::taps::kernel_3x3;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Output channels per kernel call: one accumulator register per channel.
const BLOCK: usize = 16;
/// Columns per accumulator register.
const LANES: usize = 16;

/// Whether the direct kernel takes a 3×3/stride-1/padding-1 convolution with these channel counts (it needs the
/// AVX-512 kernel set: see `conv::Algorithm::choose`). Rows of 8 (the CIFAR nets' last stage) fill a register with two rows; other rows narrower than a register
/// would waste most lanes, and the GEMM path takes those.
pub fn applies(c_out: usize, (height, width): (usize, usize)) -> bool {
    c_out.is_multiple_of(BLOCK) && (width >= LANES || (width == 8 && height.is_multiple_of(2)))
}

/// Whether [`weight_grad`] runs for these channel counts and this plane. It wins where the GEMM's reduction
/// is short (16→16 on 32×32: 155 vs 110 GFLOP/s; 32→32 on 16×16: 145 vs 120; 64→64 on 8×8, two rows per
/// register: 173 vs 127) and loses on wide layers with wide planes (64→64 on 56×56: 149 vs 179).
pub fn weight_grad_applies((c_in, c_out): (usize, usize), (height, width): (usize, usize)) -> bool {
    let plane_fits = (c_in <= 32 && width >= LANES) || (width == 8 && height.is_multiple_of(2));
    c_out.is_multiple_of(GRAD_BLOCK) && plane_fits
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512() -> bool {
    false
}

/// `y = conv3x3(x, w)` (`n·c_out·h·w` values). Call only where [`applies`] holds.
pub fn forward(x: &[f32], w: &[f32], dims: (usize, usize, usize, usize, usize)) -> Vec<f32> {
    let (n, c_in, c_out, h, wd) = dims;
    run(x, &pack(w, (c_out, c_in), false), (n, c_in, c_out, h, wd))
}

/// `dx` of `y = conv3x3(x, w)` from `dy`: `dx = conv3x3(dy, w')`, `w'[ci, co, ky, kx] = w[co, ci, 2−ky, 2−kx]`;
/// `n·c_in·h·w` values. Call only where [`applies`]`(c_in, …)` holds.
pub fn input_grad(dy: &[f32], w: &[f32], dims: (usize, usize, usize, usize, usize)) -> Vec<f32> {
    let (n, c_in, c_out, h, wd) = dims;
    run(dy, &pack(w, (c_out, c_in), true), (n, c_out, c_in, h, wd))
}

/// The weights by blocks of 16 output channels, `[C_in][3][3][16]` per block: the sixteen weights of one tap
/// side by side. `transposed`: packs `w'` of [`input_grad`] instead (channel axes swapped, taps flipped).
fn pack(w: &[f32], (c_out, c_in): (usize, usize), transposed: bool) -> Vec<f32> {
    // Output and input channels of the packed convolution.
    let (outs, ins) = if transposed {
        (c_in, c_out)
    } else {
        (c_out, c_in)
    };
    let mut packed = vec![0f32; c_out * c_in * 9];
    for o in 0..outs {
        for i in 0..ins {
            for (tap, v) in kernel_3x3(w, c_in, transposed, (o, i))
                .into_iter()
                .enumerate()
            {
                packed[(((o / BLOCK) * ins + i) * 9 + tap) * BLOCK + o % BLOCK] = v;
            }
        }
    }
    packed
}

/// Output channels per weight-gradient task: 8 channels × 3 horizontal taps = 24 accumulator registers.
const GRAD_BLOCK: usize = 8;

/// `dw` `[C_out, C_in, 3, 3]` of `y = conv3x3(x, w)` from `x` and `dy`, summed over images in groups of `group`
/// (one partial sum per group, added in group order: the same result whatever the thread count).
/// Call only where [`weight_grad_applies`]`((c_in, c_out), (h, w))` holds.
pub fn weight_grad(
    x: &[f32],
    dy: &[f32],
    (n, c_in, c_out, h, wd): (usize, usize, usize, usize, usize),
    group: usize,
) -> Vec<f32> {
    assert!(has_avx512(), "the direct 3×3 kernel needs AVX-512F");
    let g = Padded::new(c_in, h, wd);
    let xpad = g.copy_all(x, n);
    let (groups, blocks) = (n.div_ceil(group), c_out / GRAD_BLOCK);
    let block_len = GRAD_BLOCK * c_in * 9;
    // partials[group][c_out, c_in, 3, 3]; one task per (group, block of 8 output channels).
    let mut partials = vec![0f32; groups * c_out * c_in * 9];
    partials
        .par_chunks_mut(block_len)
        .enumerate()
        .for_each(|(task, dw)| {
            let (grp, block) = (task / blocks, task % blocks);
            let images = grp * group..((grp + 1) * group).min(n);
            let pairs: Vec<(&[f32], &[f32])> = images
                .map(|image| {
                    let dyi = &dy[(image * c_out + block * GRAD_BLOCK) * h * wd..];
                    (
                        &xpad[image * g.image..(image + 1) * g.image],
                        &dyi[..GRAD_BLOCK * h * wd],
                    )
                })
                .collect();
            // Images summed in registers before a sum across lanes: as many as keep their 8 gradient planes
            // within ~16 KiB (L1); one at a time for large planes.
            let per_pass = (16 * 1024 / (GRAD_BLOCK * h * wd * 4)).max(1);
            #[cfg(target_arch = "x86_64")]
            for chunk in pairs.chunks(per_pass) {
                // SAFETY: checked AVX-512F above; the slices have the sizes `block_weight_grad` reads.
                unsafe {
                    match wd {
                        8 => avx512::block_weight_grad::<true>(chunk, &g, dw),
                        _ => avx512::block_weight_grad::<false>(chunk, &g, dw),
                    }
                };
            }
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!(
                "conv3x3_direct::applies is false off x86-64 ({pairs:?} {per_pass} {dw:?})"
            );
        });
    let mut dw = vec![0f32; c_out * c_in * 9];
    for part in partials.chunks(dw.len()) {
        dw.iter_mut().zip(part).for_each(|(t, v)| *t += v);
    }
    dw
}

/// The convolution with weights already packed by blocks of 16 output channels.
fn run(
    x: &[f32],
    packed: &[f32],
    (n, c_in, c_out, h, wd): (usize, usize, usize, usize, usize),
) -> Vec<f32> {
    assert!(has_avx512(), "the direct 3×3 kernel needs AVX-512F");
    let g = Padded::new(c_in, h, wd);
    let xpad = g.copy_all(x, n);
    let blocks = c_out / BLOCK;
    // One task per (image, block of output channels): its 16 output planes are one contiguous chunk of y.
    let fill = |y: &mut [MaybeUninit<f32>]| {
        y.par_chunks_mut(BLOCK * h * wd)
            .enumerate()
            .for_each(|(task, out)| {
                let (image, block) = (task / blocks, task % blocks);
                let xi = &xpad[image * g.image..(image + 1) * g.image];
                let wb = &packed[block * c_in * 9 * BLOCK..(block + 1) * c_in * 9 * BLOCK];
                // SAFETY: checked AVX-512F above; the slices have the sizes `block_planes` reads and writes.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    avx512::block_planes(xi, wb, &g, (h, wd), out)
                };
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("conv3x3_direct::applies is false off x86-64 ({xi:?} {wb:?} {out:?})");
            });
    };
    // SAFETY: the tasks cover y, and `block_planes` writes all 16·h·w values of its chunk.
    unsafe { written_by(n * c_out * h * wd, fill) }
}

/// A copy of one image with a zero border of one pixel, plus slack so a full register may be read past the
/// last column of the last row.
struct Padded {
    c_in: usize,
    h: usize,
    w: usize,
    /// Row length: w + 2.
    row: usize,
    /// Channel plane: (h + 2) · row.
    plane: usize,
    /// Image: c_in · plane + slack.
    image: usize,
}

impl Padded {
    fn new(c_in: usize, h: usize, w: usize) -> Self {
        let row = w + 2;
        let plane = (h + 2) * row;
        Self {
            c_in,
            h,
            w,
            row,
            plane,
            image: c_in * plane + LANES,
        }
    }

    /// Padded copies of the `n` images of `x`, made in parallel.
    fn copy_all(&self, x: &[f32], n: usize) -> Scratch {
        let fill = |buf: &mut [MaybeUninit<f32>]| {
            buf.par_chunks_mut(self.image)
                .zip(x.par_chunks(self.c_in * self.h * self.w))
                .for_each(|(dst, src)| self.fill(src, dst));
        };
        // SAFETY: `fill` writes every element of each image's chunk.
        unsafe { Scratch::written_by(n * self.image, fill) }
    }

    /// Writes image `src` `[C_in, H, W]` into `dst`: every element, the border and the slack as zeros.
    fn fill(&self, src: &[f32], dst: &mut [MaybeUninit<f32>]) {
        let zero = MaybeUninit::new(0.0);
        let (planes, slack) = dst.split_at_mut(self.c_in * self.plane);
        slack.fill(zero);
        for (plane, src) in planes
            .chunks_mut(self.plane)
            .zip(src.chunks(self.h * self.w))
        {
            plane[..self.row].fill(zero);
            plane[(self.h + 1) * self.row..].fill(zero);
            for (line, src) in plane[self.row..(self.h + 1) * self.row]
                .chunks_mut(self.row)
                .zip(src.chunks(self.w))
            {
                line[0] = zero;
                line[self.w + 1] = zero;
                for (d, s) in line[1..=self.w].iter_mut().zip(src) {
                    *d = MaybeUninit::new(*s);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Padded, BLOCK, GRAD_BLOCK, LANES};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// All 16 output planes `[16, H, W]` of one block for one image.
    ///
    /// # Safety
    /// The CPU supports AVX-512F; `x` is one padded image of `g`; `w` holds `g.c_in · 9 · 16` weights;
    /// `out` holds `16 · h · wd` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block_planes(
        x: &[f32],
        w: &[f32],
        g: &Padded,
        (h, wd): (usize, usize),
        out: &mut [MaybeUninit<f32>],
    ) {
        assert!(x.len() >= g.image && w.len() >= g.c_in * 9 * BLOCK && out.len() >= BLOCK * h * wd);
        let plane_out = h * wd;
        if wd == 8 {
            // Two rows per register: output rows oy and oy + 1 are 16 consecutive values.
            for oy in (0..h).step_by(2) {
                // SAFETY: reads rows oy..oy + 3 of the padded image, writes rows oy, oy + 1 of each plane.
                unsafe {
                    tile::<true>(
                        x.as_ptr().add(oy * g.row),
                        g,
                        w.as_ptr(),
                        out.as_mut_ptr().cast::<f32>().add(oy * wd),
                        plane_out,
                        0xffff,
                    )
                };
            }
            return;
        }
        for oy in 0..h {
            for ox in (0..wd).step_by(LANES) {
                // SAFETY: the last register read starts at (oy + 2)·row + ox + 2 of the last channel, within
                // the padded image and its slack; writes are masked to the columns of row oy left from ox.
                unsafe {
                    tile::<false>(
                        x.as_ptr().add(oy * g.row + ox),
                        g,
                        w.as_ptr(),
                        out.as_mut_ptr().cast::<f32>().add(oy * wd + ox),
                        plane_out,
                        columns_mask(wd - ox),
                    )
                };
            }
        }
    }

    /// 16 columns from `p` (lanes outside `mask` zero), or with `TWO_ROWS` 8 columns from `p` and 8 from the
    /// next row, `row` further on.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load<const TWO_ROWS: bool>(p: *const f32, row: usize, mask: __mmask16) -> __m512 {
        // SAFETY: the caller's pointers.
        unsafe {
            if TWO_ROWS {
                _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                    _mm512_castps_pd(_mm512_castps256_ps512(_mm256_loadu_ps(p))),
                    _mm256_castps_pd(_mm256_loadu_ps(p.add(row))),
                ))
            } else {
                _mm512_maskz_loadu_ps(mask, p)
            }
        }
    }

    /// The lanes of the `left` columns still to do (all 16 when at least 16 are left).
    fn columns_mask(left: usize) -> __mmask16 {
        if left >= LANES {
            0xffff
        } else {
            (1u16 << left) - 1
        }
    }

    /// 16 output channels × 16 columns of one row (or, `TWO_ROWS`, 8 columns of two rows): Σ over input
    /// channels and taps of weight × input row.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const TWO_ROWS: bool>(
        x: *const f32,
        g: &Padded,
        w: *const f32,
        out: *mut f32,
        plane_out: usize,
        mask: __mmask16,
    ) {
        let mut acc = [_mm512_setzero_ps(); BLOCK];
        for ci in 0..g.c_in {
            for ky in 0..3 {
                // SAFETY (all pointer reads): within the padded image and the packed weights, see the caller.
                let row = unsafe { x.add(ci * g.plane + ky * g.row) };
                for kx in 0..3 {
                    // SAFETY: within the padded image, see the caller.
                    let v = unsafe { load::<TWO_ROWS>(row.add(kx), g.row, 0xffff) };
                    let taps = unsafe { w.add(((ci * 3 + ky) * 3 + kx) * BLOCK) };
                    for (c, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(_mm512_set1_ps(unsafe { *taps.add(c) }), v, *a);
                    }
                }
            }
        }
        for (c, a) in acc.iter().enumerate() {
            // SAFETY: row `oy` of output plane c, `valid` columns from ox.
            unsafe { _mm512_mask_storeu_ps(out.add(c * plane_out), mask, *a) };
        }
    }

    /// `dw[c, ci, ky, kx] += Σ_images Σ_{y,x} dy[c, y, x] · x[ci, y + ky, x + kx]` for the 8 output channels of
    /// each image's `dy` `[8, H, W]` and its padded image `x`; `dw` is `[8, C_in, 3, 3]`. Vector accumulators
    /// over columns, one per (channel, kx), summed across lanes once per (ci, ky).
    ///
    /// # Safety
    /// The CPU supports AVX-512F; each `x` is one padded image of `g`; each `dy` holds `8 · h · w` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block_weight_grad<const TWO_ROWS: bool>(
        images: &[(&[f32], &[f32])],
        g: &Padded,
        dw: &mut [f32],
    ) {
        let (h, wd) = (g.h, g.w);
        assert!(dw.len() >= GRAD_BLOCK * g.c_in * 9);
        for (x, dy) in images {
            assert!(x.len() >= g.image && dy.len() >= GRAD_BLOCK * h * wd);
        }
        let plane = h * wd;
        for ci in 0..g.c_in {
            for ky in 0..3 {
                let mut acc = [[_mm512_setzero_ps(); 3]; GRAD_BLOCK];
                for &(x, dy) in images {
                    for oy in (0..h).step_by(if TWO_ROWS { 2 } else { 1 }) {
                        for ox in (0..wd).step_by(LANES) {
                            let mask = columns_mask(if TWO_ROWS { LANES } else { wd - ox });
                            // SAFETY: within the padded image (and its slack) and the 8 planes of dy.
                            let (xs, ds) = unsafe {
                                let row = x.as_ptr().add(ci * g.plane + (oy + ky) * g.row + ox);
                                (
                                    [
                                        load::<TWO_ROWS>(row, g.row, mask),
                                        load::<TWO_ROWS>(row.add(1), g.row, mask),
                                        load::<TWO_ROWS>(row.add(2), g.row, mask),
                                    ],
                                    dy.as_ptr().add(oy * wd + ox),
                                )
                            };
                            for (c, acc) in acc.iter_mut().enumerate() {
                                // SAFETY: row oy of plane c of dy.
                                let d = unsafe { _mm512_maskz_loadu_ps(mask, ds.add(c * plane)) };
                                for (a, v) in acc.iter_mut().zip(&xs) {
                                    *a = _mm512_fmadd_ps(d, *v, *a);
                                }
                            }
                        }
                    }
                }
                for (c, acc) in acc.iter().enumerate() {
                    for (kx, a) in acc.iter().enumerate() {
                        dw[(c * g.c_in + ci) * 9 + ky * 3 + kx] += _mm512_reduce_add_ps(*a);
                    }
                }
            }
        }
    }
}
