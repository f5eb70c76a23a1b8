//! Direct 3×3 convolution, stride 1, padding 1, in NCHW with AVX-512 (x86-64; `ops::isa` picks the set): the
//! forward pass, the input gradient (the same convolution of the output gradient with the kernel flipped and
//! its channel axes swapped) and the weight gradient of the narrow 3×3 layers.
//!
//! Why: through im2col, a 16→16 layer on 32×32 images first writes a column matrix nine times the input's
//! size, then the GEMM packs it again; for so few channels that costs as much as the multiply-adds, and the
//! GEMM ran at ~100 GFLOP/s on two cores. Here each image is copied once into a zero-bordered buffer and
//! one vector accumulator per output channel of a block (16 channels × 16 columns) takes every input vector
//! with one FMA per channel.
//!
//! With AVX2 (8 channels × 8 columns in its 16 registers) this kernel ran at 35–42 % of the FMA peak; the
//! channel-blocked kernel (`ops::blocked`, reached through `Algorithm::Blocked`) runs those layers instead.
//! The forward kernel is written over a few primitives per set (load, store, FMA, …: `direct_forward!`).
//!
//! Layouts: x `[N, C_in, H, W]`, weight `[C_out, C_in, 3, 3]`, y `[N, C_out, H, W]`, all row-major.

use crate::ops::cpu_slice::{written_by, Scratch};
use crate::ops::isa::Isa;
use crate::ops::taps::kernel_3x3;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// All output planes of one block of output channels for one image: `(x, packed w, geometry, (h, w), out)`.
type BlockPlanes = unsafe fn(&[f32], &[f32], &Padded, (usize, usize), &mut [MaybeUninit<f32>]);

/// The weight gradient of one block of output channels from a chunk of `(padded x, dy)` images.
type BlockWeightGrad = unsafe fn(&[(&[f32], &[f32])], &Padded, &mut [f32]);

/// The sizes and entry points of one kernel set.
struct Kernels {
    /// Columns per accumulator register.
    lanes: usize,
    /// Output channels per forward task: one accumulator register per channel.
    block: usize,
    block_planes: BlockPlanes,
    /// Output channels per weight-gradient task, and the kernels with one row per register and with two.
    /// (An AVX2 one, 4 channels × 3 taps of accumulators in 16 registers, lost to im2col + GEMM: `RESNET_CPU_ISA=
    /// avx2 bench --convs`, AMD EPYC: 16→16 on 32×32 75 GFLOP/s, 32→32 on 16×16 77, the GEMM 86 and 91.)
    weight_grad: (usize, [BlockWeightGrad; 2]),
}

/// The direct kernels of `isa`, where it has them and the CPU runs them.
fn kernels(isa: Isa) -> Option<&'static Kernels> {
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 if is_x86_feature_detected!("avx512f") => return Some(&avx512::KERNELS),
        _ => {}
    }
    let _ = isa;
    None
}

fn kernels_for(isa: Isa) -> &'static Kernels {
    kernels(isa).unwrap_or_else(|| panic!("no direct 3×3 kernel for the {isa} set on this CPU"))
}

/// Whether `isa`'s direct kernel takes a 3×3/stride-1/padding-1 convolution with `c_out` output channels on
/// this plane. Rows half a register wide (AVX-512: 8, the CIFAR nets' last stage) fill a register with two
/// rows; other rows narrower than a register would waste most lanes, and the GEMM path takes those.
pub fn applies(isa: Isa, c_out: usize, (height, width): (usize, usize)) -> bool {
    kernels(isa).is_some_and(|k| {
        c_out.is_multiple_of(k.block)
            && (width >= k.lanes || (width == k.lanes / 2 && height.is_multiple_of(2)))
    })
}

/// Whether [`weight_grad`] runs for these channel counts and this plane. With AVX-512 it wins where the
/// GEMM's reduction is short (16→16 on 32×32: 155 vs 110 GFLOP/s; 32→32 on 16×16: 145 vs 120; 64→64 on 8×8,
/// two rows per register: 173 vs 127) and loses on wide layers with wide planes (64→64 on 56×56: 149 vs 179).
pub fn weight_grad_applies(
    isa: Isa,
    (c_in, c_out): (usize, usize),
    (height, width): (usize, usize),
) -> bool {
    kernels(isa).is_some_and(|k| {
        let plane_fits =
            (c_in <= 32 && width >= k.lanes) || (width == k.lanes / 2 && height.is_multiple_of(2));
        c_out.is_multiple_of(k.weight_grad.0) && plane_fits
    })
}

/// `y = conv3x3(x, w)` (`n·c_out·h·w` values). Call only where [`applies`] holds.
pub fn forward(
    isa: Isa,
    x: &[f32],
    w: &[f32],
    dims: (usize, usize, usize, usize, usize),
) -> Vec<f32> {
    let (n, c_in, c_out, h, wd) = dims;
    let k = kernels_for(isa);
    let packed = pack(w, (c_out, c_in), false, k.block);
    run(k, x, &packed, (n, c_in, c_out, h, wd))
}

/// `dx` of `y = conv3x3(x, w)` from `dy`: `dx = conv3x3(dy, w')`, `w'[ci, co, ky, kx] = w[co, ci, 2−ky, 2−kx]`;
/// `n·c_in·h·w` values. Call only where [`applies`]`(isa, c_in, …)` holds.
pub fn input_grad(
    isa: Isa,
    dy: &[f32],
    w: &[f32],
    dims: (usize, usize, usize, usize, usize),
) -> Vec<f32> {
    let (n, c_in, c_out, h, wd) = dims;
    let k = kernels_for(isa);
    let packed = pack(w, (c_out, c_in), true, k.block);
    run(k, dy, &packed, (n, c_out, c_in, h, wd))
}

/// The weights by blocks of `block` output channels, `[C_in][3][3][block]` per block: the weights of one tap
/// side by side. `transposed`: packs `w'` of [`input_grad`] instead (channel axes swapped, taps flipped).
fn pack(w: &[f32], (c_out, c_in): (usize, usize), transposed: bool, block: usize) -> Vec<f32> {
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
                packed[(((o / block) * ins + i) * 9 + tap) * block + o % block] = v;
            }
        }
    }
    packed
}

/// `dw` `[C_out, C_in, 3, 3]` of `y = conv3x3(x, w)` from `x` and `dy`, summed over images in groups of `group`
/// (one partial sum per group, added in group order: the same result whatever the thread count).
/// Call only where [`weight_grad_applies`]`(isa, (c_in, c_out), (h, w))` holds.
pub fn weight_grad(
    isa: Isa,
    x: &[f32],
    dy: &[f32],
    (n, c_in, c_out, h, wd): (usize, usize, usize, usize, usize),
    group: usize,
) -> Vec<f32> {
    let k = kernels_for(isa);
    let (gb, grad_kernels) = k.weight_grad;
    let g = Padded::new(c_in, h, wd);
    let xpad = g.copy_all(x, n);
    let (groups, blocks) = (n.div_ceil(group), c_out / gb);
    let block_len = gb * c_in * 9;
    // partials[group][c_out, c_in, 3, 3]; one task per (group, block of output channels).
    let mut partials = vec![0f32; groups * c_out * c_in * 9];
    partials
        .par_chunks_mut(block_len)
        .enumerate()
        .for_each(|(task, dw)| {
            let (grp, block) = (task / blocks, task % blocks);
            let images = grp * group..((grp + 1) * group).min(n);
            let pairs: Vec<(&[f32], &[f32])> = images
                .map(|image| {
                    let dyi = &dy[(image * c_out + block * gb) * h * wd..];
                    (
                        &xpad[image * g.image..(image + 1) * g.image],
                        &dyi[..gb * h * wd],
                    )
                })
                .collect();
            // Images summed in registers before a sum across lanes: as many as keep their gradient planes
            // within ~16 KiB (L1); one at a time for large planes.
            let per_pass = (16 * 1024 / (gb * h * wd * 4)).max(1);
            let two_rows = wd < k.lanes;
            for chunk in pairs.chunks(per_pass) {
                // SAFETY: `kernels` checked the CPU's features; the slices have the sizes the kernel reads.
                unsafe { (grad_kernels[two_rows as usize])(chunk, &g, dw) };
            }
        });
    let mut dw = vec![0f32; c_out * c_in * 9];
    for part in partials.chunks(dw.len()) {
        dw.iter_mut().zip(part).for_each(|(t, v)| *t += v);
    }
    dw
}

/// The convolution with weights already packed by blocks of `k.block` output channels.
fn run(
    k: &Kernels,
    x: &[f32],
    packed: &[f32],
    (n, c_in, c_out, h, wd): (usize, usize, usize, usize, usize),
) -> Vec<f32> {
    let g = Padded::new(c_in, h, wd);
    let xpad = g.copy_all(x, n);
    let (block, blocks) = (k.block, c_out / k.block);
    // One task per (image, block of output channels): its output planes are one contiguous chunk of y.
    let fill = |y: &mut [MaybeUninit<f32>]| {
        y.par_chunks_mut(block * h * wd)
            .enumerate()
            .for_each(|(task, out)| {
                let (image, b) = (task / blocks, task % blocks);
                let xi = &xpad[image * g.image..(image + 1) * g.image];
                let wb = &packed[b * c_in * 9 * block..(b + 1) * c_in * 9 * block];
                // SAFETY: `kernels` checked the CPU's features; the slices have the sizes `block_planes`
                // reads and writes.
                unsafe { (k.block_planes)(xi, wb, &g, (h, wd), out) };
            });
    };
    // SAFETY: the tasks cover y, and `block_planes` writes all block·h·w values of its chunk.
    unsafe { written_by(n * c_out * h * wd, fill) }
}

/// Values after the last padded plane: a full register of the widest set may be read past the last column.
const SLACK: usize = 16;

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
            image: c_in * plane + SLACK,
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

/// The forward kernel of one set over its primitives: `V` (a register of `LANES` f32), `Mask` (which lanes to
/// store) and `zero`, `splat`, `fma`, `load_all`, `store`, `columns_mask`, each with the set's
/// `target_feature`, so that everything inlines into the entry point.
macro_rules! direct_forward {
    ($features:literal) => {
        /// All `BLOCK` output planes `[BLOCK, H, W]` of one block for one image.
        ///
        /// # Safety
        /// The CPU has the set's features; `x` is one padded image of `g`; `w` holds `g.c_in · 9 · BLOCK`
        /// weights; `out` holds `BLOCK · h · wd` values.
        #[target_feature(enable = $features)]
        unsafe fn block_planes(
            x: &[f32],
            w: &[f32],
            g: &Padded,
            (h, wd): (usize, usize),
            out: &mut [MaybeUninit<f32>],
        ) {
            assert!(
                x.len() >= g.image && w.len() >= g.c_in * 9 * BLOCK && out.len() >= BLOCK * h * wd
            );
            let plane_out = h * wd;
            if wd == LANES / 2 {
                // Two rows per register: output rows oy and oy + 1 are LANES consecutive values.
                for oy in (0..h).step_by(2) {
                    // SAFETY: reads rows oy..oy + 3 of the padded image, writes rows oy, oy + 1 of each plane.
                    unsafe {
                        tile::<true>(
                            x.as_ptr().add(oy * g.row),
                            g,
                            w.as_ptr(),
                            out.as_mut_ptr().cast::<f32>().add(oy * wd),
                            plane_out,
                            columns_mask(LANES),
                        )
                    };
                }
                return;
            }
            for oy in 0..h {
                for ox in (0..wd).step_by(LANES) {
                    // SAFETY: the last register read starts at (oy + 2)·row + ox + 2 of the last channel,
                    // within the padded image and its slack; writes are masked to the columns of row oy left
                    // from ox.
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

        /// `BLOCK` output channels × `LANES` columns of one row (or, `TWO_ROWS`, half as many columns of two
        /// rows): Σ over input channels and taps of weight × input row.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn tile<const TWO_ROWS: bool>(
            x: *const f32,
            g: &Padded,
            w: *const f32,
            out: *mut f32,
            plane_out: usize,
            mask: Mask,
        ) {
            let mut acc = [zero(); BLOCK];
            for ci in 0..g.c_in {
                for ky in 0..3 {
                    // SAFETY (all pointer reads): within the padded image and the packed weights, see the
                    // caller.
                    let row = unsafe { x.add(ci * g.plane + ky * g.row) };
                    for kx in 0..3 {
                        let v = unsafe { load_all::<TWO_ROWS>(row.add(kx), g.row) };
                        let taps = unsafe { w.add(((ci * 3 + ky) * 3 + kx) * BLOCK) };
                        for (c, a) in acc.iter_mut().enumerate() {
                            *a = fma(unsafe { splat(taps.add(c)) }, v, *a);
                        }
                    }
                }
            }
            for (c, a) in acc.iter().enumerate() {
                // SAFETY: row `oy` of output plane c, the masked columns from ox.
                unsafe { store(out.add(c * plane_out), mask, *a) };
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Kernels, Padded};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    const LANES: usize = 16;
    const BLOCK: usize = 16;
    /// Output channels per weight-gradient task: 8 channels × 3 horizontal taps = 24 accumulator registers.
    const GRAD_BLOCK: usize = 8;
    type Mask = __mmask16;

    pub(super) static KERNELS: Kernels = Kernels {
        lanes: LANES,
        block: BLOCK,
        block_planes,
        weight_grad: (
            GRAD_BLOCK,
            [block_weight_grad::<false>, block_weight_grad::<true>],
        ),
    };

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn zero() -> __m512 {
        _mm512_setzero_ps()
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn splat(p: *const f32) -> __m512 {
        // SAFETY: the caller's pointer.
        _mm512_set1_ps(unsafe { *p })
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }

    /// 16 columns from `p`, or with `TWO_ROWS` 8 columns from `p` and 8 from the next row, `row` further on.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load_all<const TWO_ROWS: bool>(p: *const f32, row: usize) -> __m512 {
        // SAFETY: the caller's pointers.
        unsafe {
            if TWO_ROWS {
                _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                    _mm512_castps_pd(_mm512_castps256_ps512(_mm256_loadu_ps(p))),
                    _mm256_castps_pd(_mm256_loadu_ps(p.add(row))),
                ))
            } else {
                _mm512_loadu_ps(p)
            }
        }
    }

    /// [`load_all`] with the lanes outside `mask` zero (two full half-rows with `TWO_ROWS`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load<const TWO_ROWS: bool>(p: *const f32, row: usize, mask: Mask) -> __m512 {
        // SAFETY: the caller's pointers; masked-off lanes are not read.
        unsafe {
            if TWO_ROWS {
                load_all::<true>(p, row)
            } else {
                _mm512_maskz_loadu_ps(mask, p)
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store(p: *mut f32, mask: Mask, v: __m512) {
        // SAFETY: the caller's pointer, for the lanes of `mask`.
        unsafe { _mm512_mask_storeu_ps(p, mask, v) }
    }

    /// The lanes of the `left` columns still to do (all 16 when at least 16 are left).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn columns_mask(left: usize) -> Mask {
        if left >= LANES {
            0xffff
        } else {
            (1u16 << left) - 1
        }
    }

    direct_forward!("avx512f");

    /// `dw[c, ci, ky, kx] += Σ_images Σ_{y,x} dy[c, y, x] · x[ci, y + ky, x + kx]` for the 8 output channels of
    /// each image's `dy` `[8, H, W]` and its padded image `x`; `dw` is `[8, C_in, 3, 3]`. Vector accumulators
    /// over columns, one per (channel, kx), summed across lanes once per (ci, ky).
    ///
    /// # Safety
    /// The CPU supports AVX-512F; each `x` is one padded image of `g`; each `dy` holds `8 · h · w` values.
    #[target_feature(enable = "avx512f")]
    unsafe fn block_weight_grad<const TWO_ROWS: bool>(
        images: &[(&[f32], &[f32])],
        g: &Padded,
        dw: &mut [f32],
    ) {
        let (h, wd) = (g.h, g.w);
        assert!(dw.len() >= GRAD_BLOCK * g.c_in * 9 && (!TWO_ROWS || wd == LANES / 2));
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
                                // SAFETY: row oy (and oy + 1) of plane c of dy, consecutive values.
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
