//! 1×1 convolutions of stride > 1 without padding (the ImageNet nets' projection shortcuts) on NCHW tensors, in
//! explicit vectors of each kernel set: each image is subsampled once into a `[C_in, P]` matrix in the thread's
//! cache (rows padded with zeros to whole vectors), and the forward pass is a register-tiled product over it with
//! the pixels along the vector lanes, every output row written in place; the input gradient is the same product of
//! the transposed weights with the output gradient. (The weight gradient keeps im2col + the gemm crate: see
//! `MIN_PIXELS`.)
//!
//! Why not im2col + the gemm crate: its packing copied the subsampled matrix a second time and the gather ran
//! value by value; ResNet-18's 64→128 on 56×56 at batch 16 ran at 37–48 % of peak in each pass (`bench --convs`,
//! AMD EPYC Zen 4).

use crate::ops::cpu_slice::{each_chunk, kept_prefix, written_by};
use crate::ops::isa::Isa;
use crate::ops::simd::{kernel_set_dispatch, Simd};
use std::cell::RefCell;
use std::mem::MaybeUninit;

/// Rows of a product (output channels, or input channels for the input gradient) per register tile.
const ROWS: usize = 4;

/// Pixel vectors per register tile of a product.
const VECTORS: usize = 3;

/// Output pixels per plane from which these kernels run a shape's forward, and its input gradient. ResNet-18 at
/// batch 16, a probe of alternated calls (these kernels against im2col + the gemm crate, AMD EPYC Zen 4): 64→128
/// on 56×56 (28×28 out) forward 1.78–1.91 ms against 1.94–2.29, input gradient 1.86–1.96 against 1.95–2.16;
/// 128→256 on 28×28 (14×14 out) forward 1.40–1.55 ms against 1.68–1.73, but input gradient 114–119 GFLOP/s
/// against 124–127. On 7×7 (49 pixels in rows of 64 with AVX-512) the input gradient ran at 42 % of peak
/// against 54–57 % (`bench --convs`). A weight gradient here (the subsampled image transposed by 8×8 blocks, a
/// product over the pixels) ran 92–100 GFLOP/s against 90–94 on 28×28 outputs and 111–121 against 126–132 on
/// 14×14, 40–43 % of peak against 41 % in `bench --convs`: no better, so not kept.
const MIN_PIXELS: usize = 196;
const MIN_PIXELS_INPUT_GRADIENT: usize = 784;

/// Values of the summed dimension per pass over a product's tiles (see `product_tiles`).
const DEPTH_BLOCK: usize = 128;

thread_local! {
    /// A subsampled image, and an output gradient with its rows padded, per thread.
    static MATRICES: RefCell<[Vec<f32>; 2]> = const { RefCell::new([Vec::new(), Vec::new()]) };
}

/// One strided 1×1 convolution: `n` images of `c_in` channels on `h`×`w` planes, `c_out` outputs, `stride`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StridedPointwise {
    pub n: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub h: usize,
    pub w: usize,
    pub stride: usize,
}

impl StridedPointwise {
    /// Whether these kernels run the shape's forward (or, `input_gradient`, its input gradient) on `isa`: a vector
    /// kernel set (the portable build keeps the gemm crate's kernels), rows in whole register tiles, and output
    /// planes of [`MIN_PIXELS`] or more ([`MIN_PIXELS_INPUT_GRADIENT`] for the input gradient).
    pub fn applies(&self, isa: Isa, input_gradient: bool) -> bool {
        let min_pixels = match input_gradient {
            false => MIN_PIXELS,
            true => MIN_PIXELS_INPUT_GRADIENT,
        };
        matches!(isa, Isa::Avx2 | Isa::Avx512)
            && self.stride > 1
            && self.c_in.is_multiple_of(ROWS)
            && self.c_out.is_multiple_of(ROWS)
            && self.p() >= min_pixels
    }

    fn ow(&self) -> usize {
        self.w.div_ceil(self.stride)
    }

    /// Output pixels per plane.
    fn p(&self) -> usize {
        self.h.div_ceil(self.stride) * self.ow()
    }

    /// The matrices' row length: `p` rounded up to whole vectors of `isa`.
    fn row(&self, isa: Isa) -> usize {
        self.p().next_multiple_of(lanes(isa))
    }

    fn image_in(&self) -> usize {
        self.c_in * self.h * self.w
    }

    fn image_out(&self) -> usize {
        self.c_out * self.p()
    }

    /// `y = W · subsample(x)` of all images, `w` as `[C_out, C_in]`.
    pub fn forward(&self, isa: Isa, x: &[f32], w: &[f32]) -> Vec<f32> {
        let fill = |y: &mut [MaybeUninit<f32>]| {
            each_chunk(y, self.image_out(), true, |i, out| {
                self.forward_image(isa, x, w, i, out)
            })
        };
        // SAFETY: every image's product writes all its rows.
        unsafe { written_by(self.n * self.image_out(), fill) }
    }

    /// `y = W · subsample(x)` of image `i` into `out`.
    fn forward_image(
        &self,
        isa: Isa,
        x: &[f32],
        w: &[f32],
        i: usize,
        out: &mut [MaybeUninit<f32>],
    ) {
        MATRICES.with(|m| {
            let [col, _] = &mut *m.borrow_mut();
            let row = self.row(isa);
            let col = kept_prefix(col, self.c_in * row);
            let x = &x[i * self.image_in()..][..self.image_in()];
            run(isa, Job::Subsample { s: *self, x, col });
            let product = Product {
                a: (w, (self.c_in, 1)),
                b: col,
                rows: self.c_out,
                depth: self.c_in,
                row,
                p: self.p(),
            };
            run(isa, Job::Product { product, out });
        })
    }

    /// `Wᵀ` as `[C_in, C_out]`, for [`StridedPointwise::input_columns`]: its rows are read along (from `W`
    /// itself, a tile's broadcasts went `C_in` values apart, 256→512 on 14×14 ~8 % slower than the gemm crate).
    pub fn transposed_weights(&self, w: &[f32]) -> Vec<f32> {
        let mut wt = vec![0f32; w.len()];
        for (o, row) in w.chunks_exact(self.c_in).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                wt[i * self.c_out + o] = v;
            }
        }
        wt
    }

    /// Image `i`'s `dx` columns, `Wᵀ · dY_i`, as `[C_in, P]` into `dcol`; `wt` from
    /// [`StridedPointwise::transposed_weights`].
    pub fn input_columns(&self, isa: Isa, dy: &[f32], wt: &[f32], i: usize, dcol: &mut [f32]) {
        MATRICES.with(|m| {
            let [_, padded] = &mut *m.borrow_mut();
            let padded = padded_rows(dy, (i, self.c_out, self.p(), self.row(isa)), padded);
            let product = Product {
                a: (wt, (self.c_out, 1)),
                b: padded,
                rows: self.c_in,
                depth: self.c_out,
                row: self.row(isa),
                p: self.p(),
            };
            // SAFETY: f32 as `MaybeUninit<f32>`, only ever written with initialised values.
            let out = unsafe { &mut *(dcol as *mut [f32] as *mut [MaybeUninit<f32>]) };
            run(isa, Job::Product { product, out });
        })
    }
}

/// Image `i`'s `rows`×`p` matrix of `m` as rows of `row` (zeros after `p`): the image itself where its rows are
/// whole vectors already (`row == p`, as on 28×28 outputs), else a copy in `buf`.
fn padded_rows<'a>(
    m: &'a [f32],
    (i, rows, p, row): (usize, usize, usize, usize),
    buf: &'a mut Vec<f32>,
) -> &'a [f32] {
    let image = &m[i * rows * p..][..rows * p];
    if row == p {
        return image;
    }
    let buf = kept_prefix(buf, rows * row);
    for (dst, src) in buf.chunks_exact_mut(row).zip(image.chunks_exact(p)) {
        dst[..p].copy_from_slice(src);
        dst[p..].fill(0.0);
    }
    buf
}

/// The f32 lanes of a vector of `isa`.
fn lanes(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 16,
        Isa::Avx2 | Isa::Generic => 8,
    }
}

/// `out[r·p + q] = Σ_d a[r, d] · b[d·row + q]` for `q < p`, `a` given with its (row, column) strides, summed in
/// order of d.
struct Product<'a> {
    a: (&'a [f32], (usize, usize)),
    b: &'a [f32],
    rows: usize,
    depth: usize,
    row: usize,
    p: usize,
}

enum Job<'a> {
    Subsample {
        s: StridedPointwise,
        x: &'a [f32],
        col: &'a mut [f32],
    },
    Product {
        product: Product<'a>,
        out: &'a mut [MaybeUninit<f32>],
    },
}

/// Runs `job` with the kernel set `isa`. Panics where an operand is shorter than the job reads or writes.
fn run(isa: Isa, job: Job) {
    check(isa, &job);
    // SAFETY: `isa` is one this CPU runs (the callers pass `Isa::current()` or one of `Isa::available()`); the
    // operands' lengths are checked.
    unsafe { run_on_isa(isa, job) }
}

fn check(isa: Isa, job: &Job) {
    let ok = match job {
        Job::Subsample { s, x, col } => {
            x.len() == s.image_in()
                && col.len().is_multiple_of(s.c_in)
                && col.len() / s.c_in >= s.p()
        }
        Job::Product { product: p, out } => {
            let (a, (rs, cs)) = p.a;
            p.rows.is_multiple_of(ROWS)
                && p.depth > 0
                && a.len() > (p.rows - 1) * rs + (p.depth - 1) * cs
                && p.b.len() >= p.depth * p.row
                && out.len() >= p.rows * p.p
                && p.row >= p.p
                && p.row.is_multiple_of(lanes(isa))
        }
    };
    assert!(
        ok,
        "strided 1×1 convolution: an operand too short for its job"
    );
}

kernel_set_dispatch!(Job);

/// # Safety
/// The CPU runs `S`; the operands are as long as `check` requires.
#[inline(always)]
unsafe fn run_on<S: Simd>(job: Job) {
    unsafe {
        match job {
            Job::Subsample { s, x, col } => match s.stride {
                2 => subsample_by_2::<S>(&s, x, col),
                _ => subsample_any(&s, x, col),
            },
            Job::Product { product, out } => product_tiles::<S>(&product, out),
        }
    }
}

/// Every other pixel of every other row of each channel plane of `x` into a row of `col` (rows of
/// `col.len() / C_in` values, zeros after the `p` pixels), a vector at a time where the 2·LANES values read and the
/// LANES written lie in `x` and `col`: a vector that runs past its output row writes into the next row, the
/// zero padding or the next channel, all written after it (LLVM kept the strided copy scalar, ~19 % of the
/// kernels' time on ResNet-18's 64→128 in `perf`).
#[inline(always)]
unsafe fn subsample_by_2<S: Simd>(s: &StridedPointwise, x: &[f32], col: &mut [f32]) {
    let (ow, p) = (s.ow(), s.p());
    let row = col.len() / s.c_in;
    for (c, plane) in x.chunks_exact(s.h * s.w).enumerate() {
        for oy in 0..p / ow {
            let (src, dst) = (c * s.h * s.w + 2 * oy * s.w, c * row + oy * ow);
            let mut ox = 0;
            while ox < ow {
                if src + 2 * (ox + S::LANES) <= x.len() && dst + ox + S::LANES <= col.len() {
                    unsafe {
                        S::load_even(x.as_ptr().add(src + 2 * ox))
                            .store(col.as_mut_ptr().add(dst + ox))
                    };
                    ox += S::LANES;
                } else {
                    col[dst + ox] = plane[2 * oy * s.w + 2 * ox];
                    ox += 1;
                }
            }
        }
        col[c * row + p..(c + 1) * row].fill(0.0);
    }
}

/// [`subsample_by_2`] for any stride.
#[inline(always)]
fn subsample_any(s: &StridedPointwise, x: &[f32], col: &mut [f32]) {
    let (ow, p, step) = (s.ow(), s.p(), s.stride);
    let row = col.len() / s.c_in;
    for (plane, dst) in x.chunks_exact(s.h * s.w).zip(col.chunks_exact_mut(row)) {
        for (oy, out) in dst[..p].chunks_exact_mut(ow).enumerate() {
            let src = &plane[oy * step * s.w..];
            for (ox, v) in out.iter_mut().enumerate() {
                *v = src[ox * step];
            }
        }
        dst[p..].fill(0.0);
    }
}

/// The product by tiles of [`ROWS`] rows × up to [`VECTORS`] vectors of `b`'s row, in blocks of [`DEPTH_BLOCK`] of
/// the summed dimension, pixels next (the block's columns of `b`, ≤ 24 KB, stay in L1 while every row block
/// uses them); the sums go on from the stored tile in the next depth block, in the same order.
#[inline(always)]
unsafe fn product_tiles<S: Simd>(p: &Product, out: &mut [MaybeUninit<f32>]) {
    for d0 in (0..p.depth).step_by(DEPTH_BLOCK) {
        let depth = d0..(d0 + DEPTH_BLOCK).min(p.depth);
        let from_out = d0 > 0;
        let mut q0 = 0;
        while q0 < p.row {
            // Tiles of 3 vectors, the last four as 2 + 2 rather than 3 + 1 (a 1-vector tile does a
            // broadcast per FMA).
            let vectors = match (p.row - q0) / S::LANES {
                4 => 2,
                left => left.min(VECTORS),
            };
            for r0 in (0..p.rows).step_by(ROWS) {
                let at = (r0, q0, depth.clone(), from_out);
                unsafe {
                    match vectors {
                        1 => product_tile::<S, 1>(p, at, out),
                        2 => product_tile::<S, 2>(p, at, out),
                        _ => product_tile::<S, VECTORS>(p, at, out),
                    }
                }
            }
            q0 += vectors * S::LANES;
        }
    }
}

#[inline(always)]
unsafe fn product_tile<S: Simd, const V: usize>(
    p: &Product,
    (r0, q0, depth, from_out): (usize, usize, std::ops::Range<usize>, bool),
    out: &mut [MaybeUninit<f32>],
) {
    let (a, (rs, cs)) = p.a;
    unsafe {
        let mut acc = [[S::zero(); V]; ROWS];
        if from_out {
            for (r, acc) in acc.iter_mut().enumerate() {
                let src = out[(r0 + r) * p.p..][..p.p].as_ptr().cast::<f32>();
                for (j, v) in acc.iter_mut().enumerate() {
                    let q = q0 + j * S::LANES;
                    if q + S::LANES <= p.p {
                        *v = S::load(src.add(q));
                    } else if q < p.p {
                        let mut lanes = [0f32; 16];
                        lanes[..p.p - q]
                            .copy_from_slice(std::slice::from_raw_parts(src.add(q), p.p - q));
                        *v = S::load(lanes.as_ptr());
                    }
                }
            }
        }
        for d in depth {
            let b = p.b.as_ptr().add(d * p.row + q0);
            let mut bv = [S::zero(); V];
            for (j, v) in bv.iter_mut().enumerate() {
                *v = S::load(b.add(j * S::LANES));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let weight = S::splat(a.as_ptr().add((r0 + r) * rs + d * cs));
                for (acc, &bv) in acc.iter_mut().zip(&bv) {
                    *acc = weight.mul_add(bv, *acc);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let dst = &mut out[(r0 + r) * p.p..][..p.p];
            for (j, v) in acc.iter().enumerate() {
                let q = q0 + j * S::LANES;
                if q + S::LANES <= p.p {
                    v.store(dst.as_mut_ptr().add(q).cast());
                } else if q < p.p {
                    // The row's last, partial vector: through a buffer.
                    let mut lanes = [MaybeUninit::<f32>::uninit(); 16];
                    v.store(lanes.as_mut_ptr().cast());
                    for (d, l) in dst[q..].iter_mut().zip(&lanes) {
                        d.write(l.assume_init());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The forward and the input gradient's columns on every kernel set against sums in f64 by definition, on
    /// planes with odd sides (partial last vectors, rows not in whole vectors), strides 2 and 3, more input
    /// channels than a depth block, and output rows of 8 (subsampled by whole vectors and values).
    #[test]
    fn forward_and_input_gradient_equal_the_definition() {
        for (n, c_in, c_out, side, stride) in [
            (3, 16, 8, 29, 2),
            (9, 32, 12, 41, 3),
            (2, 144, 132, 28, 2),
            (2, 16, 4, 16, 2),
        ] {
            let s = StridedPointwise {
                n,
                c_in,
                c_out,
                h: side,
                w: side,
                stride,
            };
            let (os, p) = (side.div_ceil(stride), s.p());
            let (x, w, dy) = (
                values(n * c_in * side * side, 1),
                values(c_out * c_in, 2),
                values(n * c_out * p, 3),
            );
            let at = |i: usize, c: usize, q: usize| {
                x[((i * c_in + c) * side + q / os * stride) * side + q % os * stride] as f64
            };
            for isa in Isa::available() {
                let what = format!("{n}×{c_in}→{c_out} on {side}×{side}/{stride}, {isa:?}");
                let y = s.forward(isa, &x, &w);
                let wt = s.transposed_weights(&w);
                let mut dcol = vec![0f32; c_in * p];
                for i in 0..n {
                    s.input_columns(isa, &dy, &wt, i, &mut dcol);
                    for o in 0..c_out {
                        for q in 0..p {
                            let e: f64 = (0..c_in)
                                .map(|c| w[o * c_in + c] as f64 * at(i, c, q))
                                .sum();
                            let v = y[(i * c_out + o) * p + q] as f64;
                            assert!((v - e).abs() < 1e-4, "{what}: y[{i}, {o}, {q}] {v} vs {e}");
                        }
                    }
                    for c in 0..c_in {
                        for q in 0..p {
                            let e: f64 = (0..c_out)
                                .map(|o| {
                                    w[o * c_in + c] as f64 * dy[(i * c_out + o) * p + q] as f64
                                })
                                .sum();
                            let v = dcol[c * p + q] as f64;
                            assert!((v - e).abs() < 1e-4, "{what}: dx[{i}, {c}, {q}] {v} vs {e}");
                        }
                    }
                }
            }
        }
    }
}
